"""The hybrid (channels, then FALCON) against pure AutoBot and pure FALCON at the same MACs, on the
bundled MLPNet and MNIST sample (cheap; a first look, not the ResNet-56 comparison). Each row is
one `prunekit prune --json` process; no fine-tune (accuracy after BN recalibration where there is BN).

    OMP_NUM_THREADS=1 python benchmarks/bench_hybrid_small.py --budgets 0.2 0.1
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
BASE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
        "--data-dir", str(ASSETS / "mnist"), "--json"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.1])
    p.add_argument("--structured-flops", type=float, default=0.5)
    p.add_argument("--fisher-samples", type=int, default=500)
    p.add_argument("--out", default=str(HERE / "results" / "hybrid_mlpnet.json"))
    args = p.parse_args()
    started = load_average()
    rows = []
    for budget in args.budgets:
        for method, extra in (("autobot", []), ("falcon", ["--fisher-samples", str(args.fisher_samples)]),
                              ("hybrid", ["--structured-flops", str(args.structured_flops),
                                          "--fisher-samples", str(args.fisher_samples)])):
            load = load_average()
            command = [sys.executable, "-m", "prunekit.cli", *BASE, "--method", method, "--flops", str(budget), *extra]
            out = subprocess.run(command, capture_output=True, text=True, env=one_thread_env(THREADS))
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(command[2:])} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"method": method, "budget": budget, "flops_kept": r["flops_kept"],
                         "params_kept": r["params_kept"], "sparsity": r.get("sparsity"),
                         "accuracy": r["accuracy"], "dense_accuracy": r["dense_accuracy"],
                         "structured_macs": r.get("structured_macs"), "seconds": r["seconds"],
                         "threads": THREADS, "load_average": load})
            print(rows[-1], flush=True)
    print(quiet_note(started, THREADS))
    print_table(rows, [("method", "method", ">8"), ("budget", "budget", ".2f"), ("flops_kept", "MACs kept", ".4f"),
                       ("params_kept", "params kept", ".4f"), ("accuracy", "accuracy %", ".2f")])
    write_json(args.out, {"settings": vars(args), "machine": machine(), "threads_per_row": THREADS, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
