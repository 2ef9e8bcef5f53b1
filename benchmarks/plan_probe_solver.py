"""The solver alone on random X (n x p float32), RSS sampled every 2 ms (session 26):

    python benchmarks/plan_probe_solver.py chita|woodfisher P N [B]      # PYTHONPATH=src

Prints SYNTH {json}: the peak above the RSS once X is made, per weight, and the stack at the peak."""
import argparse, os, sys, threading, time, traceback, json

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("method", choices=["chita", "woodfisher"])
parser.add_argument("p", type=float, help="weights (columns of X; 1e6 is read)")
parser.add_argument("n", type=int, help="gradient rows (rows of X)")
parser.add_argument("block", type=int, nargs="?", default=128, help="woodfisher's block size (default 128)")
args = parser.parse_args()
import torch
torch.set_num_threads(1)
from prunekit.solvers.quadratic import QuadraticModel
from prunekit.solvers.chita import chita
from prunekit.solvers.woodfisher import woodfisher
from prunekit import process_memory
PAGE = os.sysconf("SC_PAGE_SIZE"); main_id = threading.get_ident()
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * PAGE / 2**20
st = {"peak": 0, "stack": None}
def sampler():
    while True:
        r = rss()
        if r > st["peak"] + 1:
            st["peak"] = r
            st["stack"] = [f"{os.path.basename(s.filename)}:{s.lineno} {s.name}" for s in traceback.extract_stack(sys._current_frames()[main_id])][-5:]
        time.sleep(0.002)
method, p, n = args.method, int(args.p), args.n
g = torch.Generator().manual_seed(0)
X = torch.randn(n, p, generator=g); w = torch.randn(p, generator=g)
k = int(0.3 * p)
process_memory.release_freed_memory()
base = rss(); st["peak"] = base
threading.Thread(target=sampler, daemon=True).start()
t = time.time()
if method == "chita":
    q = QuadraticModel(X, w, 1e-4 * float((X * X).sum() / n / p))
    s = chita(q, k)
else:
    s = woodfisher(X, w, k, block_size=args.block)
time.sleep(0.02)
print("SYNTH", json.dumps({"method": method, "p": p, "n": n, "base": base, "peak": st["peak"], "above_mb": st["peak"] - base,
      "B_per_w": (st["peak"] - base) * 2**20 / p, "s": time.time() - t, "stack": st["stack"]}))
