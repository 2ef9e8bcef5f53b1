"""Least-squares reconstruction of the layers that consume cut channels (He et al. 2017, ThiNet).

Once a channel group loses channels, the layers reading them (its "in" members: conv2 of a
basic block when conv1's outputs are cut) see fewer inputs. ``reconstruct`` re-fits each such
Conv2d / Linear so that, on a few training batches, its outputs in the shrunk model match the
dense model's outputs of the same layer (before any BatchNorm), by ridge least squares:

    W = argmin ||X W - Y||² + λ ||W||²,   λ = ridge · mean(diag(XᵀX))

X: (rows, D) the consumer's inputs in the shrunk model (a conv's unfolded patches, D = C_in·kh·kw;
plus a ones column when the layer has a bias, not regularised); Y: (rows, C_out) the dense
layer's outputs at the shrunk layer's kept output channels. XᵀX (D, D) and XᵀY (D, C_out) are
accumulated in float64 batch by batch, so memory does not grow with the batches. Consumers are
re-fit in forward order, each on inputs of the shrunk model that already holds the earlier
re-fits (so their errors are corrected downstream). Both models run in eval mode (BatchNorm on
running statistics) while the data is collected; the models' modes are restored after.

Skipped (left as cut, counted in the record): consumers that are not Conv2d/Linear, grouped
convolutions, convs with a padding mode other than zeros, layers called more than once per forward
(shared weights), and layers the calibration batches never reach.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_capture import capture, forward_order
from .groups import GroupSet

RIDGE = 1e-3          # λ as a share of the mean diagonal of XᵀX


def closed_channels(groups: GroupSet, masks: list[torch.Tensor], name: str, role: str) -> set[int]:
    """The channels of layer ``name`` on axis ``role`` ("in" or "out") that ``masks`` (group order,
    (size,) bool each) remove."""
    closed: set[int] = set()
    for group, mask in zip(groups, masks):
        gone = torch.nonzero(~mask.bool().cpu()).flatten()
        if gone.numel() == 0 or group.kind != "channels":
            continue
        for member in group.members:
            if member.module == name and member.role == role:
                closed.update(group.channels(member, gone).tolist())
    return closed


def kept_outputs(groups: GroupSet, masks: list[torch.Tensor], name: str, extent: int) -> torch.Tensor:
    """Indices (k,) of the dense layer ``name``'s ``extent`` output channels that survive the cut."""
    closed = closed_channels(groups, masks, name, "out")
    return torch.tensor([c for c in range(extent) if c not in closed], dtype=torch.long)


def consumers(groups: GroupSet, masks: list[torch.Tensor]) -> list[str]:
    """Names of the layers that read channels ``masks`` remove (groups' "in" members), any type."""
    names: list[str] = []
    for group, mask in zip(groups, masks):
        if group.kind != "channels" or bool(mask.bool().all()):
            continue
        names += [m.module for m in group.layers("in") if m.module not in names]
    return names


def why_skipped(module: nn.Module) -> str | None:
    """Why ``module`` cannot be re-fit here, or None if it can."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__}, not a Conv2d or Linear"
    if module.groups != 1:
        return "a grouped convolution"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return "padding other than explicit zeros"
    return None


def design_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The least-squares rows of layer input ``x``: a conv's unfolded patches (N·L, C_in·kh·kw),
    a Linear's inputs (rows, in_features); plus a ones column if the layer has a bias. Float64."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)                      # (N, C_in·kh·kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    rows = rows.double()
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
    return rows


def target_rows(module: nn.Module, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The dense layer's output ``y`` ((N, C_out, H, W) or (..., out)) at kept channels ``keep``,
    as rows (N·H·W or rows, k) matching ``design_rows``. Float64."""
    if isinstance(module, nn.Conv2d):
        return y[:, keep].permute(0, 2, 3, 1).reshape(-1, keep.numel()).double()
    return y[..., keep].reshape(-1, keep.numel()).double()


