"""Shared bits of the benchmark scripts: argument defaults, tables, JSON with machine info."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NoReturn

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# ResNet-20 on Fashion-MNIST, trained by prunekit and shipped (checkpoints/README.md has its recipe)
FMNIST_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "fmnist-resnet20" / "model.safetensors"
FMNIST_MLPNET_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "fmnist-mlpnet" / "model.safetensors"
JPEG_TAR_MD5 = "43ad1cc9156043cc575cc07791220478"      # cifar10/test-jpeg.tar, from the data README
JPEG_CACHE = "/tmp/prunekit-cifar10-jpeg"


def unpacked_jpeg_test(data_dir: str | Path, cache_dir: str | Path = JPEG_CACHE) -> Path:
    """The 10,000 official CIFAR-10 test images as lossy JPEG (an image-folder tree
    ``cache_dir/test/<class>/*.jpg``; sorted class names = CIFAR-10's label order), unpacked once
    from ``data_dir/cifar10/test-jpeg.tar`` after its md5 is checked. JPEG costs a model 10 to 13
    points, not the same for every model: accuracy on compressed images (about +-0.4 points each)."""
    cache_dir = Path(cache_dir)
    if (cache_dir / ".unpacked").exists():
        return cache_dir
    tar_path = Path(data_dir) / "cifar10" / "test-jpeg.tar"
    digest = hashlib.md5(tar_path.read_bytes()).hexdigest()
    if digest != JPEG_TAR_MD5:
        refuse(f"{tar_path} has md5 {digest}, expected {JPEG_TAR_MD5}: fetch the file again")
    partial = cache_dir.with_name(f"{cache_dir.name}.{os.getpid()}.partial")
    with tarfile.open(tar_path) as tar:
        tar.extractall(partial, filter="data")          # no links, nothing outside the folder
    (partial / ".unpacked").touch()
    try:
        partial.rename(cache_dir)                       # atomic: a reader never sees half a tree
    except OSError:                                     # another process unpacked it first
        shutil.rmtree(partial)
        if not (cache_dir / ".unpacked").exists():
            refuse(f"{cache_dir} exists but holds no unpacked test set: remove it or pass another folder")
    return cache_dir


def jpeg_copies_of(exact, jpeg):
    """(N,) bool over the JPEG test set (an ``ImageDataset``): the JPEG copies of the images in
    ``exact`` (the first images of the official test batch). The tar numbers each class's images in
    the official order, so these are each class's first (its count in ``exact``) files; checked by
    pixels: mean absolute difference 5.8 of 255 against 70 for the next file."""
    same = torch.zeros(len(jpeg), dtype=torch.bool)
    for label, count in enumerate(torch.bincount(exact.labels, minlength=int(jpeg.labels.max()) + 1).tolist()):
        same[torch.nonzero(jpeg.labels == label).flatten()[:count]] = True
    return same


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_average() -> float | None:
    """The machine's 1-minute load average now (``os.getloadavg``; None where the system has none).
    Recorded per row (``load_average``, as the row starts): about 1 on a row of its own is the
    previous row's process; clearly above that, other jobs shared the cores and seconds are inflated."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def quiet_note(load_at_start: float | None, threads: int | str) -> str:
    """One line for a table's header: threads per row and whether the machine was quiet when the
    script started (1-minute load under half a core, or a tenth of the cores on a big machine)."""
    cores = os.cpu_count() or 1
    if load_at_start is None:
        state = "load unknown"
    elif load_at_start < max(0.5, 0.1 * cores):
        state = f"quiet at start (1-minute load {load_at_start:.2f} on {cores} cores)"
    else:
        state = (f"NOT quiet at start (1-minute load {load_at_start:.2f} on {cores} cores: other jobs ran, "
                 "seconds are inflated; each row's load_average is in the JSON)")
    return f"{threads} thread(s) per row; machine {state}"


def one_thread_env(threads: int = 1) -> dict:
    """The environment for a row's own process: ``threads`` OpenMP / MKL threads (torch's intra-op
    threads follow OMP_NUM_THREADS), whatever this process was started with."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def read_rows(path: str | Path, resume: bool) -> list[dict]:
    """The rows already in ``path`` when resuming (a killed run goes on where it stopped), else none."""
    return json.loads(Path(path).read_text())["rows"] if resume and Path(path).exists() else []


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: VmHWM (``prunekit.process_memory.peak_usage``), not
    ru_maxrss, which a row's process inherits from the script that launched it."""
    from prunekit.process_memory import peak_usage
    return peak_usage() / 2**20


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a fixed-width table; columns are (key, header, format spec)."""
    widths = [max(len(header), 10) for _, header, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            value = row.get(key)
            cells.append(("-" if value is None else format(value, fmt)).rjust(w))
        print("  ".join(cells))


def refuse(message: str) -> NoReturn:
    """Bad input: one line naming the fix, exit code 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def unused_path(path: str | Path) -> Path:
    """``path`` if nothing is there, else the first free ``<stem>-2<suffix>``, ``-3`` ... beside it
    (a folder: ``<name>-2``; its name may hold dots, e.g. ``autobot-0.5``)."""
    path = Path(path)
    stem, suffix = (path.name, "") if path.is_dir() else (path.stem, path.suffix)
    candidate, number = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{stem}-{number}{suffix}")
        number += 1
    return candidate


_TARGETS: dict[Path, Path] = {}       # result file asked for -> file this process writes


def write_json(path: str | Path, payload: dict, *, extends: bool = False) -> Path:
    """Write ``payload`` (with the machine's facts) to ``path`` atomically; returns the file written.

    A file that was there before this process first wrote to ``path`` is never overwritten: the
    results go to ``unused_path(path)`` (said on stdout), unless ``extends``: the script read that
    file's rows and writes them back with its own (a resumed run).
    """
    asked = Path(path).resolve()
    if asked not in _TARGETS:
        _TARGETS[asked] = asked if extends or not asked.exists() else unused_path(asked)
        if _TARGETS[asked] != asked:
            print(f"{path} exists and is kept: these results go to {_TARGETS[asked]}")
    path = _TARGETS[asked]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    partial.replace(path)                      # atomic: a kill never leaves half a file
    print(f"wrote {path}")
    return path


def prunekit(*args: str, threads: int | None = None) -> dict:
    """Run one `prunekit ... --json` command in its own process (its seconds and peak RSS are its own),
    on ``threads`` threads (``one_thread_env``) if given, else with this process's environment."""
    env = one_thread_env(threads) if threads else None
    done = subprocess.run([sys.executable, "-m", "prunekit.cli", *args, "--json"], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"prunekit {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)
