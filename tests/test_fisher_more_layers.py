"""Gradient rows on the per-layer path for SlimAttention (heads removed), nn.MultiheadAttention
with separate q/k/v weights, bias_k/bias_v and zero attention, and Conv1d/Conv3d/ConvTranspose:
rows equal torch.func per-sample gradients, and the vmap path is never taken."""

import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit import attention_explicit, fisher, layer_grads, memory_plan
from prunekit.costs import CostModel
from prunekit.errors import PrunekitWarning
from prunekit.fisher import collect_gradients
from prunekit.layers import SlimAttention
from prunekit.params import ParamSpace
from prunekit.structured.attention import slim_copy
from closeness import assert_close_to_scale
from test_fisher_attention import _Encoder, _data, _mean_gradient, _per_sample, _seeded, _vit


def _no_vmap(monkeypatch):
    """Fail the test if the collector takes the whole-model vmap path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the vmap path was taken")
    monkeypatch.setattr(fisher, "collect_with_vmap", refuse)


def _hook_rows(model, space, batches, n, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)       # no vmap fallback, no disagreement
        return collect_gradients(model, space, batches, n=n, chunk=4, progress=False, **kwargs)


def _assert_rows_are_per_sample_gradients(model, space, batches, n, monkeypatch):
    assert not layer_grads.unsupported_layers(model, space)
    forwards = [m.forward for m in model.modules()]
    _no_vmap(monkeypatch)
    rows = _hook_rows(model, space, batches, n)
    expected = _per_sample(model, space, batches, n)
    for entry in space.entries:                               # each layer on its own scale
        assert_close_to_scale(rows[:, entry.slice], expected[:, entry.slice], rel=1e-4)
    assert all("forward" not in vars(m) for m in model.modules())
    assert [m.forward for m in model.modules()] == forwards


# --- SlimAttention: nn.MultiheadAttention after structured head removal --------------------------

def _slim(model, keep_every=2):
    """``model`` with each nn.MultiheadAttention replaced by a SlimAttention of some of its heads."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            keep = torch.arange(m.num_heads) % keep_every == 0
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], slim_copy(m, keep))
    return model


def _slim_models():
    return {"vit-tiny": (lambda: _slim(_vit()), (1, 28, 28), 10),
            "encoder-batch-first": (lambda: _slim(_seeded(_Encoder, True)), (1, 4, 4), 3),
            "encoder-seq-first": (lambda: _slim(_seeded(_Encoder, False)), (1, 4, 4), 3)}


def _slim_space(model, shape):
    space = ParamSpace(model, costs=CostModel(model, torch.zeros(1, *shape)))
    slim = [e for e in space.entries if isinstance(model.get_submodule(e.module), SlimAttention)]
    assert slim and all(e.param_name.endswith("in_proj_weight") for e in slim)
    return space


@pytest.mark.parametrize("name", list(_slim_models()))
def test_slim_attention_rows_are_per_sample_gradients_on_the_layer_path(name, monkeypatch):
    make, shape, classes = _slim_models()[name]
    model = make()
    space = _slim_space(model, shape)
    _assert_rows_are_per_sample_gradients(model, space, _data(shape, classes, 20), 11, monkeypatch)


def test_slim_attention_mini_batch_rows_are_mean_gradients(monkeypatch):
    make, shape, classes = _slim_models()["encoder-seq-first"]
    model = make()
    space = _slim_space(model, shape)
    batches = _data(shape, classes, 20)
    _no_vmap(monkeypatch)
    rows = _hook_rows(model, space, batches, 3, batch=6)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for i in range(3):
        assert_close_to_scale(rows[i], _mean_gradient(model, space, x[6 * i:6 * i + 6], y[6 * i:6 * i + 6]),
                              rel=1e-4)


def test_a_wrong_slim_forward_fails_the_check_and_falls_back(monkeypatch):
    model = _slim(_seeded(_Encoder, True))
    space = _slim_space(model, (1, 4, 4))
    original = attention_explicit.explicit_slim_forward

    def off(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        return out * 1.5, weights
    monkeypatch.setattr(attention_explicit, "explicit_slim_forward", off)
    batches = _data((1, 4, 4), 3, 10)
    with pytest.warns(PrunekitWarning, match="disagree with autograd"):
        rows = collect_gradients(model, space, batches, n=6, chunk=3, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 6), rel=1e-4)


def test_the_memory_plan_takes_the_layer_path_for_a_slim_vit():
    model = _slim(_vit())
    space = _slim_space(model, (1, 28, 28))
    assert not memory_plan._Sizes(model, space, torch.zeros(1, 1, 28, 28)).whole_model_rows
    assert all("forward" not in vars(m) for m in model.modules())


