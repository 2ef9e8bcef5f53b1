"""Attention heads of HuggingFace-style self-attention (separate q/k/v nn.Linear layers, a head
count and a head size read at forward time: BERT's BertSelfAttention, ViT's attention) in the
channel methods.

A tiny stand-in with BertSelfAttention's forward (q, k, v viewed as (B, T, heads, head_size))
is used, so transformers is not needed; the last tests build a real BERT and ViT from configs
(random weights) and are skipped without transformers. A head is its head_size rows of q, k
and v and columns of the output projection; the shrunk module's head count follows, so it
computes what the gated model computes, and its MACs (the attention products QKᵀ and AV
included) equal the gated count and an independent count."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.structured.gates import GatedMacs, GatedParams, GateHooks
from prunekit.structured.groups import find_groups
from prunekit.structured.left_dense import dense_groups_warning
from prunekit.structured import rounding
from prunekit.structured.shrink import checked_groups, shrink
from prunekit.zoo.layout import apply_layout, channel_layout
from closeness import assert_close_to_scale

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads

VOCAB, WIDTH, HEADS, HIDDEN, TOKENS, CLASSES = 23, 16, 4, 24, 6, 3
HEAD_SIZE = WIDTH // HEADS


class SelfAttention(nn.Module):
    """BertSelfAttention in small: q, k, v Linears; the head count and head size are read in forward."""

    def __init__(self):
        super().__init__()
        self.num_attention_heads = HEADS
        self.attention_head_size = HEAD_SIZE
        self.all_head_size = HEADS * HEAD_SIZE
        self.query, self.key, self.value = (nn.Linear(WIDTH, self.all_head_size) for _ in range(3))

    def heads_of(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.heads_of(self.query(x)), self.heads_of(self.key(x)), self.heads_of(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), -1)
        out = (probs @ v).transpose(1, 2)
        return out.reshape(*out.shape[:2], self.all_head_size)


class ConfigHeadsAttention(SelfAttention):
    """An attention whose forward reshapes by a head count of its own (as a config would hold it),
    not the attribute the head surgery lowers: removing heads cannot be followed."""

    def __init__(self):
        super().__init__()
        self.config_heads = HEADS

    def heads_of(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.config_heads, -1).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.heads_of(self.query(x)), self.heads_of(self.key(x)), self.heads_of(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), -1)
        out = (probs @ v).transpose(1, 2)
        return out.reshape(*out.shape[:2], -1)


class Block(nn.Module):
    """A BERT layer: attention (self + output dense, add & LayerNorm), then an MLP (add & LayerNorm)."""

    def __init__(self, attention=SelfAttention):
        super().__init__()
        self.self = attention()
        self.dense, self.ln1 = nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH)
        self.up, self.down, self.ln2 = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH), nn.LayerNorm(WIDTH)

    def forward(self, x):
        x = self.ln1(x + self.dense(self.self(x)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class TinyBert(nn.Module):
    """Token embedding, two blocks, a classifier on the mean token: (B, T) ids -> (B, CLASSES)."""

    def __init__(self, attention=SelfAttention):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList([Block(attention), Block(attention)])
        self.classifier = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.mean(1))


def _model(attention=SelfAttention):
    torch.manual_seed(0)
    return TinyBert(attention).eval()


def _ids(n=4, seed=1):
    return torch.randint(VOCAB, (n, TOKENS), generator=torch.Generator().manual_seed(seed))


def _independent_macs(model, ids) -> int:
    """Per example, by hooks: tokens x in x out of every Linear, plus each attention's two products
    QKᵀ and AV over T x T, heads x head_size each (heads read from its q weight's rows)."""
    total = [0]

    def linear(module, inputs, out):
        total[0] += inputs[0].numel() // module.in_features * module.weight.numel()

    def attention(module, inputs, out):
        t = inputs[0].shape[1]
        total[0] += 2 * t * t * module.query.out_features

    handles = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(attention) for m in model.modules() if isinstance(m, SelfAttention)]
    try:
        with torch.no_grad():
            model(ids[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def test_the_heads_of_hf_style_attention_are_a_group_of_heads():
    model, ids = _model(), _ids()
    groups = checked_groups(model, find_groups(model, ids[:1]), ids[:1])
    heads = sorted((group for group in groups if group.kind == "qkv_heads"), key=lambda group: group.attention)
    assert [group.attention for group in heads] == ["layers.0.self", "layers.1.self"]
    for i, group in enumerate(heads):
        assert group.size == HEADS and str(group).endswith(f"{HEADS} heads, 4 members)")
        assert {(m.module, m.role, m.repeat) for m in group.members} == {
            (f"layers.{i}.self.{p}", "out", HEAD_SIZE) for p in ("query", "key", "value")} | {
            (f"layers.{i}.dense", "in", HEAD_SIZE)}
    # nothing left dense but the logits and the residual stream (was: both q/k/v groups, as channels)
    assert all("output" in why or "residual stream" in why for _, why in groups.skipped)


def test_a_model_without_some_heads_computes_the_gated_model_and_costs_what_the_gates_count():
    model, ids = _model(), _ids()
    groups = checked_groups(model, find_groups(model, ids[:1]), ids[:1])
    masks = [torch.arange(group.size) % 3 != 1 for group in groups]          # heads 1 of 4 closed; channels too
    masks[[g.attention for g in groups].index("layers.0.self")][2] = False    # and a second head in layer 0
    with torch.no_grad():
        dense = model(ids)
        with GateHooks(model, groups) as hooks:
            hooks.values = [mask.float() for mask in masks]
            gated = model(ids)
        small = shrink(model, groups, masks, ids[:1])
        out = small(ids)
    assert float((gated - dense).abs().max()) > 1e-3 * float(dense.abs().max())   # the gates did close heads
    assert_close_to_scale(out, gated, rel=1e-5)
    kept = {group.attention: int(mask.sum()) for group, mask in zip(groups, masks) if group.kind == "qkv_heads"}
    assert kept == {"layers.0.self": 2, "layers.1.self": 3}
    for name, k in kept.items():
        attention = small.get_submodule(name)
        assert attention.num_attention_heads == k and attention.all_head_size == k * HEAD_SIZE
        assert tuple(attention.value.weight.shape) == (k * HEAD_SIZE, WIDTH)
        assert small.get_submodule(name.replace("self", "dense")).in_features == k * HEAD_SIZE
    costs = CostModel(model, ids[:1])
    macs = GatedMacs(model, groups, costs).macs_of_masks(masks)
    assert macs == CostModel(small, ids[:1]).macs == _independent_macs(small, ids)
    # the attention products shrink with the heads: T x T x head_size twice per head removed
    products = sum(costs.layer(name).activation_macs for name in kept)
    assert products == 2 * 2 * TOKENS * TOKENS * WIDTH
    assert CostModel(small, ids[:1]).activation_macs == products * sum(kept.values()) // (2 * HEADS)
    assert GatedParams(model, groups).params_of_masks(masks) == sum(p.numel() for p in small.parameters())


@pytest.mark.parametrize("method", ["autobot", "taper"])
def test_the_channel_methods_remove_heads_and_the_saved_run_loads_back(method, tmp_path):
    model, ids = _model(), _ids(32, seed=4)
    labels = torch.randint(CLASSES, (32,), generator=torch.Generator().manual_seed(5))
    extra = {"gate_batches": 3} if method == "autobot" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", prunekit.errors.PrunekitWarning)     # no group left dense is warned of
        result = prunekit.prune(copy.deepcopy(model), (ids, labels), method=method, flops=0.6, finetune_epochs=0,
                                out=str(tmp_path / "run"), **extra)
    small = result.model.eval()
    heads = [small.layers[i].self.num_attention_heads for i in range(2)]
    assert min(heads) < HEADS
    dense_macs = CostModel(model, ids[:1]).macs
    assert _independent_macs(small, ids) == CostModel(small, ids[:1]).macs == result.macs <= 0.6 * dense_macs
    layout = channel_layout(small)
    for i in range(2):
        assert layout[f"layers.{i}.self"] == {"attention_heads": heads[i], "head_size": HEAD_SIZE,
                                              "dense": {"attention_heads": HEADS, "head_size": HEAD_SIZE}}
        assert layout[f"layers.{i}.self.query"] == {"in": WIDTH, "out": heads[i] * HEAD_SIZE,
                                                   "dense": {"in": WIDTH, "out": HEADS * HEAD_SIZE}}
    back = prunekit.load_pruned(_model(), str(tmp_path / "run")).eval()
    assert [back.layers[i].self.num_attention_heads for i in range(2)] == heads
    with torch.no_grad():
        assert_close_to_scale(back(ids[:4]), small(ids[:4]), rel=1e-6)


def test_channel_multiple_counts_a_head_as_head_size_channels():
    # channel_multiple 8 with heads of 4 channels: any even head count is a multiple of 8 channels
    # (was: a group of 4 heads, below 8, was never pruned)
    model, ids = _model(), _ids(32, seed=4)
    groups = checked_groups(model, find_groups(model, ids[:1]), ids[:1])
    assert sorted(rounding.group_multiple(group, 8) for group in groups) == [2, 2, 8, 8]
    counter = GatedMacs(model, groups, CostModel(model, ids[:1]))
    floor = [torch.arange(g.size) < (2 if g.kind == "qkv_heads" else 8) for g in groups]
    assert rounding.minimum_rounded_macs(counter, 8) == counter.macs_of_masks(floor)
    labels = torch.randint(CLASSES, (32,), generator=torch.Generator().manual_seed(5))
    result = prunekit.prune(copy.deepcopy(model), (ids, labels), method="autobot", flops=0.6, gate_batches=3,
                            finetune_epochs=0, channel_multiple=8)
    small = result.model
    heads = [small.layers[i].self.num_attention_heads for i in range(2)]
    assert all(h % 2 == 0 for h in heads) and min(heads) < HEADS
    assert all(small.layers[i].up.out_features % 8 == 0 for i in range(2))
    assert CostModel(small, ids[:1]).macs == result.macs <= 0.6 * CostModel(model, ids[:1]).macs


def test_a_layout_with_more_heads_than_the_model_passed_is_refused_in_one_line():
    layout = channel_layout(_model())
    layout["layers.0.self"] = {"attention_heads": HEADS + 2, "head_size": HEAD_SIZE}
    with pytest.raises(PrunekitError, match="has 6 heads of 4 in the saved model, 4 of 4") as err:
        apply_layout(_model(), layout)
    assert "\n" not in str(err.value)
    layout = channel_layout(_model())
    layout["embed"] = {"attention_heads": 2, "head_size": HEAD_SIZE}      # not an attention module
    with pytest.raises(PrunekitError, match="another architecture"):
        apply_layout(_model(), layout)


def test_an_attention_whose_forward_does_not_follow_the_head_count_is_left_dense_by_name():
    model, ids = _model(ConfigHeadsAttention), _ids()
    groups = checked_groups(model, find_groups(model, ids[:1]), ids[:1])
    assert all(group.kind == "channels" for group in groups) and len(groups) == 2      # the MLP groups
    named = {root: why for root, why in groups.skipped}
    for i in range(2):
        assert named[f"layers.{i}.self"].startswith("attention heads kept: with heads removed")
    assert dense_groups_warning(groups.skipped).startswith("2 channel groups left dense")


def _hf_model(transformers, kind):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=100, num_labels=CLASSES)
        return transformers.BertForSequenceClassification(config).eval()
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config).eval()


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_huggingface_bert_and_vit_attention_heads_are_removed(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _hf_model(transformers, kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(100, (32, 8), generator=gen) if kind == "bert" else torch.randn(32, 3, 32, 32, generator=gen)
    y = torch.randint(CLASSES, (32,), generator=gen)
    groups = checked_groups(model, find_groups(model, x[:1]), x[:1])
    heads = [group for group in groups if group.kind == "qkv_heads"]
    assert len(heads) == 2 and all(group.size == 4 for group in heads)
    masks = [torch.arange(group.size) % 2 == 0 for group in groups]
    with torch.no_grad():
        with GateHooks(model, groups) as hooks:
            hooks.values = [mask.float() for mask in masks]
            gated = model(x[:4]).logits
        small = shrink(model, groups, masks, x[:1])
        assert_close_to_scale(small(x[:4]).logits, gated, rel=1e-5)
    costs = CostModel(model, x[:1])
    assert GatedMacs(model, groups, costs).macs_of_masks(masks) == CostModel(small, x[:1]).macs
    with warnings.catch_warnings():
        warnings.simplefilter("error", prunekit.errors.PrunekitWarning)     # no group left dense is warned of
        result = prunekit.prune(copy.deepcopy(model), (x, y), method="autobot", flops=0.6, gate_batches=3,
                                finetune_epochs=0, out=str(tmp_path / "run"))
    pruned = result.model.eval()
    assert CostModel(pruned, x[:1]).macs == result.macs <= 0.6 * costs.macs
    back = prunekit.load_pruned(_hf_model(transformers, kind), str(tmp_path / "run")).eval()
    with torch.no_grad():
        assert_close_to_scale(back(x[:4]).logits, pruned(x[:4]).logits, rel=1e-6)
