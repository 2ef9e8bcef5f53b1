"""The memory format of a tensor, so that a parameter rebuilt at another size keeps its old one's.

A model converted with ``model.to(memory_format=torch.channels_last)`` holds its conv weights
(out, in, kH, kW) in channels-last order; channel surgery (``structured.shrink``) and resizing to
a saved layout (``zoo.layout.apply_layout``) make new tensors, which would otherwise come out in
the default (contiguous) order and make the user convert the model again.
"""

from __future__ import annotations

import torch


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` (4-D ``t``) or ``torch.channels_last_3d`` (5-D) where ``t`` is laid out
    so and not also contiguous (a 1x1 kernel, or one input channel, is both: the orders agree);
    ``torch.contiguous_format`` otherwise."""
    if not t.is_contiguous():
        for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if t.dim() == dims and t.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format
