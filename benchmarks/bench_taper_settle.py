"""Do the taper's gates settle at 0 or 1 before they are cut? With and without temperature annealing.

One process per setting; each prunes a model with ``--method taper`` (no fine-tune, BN
recalibrated) and reports, per snapshot, whether it was cut with the constraint met and the gates
settled (``settled``), the steps held, the temperature, the mean |gate - 0/1 mask| at the cut,
kept gates below 0.5 and closed gates above 0.1, and the accuracy.

    OMP_NUM_THREADS=1 python benchmarks/bench_taper_settle.py                       # bundled MLPNet, MNIST sample
    OMP_NUM_THREADS=1 python benchmarks/bench_taper_settle.py --model resnet20 --checkpoint \
        ../shared/data/checkpoints/resnet20-12fca82f.th --data cifar10 --data-dir ../shared/data/cifar10 --taper-epochs 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import load_average, machine, one_thread_env, print_table, quiet_note, write_json

THREADS = 1          # per row: the documented figures ran with OMP_NUM_THREADS=1

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "src" / "prunekit" / "assets"


def one(args, temperature: float) -> dict:
    cmd = [sys.executable, "-m", "prunekit.cli", "prune", "--model", args.model, "--checkpoint", args.checkpoint,
           "--data", args.data, "--data-dir", args.data_dir, "--method", "taper", "--flops", str(args.flops),
           "--snapshots", *map(str, args.snapshots), "--taper-epochs", str(args.taper_epochs),
           "--final-temperature", str(temperature), "--json"]
    if args.train_samples:
        cmd += ["--train-samples", str(args.train_samples)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=one_thread_env(THREADS))
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlpnet")
    p.add_argument("--checkpoint", default=str(ASSETS / "mlpnet.safetensors"))
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-dir", default=str(ASSETS / "mnist"))
    p.add_argument("--train-samples", type=int)
    p.add_argument("--flops", type=float, default=0.3)
    p.add_argument("--snapshots", type=float, nargs="+", default=[0.5])
    p.add_argument("--taper-epochs", type=float, default=4)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.05])
    p.add_argument("--out", default=str(HERE / "results" / "taper_settle.json"))
    args = p.parse_args()
    started = load_average()
    rows = []
    for t in args.temperatures:
        load = load_average()
        record = one(args, t)
        for r in [record, *record.get("snapshots", [])]:
            cuts = record["snapshot_cuts"]
            key = min(cuts, key=lambda k: abs(float(k) - r["flops_kept"]))
            rows.append({"final_temperature": t, "snapshot": key, "flops_kept": r["flops_kept"],
                         "accuracy": r["accuracy"], "step": record["snapshot_steps"][key], **cuts[key],
                         "taper_steps": record["taper_steps"], "planned_steps": record["planned_steps"],
                         "threads": THREADS, "load_average": load})
    print(quiet_note(started, THREADS))
    print_table(rows, [("final_temperature", "final T", ".2f"), ("snapshot", "budget", ">8"),
                       ("flops_kept", "MACs kept", ".3f"), ("settled", "settled", ">8"),
                       ("held_steps", "held", "d"), ("temperature", "T at cut", ".3f"),
                       ("mean_abs_gate_change", "mean|g-m|", ".3f"), ("kept_gates_below_half", "kept<0.5", "d"),
                       ("closed_gates_above_tenth", "closed>0.1", "d"), ("accuracy", "acc %", ".2f"),
                       ("step", "step", "d"), ("planned_steps", "planned", "d")])
    write_json(args.out, {"settings": vars(args), "machine": machine(), "threads_per_row": THREADS, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
