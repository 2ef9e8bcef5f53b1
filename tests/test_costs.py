"""CostModel: MAC counts of single layers against their textbook formulas, residual adds,
unknown modules, masked and shrunk counts."""

import pytest
import torch
from torch import nn

from prunekit.costs import CostModel
from prunekit.errors import PrunekitError


def conv_macs(c_in, c_out, k, h_out, w_out, groups=1):
    return c_out * (c_in // groups) * k * k * h_out * w_out


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (2, 1, 1, 1), (1, 0, 2, 1), (2, 3, 1, 4), (1, 1, 1, 8)])
def test_conv2d_macs_match_formula(stride, padding, dilation, groups):
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
    x = torch.zeros(2, 8, 17, 13)
    h_out, w_out = conv(x).shape[2:]
    costs = CostModel(conv, x)
    assert costs.macs == conv_macs(8, 16, 3, h_out, w_out, groups)
    assert costs.layer("").macs_per_weight == h_out * w_out


def test_conv1d_and_linear_tokens():
    model = nn.Sequential(nn.Conv1d(4, 6, 5, stride=2), nn.Flatten(), nn.Linear(6 * 8, 3))
    costs = CostModel(model, torch.zeros(3, 4, 20))
    assert costs.layer("0").macs == 6 * 4 * 5 * 8
    assert costs.layer("2").macs == 48 * 3
    seq = nn.Linear(10, 7)  # a sequence of 5 tokens: each weight is used once per token
    assert CostModel(seq, torch.zeros(2, 5, 10)).macs == 5 * 70


def test_other_ops_batchnorm_pool_and_residual_add():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.bn(self.conv(x)) + x)

    costs = CostModel(Block(), torch.zeros(1, 4, 8, 8))
    assert costs.macs == 4 * 4 * 9 * 64
    assert costs.layer("bn").other_ops == 4 * 64
    assert costs.layer("pool").other_ops == 4 * 16 * 4
    assert costs.layer("(add)").other_ops == 4 * 64
    assert costs.params == 4 * 4 * 9 + 8


def test_unknown_leaf_module_is_reported_not_skipped():
    class Mystery(nn.Module):
        def forward(self, x):
            return x * 2

    costs = CostModel(nn.Sequential(nn.Linear(3, 3), Mystery()), torch.zeros(1, 3))
    assert costs.unknown == ["1"]
    assert "unknown" in costs.layer("1").kind


def test_zero_macs_attribute_marks_free_modules():
    class Shortcut(nn.Module):
        zero_macs = True

        def forward(self, x):
            return x

    assert CostModel(nn.Sequential(nn.Linear(3, 3), Shortcut()), torch.zeros(1, 3)).unknown == []


def test_shared_module_counted_once_for_params_twice_for_macs():
    lin = nn.Linear(4, 4, bias=False)
    costs = CostModel(nn.Sequential(lin, nn.ReLU(), lin), torch.zeros(1, 4))
    assert costs.params == 16
    assert costs.macs == 32


def test_count_masked_and_shrunk_models():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 25, 10))
    x = torch.zeros(1, 2, 5, 5)
    costs = CostModel(model, x)
    dense = costs.macs
    with torch.no_grad():
        model[0].weight[:2] = 0          # half the conv weights
        model[3].weight[:, :50] = 0      # half the linear weights
    counts = costs.count(model)
    assert counts.macs == dense // 2
    assert counts.params == 36 + 500 + 10
    shrunk = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                           nn.Linear(2 * 25, 10))
    shrunk_counts = costs.count(shrunk)
    assert shrunk_counts.macs == 2 * 2 * 9 * 25 + 50 * 10
    assert shrunk_counts.dense_macs == dense
    assert shrunk_counts.flops_kept == pytest.approx(shrunk_counts.macs / dense)


def test_bad_example_input_is_a_clear_error():
    with pytest.raises(PrunekitError, match="example input"):
        CostModel(nn.Linear(3, 3), torch.zeros(1, 5))
