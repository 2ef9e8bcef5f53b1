"""GPT-2's Conv1D (a Linear whose weight is stored (in, out), y = x @ W + b) in the channel methods.

A tiny stand-in class named Conv1D with HuggingFace's layout (``nf`` = out, ``nx`` = in, weight
(nx, nf)) is used, so transformers is not needed; the last test builds a real GPT-2 from a
config (random weights) and is skipped without transformers. The MLP hidden units of a block
(c_fc -> act -> c_proj) are one channel group, as with nn.Linear (BERT, Llama): the shrunk model
computes the gated one, and its MACs equal the gated count and an independent count."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.costs import CostModel
from prunekit.errors import PrunekitWarning
from prunekit.structured.channel_norms import channel_norms
from prunekit.structured.gates import GatedMacs, GateHooks, fold_gates
from prunekit.structured.dependency_trace import build_graph
from prunekit.structured.groups import find_groups
from prunekit.structured.shrink import checked_groups, shrink
from prunekit.zoo.layout import apply_layout, channel_layout
from closeness import assert_close_to_scale

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads

VOCAB, WIDTH, HIDDEN, TOKENS = 23, 8, 16, 6


class Conv1D(nn.Module):
    """HuggingFace's GPT-2 Conv1D in small: weight (nx, nf), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Block(nn.Module):
    """A pre-norm GPT-2 MLP block: x + c_proj(gelu(c_fc(ln(x))))."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.c_fc, self.c_proj = Conv1D(HIDDEN, WIDTH), Conv1D(WIDTH, HIDDEN)

    def forward(self, x):
        return x + self.c_proj(F.gelu(self.c_fc(self.ln(x))))


class TinyGPT(nn.Module):
    """Token embedding, two MLP blocks of Conv1D, a final LayerNorm and a Linear head tied to the
    embedding: (B, T) ids -> (B, T, VOCAB)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.h = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.wte.weight              # tied, as GPT-2's lm_head

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))


def _model():
    torch.manual_seed(0)
    return TinyGPT().eval()


def _ids(n=4):
    return torch.randint(VOCAB, (n, TOKENS), generator=torch.Generator().manual_seed(1))