def solve_ridge(xtx: torch.Tensor, xty: torch.Tensor, ridge: float, bias: bool) -> torch.Tensor:
    """W (D, k) minimising ||XW - Y||² + λ||W||² from XᵀX (D, D) and XᵀY (D, k), float64;
    λ = ``ridge`` x the mean diagonal of XᵀX over the weight columns (the bias column, last when
    ``bias``, is not regularised)."""
    d = xtx.shape[0] - (1 if bias else 0)
    scale = float(xtx.diagonal()[:d].mean()) if d else 0.0
    lam = torch.full((xtx.shape[0],), ridge * max(scale, 1e-12), dtype=xtx.dtype)
    if bias:
        lam[-1] = 0.0
    return torch.linalg.solve(xtx + torch.diag(lam), xty)


def set_weights(module: nn.Module, solution: torch.Tensor) -> None:
    """Write ``solution`` (D[+1], C_out) into ``module``'s weight (and bias, the last row)."""
    with torch.no_grad():
        if module.bias is not None:
            module.bias.copy_(solution[-1].to(module.bias.dtype))
            solution = solution[:-1]
        module.weight.copy_(solution.t().reshape(module.weight.shape).to(module.weight.dtype))


def refit_layer(small: nn.Module, dense: nn.Module, name: str, keep: torch.Tensor, batches: list[torch.Tensor],
                ridge: float = RIDGE) -> dict:
    """Re-fit ``small``'s layer ``name`` on ``batches`` (inputs x) to the dense layer's outputs at
    output channels ``keep``; returns the relative squared error before and after on those rows."""
    layer, target_layer = small.get_submodule(name), dense.get_submodule(name)
    bias = layer.bias is not None
    xtx = xty = None
    yty = 0.0
    for x in batches:
        rows = design_rows(layer, capture(small, layer, x, "input"))
        y = target_rows(layer, capture(dense, target_layer, x, "output"), keep)
        xtx = rows.t() @ rows if xtx is None else xtx + rows.t() @ rows
        xty = rows.t() @ y if xty is None else xty + rows.t() @ y
        yty += float((y * y).sum())
    old = torch.cat([layer.weight.detach().double().reshape(layer.weight.shape[0], -1).t(),
                     *([layer.bias.detach().double().view(1, -1)] if bias else [])])
    new = solve_ridge(xtx, xty, ridge, bias)

    def error(w):                       # ||XW - Y||² / ||Y||² from the accumulated products
        return (float((w * (xtx @ w)).sum()) - 2 * float((w * xty).sum()) + yty) / max(yty, 1e-300)

    set_weights(layer, new)
    return {"error_before": error(old), "error_after": error(new)}


@torch.no_grad()
def reconstruct(small: nn.Module, dense: nn.Module, groups: GroupSet, masks: list[torch.Tensor],
                batches: list[torch.Tensor], ridge: float = RIDGE) -> dict:
    """Re-fit, in forward order, every Conv2d/Linear of ``small`` (cut from ``dense`` by ``masks``
    over ``groups``) that reads removed channels, on the inputs ``batches`` (each (N, ...)).

    Returns the record: consumers re-fit and skipped (with why), their mean relative squared
    output error before and after, the calibration rows, seconds.
    """
    start = time.perf_counter()
    modes = [(m, m.training) for m in (*small.modules(), *dense.modules())]
    small.eval()
    dense.eval()
    try:
        names = consumers(groups, masks)
        modules = dict(small.named_modules())
        skipped = {n: why for n in names if (why := why_skipped(modules[n])) is not None}
        order, unseen = forward_order(small, [n for n in names if n not in skipped], batches[0])
        skipped.update(unseen)
        errors = {}
        for name in order:
            extent = dense.get_submodule(name).weight.shape[0]
            errors[name] = refit_layer(small, dense, name, kept_outputs(groups, masks, name, extent), batches, ridge)
    finally:
        for module, mode in modes:
            module.training = mode
    mean = lambda key: sum(e[key] for e in errors.values()) / len(errors) if errors else None  # noqa: E731
    return {"refit": len(order), "skipped": len(skipped),
            "skipped_why": [f"{n}: {why}" for n, why in skipped.items()], "batches": len(batches),
            "images": sum(int(x.shape[0]) for x in batches), "ridge": ridge,
            "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after"),
            "seconds": time.perf_counter() - start}
