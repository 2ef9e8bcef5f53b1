"""An output head tied to an embedding table with a padding row computes that row's outputs as any
other's: its zeros are compute done, not MACs removed. A dense model reported flops_kept just
under 1 (the padding row's MACs counted as removed); a pruned one was charged too little."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.costs import CostModel

TOKENS = 6


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(20, 8, padding_idx=0)
        self.mid = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.wte.weight                   # tied: the padding row is a row of the head

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.wte(ids)))).mean(1)


def _recount(model) -> int:
    """MACs by hand: per token, one per weight of mid and head that is nonzero or in the padding row."""
    head = model.head.weight.detach()
    computed = int(torch.count_nonzero(head)) + int((head[model.wte.padding_idx] == 0).sum())
    return TOKENS * (int(torch.count_nonzero(model.mid.weight)) + computed)


def test_a_dense_model_keeps_all_its_macs():
    model, ids = _TiedLM(), torch.randint(1, 20, (1, TOKENS))
    assert bool((model.wte.weight[0] == 0).all())
    counts = CostModel(model, ids).count(model)
    assert counts.macs == counts.dense_macs == _recount(model) == TOKENS * (8 * 8 + 20 * 8)
    assert counts.flops_kept == 1.0


def test_a_masked_model_is_charged_for_the_padding_row_it_still_computes():
    model, ids = _TiedLM(), torch.randint(1, 20, (1, TOKENS))
    costs = CostModel(model, ids)
    with torch.no_grad():
        model.head.weight[5:12] = 0                            # rows removed by pruning
        model.mid.weight[:, :3] = 0
    counts = costs.count(model)
    assert counts.macs == _recount(model) == TOKENS * (8 * 5 + (20 - 7) * 8)
    assert counts.flops_kept == pytest.approx(counts.macs / (TOKENS * (8 * 8 + 20 * 8)), rel=1e-12)


def test_a_flops_budget_holds_on_the_honest_count():
    model, ids = _TiedLM(), torch.randint(1, 20, (16, TOKENS))
    y = torch.randint(0, 20, (16,))
    result = prunekit.prune(model, (ids, y), method="magnitude", flops=0.5, example_input=ids[:1])
    assert bool((model.wte.weight[0] == 0).all())            # the padding row stays zero
    assert _recount(model) == CostModel(model, ids[:1]).count(model).macs
    assert _recount(model) <= 0.5 * TOKENS * (8 * 8 + 20 * 8)
    assert result.flops_kept == pytest.approx(_recount(model) / (TOKENS * (8 * 8 + 20 * 8)), rel=1e-9)
