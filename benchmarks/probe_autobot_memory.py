"""Where autobot's memory goes on BERT-base (random weights, 128 tokens, flops 0.5, 3 gate batches of 8,
no fine-tune): one line per phase boundary with the process's resident MB then (VmRSS), its peak since
the previous line (VmHWM, reset after each line through /proc/self/clear_refs: Linux only) and, with
--scan, the MB of every live tensor storage (a gc scan: what Python still holds, where RSS also keeps
heap pages freed but not handed back). prunekit's phases are wrapped by monkeypatching; nothing is
changed. Needs transformers.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/probe_autobot_memory.py OUT.json [--scan]

The pruned weights' sha256 is printed last (to compare two source trees). docs/benchmarks.md,
"Session 51: where autobot's memory went on BERT-base"."""
import copy
import functools
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    print("probe_autobot_memory: give the JSON file to write first: probe_autobot_memory.py OUT.json [--scan]")
    sys.exit(2)
if Path(sys.argv[1]).exists():
    print(f"probe_autobot_memory: {sys.argv[1]} exists: give a new file name (nothing is overwritten)")
    sys.exit(2)
import torch  # noqa: E402  (after the argument checks: a refusal should not wait for torch)
import transformers  # noqa: E402

import prunekit  # noqa: E402
import prunekit.executor as E  # noqa: E402
import prunekit.request as R  # noqa: E402
import prunekit.structured.autobot as A  # noqa: E402
import prunekit.structured.pipeline as P  # noqa: E402
import prunekit.structured.shrink as S  # noqa: E402

def status():
    d = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(v.split()[0]) / 1024
    return d

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def live_mb():
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor):
                s = o.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr()); total += s.nbytes()
        except Exception:
            pass
    return total / 2**20

ROWS = []
T0 = time.perf_counter()
SCAN = "--scan" in sys.argv
def event(name):
    s = status()
    row = {"t": round(time.perf_counter() - T0, 1), "event": name, "rss": round(s["VmRSS"]), "peak_since_prev": round(s["VmHWM"])}
    if SCAN:
        row["tensors"] = round(live_mb())
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    reset()

def wrap(mod, name, label=None):
    f = getattr(mod, name)
    @functools.wraps(f)
    def g(*a, **k):
        event(f"> {label or name}")
        out = f(*a, **k)
        event(f"< {label or name}")
        return out
    setattr(mod, name, g)

wrap(R, "channel_context"); wrap(R, "CostModel", "CostModel(request)")
wrap(P, "find_groups"); wrap(P, "checked_groups"); wrap(P, "GatedMacs"); wrap(P, "minimum_rounded_macs")
wrap(S, "shrink", "shrink(in _agrees)"); wrap(A, "shrink", "shrink(final)")
wrap(A, "cut_to_budget")
wrap(P, "prune_channels"); wrap(A, "autobot_masks")
wrap(E, "build_record"); wrap(E, "measure"); wrap(E, "prune_channels", "prune_channels(E)")
import prunekit.budget as B, prunekit.params as PA, prunekit.costs as CO
wrap(B.Budget, "resolve"); wrap(PA.ParamSpace, "macs_per_weight"); wrap(CO.CostModel, "count")
# deepcopy in pipeline (the teacher)
class C: pass
cc = C(); cc.deepcopy = copy.deepcopy; cc.copy = copy.copy
def dc(x, *a):
    event("> deepcopy(pipeline)"); y = copy.deepcopy(x, *a); event("< deepcopy(pipeline)"); return y
cc.deepcopy = dc; P.copy = cc

reset(); event("start")
torch.manual_seed(0)
config = transformers.BertConfig(num_labels=2)
model = transformers.BertForSequenceClassification(config).eval()
event("model built")
gen = torch.Generator().manual_seed(1)
x = torch.randint(30522, (24, 128), generator=gen)
y = torch.randint(2, (24,), generator=torch.Generator().manual_seed(2))
event("> prune")
result = prunekit.prune(model, (x, y), method="autobot", flops=0.5, gate_batches=3, gate_batch_size=8,
                        batch_size=8, finetune_epochs=0)
event("< prune")
h = hashlib.sha256()
for k, v in result.model.state_dict().items():
    h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
print("HASH", h.hexdigest())
json.dump(ROWS, open(sys.argv[1], "w"), indent=0)
