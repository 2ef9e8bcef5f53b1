"""Writing a .safetensors file holds its bytes once: tensor_file_bytes built the header-sorted
file by slicing safetensors' output and concatenating (the file three times over while the output
lived), and every model file, export and run checkpoint was written from those bytes; export_all
built the whole dense file for its size alone. Python's own allocations (tracemalloc: the bytes
objects, not torch's tensors) show the peak."""

import json
import struct
import tracemalloc

import pytest
import torch
from torch import nn
from safetensors.torch import save

from prunekit.saving import save_model, tensor_file_bytes


def _bytes_before(tensors, metadata=None) -> bytes:
    """tensor_file_bytes as it was before the fix: the bytes the files must still hold."""
    raw = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size].decode("utf-8"))
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + size:]


def _mixed() -> dict[str, torch.Tensor]:
    """Several dtypes and sizes (safetensors orders the data by dtype, then name), an empty tensor
    and a name outside ASCII."""
    torch.manual_seed(0)
    return {"z": torch.randn(3, dtype=torch.float16), "a.weight": torch.randn(250, 4), "m": torch.arange(2),
            "b": torch.ones(1, dtype=torch.bool), "c": torch.randn(7, dtype=torch.bfloat16), "e": torch.ones(0),
            "ü/ß": torch.randn(12345, dtype=torch.float64), "i8": torch.arange(9, dtype=torch.int8).reshape(3, 3)}


@pytest.mark.parametrize("metadata", [None, {}, {"b": "2", "a": "ü \"quoted\"", "c": "x" * 13}])
@pytest.mark.parametrize("which", ["mixed", "none", "one"])
def test_the_file_written_and_its_size_match_the_bytes_as_before(tmp_path, metadata, which):
    if which == "none" and metadata == {}:
        pytest.skip("safetensors 0.8 writes no tensors with metadata={} as a header that is no JSON")
    from prunekit.saving import tensor_file_size, write_tensor_file
    tensors = {"mixed": _mixed(), "none": {}, "one": {"w": torch.randn(5, 3)}}[which]
    before = _bytes_before(tensors, metadata)
    assert tensor_file_bytes(tensors, metadata) == before
    write_tensor_file(tmp_path / "t.safetensors", tensors, metadata)
    assert (tmp_path / "t.safetensors").read_bytes() == before
    assert tensor_file_size(tensors, metadata) == len(before)


def _traced_peak(call) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_save_model_holds_the_file_once(tmp_path):
    """A 32 MiB model: its file was held three times (96 MiB traced), now once (and the header)."""
    model = nn.Linear(2048, 4096, bias=False)
    path = tmp_path / "m.safetensors"
    peak = _traced_peak(lambda: save_model(model, path, {"model": "linear"}))
    size = path.stat().st_size
    assert size > 32 * 2**20
    assert peak < 1.5 * size, (peak / size)


def test_export_all_sizes_the_dense_file_without_building_it(tmp_path):
    """Only the sparse export asked, of a model 90% zeros: export_all built the whole dense file
    (held three times) just for the note's 'N% of the dense file's size'."""
    from prunekit.export import export_all
    model = nn.Linear(2048, 4096, bias=False)
    with torch.no_grad():
        model.weight[:, : 2048 * 9 // 10] = 0
    dense = 2048 * 4096 * 4
    written = []
    peak = _traced_peak(lambda: written.extend(export_all(model, torch.randn(1, 2048), tmp_path / "x", ["sparse"])))
    assert peak < 0.5 * dense, (peak / dense)
    sparse = (tmp_path / "x" / "model-sparse.safetensors").stat().st_size
    dense_file = len(_bytes_before({k: v.contiguous() for k, v in model.state_dict().items()}))
    assert written[0]["note"] == f"{sparse / dense_file:.1%} of the dense file's size"
