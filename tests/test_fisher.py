"""Gradient rows against plain autograd, one sample or one mini-batch at a time."""

import math
import warnings

import pytest
import torch
from torch import nn

from prunekit import fisher
from prunekit.errors import PrunekitError
from prunekit.fisher import collect_gradients
from prunekit.params import ParamSpace
from closeness import assert_close_to_scale


def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 16, 4))
    model[1].running_mean.uniform_(-0.5, 0.5)   # nontrivial eval-mode statistics
    return model


def data(n):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + 5], y[i:i + 5]) for i in range(0, n, 5)]   # batches of 5, re-cut inside


def autograd_row(model, space, x, y):
    model.eval()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([w.grad.reshape(-1) for w in space.weights()])


def test_per_sample_rows_match_autograd():
    model = tiny_model()
    space = ParamSpace(model)
    rows = collect_gradients(model, space, data(12), n=12, chunk=4, progress=False)
    x = torch.cat([b[0] for b in data(12)])
    y = torch.cat([b[1] for b in data(12)])
    expected = torch.stack([autograd_row(model, space, x[i:i + 1], y[i:i + 1]) for i in range(12)])
    assert rows.shape == (12, space.numel)
    assert_close_to_scale(rows, expected, rel=1e-5)


def test_mini_batch_rows_are_mean_gradients():
    model = tiny_model()
    space = ParamSpace(model)
    rows = collect_gradients(model, space, data(20), n=3, batch=6, progress=False)
    x = torch.cat([b[0] for b in data(20)])
    y = torch.cat([b[1] for b in data(20)])
    for i in range(3):
        assert_close_to_scale(rows[i], autograd_row(model, space, x[6 * i:6 * i + 6], y[6 * i:6 * i + 6]),
                              rel=1e-5)


def test_too_little_data_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(PrunekitError, match="fisher_samples"):
        collect_gradients(model, ParamSpace(model), data(10), n=4, batch=3, progress=False)


# --- the per-layer hook path against the vmap path (the collector before it) ------------------

def _vmap_rows(model, space, batches, n, batch=1, chunk=4, dtype=torch.float32):
    rows = torch.empty(n, space.numel, dtype=dtype)
    model.eval()
    fisher.collect_with_vmap(model, space, batches, rows, batch, chunk, progress=False)
    return rows


class _Shared(nn.Module):
    """One Linear used twice (its gradient is the sum of both uses) and one never used."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        x = x.flatten(1)[:, :6]
        return self.out(torch.tanh(self.inp(torch.tanh(self.inp(x)))))


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(inplace=True), nn.Linear(10, 4))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True),   # ReLU on the first output
                        nn.Conv2d(4, 4, 1), nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, groups=2, padding="same"), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4, 4))
    cnn[4].running_mean.uniform_(-0.5, 0.5)
    cnn[7].running_var.uniform_(0.5, 2.0)
    depthwise = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),    # depthwise
                              nn.Conv2d(8, 16, 3, padding=1, groups=8, padding_mode="reflect"),  # multiplier 2
                              nn.Conv2d(16, 8, 1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return {"mlp": mlp, "cnn_bn": cnn, "depthwise": depthwise, "shared": _Shared()}


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "depthwise", "shared"])
@pytest.mark.parametrize("batch", [1, 3])
def test_hook_rows_equal_vmap_rows(name, batch):
    model = _models()[name]
    space = ParamSpace(model)
    n = 12 if batch == 1 else 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*vmap")     # the hook path must not fall back here
        rows = collect_gradients(model, space, data(20), n=n, batch=batch, chunk=5, progress=False)
    expected = _vmap_rows(model, space, data(20), n, batch=batch)
    assert rows.shape == (n, space.numel)
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_parameters_keep_requires_grad_and_mode():
    model = _models()["cnn_bn"]
    model[0].weight.requires_grad_(False)
    model.train()
    collect_gradients(model, ParamSpace(model), data(10), n=4, progress=False)
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compact_storage_is_the_float32_rows_rounded(dtype):
    model = _models()["cnn_bn"]
    space = ParamSpace(model)
    full = collect_gradients(model, space, data(10), n=8, chunk=3, progress=False)
    compact = collect_gradients(model, space, data(10), n=8, chunk=3, dtype=dtype, progress=False)
    assert compact.dtype == dtype
    torch.testing.assert_close(compact, full.to(dtype), rtol=0, atol=0)


class _Bilinear(nn.Module):
    """A layer type the per-layer path has no formula for (nn.Bilinear), before a Linear one."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Bilinear(8, 8, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = x.reshape(x.shape[0], 16)
        return self.head(torch.tanh(self.mix(x[:, :8], x[:, 8:])))


