"""One parameter count everywhere (README "Counting"): ``params`` is every parameter the model
holds (``sum(p.numel())``, a tied tensor once) less the exact zeros of its prunable weights, an
embedding's padding row never counted as removed (zero in the dense model too); ``dense_params``
the dense model's ``sum(p.numel())``; ``params_kept`` their ratio; ``nonzero_params`` the nonzero
values of every parameter, each zero alike.

Tiny token models with the structure of HuggingFace transformers (an ``nn.Embedding`` with
``padding_idx``, zero-initialised biases, an output weight tied to the embedding, attention
heads beside MLP units) are pruned by a weights method, channel methods and the hybrid; the
counts of the ``Result``, ``result.json``, ``info --json`` and ``eval --json`` must equal an
independent recount of the pruned model. transformers is not needed."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.commands.prune import prune_lines

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads

MODEL_FILE = '''
import torch
from torch import nn


class TinyTokens(nn.Module):
    """(B, T) token ids -> (B, classes): an embedding with a zero padding row, an MLP block with
    zero-initialised biases (as HuggingFace initialises them), a classifier and a head tied to the
    embedding table."""

    def __init__(self, vocab=19, width=8, hidden=12, classes=3, zero_biases=True):
        super().__init__()
        self.classes = classes
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, classes)
        self.tied = nn.Linear(width, vocab, bias=False)
        self.tied.weight = self.embed.weight
        if zero_biases:
            with torch.no_grad():
                for layer in (self.up, self.down, self.classifier):
                    layer.bias.zero_()

    def forward(self, ids):
        x = self.embed(ids)
        x = self.norm(x + self.down(torch.relu(self.up(x))))
        h = x.mean(1)
        return self.classifier(h) + self.tied(h)[:, :self.classes]


def tiny(vocab=19, width=8, hidden=12, zero_biases=True):
    return TinyTokens(vocab, width, hidden, zero_biases=zero_biases)
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("counts")
    (folder / "tokens.py").write_text(MODEL_FILE)
    sys.path.insert(0, str(folder))
    try:
        import tokens
    finally:
        sys.path.remove(str(folder))
    return folder, tokens


def recount(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero values) of ``model``, counted apart from prunekit: every parameter once
    (``model.parameters()`` gives a tied tensor once), less the zeros of Linear and Embedding
    weights outside an embedding's padding row; and the nonzero values of every parameter."""
    unique = {id(p): p.detach() for p in model.parameters()}
    size = sum(p.numel() for p in unique.values())
    nonzero = sum(int((p != 0).sum()) for p in unique.values())
    removed, seen = 0, set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            zeros = module.weight.detach() == 0
            if getattr(module, "padding_idx", None) is not None:
                zeros[module.padding_idx] = False
            removed += int(zeros.sum())
    return size - removed, nonzero


def _data(vocab: int, seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (n, 5), generator=g), torch.randint(3, (n,), generator=g)


