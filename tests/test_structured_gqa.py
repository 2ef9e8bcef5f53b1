"""Grouped-query attention (Llama's: fewer k/v heads than q heads, each shared by several q heads)
is left dense by the channel methods, and the reason says so: "its channel trace goes round a
cycle" told the user nothing of what is not supported."""

import pytest
import torch
from torch import nn

from prunekit.structured.groups import find_groups, unexpected_skips


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
    from prunekit.structured.groups import grouped_query_attention
    model = nn.Module()
    model.attn = _Attention(heads=4, kv_heads=4)
    modules = dict(model.named_modules())
    assert grouped_query_attention(modules, "attn.q_proj") is None
    model.attn = _Attention(heads=4, kv_heads=4, counts=False)
    assert grouped_query_attention(dict(model.named_modules()), "attn.k_proj") is None
