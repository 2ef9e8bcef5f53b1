"""Gradient rows of nn.MultiheadAttention's weights on the per-layer path (its explicit forward)."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from prunekit import attention_explicit, layer_grads, memory_plan
from prunekit.errors import PrunekitWarning
from prunekit.fisher import collect_gradients
from prunekit.params import ParamSpace
from prunekit.zoo import build
from closeness import assert_close_to_scale


class _Encoder(nn.Module):
    """Tokens from a 4 x 4 image (its rows), an nn.TransformerEncoderLayer, a head; the last
    ``padded`` tokens of a sample whose first pixel is positive are masked out by a
    key_padding_mask (a property of the sample, not of its place in the batch)."""

    def __init__(self, batch_first: bool, padded: int = 1):
        super().__init__()
        self.batch_first, self.padded = batch_first, padded
        self.embed = nn.Linear(4, 16)
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 4, 4))                      # (B, 4, 16)
        padded = (x.reshape(x.shape[0], -1)[:, :1] > 0).expand(-1, self.padded)
        mask = torch.cat([torch.zeros_like(padded[:, :1]).expand(-1, 4 - self.padded), padded], dim=1)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        out = self.layer(tokens, src_key_padding_mask=mask)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, 0])


class _CrossAttention(nn.Module):
    """Attention whose key/value differ from its query (the q and kv projections apart), with
    need_weights left at its default (the explicit softmax)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)                             # (T, B, E)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        rows = x.reshape(x.shape[0], 4, 4).transpose(0, 1)                   # (4, B, 4)
        query, memory = rows.repeat(1, 1, 2), torch.tanh(rows).repeat(1, 1, 2)
        out, weights = self.attn(query, memory, memory)
        return self.head(out.mean(0)) + weights.sum()


def _vit():
    torch.manual_seed(0)
    model = build("vit-tiny")
    with torch.no_grad():                                  # random weights: cost only, nontrivial values
        model.cls_token.normal_()
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.normal_(0, 0.1)
                m.out_proj.bias.normal_(0, 0.1)
    return model


def _data(shape, classes, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + 5], y[i:i + 5]) for i in range(0, n, 5)]


def _per_sample(model, space, batches, n):
    """Per-sample gradients by torch.func over the whole model (the reference)."""
    model.eval()
    names = space.param_names()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(w, x, y):
        out = functional_call(model, {**params, **buffers, **w}, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    x = torch.cat([b[0] for b in batches])[:n]
    y = torch.cat([b[1] for b in batches])[:n]
    g = vmap(grad(loss), in_dims=(None, 0, 0))({k: params[k] for k in names}, x, y)
    return torch.cat([g[k].reshape(n, -1) for k in names], dim=1)


def _mean_gradient(model, space, x, y):
    model.eval()
    model.zero_grad()
    weights = space.weights()
    loss = nn.functional.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _models():
    return {"vit-tiny": (_vit, (1, 28, 28), 10),
            "encoder-batch-first": (lambda: _seeded(_Encoder, True), (1, 4, 4), 3),
            "encoder-seq-first": (lambda: _seeded(_Encoder, False), (1, 4, 4), 3),
            "cross-attention": (lambda: _seeded(_CrossAttention), (1, 4, 4), 3)}


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args)


@pytest.mark.parametrize("name", list(_models()))
def test_attention_rows_are_per_sample_gradients_without_the_vmap_path(name):
    make, shape, classes = _models()[name]
    model = make()
    space = ParamSpace(model)
    assert any(e.param_name.endswith("in_proj_weight") for e in space.entries)
    assert not layer_grads.unsupported_layers(model, space)
    batches = _data(shape, classes, 20)
    forwards = [m.forward for m in model.modules()]
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)       # no vmap fallback, no disagreement
        rows = collect_gradients(model, space, batches, n=11, chunk=4, progress=False)
    expected = _per_sample(model, space, batches, 11)
    assert_close_to_scale(rows, expected, rel=1e-4)
    for entry in space.entries:                           # each layer on its own scale, too
        assert_close_to_scale(rows[:, entry.slice], expected[:, entry.slice], rel=1e-4)
    # the modules are as they were: their own forward, the same weights, the fast path switch
    assert "forward" not in [k for m in model.modules() for k in vars(m)]
    assert [m.forward for m in model.modules()] == forwards
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("name", ["vit-tiny", "encoder-seq-first", "cross-attention"])
def test_attention_mini_batch_rows_are_mean_gradients(name):
    make, shape, classes = _models()[name]
    model = make()
    space = ParamSpace(model)
    batches = _data(shape, classes, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        rows = collect_gradients(model, space, batches, n=3, batch=6, chunk=4, progress=False)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for i in range(3):
        assert_close_to_scale(rows[i], _mean_gradient(model, space, x[6 * i:6 * i + 6], y[6 * i:6 * i + 6]),
                              rel=1e-4)


def test_the_explicit_forward_is_the_modules_forward():
    torch.manual_seed(0)
    plain = lambda module, which, a, weight, bias, rows: nn.functional.linear(a, weight, bias)
    for batch_first in (True, False):
        m = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        padding = torch.zeros(3, 7, dtype=torch.bool)
        padding[0, -2:] = True
        cases = [((q, q, q), {"need_weights": False}),
                 ((q, kv, kv), {"key_padding_mask": padding}),
                 ((q, kv, kv.clone()), {"attn_mask": torch.randn(12, 5, 7), "average_attn_weights": False}),
                 ((q, q, q), {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True,
                              "need_weights": False})]
        for args, kwargs in cases:
            expected = m(*args, **kwargs)
            got = attention_explicit.explicit_attention_forward(m, plain, *args, **kwargs)
            assert_close_to_scale(got[0], expected[0], rel=1e-5)
            assert (got[1] is None) == (expected[1] is None)
            if expected[1] is not None:
                assert_close_to_scale(got[1], expected[1], rel=1e-5)


def test_the_module_is_restored_after_an_error():
    model = _vit()
    space = ParamSpace(model)
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]

    def broken(*args):
        raise ValueError("a broken loader")
        yield

    with pytest.raises(ValueError, match="broken"):
        collect_gradients(model, space, broken(), n=4, progress=False)
    assert all("forward" not in vars(m) for m in attention)
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with attention_explicit.explicit_attention(attention, None):
            assert all("forward" in vars(m) for m in attention)
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in attention)
    assert all(p.requires_grad for p in model.parameters())


