"""Whether the first dimension of an example input is the batch: ``CostModel`` traces one example
(that dimension cut to one row), which is the count per example only if the model's work scales
with that dimension example by example.

What the trace saw on one example (``observing``) is compared with one plain forward (eval mode,
no gradients) on two: the inputs that carry the batch cut to their first two rows, or their one
row twice. Three things must hold, else the model is refused in one line naming the fix:

* a sequence layer with a ``batch_first`` flag keeps its time dimension (else the count would be
  of one time step);
* every module that runs on one example runs on two (a forward that branches on the batch size
  would be counted on a path the model does not run on a batch);
* the model's output grows with the examples (a time-first loop over a cell, ``for t in
  range(x.shape[0])``, gives the same output shape on one "example" as on two).

The last two only where the example given has two examples or more: at batch 1 nothing is cut.
The cost is one forward on two examples (no trace): on one CPU thread, for a ResNet-50 input of
224x224, 0.8 s beside the trace's 0.5 s (the trace's own forward is of one example).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import worded


@dataclass
class Observed:
    """What one forward showed: the modules that ran (names, in order of first call), the shape of the
    first tensor input of each module with a ``batch_first`` flag at its first call, the shapes of
    the model's output tensors."""

    ran: dict[str, None] = field(default_factory=dict)
    first_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: list[tuple[int, ...]] = field(default_factory=list)


@contextmanager
def observing(model: nn.Module, seen: Observed):
    """Within the block, note in ``seen`` what ``model``'s forward passes do (see ``Observed``)."""
    watched = {name for name, m in model.named_modules() if isinstance(getattr(m, "batch_first", None), bool)}

    def hook(name):
        def record(module, args, kwargs):
            seen.ran.setdefault(name)
            if name in watched and name not in seen.first_shapes:
                values = (*args, *(kwargs[k] for k in ("query", "input", "src") if k in kwargs))
                if values and isinstance(values[0], torch.Tensor):
                    seen.first_shapes[name] = tuple(values[0].shape)
        return record

    def output(module, args, out):
        seen.outputs = [tuple(t.shape) for t in _tensors(out)]

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in model.named_modules()]
    handles.append(model.register_forward_hook(output))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def check_cut(model: nn.Module, inputs: tuple, positions, one: Observed | None = None) -> None:
    """Refuse ``model`` if its count on one example of ``inputs`` (those at ``positions`` cut to
    their first row) would not be its count per example (see the module docstring). ``one``: what
    the trace's forward on that example showed (``observing``); None: a plain forward is made.

    At batch 1 only a ``batch_first`` layer's time dimension is checked (on the one row twice):
    nothing is cut, so the count is of the model as it runs on the example given. A model that
    fails on two examples is not judged here."""
    batch = inputs[positions[0]].shape[0] if positions else 1
    if batch == 1 and not any(isinstance(getattr(m, "batch_first", None), bool) for m in model.modules()):
        return
    if one is None:
        one = _run(model, tuple(t[:1] if i in positions else t for i, t in enumerate(inputs)))
    two = _run(model, tuple(_two_examples(t) if i in positions else t for i, t in enumerate(inputs)))
    if one is None or two is None:
        return
    _refuse_time_cut(model, one, two)
    if batch > 1:
        _refuse_branch(one, two)
        _refuse_fixed_output(one, two)


def _refuse_time_cut(model: nn.Module, one: Observed, two: Observed) -> None:
    """A layer with a ``batch_first`` flag (``nn.LSTM``/``GRU``/``RNN``, ``nn.MultiheadAttention``
    and so the ``nn.Transformer*Layer`` that call it) takes (T, B, ...) when it is False, (B, T, ...)
    when True, (T, ...) unbatched; one whose time dimension changes between the two runs had its
    time cut with the batch. One that only sees its batch dimension change (a model that transposes
    batch-first input itself) is fine."""
    modules = dict(model.named_modules())
    for name, a in one.first_shapes.items():
        b, module = two.first_shapes.get(name), modules[name]
        if b is None or len(a) != len(b) or len(a) not in (2, 3):
            continue
        time = 1 if len(a) == 3 and module.batch_first else 0
        if a[time] != b[time]:
            layout = "(T, ...), unbatched" if len(a) == 2 else ("(B, T, ...)" if module.batch_first else "(T, B, ...)")
            what = (f"module {name!r} ({type(module).__name__}, batch_first={module.batch_first}) takes its "
                    f"input {layout}")
            raise worded(
                f"{what}, and its time dimension ({a[time]} on one example of example_input, {b[time]} on two) is "
                "example_input's first dimension, which CostModel cuts to one example: the count would be of one "
                f"time step. {_BATCH_FIRST_FIX}",
                f"{what}, and its time dimension is the first dimension of the model's input (B, *--input-shape), "
                "the batch, which prunekit cuts to one example to count: the count would be of one time step. "
                f"{_BATCH_FIRST_FIX_CLI}")


