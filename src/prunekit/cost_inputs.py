"""Which inputs of an example batch carry the batch: the trace of ``CostModel`` cuts those to
their first example, so counts are per example and batch-independent work is charged once."""

from __future__ import annotations

import torch
from torch import nn

from .errors import PrunekitError, worded


def inputs_of(example_input) -> tuple:
    """``example_input`` as a tuple of the model's positional inputs."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def batched_inputs(model: nn.Module, example_input, batched=None) -> tuple[int, ...]:
    """Positions of the inputs that carry the batch (the ones cut to their first row for the trace).

    ``batched`` given: checked (tensors, one first dimension B >= 1) and returned. Otherwise
    input 0 carries the batch B; another tensor input does if its first dimension is B and the
    model cannot run with it kept whole beside one example of the others. An input the model
    runs with either way, at B > 1, is ambiguous (a per-example mask, or a shared table of B rows):
    refused, naming ``batched=``. At B = 1 nothing is cut, so nothing is ambiguous.
    """
    inputs = inputs_of(example_input)
    if batched is not None:
        return _checked_batched(inputs, batched)
    first = inputs[0] if inputs else None
    if any(isinstance(t, dict) for t in (example_input, *inputs)):
        raise PrunekitError("example_input is or holds a dict: CostModel cuts tensors to one example, not dicts; "
                            f"{DICT_INPUT_FIX}")
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] == 0:
        raise PrunekitError("example_input must be a batched tensor (B, ...) with B >= 1, or a tuple of inputs "
                            "whose first is one")
    batch = first.shape[0]
    candidates = [i for i, t in enumerate(inputs[1:], 1)
                  if batch > 1 and isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch]
    for i in candidates:
        others = (0, *(j for j in candidates if j != i))
        if _runs(model, cut_to_one_example(inputs, others)):
            raise AmbiguousBatchError(i, tuple(inputs[i].shape), batch)
    return (0, *candidates)


DICT_INPUT_FIX = ("wrap the model in a module whose forward takes the tensors as positional inputs and makes the "
                  "dict (def forward(self, img, txt): return self.model({'img': img, 'txt': txt})) and pass them "
                  "as a tuple (img, txt)")


def refuse_scripted(model: nn.Module) -> None:
    """Refuse a model that is, or holds, a TorchScript module (``torch.jit.script`` or ``torch.jit.trace``,
    each named so): TorchScript
    runs no forward hooks, and ``CostModel`` counts through them."""
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f"the model's submodule {name!r}" if name else "the model"
            how, done = (("torch.jit.trace", "tracing") if isinstance(module, torch.jit.TracedModule)
                         else ("torch.jit.script", "scripting"))
            raise PrunekitError(f"{where} is a TorchScript module ({how}), which runs without the hooks "
                                f"prunekit counts and prunes through: pass the module before {done} "
                                f"({how.rpartition('.')[2]} it after pruning)")


def refuse_time_cut(model: nn.Module, inputs: tuple, positions) -> None:
    """Refuse a model whose sequence layer's time dimension is ``inputs``' first dimension.

    A layer with a ``batch_first`` flag (``nn.LSTM``/``GRU``/``RNN``, ``nn.MultiheadAttention``
    and so the ``nn.Transformer*Layer`` that call it) takes (T, B, ...) when it is False, (B, T, ...)
    when True, (T, ...) unbatched. The model is run on one example and on two of the inputs at
    ``positions``; a layer whose time dimension changes between the two runs had its time cut
    with the batch, so a count on one example would be of one time step. A layer that only sees
    its batch dimension change (a model that transposes batch-first input itself) is fine. A model
    that fails on two examples is not judged here.
    """
    watched = {name: m for name, m in model.named_modules() if isinstance(getattr(m, "batch_first", None), bool)}
    if not watched:
        return
    one = _first_input_shapes(model, watched, cut_to_one_example(inputs, positions))
    two = _first_input_shapes(model, watched, tuple(_two_examples(t) if i in positions else t
                                                    for i, t in enumerate(inputs)))
    if one is None or two is None:
        return
    for name, module in watched.items():
        a, b = one.get(name), two.get(name)
        if a is None or b is None or len(a) != len(b) or len(a) not in (2, 3):
            continue
        time = 1 if len(a) == 3 and module.batch_first else 0
        if a[time] != b[time]:
            layout = "(T, ...), unbatched" if len(a) == 2 else ("(B, T, ...)" if module.batch_first else "(T, B, ...)")
            what = (f"module {name!r} ({type(module).__name__}, batch_first={module.batch_first}) takes its "
                    f"input {layout}")
            raise worded(
                f"{what}, and its time dimension ({a[time]} on one example of example_input, {b[time]} on two) is "
                "example_input's first dimension, which CostModel cuts to one example: the count would be of one "
                "time step. Give a batch-first example input (B, T, ...) to a model that takes one: layers built "
                "with batch_first=True, or a wrapper whose forward takes (B, T, ...) and passes x.transpose(0, 1) "
                "to the model",
                f"{what}, and its time dimension is the first dimension of the model's input (B, *--input-shape), "
                "the batch, which prunekit cuts to one example to count: the count would be of one time step. Give "
                "a model that takes batch-first input (B, T, ...): layers built with batch_first=True, or a builder "
                "that returns a wrapper whose forward passes x.transpose(0, 1) to the model")


def _two_examples(t: torch.Tensor) -> torch.Tensor:
    """Two examples (2, ...) of a batched input: its first two rows, or its one row twice."""
    return t[:2] if t.shape[0] >= 2 else torch.cat([t[:1], t[:1]])


def _first_input_shapes(model: nn.Module, watched: dict, inputs: tuple) -> dict | None:
    """Shape of the first tensor input of each module in ``watched`` at its first call when
    ``model`` runs on ``inputs`` (eval mode, no gradients, fused attention off so that a
    ``TransformerEncoderLayer`` calls its attention module); None if the model fails."""
    from .cost_trace import get_mha_fastpath, set_mha_fastpath
    shapes: dict = {}

    def hook(name):
        def record(module, args, kwargs):
            values = (*args, *(kwargs[k] for k in ("query", "input", "src") if k in kwargs))
            first = values[0] if values else None
            if name not in shapes and isinstance(first, torch.Tensor):
                shapes[name] = tuple(first.shape)
        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in watched.items()]
    fastpath = get_mha_fastpath()
    set_mha_fastpath(False)
    try:
        return shapes if _runs(model, inputs) else None
    finally:
        set_mha_fastpath(fastpath)
        for handle in handles:
            handle.remove()


class AmbiguousBatchError(PrunekitError):
    """An input of an example batch that may or may not carry the batch: ``CostModel`` names its
    ``batched=``; ``prunekit.prune``, which has no such argument, asks for batch 1 (:meth:`for_prune`)."""

    def __init__(self, position: int, shape: tuple[int, ...], batch: int):
        self.position, self.shape, self.batch = position, shape, batch
        super().__init__(self._what() + f"pass batched=(0, {position}) if it holds one row per example, "
                         "batched=(0,) if it is shared by the batch, or an example input of batch 1")

    def _what(self) -> str:
        return (f"example_input's input {self.position} (shape {self.shape}) has the batch size {self.batch} of "
                "input 0 as its first dimension, and the model runs with it cut to one example or kept whole: ")

    def for_prune(self) -> PrunekitError:
        return PrunekitError(self._what() + "pass an example input of batch 1 (the first example of each input) "
                             "so that nothing needs cutting")


def _checked_batched(inputs: tuple, batched) -> tuple[int, ...]:
    positions = tuple(batched)
    if not all(isinstance(i, int) and 0 <= i < len(inputs) and isinstance(inputs[i], torch.Tensor)
               and inputs[i].dim() > 0 for i in positions):
        raise PrunekitError(f"batched={batched!r} must name positions of tensor inputs of example_input "
                            f"(0 to {len(inputs) - 1}) that have a batch dimension first")
    sizes = {inputs[i].shape[0] for i in positions}
    if len(sizes) > 1 or 0 in sizes:
        raise PrunekitError(f"the inputs batched={batched!r} names have first dimensions {sorted(sizes)}: "
                            "they must share one batch size B >= 1")
    return positions


def cut_to_one_example(inputs: tuple, positions) -> tuple:
    """``inputs`` with those at ``positions`` cut to their first row (B, ...) -> (1, ...)."""
    return tuple(t[:1] if i in positions else t for i, t in enumerate(inputs))


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether ``model`` (in eval mode, without gradients) accepts ``inputs``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure means these inputs do not fit together
        return False
    finally:
        model.train(was_training)
