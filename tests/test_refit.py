"""The least-squares re-fit of kept weights after one-shot pruning (prunekit/refit.py): the masked
solver against exact per-row solves, each layer's fit against a brute-force least squares (raw,
centred before BatchNorm, grouped convs), the dense model as its own fixed point, zeros and budget
kept, and the option through Python and the command line with its refusals."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from closeness import assert_close_to_scale
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit import process_memory, refit as refit_module
from prunekit.lockstep import Lockstep
from prunekit.pipelines import weights as weights_pipeline
from prunekit.refit import (Moments, SplitMoments, fit_layer, held_out_images, masked_least_squares,
                            normalised_layers, patches_at, refit)

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads

ASSETS = Path(prunekit.__file__).parent / "assets"


def _net(groups: int = 1):
    """conv (4 -> 6, grouped when asked) -> BN -> ReLU -> conv (6 -> 6) -> BN -> ReLU -> pool -> Linear(6, 3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def _batches(count=3, size=16, shape=(4, 6, 6)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, *shape, generator=g) for _ in range(count)]


def _prune_randomly(model, share=0.5, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) > share).float())
    return model


def _rows(model, name, batches, what, batch_statistics=False):
    """The layer's inputs (unfolded, per group) or outputs over all batches, as brute force sees them."""
    layer = model.get_submodule(name)
    seen = []
    handle = layer.register_forward_hook(lambda _m, args, out: seen.append((args[0] if what == "input" else out).detach()))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for m in norms:
        m.train(batch_statistics)
        m.momentum = 0.0
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    model.eval()
    out = torch.cat(seen)
    if isinstance(layer, nn.Conv2d) and what == "input":
        cols = nn.functional.unfold(out, layer.kernel_size, padding=layer.padding)       # (N, C_in·9, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    if out.dim() == 4:
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
    return out.double()


def _brute_force(x, y, weight, groups=1, centred=False, bias=False):
    """Per output channel: ordinary least squares on its kept inputs (x (rows, D), y (rows, C_out))."""
    if centred:
        x, y = x - x.mean(0), y - y.mean(0)
    per_group, d = weight.shape[0] // groups, x.shape[1] // groups
    flat = weight.reshape(weight.shape[0], -1).double()
    out, biases = torch.zeros_like(flat), torch.zeros(weight.shape[0], dtype=torch.float64)
    for c in range(weight.shape[0]):
        g = c // per_group
        keep = torch.nonzero(flat[c] != 0).flatten()
        design = x[:, g * d:(g + 1) * d][:, keep]
        if bias:
            design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype)], 1)
        solution = torch.linalg.lstsq(design, y[:, c:c + 1]).solution.flatten()
        if bias:
            biases[c], solution = solution[-1], solution[:-1]
        out[c, keep] = solution
    return out.reshape(weight.shape), biases