_BATCH_FIRST_FIX = ("Give a batch-first example input (B, T, ...) to a model that takes one: layers built with "
                    "batch_first=True, or a wrapper whose forward takes (B, T, ...) and passes x.transpose(0, 1) to "
                    "the model")
_BATCH_FIRST_FIX_CLI = ("Give a model that takes batch-first input (B, T, ...): layers built with batch_first=True, "
                        "or a builder that returns a wrapper whose forward passes x.transpose(0, 1) to the model")


def _refuse_branch(one: Observed, two: Observed) -> None:
    """A module that runs on one example must run on two: a forward that takes another path at
    batch 1 (``small(x) if x.shape[0] == 1 else big(x)``) would be counted on a path the model does
    not run on its batch, and the layers it runs there reported as not run. (Modules that run on two
    examples only are left to the trace's not-run warning: per-example routing, such as a mixture of
    experts, runs more of them on more examples.)"""
    only_one = [name or "(model)" for name in one.ran if name not in two.ran]
    if not only_one:
        return
    only_two = [name or "(model)" for name in two.ran if name not in one.ran]
    shown = f"{', '.join(only_one[:4])}{' ...' if len(only_one) > 4 else ''} only on one"
    if only_two:
        shown += f"; {', '.join(only_two[:4])}{' ...' if len(only_two) > 4 else ''} only on two"
    what = (f"the model runs other modules on one example of {{}} than on two ({shown}): its forward takes "
            "another path at batch 1 (by the batch size, or by the other examples' data), so the count per example, which prunekit makes on one example, would not be "
            "of the model as it runs on a batch; make its forward take the same path at every batch size")
    raise worded(what.format("example_input"), what.format("the data") + " (a builder that returns the model "
                 "as you deploy it)")


def _refuse_fixed_output(one: Observed, two: Observed) -> None:
    """The model's output must grow with the examples: some output tensor is larger on two examples
    than on one. A model whose output does not (``(3, 2)`` on one "example" and on two) does not take
    the first dimension as its batch: a time-first loop over a cell, ``h = cell(x[t], h)`` for each
    ``t``, would be counted on one time step. Outputs that are all scalars (a loss) are not judged."""
    if not any(one.outputs) or len(one.outputs) != len(two.outputs):
        return
    if any(math.prod(b) > math.prod(a) for a, b in zip(one.outputs, two.outputs)):
        return
    shapes = ", ".join(str(s) for s in one.outputs[:3])
    what = (f"the model's output has the same shape {shapes} on one example of {{}} as on two, so the first "
            "dimension of {}, which prunekit cuts to one example to count, is not the model's batch (a time-first "
            "loop, for t in range(x.shape[0]), would be counted on one time step): ")
    raise worded(what.format("example_input", "example_input") + "wrap the model in a module whose forward takes "
                 "batch-first input (B, ...) and passes x.transpose(0, 1) to it, and give that a batch-first example "
                 "input",
                 what.format("the data", "the model's input (B, *--input-shape)") + "give a builder that returns "
                 "a wrapper whose forward takes batch-first input (B, ...) and passes x.transpose(0, 1) to the model")


def _two_examples(t: torch.Tensor) -> torch.Tensor:
    """Two examples (2, ...) of a batched input: its first two rows, or its one row twice."""
    return t[:2] if t.shape[0] >= 2 else torch.cat([t[:1], t[:1]])


def _run(model: nn.Module, inputs: tuple) -> Observed | None:
    """Run ``model`` on ``inputs`` (eval mode, no gradients, fused attention off so that a
    ``TransformerEncoderLayer`` calls its attention module, as in the trace) and note what ``Observed``
    holds; None if the model fails."""
    from .cost_trace import get_mha_fastpath, set_mha_fastpath
    fastpath, was_training = get_mha_fastpath(), model.training
    set_mha_fastpath(False)
    model.eval()
    try:
        with torch.no_grad(), observing(model, Observed()) as seen:
            model(*inputs)
        return seen
    except Exception:  # noqa: BLE001 - any failure means these inputs do not fit together
        return None
    finally:
        set_mha_fastpath(fastpath)
        model.train(was_training)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists, dicts and dataclasses of them);
    anything else is left out."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []
