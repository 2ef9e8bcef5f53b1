"""Mean over seeds of bench_structured rows: one line per (method, budget, distillation weight).

    python benchmarks/table_structured_seeds.py 'benchmarks/results/structured_res_*_seed*.json' \
        'benchmarks/results/structured_kd_*_seed*.json'

Prints test accuracy after BN recalibration and after the fine-tune, per seed and the mean.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import defaultdict
from statistics import mean


def method_name(method: str, settings: dict) -> str:
    """One name per setting: AutoBot rows were named differently while the gate_bn default moved."""
    if not method.startswith("autobot"):
        return method
    name = method.split("+")[0].removesuffix("-inner")
    name += "+bn-batch" if settings.get("gate_bn") == "batch" else ""
    name += "-inner" if settings.get("residual_channels") == "keep" else ""
    return name + ("+depth" if "+depth" in method else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="globs of bench_structured JSON files")
    args = parser.parse_args()
    rows = defaultdict(dict)          # (method, budget, distill) -> {seed: (pruned, fine-tuned)}
    for pattern in args.patterns:
        for path in sorted(glob.glob(pattern)):
            payload = json.load(open(path))
            seed = payload["settings"]["seed"]
            for row in payload["rows"]:
                name = method_name(row["method"], payload["settings"])
                key = (name, row["budget"], row.get("finetune_distill", 0.0))
                rows[key][seed] = (row["accuracy_pruned_bn"], row["accuracy_finetuned"])
    print(f"{'method':<28} {'MACs':>5} {'KD':>4} {'seeds':>6} {'pruned+BN':>10} {'fine-tuned':>11}  per seed (fine-tuned)")
    for (method, budget, distill), by_seed in sorted(rows.items(), key=lambda kv: (-kv[0][1], kv[0][0], kv[0][2])):
        seeds = sorted(by_seed)
        pruned = mean(by_seed[s][0] for s in seeds)
        tuned = mean(by_seed[s][1] for s in seeds)
        each = " ".join(f"{s}:{by_seed[s][1]:.2f}" for s in seeds)
        print(f"{method:<28} {budget:>5g} {distill:>4g} {len(seeds):>6} {pruned:>10.2f} {tuned:>11.2f}  {each}")


if __name__ == "__main__":
    main()
