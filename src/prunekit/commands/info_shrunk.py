"""``prunekit info`` on a shrunk model: its MACs and parameters against the zoo model it came from."""

from __future__ import annotations

from pathlib import Path

from ..costs import CostModel, Counts
from ..loading import load_model
from ..saving import read_meta


def model_file(path) -> Path:
    """A run folder's model.safetensors, or the path itself."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def shrunk_summary(name: str, checkpoint, counts: Counts) -> dict | None:
    """For a shrunk model: its MACs and params against the zoo model it came from; else None."""
    if checkpoint is None or "channel_layout" not in read_meta(model_file(checkpoint)):
        return None
    dense = load_model(name)
    costs = CostModel(dense.model, dense.example_input())
    return {"macs": counts.macs, "dense_macs": costs.macs, "flops_kept": counts.macs / costs.macs,
            "params": counts.params, "dense_params": costs.params, "params_kept": counts.params / costs.params}


def shrunk_line(s: dict) -> str:
    return (f"shrunk (channels removed): {100 * s['flops_kept']:.2f}% of the dense {s['dense_macs']:,} MACs, "
            f"{100 * s['params_kept']:.2f}% of its {s['dense_params']:,} params")


