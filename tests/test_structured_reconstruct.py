"""Least-squares reconstruction after a channel cut (structured/reconstruct.py, over prunekit.refit):
exact recovery when the kept channels span the removed ones, smaller layer errors and outputs
closer to the dense model's in general, the option through Python and the command line, and its
refusals."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import zoo
from prunekit import refit as refit_module
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.structured.groups import find_groups
from prunekit.structured.reconstruct import reconstruct
from prunekit.structured.shrink import shrink
from prunekit.train import recalibrate_batchnorm

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads

ASSETS = Path(prunekit.__file__).parent / "assets"


class Twin(nn.Module):
    """conv1 (3 -> 8, its channels 4-7 copies of 0-3), ReLU, conv2 (8 -> 5, bias), pool, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1, bias=True)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            self.conv1.weight[4:] = self.conv1.weight[:4]

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.head(h.mean(dim=(2, 3)))


def _layer_io(model, name, xs, what):
    """``name``'s inputs or outputs over ``xs``, concatenated on the batch axis."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda _m, args, out: seen.append((args[0] if what == "input" else out).detach()))
    with torch.no_grad():
        for x in xs:
            model(x)
    handle.remove()
    return torch.cat(seen)


def _masks_closing(groups, name, closed):
    """Keep-masks (group order) that close channels ``closed`` of the group rooted at ``name``."""
    masks = []
    for g in groups:
        mask = torch.ones(g.size, dtype=torch.bool)
        if g.root == name:
            mask[closed] = False
        masks.append(mask)
    return masks


def test_kept_channels_spanning_the_removed_ones_give_back_the_dense_outputs(monkeypatch):
    monkeypatch.setattr(refit_module, "TOLERANCE", 1e-10)      # exact solves: conjugate gradients to convergence
    torch.manual_seed(0)
    dense = Twin().eval()
    x = torch.randn(1, 3, 6, 6)
    groups = find_groups(dense, x)
    masks = _masks_closing(groups, "conv1", [4, 5, 6, 7])
    small = shrink(dense, groups, masks, x)
    xs = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    target = _layer_io(dense, "conv2", xs, "output")
    scale = float(target.abs().max())
    before = float((_layer_io(small, "conv2", xs, "output") - target).abs().max())
    assert before > 0.1 * scale                   # the cut alone loses half of conv2's input
    record = reconstruct(small, dense, groups, masks, xs, ridge=1e-10)
    assert record["layers"] >= 1 and record["skipped"] <= 2 and record["images"] == 12   # conv1, head: fixed points
    after = float((_layer_io(small, "conv2", xs, "output") - target).abs().max())
    assert after < 1e-4 * scale
    assert torch.allclose(small.conv2.weight, dense.conv2.weight[:, :4] + dense.conv2.weight[:, 4:], atol=1e-4)
    assert torch.allclose(small.conv2.bias, dense.conv2.bias, atol=1e-4)
    # and on images it never saw: the fit is the exact map, not the calibration rows
    with torch.no_grad():
        fresh = torch.randn(2, 3, 6, 6)
        assert torch.allclose(small(fresh), dense(fresh), atol=1e-4 * float(dense(fresh).abs().max()))


def test_reconstruction_brings_the_cut_models_outputs_closer_to_the_dense_models():
    """ResNet-20-B with random channel masks: the layers' errors fall, and the cut model's logits,
    BatchNorm re-estimated on the calibration batches, come closer to the dense logits than the
    uncorrected cut's; the modes are restored."""
    torch.manual_seed(1)
    dense = zoo.build("resnet20-b").eval()
    for m in dense.modules():               # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 8, 8)
    groups = find_groups(dense, x)
    gen = torch.Generator().manual_seed(0)
    masks = []
    for g in groups:
        mask = torch.rand(g.size, generator=gen) < 0.5
        mask[0] = True
        masks.append(mask)
    xs = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    cut = shrink(dense, groups, masks, x)
    refit = shrink(dense, groups, masks, x)
    record = reconstruct(refit, dense, groups, masks, xs)
    assert record["layers"] >= 5 and record["centred"] >= 5 and record["mean_error_after"] < record["mean_error_before"]
    assert all(m.training is False for m in refit.modules())       # modes restored (eval here)
    fresh = [torch.randn(16, 3, 8, 8) for _ in range(2)]

    def distance(model):
        recalibrate_batchnorm(model, [(x, None) for x in xs])
        model.eval()
        with torch.no_grad():
            return sum(float((model(f) - dense(f)).square().sum()) for f in fresh)
    assert distance(refit) < distance(cut)