@pytest.mark.parametrize("block", [1, 3, 5])     # 5: two blocks and a last entry (a bias) on its own
def test_masked_solver_matches_exact_solves_of_each_row(block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    x[:, 1::3] += 2 * x[:, 0::3]                          # correlated neighbours, as a conv's taps are
    a, b = x.T @ x / 200, torch.randn(12, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 12, generator=g) > 0.4
    penalty = torch.full((12,), 0.05, dtype=torch.float64)
    got, iterations = masked_least_squares(a, b, mask, torch.randn(5, 12, generator=g, dtype=torch.float64), penalty,
                                           tolerance=1e-12, block=block)
    assert 0 < iterations <= 12 + 5                       # conjugate gradients: at most about D steps
    for k in range(5):
        keep = torch.nonzero(mask[k]).flatten()
        exact = torch.linalg.solve(a[keep][:, keep] + 0.05 * torch.eye(len(keep), dtype=a.dtype), b[keep, k])
        assert_close_to_scale(got[k, keep], exact, 1e-8)
        assert bool((got[k, ~mask[k]] == 0).all())


def test_every_row_meets_the_tolerance_when_rows_converge_at_different_iterations():
    """A row with a single kept entry is solved in one step, dense rows of an ill-conditioned
    system take many; every returned row is within the tolerance of its own right-hand side, off
    its support exactly 0, and the one-entry row exact."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    a, b = x.T @ x / 400, torch.randn(40, 16, generator=g, dtype=torch.float64)
    mask = torch.rand(16, 40, generator=g) > 0.3
    mask[0] = False
    mask[0, 7] = True
    penalty = torch.full((40,), 1e-4 * float(a.diagonal().mean()), dtype=torch.float64)
    got, iterations = masked_least_squares(a, b, mask, torch.zeros(16, 40, dtype=torch.float64), penalty, 1e-3)
    assert iterations > 5
    residual = ((b.t() - got @ (a + torch.diag(penalty))) * mask).norm(dim=1)
    assert bool((residual <= 1e-3 * (b.t() * mask).norm(dim=1)).all())
    assert bool((got[~mask] == 0).all())
    assert_close_to_scale(got[0, 7], b[7, 0] / (a[7, 7] + penalty[7]), 1e-12)


def test_a_conv_samples_its_rows_down_to_the_cap(monkeypatch):
    """About ROWS_PER_INPUT x D rows over all images: here 2 x 27 over 10 images, 6 of each image's
    64 positions, drawn per image from a generator seeded by the batch's index (so any rank that adds
    a batch draws its rows alike); the sums are those of exactly these rows."""
    monkeypatch.setattr(refit_module, "ROWS_PER_INPUT", 2)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    batches = [torch.randn(5, 3, 8, 8) for _ in range(2)]
    moments, everything = Moments.of_layer(conv, images=10), Moments.of_layer(conv)
    xx, xy = torch.zeros(27, 27, dtype=torch.float64), torch.zeros(27, 4, dtype=torch.float64)
    with torch.no_grad():
        for index, x in zip((3, 7), batches):
            y = conv(x)
            moments.add(conv, x, y, index)
            everything.add(conv, x, y, index)
            chosen = torch.rand(5, 64, generator=torch.Generator().manual_seed(index)).argsort(1)[:, :6]
            rows = nn.functional.unfold(x, 3, padding=1).gather(2, chosen[:, None].expand(5, 27, 6))
            outs = y.reshape(5, 4, 64).gather(2, chosen[:, None].expand(5, 4, 6))
            rows, outs = rows.transpose(1, 2).reshape(-1, 27).double(), outs.transpose(1, 2).reshape(-1, 4).double()
            xx, xy = xx + rows.T @ rows, xy + rows.T @ outs
    assert moments.rows == 10 * 6 and everything.rows == 10 * 64
    assert_close_to_scale(moments.xx[0], xx, 1e-5)
    assert_close_to_scale(moments.xy[0], xy, 1e-5)


@pytest.mark.parametrize("kernel, stride, dilation, padding, groups",
                         [(3, 1, 1, 1, 1), ((3, 2), (2, 1), 1, (1, 0), 1), (3, 2, 2, 2, 2), (1, 2, 1, 0, 1)])
def test_patches_at_some_positions_equal_the_unfolded_ones(kernel, stride, dilation, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, dilation=dilation, padding=padding, groups=groups)
    x = torch.randn(3, 4, 9, 11)
    y = conv(x)
    length = y.shape[2] * y.shape[3]
    chosen = torch.rand(3, length).argsort(1)[:, :5]
    unfolded = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                    stride=conv.stride)
    expected = unfolded.gather(2, chosen[:, None].expand(3, unfolded.shape[1], 5))
    assert torch.equal(patches_at(conv, x, chosen, y.shape[3]), expected)


def test_sampled_rows_fit_almost_as_well_as_all_rows(monkeypatch):
    """A layer fit on a sample of 64 rows per input, judged on all rows: within 10% of the fit on
    all rows, far below the pruned weights' error (rows and targets drawn at the same positions)."""
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    pruned = _prune_randomly(copy.deepcopy(dense), share=0.6)
    # correlated neighbours and channels, as images are: the kept weights can stand in for the cut ones
    batches = [nn.functional.avg_pool2d(torch.randn(16, 4, 14, 14), 3, stride=1) for _ in range(4)]
    for x in batches:
        x[:, 1] += x[:, 0]
    errors = {}
    for cap in (None, 64):
        layer = copy.deepcopy(pruned)
        if cap:
            monkeypatch.setattr(refit_module, "ROWS_PER_INPUT", cap)
        moments, judge = Moments.of_layer(layer, images=64 if cap else None), Moments.of_layer(layer)
        with torch.no_grad():
            for x in batches:
                moments.add(layer, x, dense(x) + 0.3 * torch.randn(16, 6, 12, 12))
                judge.add(layer, x, dense(x))
        assert moments.rows == (64 * 36 if cap else 64 * 144)
        fit_layer(layer, moments, centred=False)
        errors[cap] = fit_layer(copy.deepcopy(layer), judge, centred=False)["error_before"]
        errors["pruned"] = fit_layer(copy.deepcopy(pruned), judge, centred=False)["error_before"]
    assert errors[64] <= 1.1 * errors[None] + 1e-3 and errors[64] < 0.5 * errors["pruned"]