def test_the_check_compares_with_the_modules_own_forward(monkeypatch):
    # An explicit forward that differs from the module's (here: a scaled output) must fail the
    # first-row check and fall back to vmap, whose rows are the module's own.
    model = _seeded(_Encoder, True)
    space = ParamSpace(model)
    original = attention_explicit.explicit_attention_forward

    def off(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        return out * 1.5, weights
    monkeypatch.setattr(attention_explicit, "explicit_attention_forward", off)
    batches = _data((1, 4, 4), 3, 10)
    with pytest.warns(PrunekitWarning, match="disagree with autograd"):
        rows = collect_gradients(model, space, batches, n=6, chunk=3, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 6), rel=1e-4)


class _OwnAttention(nn.MultiheadAttention):
    """A subclass with a forward of its own (doubled queries): not what the explicit forward does."""

    def forward(self, query, key, value, **kwargs):
        return super().forward(2 * query, key, value, **kwargs)


class _Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _OwnAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 4, 4).repeat(1, 1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


def test_attention_with_a_forward_of_its_own_stays_on_the_vmap_path():
    model = _seeded(_Subclassed)
    space = ParamSpace(model)
    assert set(layer_grads.unsupported_layers(model, space)) == {"attn.in_proj_weight", "attn.out_proj"}
    assert memory_plan._Sizes(model, space, torch.zeros(1, 1, 4, 4)).whole_model_rows
    batches = _data((1, 4, 4), 3, 10)
    with pytest.warns(PrunekitWarning, match="vmap path"):
        rows = collect_gradients(model, space, batches, n=6, chunk=3, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 6), rel=1e-4)


def test_the_memory_plan_takes_the_hook_path_for_the_vit():
    model = _vit()
    space = ParamSpace(model)
    sizes = memory_plan._Sizes(model, space, torch.zeros(1, 1, 28, 28))
    assert not sizes.whole_model_rows
    assert all("forward" not in vars(m) for m in model.modules())


class _SharedAttention(nn.Module):
    """One attention module called twice: as cross-attention (q and kv apart), then as
    self-attention (one product for all of in_proj), the two writing overlapping columns."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 4, 4).repeat(1, 1, 2)
        memory = torch.tanh(tokens)
        mixed = self.attn(tokens, memory, memory, need_weights=False)[0]
        return self.head(self.attn(mixed, mixed, mixed, need_weights=False)[0].mean(1))


def test_an_attention_called_twice_adds_both_calls():
    model = _seeded(_SharedAttention)
    space = ParamSpace(model)
    batches = _data((1, 4, 4), 3, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        rows = collect_gradients(model, space, batches, n=9, chunk=4, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 9), rel=1e-4)


class _Unbatched(nn.Module):
    """Attention called on one sample at a time (unbatched (T, E) input): not reproduced by the
    explicit forward, so the rows come from the vmap path, and the plan counts that path."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 4, 4).repeat(1, 1, 2)
        return self.head(torch.stack([self.attn(t, t, t)[0].mean(0) for t in tokens]))


def test_unbatched_attention_falls_back_to_vmap():
    model = _seeded(_Unbatched)
    space = ParamSpace(model)
    assert memory_plan._Sizes(model, space, torch.zeros(1, 1, 4, 4)).whole_model_rows
    assert "forward" not in vars(model.attn)
    batches = _data((1, 4, 4), 3, 10)
    with pytest.warns(PrunekitWarning, match="disagree.*unbatched"):
        rows = collect_gradients(model, space, batches, n=6, chunk=3, progress=False)
    assert_close_to_scale(rows, _per_sample(model, space, batches, 6), rel=1e-4)
    assert "forward" not in vars(model.attn)
