"""Probe (session 29, issue 12): one damped Gauss-Newton step on the kept weights of a pruned ResNet-20-B.

    python benchmarks/probe_gauss_newton_step.py RUN_FOLDER --rows 1000 --alphas 0.05 0.1 0.25 0.5

RUN_FOLDER is a `prunekit prune --model resnet20-b ...` run. The step is w + α·δ on the kept
weights, δ = −(XᵀX/n + λI)⁻¹ g, with X the (n, kept) per-sample gradients of the cross-entropy at
the pruned weights (BatchNorm frozen at its recalibrated statistics), g their mean and λ = 0.1 ×
the mean diagonal of XᵀX/n (solved through the n x n system, Woodbury); BatchNorm is recalibrated
after the step (20 augmented batches of 128). Printed for α = 0 and each α: training accuracy and
loss (5,085 images), the 1,017 exact test images and the 10,000 JPEG test images. One thread.
Not a prunekit method: it measured whether one is worth building (docs/benchmarks.md, session 29).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from common import DEFAULT_DATA, unpacked_jpeg_test


def gradient_rows(model: nn.Module, masks: dict, batches, n: int) -> torch.Tensor:
    """(n, kept) float64 per-sample gradients of the cross-entropy on the kept weights."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    weights = {k: params[k].detach() for k in masks}

    def loss(w, x, y):
        out = functional_call(model, ({**params, **w}, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    rows, seen = [], 0
    for x, y in batches:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(weights, x, y)
        rows.append(torch.cat([g[k][:, masks[k]] for k in masks], 1))
        seen += len(x)
        if seen >= n:
            break
    return torch.cat(rows)[:n].double()


def damped_newton_step(rows: torch.Tensor, relative_ridge: float = 0.1) -> torch.Tensor:
    """−(XᵀX/n + λI)⁻¹ g for X = ``rows`` (n, p), g its mean row: (g − Xᵀ(nλI + XXᵀ)⁻¹Xg)/λ, negated."""
    n = rows.shape[0]
    mean = rows.mean(0)
    ridge = relative_ridge * float(rows.pow(2).sum(0).mean()) / n
    system = rows @ rows.T + n * ridge * torch.eye(n, dtype=rows.dtype)
    return -(mean - rows.T @ torch.linalg.solve(system, rows @ mean)) / ridge


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
    return 100 * right / total, loss / total


def main() -> None:
    from prunekit.data.loaders import make_loader
    from prunekit.loading import load_data, load_model
    from prunekit.train import recalibrate_batchnorm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loaded = load_model("resnet20-b", f"{args.folder}/model.safetensors")
    model, norm = loaded.model.eval(), loaded.normalization
    masks = {k: v.detach() != 0 for k, v in model.named_parameters() if v.dim() > 1}
    train = load_data("cifar10", f"{args.data}/cifar10", "train")
    step = damped_newton_step(gradient_rows(model, masks, make_loader(train, norm, batch_size=50, shuffle=True, seed=7),
                                            args.rows))
    sets = {"train": train, "test": load_data("cifar10", f"{args.data}/cifar10", "test"),
            "test_jpeg": load_data("imagefolder", unpacked_jpeg_test(args.data), "test")}
    for alpha in [0.0, *args.alphas]:
        stepped = copy.deepcopy(model)
        with torch.no_grad():
            params, start = dict(stepped.named_parameters()), 0
            for name, mask in masks.items():
                count = int(mask.sum())
                params[name][mask] += (alpha * step[start:start + count]).float()
                start += count
        if alpha:
            recalibrate_batchnorm(stepped, make_loader(train, norm, batch_size=128, shuffle=True, augment=True, seed=1), 20)
        stepped.eval()
        print(json.dumps({"alpha": alpha, **{split: accuracy_and_loss(stepped, ds, norm) for split, ds in sets.items()}}),
              flush=True)


if __name__ == "__main__":
    main()