def test_every_eighth_image_is_held_out_whichever_batch_holds_it():
    held = [held_out_images(16, batch) for batch in range(3)]
    assert [torch.nonzero(h).flatten().tolist() for h in held] == [[7, 15]] * 3
    assert not held_out_images(16, 0, every=0).any()
    assert torch.nonzero(held_out_images(4, 1)).flatten().tolist() == [3]       # images 4-7 of the re-fit


def _held_out_case(noise: float, images: int):
    """A Linear (40 -> 5) with half its weights cut, one batch of ``images`` inputs correlated as
    features are (so the kept weights can stand in for the cut ones; with independent inputs the
    kept weights as they are would already be the best fit off the sample) and targets the dense
    outputs plus ``noise``; the held-out images are every 4th."""
    torch.manual_seed(3)
    dense = nn.Linear(40, 5, bias=False)
    layer = _prune_randomly(copy.deepcopy(dense))
    x = torch.randn(images, 8) @ torch.randn(8, 40) + 0.3 * torch.randn(images, 40)
    with torch.no_grad():
        y = dense(x) + noise * torch.randn(images, 5)
    return layer, x.double(), y.double(), held_out_images(images, 0, every=4)


def _split(layer, x, y):
    moments = SplitMoments.of_layer(layer, every=4)
    moments.add(layer, x.float(), y.float())
    return moments


@pytest.mark.parametrize("noise, images, low, high", [(2.0, 64, 0.05, 0.9), (0.0, 400, 0.9, 1.0)])
def test_the_layer_steps_towards_its_fit_as_far_as_the_held_out_images_say(noise, images, low, high, monkeypatch):
    """The least squares on the fit images (brute force), then the step t in [0, 1] along it that
    minimises the output error on the held-out images (a fine grid): a short step with 48 noisy
    rows for 17-25 kept weights per channel, nearly all of it with 300 exact rows."""
    monkeypatch.setattr(refit_module, "TOLERANCE", 1e-12)
    layer, x, y, held = _held_out_case(noise, images)
    start = layer.weight.detach().double().clone()
    fitted, _ = _brute_force(x[~held], y[~held], start)
    steps = torch.linspace(0, 1, 2001, dtype=torch.float64)
    errors = torch.stack([((x[held] @ (start + t * (fitted - start)).t() - y[held]) ** 2).sum() for t in steps])
    best = float(steps[errors.argmin()])
    figures = fit_layer(layer, _split(layer, x, y), centred=False, ridge=1e-12)
    assert abs(figures["step"] - best) <= 1e-3
    assert low <= figures["step"] <= high
    assert_close_to_scale(layer.weight.detach().double(), start + figures["step"] * (fitted - start), 1e-4)
    assert figures["held_out"] and figures["error_after"] <= figures["error_before"]
    assert float(errors.min()) / float(errors[0]) == pytest.approx(figures["error_after"] / figures["error_before"],
                                                                   rel=1e-3)


def test_a_fit_that_would_raise_the_held_out_error_leaves_the_layer_as_it_was(monkeypatch):
    """Targets of the held-out images unrelated to the fit images' (their signs flipped): any step
    towards the fit raises their error, so the step is 0 and the weights stay."""
    layer, x, y, held = _held_out_case(0.0, 64)
    start = layer.weight.detach().clone()
    y[held] = -y[held]
    figures = fit_layer(layer, _split(layer, x, y), centred=False)
    assert figures["step"] == 0.0 and not figures["kept"] and torch.equal(layer.weight.detach(), start)