def _independent_macs(model, ids) -> int:
    """Per example: tokens x in x out of every Linear-like layer (nn.Linear, a layer named Conv1D), by hooks."""
    total = [0]

    def hook(module, inputs, out):
        fan_in = module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]
        total[0] += inputs[0].numel() // fan_in * module.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    try:
        with torch.no_grad():
            model(ids[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def test_the_mlp_hidden_units_between_two_conv1d_layers_are_a_channel_group():
    model = _model()
    groups = find_groups(model, _ids(1))
    found = {group.root: {(m.module, m.role) for m in group.members} for group in groups}
    for i in range(2):
        assert found[f"h.{i}.c_fc"] == {(f"h.{i}.c_fc", "out"), (f"h.{i}.c_proj", "in")}
    assert {group.size for group in groups} == {HIDDEN}
    # the residual stream (c_proj's outputs, through LayerNorms) stays at full width, as for nn.Linear
    assert any(root.endswith("c_proj") and "residual stream" in why for root, why in groups.skipped)


def test_torch_pruning_cuts_a_conv1d_group_through_the_transposed_linear_pruner():
    # the pruner torch-pruning traces with: its own pruning of a group cuts columns of c_fc, rows of c_proj
    model, ids = _model(), _ids()
    graph = build_graph(model, ids[:1])
    fc = model.h[0].c_fc
    group = graph.get_pruning_group(fc, graph.get_pruner_of_module(fc).prune_out_channels, [1, 4])
    assert {(item.dep.target.name.split(" ")[0], graph.is_out_channel_pruning_fn(item.dep.handler))
            for item in group} >= {("h.0.c_fc", True), ("h.0.c_proj", False)}
    keep = [i for i in range(HIDDEN) if i not in (1, 4)]
    expected_fc, expected_proj = fc.weight[:, keep].clone(), model.h[0].c_proj.weight[keep].clone()
    group.prune()
    assert fc.nf == HIDDEN - 2 and torch.equal(fc.weight, expected_fc) and tuple(fc.bias.shape) == (HIDDEN - 2,)
    assert model.h[0].c_proj.nx == HIDDEN - 2 and torch.equal(model.h[0].c_proj.weight, expected_proj)
    with torch.no_grad():
        assert model(ids).shape == (4, TOKENS, VOCAB)


def test_a_shrunk_conv1d_model_computes_the_gated_model_and_costs_what_the_gates_count():
    model, ids = _model(), _ids()
    groups = checked_groups(model, find_groups(model, ids[:1]), ids[:1])
    assert len(groups) == 2                              # checked_groups kept both MLP groups
    gen = torch.Generator().manual_seed(2)
    masks = [torch.rand(group.size, generator=gen) < 0.5 for group in groups]
    for mask in masks:
        mask[0] = True
    kept = [int(mask.sum()) for mask in masks]
    assert all(0 < k < HIDDEN for k in kept)
    with torch.no_grad():
        dense = model(ids)
        with GateHooks(model, groups) as hooks:
            hooks.values = [mask.float() for mask in masks]
            gated = model(ids)
        small = shrink(model, groups, masks, ids[:1])
        out = small(ids)
    assert float((gated - dense).abs().max()) > 1e-3 * float(dense.abs().max())   # the gates did close channels
    assert_close_to_scale(out, gated, rel=1e-5)
    for group, k in zip(groups, kept):
        block = small.get_submodule(group.root.rsplit(".", 1)[0])
        fc, proj = block.c_fc, block.c_proj
        assert tuple(fc.weight.shape) == (WIDTH, k) and fc.nf == k and tuple(fc.bias.shape) == (k,)
        assert tuple(proj.weight.shape) == (k, WIDTH) and proj.nx == k and proj.nf == WIDTH
    costs = CostModel(model, ids[:1])
    macs = GatedMacs(model, groups, costs).macs_of_masks(masks)
    assert macs == CostModel(small, ids[:1]).macs == _independent_macs(small, ids)
    assert macs == costs.macs - TOKENS * 2 * WIDTH * sum(HIDDEN - k for k in kept)


def test_folded_gates_and_channel_norms_read_a_conv1d_weight_as_in_by_out():
    model, ids = _model(), _ids()
    groups = find_groups(model, ids[:1])
    values = [torch.rand(group.size, generator=torch.Generator().manual_seed(3)) for group in groups]
    with torch.no_grad():
        with GateHooks(model, groups) as hooks:
            hooks.values = values
            gated = model(ids)
        folded = copy.deepcopy(model)
        fold_gates(folded, groups, values)
        assert_close_to_scale(folded(ids), gated, rel=1e-5)
    norms = channel_norms(model, groups)
    for group, norm in zip(groups, norms):
        fc = model.get_submodule(group.root)
        expected = (fc.weight.detach().double() ** 2).sum(0).sqrt()      # column j: channel j's weights
        assert_close_to_scale(norm, expected, rel=1e-12)


def test_autobot_prunes_conv1d_hidden_units_and_the_saved_model_loads_back(tmp_path):
    model, ids = _model(), torch.randint(VOCAB, (32, TOKENS), generator=torch.Generator().manual_seed(4))
    labels = torch.randint(VOCAB, (32, TOKENS), generator=torch.Generator().manual_seed(5))

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))

    result = prunekit.prune(copy.deepcopy(model), (ids, labels), method="autobot", flops=0.8, loss=loss,
                            gate_batches=3, finetune_epochs=0, out=str(tmp_path / "run"))
    small = result.model.eval()
    widths = [small.h[i].c_fc.nf for i in range(2)]
    assert min(widths) < HIDDEN and all(small.h[i].c_proj.weight.shape[0] == widths[i] for i in range(2))
    dense_macs = CostModel(model, ids[:1]).macs
    assert _independent_macs(small, ids) == CostModel(small, ids[:1]).macs <= 0.8 * dense_macs
    layout = channel_layout(small)
    dense_fc = {"in": WIDTH, "out": _model().h[0].c_fc.weight.shape[1]}
    assert layout["h.0.c_fc"] == {"in": WIDTH, "out": widths[0], "dense": dense_fc}
    assert layout["h.0.c_proj"] == {"in": widths[0], "out": WIDTH, "dense": {"in": dense_fc["out"], "out": WIDTH}}
    rebuilt = apply_layout(_model(), layout)
    assert tuple(rebuilt.h[1].c_fc.weight.shape) == (WIDTH, widths[1]) and rebuilt.h[1].c_fc.nf == widths[1]
    back = prunekit.load_pruned(_model(), str(tmp_path / "run")).eval()
    assert back.head.weight is back.wte.weight          # the layout leaves a layer it did not change (and its tie)
    with torch.no_grad():
        assert_close_to_scale(back(ids[:4]), small(ids[:4]), rel=1e-6)


