"""One-shot pruning against FLOP-aware magnitude with the same BatchNorm recalibration (issue 12).

    python benchmarks/bench_oneshot.py                                    # every model, row, budget
    python benchmarks/bench_oneshot.py --model resnet20-b --budgets 0.3 --rows magnitude-flops falcon-bn
    python benchmarks/bench_oneshot.py --model resnet20-b --budgets 0.3 \\
        --custom '{"name": "bn-n1000", "method": "falcon", "fisher-samples": 1000, "fisher-batch": 16, "fisher-bn": "batch"}'
    python benchmarks/bench_oneshot.py --show benchmarks/results/oneshot.json   # the table only
    python benchmarks/bench_oneshot.py --model fmnist-resnet20      # benchmarks/checkpoints/fmnist-resnet20
    python benchmarks/bench_oneshot.py --model resnet20-b --rows magnitude-flops falcon-bn-search magnitude-flops-search
    python benchmarks/bench_oneshot.py --model resnet20-b --rows magnitude-flops falcon falcon++ --seeds 0 1 2

Every row is one `prunekit prune --json` process (OMP_NUM_THREADS=1, so its seconds and peak RSS
are its own), as a user runs it: BatchNorm recalibrated after pruning on 20 training batches
(CIFAR-10: augmented, as the model was trained), the same for every method. A second process
then measures the pruned model (``model.safetensors`` of the run folder):

* test accuracy and mean cross-entropy: ResNet-20-B on the 1,017 exact CIFAR-10 test images
  (±0.8 to ±1.4 points, one standard error), MLPNet on the 10,000 MNIST test images,
  Fashion-MNIST ResNet-20 on its 10,000 test images;
* ResNet-20-B also on all 10,000 official CIFAR-10 test images as lossy JPEG (``cifar10/test-jpeg.tar``,
  about 10 points below the exact images, not the same for every model: accuracy on compressed
  images, about ±0.4 points each), when the tar is there (``test_jpeg_*``; unpacked once under /tmp);
* accuracy and mean cross-entropy on training images, not augmented (ResNet-20-B: the 5,085
  CIFAR-10 images; MLPNet: the first 10,000 MNIST training images; Fashion-MNIST: the first
  10,000): a tighter signal than 1,017 test images, though the gradients came from them;
* seconds (the record's: pruning and recalibration, not the evaluation of each stage on the test
  images, whose total is ``stage_eval_seconds``), CPU seconds of the whole prune process
  (with one thread close to a quiet machine's wall time, so less sensitive to other jobs;
  includes loading and the dense evaluation), peak RSS and the memory plan's estimate.

Budgets are shares of the dense MACs kept (``--flops``); MLPNet's MACs are its weights, so its
budget 0.02 is sparsity 0.98 (both given). Rows are written to ``--out`` as they finish. An
existing ``--out`` is refused (a rerun never passes off stored rows as fresh ones, nor overwrites
them) unless ``--resume``: then its rows are kept, only the missing ones run, and the run says how
many of each; a killed run resumes that way.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (DEFAULT_DATA, FMNIST_CHECKPOINT, FMNIST_MLPNET_CHECKPOINT, jpeg_copies_of, load_average,
                    one_thread_env, print_table, refuse, unpacked_jpeg_test, write_json)

SETUPS = {
    "resnet20-b": {"model": "resnet20-b", "checkpoint": "{data}/checkpoints/resnet20_cifar10.pth.tar",
                   "data": "cifar10", "dir": "{data}/cifar10", "budgets": [0.6, 0.4, 0.3, 0.2], "train_eval": None,
                   "sparsity_too": False, "jpeg_test": True},
    # option-A (zero-pad shortcut) ResNets on the same CIFAR-10 images: networks the one-shot
    # defaults were not chosen on (session 28)
    "resnet20-a": {"model": "resnet20", "checkpoint": "{data}/checkpoints/resnet20-12fca82f.th",
                   "data": "cifar10", "dir": "{data}/cifar10", "budgets": [0.6, 0.4, 0.3, 0.2], "train_eval": None,
                   "sparsity_too": False, "jpeg_test": True},
    "resnet56": {"model": "resnet56", "checkpoint": "{data}/checkpoints/resnet56-4bfd9763.th",
                 "data": "cifar10", "dir": "{data}/cifar10", "budgets": [0.6, 0.4, 0.3, 0.2], "train_eval": None,
                 "sparsity_too": False, "jpeg_test": True},
    "mlpnet": {"model": "mlpnet", "checkpoint": "{data}/checkpoints/mnist_25_epoch_93.97.ckpt", "data": "mnist",
               "dir": "{data}/mnist", "budgets": [0.1, 0.05, 0.02], "train_eval": 10000, "sparsity_too": True},
    "fmnist-resnet20": {"model": "resnet20", "checkpoint": str(FMNIST_CHECKPOINT),
                        "data": "fashion-mnist", "dir": "{data}/fashion-mnist", "budgets": [0.4, 0.3, 0.2, 0.1],
                        "train_eval": 10000, "sparsity_too": False},
    # a second network without BatchNorm, cheap enough for the layer search (session 40): a check
    # on what the MNIST MLPNet's rows chose, with 10,000 test images
    "fmnist-mlpnet": {"model": "mlpnet", "checkpoint": str(FMNIST_MLPNET_CHECKPOINT), "data": "fashion-mnist",
                      "dir": "{data}/fashion-mnist", "budgets": [0.1, 0.05, 0.02], "train_eval": 10000,
                      "sparsity_too": True},
}

# name -> `prunekit prune` options. "falcon" / "falcon++" are the methods' defaults (per-sample rows,
# BatchNorm frozen at the dense statistics; since session 28 draws of the model's Fisher); the "-bn" rows see BatchNorm's re-normalisation: rows of
# 16-image mini-batch gradients with BatchNorm on each mini-batch's statistics.
# Since session 39 the falcon / falcon++ rows run the layer search on MLPNet (layer_search "auto":
# 100 trials where they are cheap; off on the CIFAR ResNets): add "layer-search": 0 for the rows of before.
# Since session 40 the falcon++ row runs 15 stages of 1,000 rows on fresh images there (stages
# "auto"); "stages": 5 gives session 39's row.
ROWS = {
    "magnitude-flops": {"method": "magnitude-flops"},
    "falcon": {"method": "falcon"},
    "falcon++": {"method": "falcon++"},
    # the defaults before session 28: per-sample rows of the empirical Fisher (gradients at the labels)
    "falcon-empirical": {"method": "falcon", "fisher-kind": "empirical"},
    "falcon++-empirical": {"method": "falcon++", "fisher-kind": "empirical"},
    "falcon-bn": {"method": "falcon", "fisher-samples": 500, "fisher-batch": 16, "fisher-bn": "batch"},
    "falcon++-bn": {"method": "falcon++", "fisher-samples": 250, "fisher-batch": 16, "fisher-bn": "batch"},
    # the per-layer allocation search judged by the recalibrated loss (pipelines.allocation)
    "magnitude-flops-search": {"method": "magnitude-flops", "layer-search": 100},
    "falcon-bn-search": {"method": "falcon", "fisher-samples": 500, "fisher-batch": 16, "fisher-bn": "batch",
                         "layer-search": 100},
    "falcon++-bn-search": {"method": "falcon++", "fisher-samples": 250, "fisher-batch": 16, "fisher-bn": "batch",
                           "layer-search": 100, "layer-search-mode": "stage"},   # the mode its results ran with
}


def prune_command(spec: dict, setup: dict, data: str, out: str) -> list[str]:
    budget = spec["budget"]
    args = [sys.executable, "-m", "prunekit.cli", "prune", "--model", setup["model"],
            "--checkpoint", setup["checkpoint"].format(data=data), "--data", setup["data"],
            "--data-dir", setup["dir"].format(data=data), "--flops", str(budget), "--out", out, "--json"]
    if setup["sparsity_too"]:
        args += ["--sparsity", str(round(1 - budget, 6))]
    for key, value in spec.items():
        if key in ("name", "row", "budget", "model"):
            continue
        if value is True:
            args.append(f"--{key}")
        elif value is not False:
            args += [f"--{key}", str(value)]
    return args


def measure(spec: dict) -> dict:
    """(in its own process) test and training accuracy and loss of the pruned model in spec['folder']."""
    import torch
    from torch import nn

    from prunekit.data.loaders import make_loader
    from prunekit.loading import load_data, load_model

    torch.set_num_threads(1)
    setup = SETUPS[spec["model"]]
    loaded = load_model(setup["model"], Path(spec["folder"]) / "model.safetensors")
    model = loaded.model.eval()
    out = {}
    sets = {split: lambda split=split: load_data(setup["data"], setup["dir"].format(data=spec["data_root"]), split,
                                                 limit=setup["train_eval"] if split == "train" else None)
            for split in ("test", "train")}
    if setup.get("jpeg_test") and (Path(spec["data_root"]) / "cifar10" / "test-jpeg.tar").exists():
        sets["test_jpeg"] = lambda: load_data("imagefolder", unpacked_jpeg_test(spec["data_root"]), "test")
    for split, load in sets.items():
        ds = load()
        right, losses = [], []
        with torch.no_grad():
            for x, y in make_loader(ds, loaded.normalization, batch_size=500):
                logits = model(x)
                losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
                right.append(logits.argmax(1) == y)
        right, losses = torch.cat(right), torch.cat(losses)
        out[f"{split}_accuracy"], out[f"{split}_loss"] = 100 * int(right.sum()) / right.numel(), float(losses.double().mean())
        out[f"{split}_images"] = right.numel()
        if split == "test_jpeg":     # its two parts: the exact test images' JPEG copies, and the others
            same = jpeg_copies_of(sets["test"](), ds)
            out["test_jpeg_same_accuracy"] = 100 * int(right[same].sum()) / int(same.sum())
            out["test_jpeg_other_accuracy"] = 100 * int(right[~same].sum()) / int((~same).sum())
    return out


def run_row(spec: dict, setup: dict, data: str) -> dict:
    env = {**one_thread_env(1), "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    load = load_average()
    with tempfile.TemporaryDirectory() as folder:
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(prune_command(spec, setup, data, folder), capture_output=True, text=True, env=env)
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"row {spec} failed:\n{done.stderr[-3000:]}")
        record = json.loads(done.stdout)
        measured = subprocess.run([sys.executable, __file__, "--measure",
                                   json.dumps({**spec, "folder": folder, "data_root": data})],
                                  capture_output=True, text=True, env=env)
        if measured.returncode != 0:
            raise SystemExit(f"measuring {spec} failed:\n{measured.stderr[-3000:]}")
    stages = record.get("stages", [])
    return {"name": spec["name"], "model": spec["model"], "budget": spec["budget"], "spec": spec,
            **json.loads(measured.stdout.strip().splitlines()[-1]),
            "flops_kept": record["flops_kept"], "sparsity": record["sparsity"], "seconds": record["seconds"],
            "stage_eval_seconds": sum(s.get("eval_seconds") or 0.0 for s in stages), "load_average": load,
            # CPU seconds of the whole prune process (one thread: close to a quiet machine's wall time;
            # includes loading the model and data and the dense evaluation)
            "cpu_seconds": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
            "peak_rss_mb": record["peak_rss_mb"], "memory_estimate_mb": record.get("memory_estimate_mb"),
            "dense_accuracy": record.get("dense_accuracy"), "options": record.get("options"),
            # what "auto" chose (falcon++'s stages, the layer search) and the figures it chose by
            **{key: record[key] for key in ("stages_auto", "layer_search_auto") if key in record},
            "stages": [{k: v for k, v in s.items()} for s in stages]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SETUPS, nargs="+", default=["resnet20-b", "mlpnet"])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--checkpoint", help="fmnist-resnet20's checkpoint (default: the shipped benchmarks/checkpoints/fmnist-resnet20, "
                        "made by the recipe in its README)")
    parser.add_argument("--budgets", type=float, nargs="+", help="shares of MACs kept (default: the model's)")
    parser.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS))
    parser.add_argument("--custom", action="append", default=[],
                        help="an extra row as JSON: name, method and `prunekit prune` options (flag names)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[],
                        help="run every row once per seed (`--seed S`, named ROW-sS) and add a table of the "
                             "means, each gain taken against magnitude-flops of the same seed")
    parser.add_argument("--out", default="benchmarks/results/oneshot.json",
                        help="JSON file for the rows; an existing one is refused unless --resume")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and run only the missing ones")
    parser.add_argument("--show", nargs="+", metavar="JSON", help="print the table of these result files, run nothing")
    parser.add_argument("--markdown", action="store_true", help="with --show: also a markdown table per model")
    parser.add_argument("--measure", help=argparse.SUPPRESS)      # internal: measure one pruned model
    args = parser.parse_args()
    if args.checkpoint:
        SETUPS["fmnist-resnet20"]["checkpoint"] = args.checkpoint
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.show:
        rows = [row for path in args.show for row in stored_rows(path, "--show")]
        show(rows)
        if args.markdown:
            markdown(rows)
        return
    if args.markdown:
        refuse("--markdown only goes with --show: pass --show RESULTS.json --markdown")
    if Path(args.out).exists() and not args.resume:
        refuse(f"{args.out} exists: pass --resume to keep its rows and run only the missing ones, "
               f"or --out NEW.json for a fresh run (--show {args.out} prints its table)")
    custom = []
    for text in args.custom:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            refuse(f"--custom {text!r} is not JSON ({error}): pass e.g. '{{\"name\": \"x\", \"method\": \"falcon\"}}'")
        if not isinstance(row, dict) or "name" not in row or "method" not in row:
            refuse(f"--custom {text!r} needs an object with \"name\" and \"method\"")
        custom.append(row)
    rows = stored_rows(args.out, "--out") if args.resume and Path(args.out).exists() else []
    done = {(r["model"], r["name"], r["budget"]) for r in rows}
    specs = with_seeds([{"name": n, **ROWS[n]} for n in args.rows] + custom, args.seeds)
    kept, ran = len(rows), 0
    if args.resume:
        print(f"--resume: {kept} row(s) kept from {args.out}" if kept else f"--resume: {args.out} holds no rows yet",
              flush=True)
    for model in args.model:
        for budget in args.budgets or SETUPS[model]["budgets"]:
            for spec in specs:
                if (model, spec["name"], budget) in done:
                    continue
                start = time.time()
                row = run_row({**spec, "model": model, "budget": budget}, SETUPS[model], args.data)
                row["wall_seconds"] = time.time() - start
                rows.append(row)
                ran += 1
                print(json.dumps({k: v for k, v in row.items() if k not in ("stages", "spec", "options")}),
                      flush=True)
                save(args.out, rows, args.resume)
    if args.resume:
        print(f"{kept} row(s) kept, {ran} run")
    if rows:
        show(rows)


def stored_rows(path: str, option: str) -> list[dict]:
    """The rows of a result file this script wrote; a missing or foreign file: one line, exit 2."""
    try:
        return json.loads(Path(path).read_text())["rows"]
    except FileNotFoundError:
        refuse(f"{option} {path}: no such file; pass a results JSON this script wrote")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, IsADirectoryError):
        refuse(f"{option} {path} is not a results file of this script (JSON with \"rows\"): pass one it wrote")


def with_seeds(specs: list[dict], seeds: list[int]) -> list[dict]:
    """Each row once per seed (named ROW-sS, its row name kept under "row"); no seeds: as given."""
    if not seeds:
        return specs
    return [{**spec, "seed": seed, "name": f"{spec['name']}-s{seed}", "row": spec["name"]}
            for spec in specs for seed in seeds]


def _row_name(r: dict) -> str:
    """The row a result belongs to: its spec's ``row`` (``--seeds``), else its name less a ``-sS``
    suffix naming its own seed (``--custom`` rows named like ``magnitude-flops-s0`` with ``"seed": 0``,
    as session 38 ran them), else its name."""
    spec = r.get("spec", {})
    if "row" in spec:
        return spec["row"]
    suffix = f"-s{spec['seed']}" if "seed" in spec else None
    if suffix and r["name"].endswith(suffix) and len(r["name"]) > len(suffix):
        return r["name"][:-len(suffix)]
    return r["name"]


def _baseline(rows: list[dict]) -> dict:
    """(model, budget, seed) -> the magnitude-flops row it is compared with (seed None: not given)."""
    return {(r["model"], r["budget"], r.get("spec", {}).get("seed")): r
            for r in rows if _row_name(r) == "magnitude-flops"}


def seed_means(rows: list[dict]) -> list[dict]:
    """Per (model, row, budget) run with more than one seed: the seeds and the mean test accuracy,
    gain over magnitude-flops of the same seed (where it ran), training loss and JPEG accuracy."""
    base, groups = _baseline(rows), {}
    for r in rows:
        if "seed" in r.get("spec", {}):
            groups.setdefault((r["model"], _row_name(r), r["budget"]), []).append(r)
    means = []
    for (model, name, budget), mine in groups.items():
        if len(mine) < 2:
            continue
        gains = [r["test_accuracy"] - b["test_accuracy"] for r in mine
                 if (b := base.get((model, budget, r["spec"]["seed"]))) is not None]
        jpeg = [r["test_jpeg_accuracy"] for r in mine if "test_jpeg_accuracy" in r]
        means.append({"model": model, "name": name, "budget": budget, "seeds": len(mine),
                      "test_accuracy": statistics.mean(r["test_accuracy"] for r in mine),
                      "gain": statistics.mean(gains) if len(gains) == len(mine) else None,
                      "train_loss": statistics.mean(r["train_loss"] for r in mine),
                      "test_jpeg_accuracy": statistics.mean(jpeg) if len(jpeg) == len(mine) else None})
    return sorted(means, key=lambda m: (m["model"], -m["budget"]))


def show(rows: list[dict]) -> None:
    base = _baseline(rows)
    for r in rows:
        b = base.get((r["model"], r["budget"], r.get("spec", {}).get("seed")))
        r["gain"] = None if b is None else r["test_accuracy"] - b["test_accuracy"]
        r["train_gain"] = None if b is None else r["train_accuracy"] - b["train_accuracy"]
        r["jpeg_gain"] = (None if b is None or "test_jpeg_accuracy" not in r or "test_jpeg_accuracy" not in b
                          else r["test_jpeg_accuracy"] - b["test_jpeg_accuracy"])
    rows = sorted(rows, key=lambda r: (r["model"], -r["budget"]))
    loads = [r["load_average"] for r in rows if r.get("load_average") is not None]
    print("\none thread per row (OMP_NUM_THREADS=1); " + (
        f"1-minute load as the rows started {min(loads):.2f} to {max(loads):.2f} on the machine's cores (about 1: "
        "this run's previous row; clearly above: other jobs ran beside it)" if loads
        else "the machine was shared with other jobs unless said otherwise"))
    print_table(rows, [("model", "model", ">10"), ("name", "row", ">16"), ("budget", "MACs asked", ".2f"),
                       ("flops_kept", "MACs kept", ".4f"), ("test_accuracy", "test acc %", ".2f"),
                       ("gain", "vs mag", "+.2f"), ("test_loss", "test loss", ".4f"),
                       ("train_accuracy", "train acc %", ".2f"), ("train_gain", "train vs mag", "+.2f"),
                       ("train_loss", "train loss", ".4f"), ("test_jpeg_accuracy", "JPEG 10k %", ".2f"),
                       ("jpeg_gain", "JPEG vs mag", "+.2f"), ("seconds", "seconds", ".0f"),
                       ("cpu_seconds", "CPU s", ".0f"),
                       ("peak_rss_mb", "peak RSS MB", ".0f")])
    means = seed_means(rows)
    if means:
        print("\nmeans over seeds (gain: against magnitude-flops of the same seed)")
        print_table(means, [("model", "model", ">10"), ("name", "row", ">16"), ("budget", "MACs asked", ".2f"),
                            ("seeds", "seeds", "d"), ("test_accuracy", "test acc %", ".2f"), ("gain", "vs mag", "+.2f"),
                            ("train_loss", "train loss", ".4f"), ("test_jpeg_accuracy", "JPEG 10k %", ".2f")])


def markdown(rows: list[dict]) -> None:
    """Per model: a row per method, a column per budget, cells "test / train accuracy / train loss"
    (the gain over FLOP-aware magnitude in the test accuracy in brackets)."""
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        budgets = sorted({r["budget"] for r in mine}, reverse=True)
        names = list(dict.fromkeys(r["name"] for r in mine))
        print(f"\n{model}\n\n| row | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for name in names:
            cells = []
            for b in budgets:
                r = next((r for r in mine if r["name"] == name and r["budget"] == b), None)
                if r is None:
                    cells.append("not run")
                    continue
                gain = "" if r.get("gain") is None or _row_name(r) == "magnitude-flops" else f" ({r['gain']:+.1f})"
                cells.append(f"{r['test_accuracy']:.2f}{gain} / {r['train_accuracy']:.2f} / {r['train_loss']:.3f}")
            print(f"| {name} | " + " | ".join(cells) + " |")


def save(path: str, rows: list[dict], resume: bool) -> None:
    write_json(path, {"benchmark": "oneshot", "threads_per_row": 1,
                      "note": "each row its own `prunekit prune` process with one thread; load_average: the "
                              "machine's 1-minute load when the row started (about 1 is this run's previous "
                              "row; clearly above 1 on 2 cores: other jobs ran beside it and its seconds "
                              "are inflated)",
                      "rows": rows}, extends=resume)       # --resume: rows already there were read and kept


if __name__ == "__main__":
    main()
