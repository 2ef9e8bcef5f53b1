"""What the channel analysis hands the methods: :class:`Member` (a layer's share of a group),
:class:`ChannelGroup` (coupled channels kept or removed together), :class:`GroupSet` (the groups
and those left dense). How they are found: ``groups.find_groups``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Member:
    """One layer's share of a group.

    ``role``: "out" (output channels of a Conv/Linear), "in" (input channels of a Conv/Linear),
    "bn" (BatchNorm features) or "heads" (heads of an attention module, ``repeat`` = head dim);
    in a "qkv_heads" group the q/k/v Linears are "out" and the output projection "in" members,
    each with ``repeat`` = head size.
    Group channel ``j`` is the layer's channels ``offset + s * size * repeat + j * repeat ...
    + repeat - 1`` on that axis for each segment ``s < group.segments`` (``repeat`` > 1 only for
    a Linear after a flatten of C x H x W, and for heads): the member is the slice (``offset``,
    ``size * repeat``) of the layer's channels. An "out" member holds all its layer's outputs
    except in a part of a residual add onto a concatenation, where x's producer is an "out"
    member of every part, each at its own offset.
    """

    module: str
    role: str
    offset: int = 0
    repeat: int = 1


@dataclass
class ChannelGroup:
    """``size`` coupled channels; ``root`` is the layer torch-pruning grouped them from.

    ``kind``: "channels", "heads" (an ``nn.MultiheadAttention``'s heads) or "qkv_heads" (the heads
    of HuggingFace-style attention ``attention``, the module whose head count follows the group).
    ``split``: (heads, head size) when the trace shows a reshape of the group's last axis into two
    (``view(B, T, 2, 8)``: hand-written multi-head attention), else None; only words a refusal.
    ``norm``: a norm (a LayerNorm/RMSNorm/GroupNorm, or the statistic of a hand-written one: a mean,
    var or std) whose normalised axes hold an axis as long as the channels but not every such axis
    (LayerNorm(T) on (B, C, T) with T == C), so the trace cannot tell whether it mixes them; the
    numeric check (``shrink.checked_groups``) decides, and its refusal names it; else None."""

    index: int
    root: str
    size: int
    members: list[Member] = field(default_factory=list)
    segments: int = 1
    kind: str = "channels"
    attention: str = ""
    split: tuple[int, int] | None = None    # (heads, head size) where a reshape splits the width into heads
    norm: str | None = None                 # a norm over an axis as long as the channels, not surely theirs (words)

    def layers(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def channels(self, member: Member, j: torch.Tensor) -> torch.Tensor:
        """The layer channels of ``member`` that group channels ``j`` (k,) stand for, (k·repeat·segments,)."""
        block = self.size * member.repeat
        per = (j.view(-1, 1) * member.repeat + torch.arange(member.repeat)).flatten()
        return torch.cat([member.offset + s * block + per for s in range(self.segments)])

    def __str__(self) -> str:
        what = "heads" if self.kind in ("heads", "qkv_heads") else "channels"
        extra = f" x {self.segments} blocks" if self.segments > 1 else ""
        return f"group {self.index} ({self.root}, {self.size} {what}{extra}, {len(self.members)} members)"


@dataclass
class GroupSet:
    """The prunable groups of a model plus the groups left dense and why."""

    groups: list[ChannelGroup]
    skipped: list[tuple[str, str]]   # (root layer, reason)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)
