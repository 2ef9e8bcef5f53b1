"""Where the memory plan misses (session 26): one bench_scale row in this process with an RSS
sampler (every 3 ms): the peak and the main thread's stack at it, per phase (gradients / solver),
the RSS entering the solver and the plan's parts. From the repository root, PYTHONPATH=src:

    python benchmarks/plan_probe.py MODEL N METHOD [grad-only]   # grad-only: stop after the gradients

Prints one line, PROBE {json}."""
import argparse, json, os, sys, threading, time, traceback

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="a bench_scale model name")
parser.add_argument("n", type=int, help="gradient rows")
parser.add_argument("method", help="the pruning method of the row")
parser.add_argument("grad_only", nargs="?", choices=["grad-only"], help="stop after the gradients")
args = parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale
from prunekit import memory_plan, process_memory

PAGE = os.sysconf("SC_PAGE_SIZE")
main_id = threading.get_ident()
state = {"phase": "gradients", "peak": {}, "stack": {}, "enter_solver": None, "plan": None}
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
def sampler():
    while True:
        r = rss(); ph = state["phase"]
        if r > state["peak"].get(ph, 0) + 2:
            state["peak"][ph] = r
            fr = sys._current_frames().get(main_id)
            st = traceback.extract_stack(fr)
            state["stack"][ph] = [f"{os.path.basename(s.filename)}:{s.lineno} {s.name}" for s in st if "prunekit" in s.filename or "torch" not in s.filename][-8:]
        time.sleep(0.003)
threading.Thread(target=sampler, daemon=True).start()
grad_only = args.grad_only == "grad-only"
real_release = process_memory.release_freed_memory
def release():
    real_release()
    state["enter_solver"] = rss()
    state["phase"] = "solver"
    if grad_only:
        raise SystemExit(0)
process_memory.release_freed_memory = release
real_plan = memory_plan.plan
def plan(*a, **k):
    p = real_plan(*a, **k); state["plan"] = p; return p
memory_plan.plan = plan
try:
    row = bench_scale.run_row(args.model, args.n, "float32", 0.3, 2, "cpu", args.method, 0.7)
except SystemExit:
    row = {}
time.sleep(0.05)
p = state["plan"]
out = {"model": args.model, "n": args.n, "method": args.method, "chunk": p.chunk if p else None,
       "peak": state["peak"], "enter_solver_mb": state["enter_solver"], "peak_rss_mb": process_memory.peak_usage() / 2**20,
       "plan": {k: getattr(p, k) / 2**20 for k in ("resident", "gradients", "stage_vectors", "activations", "layer_gradients", "solver")} if p else None,
       "plan_total_mb": p.total_mb if p else None, "p": p.p if p else None, "stack": state["stack"],
       **{k: row.get(k) for k in ("solver_seconds", "gradient_seconds", "memory_estimate_mb", "peak_rss_mb")}}
print("PROBE " + json.dumps(out))
