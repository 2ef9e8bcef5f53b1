"""Patterns of HuggingFace transformers, in tiny hand-written replicas (transformers is not a
dependency): a dict output (ModelOutput), token and position embeddings (the position ids shared
by the batch, (1, T)), an output layer tied to the token embedding, GPT-2's Conv1D (a Linear with
its weight stored (in, out)), attention through F.scaled_dot_product_attention with separate
q/k/v Linears. Counting, per-layer gradient rows (never the vmap path) and the default loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import prunekit
from prunekit import fisher, layer_grads
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError, PrunekitWarning
from prunekit.fisher import collect_gradients
from prunekit.params import ParamSpace
from closeness import assert_close_to_scale

VOCAB, WIDTH, TOKENS, HEADS = 11, 8, 5, 2


class Output(dict):
    """A ModelOutput-like result: a dict whose items are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TransposedLinear(nn.Module):
    """GPT-2's Conv1D: y = x W + b with W stored as (in, out)."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) / inputs ** 0.5)
        self.bias = nn.Parameter(torch.randn(outputs) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class TinyLM(nn.Module):
    """Token + position embeddings (position ids (1, T), broadcast over the batch), one attention
    layer (separate q/k/v, scaled_dot_product_attention), an MLP of ``mlp`` layers and an output
    layer tied to the token embedding. ``outputs``: "tensor" (B, T, vocab) or "dict" (Output)."""

    def __init__(self, mlp=nn.Linear, outputs="tensor", padding_idx=None):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx)
        self.positions = nn.Embedding(TOKENS, WIDTH)
        self.register_buffer("position_ids", torch.arange(TOKENS).unsqueeze(0), persistent=False)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.up, self.down = mlp(WIDTH, 2 * WIDTH), mlp(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.tokens.weight
        self.outputs = outputs

    def forward(self, ids):
        b, t = ids.shape
        h = self.tokens(ids) + self.positions(self.position_ids[:, :t])
        split = lambda z: z.view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        h = h + a.transpose(1, 2).reshape(b, t, WIDTH)
        h = h + self.down(F.gelu(self.up(h)))
        logits = self.head(h)
        return Output(logits=logits) if self.outputs == "dict" else logits


def lm_loss(outputs, ids):
    """Next-token cross-entropy, token-averaged (each sequence has the same length)."""
    logits = outputs.logits if isinstance(outputs, dict) else outputs
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _model(**kwargs):
    torch.manual_seed(0)
    return TinyLM(**kwargs)


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (n, TOKENS), generator=g)


# --- counting ------------------------------------------------------------------------------------

def test_counts_a_transposed_linear_and_a_tied_output_layer():
    model = _model(mlp=TransposedLinear)
    costs = CostModel(model, _ids(1))
    linear = 3 * WIDTH * WIDTH + 2 * (WIDTH * 2 * WIDTH) + WIDTH * VOCAB       # q, k, v, up, down, head
    attention = 2 * HEADS * TOKENS * TOKENS * (WIDTH // HEADS)                 # QKᵀ and AV, full T x T
    assert costs.macs == TOKENS * linear + attention
    assert costs.layer("tokens").macs == TOKENS * WIDTH * VOCAB                 # the tied head's products
    assert costs.layer("up").macs == TOKENS * WIDTH * 2 * WIDTH


# --- the default loss and a dict output -------------------------------------------------------

def test_a_dict_output_without_loss_is_refused_in_one_line():
    model = _model(outputs="dict")
    ids = _ids(16)
    labels = torch.zeros(16, dtype=torch.long)
    with pytest.raises(PrunekitError, match=r"returns Output outputs, not a tensor of class scores \(its \.logits "
                                            r"are \(\d+, 5, 11\), not \(batch, classes\)\).*loss=") as error:
        prunekit.prune(model, (ids, labels), method="falcon", flops=0.5, fisher_samples=8)
    assert "\n" not in str(error.value)


class _Classifier(nn.Module):
    """A sequence classifier whose output is (B, classes) scores, as a tensor or as Output(logits=...)."""

    def __init__(self, outputs: str):
        super().__init__()
        self.embed, self.hidden, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 3)
        self.outputs = outputs

    def forward(self, ids):
        logits = self.head(F.relu(self.hidden(self.embed(ids).mean(1))))
        return Output(logits=logits) if self.outputs == "dict" else logits


def test_a_classifiers_dict_output_is_scored_by_its_logits_under_the_default_loss():
    # A HuggingFace-style classifier output (logits (B, classes)) needs no loss=: the same pruning,
    # loss and accuracy as the model returning the tensor itself
    ids, labels = _ids(48), torch.randint(3, (48,), generator=torch.Generator().manual_seed(2))
    results = []
    for outputs in ("tensor", "dict"):
        torch.manual_seed(0)
        model = _Classifier(outputs)
        result = prunekit.prune(model, (ids, labels), method="falcon", flops=0.5, fisher_samples=16,
                                eval_data=(ids, labels), batch_size=16)
        results.append((result, [p.detach().clone() for p in model.parameters()]))
    (tensor, tensor_weights), (scored, scored_weights) = results
    assert scored.accuracy is not None and scored.accuracy == tensor.accuracy and scored.loss == tensor.loss
    for a, b in zip(tensor_weights, scored_weights):
        assert torch.equal(a, b)


def test_a_dict_output_prunes_with_a_loss_reading_its_logits():
    model = _model(outputs="dict")
    ids = _ids(32)
    result = prunekit.prune(model, (ids, ids), method="falcon", flops=0.5, fisher_samples=8, loss=lm_loss,
                            eval_data=(ids, ids))
    counts = CostModel(_model(outputs="dict"), ids[:1]).count(model)
    assert result.flops_kept <= 0.5 and counts.flops_kept == pytest.approx(result.flops_kept, rel=1e-12)


# --- per-layer gradient rows -----------------------------------------------------------------------

def _rows_without_vmap(model, space, ids, n, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the vmap path was taken")
    monkeypatch.setattr(fisher, "collect_with_vmap", refuse)
    batches = [(ids[i:i + 4], ids[i:i + 4]) for i in range(0, ids.shape[0], 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        return collect_gradients(model, space, batches, n=n, chunk=3, progress=False, loss_fn=lm_loss)


def _per_sample_lm(model, space, ids):
    """Per-sample gradients of ``lm_loss`` by torch.func over the whole model (the reference), (n, p)."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(w, one):
        return lm_loss(functional_call(model, {**params, **buffers, **w}, (one.unsqueeze(0),)), one.unsqueeze(0))

    names = space.param_names()
    g = vmap(grad(loss), in_dims=(None, 0))({k: params[k] for k in names}, ids)
    return torch.cat([g[k].reshape(ids.shape[0], -1) for k in names], dim=1)


