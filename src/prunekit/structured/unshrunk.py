"""Layers the channel methods do not shrink (ConvTranspose, Conv3d, recurrent layers, embeddings,
Bilinear) and weights held outside a known layer: which they are, and the reasons naming them."""

from __future__ import annotations

from torch import nn

from ..costs import is_conv1d_style
from .dependency_trace import _prunes_out_channels


_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                nn.Embedding, nn.MultiheadAttention, nn.RNNBase, nn.PReLU)


# layers whose channels the channel methods leave whole (their groups are rooted at Conv1d/2d and Linear)
_NOT_SHRUNK = (nn.modules.conv._ConvTransposeNd, nn.Conv3d, nn.EmbeddingBag, nn.Bilinear, nn.RNNBase)
# of those, the ones whose output channels torch-pruning can trace: such a group is left dense, by name
_UNSHRUNK_ROOTS = (nn.modules.conv._ConvTransposeNd, nn.Conv3d)
# layers whose width no group is rooted at (recurrent layers, embeddings): named as left dense where
# no traced group touches them (one that does is named by that group's reason)
_WHOLE_LAYERS = (nn.RNNBase, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)


def _traced_untouched(module: nn.Module, in_graph: set, touched: set) -> bool:
    """Whether the trace ran ``module`` (itself a graph node, or a parameter of its own one: torch-pruning
    sees a GRU or EmbeddingBag by its weights) and no traced group holds it or its parameters."""
    own = [module, *module.parameters(recurse=False)]
    return any(x in in_graph for x in own) and not any(x in touched for x in own)


def _unshrunk_layer_reason(module: nn.Module) -> str:
    """Why a layer the channel methods do not shrink keeps its width ("LSTM: the channel methods do not
    shrink recurrent layers (hidden width 16): kept dense")."""
    kind = type(module).__name__
    if isinstance(module, nn.RNNBase):
        return (f"{kind}: the channel methods do not shrink recurrent layers (hidden width {module.hidden_size}): "
                "kept dense")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{kind}: the channel methods do not shrink embeddings (width {module.embedding_dim}): kept dense"
    return f"{kind}: the channel methods do not shrink this layer type's channels: kept dense"


def _loose_weights(model: nn.Module) -> list[tuple[str, str]]:
    """Layers of a type the channel methods do not shrink, and parameters of at least two
    dimensions held by a module that is not a known layer (used by einsum / matmul in a
    forward): the dependency analysis cannot follow channels through them."""
    loose = []
    for module_name, module in model.named_modules():
        if isinstance(module, _NOT_SHRUNK):
            loose.append((module_name, _unshrunk_layer_reason(module)))
            continue
        if isinstance(module, _LAYER_TYPES):
            continue
        if is_conv1d_style(module):       # a Linear stored (in, out): shrunk as one
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                full = f"{module_name}.{name}" if module_name else name
                loose.append((full, "a weight held outside a known layer (used by einsum or matmul, say), "
                                    "which the channel analysis cannot follow"))
    return loose


def _unshrunk_root_reason(tp_group, root: str, root_module: nn.Module) -> str:
    """Why the output channels of a layer the channel methods do not shrink (a ConvTranspose, a
    Conv3d) are kept: the network's output, or that layer type."""
    if not any(not _prunes_out_channels(item.dep) for item in tp_group.items):
        return "reaches the network output (no consuming layer)"
    return (f"output channels of a {type(root_module).__name__}, a layer type whose channels the channel methods "
            "do not shrink: kept dense")
