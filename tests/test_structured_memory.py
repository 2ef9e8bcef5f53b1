"""The mechanisms that keep channel pruning's memory down (no memory targets here: those are
benchmarks'): budget sums without a (p,) cost vector, nonzeros without a flat copy, no dense
copy nobody reads, and torch-pruning's trace freed when the groups are found."""

import copy
import gc
import types

import torch
from torch import nn

import prunekit
from prunekit.budget import Budget
from prunekit.costs import CostModel
from prunekit.params import ParamSpace
from prunekit.structured import pipeline
from prunekit.structured.autobot import AutoBotOptions, run_autobot
from prunekit.structured.groups import find_groups


class Mixed(nn.Module):
    """An embedding (weights costing no MAC), a cross-attention (in_proj rows priced apart:
    ``element_macs``), a Linear and a conv; input (B, 5) token ids."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        e = self.emb(ids)                                   # (B, 5, 8)
        q = e[:, :2]                                        # 2 query tokens against 5 keys
        a, _ = self.attn(q, e, e, need_weights=False)       # (B, 2, 8)
        return self.head(self.conv(a.transpose(1, 2)).mean(-1))


def test_macs_summary_is_the_sum_least_and_zeros_of_the_cost_vector():
    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(11, (1, 5))
    costs = CostModel(model, ids)
    space = ParamSpace(model, costs=costs)
    assert any(costs.layer(e.name).element_macs is not None for e in space.entries if costs.has_layer(e.name))
    vector = space.macs_per_weight(costs)
    total, least, zero = space.macs_summary(costs)
    assert total == int(vector.sum()) and total > 0
    assert least == int(vector.min()) and zero == bool((vector == 0).any()) and zero     # the embedding
    priced = ParamSpace(model, costs=costs, exclude=["emb"])
    vector = priced.macs_per_weight(costs)
    assert priced.macs_summary(costs) == (int(vector.sum()), int(vector.min()), False)
    assert int(vector.min()) > 0
    # the budget resolved from the sums equals the one from the vector (fixed MACs, the cap)
    resolved = Budget.parse(flops=0.6).resolve(costs, priced)
    assert resolved.fixed_macs == costs.macs - int(vector.sum())


def test_count_nonzero_is_that_of_the_flat_copy():
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.head.weight[0] = 0
        model.conv.weight[:2] = 0
    space = ParamSpace(model, costs=CostModel(model, torch.randint(11, (1, 5))))
    assert space.count_nonzero() == int(torch.count_nonzero(space.vector()))
    assert space.count_nonzero() < space.numel


def user_method(ctx, options):       # a method not prunekit's own: may read ctx.teacher
    raise AssertionError("not run")


def test_dense_copy_only_where_a_phase_reads_it():
    assert not pipeline._reads_dense(run_autobot, AutoBotOptions(finetune_epochs=0), None)
    assert not pipeline._reads_dense(run_autobot, AutoBotOptions(finetune_epochs=2, finetune_distill=0.0), None)
    assert pipeline._reads_dense(run_autobot, AutoBotOptions(finetune_epochs=2, finetune_distill=0.9), None)
    assert pipeline._reads_dense(run_autobot, AutoBotOptions(reconstruct_batches=1), None)
    assert pipeline._reads_dense(run_autobot, AutoBotOptions(), lambda *a: {})            # the hybrid's sparsify
    assert pipeline._reads_dense(user_method, AutoBotOptions(), None)


def test_autobot_without_a_dense_copy_leaves_the_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 6), torch.randint(3, (32,))
    copies = []                      # what the pipeline module itself deep-copies (shrink's copies apart)
    counted = types.SimpleNamespace(copy=copy.copy,
                                    deepcopy=lambda obj, *a: copies.append(obj) or copy.deepcopy(obj, *a))
    monkeypatch.setattr(pipeline, "copy", counted)
    result = prunekit.prune(model, (x, y), method="autobot", flops=0.5, gate_batches=3, gate_batch_size=8,
                            batch_size=8, finetune_epochs=0)
    assert not any(c is model for c in copies)           # the pipeline made no dense copy
    assert result.model is not model and result.flops_kept <= 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_find_groups_frees_the_trace_before_returning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 3)).eval()
    x = torch.randn(64, 6)

    def activations() -> int:        # live (64, 512) tensors: the trace's, nothing else makes them
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == (64, 512))

    gc.collect()
    gc.disable()                     # no automatic collection may free what find_groups left
    try:
        start = activations()
        groups = find_groups(model, x)
        left = activations()
    finally:
        gc.enable()
    assert len(groups) == 1
    assert left == start
