"""Benchmark the FALCON selection ILP: the fast Lagrangian solver against HiGHS.

Instances look like a conv net: four stages at spatial sizes 1024, 256, 64, 16 (the MACs
per weight), widths doubling per stage, a final FC layer (1 MAC per weight), scores =
squared He-initialised weights. Two budget regimes: keep 30% of the weights and 20% of
the MACs, and keep 10% of the weights and 5% of the MACs.

    python benchmarks/bench_ilp.py [OUT.json] [--sizes 1e4 1e5 3e5 1e6 1e7] [--highs-max-p 1e6]

HiGHS runs after exact reduced-cost fixing (``solve_flops_ilp_exact``'s default); for
small p it also runs on every weight ("full"), independent of the fast solver.

Prints a table and writes the rows as JSON (default benchmarks/results/ilp.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import load_average, peak_rss_mb, print_table, quiet_note, write_json

from prunekit.solvers.ilp import solve_flops_ilp
from prunekit.solvers.ilp_exact import solve_flops_ilp_exact

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ilp.json"
SPATIAL = np.array([1024.0, 256.0, 64.0, 16.0])
BUDGETS = [(0.3, 0.2), (0.1, 0.05)]  # (share of weights, share of MACs) kept


def convnet_instance(p: int, n_layers: int, k_frac: float, f_frac: float, seed: int = 0) -> dict:
    """Keyword arguments for the solvers: scores (p,), layer_slices, layer_costs, budgets."""
    rng = np.random.default_rng(seed)
    stage = np.minimum(np.arange(n_layers - 1) * 4 // (n_layers - 1), 3)
    layer_costs = np.r_[SPATIAL[stage], 1.0]
    share = np.r_[4.0**stage, 4.0]
    sizes = np.maximum(1, np.floor(share / share.sum() * p)).astype(np.int64)
    sizes[-2] += p - sizes.sum()
    bounds = np.r_[0, np.cumsum(sizes)]
    scores = rng.standard_normal(p)
    scores *= np.repeat(np.sqrt(2.0 / sizes), sizes)
    scores **= 2
    return {
        "scores": torch.from_numpy(scores),
        "layer_slices": [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])],
        "layer_costs": layer_costs.tolist(),
        "max_count": int(k_frac * p),
        "max_cost": float(np.floor(f_frac * float(sizes @ layer_costs))),
    }


def layers_for(p: int) -> int:
    return 20 if p <= 10_000 else 30 if p <= 100_000 else 50


def peak_rss_gb() -> float:
    return peak_rss_mb() / 1024


def bench_one(p: int, budget: tuple[float, float], highs_max_p: int, full_highs_max_p: int,
              time_limit: float) -> dict:
    problem = convnet_instance(p, layers_for(p), *budget)
    repeats = 3 if p <= 1_000_000 else 1
    fast = min((solve_flops_ilp(**problem) for _ in range(repeats)), key=lambda r: r.seconds)
    row = {
        "p": p,
        "layers": len(problem["layer_slices"]),
        "budget": f"{budget[0]:.2f}, {budget[1]:.2f}",
        "max_count": problem["max_count"],
        "max_cost": problem["max_cost"],
        "fast_seconds": fast.seconds,
        "fast_setup_seconds": fast.info["setup_seconds"],
        "fast_primal": fast.primal,
        "fast_dual_bound": fast.dual_bound,
        "fast_gap": fast.gap,
        "fast_dual_evaluations": fast.info["dual_evaluations"],
        "peak_rss_gb": peak_rss_gb(),
    }
    if p <= highs_max_p:
        exact = solve_flops_ilp_exact(**problem, time_limit=time_limit)
        row.update(
            highs_seconds=exact.seconds,
            highs_objective=exact.primal,
            highs_optimal=exact.info["status"] == 0,
            highs_free_weights=exact.info["free_weights"],
            fast_below_highs=(exact.primal - fast.primal) / exact.primal,
        )
    if p <= full_highs_max_p:
        full = solve_flops_ilp_exact(**problem, time_limit=time_limit, reduce=False)
        row.update(highs_full_seconds=full.seconds, highs_full_objective=full.primal,
                   highs_full_optimal=full.info["status"] == 0)
    return row


COLUMNS = [
    ("p", "p", ","), ("layers", "layers", "d"), ("budget", "k/p, F/MACs", ""),
    ("fast_seconds", "fast s", ".3f"), ("fast_setup_seconds", "(sort s)", ".3f"), ("fast_gap", "fast gap", ".2e"),
    ("fast_dual_evaluations", "dual evals", "d"), ("highs_seconds", "HiGHS s", ".2f"),
    ("highs_optimal", "HiGHS opt", ""), ("highs_free_weights", "free wts", "d"),
    ("fast_below_highs", "fast<HiGHS", ".2e"), ("highs_full_seconds", "full HiGHS s", ".2f"),
    ("peak_rss_gb", "peak RSS GB", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 3e5, 1e6, 1e7])
    parser.add_argument("--highs-max-p", type=float, default=1e6, help="largest p given to HiGHS (reduced)")
    parser.add_argument("--full-highs-max-p", type=float, default=1e4, help="largest p given to HiGHS whole")
    parser.add_argument("--time-limit", type=float, default=300.0, help="HiGHS time limit per solve (s)")
    args = parser.parse_args()

    started, threads = load_average(), torch.get_num_threads()     # in this process: OMP_NUM_THREADS as started
    rows = []
    for p in (int(x) for x in args.sizes):
        for budget in BUDGETS:
            start, load = time.perf_counter(), load_average()
            rows.append(bench_one(p, budget, int(args.highs_max_p), int(args.full_highs_max_p), args.time_limit))
            rows[-1].update(threads=threads, load_average=load)
            print(f"  p={p:,} budget={budget} done in {time.perf_counter() - start:.1f}s", flush=True)
    print(quiet_note(started, threads))
    print_table(rows, COLUMNS)
    write_json(args.out, {"numpy": np.__version__, "rows": rows})


if __name__ == "__main__":
    main()
