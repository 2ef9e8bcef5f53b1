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


def refuse_lazy(model: nn.Module) -> None:
    """Refuse a model holding a lazy module (``nn.LazyConv2d``, ``nn.LazyLinear``, ...) whose
    parameters are not made yet: their shapes come from the first call, and nothing can be counted
    or pruned before it (torch raises a ValueError on any use of them)."""
    lazy = [(name or "(model)", type(m).__name__) for name, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if not lazy:
        return
    shown = ", ".join(f"{name!r} ({kind})" for name, kind in lazy[:3]) + (f" and {len(lazy) - 3} more" if len(lazy) > 3 else "")
    what = (f"the model's lazy module{'s' if len(lazy) > 1 else ''} {shown} {'have' if len(lazy) > 1 else 'has'} "
            "no parameters yet (a lazy module makes them, shaped by the input, at its first call): ")
    raise worded(what + "run the model once on an example input (model(example_input)) to make them, or load "
                 "its trained weights (load_state_dict), then count or prune it",
                 what + "make the builder run the model once on an input of its shape before it returns it, or "
                 "give --checkpoint with its trained weights")


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