class _Heads(nn.Module):
    """4 tokens of 16 embedded to 8, 4 heads whose only channel group is the heads, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):                                   # (B, 1, 4, 16)
        t = self.embed(x.flatten(1, 2))
        return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))


def test_a_hybrid_pruned_transformer_gets_its_rows_on_the_layer_path(monkeypatch):
    """Heads removed (a SlimAttention), then FALCON on the rest: its rows came from the vmap path."""
    torch.manual_seed(0)
    model, x = _Heads(), torch.randn(1, 1, 4, 16)
    data = [(torch.randn(8, 1, 4, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    _no_vmap(monkeypatch)
    r = prunekit.prune(model, lambda: data, method="hybrid", flops=0.3, example_input=x, structured_flops=0.7,
                       gate_batches=2, fisher_samples=8, finetune_epochs=0)
    assert isinstance(r.model.attn, SlimAttention) and r.model.attn.num_heads < 4
    assert int((r.model.attn.in_proj_weight == 0).sum()) > 0


# --- nn.MultiheadAttention: separate q/k/v weights, bias_k/bias_v, zero attention ----------------

class _Attention(nn.Module):
    """Queries of width 8 from the image's rows; keys and values of width ``kdim``/``vdim`` (the
    separate q/k/v weights when they differ from 8); the last key of a sample with a positive
    first pixel masked out, and each query blind to the keys two or more steps ahead."""

    def __init__(self, kdim=None, vdim=None, batch_first=True, **options):
        super().__init__()
        self.kdim, self.vdim = kdim or 8, vdim or 8
        self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, batch_first=batch_first, **options)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        rows = x.reshape(x.shape[0], 4, 4)
        query = rows.repeat(1, 1, 2)
        key = torch.tanh(rows).repeat(1, 1, 4)[..., :self.kdim]
        value = key if self.vdim == self.kdim else torch.sin(rows).repeat(1, 1, 4)[..., :self.vdim]
        last = (x.reshape(x.shape[0], -1)[:, :1] > 0)
        padding = torch.cat([torch.zeros_like(last).expand(-1, 3), last], dim=1)
        mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=2)
        if not self.attn.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            if self.vdim == self.kdim:
                value = key
        out, weights = self.attn(query, key, value, key_padding_mask=padding, attn_mask=mask)
        out = out if self.attn.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1)) + weights.sum()


def _attention_models():
    return {"separate-kv": lambda: _Attention(kdim=6),
            "separate-k-v-seq-first": lambda: _Attention(kdim=6, vdim=5, batch_first=False),
            "bias-kv": lambda: _Attention(add_bias_kv=True),
            "zero-attn": lambda: _Attention(add_zero_attn=True),
            "all": lambda: _Attention(kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=False)}


@pytest.mark.parametrize("name", list(_attention_models()))
def test_multihead_attention_variants_are_on_the_layer_path(name, monkeypatch):
    torch.manual_seed(0)
    model = _attention_models()[name]()
    with torch.no_grad():
        for p in (model.attn.bias_k, model.attn.bias_v, model.attn.in_proj_bias):
            if p is not None:
                p.normal_(0, 0.5)
    space = ParamSpace(model)
    names = {e.param_name.rsplit(".", 1)[-1] for e in space.entries}
    assert names >= ({"q_proj_weight", "k_proj_weight", "v_proj_weight"} if model.kdim != 8 else {"in_proj_weight"})
    _assert_rows_are_per_sample_gradients(model, space, _data((1, 4, 4), 3, 15), 9, monkeypatch)


def test_the_explicit_forward_reproduces_the_variants():
    torch.manual_seed(0)
    plain = lambda module, which, a, weight, bias, rows: nn.functional.linear(a, weight, bias)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 7, 6), torch.randn(3, 7, 5)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    for options in ({"kdim": 6, "vdim": 5}, {"kdim": 6, "vdim": 5, "add_bias_kv": True, "add_zero_attn": True},
                    {"add_bias_kv": True}, {"add_zero_attn": True}):
        m = nn.MultiheadAttention(8, 2, batch_first=True, **options).eval()
        assert layer_grads.attention_supported(m)
        kv = (k, v) if "kdim" in options else (k.repeat(1, 1, 2)[..., :8],) * 2
        cases = [{"need_weights": False, "key_padding_mask": padding}, {"key_padding_mask": padding},
                 {"attn_mask": torch.randn(6, 5, 7), "average_attn_weights": False}]
        for kwargs in cases:
            expected = m(q, *kv, **kwargs)
            got = attention_explicit.explicit_attention_forward(m, plain, q, *kv, **kwargs)
            assert_close_to_scale(got[0], expected[0], rel=1e-5)
            if expected[1] is not None:
                assert_close_to_scale(got[1], expected[1], rel=1e-5)


# --- convolutions over one and three dimensions, and transposed ---------------------------------

class _Conv1dNet(nn.Module):
    """A sequence model: the 4 x 4 image's rows as 4 channels of 4 steps, upsampled to 12."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=3), nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(),
            nn.Conv1d(6, 6, 3, stride=2, dilation=2, groups=2, padding=2), nn.ReLU(),
            nn.Conv1d(6, 6, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
            nn.Conv1d(6, 6, 3, groups=6), nn.Tanh(),                          # depthwise
            nn.Conv1d(6, 8, 1, stride=2))                                     # pointwise
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x.reshape(x.shape[0], 4, 4)).mean(-1))