def test_huggingface_gpt2_mlp_hidden_units_are_channel_pruned():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(100, (16, 8), generator=torch.Generator().manual_seed(1))
    groups = checked_groups(model, find_groups(model, ids[:1]), ids[:1])
    assert {group.root for group in groups} == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    masks = [torch.arange(group.size) % 3 != 1 for group in groups]
    with torch.no_grad():
        with GateHooks(model, groups) as hooks:
            hooks.values = [mask.float() for mask in masks]
            gated = model(ids[:2]).logits
        small = shrink(model, groups, masks, ids[:1])
        assert_close_to_scale(small(ids[:2]).logits, gated, rel=1e-5)
    assert small.transformer.h[0].mlp.c_fc.nf == int(masks[0].sum()) < 256

    def loss(out, y):
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))

    with pytest.warns(PrunekitWarning, match="c_attn"):          # the fused q/k/v projections are left dense, by name
        result = prunekit.prune(copy.deepcopy(model), (ids, ids), method="autobot", flops=0.7, loss=loss,
                                gate_batches=2, finetune_epochs=0)
    assert result.model.transformer.h[0].mlp.c_fc.nf < 256 or result.model.transformer.h[1].mlp.c_fc.nf < 256
    assert CostModel(result.model, ids[:1]).macs <= 0.7 * CostModel(model, ids[:1]).macs


def test_a_shrunk_conv1d_model_exports_to_onnx_with_its_narrower_layers(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator
    from prunekit.export import export_onnx
    model, ids = _model(), _ids()
    groups = find_groups(model, ids[:1])
    masks = [torch.arange(group.size) % 2 == 0 for group in groups]       # half the hidden units of each block
    small = shrink(model, groups, masks, ids[:1]).eval()
    graph = onnx.load(str(export_onnx(small, ids[:1], tmp_path / "model.onnx")))
    shapes = {tuple(init.dims) for init in graph.graph.initializer}
    assert (WIDTH, HIDDEN // 2) in shapes and (HIDDEN // 2, WIDTH) in shapes and (WIDTH, HIDDEN) not in shapes
    (got,) = ReferenceEvaluator(graph).run(None, {"input": ids.numpy()})
    with torch.no_grad():
        assert_close_to_scale(torch.from_numpy(got), small(ids), rel=1e-5)


def test_reconstruction_names_the_conv1d_layers_it_does_not_refit():
    # prunekit.refit re-fits Conv2d and Linear only: a Conv1D is listed as skipped, not silently passed over
    ids = torch.randint(VOCAB, (32, TOKENS), generator=torch.Generator().manual_seed(4))

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))

    result = prunekit.prune(_model(), (ids, ids), method="autobot", flops=0.8, loss=loss, gate_batches=3,
                            finetune_epochs=0, reconstruct_batches=2)
    (record,) = result.record["reconstruct"].values()
    assert sorted(record["skipped_why"]) == [f"h.{i}.{layer}: a Conv1D, not a Conv2d or Linear"
                                             for i in range(2) for layer in ("c_fc", "c_proj")]
    assert record["layers"] == 1                                     # the Linear head


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())        # a tied weight once


def test_autobot_with_a_params_budget_counts_conv1d_weights_and_the_tied_head_once():
    # GatedParams counts a Conv1D weight (in, out) per channel: both budgets hold by a fresh count of
    # the shrunk model (MACs by a new CostModel and by hooks, parameters by numel), the head stays
    # tied to the embedding and is counted once (in the dense count and in the kept one)
    model, ids = _model(), torch.randint(VOCAB, (32, TOKENS), generator=torch.Generator().manual_seed(4))

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))

    dense_macs, dense_params = CostModel(model, ids[:1]).macs, _numel(model)
    assert dense_params == sum(p.numel() for n, p in model.named_parameters() if n != "head.weight")
    result = prunekit.prune(copy.deepcopy(model), (ids, ids), method="autobot", flops=0.9, params=0.8, loss=loss,
                            gate_batches=3, finetune_epochs=0)
    small = result.model
    assert small.head.weight is small.wte.weight
    macs, params = CostModel(small, ids[:1]).macs, _numel(small)
    assert macs == _independent_macs(small, ids) == result.macs <= 0.9 * dense_macs
    assert params == result.record["params"] <= result.record["budget_max_params"] == int(0.8 * dense_params)
    widths = [small.h[i].c_fc.nf for i in range(2)]
    removed = sum(HIDDEN - w for w in widths)
    assert removed > 0 and params == dense_params - removed * (2 * WIDTH + 1)    # c_fc column + bias, c_proj row
    assert result.record["bound"] == "params"        # 0.8 of the parameters is the tighter budget here
    # one more hidden unit in any block would break the params budget (each costs 2 * WIDTH + 1)
    assert params + 2 * WIDTH + 1 > result.record["budget_max_params"]


