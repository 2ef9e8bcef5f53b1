"""Two uninterrupted runs of the same command write the same run folder, bytes for bytes, but for
what is measured (seconds, peak and planned resident memory): the model, every checkpoint (tensors
and metadata) and the records. Session 54: each checkpoint held NumPy's and Python's ``random``
global RNG states, which prunekit neither draws from nor seeds, so no two runs' checkpoints agreed
in bytes; and ``memory_estimate_mb`` counts what the process holds when it plans (a resumed
process holds other memory), so it is a measurement, left out of a comparison as seconds are."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import prunekit
from prunekit.cli import main
from prunekit.pipelines.stages import capture_rng, restore_rng
from prunekit.runs import RunCheckpointer, RunFolder

ASSETS = Path(prunekit.__file__).parent / "assets"
FALCON_PP = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
             "--data-dir", str(ASSETS / "mnist"), "--train-samples", "128", "--batch-size", "2000", "--json",
             "--method", "falcon++", "--flops", "0.98", "--stages", "2", "--include", "fc2", "fc3",
             "--fisher-samples", "16"]
# what a run measures rather than computes: its times, its peak resident memory and its memory
# plan's estimate (which counts the memory the process holds when it plans)
MEASURED = ("peak_rss_mb", "peak_rss_mb_per_rank", "memory_estimate_mb")


def _computed(obj):
    """``obj`` (a record, a history) without what is measured (``MEASURED``, every ``*seconds``)."""
    if isinstance(obj, dict):
        return {k: _computed(v) for k, v in obj.items() if not (k.endswith("seconds") or k in MEASURED)}
    if isinstance(obj, list):
        return [_computed(v) for v in obj]
    return obj


def _checkpoint(path: Path) -> tuple[dict, dict]:
    """A checkpoint's tensors (as bytes) and metadata (its JSON values parsed, measurements left out)."""
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in handle.keys()}
    parsed = {}
    for key, value in meta.items():
        try:
            parsed[key] = _computed(json.loads(value))
        except ValueError:
            parsed[key] = value
    return tensors, parsed


def test_two_runs_write_the_same_folder_but_for_measurements(tmp_path, capsys):
    out = tmp_path / "run"
    folders = []
    for seed in (1, 2):         # the global RNGs as two fresh processes find them: unseeded, so unequal
        np.random.seed(seed)
        random.seed(seed)
        assert main([*FALCON_PP, "--out", str(out)]) == 0
        kept = tmp_path / f"run{seed}"
        shutil.move(out, kept)  # the next run in the same --out: its config.toml names the same folder
        folders.append(kept)
    capsys.readouterr()
    a, b = folders
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    checkpoints = sorted(p.name for p in (a / "checkpoints").glob("stage-*.safetensors"))
    assert checkpoints == sorted(p.name for p in (b / "checkpoints").glob("stage-*.safetensors"))
    assert len(checkpoints) == 2
    for name in checkpoints:
        tensors_a, meta_a = _checkpoint(a / "checkpoints" / name)
        tensors_b, meta_b = _checkpoint(b / "checkpoints" / name)
        assert tensors_a == tensors_b, name
        assert meta_a == meta_b, (name, {k for k in meta_a if meta_a[k] != meta_b.get(k)})
        assert "numpy" not in meta_a["rng"] and "random" not in meta_a["rng"]
    for name in ("result.json", "metrics.json", "model.json"):
        record_a, record_b = (json.loads((f / name).read_text()) for f in (a, b))
        assert _computed(record_a) == _computed(record_b), name
    assert json.loads((a / "result.json").read_text())["memory_estimate_mb"] > 0      # still recorded


def test_a_checkpoint_holding_numpy_and_random_states_still_loads_and_leaves_them(tmp_path):
    """A checkpoint of an older prunekit holds NumPy's and ``random``'s states in its ``rng``
    metadata: it is read as before (the run resumes from it), its torch state restored, and the
    caller's NumPy and ``random`` generators are left as they are."""
    from safetensors.torch import load_file
    from torch import nn

    from prunekit.pipelines.stages import StageState
    from prunekit.saving import write_tensor_file

    model = nn.Linear(3, 2)
    torch.manual_seed(5)
    saver = RunCheckpointer(RunFolder(tmp_path))
    saver.save(StageState(1, model.state_dict(), [{"stage": 1}], capture_rng()), model)
    path = saver.path(1)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    older = {"numpy": {"kind": "MT19937", "keys": [7] * 624, "pos": 624, "has_gauss": 0, "gauss": 0.0},
             "random": {"version": 3, "internal": [3] * 624 + [624], "gauss_next": None}}
    write_tensor_file(path, load_file(path), {**meta, "rng": json.dumps(older)})
    expected = torch.rand(3)
    np.random.seed(11)
    random.seed(11)
    before = np.random.rand(), random.random()
    np.random.seed(11)
    random.seed(11)
    state = RunCheckpointer(RunFolder(tmp_path)).last()
    assert state.stage == 1 and state.rng["numpy"]["keys"][0] == 7
    torch.manual_seed(99)
    restore_rng(state.rng)
    assert torch.equal(torch.rand(3), expected)                    # torch's state comes back
    assert (np.random.rand(), random.random()) == before           # the caller's own left as they were
