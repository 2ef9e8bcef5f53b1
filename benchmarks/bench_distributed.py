"""FALCON across R processes (torchrun, gloo, one thread per rank): the gradient matrix sharded by
columns. Per row: accuracy, wall time, peak RSS of every rank, each rank's share of X, bytes each
rank sent (gradient exchange, and per solver collective).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_distributed.py --ranks 1 2
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --ranks 1 2 --n 500 --prune-args="--fisher-batch 16 --fisher-bn batch"
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_distributed.py --rows resnet56 --ranks 1 2 --n 256 --dtype float32
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_distributed.py --rows resnet50 --ranks 1 2 --n 16 --max-memory 8G

resnet20-b: the reference checkpoint on the real CIFAR-10 subset (../shared/data), one-shot FALCON
to 30% of the MACs (`torchrun --nproc_per_node R -m prunekit prune ... --json`, one process group
per row). resnet56 (32x32), resnet50 and mobilenetv1 (224x224): RANDOM weights and inputs, BN not
recalibrated (cost only: seconds, memory, bytes). ResNet-50 needs about 4 GB per rank even at
n = 16 (the replicated p-vectors of the solver: the memory plan's estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, load_average, peak_rss_mb, print_table, quiet_note, write_json

THREADS = 1          # per rank: every rank runs with OMP_NUM_THREADS=1 (run_ranks) and one torch thread

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(ranks: int, args: list[str], timeout: float) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master-port", str(_port()), *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        log = Path(tempfile.mkstemp(prefix="bench-dist-", suffix=".stderr")[1])
        log.write_text(done.stderr)
        raise SystemExit(f"{' '.join(command)} failed (whole stderr in {log}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def resnet20b_row(ranks: int, n: int, data: Path, max_memory: str, timeout: float, method: str = "falcon",
                  extra: tuple[str, ...] = ()) -> dict:
    budget = [item for key, value in BUDGETS[method].items() for item in (f"--{key}", str(value))]
    out = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        record, wall = _torchrun(ranks, [
            "-m", "prunekit", "prune", "--model", "resnet20-b", "--checkpoint",
            str(data / "checkpoints" / "resnet20_cifar10.pth.tar"), "--data", "cifar10", "--data-dir",
            str(data / "cifar10"), "--method", method, *budget, "--fisher-samples", str(n),
            "--max-memory", max_memory, "--refit-batches", "0",      # the method's own phases only
            "--json", "--out", str(out / "run"), *extra], timeout)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**_row("resnet20-b", ranks, n, record, wall), "method": method, "prune_args": " ".join(extra)}


def random_row(model: str, ranks: int, n: int, dtype: str, max_memory: str, timeout: float,
               method: str = "falcon") -> dict:
    # one argument: torchrun's own parser would take --n for one of its flags
    record, wall = _torchrun(ranks, [str(Path(__file__).resolve()),
                                     f"--worker={model},{n},{dtype},{max_memory},{method}"], timeout)
    return {**_row(model, ranks, n, record, wall), "method": method}


def _row(model: str, ranks: int, n: int, record: dict, wall: float) -> dict:
    stage = record["stages"][0] if "stages" in record else record["history"][0]
    dist = stage.get("distributed", {})
    info = stage.get("solver_info", {})
    # FALCON: DFO step trials (each an ILP + backsolve); CHITA: IHT steps + swap rounds
    iterations = max(1, int(info.get("trials") or (info.get("iterations", 0) + info.get("swap_rounds", 0)) or 1))
    peaks = record.get("peak_rss_mb_per_rank", [record["peak_rss_mb"]])
    return {"model": model, "ranks": ranks, "n": n, "accuracy": record.get("accuracy"),
            "nonzeros": record.get("nonzeros"), "flops_kept": record.get("flops_kept"),
            "wall_seconds": wall, "gradient_seconds": stage.get("gradient_seconds"),
            "solver_seconds": stage.get("solver_seconds"), "peak_rss_mb_max": max(peaks), "peak_rss_mb_per_rank": peaks,
            "memory_estimate_mb": stage.get("memory_estimate_mb"),
            "X_mb_per_rank": dist.get("gradient_matrix_mb"), "exchange_mb": (dist.get("gradient_exchange_bytes") or 0) / 2**20,
            "solver_mb": (dist.get("solver_bytes") or 0) / 2**20, "solver_iterations": iterations,
            "solver_mb_per_iteration": (dist.get("solver_bytes") or 0) / 2**20 / iterations,
            "solver_collectives": dist.get("solver_collectives"), "objective": stage.get("objective"),
            "layer_search_loss": stage.get("layer_search_loss"), "layer_search_seconds": stage.get("layer_search_seconds")}


SIZES = {"resnet50": (224, 1000), "resnet56": (32, 10), "mobilenetv1": (224, 1000)}


# what a random-weights row prunes to: FALCON to 30% of the MACs, CHITA to 70% sparsity
BUDGETS = {"falcon": {"flops": 0.3}, "chita": {"sparsity": 0.7}}


def worker_random(model_name: str, n: int, dtype: str, max_memory: str, method: str) -> None:
    """One rank of a random-weights row (run under torchrun): prune, print rank 0's record as JSON."""
    import torch

    import prunekit
    from prunekit import distributed, zoo

    distributed.init_from_env()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = zoo.build(model_name)
    size, classes = SIZES[model_name]

    def batches():
        gen = torch.Generator().manual_seed(1)
        for _ in range(-(-n // 8)):
            yield torch.randn(8, 3, size, size, generator=gen), torch.randint(0, classes, (8,), generator=gen)

    result = prunekit.prune(model, batches, method=method, **BUDGETS[method], fisher_samples=n, fisher_dtype=dtype,
                            max_memory=max_memory, refit_batches=0,     # the method's own phases only
                            example_input=torch.randn(1, 3, size, size), recalibrate_bn=False)
    record = {"history": result.history, "flops_kept": result.flops_kept, "nonzeros": result.record.get("nonzeros"),
              "peak_rss_mb": peak_rss_mb()}
    collective = distributed.current()
    if collective.distributed:
        peaks = collective.all_gather(torch.tensor([record["peak_rss_mb"]], dtype=torch.float64))
        record["peak_rss_mb_per_rank"] = [round(float(v), 1) for v in peaks]
    if distributed.is_main_process():
        print(json.dumps(record, default=str))
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=("resnet20-b", *SIZES), default=["resnet20-b"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=None, help="gradient rows (default: 256 for resnet20-b, 16 for resnet50)")
    parser.add_argument("--dtype", default="bfloat16", help="gradient storage of the random-weights rows")
    parser.add_argument("--method", choices=tuple(BUDGETS), default="falcon",
                        help="what every row runs (FALCON to 30%% MACs, CHITA to sparsity 0.7)")
    parser.add_argument("--prune-args", default="", help="more `prunekit prune` flags for the resnet20-b rows, "
                        "one string (e.g. \"--fisher-batch 16 --fisher-bn batch\")")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--max-memory", default="2500M", help="per rank (the machine is shared: keep each under 3 GB)")
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    parser.add_argument("--note", default="one thread per rank (OMP_NUM_THREADS=1) on a shared 2-core machine",
                        help="how the machine was (load, other jobs), stored with the rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, n, dtype, max_memory, method = args.worker.split(",")
        worker_random(model, int(n), dtype, max_memory, method)
        return
    started = load_average()
    rows = []
    for name in args.rows:
        for ranks in args.ranks:
            load = load_average()
            if name == "resnet20-b":
                row = resnet20b_row(ranks, args.n or 256, args.data, args.max_memory, args.timeout, args.method,
                                    tuple(shlex.split(args.prune_args)))
            else:
                row = random_row(name, ranks, args.n or 16, args.dtype, args.max_memory, args.timeout, args.method)
            row.update(threads=THREADS, load_average=load)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(quiet_note(started, THREADS).replace("per row", "per rank"))
    print_table(rows, [("model", "model", ""), ("ranks", "ranks", "d"), ("n", "n", "d"), ("accuracy", "acc %", ".2f"),
                       ("nonzeros", "nonzeros", "d"), ("wall_seconds", "wall s", ".1f"),
                       ("peak_rss_mb_max", "max RSS MB", ".0f"), ("X_mb_per_rank", "X MB/rank", ".1f"),
                       ("exchange_mb", "exchange MB", ".1f"), ("solver_mb_per_iteration", "MB/iteration", ".2f")])
    write_json(args.out, {"note": args.note, "threads_per_rank": THREADS, "rows": rows})


if __name__ == "__main__":
    main()