def test_autobot_with_a_params_budget_on_huggingface_gpt2_keeps_lm_head_tied_and_counted_once():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(100, (16, 8), generator=torch.Generator().manual_seed(1))

    def loss(out, y):
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))

    dense_macs, dense_params = CostModel(model, ids[:1]).macs, _numel(model)
    with pytest.warns(PrunekitWarning, match="c_attn"):
        result = prunekit.prune(copy.deepcopy(model), (ids, ids), method="autobot", flops=0.8, params=0.7,
                                loss=loss, gate_batches=2, finetune_epochs=0)
    small = result.model
    assert small.lm_head.weight is small.transformer.wte.weight
    macs, params = CostModel(small, ids[:1]).macs, _numel(small)
    assert macs == result.macs <= 0.8 * dense_macs
    assert params == result.record["params"] <= result.record["budget_max_params"] == int(0.7 * dense_params)
    removed = sum(256 - small.transformer.h[i].mlp.c_fc.nf for i in range(2))
    assert params == dense_params - removed * (2 * 64 + 1)


class _FlatLogits(nn.Module):
    """TinyGPT with its logits flattened to (B*T, VOCAB), for tp-taylor's cross-entropy."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(ids).reshape(-1, VOCAB)


@pytest.mark.parametrize("method", ["tp-magnitude", "tp-taylor"])
def test_torch_pruning_baselines_prune_conv1d_hidden_units_not_the_vocabulary(method):
    # torch-pruning's own importances pass over Conv1D: the model came back untouched (above its
    # budget). Now its hidden units are cut to the budget; the head tied to wte keeps all VOCAB outputs.
    from prunekit.structured.baselines import tp_prune
    ids = torch.randint(VOCAB, (8, TOKENS), generator=torch.Generator().manual_seed(4))
    model = _FlatLogits(_model())
    pruned, _ = tp_prune(model, method, 0.6, ids[:1], [(ids, ids.reshape(-1))], iterations=8)
    dense_macs = CostModel(model, ids[:1]).macs
    macs = CostModel(pruned, ids[:1]).macs
    assert macs == _independent_macs(pruned.m, ids) <= 0.6 * dense_macs
    assert macs >= 0.45 * dense_macs                       # cut near the budget, not far below it
    widths = [pruned.m.h[i].c_fc.nf for i in range(2)]
    assert min(widths) < HIDDEN
    for i, w in enumerate(widths):
        assert tuple(pruned.m.h[i].c_fc.weight.shape) == (WIDTH, w) and pruned.m.h[i].c_proj.weight.shape[0] == w
    assert pruned.m.head.out_features == VOCAB and pruned.m.head.weight is pruned.m.wte.weight
    with torch.no_grad():
        assert pruned(ids).shape == (8 * TOKENS, VOCAB)
    if method == "tp-magnitude":
        # within a block the kept hidden units are those of largest squared norm over c_fc's column
        # and c_proj's row (torch-pruning's group L2 score, both Conv1D layers read as in x out)
        for i, w in enumerate(widths):
            fc, proj = model.m.h[i].c_fc.weight.detach(), model.m.h[i].c_proj.weight.detach()
            score = (fc ** 2).sum(0) + (proj ** 2).sum(1)
            kept = score.topk(w).indices.sort().values
            assert torch.equal(pruned.m.h[i].c_fc.weight, fc[:, kept])


def test_torch_pruning_baselines_refuse_a_model_they_cannot_bring_to_the_budget():
    # one group of 4 hidden units before a wide head: 10% of the MACs is out of torch-pruning's
    # reach (it keeps at least one unit); was returned above its budget, nothing said
    from prunekit.structured.baselines import tp_prune
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 100))
    with pytest.raises(prunekit.errors.PrunekitError, match="use method autobot or taper"):
        tp_prune(model, "tp-magnitude", 0.1, torch.randn(1, 8), iterations=4)
