"""Probe (session 30, issue 12): re-fit the kept weights layer by layer to the dense layer's
outputs with the per-channel mean removed, since BatchNorm recalibration restores every channel's
mean and scale anyway.

    python benchmarks/probe_centred_refit.py RUN_FOLDER [RUN_FOLDER ...] --batches 8 --ridge 1e-3

RUN_FOLDER is a `prunekit prune --model resnet20-b ...` run (any method; its zeros are the mask).
For every Conv2d / Linear in forward order, on ``--batches`` augmented training batches of 128:
X (rows, D) the layer's inputs in the pruned model (its earlier layers already re-fit, BatchNorm
recalibrated on the same batches first), Y (rows, C_out) the dense layer's outputs (dense model in
eval mode). A conv followed by BatchNorm is invariant to each output channel's scale and shift once
the statistics are re-estimated, so each output channel c is fit by the centred least squares

    w_c[S_c] = (Cov(X)[S_c, S_c] + λI)⁻¹ Cov(X, Y)[S_c, c],   λ = ridge · mean diag Cov(X),

S_c its kept inputs: the direction of largest correlation with the dense output, what survives the
recalibration. ``--uncentred`` fits the raw second moments instead (a SparseGPT-style re-fit
against the dense outputs, mean included). The final layer (no BatchNorm after it) is fit with its
bias, uncentred. BatchNorm is recalibrated after (20 augmented batches of 128, as the pipeline).
Printed per folder: the model as saved, recalibrated again (the control), and re-fit: training
accuracy and loss (5,085 images), the 1,017 exact test images and the 10,000 JPEG test images.
One thread. Not a prunekit method: it measures whether one is worth building.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from common import DEFAULT_DATA, unpacked_jpeg_test


def layer_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(rows, D) float64 inputs of ``module`` as its weight (C_out, D) reads them."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    return inputs.reshape(-1, inputs.shape[-1]).double()


def output_rows(outputs: torch.Tensor) -> torch.Tensor:
    """(rows, C_out) float64, the same row order as :func:`layer_rows`."""
    if outputs.dim() == 4:
        return outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1]).double()
    return outputs.reshape(-1, outputs.shape[-1]).double()


def capture(model: nn.Module, name: str, x: torch.Tensor, want: str) -> torch.Tensor:
    """The input (want="in") or output ("out") of ``model``'s module ``name`` on ``x``."""
    module, seen = dict(model.named_modules())[name], {}

    def hook(_, args, out):
        seen["in"], seen["out"] = args[0].detach(), out.detach()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[want]


def refit(pruned: nn.Module, dense: nn.Module, batches: list[torch.Tensor], ridge: float, centred: bool,
          recalibrate) -> nn.Module:
    """A copy of ``pruned`` with every Conv2d / Linear re-fit in forward order (see the module doc)."""
    model = copy.deepcopy(pruned)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = layers[-1][0]
    for name, module in layers:
        recalibrate(model, batches)
        model.eval()
        xx = xy = sx = sy = None
        count = 0
        for x in batches:
            rows = layer_rows(module, capture(model, name, x, "in"))
            target = output_rows(capture(dense, name, x, "out"))
            if name == last and module.bias is not None:
                rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
            if xx is None:
                xx, xy = rows.T @ rows, rows.T @ target
                sx, sy = rows.sum(0), target.sum(0)
            else:
                xx += rows.T @ rows
                xy += rows.T @ target
                sx += rows.sum(0)
                sy += target.sum(0)
            count += len(rows)
        xx, xy = xx / count, xy / count
        if centred and name != last:
            mx, my = sx / count, sy / count
            xx, xy = xx - torch.outer(mx, mx), xy - torch.outer(mx, my)
        lam = ridge * float(xx.diagonal().mean())
        weight = module.weight.detach().reshape(module.weight.shape[0], -1)
        has_bias = name == last and module.bias is not None
        new_weight, new_bias = weight.clone(), None if not has_bias else module.bias.detach().clone()
        for c in range(weight.shape[0]):
            keep = torch.nonzero(weight[c] != 0).flatten()
            if has_bias:
                keep = torch.cat([keep, torch.tensor([xx.shape[0] - 1])])
            if keep.numel() == 0:
                continue
            system = xx[keep][:, keep] + lam * torch.eye(len(keep), dtype=xx.dtype)
            if has_bias:
                system[-1, -1] -= lam          # the bias is not regularised
            solution = torch.linalg.solve(system, xy[keep, c])
            if has_bias:
                new_bias[c] = solution[-1].float()
                solution = solution[:-1]
                keep = keep[:-1]
            new_weight[c].zero_()
            new_weight[c, keep] = solution.float()
        with torch.no_grad():
            module.weight.copy_(new_weight.reshape(module.weight.shape))
            if has_bias:
                module.bias.copy_(new_bias)
    return model


def accuracy_and_loss(model: nn.Module, dataset, normalization) -> tuple[float, float]:
    from prunekit.data.loaders import make_loader
    right = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in make_loader(dataset, normalization, batch_size=500):
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            right += int((out.argmax(1) == y).sum())
            total += len(y)
    return round(100 * right / total, 2), round(loss / total, 4)


def main() -> None:
    from prunekit.data.loaders import make_loader
    from prunekit.loading import load_data, load_model
    from prunekit.train import recalibrate_batchnorm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batches", type=int, default=8, help="augmented training batches of 128 for the fit")
    parser.add_argument("--ridge", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--uncentred", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = load_data("cifar10", f"{args.data}/cifar10", "train")
    dense_loaded = load_model("resnet20-b", f"{args.data}/checkpoints/resnet20_cifar10.pth.tar")
    dense, norm = dense_loaded.model.eval(), dense_loaded.normalization
    fit_batches = [x for x, _ in make_loader(train, norm, batch_size=128, shuffle=True, augment=True, seed=11)]
    fit_batches = fit_batches[:args.batches]

    def recalibrate(model, batches):
        recalibrate_batchnorm(model, [(x, None) for x in batches], len(batches))

    def final_recalibration(model):
        recalibrate_batchnorm(model, make_loader(train, norm, batch_size=128, shuffle=True, augment=True, seed=1), 20)
        model.eval()

    sets = {"train": train, "test": load_data("cifar10", f"{args.data}/cifar10", "test"),
            "test_jpeg": load_data("imagefolder", unpacked_jpeg_test(args.data), "test")}
    for folder in args.folders:
        pruned = load_model("resnet20-b", f"{folder}/model.safetensors").model.eval()
        rows = {"as saved": pruned}
        control = copy.deepcopy(pruned)
        final_recalibration(control)
        rows["recalibrated again"] = control
        for ridge in args.ridge:
            start = time.time()
            fitted = refit(pruned, dense, fit_batches, ridge, not args.uncentred, recalibrate)
            final_recalibration(fitted)
            rows[f"re-fit ridge {ridge} ({time.time() - start:.0f} s)"] = fitted
        for label, model in rows.items():
            print(json.dumps({"folder": folder, "row": label, "centred": not args.uncentred,
                              **{split: accuracy_and_loss(model, ds, norm) for split, ds in sets.items()}}), flush=True)


if __name__ == "__main__":
    main()