def test_unsupported_layer_falls_back_to_vmap_with_a_warning():
    torch.manual_seed(0)
    model = _Bilinear()
    space = ParamSpace(model)
    batches = data(10)
    with pytest.warns(UserWarning, match="attention only; mix use the slower vmap"):
        rows = collect_gradients(model, space, batches, n=6, progress=False)
    torch.testing.assert_close(rows, _vmap_rows(model, space, batches, 6))


class _RowRNN(nn.Module):
    """The 4 rows of a 4 x 4 image as 4 time steps of a recurrent layer, the last state classified."""

    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.rnn(x.flatten(1, 2))[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_recurrent_layer_vmap_cannot_run_gets_rows_one_sample_at_a_time(cell):
    """torch.func.vmap fails inside GRU/RNN (their unbatched hidden state is written in place):
    chita/falcon on such a model stopped with a RuntimeError traceback."""
    torch.manual_seed(0)
    model = _RowRNN(cell)
    space = ParamSpace(model)
    with pytest.warns(UserWarning, match="attention only"), pytest.warns(UserWarning, match="one sample at a time"):
        rows = collect_gradients(model, space, data(10), n=7, chunk=4, progress=False)
    x = torch.cat([b[0] for b in data(10)])
    y = torch.cat([b[1] for b in data(10)])
    expected = torch.stack([autograd_row(model, space, x[i:i + 1], y[i:i + 1]) for i in range(7)])
    assert_close_to_scale(rows, expected, rel=1e-5)


class _Tied(nn.Module):
    """The output layer's weight is also used functionally: its hooked gradient misses that use."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        return self.out(h) + h @ self.out.weight


def test_weight_used_outside_its_layer_is_caught_and_falls_back():
    torch.manual_seed(0)
    model = _Tied()
    space = ParamSpace(model)
    with pytest.warns(UserWarning, match="disagree with autograd"):
        rows = collect_gradients(model, space, data(10), n=6, progress=False)
    torch.testing.assert_close(rows, _vmap_rows(model, space, data(10), 6))


def test_fallback_after_the_check_reads_a_one_pass_iterator_from_its_start():
    # The _Tied model's hook rows fail the first-row check after a batch is read; a generator
    # cannot be restarted, and the vmap rows must still begin with its first sample (seen on a
    # GPU: rows came up one batch short).
    torch.manual_seed(0)
    model = _Tied()
    space = ParamSpace(model)
    with pytest.warns(UserWarning, match="disagree with autograd"):
        rows = collect_gradients(model, space, iter(data(10)), n=10, chunk=5, progress=False)
    torch.testing.assert_close(rows, _vmap_rows(model, space, data(10), 10))


def _disagree_first(monkeypatch, times: int) -> tuple[list, list]:
    """Make the check against autograd disagree on its first ``times`` calls (as float32 rounding
    at a ReLU's kink can once); returns (the samples each check was given, the vmap fallback's calls)."""
    from prunekit import fisher_hooks
    checked, fallbacks = [], []
    original_check, original_vmap = fisher_hooks._check_row, fisher.collect_with_vmap

    def check(model, space, pieces, row, chunk, loss_fn=None):
        checked.append(sum(x.shape[0] for x, _ in pieces))
        if len(checked) <= times:
            raise fisher_hooks.HooksDisagree(f"layer '0': made up {len(checked)}")
        original_check(model, space, pieces, row, chunk, loss_fn)

    def vmap(*args, **kwargs):
        fallbacks.append(1)
        return original_vmap(*args, **kwargs)
    monkeypatch.setattr(fisher_hooks, "_check_row", check)
    monkeypatch.setattr(fisher, "collect_with_vmap", vmap)
    return checked, fallbacks


@pytest.mark.parametrize("batch", [1, 6])
def test_one_disagreement_is_checked_again_on_the_next_row_and_the_hooks_kept(monkeypatch, batch):
    # per-sample rows: the next sample of the chunk; mini-batch rows: the next mini-batch
    model = tiny_model()
    space = ParamSpace(model)
    checked, fallbacks = _disagree_first(monkeypatch, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = collect_gradients(model, space, data(20), n=3, batch=batch, chunk=4, progress=False)
    assert checked == [batch, batch] and not fallbacks
    x = torch.cat([b[0] for b in data(20)])
    y = torch.cat([b[1] for b in data(20)])
    for i in range(3):
        part = slice(i, i + 1) if batch == 1 else slice(6 * i, 6 * i + 6)
        assert_close_to_scale(rows[i], autograd_row(model, space, x[part], y[part]), rel=1e-5)


def test_two_disagreements_or_no_row_left_to_check_fall_back(monkeypatch):
    model = tiny_model()
    space = ParamSpace(model)
    checked, fallbacks = _disagree_first(monkeypatch, 2)
    with pytest.warns(UserWarning, match="made up 1; again on another sample: .*made up 2"):
        rows = collect_gradients(model, space, data(10), n=6, chunk=5, progress=False)
    assert checked == [1, 1] and len(fallbacks) == 1
    torch.testing.assert_close(rows, _vmap_rows(model, space, data(10), 6))

    checked, fallbacks = _disagree_first(monkeypatch, 1)
    with pytest.warns(UserWarning, match="made up 1"):       # one row in all: none to check again
        collect_gradients(model, space, data(10), n=1, progress=False)
    assert checked == [1] and len(fallbacks) == 1


class _RecordsPrecision(nn.Module):
    """Records, at each forward, whether convolutions may use TF32 and the matmul precision."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.seen = []

    def forward(self, x):
        conv = torch.backends.cudnn.conv
        self.seen.append((conv.fp32_precision, torch.get_float32_matmul_precision()))
        return self.fc(x.flatten(1))


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no fp32_precision")
def test_rows_are_computed_without_tf32_and_the_settings_are_restored():
    # On a GPU, TF32 convolutions put the rows 10% off autograd (measured on an H200); the
    # settings are what a CPU can check.
    model = _RecordsPrecision()
    before = (torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")
    try:
        collect_gradients(model, ParamSpace(model), data(6), n=6, progress=False)
        assert model.seen and set(model.seen) == {("ieee", "highest")}
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.conv.fp32_precision == before[0]
    finally:
        torch.set_float32_matmul_precision(before[1])


class _TokenModel(nn.Module):
    """A tiny language-model head: (B, T) tokens -> (B, T, V) logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 7)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _token_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten())


def _regression_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 1, 4, 4, generator=g), torch.randn(12, 3, generator=g)
    return model, nn.MSELoss(), x, y


def _token_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 7, (12, 5), generator=g)
    return _TokenModel(), _token_loss, tokens, torch.roll(tokens, -1, dims=1)


@pytest.mark.parametrize("case", [_regression_case, _token_case], ids=["mse", "tokens"])
@pytest.mark.parametrize("batch", [1, 4])
def test_rows_of_the_users_loss_are_its_per_sample_gradients(case, batch):
    """Per-sample (and mini-batch) rows of a loss that is not cross-entropy on class indices:
    a regression's MSE (hook path) and a language model's token loss (vmap path: Embedding)."""
    model, loss_fn, x, y = case()
    space = ParamSpace(model)
    n = 12 // batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # the Embedding's vmap notice
        rows = collect_gradients(model, space, [(x, y)], n=n, batch=batch, chunk=5, progress=False,
                                 loss_fn=loss_fn)
    expected = []
    for i in range(n):
        model.zero_grad()
        loss_fn(model(x[i * batch:(i + 1) * batch]), y[i * batch:(i + 1) * batch]).backward()
        expected.append(torch.cat([w.grad.reshape(-1) for w in space.weights()]))
    assert_close_to_scale(rows, torch.stack(expected), rel=1e-5)


# --- batches of different shapes (sequences of several lengths) -----------------------------

def _varlen_batches():
    """Batches of 4 token sequences of lengths 5, 3, 5: a chunk or a mini-batch of 6 spans two shapes."""
    g = torch.Generator().manual_seed(4)
    out = []
    for length in (5, 3, 5):
        tokens = torch.randint(0, 7, (4, length), generator=g)
        out.append((tokens, torch.roll(tokens, -1, dims=1)))
    return out


def _mean_gradient(model, space, pieces):
    """The gradient of the mean over the pieces' samples of their per-sample token losses."""
    model.zero_grad()
    total = sum(x.shape[0] for x, _ in pieces)
    sum(_token_loss(model(x), y) * x.shape[0] for x, y in pieces).div(total).backward()
    return torch.cat([w.grad.reshape(-1) for w in space.weights()])


@pytest.mark.parametrize("path", ["hooks", "vmap"])
def test_per_sample_rows_of_batches_of_different_lengths(path):
    model = _TokenModel()
    space = ParamSpace(model)
    if path == "hooks":
        with warnings.catch_warnings():
            warnings.simplefilter("error")                 # the hooks' rows, not a fallback
            rows = collect_gradients(model, space, _varlen_batches(), n=12, chunk=5, progress=False,
                                     loss_fn=_token_loss)
    else:
        rows = torch.empty(12, space.numel)
        fisher.collect_with_vmap(model, space, _varlen_batches(), rows, 1, 5, progress=False, loss_fn=_token_loss)
    samples = [(x[i:i + 1], y[i:i + 1]) for x, y in _varlen_batches() for i in range(x.shape[0])]
    expected = torch.stack([_mean_gradient(model, space, [s]) for s in samples])
    assert_close_to_scale(rows, expected, rel=1e-5)


@pytest.mark.parametrize("path", ["hooks", "vmap"])
def test_mini_batch_rows_spanning_two_lengths_are_their_samples_mean_gradient(path):
    model = _TokenModel()
    space = ParamSpace(model)
    if path == "hooks":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows = collect_gradients(model, space, _varlen_batches(), n=2, batch=6, chunk=4, progress=False,
                                     loss_fn=_token_loss)
    else:
        rows = torch.empty(2, space.numel)
        fisher.collect_with_vmap(model, space, _varlen_batches(), rows, 6, 4, progress=False, loss_fn=_token_loss)
    (x1, y1), (x2, y2), (x3, y3) = _varlen_batches()
    expected = [_mean_gradient(model, space, [(x1, y1), (x2[:2], y2[:2])]),
                _mean_gradient(model, space, [(x2[2:], y2[2:]), (x3, y3)])]
    assert_close_to_scale(rows, torch.stack(expected), rel=1e-5)


def test_batch_statistics_rows_refuse_batches_of_different_shapes_in_one_line():
    model = nn.Sequential(nn.Embedding(7, 6), nn.BatchNorm1d(5), nn.Flatten(), nn.Linear(30, 7))
    with pytest.raises(PrunekitError, match=r"^fisher_bn='batch' .*pad them to one shape[^\n]*$"):
        collect_gradients(model, ParamSpace(model), _varlen_batches(), n=2, batch=4, bn="batch", progress=False,
                          loss_fn=lambda out, y: out.sum())


def test_regroup_of_one_shape_recuts_the_tensors_as_one_stream():
    from prunekit.fisher_batches import regroup
    batches = [(torch.arange(i, i + k).view(k, 1).float(), torch.arange(i, i + k)) for i, k in ((0, 3), (3, 5), (8, 2))]
    groups = list(regroup(batches, 4))
    assert [len(g) for g in groups] == [1, 1, 1]
    assert [g[0][1].tolist() for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# --- half precision: the check against autograd allows the dtype's rounding, not a wrong term ----

class _TokenTypes(nn.Module):
    """Tokens plus a token-type embedding looked up at type 0 for every position (as BERT's):
    autograd's half-precision backward sums the 64 positions of that one row in its dtype (off by several roundings)."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(50, 16)
        self.types = nn.Embedding(2, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.words(tokens) + self.types(torch.zeros_like(tokens))
        return self.head(nn.functional.layer_norm(h, (16,))).mean(1)


def test_float16_autograd_drifting_over_many_positions_is_not_a_disagreement_but_a_wrong_term_is():
    """At 2048 positions float16 autograd's token-type embedding gradient is itself ~5% off (its
    backward sums the positions in float16), past float16's tolerance 1.6e-2: the hooks' row is
    checked again against a float32 copy's autograd and kept. Seen on a float16 BERT at 512 tokens."""
    from prunekit import fisher_hooks
    torch.manual_seed(0)
    model = _TokenTypes().to(torch.float16)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 50, (8, 2048), generator=g), torch.randint(0, 3, (8,), generator=g))]
    space = ParamSpace(model)
    x, y = batches[0][0][:1], batches[0][1][:1]
    wide = _TokenTypes().to(torch.float32)
    wide.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    half_ref, float_ref = autograd_row(model, space, x, y).float(), autograd_row(wide, ParamSpace(wide), x, y)
    types = space.entries[[e.module_name for e in space.entries].index("types")].slice
    drift = float((half_ref[types] - float_ref[types]).norm() / float_ref[types].norm())
    assert drift > fisher_hooks.tolerance(torch.float16)       # the float16 reference is what is off
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no "disagree with autograd" fallback
        rows = collect_gradients(model, space, batches, n=2, chunk=2, progress=False)
    assert float((rows[0, types].float() - float_ref[types]).norm() / float_ref[types].norm()) < 1e-2
    torch.manual_seed(0)
    tied = _Tied().to(torch.float16)                    # a use of a weight the hooks miss: off both references
    with pytest.warns(UserWarning, match="disagree with autograd"):
        collect_gradients(tied, ParamSpace(tied), [(x.to(torch.float16), y) for x, y in data(10)], n=6,
                          progress=False)


