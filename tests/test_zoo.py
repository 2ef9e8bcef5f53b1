"""Zoo architectures: every model builds and runs, names/specs are right, sizes match the papers."""

import pytest
import torch
from torch import nn

from prunekit import zoo
from prunekit.errors import PrunekitError
from prunekit.zoo.cifar_resnet import ZeroPadShortcut


def conv_linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def build_on_meta(name: str) -> nn.Module:
    """The model without memory or initialization cost: enough for shapes and counts."""
    with torch.device("meta"):
        return zoo.build(name)


def conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convs and linears for one example (hook-based, independent)."""
    total = 0

    def count(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        per_output = module.weight[0].numel()  # in/groups * kernel for a conv, in_features for linear
        total += out[0].numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_every_model_builds_and_runs(name):
    spec = zoo.spec(name)
    assert spec.name == name
    assert len(spec.mean) == len(spec.std) == spec.input_shape[0]
    assert spec.dataset in {"mnist", "fashion-mnist", "cifar10", "imagenet"}
    batch, shape = 3, spec.input_shape
    if spec.dataset == "imagenet":  # keep it cheap: the global pool takes any size
        batch, shape = 1, (3, 64, 64)
    model = zoo.build(name)
    assert model.training
    with torch.no_grad():
        out = model.eval()(torch.randn(batch, *shape))
    assert out.shape == (batch, spec.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlpnet", "resnet20", "resnet56", "resnet20-b", "mobilenetv1-cifar"])
def test_one_channel_28x28_inputs_and_other_class_counts(name):
    model = zoo.build(name, num_classes=7, in_channels=1)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_specs_carry_the_reference_normalizations():
    assert zoo.spec("mlpnet").mean == (0.1307,) and zoo.spec("mlpnet").std == (0.3081,)
    assert zoo.spec("resnet20-b").mean == (0.5, 0.5, 0.5) and zoo.spec("resnet20-b").std == (0.5, 0.5, 0.5)
    for name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet50", "mobilenetv1"):
        assert zoo.spec(name).mean == (0.485, 0.456, 0.406)
        assert zoo.spec(name).std == (0.229, 0.224, 0.225)
    assert zoo.spec("resnet50").input_shape == (3, 224, 224) and zoo.spec("resnet50").num_classes == 1000


def test_unknown_name_and_bad_sizes_raise_prunekit_error():
    with pytest.raises(PrunekitError, match="unknown model 'resnet21'.*did you mean"):
        zoo.build("resnet21")
    with pytest.raises(PrunekitError, match="unknown model"):
        zoo.spec("alexnet")
    with pytest.raises(PrunekitError, match="num_classes must be a positive integer"):
        zoo.build("resnet20", num_classes=0)
    with pytest.raises(PrunekitError, match="in_channels must be a positive integer"):
        zoo.build("resnet20", in_channels=1.5)


@pytest.mark.parametrize(
    "name,total_params,conv_linear",
    [
        ("mlpnet", 32_360, 32_360),
        ("resnet20", 269_722, 268_336),
        ("resnet32", 464_154, 461_872),
        ("resnet56", 853_018, 848_944),
        # option B adds two 1x1 projection convs (16*32 + 32*64 = 2,560 weights) to ResNet20's 268,336.
        ("resnet20-b", 272_474, 270_896),
        ("mobilenetv1", 4_231_976, 4_209_088),
        ("resnet50", 25_557_032, 25_502_912),
    ],
)
def test_parameter_counts(name, total_params, conv_linear):
    model = build_on_meta(name)
    assert sum(p.numel() for p in model.parameters()) == total_params
    assert conv_linear_weights(model) == conv_linear


@pytest.mark.parametrize(
    "name,macs",
    [
        ("resnet20", 40_551_040),  # the "40.6M" usually quoted for ResNet20
        ("resnet20-b", 40_813_184),  # + 262,144 MACs of the two 1x1 projection convs
        ("mobilenetv1", 568_740_352),
        ("resnet50", 4_089_184_256),
    ],
)
def test_conv_linear_macs(name, macs):
    x = torch.zeros(1, *zoo.spec(name).input_shape, device="meta")
    assert conv_linear_macs(build_on_meta(name), x) == macs


def test_mlpnet_layout():
    model = zoo.build("mlpnet")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert list(linears) == ["fc1", "fc2", "fc3"]
    assert [tuple(m.weight.shape) for m in linears.values()] == [(40, 784), (20, 40), (10, 20)]
    assert all(m.bias is None for m in linears.values())


def test_option_a_and_option_b_layouts():
    a = zoo.build("resnet20")
    shortcuts = [n for n, m in a.named_modules() if isinstance(m, ZeroPadShortcut)]
    assert shortcuts == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert "linear.weight" in a.state_dict() and not any("downsample" in k for k in a.state_dict())
    b = zoo.build("resnet20-b")
    assert "fc.weight" in b.state_dict() and "layer2.0.downsample.1.running_var" in b.state_dict()
    assert not any(isinstance(m, ZeroPadShortcut) for m in b.modules())


def test_zero_pad_shortcut_subsamples_and_pads_evenly():
    shortcut = ZeroPadShortcut(4, 8, stride=2)
    assert ZeroPadShortcut.zero_macs is True
    assert list(shortcut.parameters()) == []
    x = torch.randn(2, 4, 5, 5)
    y = shortcut(x)
    assert y.shape == (2, 8, 3, 3)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert (y[:, :2] == 0).all() and (y[:, 6:] == 0).all()