def test_an_unpruned_network_is_its_own_fixed_point(monkeypatch):
    monkeypatch.setattr(refit_module, "TOLERANCE", 1e-10)
    dense = _net()
    model = copy.deepcopy(dense)
    record = refit(model, dense, ["0", "3", "8"], _batches(), ridge=1e-12, recalibrated=False, held_out=0)
    assert record["layers"] == 3 and record["mean_error_after"] < 1e-6      # products in float32
    for a, b in zip(model.parameters(), dense.parameters()):
        assert_close_to_scale(a.detach(), b.detach(), 1e-4)     # products in float32


@pytest.mark.parametrize("forwards", ["traced", "truncated"])
@pytest.mark.parametrize("groups", [1, 2])
def test_each_layer_is_the_least_squares_fit_on_its_kept_weights(groups, forwards, monkeypatch):
    """Layers before a BatchNorm: centred least squares on the pruned network's inputs (BatchNorm on
    batch statistics) against the dense outputs; the head: raw, with its bias. In forward order, so
    each layer sees the earlier layers' fits; the same through the traced graph and through one
    truncated forward per layer."""
    monkeypatch.setattr(refit_module, "TOLERANCE", 1e-10)     # against exact solves: to convergence
    if forwards == "truncated":
        monkeypatch.setattr(refit_module, "_lockstep", lambda *args: (None, "forced by the test"))
    dense = _net(groups)
    dense.train()
    with torch.no_grad():               # BatchNorm statistics of the dense model, away from 0 / 1
        for x in _batches():
            dense(x)
    dense.eval()
    model = _prune_randomly(copy.deepcopy(dense))
    batches = _batches()
    kept = {n: model.get_submodule(n).weight.detach() != 0 for n in ("0", "3", "8")}
    expected = copy.deepcopy(model)
    for name, centred in (("0", True), ("3", True), ("8", False)):
        layer = expected.get_submodule(name)
        weight, bias = _brute_force(_rows(expected, name, batches, "input", batch_statistics=True),
                                    _rows(dense, name, batches, "output"), layer.weight.detach(),
                                    groups if name == "0" else 1, centred, bias=not centred)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if not centred:
                layer.bias.copy_(bias)
    running = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    record = refit(model, dense, ["0", "3", "8"], batches, ridge=1e-10, held_out=0)   # fit on every image
    assert record["layers"] == 3 and record["centred"] == 2 and record["mean_error_after"] < record["mean_error_before"]
    assert record["forwards"].startswith("one per network" if forwards == "traced" else "one truncated forward")
    for name in ("0", "3", "8"):
        got, want = model.get_submodule(name), expected.get_submodule(name)
        assert torch.equal(got.weight != 0, kept[name]), "the zeros stay"
        # the moments' products are float32 (summed in float64): 1e-4 of the scale
        assert_close_to_scale(got.weight.detach(), want.weight.detach(), 1e-4)
    assert_close_to_scale(model.get_submodule("8").bias.detach(), expected.get_submodule("8").bias.detach(), 1e-4)
    for before, m in zip(running, [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]):
        assert torch.equal(before, m.running_mean), "running statistics untouched"


