"""FALCON's ILP projections cold and started from the previous order (session 26).

    python benchmarks/bench_ilp_warm.py save DIR [--model resnet50]   # run bench_scale's row, keep the iterates
    python benchmarks/bench_ilp_warm.py replay DIR [--repeats 5] [--p 1e7] [--out FILE.json]

``save`` runs `bench_scale.py`'s one-shot FALCON row (n = 8, float32, 30% of the MACs, 2 threads,
random weights) with every ILP projection timed, and writes each projection's scores (p float64)
and the cost groups to DIR (about 200 MB per projection for ResNet-50). ``replay`` solves each saved
projection with ``solve_flops_ilp`` cold and with a ``PreviousOrder`` carried along, checks that the
keep masks, primal and bound are identical, and prints the median seconds of each (``--p``: only the
first p weights, 30% of their MACs). ``save`` refuses an existing DIR (it is written as
DIR.partial and renamed when complete); ``replay --out`` never overwrites a file (``common.write_json``:
an existing FILE is kept and the results go to FILE-2.json, said on stdout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from common import load_average, quiet_note, refuse, write_json

THREADS = 2          # replay's solver threads (the session-26 figures are two-thread ones)


def save(folder: Path, model: str) -> None:
    """Run bench_scale's FALCON row on ``model`` and keep every ILP projection's scores in ``folder``
    (a new folder: written as ``folder.partial``, renamed when complete)."""
    import shutil

    import bench_scale

    import prunekit.solvers.falcon as falcon_module

    if folder.exists():
        refuse(f"{folder} exists: pass a new folder to save into (replay reads an existing one)")
    out = folder.with_name(folder.name + ".partial")
    if out.exists():                                   # this script's own leftover from a killed save
        shutil.rmtree(out)
    out.mkdir(parents=True)
    real, calls = falcon_module.solve_flops_ilp, []

    def timed(value, **kwargs):
        result = real(value, **kwargs)
        np.save(out / f"score{len(calls)}.npy", value.detach().cpu().numpy())
        if not calls:
            groups = kwargs["cost_groups"]
            np.savez(out / "groups.npz", bounds=groups.bounds, costs=groups.group_costs,
                     k=kwargs["max_count"], F=kwargs["max_cost"])
        calls.append(result.seconds)
        return result

    falcon_module.solve_flops_ilp = timed
    row = bench_scale.run_row(model, 8, "float32", 0.3, 2)
    print(f"p {row['p']}, solver {row['solver_seconds']:.1f} s, {len(calls)} ILP projections "
          f"{sum(calls):.1f} s: {[round(c, 2) for c in calls]}")
    out.rename(folder)
    print(f"wrote {folder}")


def replay(folder: Path, repeats: int, p: int | None, out: Path | None = None) -> None:
    from prunekit.solvers.ilp import solve_flops_ilp
    from prunekit.solvers.cost_groups import CostGroups
    from prunekit.solvers.grouped_order import PreviousOrder

    if not (folder / "groups.npz").is_file():
        refuse(f"{folder} holds no groups.npz: pass a folder written by `bench_ilp_warm.py save DIR`")
    started = load_average()
    torch.set_num_threads(THREADS)
    saved = np.load(folder / "groups.npz")
    bounds, costs = saved["bounds"], saved["costs"]
    budget = {"max_count": int(saved["k"]), "max_cost": float(saved["F"])}
    if p is not None:                                  # the first p weights, 30% of their MACs
        bounds = np.minimum(bounds, p)
        kept = bounds[1:] > bounds[:-1]
        bounds, costs = np.r_[0, bounds[1:][kept]], costs[kept]
    groups = CostGroups.from_layers([slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])],
                                    costs, int(bounds[-1]))
    if p is not None:
        budget = {"max_count": groups.p, "max_cost": 0.3 * groups.total_cost}
    files = sorted(folder.glob("score*.npy"), key=lambda f: int(f.stem[5:]))
    scores = [torch.from_numpy(np.load(f)[:groups.p].copy()) for f in files]
    cold, warm = np.zeros((repeats, len(scores))), np.zeros((repeats, len(scores)))
    for r in range(repeats):
        previous = PreviousOrder()
        for i, s in enumerate(scores):
            a = solve_flops_ilp(s, cost_groups=groups, **budget)
            b = solve_flops_ilp(s, cost_groups=groups, previous_order=previous, **budget)
            assert torch.equal(a.keep, b.keep) and a.primal == b.primal and a.dual_bound == b.dual_bound
            cold[r, i], warm[r, i] = a.seconds, b.seconds
    print(f"p {groups.p}, {costs.size} cost groups, sizes {groups.sizes.tolist()}")
    for i in range(len(scores)):
        c, w = np.median(cold[:, i]), np.median(warm[:, i])
        print(f"projection {i}: cold {c:.2f} s  warm {w:.2f} s  x{c / w:.2f}")
    c, w = np.median(cold.sum(1)), np.median(warm.sum(1))
    print(f"all {len(scores)}: cold {c:.2f} s  warm {w:.2f} s  x{c / w:.2f}")
    print(quiet_note(started, THREADS))
    if out is not None:
        write_json(out, {"benchmark": "ilp_warm", "p": groups.p, "cost_groups": int(costs.size), "threads": THREADS,
                         "load_average": started, "repeats": repeats,
                         "cold_seconds": cold.tolist(), "warm_seconds": warm.tolist(),
                         "median_total_cold": c, "median_total_warm": w})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("save", "replay"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--p", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None, help="replay: write the seconds as JSON here")
    args = parser.parse_args()
    if args.repeats < 1:
        refuse(f"--repeats {args.repeats}: pass 1 or more")
    if args.action == "replay" and not args.folder.is_dir():
        refuse(f"{args.folder}: no such folder; pass one written by `bench_ilp_warm.py save DIR`")
    if args.action == "save":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        save(args.folder, args.model)
    else:
        replay(args.folder, args.repeats, None if args.p is None else int(args.p), args.out)


if __name__ == "__main__":
    main()
