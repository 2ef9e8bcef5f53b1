"""Unusual model objects through the channel methods (autobot, taper, hybrid)
and the cost model: an nn.DataParallel run folder that load_pruned could not load, a frozen layer
made trainable by the cut, a tied weight untied, the passed model's own buffers changed, a frozen
first layer the dependency analysis did not see, a @dataclass output refused, an orthogonal
parametrization refused even when excluded, a layer of no weights warned of as not run, a traced
model called scripted."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError
from prunekit.zoo.checkpoints import load_checkpoint

torch.manual_seed(0)
X, Y = torch.randn(128, 64), torch.randint(0, 4, (128,))
AUTOBOT = dict(method="autobot", flops=0.5, gate_batches=3)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _prune(model, **kw):
    """``prunekit.prune`` on (X, Y): autobot at flops 0.5 unless ``kw`` names a method."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = prunekit.prune(model, (X, Y), **(kw if "method" in kw else {**AUTOBOT, **kw}))
    return result, [str(w.message) for w in said]


def test_a_dataparallel_channel_run_loads_into_the_plain_class_and_the_wrapper(tmp_path):
    """The weights were saved without "module." but the layout named "module.0": load_pruned refused
    both the plain class and the wrapper. Both names are now the wrapped module's."""
    from safetensors import safe_open
    result, _ = _prune(nn.DataParallel(_mlp()), out=tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as handle:
        assert not any(k.startswith("module.") for k in handle.keys())
    with torch.no_grad():
        expected = result.model.eval()(X[:8])
    for fresh in (_mlp(), nn.DataParallel(_mlp())):
        back = prunekit.load_pruned(fresh, tmp_path / "run")
        assert back is fresh
        with torch.no_grad():
            got = back(X[:8])
        assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    assert result.model.module[0].weight.shape[0] < 32        # it was cut


def test_a_frozen_layer_cut_by_a_channel_method_stays_frozen():
    model = _mlp()
    model[2].requires_grad_(False)
    for method, opts in (("autobot", dict(gate_batches=3)), ("taper", dict(taper_epochs=0.25))):
        result, _ = _prune(model, method=method, flops=0.5, **opts)
        small = result.model
        assert small[2].weight.shape != model[2].weight.shape          # it was cut
        assert not small[2].weight.requires_grad and not small[2].bias.requires_grad
        assert small[0].weight.requires_grad and small[4].weight.requires_grad


class _Tied(nn.Module):
    """a and b share one weight; ``parallel``: both read h and are added (cut alike), else b reads a."""

    def __init__(self, parallel):
        super().__init__()
        torch.manual_seed(1)
        self.parallel = parallel
        self.inp, self.a, self.b, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = self.a(h) + self.b(h) if self.parallel else self.b(torch.relu(self.a(h)))
        return self.out(torch.relu(h))


def test_a_tied_weight_cut_alike_stays_tied_and_one_cut_apart_is_refused_naming_the_tie(tmp_path):
    model = _Tied(parallel=True)
    result, _ = _prune(model)
    small = result.model
    assert small.a.weight is small.b.weight and small.a.weight.shape[0] < 32
    assert len(list(small.parameters())) == len(list(model.parameters())) == 7
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    back = prunekit.load_pruned(_Tied(parallel=True), tmp_path / "small.safetensors")    # resized, tied again
    assert back.a.weight is back.b.weight and torch.equal(back.a.weight, small.a.weight)
    with pytest.raises(PrunekitError, match=r"b\.weight = a\.weight \(one tensor, tied\).*untying them"):
        _prune(_Tied(parallel=False))


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        y = self.body(x)
        self.calls += 1
        self.ema.mul_(0.9).add_(0.1 * y.detach().mean(0))
        return y


def test_the_model_passed_to_a_channel_method_keeps_its_own_buffers():
    model = _Counting()
    result, _ = _prune(model, method="autobot", flops=0.5, gate_batches=3)
    assert float(model.calls) == 0 and not model.ema.any()
    assert result.model is not model


def test_a_weights_methods_saved_model_holds_the_buffers_result_model_holds(tmp_path):
    """A weights method prunes in place: result.model is the model passed and what the run folder
    saves (the buffers were put back after the save, so the folder held other buffers)."""
    from safetensors.torch import load_file
    model = _Counting()
    result, _ = _prune(model, method="magnitude", sparsity=0.5, eval_data=(X, Y), out=str(tmp_path / "run"))
    assert result.model is model and float(model.calls) > 0
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(saved["calls"], model.calls) and torch.equal(saved["ema"], model.ema)


def test_a_lazy_modules_buffer_not_made_yet_is_no_obstacle():
    model = nn.Sequential(nn.Linear(64, 8), nn.Unflatten(1, (8, 1, 1)), nn.LazyInstanceNorm2d(track_running_stats=True),
                          nn.Flatten(), nn.Linear(8, 4))
    from prunekit.api import _own_buffers
    kept = _own_buffers(model)          # was torch's ValueError: an uninitialized buffer cannot be cloned
    assert [name for _, name, _ in kept] == ["num_batches_tracked"]


def test_a_frozen_first_layer_is_seen_and_cut_by_the_channel_analysis():
    model = _mlp()
    model[0].requires_grad_(False)
    result, _ = _prune(model)             # was refused: the frozen layer's group was invisible
    assert result.model[0].weight.shape[0] < 32 and not result.model[0].weight.requires_grad
    assert not model[0].weight.requires_grad and model[0].weight.shape[0] == 32


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class _DataclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()[:4]
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        return _Out(self.head(h), h)


def test_a_dataclass_output_of_tensors_is_taken_by_the_channel_methods():
    result, _ = _prune(_DataclassNet())
    assert result.model.body[0].weight.shape[0] < 32
    assert result.flops_kept <= 0.5


def test_an_excluded_orthogonal_parametrization_is_counted_and_left_as_it_was():
    from torch.nn.utils.parametrizations import orthogonal
    model, plain = _mlp(), _mlp()
    orthogonal(model[2])
    before = model[2].weight.detach().clone()
    result = prunekit.prune(model, (X, Y), method="magnitude", sparsity=0.5, exclude=["2"])
    dense = prunekit.prune(plain, (X, Y), method="magnitude", sparsity=0.5, exclude=["2"])
    assert result.record["dense_macs"] == dense.record["dense_macs"] == 64 * 32 + 32 * 16 + 16 * 4
    assert torch.allclose(model[2].weight, before, rtol=0, atol=1e-6 * float(before.abs().max()))
    assert int((model[0].weight == 0).sum()) > 0


class _ZeroWide(nn.Module):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # torch's warning of initializing a 0-element tensor
            self.a, self.z, self.out = nn.Linear(64, 32), nn.Linear(64, 0), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.z(x)], 1)))


