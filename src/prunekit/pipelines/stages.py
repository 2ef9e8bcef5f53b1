"""Stage checkpoints: the protocol by which a multi-stage pipeline saves and resumes its progress.

A pipeline that works in stages (CHITA++/FALCON++ in ``fisher_methods.run_stages``, gradual
pruning with fine-tuning) plugs in with two calls and nothing else::

    history = ctx.history
    done = resume_stages(ctx)          # 0, or the last completed stage: model, history, RNG restored
    for stage in range(1, stages + 1):
        if stage <= done:
            continue
        ...                             # the stage's work: read the model, change it, recalibrate BN
        ctx.history.append({...})       # this stage's record (JSON-serialisable)
        stage_completed(ctx, stage)     # after the stage is *fully* done, before the next begins

Contract for the pipeline:
  * Everything the next stage depends on lives in the model's ``state_dict()`` (weights, masks as
    zeros, BatchNorm buffers), in ``ctx.history``, in the torch RNG states (CPU, each GPU's),
    or in the tensors the pipeline hands ``stage_completed`` (``resume_stages`` gives them back).
    A pipeline with other state (an optimizer's momentum, a mask not implied by zeros) must put
    it into the model, the history or those tensors before ``stage_completed``.
  * A stage's data must not depend on how many stages ran before *in this process*: take a fresh
    loader per stage (``ctx.train_batches()`` does: each call starts at the same seeded epoch; a
    fine-tune may move it on by a number derived from the stage, ``gradual.finetune_batches``) or
    one driven only by the restored RNG.
  * ``stage_completed`` may run code on the model (the run folder evaluates it); it leaves the
    model's state and the RNG states as it found them.

Contract for the checkpointer (``ctx.checkpointer``, e.g. ``runs.RunCheckpointer``): ``save``
writes atomically (a kill leaves the previous checkpoint or the new one, never half of one);
``last`` returns the newest complete checkpoint or None. With both kept, a run killed at any
moment and resumed ends with bit-identical weights to one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .. import interrupts


@dataclass
class StageState:
    """What a completed stage leaves behind.

    stage:       number of the last completed stage (1-based).
    model_state: the model's ``state_dict()`` after that stage (tensors on the CPU).
    history:     the per-stage records so far (``ctx.history``).
    rng:         ``capture_rng()`` after that stage.
    extra:       anything else (JSON-able) the pipeline needs to carry on (e.g. channel layouts).
    tensors:     the pipeline's own tensors to carry on (e.g. a candidate weight vector kept for later).
    """

    stage: int
    model_state: dict[str, torch.Tensor]
    history: list[dict]
    rng: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class StageCheckpointer(Protocol):
    def last(self) -> StageState | None:
        """The newest complete checkpoint, or None when no stage has completed."""

    def save(self, state: StageState, model: nn.Module) -> None:
        """Store ``state`` atomically; may add measurements to ``state.history[-1]`` first (and
        count their seconds in an attribute ``measure_seconds``: see ``measure_seconds``)."""


def measure_seconds(checkpointer: StageCheckpointer | None) -> float:
    """Seconds ``checkpointer`` has spent measuring stages so far (evaluations a pipeline leaves
    out of its pruning time); 0 without one or for one that does not measure."""
    return getattr(checkpointer, "measure_seconds", 0.0)


def capture_rng() -> dict:
    """The torch CPU generator's state (``"torch"``: a uint8 tensor) and, once this process has
    used CUDA, each GPU's generator (``"cuda"``: a list of tensors; dropout on a GPU draws from it).

    NumPy's and Python's ``random`` global generators are not captured: nothing prunekit runs draws
    from them (a user's loader that does is replayed with its own states, ``data.replay``), and
    prunekit never seeds them, so their states only made two runs' checkpoints differ in bytes
    (session 54). Checkpoints of older versions that hold them still load (``restore_rng`` leaves
    them unread)."""
    state = {"torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i).clone() for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: dict) -> None:
    """Undo ``capture_rng`` (GPU generators only where this process has as many GPUs). An older
    checkpoint's ``"numpy"`` / ``"random"`` states are left unread: nothing prunekit runs draws from
    those generators, and setting them would only change the caller's."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and torch.cuda.device_count() >= len(state["cuda"]):
        for index, cuda_state in enumerate(state["cuda"]):
            torch.cuda.set_rng_state(cuda_state, index)


def resume_stages(ctx, tensors: dict | None = None) -> int:
    """Restore the context's model, stage history and RNG from its checkpointer's last stage,
    and into ``tensors`` (filled in place) the tensors the pipeline handed ``stage_completed``.

    ``ctx`` has ``model``, ``history`` (a list, filled in place) and ``checkpointer``.

    Returns the number of stages already completed (0 without a checkpointer or checkpoint).
    """
    checkpointer = getattr(ctx, "checkpointer", None)
    state = checkpointer.last() if checkpointer is not None else None
    if state is None:
        return 0
    ctx.model.load_state_dict(state.model_state)
    ctx.history[:] = state.history
    restore_rng(state.rng)
    if tensors is not None:
        tensors.update(state.tensors)
    return state.stage


def stage_completed(ctx, stage: int, tensors: dict | None = None) -> None:
    """Hand the finished ``stage`` (and ``tensors``, the pipeline's own state beyond the model) to
    the context's checkpointer (no-op without one)."""
    checkpointer = getattr(ctx, "checkpointer", None)
    if checkpointer is None:
        return
    rng = capture_rng()
    model_state = {k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()}
    kept = {k: v.detach().cpu().clone() for k, v in (tensors or {}).items()}
    checkpointer.save(StageState(stage, model_state, ctx.history, rng, tensors=kept), ctx.model)
    restore_rng(rng)     # whatever the checkpointer ran (an evaluation) must not shift the run
    interrupts.check()   # a Ctrl-C swallowed during the stage stops the run at its checkpoint


def optimizer_tensors(optimizer: torch.optim.Optimizer, schedule) -> tuple[dict, dict]:
    """An optimizer's and its learning-rate schedule's state for a checkpoint: the tensors
    (``optimizer/<param index>/<key>``, e.g. momentum buffers) and the JSON-able rest."""
    state = optimizer.state_dict()
    tensors = {f"optimizer/{index}/{key}": value.detach().cpu().clone()
               for index, values in state["state"].items() for key, value in values.items()}
    return tensors, {"param_groups": state["param_groups"], "schedule": schedule.state_dict()}


def load_optimizer(optimizer: torch.optim.Optimizer, schedule, tensors: dict, saved: dict) -> None:
    """Undo ``optimizer_tensors``: ``tensors`` may hold other keys too (those not under
    ``optimizer/`` are ignored)."""
    per_param: dict = {}
    for k, v in tensors.items():
        if k.startswith("optimizer/"):
            _, index, key = k.split("/", 2)
            per_param.setdefault(int(index), {})[key] = v
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    schedule.load_state_dict(saved["schedule"])
