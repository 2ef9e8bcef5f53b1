"""Our CostModel against an independent counter (thop) on every zoo model.

thop counts BatchNorm as 2 ops per element where we count 1 MAC (and it skips residual adds),
so the comparison is on what both define the same way: the MACs of Conv/Linear layers and of
nn.MultiheadAttention (projections and the two attention products; thop also adds the softmax,
which we count in neither), summed over thop's per-layer report, and the parameter count.
"""

import pytest
import torch
from torch import nn

from prunekit import zoo
from prunekit.costs import CostModel

thop = pytest.importorskip("thop")
from thop.vision.calc_func import calculate_softmax  # noqa: E402


def thop_weight_layer_macs(model: nn.Module, layer_info: dict, prefix: str = "") -> int:
    modules = dict(model.named_modules())
    total = 0
    for name, (ops, _params, children) in layer_info.items():
        full = prefix + name
        module = modules[full]
        if isinstance(module, nn.MultiheadAttention):
            total += ops - int(module.softmax_ops)      # recorded by the hook below
        elif children:
            total += thop_weight_layer_macs(model, children, full + ".")
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            total += ops
    return int(total)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_weight_layer_macs_and_params_match_thop(name):
    model = zoo.build(name).eval()
    x = torch.zeros(1, *zoo.spec(name).input_shape)
    costs = CostModel(model, x)
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):   # the softmax ops thop adds to its MHA count
            m.register_forward_hook(lambda m, inputs, out: setattr(
                m, "softmax_ops", calculate_softmax(out[0].shape[0] * m.num_heads * out[0].shape[1],
                                                    inputs[1].shape[1])))
    _ops, params, layer_info = thop.profile(model, inputs=(x,), verbose=False, ret_layer_info=True)
    assert costs.macs == thop_weight_layer_macs(model, layer_info)          # exactly
    assert costs.params == int(params)
    assert costs.unknown == []


@pytest.mark.parametrize("name,macs,params", [
    ("mobilenetv1", 569e6, 4.2e6), ("resnet50", 4.09e9, 25.5e6)])
def test_published_totals(name, macs, params):
    costs = CostModel(zoo.build(name), torch.zeros(1, *zoo.spec(name).input_shape))
    assert costs.macs == pytest.approx(macs, rel=0.005)
    assert costs.params == pytest.approx(params, rel=0.01)
