"""Whether the first dimension of an example input is the batch: ``CostModel`` traces one example
(that dimension cut to one row), which is the count per example only if the model's work scales
with that dimension example by example.

What the trace saw on one example (``observing``) is compared with one plain forward (eval mode,
no gradients, under ``torch.random.fork_rng``, the model's buffers given back as they were) on two:
the inputs that carry the batch cut to their first two rows, or their one row twice.

* Refused, naming the fix: a torch sequence layer (``nn.LSTM``/``GRU``/``RNN``,
  ``nn.MultiheadAttention``, and so the ``nn.Transformer*Layer`` that call it) whose time dimension
  is the cut itself: one step on one example, two on two, its batch dimension the same (a model fed
  (T, B, ...) time first: the count would be of one time step). A time dimension that changes
  otherwise (padding to the longest row of the batch) is fine.
* Warned of, where the example has two rows or more: a forward that runs other modules on one
  example than on two, on both sides (``small(x) if x.shape[0] == 1 else big(x)``, or random
  routing): the count is of the path taken on one example. Modules on one side alone are not
  judged: a cache filled by the trace's forward runs fewer modules on two, per-example routing
  more.

Not checked, as it cannot be told in general: a model whose first input dimension is not the
batch with no torch sequence layer to see (a time-first loop over a cell, ``for t in
range(x.shape[0])``, has outputs shaped like a model's fixed-size output). The cost is one forward
on two examples (no trace): on one CPU thread of a loaded shared machine, for a ResNet-50 input of
224x224, 0.8 to 1.0 s beside the trace's 0.7 to 0.8 s (the trace's own forward, of one example, is
the other side).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import worded

# torch's own layers that take a time dimension, placed by their batch_first flag
_SEQUENCE = (nn.RNNBase, nn.MultiheadAttention)


@dataclass(frozen=True)
class CutCheck:
    """How ``CostModel`` checks its cut when ``prune`` makes it: ``rows``, the example's first two
    rows (prune's ``example_input`` is its first row alone, which the trace counts; the check's
    forward runs on these, so no forward of one example is made beside the trace's); None: the
    example given to ``CostModel``. ``source``: what the example is called in messages
    ("example_input", "the first batch of data"). The warning is left to prune
    (``CostModel.path_warning``), which gives it as rank 0 finds it."""

    rows: torch.Tensor | None
    source: str = "example_input"


@dataclass
class Observed:
    """What one forward showed: the modules that ran (names, in order of first call), the shape of the
    first tensor input of each torch sequence layer at its first call."""

    ran: dict[str, None] = field(default_factory=dict)
    first_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@contextmanager
def observing(model: nn.Module, seen: Observed):
    """Within the block, note in ``seen`` what ``model``'s forward passes do (see ``Observed``)."""
    watched = {name for name, m in model.named_modules() if isinstance(m, _SEQUENCE)}

    def hook(name):
        def record(module, args, kwargs):
            seen.ran.setdefault(name)
            if name in watched and name not in seen.first_shapes:
                values = (*args, *(kwargs[k] for k in ("query", "input") if k in kwargs))
                if values and isinstance(values[0], torch.Tensor):
                    seen.first_shapes[name] = tuple(values[0].shape)
        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in model.named_modules()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def check_cut(model: nn.Module, inputs: tuple, positions, one: Observed, *, rows: tuple | None = None,
              source: str = "example_input") -> tuple[str, str] | None:
    """Refuse ``model`` if its count on one example of ``inputs`` (those at ``positions`` cut to
    their first row) would be of one time step; return the warning to give if it takes another path
    on one example than on two (its Python and command-line wordings, for ``worded_warning``; None:
    none). See the module docstring. ``one``: what the trace's forward on that example showed
    (``observing``). ``rows``: the inputs the two examples are taken from (default ``inputs``);
    ``source``: their name in messages.

    At batch 1 only the time dimension is checked (on the one row twice): nothing is cut, so the
    count is of the model as it runs on the example given. A model that fails on two examples is
    not judged here."""
    rows = inputs if rows is None else rows
    batch = rows[positions[0]].shape[0] if positions else 1
    if batch == 1 and not any(isinstance(m, _SEQUENCE) for m in model.modules()):
        return None
    two = _run(model, tuple(_two_examples(t) if i in positions else t for i, t in enumerate(rows)))
    if two is None:
        return None
    _refuse_time_cut(model, one, two, source)
    return _branch_warning(one, two, source) if batch > 1 else None


def _refuse_time_cut(model: nn.Module, one: Observed, two: Observed, source: str) -> None:
    """A torch sequence layer takes (T, B, ...) when its ``batch_first`` is False, (B, T, ...) when
    True, (T, ...) unbatched; one whose time dimension is 1 on one example and 2 on two, its batch
    dimension unchanged, had its time cut as the batch. One whose time dimension changes otherwise
    (padding to the batch's longest row) or that sees its batch dimension change (a model that
    transposes batch-first input itself) is fine."""
    modules = dict(model.named_modules())
    for name, a in one.first_shapes.items():
        b, module = two.first_shapes.get(name), modules[name]
        if b is None or len(a) != len(b) or len(a) not in (2, 3):
            continue
        time = 1 if len(a) == 3 and module.batch_first else 0
        if (a[time], b[time]) != (1, 2) or (len(a) == 3 and a[1 - time] != b[1 - time]):
            continue
        layout = "(T, ...), unbatched" if len(a) == 2 else ("(B, T, ...)" if module.batch_first else "(T, B, ...)")
        what = (f"module {name!r} ({type(module).__name__}, batch_first={module.batch_first}) takes its "
                f"input {layout}")
        raise worded(
            f"{what}, and its time dimension (1 on one example of {source}, 2 on two) is the first dimension of "
            f"{source}, which prunekit cuts to one example to count: the count would be of one time step. "
            f"{_BATCH_FIRST_FIX}",
            f"{what}, and its time dimension is the first dimension of the model's input (B, *--input-shape), "
            "the batch, which prunekit cuts to one example to count: the count would be of one time step. "
            f"{_BATCH_FIRST_FIX_CLI}")


_BATCH_FIRST_FIX = ("Give a batch-first example input (B, T, ...) to a model that takes one: layers built with "
                    "batch_first=True, or a wrapper whose forward takes (B, T, ...) and passes x.transpose(0, 1) to "
                    "the model")
_BATCH_FIRST_FIX_CLI = ("Give a model that takes batch-first input (B, T, ...): layers built with batch_first=True, "
                        "or a builder that returns a wrapper whose forward passes x.transpose(0, 1) to the model")


def _branch_warning(one: Observed, two: Observed, source: str) -> tuple[str, str] | None:
    """The warning for a forward that runs modules on one example that it does not run on two, and
    modules on two that it does not run on one (``small(x) if x.shape[0] == 1 else big(x)``; random
    routing): the count is of the path it takes on one example. None if either side runs no module
    the other does not: a cache the trace's forward filled runs fewer on two, per-example routing
    (a mixture of experts) runs more, and the trace's not-run warning names the layers it missed."""
    only_one = [name or "(model)" for name in one.ran if name not in two.ran]
    only_two = [name or "(model)" for name in two.ran if name not in one.ran]
    if not only_one or not only_two:
        return None

    def listed(names):
        return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    what = (f"the model runs other modules on one example of {{}} than on two ({listed(only_one)} only on one; "
            f"{listed(only_two)} only on two): its forward takes another path on one example (by the batch size, "
            "by the other examples' data, or at random), and its MACs are counted on that path, one example's, "
            "not on the one it takes on a batch; ")
    return (what.format(source) + "if it branches on the batch size, make it take the same path at every batch size",
            what.format("the data") + "if it branches on the batch size, give a builder that returns a model taking "
            "the same path at every batch size")


def _two_examples(t: torch.Tensor) -> torch.Tensor:
    """Two examples (2, ...) of a batched input: its first two rows, or its one row twice."""
    return t[:2] if t.shape[0] >= 2 else torch.cat([t[:1], t[:1]])


def _run(model: nn.Module, inputs: tuple) -> Observed | None:
    """Run ``model`` on ``inputs`` (eval mode, no gradients, fused attention off so that a
    ``TransformerEncoderLayer`` calls its attention module, as in the trace) and note what ``Observed``
    holds; None if the model fails. Torch's global RNGs (CPU and the model's CUDA devices) and the
    model's buffers (running statistics, counters, caches kept as buffers) are given back as they
    were: the caller's own draws and the model are as if the forward had not been made."""
    from .cost_trace import get_mha_fastpath, set_mha_fastpath
    fastpath, was_training = get_mha_fastpath(), model.training
    kept = [(module, name, t, t.detach().clone()) for module in model.modules()
            for name, t in module._buffers.items() if t is not None]
    set_mha_fastpath(False)
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices(model)), torch.no_grad(), observing(model, Observed()) as seen:
            model(*inputs)
        return seen
    except Exception:  # noqa: BLE001 - any failure means these inputs do not fit together
        return None
    finally:
        set_mha_fastpath(fastpath)
        model.train(was_training)
        with torch.no_grad():
            for module, name, t, saved in kept:        # a buffer replaced by the forward is put back too
                module._buffers[name] = t
                t.copy_(saved)


def rng_devices(model: nn.Module) -> list[int]:
    """The CUDA devices (indices) that ``model``'s parameters and buffers are on: those whose RNG
    ``torch.random.fork_rng`` must keep beside the CPU's for a forward of ``model``."""
    tensors = (*model.parameters(), *model.buffers())
    return sorted({t.device.index for t in tensors if t.device.type == "cuda" and t.device.index is not None})