class _Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, (2, 3, 3), padding=(0, 1, 1), stride=(1, 2, 1))
        self.point = nn.Conv3d(4, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        volume = x.reshape(x.shape[0], 1, 2, 4, 2).repeat(1, 1, 1, 1, 2)       # (B, 1, 2, 4, 4)
        return self.head(self.point(torch.relu(self.conv(volume))).mean((2, 3, 4)))


class _TransposedNet(nn.Module):
    """Transposed convolutions, one given an ``output_size`` (an output padding of its call's)."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, groups=2)
        self.up2 = nn.ConvTranspose2d(1, 3, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        a = self.up1(x.reshape(x.shape[0], 4, 4), output_size=[8])                       # (B, 6, 8)
        b = self.up2(x, output_size=[8, 8])                                                # (B, 3, 8, 8)
        return self.head(torch.cat([torch.tanh(a).mean(-1), torch.tanh(b).mean((2, 3))], dim=1))


@pytest.mark.parametrize("make", [_Conv1dNet, _Conv3dNet, _TransposedNet], ids=lambda m: m.__name__)
def test_convolution_rows_are_per_sample_gradients_on_the_layer_path(make, monkeypatch):
    model = _seeded(make)
    space = ParamSpace(model)
    _assert_rows_are_per_sample_gradients(model, space, _data((1, 4, 4), 3, 15), 9, monkeypatch)


@pytest.mark.parametrize("make", [_Conv1dNet, _TransposedNet], ids=lambda m: m.__name__)
def test_convolution_mini_batch_rows_are_mean_gradients(make, monkeypatch):
    model = _seeded(make)
    space = ParamSpace(model)
    batches = _data((1, 4, 4), 3, 12)
    _no_vmap(monkeypatch)
    rows = _hook_rows(model, space, batches, 2, batch=6)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for i in range(2):
        assert_close_to_scale(rows[i], _mean_gradient(model, space, x[6 * i:6 * i + 6], y[6 * i:6 * i + 6]),
                              rel=1e-4)


class _OwnConv1d(nn.Conv1d):
    """A subclass whose forward uses its weight otherwise (doubled): not the Conv1d formula."""

    def forward(self, x):
        return self._conv_forward(x, 2 * self.weight, self.bias)


def test_a_convolution_with_its_own_forward_stays_on_the_vmap_path():
    model = _seeded(_Conv1dNet)
    torch.manual_seed(1)
    model.body[1] = _OwnConv1d(4, 6, 3, padding=1)
    space = ParamSpace(model)
    assert layer_grads.unsupported_layers(model, space) == ["body.1"]
    batches = _data((1, 4, 4), 3, 10)
    with pytest.warns(PrunekitWarning, match="vmap path"):
        rows = collect_gradients(model, space, batches, n=6, chunk=3, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 6), rel=1e-4)


class _PerSampleConv(nn.Module):
    """A Conv1d called on each sample alone (unbatched, (C, L)) and a Conv2d on a sample's rows
    folded into the batch ((B·4, 1, 1, 4)): neither input's first dimension is the samples."""

    def __init__(self, fold: bool):
        super().__init__()
        self.fold = fold
        self.conv1 = nn.Conv1d(4, 5, 3)
        self.conv2 = nn.Conv2d(1, 5, (1, 3))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        if self.fold:
            frames = self.conv2(x.reshape(-1, 1, 1, 4))                              # (B·4, 5, 1, 2)
            return self.head(frames.reshape(x.shape[0], 4, 5, 2).mean((1, 3)))
        return self.head(torch.stack([self.conv1(s.reshape(4, 4)).mean(-1) for s in x]))


@pytest.mark.parametrize("fold", [False, True], ids=["unbatched-conv1d", "folded-conv2d"])
def test_a_convolution_not_on_a_batch_of_the_samples_falls_back(fold):
    model = _seeded(_PerSampleConv, fold)
    space = ParamSpace(model, include=["conv2" if fold else "conv1", "head"])
    batches = _data((1, 4, 4), 3, 10)
    with pytest.warns(PrunekitWarning, match="disagree.*not a batch of the"):
        rows = collect_gradients(model, space, batches, n=6, chunk=3, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 6), rel=1e-4)
    if fold:                                  # mini-batch rows sum over the folded batch: no fallback
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrunekitWarning)
            rows = collect_gradients(model, space, batches, n=1, batch=6, chunk=3, progress=False)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert_close_to_scale(rows[0], _mean_gradient(model, space, x[:6], y[:6]), rel=1e-4)