@pytest.mark.parametrize("mlp, padding_idx", [(nn.Linear, None), (nn.Linear, 3), (TransposedLinear, None)],
                         ids=["linear", "padding-idx", "transposed-linear"])
def test_embeddings_tied_head_and_transposed_linear_rows_are_per_sample_gradients(mlp, padding_idx,
                                                                                 monkeypatch):
    model = _model(mlp=mlp, padding_idx=padding_idx)
    ids = _ids(12)
    space = ParamSpace(model, costs=CostModel(model, ids[:1]))
    assert {"tokens", "positions", "up", "down"} <= set(space.names())
    assert not layer_grads.unsupported_layers(model, space)
    rows = _rows_without_vmap(model, space, ids, 10, monkeypatch)
    expected = _per_sample_lm(model, space, ids[:10])
    for entry in space.entries:                   # each layer on its own scale
        assert_close_to_scale(rows[:, entry.slice], expected[:, entry.slice], rel=1e-4)


def test_a_layer_that_only_looks_like_a_transposed_linear_is_not_one():
    class Squared(TransposedLinear):
        def forward(self, x):
            return super().forward(x) ** 2
    class Counting(TransposedLinear):               # state: the probe call would change it
        def __init__(self, *sizes):
            super().__init__(*sizes)
            self.register_buffer("calls", torch.zeros(()))

    torch.manual_seed(0)
    assert layer_grads.supported(TransposedLinear(4, 3))
    assert not layer_grads.supported(Squared(4, 3))
    assert not layer_grads.supported(Counting(4, 3))


class SummedPositions(TinyLM):
    """Sums the position table's lookup over its batch dimension: expanding that lookup to the
    samples would multiply it by their number."""

    def forward(self, ids):
        h = self.tokens(ids) + self.positions(self.position_ids[:, :ids.shape[1]]).sum(0)
        return self.head(h + self.down(F.gelu(self.up(h))))


def test_a_forward_that_sums_a_batch_shared_lookup_falls_back_to_exact_rows():
    torch.manual_seed(0)
    model = SummedPositions()
    ids = _ids(8)
    space = ParamSpace(model, costs=CostModel(model, ids[:1]))
    batches = [(ids[i:i + 4], ids[i:i + 4]) for i in range(0, 8, 4)]
    with pytest.warns(PrunekitWarning, match="expanding an embedding's batch-shared output changes the loss"):
        rows = collect_gradients(model, space, batches, n=8, chunk=4, progress=False, loss_fn=lm_loss)
    assert_close_to_scale(rows, _per_sample_lm(model, space, ids), rel=1e-4)


class _TupleOutput(nn.Module):
    """A classifier that returns (class scores, an auxiliary head): the default loss cannot know which to read."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc, self.aux = nn.Linear(8, 4), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(h), self.aux(h)


@pytest.mark.parametrize("method,budget", [
    ("autobot", {"flops": 0.5}), ("taper", {"flops": 0.5}), ("hybrid", {"flops": 0.4, "structured_flops": 0.6}),
    ("chita", {"sparsity": 0.5}), ("falcon", {"flops": 0.5}), ("magnitude", {"sparsity": 0.5, "gradual": True})])
def test_a_tuple_output_without_loss_is_refused_before_any_work_by_every_method(method, budget, monkeypatch):
    """Every method and mode refuses a tuple output in the same line, naming loss= and a wrapper, before the
    method runs (autobot's gates used to meet it only inside autobot_masks, after the trace and the plan)."""
    import prunekit.api

    def ran(*args, **kwargs):
        raise AssertionError("the method ran before the tuple output was refused")

    monkeypatch.setattr(prunekit.api, "execute", ran)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    with pytest.raises(PrunekitError, match=r"returns tuple outputs, not a tensor of class scores: pass loss=.*wrap "
                                            r"the model") as error:
        prunekit.prune(_TupleOutput(), (x, y), method=method, fisher_samples=8, **budget)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method,budget", [("autobot", {"flops": 0.5, "gate_batches": 2}),
                                           ("magnitude", {"sparsity": 0.5})])
def test_a_tuple_output_prunes_with_a_loss_that_reads_it(method, budget):
    """loss= reading the tuple's first part serves; a magnitude run at once reads data only for BatchNorm."""
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    loss = (lambda out, t: F.cross_entropy(out[0], t)) if method == "autobot" else None
    result = prunekit.prune(_TupleOutput(), (x, y), method=method, loss=loss, **budget)
    assert 0 < result.flops_kept <= 1