def test_the_float32_recheck_copy_casts_straight_and_is_skipped_where_memory_is_short(monkeypatch):
    """The re-check's float32 copy deep-copied the whole half-precision model, then cast it (the
    half copy and the float32 one at once: 3x the model, not in the memory plan). Now each half
    tensor is cast straight into the copy (no half tensor is deep-copied; tied ones stay tied, the
    model is untouched), and where the copy would take more than FLOAT32_COPY_SHARE of the memory
    available the re-check is skipped (None: the half-precision verdict stands)."""
    from prunekit import fisher_hooks, process_memory
    torch.manual_seed(0)
    model = _TokenTypes().to(torch.float16)
    model.register_buffer("scale", torch.ones(4, dtype=torch.float16))
    model.tied = nn.Linear(16, 3).half()
    model.tied.weight = model.head.weight                   # one tensor in two places
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied_half = []
    real = nn.Parameter.__deepcopy__
    monkeypatch.setattr(nn.Parameter, "__deepcopy__",
                        lambda self, memo: copied_half.append(self.dtype) or real(self, memo))
    wide = fisher_hooks._float32_copy(model)
    assert [d for d in copied_half if d in (torch.float16, torch.bfloat16)] == [], copied_half
    assert all(t.dtype == torch.float32 for t in (*wide.parameters(), *wide.buffers()))
    assert wide.tied.weight is wide.head.weight and wide.head.weight is not model.head.weight
    for name, value in wide.state_dict().items():
        assert torch.equal(value, before[name].float()), name
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float16 for k, v in model.state_dict().items())
    assert fisher_hooks.float32_copy_bytes(model) == 4 * sum(
        t.numel() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    space = ParamSpace(model)
    pieces = [(torch.randint(0, 50, (1, 8)), torch.tensor([1]))]
    assert fisher_hooks._float32_reference(model, space, pieces, 1, None) is not None
    monkeypatch.setattr(process_memory, "available_memory",
                        lambda device: int(fisher_hooks.float32_copy_bytes(model) / fisher_hooks.FLOAT32_COPY_SHARE) - 1)
    assert fisher_hooks._float32_reference(model, space, pieces, 1, None) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_pass_the_autograd_check_and_a_wrong_term_is_still_caught(dtype):
    torch.manual_seed(0)
    model = _TokenTypes().to(dtype)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 50, (8, 64), generator=g), torch.randint(0, 3, (8,), generator=g))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no "disagree with autograd" fallback
        collect_gradients(model, ParamSpace(model), batches, n=4, chunk=4, progress=False)
    torch.manual_seed(0)
    tied = _Tied().to(dtype)                            # a use of a weight the hooks miss: 0.7 off
    with pytest.warns(UserWarning, match="disagree with autograd"):
        collect_gradients(tied, ParamSpace(tied), [(x.to(dtype), y) for x, y in data(10)], n=6, progress=False)