RUNS = [   # method, budget, options
    ("magnitude", {"sparsity": 0.5}, {}),
    ("magnitude", {"params": 0.6}, {}),
    ("taper", {"flops": 0.6}, {"finetune_epochs": 0}),
    ("autobot", {"flops": 0.7, "params": 0.8}, {"gate_batches": 2, "finetune_epochs": 0}),
    ("hybrid", {"flops": 0.5, "params": 0.6}, {"structured_flops": 0.8, "finetune_epochs": 0, "fisher_samples": 32}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method,budget,options", RUNS, ids=[f"{m}-{'-'.join(b)}" for m, b, _ in RUNS])
def test_the_reported_counts_equal_a_recount(method, budget, options, seed, models):
    folder, tokens = models
    rng = random.Random(seed)
    shape = dict(vocab=rng.randint(12, 30), width=rng.choice([6, 8]), hidden=rng.randint(8, 16),
                 zero_biases=rng.random() < 0.7)
    torch.manual_seed(seed)
    dense = tokens.tiny(**shape)
    dense_size = sum(p.numel() for p in dense.parameters())
    assert recount(dense)[0] == dense_size, "the dense model has zeros where pruning makes them"
    ids, labels = _data(shape["vocab"], seed)
    out = folder / f"{method}-{'-'.join(budget)}-{seed}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prunekit.prune(dense, (ids, labels), method=method, batch_size=16, out=str(out),
                                eval_data=(ids, labels), **budget, **options)
    params, nonzero = recount(result.model)
    if any(bool((p == 0).any()) for p in result.model.parameters()):    # zero biases, a padding row
        assert nonzero < params
    record = json.loads((out / "result.json").read_text())
    assert (record["params"], record["dense_params"]) == (params, dense_size)
    assert abs(result.params_kept - params / dense_size) <= 1e-12
    assert record["nonzero_params"] == nonzero
    assert (result.params, result.dense_params, result.nonzero_params) == (params, dense_size, nonzero)
    if method in ("taper", "autobot"):        # channels removed, no zero weights: the shrunk sum(p.numel())
        assert params == sum(p.numel() for p in result.model.parameters())
    if "params" in budget:                    # the budget holds by the same count
        assert params <= int(budget["params"] * dense_size)
    line = next(line for line in prune_lines(record) if line.startswith("  params"))
    assert f"({params:,})" in line
    assert f"({params:,} of {dense_size:,})" in result.summary()


def _cli_json(argv, capsys) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method,budget,options", [RUNS[0], RUNS[3]], ids=["magnitude", "autobot"])
def test_info_and_eval_print_the_same_counts(method, budget, options, models, capsys):
    folder, tokens = models
    torch.manual_seed(3)
    model = tokens.tiny()
    ids, labels = _data(19, 3)
    out = folder / f"cli-{method}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prunekit.prune(model, (ids, labels), method=method, batch_size=16, out=str(out),
                                eval_data=(ids, labels), **budget, **options)
    params, nonzero = recount(result.model)
    info = _cli_json(["info", str(out), "--model", f"{folder}/tokens.py:tiny", "--json"], capsys)
    assert (info["params"], info["nonzero_params"]) == (params, nonzero)
    shown = sum(row["params_kept"] for row in info["layers"])      # the per-layer column adds up to the total
    assert shown == params
    capsys.readouterr()
    assert main(["info", str(out), "--model", f"{folder}/tokens.py:tiny"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total:"))
    assert total.startswith(f"total: {params:,} params") and "nonzero params" not in total
    assert f"{nonzero:,} of all parameter values nonzero" in total


def test_heads_and_channels_are_counted_apart_in_the_summary():
    """A transformer's groups hold heads and MLP units: one sum of both says nothing."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_structured_hf_heads as hf
    model, ids = hf._model(), hf._ids(32)
    labels = torch.randint(hf.CLASSES, (32,), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prunekit.prune(model, (ids, labels), method="autobot", flops=0.5, gate_batches=2,
                                finetune_epochs=0, batch_size=16, eval_data=(ids, labels))
    record = result.record
    heads = [i for i, kind in enumerate(record["group_kinds"]) if kind in ("heads", "qkv_heads")]
    units = [i for i in range(len(record["group_kinds"])) if i not in heads]
    assert heads and units
    kept = lambda chosen: sum(record["kept_channels"][i] for i in chosen)       # noqa: E731
    size = lambda chosen: sum(record["group_sizes"][i] for i in chosen)         # noqa: E731
    line = next(line for line in prune_lines(record) if line.startswith("  channels"))
    assert (f"heads {kept(heads):,} of {size(heads):,} in {len(heads)} groups, "
            f"channels {kept(units):,} of {size(units):,} in {len(units)} groups") in line, line


def test_the_per_layer_weights_kept_count_the_padding_row_as_kept(models):
    """The report's per-layer rows (``runs.layer_density``) count as ``params`` does: a masked
    embedding's padding row is kept, its other zeros removed."""
    from prunekit.costs import CostModel
    from prunekit.runs import layer_density
    _, tokens = models
    torch.manual_seed(4)
    model = tokens.tiny()
    ids, _ = _data(19, 4)
    costs = CostModel(model, ids)
    with torch.no_grad():
        model.embed.weight[5:7] = 0          # two rows pruned, beside the padding row (row 0)
    row = next(r for r in layer_density(costs, model) if r["name"] == "embed")
    assert row["params"] == row["dense_params"] - 2 * model.embed.weight.shape[1]
