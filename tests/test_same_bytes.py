"""The same save writes the same bytes in every process: a model file, its dense and sparse
exports and a run checkpoint hash alike (the README promises bit-identical weights, checked by
sha256). safetensors itself writes its metadata in a per-process random key order."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[1] / "src")

SCRIPT = r"""
import random, sys
from pathlib import Path
import numpy as np, torch
from torch import nn
from prunekit.saving import save_model
from prunekit.export import export_dense, export_sparse
from prunekit.pipelines.stages import StageState, capture_rng
from prunekit.runs import RunCheckpointer, RunFolder
torch.manual_seed(0); np.random.seed(0); random.seed(0)
out = Path(sys.argv[1])
model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
with torch.no_grad():
    model[0].weight[:, :4] = 0          # mostly zeros: stored as indices + values in the sparse export
save_model(model, out / "model.safetensors", {"model": "custom"})
export_dense(model, out / "dense.safetensors")
export_sparse(model, out / "sparse.safetensors")
RunCheckpointer(RunFolder(out / "run")).save(
    StageState(1, model.state_dict(), [{"stage": 1, "sparsity": 0.5}], capture_rng()), model)
"""

FILES = ("model.safetensors", "dense.safetensors", "sparse.safetensors", "run/checkpoints/stage-001.safetensors")


def _hashes(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


def test_the_same_save_in_fresh_processes_writes_the_same_bytes(tmp_path):
    runs = []
    for seed in range(5):      # with two metadata keys a random order repeats 1 time in 2; 4 files, 5 processes
        out = tmp_path / f"p{seed}"
        out.mkdir()
        env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": str(seed * 7 + 1), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True, timeout=120)
        runs.append(_hashes(out))
    assert all(r == runs[0] for r in runs[1:]), runs
    # still ordinary safetensors: the tensors and the metadata read back
    first = tmp_path / "p0"
    assert set(load_file(first / "model.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with safe_open(str(first / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "prunekit-model": "1"}
    with safe_open(str(first / FILES[3]), "pt") as handle:
        assert {"stage", "history", "rng", "world_sizes"} <= set(handle.metadata())


@pytest.mark.parametrize("metadata", [None, {}, {"b": "2", "a": "ü \"quoted\"", "c": "x" * 13}])
def test_tensor_file_bytes_reads_back_with_sorted_metadata(metadata):
    import torch
    from safetensors.torch import load
    from prunekit.saving import tensor_file_bytes

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "i": torch.arange(3, dtype=torch.int8),
               "d": torch.ones(1, dtype=torch.float64)}
    data = tensor_file_bytes(tensors, metadata)
    assert int.from_bytes(data[:8], "little") % 8 == 0
    back = load(data)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    header = data[8:8 + int.from_bytes(data[:8], "little")].decode()
    if metadata:
        assert header.index('"a"') < header.index('"b"') < header.index('"c"')
