"""The memory plan against the measured peak when a run judges candidates (the layer search):
MobileNetV1 at 224x224 with RANDOM weights and inputs (cost only, no accuracy), FALCON to 50% of
the MACs, n gradient rows, `--layer-search 2`, training batches of 64 (the judge holds 12 of
them and forwards one at a time). Each row runs in its own process, one thread.

    python benchmarks/bench_judge_memory.py                 # rows n = 8 and 32
    python benchmarks/bench_judge_memory.py --n 8 --out benchmarks/results/judge_memory.json

With small n the gradient phase is small and the search phase (solver + judge) sets the peak,
which the plan did not count before session 13 (it planned 1,686 MB against 2,723 MB measured at
n = 8, commit aba969b).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb, print_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def worker(n: int, images: int, batch: int, trials: int) -> dict:
    import torch
    torch.set_num_threads(1)
    import prunekit
    from prunekit import zoo
    torch.manual_seed(0)
    model = zoo.build("mobilenetv1").eval()
    x, y = torch.randn(images, 3, 224, 224), torch.randint(0, 1000, (images,))
    start = time.perf_counter()
    result = prunekit.prune(model, (x, y), method="falcon", flops=0.5, fisher_samples=n, batch_size=batch,
                            layer_search=trials, recalibrate_bn=False, refit_batches=0)
    peak = peak_rss_mb()
    estimate = result.record.get("memory_estimate_mb")
    return {"n": n, "batch": batch, "images": images, "trials": trials, "estimate_mb": estimate,
            "peak_rss_mb": round(peak, 1), "estimate_over_peak": estimate / peak,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32], help="gradient rows, one process each")
    parser.add_argument("--images", type=int, default=800, help="random training images held in memory")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--trials", type=int, default=2, help="layer-search trials")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "judge_memory.json"))
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.images, args.batch, args.trials)))
        return
    rows = []
    for n in args.n:
        done = subprocess.run([sys.executable, __file__, "--worker", str(n), "--images", str(args.images),
                               "--batch", str(args.batch), "--trials", str(args.trials)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_table(rows[-1:], [("n", "n", "d"), ("estimate_mb", "estimate MB", ".0f"),
                                ("peak_rss_mb", "peak MB", ".0f"), ("estimate_over_peak", "est/peak", ".3f"),
                                ("seconds", "seconds", ".0f")])
        write_json(args.out, {"model": "mobilenetv1 (random weights and inputs, 224x224)", "method": "falcon",
                              "flops": 0.5, "rows": rows})


if __name__ == "__main__":
    main()