class _Branching(nn.Module):
    """``_net()`` behind a branch on the data's values, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x) if float(x.abs().sum()) >= 0 else -self.net(x)


class _Counting(nn.Module):
    """A forward whose Python state changes its output: tracing freezes it, so the graph differs."""

    def __init__(self):
        super().__init__()
        self.layer, self.calls = nn.Linear(4, 2), 0

    def forward(self, x):
        self.calls += 1
        return self.layer(x) * self.calls


def test_an_untraceable_network_is_re_fit_by_truncated_forwards_to_the_same_weights():
    dense = _Branching()
    model = _prune_randomly(copy.deepcopy(dense))
    traceable_dense, traceable = copy.deepcopy(dense.net), copy.deepcopy(model.net)
    names = ["0", "3", "8"]
    record = refit(model, dense, [f"net.{n}" for n in names], _batches())
    reference = refit(traceable, traceable_dense, names, _batches())
    assert record["forwards"].startswith("one truncated forward per layer: not traceable by torch.fx")
    assert reference["forwards"].startswith("one per network")
    for a, b in zip(model.net.parameters(), traceable.parameters()):
        assert_close_to_scale(a.detach(), b.detach(), 1e-6)


def test_a_traced_graph_that_computes_otherwise_is_refused():
    counting = _Counting()
    lockstep = Lockstep(counting)
    with pytest.raises(ValueError, match="other values"):
        lockstep.check(counting, torch.randn(3, 4))
    plain = _net().eval()
    assert Lockstep(plain).check(plain, _batches()[0]) > 0          # the bytes held at once


def test_only_layers_feeding_a_batchnorm_are_centred():
    net = _net()
    assert normalised_layers(net, ["0", "3", "8"], _batches()[0]) == {"0", "3"}
    plain = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    assert normalised_layers(plain, ["0", "4"], _batches()[0]) == set()      # a ReLU stands between


def test_without_recalibration_every_layer_fits_raw_moments():
    dense = _net()
    record = refit(_prune_randomly(copy.deepcopy(dense)), dense, ["0", "3", "8"], _batches(), recalibrated=False,
                   held_out=0)
    assert record["centred"] == 0 and record["layers"] == 3


def test_unreachable_and_shared_layers_are_skipped_with_why():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(self.a(x)))
    dense = Shared()
    record = refit(_prune_randomly(copy.deepcopy(dense)), dense, ["a", "b", "unused"], [torch.randn(8, 4)])
    assert record["layers"] == 1 and record["skipped"] == 2
    assert any(w.startswith("a: called more than once") for w in record["skipped_why"])
    assert any(w.startswith("unused: not called") for w in record["skipped_why"])


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 4, 6, 6, generator=g)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()


@pytest.mark.parametrize("method, budget", [("magnitude-flops", {"flops": 0.4}),
                                            ("falcon", {"flops": 0.4, "fisher_samples": 32})])
def test_prune_with_refit_keeps_the_mask_and_lowers_the_layer_errors(method, budget):
    plain = prunekit.prune(_net(), _data(), method=method, batch_size=32, refit_batches=0, **budget)
    fitted = prunekit.prune(_net(), _data(), method=method, batch_size=32, refit_batches=2, **budget)
    refit_record = fitted.record["refit"]
    assert refit_record["layers"] >= 2 and refit_record["centred"] >= 1 and refit_record["images"] == 64
    assert refit_record["mean_error_after"] < refit_record["mean_error_before"]
    assert refit_record["kept"] and refit_record["judged_loss_after"] < refit_record["judged_loss_before"]
    assert fitted.record["bn_recalibrated"] and "refit" not in plain.record
    for a, b in zip(plain.model.parameters(), fitted.model.parameters()):
        if a.dim() > 1:
            assert torch.equal(a != 0, b != 0)
    assert fitted.record["macs"] == plain.record["macs"] and fitted.record["nonzeros"] == plain.record["nonzeros"]


def test_the_quadratic_methods_re_fit_by_default_on_the_first_1024_samples(monkeypatch):
    """refit_batches "auto" (their default): the first batches holding AUTO_REFIT_SAMPLES samples;
    the magnitude baselines stay plain, and gradual runs (which fine-tune) do not re-fit."""
    monkeypatch.setattr(weights_pipeline, "AUTO_REFIT_SAMPLES", 70)
    falcon = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=32)
    assert falcon.record["refit"]["images"] == 96 and falcon.record["options"]["refit_batches"] == "auto"
    magnitude = prunekit.prune(_net(), _data(), method="magnitude-flops", flops=0.4, batch_size=32)
    assert "refit" not in magnitude.record
    gradual = prunekit.prune(_net(), _data(), method="chita", sparsity=0.5, fisher_samples=32, batch_size=32,
                             gradual=True, events=2, epochs_per_event=0, final_epochs=0)
    assert "refit" not in gradual.record and all("refit" not in s for s in gradual.record.get("stages", []))


def test_auto_takes_fewer_images_where_1024_would_not_run_in_lockstep(monkeypatch):
    """refit_batches "auto" keeps the re-fit in lockstep (one forward per network): where both
    networks' activations of 1,024 images exceed the allowance it takes the batches that fit;
    an explicit refit_batches is taken as asked (then by truncated forwards)."""
    per_image = refit_module.lockstep_bytes(_net(), _data()[0][:1])
    monkeypatch.setattr(refit_module, "lockstep_allowance", lambda device: 2 * per_image * 70)
    auto = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=32)
    assert auto.record["refit"]["images"] == 64 and auto.record["refit"]["forwards"].startswith("one per network")
    asked = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=32,
                           refit_batches=3)
    assert asked.record["refit"]["images"] == 96 and asked.record["refit"]["forwards"].startswith("one truncated")


def test_auto_keeps_the_lockstep_under_max_memory(monkeypatch):
    """With max_memory, the re-fit's lockstep allowance is half of what the limit leaves, not of
    the machine's memory (the plan refused MobileNetV1 under --max-memory 3G: auto took 896 images
    where fewer would have fit)."""
    per_image = refit_module.lockstep_bytes(_net(), _data()[0][:1])
    limit = process_memory.current_usage(torch.device("cpu")) + 2**30
    monkeypatch.setattr(refit_module, "current_usage", lambda device: limit - 4 * per_image * 70, raising=False)
    capped = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=32,
                            max_memory=limit)
    assert capped.record["refit"]["images"] == 64
    assert prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32,
                          batch_size=32).record["refit"]["images"] == 128
    assert refit_module.lockstep_allowance(torch.device("cpu")) > 2 * per_image * 70      # the cap is gone


def test_auto_re_fits_a_network_without_batchnorm_after_its_last_stage_only():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 24), nn.ReLU(), nn.Linear(24, 3))
    staged = prunekit.prune(mlp, _data(), method="chita++", sparsity=0.7, stages=3, fisher_samples=32,
                            batch_size=32)
    assert ["refit" in stage for stage in staged.record["stages"]] == [False, False, True]
    assert staged.record["refit"]["layers"] + staged.record["refit"]["skipped"] == 2


def test_a_re_fit_that_raises_the_loss_on_held_batches_is_not_kept(monkeypatch):
    """The re-fit matches layer outputs, not the loss: the pipeline judges both weights on the
    training batches after the re-fit's and keeps the lower loss (here a re-fit that triples
    every kept weight: the pruned weights go back, biases included)."""
    def damaging_refit(model, dense, names, inputs, **_):
        with torch.no_grad():
            for name in names:
                for param in model.get_submodule(name).parameters():
                    param.mul_(3.0)
        return {"layers": len(names), "centred": 0, "skipped": 0, "skipped_why": [], "batches": len(inputs),
                "images": sum(len(x) for x in inputs), "mean_error_before": 1.0, "mean_error_after": 0.5,
                "seconds": 0.0}
    plain = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=32,
                           refit_batches=0)
    monkeypatch.setattr(weights_pipeline, "refit", damaging_refit)
    judged = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=32,
                            refit_batches=2)
    record = judged.record["refit"]
    assert not record["kept"] and record["judged_loss_after"] > record["judged_loss_before"]
    for a, b in zip(plain.model.parameters(), judged.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch_size, judged", [(4, 16), (8, 10), (64, 1)])
def test_the_judge_takes_the_batches_after_the_re_fits_own(batch_size, judged):
    """BatchNorm re-estimated on JUDGE_CALIBRATION_BATCHES (8) after the re-fit's batches, the loss
    on the next JUDGE_LOSS_BATCHES (16); fewer batches: a third (at least one) for BatchNorm, the rest
    to judge by (128 samples in 32, 16 or 2 batches; with none after the re-fit's two, the first)."""
    result = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, batch_size=batch_size,
                            refit_batches=2)
    assert result.record["refit"]["judge_batches"] == judged