def test_a_layer_of_no_weights_is_not_warned_of_as_not_run_nor_as_a_group_left_dense():
    """Its weights were "not run on the example input" (it ran); autobot left its "0 channels" dense."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        prunekit.prune(_ZeroWide(), (X, Y), method="magnitude", sparsity=0.5)
    assert not [w for w in said if "did not run" in str(w.message)]
    result, said = _prune(_ZeroWide())
    assert result.model.a.weight.shape[0] < 32 and not [w for w in said if " z: " in w], said
    assert not any(s.startswith("z:") for s in result.record["skipped_groups"])


def test_a_traced_model_is_called_traced():
    traced = torch.jit.trace(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4)), X[:2])
    with pytest.raises(PrunekitError, match=r"TorchScript module \(torch\.jit\.trace\).*before tracing"):
        prunekit.prune(traced, (X, Y), method="magnitude", sparsity=0.5)


def test_a_file_with_different_values_for_a_tied_weight_is_refused(tmp_path):
    """Loading kept the last of the two names silently."""
    from safetensors.torch import save_file
    model = _Tied(parallel=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["b.weight"] += 1
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(PrunekitError, match=r"holds different 'a\.weight' and 'b\.weight', which the model ties"):
        load_checkpoint(_Tied(parallel=True), tmp_path / "w.safetensors")
    state["b.weight"] = state["a.weight"].clone()
    save_file(state, str(tmp_path / "w.safetensors"))
    load_checkpoint(_Tied(parallel=True), tmp_path / "w.safetensors")
