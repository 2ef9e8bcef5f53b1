"""What every channel method takes and gives: ``ChannelOptions`` (options of them all, each method
adds its own), ``ChannelContext`` (what it may use) and ``Cut`` (what it returns).

A channel method (a row of ``methods.METHODS`` with family ``"channels"``) is a function
``run(ctx: ChannelContext, options) -> Cut``; ``structured.pipeline.prune_channels`` runs it,
then recalibrates BatchNorm and fine-tunes, checkpointing each phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..costs import CostModel
from ..losses import LossFn
from ..options import Integer, OneOf, OptionError, Options, Real, SQUARED
from .gates import GatedMacs, GatedParams
from .group_types import GroupSet


@dataclass
class ChannelOptions(Options):
    """gate_batch_size: training batch size while the gates learn and for the fine-tune (for
    prunekit loaders; a DataLoader of your own keeps its batch size); channel_multiple: every
    group keeps a multiple of this many channels (see ``rounding``); finetune_epochs /
    finetune_lr: SGD fine-tuning of the shrunk model(s) (cosine learning rate from finetune_lr);
    finetune_distill / finetune_temperature: weight of the dense model's softened outputs in the
    fine-tune's loss and their temperature (``train.distillation_loss``; 0: labels only);
    depth_flops: remove whole blocks first, down to this share of the dense MACs (``depth``;
    None: no depth cut), scored on depth_batches training batches by the loss rise per MAC
    (depth_per "macs") or per second of measured block time ("time"); residual_channels: in an
    option-A ResNet, "prune" (default) makes each stage's block outputs one group through the
    zero-pad shortcuts, "keep" leaves them at full width and prunes inside the blocks only;
    reconstruct_batches: after the cut, re-fit every Conv2d/Linear of the shrunk model, in forward
    order, to the dense model's outputs of that layer at its kept channels on this many training
    batches by ridge least squares, seeing BatchNorm re-estimation (``reconstruct``; 0: off), with
    ridge λ = reconstruct_ridge x the mean diagonal of XᵀX."""

    gate_batch_size: int = 64
    channel_multiple: int = 1
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    finetune_distill: float = 0.0
    finetune_temperature: float = 4.0
    depth_flops: float | None = None
    depth_batches: int = 4
    depth_per: str = "macs"
    residual_channels: str = "prune"
    reconstruct_batches: int = 0
    reconstruct_ridge: float = 1e-3
    constraints = {"reconstruct_batches": Integer(0), "reconstruct_ridge": Real(0, open_low=True),
                   "residual_channels": OneOf(("prune", "keep")), "gate_batch_size": Integer(1), "channel_multiple": Integer(1), "finetune_epochs": Integer(0),
                   "finetune_lr": Real(0, open_low=True), "finetune_distill": Real(0, 1),
                   "finetune_temperature": Real(0, open_low=True, use=SQUARED), "depth_flops": Real(0, 1, open_low=True),
                   "depth_batches": Integer(1), "depth_per": OneOf(("macs", "time"))}

    def check_given(self) -> None:
        super().check_given()
        idle = [name for name in ("finetune_lr", "finetune_temperature") if name in self.given]
        if idle and not self.finetune_epochs:
            named = " and ".join(idle)
            raise OptionError(f"{named} shape{'s' if len(idle) == 1 else ''} the fine-tune, and finetune_epochs is 0: "
                              f"give finetune_epochs (e.g. 3) or leave {named} out", (*idle, "finetune_epochs"))
        if "finetune_temperature" in self.given and not self.finetune_distill:
            raise OptionError("finetune_temperature softens the dense model's outputs for finetune_distill, and "
                              "finetune_distill is 0: give finetune_distill (e.g. 0.9) or leave "
                              "finetune_temperature out", ("finetune_temperature", "finetune_distill"))
        if "reconstruct_ridge" in self.given and not self.reconstruct_batches:
            raise OptionError("reconstruct_ridge shapes the re-fit after the cut, and reconstruct_batches is 0: give "
                              "reconstruct_batches (e.g. 8) or leave reconstruct_ridge out",
                              ("reconstruct_ridge", "reconstruct_batches"))

    def channel_targets(self, shares: list[float]) -> list[float]:
        """The shares of the dense MACs the channel cut itself must reach for budget ``shares``
        (the hybrid's cut stops at structured_flops, its weights phase does the rest)."""
        return list(shares)

    @classmethod
    def from_user(cls, raw: dict, method: str, **defaults) -> "ChannelOptions":
        options = super().from_user(raw, method, **defaults)
        if raw.get("finetune_distill") and not options.finetune_epochs:    # asked for, not a method default
            raise OptionError(f"finetune_distill {raw['finetune_distill']:g} acts in the fine-tune: ask for "
                              "finetune_epochs of 1 or more, or leave finetune_distill out",
                              ("finetune_distill", "finetune_epochs"))
        return options


@dataclass
class ChannelContext:
    """model: the dense model (left as it is: taper trains a copy);
    shares: the budgets as shares of the dense MACs, the asked one first (then taper's
    snapshots); batches(): the next epoch of (x, y) training batches; progress: called with
    each gate-training step's record, or None; teacher: a copy of the dense model, untouched (set by
    ``pipeline.prune_channels``), for methods that train weights and may learn its outputs;
    loss_fn: the loss the gates, the depth cut and the fine-tune train on (``prunekit.losses``;
    None: cross-entropy); include, exclude: the layers whose single weights a second phase (the
    hybrid's FALCON) prunes and counts, as a weights method's; max_params: the most parameters the
    shrunk model may keep (all of them, ``sum(p.numel())``; None: no params budget, MACs only), with
    params_counter the ``GatedParams`` that counts them (methods that take a params budget read
    both through ``params_budget()``; the hybrid has no counter: its weights phase meets max_params,
    zeros counting as removed, as for a weights method)."""

    model: nn.Module
    costs: CostModel
    groups: GroupSet
    counter: GatedMacs
    shares: list[float]
    batches: Callable[[], Iterable]
    example_input: torch.Tensor
    progress: Callable[[dict], None] | None = None
    teacher: nn.Module | None = None
    loss_fn: LossFn | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_params: int | None = None
    params_counter: GatedParams | None = None

    def params_budget(self) -> tuple[GatedParams, int] | None:
        """(counter, most parameters) of a params budget the channel cut meets, or None (none given,
        or the hybrid's, which its weights phase meets: no counter)."""
        return None if self.max_params is None or self.params_counter is None else (self.params_counter,
                                                                                    self.max_params)


@dataclass
class Cut:
    """The shrunk models by share of dense MACs, their keep-masks (group order) and facts to record."""

    models: dict[float, nn.Module]
    masks: dict[float, list[torch.Tensor]]
    info: dict = field(default_factory=dict)
