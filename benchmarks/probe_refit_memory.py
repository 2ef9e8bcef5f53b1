"""Run the prunekit CLI with the re-fit's memory logged per phase (VmRSS now, VmHWM since the last mark).

The marks reset VmHWM (clear_refs 5), so the record's peak_rss_mb is only the last phase's: take the
largest hwm printed. Session 48:
    PYTHONPATH=src python benchmarks/probe_refit_memory.py prune --model mobilenetv1 --data imagefolder \
        --data-dir DIR --resize 256 --crop 224 --method falcon --flops 0.3 --fisher-samples 32 --train-samples 128 --json
"""
import sys
def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
LOG = []
def mark(label, **extra):
    r = rss(); LOG.append((label, r["VmRSS"], r["VmHWM"], extra)); reset()
    print(f"[mem] {label:40s} rss {r['VmRSS']:6d} hwm-since-last {r['VmHWM']:6d} {extra if extra else ''}", file=sys.stderr, flush=True)
import prunekit.memory_plan as mp, prunekit.pipelines.weights as w, prunekit.lockstep as ls, prunekit.refit as rf
orig_plan = mp.plan
def plan(*a, **k):
    r = orig_plan(*a, **k)
    mark("plan", resident=r.resident >> 20, refit=r.refit >> 20, total=r.total >> 20, gradients=r.gradients >> 20,
         solver=r.solver >> 20, act=r.activations >> 20, lg=r.layer_gradients >> 20,
         phases={k: v >> 20 for k, v in r.phases().items()})
    return r
mp.plan = plan
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("prunekit") and getattr(mod, "plan", None) is orig_plan:
        mod.plan = plan
orig_refit_parts = mp.refit_parts
def refit_parts(sizes, model, example_input, samples, batch, ranks=1, ranks_here=1):
    r = orig_refit_parts(sizes, model, example_input, samples, batch, ranks, ranks_here)
    first = example_input[:1]
    print(f"[plan] refit samples {samples} batch {batch} per_sample_lockstep {rf.lockstep_bytes(model, first)/2**20:.2f} MB "
          f"input/sample {sizes.input_per_sample/2**20:.2f} largest_out {sizes.largest_output_per_sample/2**20:.2f} p {sizes.p} "
          f"refit fitting / judge {r[0]>>20} / {r[1]>>20} MB", file=sys.stderr, flush=True)
    return r
mp.refit_parts = refit_parts
orig_refit_pruned = w.refit_pruned
def refit_pruned(*a, **k):
    mark("refit_pruned start")
    r = orig_refit_pruned(*a, **k)
    mark("refit_pruned end (after judge, trim)")
    return r
w.refit_pruned = refit_pruned
orig_refit = w.refit
def refit(model, dense, names, inputs, **k):
    mark("refit() start", batches=len(inputs), inbytes=sum(x.numel()*x.element_size() for x in inputs) >> 20)
    r = orig_refit(model, dense, names, inputs, **k)
    mark("refit() end")
    return r
w.refit = refit
orig_judge = w._judge_refit
def judge(*a, **k):
    mark("judge start")
    r = orig_judge(*a, **k)
    mark("judge end")
    return r
w._judge_refit = judge
orig_run = ls.Lockstep.run
def run(self, model, dense, inputs, dense_inputs, layers=frozenset(), at_layer=None):
    if model is None:
        return orig_run(self, model, dense, inputs, dense_inputs, layers, at_layer)
    mark("lockstep.run start")
    def cb(name, xs, ys):
        mark(f"before layer {name}", x=sum(t.numel() for t in xs)*4 >> 20, y=sum(t.numel() for t in ys)*4 >> 20)
        at_layer(name, xs, ys)
        mark(f"after fit {name}")
    return orig_run(self, model, dense, inputs, dense_inputs, layers, cb)
ls.Lockstep.run = run
orig_lock = rf._lockstep
def _lockstep(*a, **k):
    mark("before _lockstep check")
    r = orig_lock(*a, **k)
    mark("after _lockstep check")
    return r
rf._lockstep = _lockstep
from prunekit.cli import main
sys.argv = ["prunekit"] + sys.argv[1:]
main()