def test_the_option_reaches_the_pipeline_and_the_record():
    torch.manual_seed(0)
    model = zoo.build("resnet20-b").eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    plain = prunekit.prune(model, lambda: data, method="autobot", flops=0.5, example_input=x, gate_batches=3,
                           recalibrate_bn=False)
    refit = prunekit.prune(model, lambda: data, method="autobot", flops=0.5, example_input=x, gate_batches=3,
                           recalibrate_bn=False, reconstruct_batches=2, reconstruct_ridge=0.01)
    assert "reconstruct" not in plain.record
    rec = refit.record["reconstruct"]["0.5"]
    assert rec["layers"] >= 1 and rec["batches"] == 2 and rec["images"] == 16 and rec["seconds"] >= 0
    assert rec["ridge"] == 0.01
    assert rec["mean_error_after"] < rec["mean_error_before"]
    a, b = plain.model.state_dict(), refit.model.state_dict()
    assert a.keys() == b.keys() and plain.record["kept_channels"] == refit.record["kept_channels"]   # same cut
    changed = {k.rsplit(".", 1)[0] for k in a if not torch.equal(a[k], b[k])}
    assert len(changed) == rec["layers"]          # the re-fit layers, and nothing else


def test_the_flag_reaches_the_record(capsys):
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--method", "autobot", "--flops", "0.5",
            "--gate-batches", "3", "--reconstruct-batches", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rec = out["reconstruct"][f"{out['flops']:g}"]
    cut = sum(k < n for k, n in zip(out["kept_channels"], out["group_sizes"]))   # MLPNet: fc1's and fc2's outputs
    # every layer reading cut channels is re-fit; of MLPNet's three, the others may be fixed points
    assert cut >= 1 and rec["layers"] >= cut and rec["layers"] + rec["skipped"] == 3 and rec["batches"] == 2
    from prunekit.commands.prune import prune_lines
    shown = [line for line in prune_lines(out) if "re-fit" in line]
    assert shown and f"{rec['layers']} layers (0 centred for BatchNorm, {rec['skipped']} skipped)" in shown[0]


@pytest.mark.parametrize("value, message", [(-1, "reconstruct_batches must be at least 0"),
                                            (1.5, "reconstruct_batches must be a whole number"),
                                            ({"reconstruct_ridge": 0.0}, "reconstruct_ridge must be above 0")])
def test_bad_values_are_refused_in_python(value, message):
    model = zoo.build("resnet20-b").eval()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(PrunekitError, match=message):
        options = value if isinstance(value, dict) else {"reconstruct_batches": value}
        prunekit.prune(model, lambda: data, method="autobot", flops=0.5, example_input=torch.randn(1, 3, 8, 8),
                       **options)


@pytest.mark.parametrize("flag, value, message", [
    ("--reconstruct-batches", "-2", "--reconstruct-batches must be at least 0"),
    ("--reconstruct-ridge", "-0.5", "--reconstruct-ridge must be above 0"),
    ("--reconstruct-batches", "two", "invalid int value")])
def test_bad_values_are_refused_on_the_command_line(capsys, flag, value, message):
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--method", "autobot", "--flops", "0.5", flag, value]
    if value == "two":              # argparse refuses a non-integer itself (its usage line, exit 2)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_depthwise_layers_of_a_cut_mobilenet_are_re_fit_too():
    """A small MobileNetV1 (its blocks) cut by random channel masks: the depthwise convolutions (one
    group per kept channel) are re-fit like the others, and the layers' errors fall."""
    from prunekit.zoo.mobilenet import ConvBNReLU, DepthwiseSeparable
    torch.manual_seed(0)
    dense = nn.Sequential(ConvBNReLU(3, 16, 3, 1), DepthwiseSeparable(16, 24, 2), DepthwiseSeparable(24, 24, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    groups = find_groups(dense, x)
    gen = torch.Generator().manual_seed(0)
    masks = []
    for g in groups:
        mask = torch.rand(g.size, generator=gen) < 0.6
        mask[0] = True
        masks.append(mask)
    small = shrink(dense, groups, masks, x)
    depthwise = [n for n, m in small.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert depthwise and any(m.groups < dense.get_submodule(n).groups for n, m in small.named_modules() if n in depthwise)
    before = {n: small.get_submodule(n).weight.detach().clone() for n in depthwise}
    record = reconstruct(small, dense, groups, masks, [torch.randn(8, 3, 16, 16) for _ in range(2)])
    # at most the first conv is left (its inputs are the images: a fixed point)
    assert record["skipped"] <= 1 and record["mean_error_after"] < record["mean_error_before"]
    assert all(not torch.equal(before[n], small.get_submodule(n).weight) for n in depthwise)