def _nearly_perfect_classifier():
    """A 8-16-2 MLP whose 64 training samples all sit 14 logits from the boundary: loss ~4e-7,
    gradient entries from 2e-5 down to 1e-9 and below (float16's subnormals start at 6.1e-5). Every
    value is drawn from its own generator: nn.Linear's default init draws from torch's global RNG,
    whose seed at process start is random, so the first layer's biases differed from one process to
    the next (the ridge and objective ~0.5% apart, read as CHITA not repeating itself)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    x[:, 0] = torch.where(x[:, 0] > 0, 1.0, -1.0) * (1 + 0.1 * x[:, 0].abs())
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 8, generator=gen))
        model[0].weight[:2] = 0.0
        model[0].weight[0, 0], model[0].weight[1, 0] = 1.0, -1.0
        model[0].bias.copy_(0.1 * torch.randn(16, generator=gen))
        model[0].bias[:2] = 0.0
        model[2].weight.zero_()
        model[2].bias.zero_()
        model[2].weight[1, 0] = model[2].weight[0, 1] = 14.0
        model[2].weight[1, 2:] = 0.01 * torch.randn(14, generator=gen)
    return model, x, y


def test_float16_rows_of_a_tiny_loss_keep_their_relative_precision():
    """Float16 rows were rounded from float32 at their own size, before the power-of-two scaling
    of X (which float16 skipped anyway): entries below 6e-8 became 0 and whole columns of this
    classifier's rows were lost (a column 100 % off). The loss is now scaled by a power of two
    before the rows are stored: every column within float16's precision of the float32 rows."""
    model, x, y = _nearly_perfect_classifier()
    space = ParamSpace(model)
    loss = float(nn.functional.cross_entropy(model(x), y))
    assert 1e-7 < loss < 1e-5
    exact = collect_gradients(model, space, [(x, y)], 64, dtype=torch.float32, progress=False)
    scale = fisher.float16_loss_scale(model, space, [(x, y)], 64)
    assert scale > 2.0**10 and math.frexp(scale)[0] == 0.5             # a power of two
    half = collect_gradients(model, space, [(x, y)], 64, dtype=torch.float16, progress=False, loss_scale=scale)
    assert half.dtype == torch.float16 and bool(torch.isfinite(half).all())
    got = half.double() / scale
    live = exact.norm(dim=0) > 0
    column_error = ((got - exact.double()).norm(dim=0)[live] / exact.double().norm(dim=0)[live]).max()
    assert column_error < 2.0**-10, float(column_error)               # float16: 2^-11 relative rounding
    assert int((half == 0).sum()) == int((exact == 0).sum())


