"""Grouped-query attention (Llama's: fewer k/v heads than q heads, each shared by several q heads)
is left dense by the channel methods, and the reason says so: "its channel trace goes round a
cycle" told the user nothing of what is not supported."""

import pytest
import torch
from torch import nn

from prunekit.structured.groups import find_groups
from prunekit.structured.left_dense import unexpected_skips


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]      # as Llama's (chunk fails the trace)
    return torch.cat((-x2, x1), dim=-1)


class _Attention(nn.Module):
    """Llama's attention from plain torch modules: rotary embedding on q and k, k/v heads repeated."""

    def __init__(self, hidden=64, heads=4, kv_heads=2, counts=True):
        super().__init__()
        self.head_dim = hidden // heads
        if counts:                                    # HuggingFace's attributes; a plain one has none
            self.num_heads, self.num_key_value_heads = heads, kv_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.heads, self.kv_heads = heads, kv_heads
        pos = torch.arange(16.0)[:, None] / (10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("cos", torch.cat((pos, pos), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((pos, pos), -1).sin(), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        out = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _TinyLlama(nn.Module):
    def __init__(self, counts=True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 64)
        self.attn = _Attention(counts=counts)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("counts", [True, False], ids=["head counts", "projection widths"])
def test_grouped_query_attention_is_kept_dense_and_named(counts):
    model = _TinyLlama(counts)
    groups = find_groups(model, torch.randint(0, 100, (1, 8)))
    pruned = {m.module for g in groups for m in g.members}
    assert not pruned & {"attn.q_proj", "attn.k_proj", "attn.v_proj"}          # kept dense
    reasons = dict(groups.skipped)
    said = "2 k/v heads for 4 q heads" if counts else "its k projection has 32 outputs, its q projection 64"
    named = [why for root, why in reasons.items() if root.startswith("attn.")]
    assert named and all("grouped-query attention" in why and "cycle" not in why for why in named), named
    assert any(f"grouped-query attention 'attn' ({said}" in why for why in named), named
    assert any("grouped-query attention" in why for _, why in unexpected_skips(groups.skipped))


def test_attention_with_as_many_kv_heads_is_not_called_grouped_query():
    from prunekit.structured.grouped_query import grouped_query_attention
    model = nn.Module()
    model.attn = _Attention(heads=4, kv_heads=4)
    modules = dict(model.named_modules())
    assert grouped_query_attention(modules, "attn.q_proj") is None
    model.attn = _Attention(heads=4, kv_heads=4, counts=False)
    assert grouped_query_attention(dict(model.named_modules()), "attn.k_proj") is None


class _HandGQA(nn.Module):
    """Hand-written grouped-query attention without head-count attributes: q (``hq`` heads of 8), k and v
    (``hkv`` heads) repeated to ``hq`` by ``repeat_interleave`` or by ``unsqueeze().expand().reshape()``,
    then an MLP; tokens (B, T, 16) -> logits (B, 10)."""

    def __init__(self, hq=4, hkv=2, expand=False):
        super().__init__()
        self.hq, self.hkv, self.d, self.expand = hq, hkv, 8, expand
        self.inp = nn.Linear(16, 32)
        self.q, self.k, self.v = nn.Linear(32, hq * 8), nn.Linear(32, hkv * 8), nn.Linear(32, hkv * 8)
        self.o = nn.Linear(hq * 8, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def _repeat(self, t):                      # (B, hkv, T, d) -> (B, hq, T, d)
        rep = self.hq // self.hkv
        if not self.expand:
            return t.repeat_interleave(rep, 1)
        b, _, n, d = t.shape
        return t.unsqueeze(2).expand(b, self.hkv, rep, n, d).reshape(b, self.hq, n, d)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.hq, self.d).transpose(1, 2)
        k = self._repeat(self.k(x).view(b, n, self.hkv, self.d).transpose(1, 2))
        v = self._repeat(self.v(x).view(b, n, self.hkv, self.d).transpose(1, 2))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, n, self.hq * self.d))
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class _Nested(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.blk = _HandGQA(**kw)

    def forward(self, x):
        return self.blk(x)


@pytest.mark.parametrize("hq, hkv, expand, nested", [(4, 2, False, False), (4, 2, True, False), (4, 2, False, True),
                                                     (4, 2, True, True), (4, 4, False, False)],
                         ids=["repeat_interleave", "expand", "submodule", "submodule-expand", "as-many-kv-heads"])
def test_hand_written_grouped_query_attention_keeps_qkv_dense_and_named(hq, hkv, expand, nested):
    """Its k/v repeat gave torch-pruning's trace channels without a root index: find_groups crashed
    (TypeError in _members) for every channel method. Now q, k and v are left dense, named, the rest pruned."""
    torch.manual_seed(0)
    model = (_Nested if nested else _HandGQA)(hq=hq, hkv=hkv, expand=expand).eval()
    groups = find_groups(model, torch.randn(1, 6, 16))
    pre = "blk." if nested else ""
    qkv = {f"{pre}q", f"{pre}k", f"{pre}v"}
    assert not qkv & {m.module for g in groups for m in g.layers("out")}     # their outputs kept
    assert any(m.module == f"{pre}mlp.0" and m.role == "out" for g in groups for m in g.members)   # the rest pruned
    reasons = dict(groups.skipped)
    assert qkv <= set(reasons), groups.skipped
    where = "'blk'" if nested else "the model"
    for name in qkv:
        if hkv < hq:
            assert f"grouped-query attention {where} (its k projection has {hkv * 8} outputs" in reasons[name]
        else:
            assert "repeats them" in reasons[name] and "kept dense" in reasons[name]


def test_hand_written_grouped_query_attention_prunes_the_rest():
    import prunekit
    torch.manual_seed(0)
    model = _HandGQA().eval()
    x, y = torch.randn(32, 6, 16), torch.randint(0, 10, (32,))
    r = prunekit.prune(model, (x, y), method="autobot", flops=0.7, gate_batches=2)
    small = dict(r.model.named_modules())
    assert (small["q"].out_features, small["k"].out_features, small["v"].out_features) == (32, 16, 16)
    assert small["mlp.0"].out_features < 64
    assert r.model(x[:2]).shape == (2, 10)
    named = [s for s in r.record["skipped_groups"] if s.split(": ")[0] in ("q", "k", "v")]
    assert len(named) == 3 and all("grouped-query attention the model" in s for s in named), named


class _BroadcastGQA(_HandGQA):
    """Grouped-query attention written by broadcasting: k/v (B, hkv, 1, T, d) against q's (B, hkv, G, T, d),
    no repeat_interleave or expand; tokens (B, T, 16) -> logits (B, 10)."""

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        g = self.hq // self.hkv
        q = self.q(x).view(b, n, self.hkv, g, self.d).permute(0, 2, 3, 1, 4)          # B, hkv, G, T, d
        k = self.k(x).view(b, n, self.hkv, self.d).transpose(1, 2)[:, :, None]       # B, hkv, 1, T, d
        v = self.v(x).view(b, n, self.hkv, self.d).transpose(1, 2)[:, :, None]
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1) @ v          # B, hkv, G, T, d
        a = a.permute(0, 3, 1, 2, 4).reshape(b, n, self.hq * self.d)
        x = x + self.o(a)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("nested", [False, True], ids=["model", "submodule"])
def test_broadcast_grouped_query_attention_is_named_as_such(nested):
    """k/v heads shared by broadcasting lose torch-pruning's trace at the matmul: q, k and v were named
    "reaches the network output", which they do not; now named as grouped-query attention, as the
    repeat_interleave / expand forms are, while the real output layer keeps its reason."""
    torch.manual_seed(0)
    model = _BroadcastGQA().eval()
    if nested:
        model = _Nested()
        model.blk = _BroadcastGQA().eval()
    x = torch.randn(1, 6, 16)
    groups = find_groups(model, x)
    pre = "blk." if nested else ""
    reasons = dict(groups.skipped)
    where = "'blk'" if nested else "the model"
    for name in ("q", "k", "v"):
        assert f"grouped-query attention {where} (its k projection has 16 outputs" in reasons[pre + name], reasons
        assert "network output" not in reasons[pre + name]
    assert "reaches the network output" in reasons[pre + "head"]
    assert not {pre + n for n in "qkv"} & {m.module for g in groups for m in g.layers("out")}
