"""Every unstructured method on a gallery of model shapes (MLP, branchy CNN, ViT with
nn.MultiheadAttention, nn.TransformerEncoderLayer encoder, LSTM): the nonzeros, sparsity and
MACs prunekit reports equal an independent hook-based count (``gallery.independent_count``,
no code shared with ``prunekit.costs``), thop's dense count where thop covers the layers, and
the budget.

The ViT and the CNN are trained briefly (one epoch over 512 images of the bundled MNIST
sample) first, so that the gradient methods see weights that moved off their initialisation;
the others keep random weights (counting does not depend on them).
"""

from functools import lru_cache
from pathlib import Path

import pytest
import torch

import prunekit
from gallery import GALLERY, independent_count
from prunekit.costs import CostModel
from prunekit.data import load_dataset
from prunekit.train import train_epochs

MNIST = Path(__file__).resolve().parent.parent / "src" / "prunekit" / "assets" / "mnist"
TRAINED = ("vit", "cnn")

METHODS = {   # method -> budget
    "magnitude": dict(sparsity=0.6, flops=0.4),
    "magnitude-uniform": dict(sparsity=0.6, flops=0.5),
    "magnitude-flops": dict(sparsity=0.5, flops=0.4),
    "falcon": dict(flops=0.4),
    "chita": dict(sparsity=0.8),
    "woodfisher": dict(sparsity=0.8),
}


@lru_cache(maxsize=1)
def mnist():
    data = load_dataset("mnist", str(MNIST), "train")
    x = (data.images.float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    return x.reshape(-1, 1, 28, 28), data.labels.long()


@lru_cache(maxsize=None)
def trained(name: str):
    """(state dict, training loss before, after) of gallery model ``name``."""
    torch.manual_seed(0)
    model = GALLERY[name]()
    x, y = mnist()
    x, y = x[:512], y[:512]
    loss = lambda: float(torch.nn.functional.cross_entropy(model.train()(x), y).detach())  # noqa: E731
    before = after = loss()
    if name in TRAINED:
        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
        train_epochs(model, batches, epochs=1, lr=0.05, progress=False)
        after = loss()
    return {k: v.clone() for k, v in model.state_dict().items()}, before, after


def fresh(name: str):
    model = GALLERY[name]()
    model.load_state_dict(trained(name)[0])
    return model


def test_brief_training_lowers_the_loss():
    for name in TRAINED:
        _, before, after = trained(name)
        assert after < 0.9 * before, name


@pytest.mark.parametrize("name", list(GALLERY))
def test_dense_count_matches_independent_and_thop(name):
    model = fresh(name)
    x = mnist()[0][:2]
    costs = CostModel(model, x)
    ours = independent_count(model, x)
    assert costs.macs == ours["macs"]
    assert costs.params == sum(p.numel() for p in model.parameters())
    if name in ("mlp", "cnn"):             # thop's Conv/Linear rules cover every MAC of these two
        thop = pytest.importorskip("thop")
        _ops, params, info = thop.profile(model.eval(), inputs=(x[:1],), verbose=False, ret_layer_info=True)
        assert costs.macs == _thop_conv_linear_ops(model, info)
        assert costs.params == int(params)


def _thop_conv_linear_ops(model, info, prefix=""):
    """thop's ops summed over the Conv/Linear modules (it also counts BatchNorm and pooling,
    by rules of its own, which are not MACs in our convention)."""
    modules = dict(model.named_modules())
    total = 0
    for key, (ops, _params, children) in info.items():
        full = prefix + key
        if children:
            total += _thop_conv_linear_ops(model, children, full + ".")
        elif isinstance(modules[full], (torch.nn.Conv2d, torch.nn.Linear)):
            total += int(ops)
    return total


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(GALLERY))
def test_reported_counts_equal_the_independent_count(name, method):
    model = fresh(name)
    x, y = mnist()
    dense = independent_count(model, x[:2])
    budget = dict(METHODS[method])
    options = {} if method.startswith("magnitude") else {"fisher_samples": 32}   # magnitude takes none
    result = prunekit.prune(model, (x[:256], y[:256]), method=method, example_input=x[:2], **options, **budget)
    after = independent_count(model, x[:2])
    assert result.macs == after["macs"]
    assert result.dense_macs == dense["macs"]
    assert result.nonzeros == after["nonzeros"]
    assert result.sparsity == pytest.approx(1 - after["nonzeros"] / dense["weights"], abs=1e-12)
    assert result.flops_kept == pytest.approx(after["macs"] / dense["macs"], rel=1e-12)
    if "flops" in budget:
        assert after["macs"] <= budget["flops"] * dense["macs"]
    if "sparsity" in budget:
        assert 1 - after["nonzeros"] / dense["weights"] >= budget["sparsity"] - 1e-12