def test_a_multi_stage_run_re_fits_after_every_stage():
    """Each stage's gradients are taken at the re-fit weights, and the last stage's record measures
    the re-fit final model: every stage records its re-fit, ``record["refit"]`` is the last one's.
    Only the last re-fit is judged (kept if it lowers the loss on held batches); the others stay."""
    result = prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, stages=3,
                            batch_size=32, refit_batches=2, eval_data=_data())
    stages = result.record["stages"]
    assert len(stages) == 3
    for stage in stages:
        assert stage["refit"]["layers"] >= 2
        assert stage["refit"]["mean_error_after"] < stage["refit"]["mean_error_before"]
    assert result.record["refit"]["mean_error_after"] == stages[-1]["refit"]["mean_error_after"]
    assert stages[-1]["loss"] == result.record["loss"] and stages[-1]["nonzeros"] == result.record["nonzeros"]
    assert all("kept" not in stage["refit"] and "judged_loss_after" not in stage["refit"] for stage in stages[:-1])
    last = stages[-1]["refit"]
    assert last["kept"] == (last["judged_loss_after"] < last["judged_loss_before"])
    assert result.record["refit"]["judge_batches"] >= 1


def test_the_gradient_matrix_is_freed_before_the_re_fit(monkeypatch):
    """The re-fit needs the model and the data, not X (n x p): no tensor of X's shape is alive
    while it runs (before session 34 it ran beside X, 1,978 MB against 1,554 on ResNet-20-B)."""
    import gc
    p = sum(m.weight.numel() for m in _net().modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    seen = []
    real = weights_pipeline.refit

    def refit_and_look(*args, **kwargs):
        gc.collect()
        seen.append([tuple(t.shape) for t in gc.get_objects()
                     if type(t) is torch.Tensor and t.dim() == 2 and t.shape[0] == 32 and t.shape[1] >= p // 2])
        return real(*args, **kwargs)
    monkeypatch.setattr(weights_pipeline, "refit", refit_and_look)
    prunekit.prune(_net(), _data(), method="falcon", flops=0.4, fisher_samples=32, stages=2, batch_size=32,
                   refit_batches=2)
    assert seen == [[], []]


def test_refit_refusals():
    with pytest.raises(PrunekitError, match="refit_batches must be 'auto' or at least 0"):
        prunekit.prune(_net(), _data(), method="magnitude", sparsity=0.5, refit_batches=-1)
    with pytest.raises(PrunekitError, match="refit_ridge must be"):
        prunekit.prune(_net(), _data(), method="falcon", flops=0.5, refit_batches=2, refit_ridge=0)
    with pytest.raises(PrunekitError, match="gradual pruning fine-tunes instead: drop refit_batches or gradual"):
        prunekit.prune(_net(), _data(), method="magnitude", sparsity=0.5, refit_batches=2, gradual=True)
    with pytest.raises(PrunekitError, match="refit_batches re-fits the layers on training data: pass data"):
        prunekit.prune(_net(), example_input=torch.randn(2, 4, 6, 6), method="magnitude", sparsity=0.5,
                       refit_batches=2)
    with pytest.raises(PrunekitError, match="method autobot takes no option refit_batches"):
        prunekit.prune(_net(), _data(), method="autobot", flops=0.5, refit_batches=2)


def _cli(tmp_path, *flags):
    return ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--train-samples", "128", "--batch-size", "64",
            "--include", "fc2", "fc3", *flags]


def test_command_line_refit_and_its_summary(tmp_path, capsys):
    assert main(_cli(tmp_path, "--method", "chita", "--sparsity", "0.8", "--fisher-samples", "16",
                     "--refit-batches", "2", "--json")) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["refit"]["layers"] == 2 and record["refit"]["centred"] == 0   # MLPNet: no BatchNorm
    assert main(_cli(tmp_path, "--method", "magnitude", "--sparsity", "0.8", "--refit-batches", "1",
                     "--no-bn-recalibration")) == 0
    shown = capsys.readouterr().out
    assert "re-fit     2 layers (0 centred for BatchNorm, 0 skipped), held-out output error" in shown
    assert re.search(r"re-fit .* s on [\d,]+ images\n", shown)       # how many, as auto may take fewer


@pytest.mark.parametrize("flags, message", [
    (["--refit-batches", "-2"], "--refit-batches must be 'auto' or at least 0"),
    (["--refit-batches", "2", "--refit-ridge", "0"], "--refit-ridge must be"),
    (["--refit-batches", "2", "--gradual", "--events", "2"], "gradual pruning fine-tunes instead")])
def test_command_line_refusals_are_one_line(tmp_path, capsys, flags, message):
    assert main(_cli(tmp_path, "--method", "magnitude", "--sparsity", "0.8", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
