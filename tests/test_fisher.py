"""Gradient rows against plain autograd, one sample or one mini-batch at a time."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.fisher import collect_gradients
from prunekit.params import ParamSpace
from closeness import assert_close_to_scale


def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 16, 4))
    model[1].running_mean.uniform_(-0.5, 0.5)   # nontrivial eval-mode statistics
    return model


def data(n):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + 5], y[i:i + 5]) for i in range(0, n, 5)]   # batches of 5, re-cut inside


def autograd_row(model, space, x, y):
    model.eval()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([w.grad.reshape(-1) for w in space.weights()])


def test_per_sample_rows_match_autograd():
    model = tiny_model()
    space = ParamSpace(model)
    rows = collect_gradients(model, space, data(12), n=12, chunk=4, progress=False)
    x = torch.cat([b[0] for b in data(12)])
    y = torch.cat([b[1] for b in data(12)])
    expected = torch.stack([autograd_row(model, space, x[i:i + 1], y[i:i + 1]) for i in range(12)])
    assert rows.shape == (12, space.numel)
    assert_close_to_scale(rows, expected, rel=1e-5)


def test_mini_batch_rows_are_mean_gradients():
    model = tiny_model()
    space = ParamSpace(model)
    rows = collect_gradients(model, space, data(20), n=3, batch=6, progress=False)
    x = torch.cat([b[0] for b in data(20)])
    y = torch.cat([b[1] for b in data(20)])
    for i in range(3):
        assert_close_to_scale(rows[i], autograd_row(model, space, x[6 * i:6 * i + 6], y[6 * i:6 * i + 6]),
                              rel=1e-5)


def test_too_little_data_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(PrunekitError, match="fisher-samples"):
        collect_gradients(model, ParamSpace(model), data(10), n=4, batch=3, progress=False)
