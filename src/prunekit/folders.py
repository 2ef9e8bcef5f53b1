"""What marks a folder prunekit wrote, and which of its files are prunekit's own.

Every kind of folder a prunekit command writes, by what marks it:

* ``prune --out`` (and each run of a sweep, ``prunekit.prune(out=...)``): ``metrics.json``;
* ``train --out``: a run's ``config.toml`` (``api_checks._is_run_config``) naming no method, and
  no ``metrics.json``;
* ``sweep --out`` / ``compare --out``: the comparison's report state (``.prunekit-report.json``)
  or its ``runs.json`` rows; a sweep's also holds its runs' folders (each a prune folder). A sweep
  writes that state (empty: no report yet) before its first run, so a sweep killed before its
  report is still known as one (``inside_a_comparison``: ``save_model`` writes nothing in it);
* ``export`` (``prunekit export RUN`` writes ``RUN/export``): the manifest ``exported.json``.

``own_file(path)`` says whether ``path`` is one of the files the prunekit folder it lies in writes
(so that nothing else, ``save_model`` say, writes over it); the imports are lazy because the
modules that know each kind's files import ``saving``.
"""

from __future__ import annotations

import re
from pathlib import Path


def kind(folder: str | Path) -> str | None:
    """What prunekit wrote ``folder`` as: "run" (of prune), "training run", "sweep", "comparison",
    "export"; None for a folder that is none of them (or no folder)."""
    from .api_checks import _is_run_config
    from .export import _written_before
    from .report import REPORT_STATE, _is_comparison_rows
    from .runs import METRICS
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / METRICS).is_file():
        return "run"
    if _is_run_config(folder / "config.toml"):       # a training run's, or a run killed before its metrics.json
        return "training run" if not _names_a_method(folder / "config.toml") else "run"
    if (folder / REPORT_STATE).is_file() or _is_comparison_rows(folder / "runs.json"):
        try:          # a sweep's runs: finished, or begun (a sweep marks its folder before its first run)
            runs = any((p / METRICS).is_file() or _is_run_config(p / "config.toml")
                       for p in folder.iterdir() if p.is_dir())
        except OSError:
            runs = False
        return "sweep" if runs else "comparison"
    if _written_before(folder):
        return "export"
    return None


def own_names(folder: str | Path) -> frozenset[str]:
    """The names (in ``folder``) of the files and subfolders the prunekit folder ``folder`` writes
    (``kind``); empty for a folder prunekit did not write."""
    from .export import _written_before, FORMATS, MANIFEST
    from .report import COMPARISON_FILES, EDITED_REPORT, REPORT_STATE
    from .runs import RUN_FILES
    what = kind(folder)
    if what in ("run", "training run"):
        return frozenset(RUN_FILES)
    if what in ("sweep", "comparison"):
        return frozenset({name.split("/")[0] for name in COMPARISON_FILES} | {EDITED_REPORT, REPORT_STATE})
    if what == "export":
        return frozenset({*FORMATS.values(), MANIFEST, *_written_before(Path(folder))})
    return frozenset()


def own_file(path: str | Path) -> str | None:
    """The kind of prunekit folder (``kind``) whose own file ``path`` is (a name of
    ``own_names`` in the folder ``path`` lies in, or a run's stage checkpoint or taper snapshot
    model in its subfolder), or None when it is no prunekit folder's."""
    path = Path(path)
    if path.name in own_names(path.parent):
        return kind(path.parent)
    run = kind(path.parent.parent)      # a run's own subfolder: its stage checkpoints, a taper snapshot's model
    if run in ("run", "training run") and (
            (path.parent.name == "checkpoints" and re.fullmatch(r"stage-\d+\.safetensors", path.name))
            or (path.parent.name.startswith("snapshot-")
                and path.name in ("model.safetensors", "model.json", "result.json"))):
        return run
    return None


def inside_a_comparison(path: str | Path) -> tuple[str, Path] | None:
    """(kind, folder) of the nearest folder above ``path`` (at any depth) that is a prunekit sweep's
    or comparison's (``kind``), or None: such a folder is its command's to write (a killed sweep's
    next runs go into folders not made yet)."""
    for folder in Path(path).absolute().parents:
        if (what := kind(folder)) in ("sweep", "comparison"):
            return what, folder
    return None


def _names_a_method(config: Path) -> bool:
    import tomllib
    try:
        return "method" in tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
