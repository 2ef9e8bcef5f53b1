"""Remove closed channels physically; describe and rebuild a shrunk architecture.

``shrink`` copies the model and cuts the closed channels of every group out of each member
layer with torch-pruning's pruning functions (the surgery on weights, biases and BN
statistics), so the result is an ordinary ``nn.Module`` of the same classes with smaller
layers. ``channel_layout``/``apply_layout`` record and rebuild the per-layer channel counts,
which is what a saved shrunk model needs besides its tensors (no code is executed to load it).
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PrunekitError
from .groups import GroupSet, build_graph

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


def shrink(model: nn.Module, groups: GroupSet, masks: list[torch.Tensor], example_input: torch.Tensor
           ) -> nn.Module:
    """A copy of ``model`` without the channels whose mask is False (masks in group order)."""
    if len(masks) != len(groups):
        raise PrunekitError(f"got {len(masks)} masks for {len(groups)} channel groups")
    for group, mask in zip(groups, masks):
        if mask.numel() != group.size:
            raise PrunekitError(f"mask of {group} has {mask.numel()} entries")
        if not bool(mask.any()):
            raise PrunekitError(f"{group} would lose every channel; keep at least one")
    small = copy.deepcopy(model)
    small.eval()
    graph = build_graph(small, example_input)
    modules = dict(small.named_modules())
    for group, mask in zip(groups, masks):
        closed = torch.nonzero(~mask.bool()).flatten().tolist()
        if not closed:
            continue
        root = modules[group.root]
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        graph.get_pruning_group(root, fn, idxs=closed).prune()
    return small


def channel_layout(model: nn.Module) -> dict[str, dict]:
    """Per-layer channel counts of every Conv/Linear/BatchNorm (JSON-ready)."""
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, _CONV):
            layout[name] = {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
        elif isinstance(module, nn.Linear):
            layout[name] = {"in": module.in_features, "out": module.out_features}
        elif isinstance(module, _BN):
            layout[name] = {"features": module.num_features}
    return layout


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Resize ``model``'s layers in place to ``layout`` (fresh tensors; load weights after)."""
    modules = dict(model.named_modules())
    for name, spec in layout.items():
        module = modules.get(name)
        if module is None:
            raise PrunekitError(f"the saved channel layout names layer {name!r}, which the model lacks: "
                                "the file belongs to another architecture")
        try:
            if isinstance(module, _CONV):
                cin, cout, groups = int(spec["in"]), int(spec["out"]), int(spec["groups"])
                module.in_channels, module.out_channels, module.groups = cin, cout, groups
                module.weight = nn.Parameter(torch.empty(cout, cin // groups, *module.kernel_size))
                if module.bias is not None:
                    module.bias = nn.Parameter(torch.empty(cout))
            elif isinstance(module, nn.Linear):
                cin, cout = int(spec["in"]), int(spec["out"])
                module.in_features, module.out_features = cin, cout
                module.weight = nn.Parameter(torch.empty(cout, cin))
                if module.bias is not None:
                    module.bias = nn.Parameter(torch.empty(cout))
            elif isinstance(module, _BN):
                n = int(spec["features"])
                module.num_features = n
                if module.affine:
                    module.weight = nn.Parameter(torch.ones(n))
                    module.bias = nn.Parameter(torch.zeros(n))
                if module.track_running_stats:
                    module.running_mean = torch.zeros(n)
                    module.running_var = torch.ones(n)
            else:
                raise PrunekitError(f"layer {name!r} is a {type(module).__name__}, not a Conv/Linear/BatchNorm")
        except (KeyError, TypeError, ValueError) as err:
            raise PrunekitError(f"bad channel layout entry for {name!r}: {spec!r} ({err}); "
                                "the sidecar JSON is damaged") from None
    return model