def test_float16_loss_scale_is_one_for_an_ordinary_loss():
    """Gradients of an ordinary size are stored as ever (scale 1: the same rows bit for bit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    space = ParamSpace(model)
    assert fisher.float16_loss_scale(model, space, [(x, y)], 32) == 1.0
    with pytest.raises(PrunekitError, match="power of two"):
        collect_gradients(model, space, [(x, y)], 4, progress=False, loss_scale=3.0)


_SAME_PRUNE = """
import hashlib, sys, warnings
import torch
import prunekit
from test_fisher import _nearly_perfect_classifier
warnings.simplefilter("ignore")
model, x, y = _nearly_perfect_classifier()
r = prunekit.prune(model, torch.utils.data.TensorDataset(x, y), method="chita", sparsity=0.5, fisher_samples=64,
                   fisher_dtype=sys.argv[1], recalibrate_bn=False, batch_size=64, stage_eval=False, seed=3)
masks = b"".join((p != 0).numpy().tobytes() for p in r.model.parameters())
print(repr(r.history[0]["ridge"]), repr(r.history[0]["objective"]), hashlib.sha256(masks).hexdigest())
"""


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_same_prune_in_two_fresh_processes_gives_the_same_ridge_objective_and_masks(dtype):
    """Same model, data, seed and thread count: the same result, to the bit, in a fresh process each time
    (torch's global RNG starts from a random seed in every process: the model must not draw from it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    import prunekit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(prunekit.__file__).parents[1]), str(Path(__file__).parent)])}
    runs = [subprocess.run([sys.executable, "-c", _SAME_PRUNE, dtype], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:]
    first, second = (run.stdout.strip().splitlines()[-1] for run in runs)
    assert first == second
    ridge, objective = map(float, first.split()[:2])
    assert ridge > 0 and objective > 0
