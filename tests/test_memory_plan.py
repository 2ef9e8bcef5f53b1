"""The memory plan: sizes, the one-line refusal before any work, fisher_samples="auto"."""

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import layer_grads, memory_plan
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.fisher import collect_gradients
from prunekit.params import ParamSpace
from prunekit.pipelines import fisher_methods
from peak_memory import fixed_mmap_threshold

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors")]
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]
MB = 2**20


def wide_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                         nn.Linear(1000, 10))          # p = 1,074,000: 4.1 MB per float32 row


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)


@pytest.mark.parametrize("text,expected", [("16G", 16 * 2**30), ("500M", 500 * MB), ("1.5GB", int(1.5 * 2**30)),
                                           ("2048k", 2 * MB), ("2GiB", 2 * 2**30), ("500mb", 500 * MB),
                                           (" 1.5 tib ", int(1.5 * 2**40)), (".5g", 2**29), (2 * MB, 2 * MB),
                                           ("3000000", 3000000), ("3000000000.0", 3 * 10**9), (3e9, 3 * 10**9),
                                           ("1.5e9", 15 * 10**8), ("1e9", 10**9), (" 2e6 ", 2 * 10**6)])
def test_parse_memory(text, expected):
    assert memory_plan.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "-5", "0", "0G", "0.0000001K", 0, -5, True, "1X", "1.5", "7",
                                 123456, 1.5, "0.5e3", "3000000000.5", 2e5, float("nan"), float("inf"), "inf",
                                 "-3e9", "500B", "2GiBB"])
def test_parse_memory_refuses_nonsense(bad):
    with pytest.raises(PrunekitError, match="max_memory"):
        memory_plan.parse_memory(bad)


@pytest.fixture
def steady_usage(monkeypatch):
    """What the process holds, fixed, so that plans made one after another agree exactly."""
    usage = memory_plan.current_usage(torch.device("cpu"))
    monkeypatch.setattr(memory_plan, "current_usage", lambda device: usage)
    return usage


def test_estimate_parts_and_largest_n_per_dtype(steady_usage):
    model = wide_model()
    space = ParamSpace(model)
    example = torch.zeros(1, 1, 8, 8)
    roomy = memory_plan.plan(model, space, example, n=100, max_memory="100G")
    assert roomy.gradients == 100 * space.numel * 4
    # the stage loop's p-long vectors (MACs, weights, free mask and index) are held through the gradients too
    assert roomy.stage_vectors == memory_plan.STAGE_VECTOR_BYTES * space.numel
    assert roomy.total == roomy.resident + roomy.gradients + max(
        roomy.stage_vectors + roomy.activations + roomy.layer_gradients, roomy.solver)
    compact = memory_plan.plan(model, space, example, n=100, dtype="bfloat16", max_memory="100G")
    assert compact.gradients == roomy.gradients // 2
    limit = roomy.resident + 1500 * MB
    with pytest.raises(PrunekitError) as refused:
        memory_plan.plan(model, space, example, n=1000, max_memory=limit)
    message = str(refused.value)
    assert "\n" not in message and "max_memory" in message
    spare = memory_plan.SUGGESTION_SPARE
    assert "(32 MB to spare; or raise max_memory)" in message
    fitting = {}
    for name in ("float32", "bfloat16", "float16"):
        count = int(message.split("fits is ")[1].split(f" in {name}")[0].split()[-1].replace(",", ""))
        fitting[name] = count
        assert memory_plan.plan(model, space, example, n=count, dtype=name, max_memory=limit - spare).fits()
        with pytest.raises(PrunekitError):
            memory_plan.plan(model, space, example, n=count + 1, dtype=name, max_memory=limit - spare)
    assert 100 < fitting["float32"] < 300 and fitting["bfloat16"] > 1.8 * fitting["float32"]
    assert fitting["float16"] == fitting["bfloat16"]


class _OwnAttention(nn.MultiheadAttention):
    """An attention with a forward of its own: not a per-layer-hook layer."""

    def forward(self, query, key, value, **kwargs):
        return super().forward(query, key, value, **kwargs)


class _Attend(nn.Module):
    """An attention layer (its own forward: its projections are not per-layer-hook layers) and a
    head (wide: 8 samples' gradients, the budget below, outweigh 8 samples' activations)."""

    def __init__(self):
        super().__init__()
        self.attn = _OwnAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 256)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2).expand(-1, -1, 64)      # (B, 64, 64)
        return self.head(self.attn(tokens, tokens, tokens, need_weights=False)[0].mean(1))


def test_whole_model_rows_count_and_cap_their_per_sample_gradients(steady_usage, monkeypatch):
    # The vmap path holds chunk x p float32 gradients at once (on a GPU, beside the whole X).
    example = torch.zeros(1, 1, 8, 8)
    hooked, attend = wide_model(), _Attend()
    for model, whole in ((hooked, False), (attend, True)):
        space = ParamSpace(model)
        assert memory_plan._Sizes(model, space, example).whole_model_rows == whole
        budget = 8 * 4 * space.numel                       # room for 8 samples' gradients
        monkeypatch.setattr(memory_plan, "ACTIVATION_BUDGET", budget)
        planned = memory_plan.plan(model, space, example, n=64, max_memory="100G")
        per_sample = planned.layer_gradients - 2 * space.numel * 4 - memory_plan.BACKWARD_OVERHEAD
        if whole:
            assert planned.chunk == 8 and per_sample == 8 * space.numel * 4
        else:
            largest = max(e.numel for e in space.entries)
            assert planned.chunk > 8 and per_sample == planned.chunk * largest * 4
        monkeypatch.undo()


class _Clip(nn.Module):
    """A clip of 4 frames (B, 4, 3, 8, 8): a Conv2d on the frames folded into the batch
    ((B·4, 3, 8, 8)) or called on each frame alone, unbatched ((3, 8, 8)); then 8 Linear layers of
    512 x 512 (the largest layer an eighth of p = 2.1M)."""

    def __init__(self, fold: bool = True):
        super().__init__()
        self.fold = fold
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.body = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU())])
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        if self.fold:
            frames = self.conv(x.reshape(-1, 3, 8, 8))
        else:
            frames = torch.stack([self.conv(frame) for frame in x.reshape(-1, 3, 8, 8)])
        return self.head(self.body(torch.relu(frames).reshape(x.shape[0], 512)))


class _UnbatchedConv1d(nn.Module):
    """A Conv1d called on each sample alone ((C, L) input), then a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 5, 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):                                   # (B, 4, 4)
        return self.head(torch.stack([self.conv(s).mean(-1) for s in x]))


class _TimeFirstLinear(nn.Module):
    """A Linear on (T, B, E) (the sequence turned time-first): dimension 0 is not the samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):                                   # (B, 4, 4)
        return self.fc(x.transpose(0, 1)).mean(0)


class _SharedTable(nn.Module):
    """A Linear on a learned table (1, 4, 4) added to every sample: its input's first dimension is
    1 whatever the batch, which one probing sample cannot tell from a batch of the samples."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 4, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):                                   # (B, 4, 4)
        return self.head(x + self.proj(self.table)).mean(1)


@pytest.mark.parametrize("model, example", [(_Clip(fold=True), torch.zeros(1, 4, 3, 8, 8)),
                                            (_Clip(fold=False), torch.zeros(1, 4, 3, 8, 8)),
                                            (_UnbatchedConv1d(), torch.zeros(1, 4, 4)),
                                            (_TimeFirstLinear(), torch.zeros(1, 4, 4)),
                                            (_SharedTable(), torch.zeros(1, 4, 4))],
                         ids=["folded-conv2d", "per-frame-conv2d", "unbatched-conv1d", "time-first-linear",
                              "shared-table-linear"])
def test_the_plan_takes_the_path_the_collector_takes(model, example):
    # Every layer is one the hooks handle, yet the collector falls back to vmap at run time (the
    # layer's input is not a batch of the samples): the plan's probe applies the same test.
    space = ParamSpace(model)
    assert not layer_grads.unsupported_layers(model, space)
    x, y = torch.randn(4, *example.shape[1:]), torch.randint(0, 3, (4,))
    for batch in (1, 2):                          # per-sample rows; mini-batch rows (summed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collect_gradients(model, space, [(x, y)], n=2 if batch == 1 else 1, batch=batch, chunk=2,
                              progress=False)
        fell_back = any("vmap path" in str(w.message) for w in caught)
        sizes = (memory_plan._Sizes(model, space, example) if batch == 1
                 else memory_plan._Sizes(model, space, example, summed=True))
        planned = sizes.whole_model_rows
        assert planned == fell_back
        assert fell_back == (batch == 1 or isinstance(model, _UnbatchedConv1d)
                             or (isinstance(model, _Clip) and not model.fold))
    assert not memory_plan._Sizes(wide_model(), ParamSpace(wide_model()), torch.zeros(1, 1, 8, 8)).whole_model_rows


def test_the_plan_of_a_folded_convolution_covers_its_measured_gradient_phase():
    """n = 128 bfloat16 rows of _Clip (folded frames: the vmap path, 64 x 2.1M float32 per-sample
    gradients, 513 MB) in a child process: the phase's peak RSS less what it held before and
    less X. Counting one layer's gradients instead (the per-layer path) planned 181 MB against
    376 measured. (Lower than chunk x p float32 because X's pages are touched only as its rows
    are written: at the last chunk's peak 64 of its rows, chunk x p bfloat16, are not yet.)"""
    script = textwrap.dedent(f"""
        import json, sys, warnings, torch
        from prunekit.process_memory import peak_usage
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_memory_plan import _Clip
        from prunekit import memory_plan
        from prunekit.fisher import collect_gradients
        from prunekit.params import ParamSpace
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model, n = _Clip(fold=True), 128
        space = ParamSpace(model)
        planned = memory_plan.plan(model, space, torch.zeros(1, 4, 3, 8, 8), n=n, dtype="bfloat16",
                                   max_memory="100G")
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 4, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
                   for _ in range(n // 16)]
        before = memory_plan.current_usage(torch.device("cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            collect_gradients(model, space, batches, n=n, chunk=planned.chunk, dtype=torch.bfloat16,
                              progress=False)
        peak = peak_usage()
        print(json.dumps({{"estimate": planned.activations + planned.layer_gradients,
                          "measured": peak - before - n * space.numel * 2, "chunk": planned.chunk}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=fixed_mmap_threshold())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["chunk"] == 64
    assert result["measured"] <= result["estimate"] <= 2 * result["measured"]


def test_the_judge_counts_its_held_batches_and_one_forward_pass(steady_usage):
    model = wide_model()
    space = ParamSpace(model)
    example = torch.zeros(1, 1, 8, 8)
    plain = memory_plan.plan(model, space, example, n=100, max_memory="100G")
    judged = memory_plan.plan(model, space, example, n=100, max_memory="100G", judge_batch=10)
    # a sample's input is 64 floats, the largest module output (a Linear's) 1,000 floats
    assert plain.judge == 0
    assert judged.judge == 10 * (memory_plan.JUDGE_BATCHES * 64 * 4 + memory_plan.INFERENCE_FACTOR * 1000 * 4)
    assert judged.total == judged.resident + judged.gradients + max(
        judged.stage_vectors + judged.activations + judged.layer_gradients, judged.solver + judged.judge)


@pytest.mark.parametrize("options, judged", [({"method": "falcon", "layer_search": 0}, False),
                                             ({"method": "falcon", "layer_search": 1}, True),
                                             # "auto": 100 trials x 1,074,000 weights are over its limit
                                             ({"method": "falcon"}, False),
                                             ({"method": "falcon++", "stages": 2}, True),
                                             ({"method": "falcon++", "stages": 2, "final_pick": "last",
                                               "layer_search": 0}, False)])
def test_runs_that_judge_plan_for_the_judge_at_their_batch_size(monkeypatch, options, judged):
    planned = []
    real = memory_plan.plan
    monkeypatch.setattr(memory_plan, "plan", lambda *a, **k: planned.append(k["judge_batch"]) or real(*a, **k))
    prunekit.prune(wide_model(), data(), flops=0.5, fisher_samples=8, batch_size=16, **options)
    assert planned[-1] == (16 if judged else 0)


@pytest.mark.parametrize("options, images", [({}, (64, 16)), ({"refit_batches": 3}, (48, 16)),
                                            ({"refit_batches": 0}, (0, 0)),
                                            ({"gradual": True, "events": 2, "epochs_per_event": 0,
                                              "final_epochs": 0}, (0, 0))])
def test_runs_that_re_fit_plan_for_the_re_fit_images(monkeypatch, options, images):
    """The re-fit reads at most one pass: auto plans the data's 64 samples, not 1,024 (MobileNetV1 on
    128 training images was planned at 16.1 GB for a 3.8 GB peak, and refused under --max-memory 6G)."""
    planned = []
    real = memory_plan.plan
    monkeypatch.setattr(memory_plan, "plan", lambda *a, **k: planned.append(
        (k.get("refit_samples", 0), k.get("refit_batch", 0))) or real(*a, **k))
    prunekit.prune(wide_model(), data(), method="falcon", flops=0.5, fisher_samples=8, batch_size=16, layer_search=0,
                   **options)
    assert planned[-1] == images


@pytest.mark.parametrize("more", [0, 10 * MB, 30 * MB])
def test_the_suggested_n_is_accepted_when_the_process_holds_a_little_more(monkeypatch, more):
    """Following a refusal's advice works: the process's resident set, part of the estimate, moves
    by some 10 MB between runs; the n suggested leaves SUGGESTION_SPARE free (it left none)."""
    model, usage = wide_model(), memory_plan.current_usage(torch.device("cpu"))
    space, example = ParamSpace(model), torch.zeros(1, 1, 8, 8)
    monkeypatch.setattr(memory_plan, "current_usage", lambda device: usage)
    for limit in (usage + 500 * MB, usage + 1500 * MB):
        with pytest.raises(PrunekitError, match="fits is") as refused:
            memory_plan.plan(model, space, example, n=1000, max_memory=limit)
        suggested = int(str(refused.value).split("fits is ")[1].split(" in float32")[0].replace(",", ""))
        monkeypatch.setattr(memory_plan, "current_usage", lambda device: usage + more)
        assert memory_plan.plan(model, space, example, n=suggested, max_memory=limit).n == suggested
        monkeypatch.setattr(memory_plan, "current_usage", lambda device: usage)


def test_without_max_memory_the_refusal_names_the_memory_available_not_max_memory(monkeypatch, steady_usage):
    """No max_memory given: the limit is the memory available, and the refusal says so (it said
    "but max_memory is 410 MB: raise max_memory", an option the user never gave)."""
    model, example = wide_model(), torch.zeros(1, 1, 8, 8)
    space = ParamSpace(model)
    for room, advice in ((1500 * MB, "(32 MB to spare; or free more memory)"), (10 * MB, "free memory until more than")):
        monkeypatch.setattr(memory_plan, "default_limit", lambda device: steady_usage + room)
        with pytest.raises(PrunekitError) as refused:
            memory_plan.plan(model, space, example, n=1000)
        message = str(refused.value)
        assert "but this process may grow to" in message and "max_memory not given" in message, message
        assert advice in message and "max_memory is" not in message and "raise max_memory" not in message


def test_auto_takes_the_largest_n_up_to_1000_that_fits(steady_usage):
    model = wide_model()
    space = ParamSpace(model)
    example = torch.zeros(1, 1, 8, 8)
    assert memory_plan.plan(model, space, example, n="auto", max_memory="100G").n == 1000
    limit = steady_usage + 1500 * MB
    auto = memory_plan.plan(model, space, example, n="auto", max_memory=limit)
    assert auto.fits() and 100 < auto.n < 300
    with pytest.raises(PrunekitError):
        memory_plan.plan(model, space, example, n=auto.n + 1, max_memory=limit)


def test_a_request_over_max_memory_is_refused_before_any_gradient(monkeypatch):
    monkeypatch.setattr(fisher_methods, "collect_gradients", lambda *a, **k: pytest.fail("gradients computed"))
    # 1 MB holds not even the model: said as such (it was "the largest fisher_samples that fits is 0")
    with pytest.raises(PrunekitError, match="whatever fisher_samples .* raise max_memory to more than") as caught:
        prunekit.prune(wide_model(), data(), method="falcon", flops=0.5, fisher_samples=64, max_memory="1M")
    # the two sizes it names agree: the one to raise to is the need plus the margin it says
    assert re.search(r"needs about (\S+ [KMG]B) .* to more than \S+ [KMG]B \(the \1 it needs and \S+ [KMG]B to spare",
                     str(caught.value)), str(caught.value)
    limit = memory_plan.current_usage(torch.device("cpu")) + 400 * MB
    # data holding the 10**4 samples asked (with fewer, the data's own refusal comes first)
    many = torch.randn(10**4, 1, 8, 8), torch.randint(0, 10, (10**4,))
    with pytest.raises(PrunekitError, match="largest fisher_samples that fits is [1-9]"):
        prunekit.prune(wide_model(), many, method="falcon", flops=0.5, fisher_samples=10**4, max_memory=limit)


class Reached(Exception):
    """Raised where the run would compute its first gradient: the plan let the request through."""


def _reached(*args, **kwargs):
    raise Reached


def test_rows_past_the_data_are_refused_naming_rows_that_fit_both(monkeypatch):
    """fisher_samples far above the data's samples was refused by the memory plan, naming "the
    largest fisher_samples that fits" (more rows than the data holds): following it got a second
    refusal, the data's. Now one refusal names an n that runs: the data's (64) where 64 rows fit
    the memory, else the memory's, no n in it above the data's 64 samples."""
    monkeypatch.setattr(fisher_methods, "collect_gradients", _reached)
    roomy = memory_plan.current_usage(torch.device("cpu")) + 2000 * MB       # 64 rows fit
    for method, budget, above in (("falcon", {"flops": 0.5}, 400), ("chita", {"sparsity": 0.5}, 700)):
        tight = memory_plan.current_usage(torch.device("cpu")) + above * MB     # some rows fit, not 64
        with pytest.raises(PrunekitError, match="holds 64 samples, 10000 gradient rows of one sample asked: lower "
                                                "fisher_samples to 64 or fewer") as caught:
            prunekit.prune(wide_model(), data(), method=method, fisher_samples=10**4, max_memory=roomy, **budget)
        assert "largest fisher_samples" not in str(caught.value)
        with pytest.raises(PrunekitError, match="largest fisher_samples that fits is") as caught:
            prunekit.prune(wide_model(), data(), method=method, fisher_samples=10**4, max_memory=tight, **budget)
        named = [int(n) for n in re.findall(r"(\d+) in (?:float32|bfloat16|float16)",
                                            str(caught.value).split("fits is")[1])]
        assert len(named) == 3 and all(0 < n <= 64 for n in named) and named[0] < 64, caught.value
        with pytest.raises(Reached):            # the n it names runs
            prunekit.prune(wide_model(), data(), method=method, fisher_samples=named[0], max_memory=tight, **budget)


def test_the_default_rows_past_the_data_are_refused_by_the_data_where_its_count_fits(monkeypatch):
    """The walker's ResNet-50 case in small: the method's default fisher_samples (1000) over the
    memory and over the 64 samples. The memory plan refused first naming the largest n that fits
    the memory (above 64), and that n was then refused by the data's check; now the refusal is the
    data's where 64 rows fit, naming 64, and where the data's count fits one dtype but not another
    the memory's names no n above 64."""
    monkeypatch.setattr(fisher_methods, "collect_gradients", _reached)
    limit = memory_plan.current_usage(torch.device("cpu")) + 1500 * MB        # ~200 rows fit, 1000 do not
    with pytest.raises(PrunekitError, match=r"holds 64 samples, 1000 gradient rows of one sample asked \(the method's "
                                            r"default fisher_samples\): lower fisher_samples to 64 or fewer") as caught:
        prunekit.prune(wide_model(), data(), method="falcon", flops=0.5, max_memory=limit)
    assert "largest" not in str(caught.value)
    with pytest.raises(Reached):
        prunekit.prune(wide_model(), data(), method="falcon", flops=0.5, max_memory=limit, fisher_samples=64)


def test_a_memory_refusal_names_no_more_rows_than_the_data_holds(steady_usage):
    """memory_plan.plan told the data's count (data_samples): an n the memory allows above it is
    named as the data's count, said as all the data holds; the n that fits below it is named as is."""
    model, example = wide_model(), torch.zeros(1, 1, 8, 8)
    space = ParamSpace(model)
    limit = steady_usage + 1500 * MB
    free = memory_plan.plan(model, space, example, n="auto", max_memory=limit, most_rows=10**6).n
    assert 100 < free < 1000
    with pytest.raises(PrunekitError) as caught:       # bfloat16 and float16 would allow 2 x free
        memory_plan.plan(model, space, example, n=5000, max_memory=limit, data_samples=free + 10)
    message = str(caught.value)
    named = [int(n) for n in re.findall(r"(\d+) in (?:float32|bfloat16|float16)",
                                        message.split("fits is")[1].replace(",", ""))]
    assert named[0] <= free and named[1:] == [free + 10, free + 10], message
    assert "(all the training data holds)" in message
    with pytest.raises(PrunekitError, match=r"holds 50 samples, 5000 gradient rows"):    # 50 rows fit: the data's
        memory_plan.plan(model, space, example, n=5000, max_memory=limit, data_samples=50)
    # unknown data (None): as before, the n the memory allows
    with pytest.raises(PrunekitError, match="largest fisher_samples that fits is"):
        memory_plan.plan(model, space, example, n=5000, max_memory=limit)


def test_cli_refuses_rows_past_the_data_before_the_memory_plan(capsys):
    """The command line's order too: --fisher-samples past --train-samples is the data's refusal, with
    --max-memory far too small for them (the memory plan would suggest more rows than 64)."""
    assert main(["prune", *MLP, *MNIST, "--method", "chita", "--sparsity", "0.5", "--train-samples", "64",
                 "--fisher-samples", "100000", "--max-memory", "2G"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the training data holds 64 samples" in err and "--fisher-samples to 64 or fewer" in err, err
    assert "largest" not in err and "\n" not in err


def test_cli_default_rows_past_the_data_get_one_refusal_naming_rows_that_run(capsys, monkeypatch):
    """The walker's repro on ResNet-50 (--train-samples 64, default --fisher-samples 1000): refused
    by the memory plan naming 173, then 173 refused by the data naming 64. Now the first refusal is
    the data's, naming 64, which fits --max-memory here and runs."""
    monkeypatch.setattr(fisher_methods, "collect_gradients", _reached)
    limit = f"{(memory_plan.current_usage(torch.device('cpu')) + 300 * MB) // MB}M"     # 64 rows fit, 1000 do not
    argv = ["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.5", "--train-samples", "64",
            "--max-memory", limit, "--no-stage-eval"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert ("the training data holds 64 samples, 1000 gradient rows of one sample asked (the method's default "
            "--fisher-samples): lower --fisher-samples to 64 or fewer") in err and "\n" not in err, err
    with pytest.raises(Reached):
        main([*argv, "--fisher-samples", "64"])


def test_auto_and_compact_storage_through_prunekit_prune():
    result = prunekit.prune(wide_model(), data(), method="falcon", flops=0.5, fisher_samples="auto",
                            fisher_dtype="bfloat16", max_memory=memory_plan.current_usage(torch.device("cpu"))
                            + 400 * MB, recalibrate_bn=False)
    stage = result.history[0]
    assert result.flops_kept <= 0.5 and stage["memory_estimate_mb"] > 0


def test_auto_takes_no_more_rows_than_the_training_data_holds():
    """fisher_samples "auto" with per-sample rows: at most the samples of one pass (here 64 of
    the 1,000 memory allows); an explicit n over them is refused naming the fix."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    result = prunekit.prune(model, data(), method="falcon", flops=0.5, fisher_samples="auto", batch_size=16)
    assert result.record["fisher_samples"] == 64 and result.flops_kept <= 0.5
    with pytest.raises(PrunekitError, match="holds 64 samples, 65 gradient rows of one sample asked: lower "
                                            "fisher_samples to 64 or fewer"):
        prunekit.prune(model, data(), method="falcon", flops=0.5, fisher_samples=65, batch_size=16)
    with pytest.raises(PrunekitError, match=r"holds 64 samples, 1000 gradient rows of one sample asked \(the method's "
                                            r"default fisher_samples\): lower fisher_samples to 64 or fewer \(or auto"):
        prunekit.prune(model, data(), method="falcon", flops=0.5, batch_size=16)


def test_cli_refuses_in_one_line_with_exit_2(capsys):
    assert main(["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.3", "--max-memory", "1M"]) == 2
    err = capsys.readouterr().err.strip()
    assert "whatever --fisher-samples" in err and "raise --max-memory" in err and "\n" not in err   # in its flags


def test_cli_json_has_the_estimate_next_to_the_measured_peak(capsys):
    assert main(["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.3", "--fisher-samples", "auto",
                 "--fisher-dtype", "bfloat16", "--train-samples", "1200", "--device", "cpu", "--json",
                 "--layer-search", "0"]) == 0          # the estimate and peak are the point, not its 100 trials
    out = json.loads(capsys.readouterr().out)
    assert out["fisher_samples"] == 1000 and out["fisher_dtype"] == "bfloat16"
    assert 0 < out["memory_estimate_mb"] and out["peak_rss_mb"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--fisher-samples", "0"], "--fisher-samples must be 'auto' or at least 1, got 0"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--max-memory", "1K"], "but --max-memory is 1 KB"),          # sizes under a megabyte are not "0 MB"
])
def test_bad_memory_options_are_one_line(capsys, argv, needle):
    assert main(["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.3", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_fisher_samples_neither_integer_nor_auto_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.3", "--fisher-samples", "many"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "integer or auto" in err and "\n" not in err


def test_woodfisher_inverses_are_one_allocation_of_the_bytes_the_plan_counts(steady_usage):
    """The plan counts p·B float32 numbers for WoodFisher's block inverses (once; it counted them
    twice) and one block's float64 work: the full blocks share one storage of exactly those bytes."""
    from prunekit.solvers.woodfisher import _block_inverses
    n, block = 4, 64
    for p in (640, 700):                                 # B divides p; a short last block of 60
        X = torch.randn(n, p, generator=torch.Generator().manual_seed(p))
        inverses = _block_inverses(X, block, 1e-3)
        storages = {inv.untyped_storage().data_ptr(): inv.untyped_storage().nbytes() for inv in inverses}
        held = sum(storages.values())
        assert len(storages) == (1 if p % block == 0 else 2)
        assert held == (p // block) * block * block * 4 + (p % block) ** 2 * 4
        assert held <= p * block * 4 < 1.1 * held
    model = wide_model()
    space = ParamSpace(model)
    example = torch.zeros(1, 1, 8, 8)
    chita = memory_plan.plan(model, space, example, n=8, family="chita", max_memory="100G", keep_share=0.3)
    wf = memory_plan.plan(model, space, example, n=8, family="woodfisher", max_memory="100G", obs_block_size=block)
    p = space.numel
    per_weight = memory_plan.solver_bytes_per_weight
    assert wf.solver - chita.solver == (
        (per_weight("woodfisher", p) - per_weight("chita", p)) * p + p * block * 4
        + (block + 2 * 8) * block * 8 - int(min(1.0, 1.5 * 0.3) * 8 * p * 4))


def test_solver_bytes_per_weight_follow_glibc_heap_and_leave_falcon_alone():
    """Below glibc's largest mmap threshold a float32 p-long vector comes from the heap, whose
    freed blocks stay resident: CHITA and WoodFisher count HEAP_RETAINED_BYTES more per weight
    there. FALCON keeps its measured 9 float64 vectors either way."""
    small, large = memory_plan.MMAP_THRESHOLD_MAX // 4 - 1, memory_plan.MMAP_THRESHOLD_MAX // 4
    for family, live in (("chita", memory_plan.CHITA_BYTES_PER_WEIGHT),
                         ("woodfisher", memory_plan.WOODFISHER_BYTES_PER_WEIGHT)):
        assert memory_plan.solver_bytes_per_weight(family, large) == live
        assert memory_plan.solver_bytes_per_weight(family, small) == live + memory_plan.HEAP_RETAINED_BYTES
    for p in (small, large):
        assert memory_plan.solver_bytes_per_weight("falcon", p) == memory_plan.FALCON_SOLVER_VECTORS * 8 == 72


def test_a_large_column_selection_is_one_copy_of_the_columns():
    """CHITA's active set (X_A, 1.5k columns) is gathered row by row into one (n, m) matrix: the
    same values as X[:, index], from a contiguous X and from a column slice of a wider one."""
    from prunekit.solvers.quadratic import BLOCK_BYTES, select_columns
    n = 4
    p = BLOCK_BYTES // (4 * n) * 3
    wide = torch.randn(n, p + 7, generator=torch.Generator().manual_seed(0))
    index = torch.randperm(p, generator=torch.Generator().manual_seed(1))[: 2 * p // 3].sort().values
    for X in (wide[:, :p].contiguous(), wide[:, :p]):
        picked = select_columns(X, index)
        assert picked.is_contiguous() and torch.equal(picked, X[:, index])
    few = index[:5]
    assert torch.equal(select_columns(wide[:, :p], few), wide[:, few])


def test_the_refit_phase_is_planned_after_x_is_freed(steady_usage):
    """The re-fit runs once X is freed: the plan's total is the larger of the two, and the re-fit's
    part grows with its images (the lockstep holds both networks' activations of all of them)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10))
    space, example = ParamSpace(model), torch.zeros(1, 3, 16, 16)
    plain = memory_plan.plan(model, space, example, n=100, max_memory="100G")
    small = memory_plan.plan(model, space, example, n=100, max_memory="100G", refit_samples=128, refit_batch=64)
    large = memory_plan.plan(model, space, example, n=100, max_memory="100G", refit_samples=1024, refit_batch=64)
    assert plain.refit == 0 and 0 < small.refit < large.refit
    x_phase = plain.total - plain.resident
    for planned in (small, large):
        assert planned.total == planned.resident + max(x_phase, planned.refit)
    # an 8 x 16 x 16 output per image, held by both networks for every image
    assert large.refit > 2 * 1024 * 8 * 16 * 16 * 4


def test_a_rank_plans_its_share_of_the_refit_activations(steady_usage):
    """Under torchrun each rank runs every R-th of the re-fit's batches: 16 batches of 64 on 2 ranks
    hold a rank's 8 batches' activations, on 3 ranks 6; the rest of the re-fit's plan is the same."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10))
    space, example = ParamSpace(model), torch.zeros(1, 3, 16, 16)
    refit = {ranks: memory_plan.plan(model, space, example, n=100, max_memory="100G", refit_samples=1024,
                                     refit_batch=64, ranks=ranks).refit for ranks in (1, 2, 3)}
    per_batch = (refit[1] - refit[2]) / 8           # what one more batch's activations cost
    assert per_batch > 2 * 64 * 8 * 16 * 16 * 4     # both networks' conv outputs at least
    assert refit[2] - refit[3] == pytest.approx(2 * per_batch, rel=1e-6)


@pytest.mark.parametrize("samples, batch, ranks", [(192, 128, 1), (256, 128, 1), (128, 128, 1), (32, 128, 1),
                                                   (1000, 64, 2), (1024, 64, 3), (100, 64, 3), (1, 1, 4)])
def test_a_rank_plans_the_images_of_its_batches_not_whole_batches(samples, batch, ranks):
    """The re-fit's rank r runs batches r, r + ranks, ... of ``samples`` images read in batches of
    ``batch`` (the last holds the rest), and holds the activations of their images (refit's own
    count, ``mine_images``): 192 images in batches of 128 are 128 + 64, not two whole batches
    (session 48: MobileNetV1 at 192 images was planned as at 256, 5.1 GB for a 3.9 GB peak)."""
    batches = torch.arange(samples).split(batch)            # as the loader yields them
    held = max(sum(int(b.shape[0]) for b in batches[rank::ranks]) for rank in range(ranks))
    assert memory_plan.refit_rank_images(samples, batch, ranks) == held


def test_the_refit_plan_grows_by_the_images_not_by_whole_batches(steady_usage):
    """Between 128 and 256 images in batches of 128 the re-fit's plan grows by the same amount per
    image (a 1 x 1 conv: no sampled patches, whose count per image depends on the images): the
    64 images of a last part-batch are not planned as 128."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    space, example = ParamSpace(model), torch.zeros(1, 3, 16, 16)
    refit = {images: memory_plan.plan(model, space, example, n=4, max_memory="100G", refit_samples=images,
                                      refit_batch=128).refit for images in (128, 192, 256)}
    assert refit[128] < refit[192] < refit[256]
    assert refit[192] - refit[128] == pytest.approx(refit[256] - refit[192], abs=2)
    # at least both networks' 8 x 16 x 16 conv outputs of each of the 64 images more
    assert refit[192] - refit[128] > 2 * 64 * 8 * 16 * 16 * 4


def test_the_judge_after_the_refit_is_its_own_phase(steady_usage):
    """The judge after the re-fit holds the stage loop's copies, its own REFIT_JUDGE_VECTORS p-long
    vectors and one batch: JUDGE_INPUT_COPIES of its inputs and a forward pass; the fitting and the
    judge are two phases of the plan, the re-fit's term the larger (session 48: the judge's term was
    counted without its vectors and the batch's copies, 420 MB under its peak on MobileNetV1)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10))
    space, example = ParamSpace(model), torch.zeros(1, 3, 16, 16)
    planned = {batch: memory_plan.plan(model, space, example, n=4, max_memory="100G", refit_samples=64,
                                       refit_batch=batch) for batch in (16, 32)}
    p, image, largest = space.numel, 3 * 16 * 16 * 4, 8 * 16 * 16 * 4
    copies = (2 * 4 + memory_plan.PIPELINE_BYTES_PER_WEIGHT + 4) * p
    for batch, plan in planned.items():
        assert plan.refit_judge == copies + memory_plan.REFIT_JUDGE_VECTORS * 4 * p + batch * (
            memory_plan.JUDGE_INPUT_COPIES * image + memory_plan.INFERENCE_FACTOR * largest)
        assert plan.refit == max(plan.refit_fitting, plan.refit_judge)
        phases = plan.phases()
        assert phases["refit"] == plan.resident + plan.refit_fitting
        assert phases["refit_judge"] == plan.resident + plan.refit_judge
        assert plan.total == max(phases.values())
    assert planned[32].refit_judge - planned[16].refit_judge == 16 * (
        memory_plan.JUDGE_INPUT_COPIES * image + memory_plan.INFERENCE_FACTOR * largest)


def test_the_gradient_phase_counts_the_training_batch_being_read(steady_usage):
    """The gradient phase holds the training batch it reads and its normalisation's temporary
    (DATA_BATCH_COPIES float32 inputs per sample of the batch): MobileNetV1 at 224 x 224 peaked
    100-175 MB higher there with batches of 128 images than of 32 (session 48)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    space, example = ParamSpace(model), torch.zeros(1, 3, 16, 16)
    plain = memory_plan.plan(model, space, example, n=4, max_memory="100G")
    read = memory_plan.plan(model, space, example, n=4, max_memory="100G", data_batch=128)
    assert plain.data_batch == 0
    assert read.data_batch == memory_plan.DATA_BATCH_COPIES * 128 * 3 * 16 * 16 * 4
    assert read.phases()["gradients"] - plain.phases()["gradients"] == read.data_batch
    assert read.phases()["solver"] == plain.phases()["solver"]


def test_runs_plan_for_the_training_batch_they_read(monkeypatch):
    planned = []
    real = memory_plan.plan
    monkeypatch.setattr(memory_plan, "plan", lambda *a, **k: planned.append(k.get("data_batch")) or real(*a, **k))
    prunekit.prune(wide_model(), data(), method="falcon", flops=0.5, fisher_samples=8, batch_size=16, layer_search=0)
    assert planned[-1] == 16


def test_a_refit_over_max_memory_is_refused_naming_refit_batches(steady_usage):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    with pytest.raises(PrunekitError, match="set refit_batches to fewer batches, or 0"):
        memory_plan.plan(model, ParamSpace(model), torch.zeros(1, 3, 16, 16), n=4,
                         max_memory=steady_usage + 400 * MB, refit_samples=10**6, refit_batch=10**6)


def test_the_plan_covers_a_measured_run_whose_refit_decides_its_peak():
    """One-shot FALCON with the re-fit on 512 images of a conv net with large activations and few
    weights, in a child process: the re-fit's phase is the plan's larger one, the run's peak RSS is
    above what the plan's other phase allows (so a plan without the re-fit, as before session 34,
    was under it) and within the plan."""
    script = textwrap.dedent("""
        import json, torch
        from prunekit.process_memory import peak_usage
        from torch import nn
        import prunekit
        from prunekit import memory_plan
        torch.set_num_threads(1)
        torch.manual_seed(0)
        block = lambda c_in: [nn.Conv2d(c_in, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
        model = nn.Sequential(*block(3), *block(32), *block(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(32, 10))
        g = torch.Generator().manual_seed(0)
        data = (torch.randn(1536, 3, 32, 32, generator=g), torch.randint(0, 10, (1536,), generator=g))
        plans = []
        real = memory_plan.plan
        memory_plan.plan = lambda *a, **k: plans.append(real(*a, **k)) or plans[-1]
        prunekit.prune(model, data, method="falcon", flops=0.5, fisher_samples=8, batch_size=64,
                       refit_batches=8)
        peak = peak_usage()
        plan = plans[-1]
        print(json.dumps({"peak": peak, "total": plan.total, "refit": plan.refit,
                          "other_phase": plan.resident + plan.gradients + max(
                              plan.stage_vectors + plan.activations + plan.layer_gradients,
                              plan.solver + plan.judge)}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=fixed_mmap_threshold())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refit"] > 0 and result["total"] > result["other_phase"]
    assert result["other_phase"] < result["peak"] <= result["total"]


def test_peak_usage_is_the_process_own_not_its_launchers():
    """ru_maxrss keeps the launching process's resident size across exec; the recorded peak
    (record.peak_rss_mb, the benchmarks' rows) must be the child's own."""
    held = bytearray(1536 * MB)
    held[::4096] = b"\x01" * (len(held) // 4096)          # resident, not only reserved
    script = ("import resource; from prunekit.process_memory import peak_usage; "
              "print(peak_usage(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    del held
    own, inherited = map(int, out.stdout.split())
    assert own < 1024 * MB <= 1536 * MB <= inherited


def test_own_method_with_fisher_samples_but_no_fisher_batch_is_checked_against_the_data():
    """A user's own Method whose options dataclass has fisher_samples but neither fisher_batch nor
    fresh_samples crashed with AttributeError in the rows check before the plan: now those read as
    their defaults (one sample per row, no fresh samples), so rows within the data run and rows
    past them get the data's one-line refusal."""
    import dataclasses
    from prunekit.options import Integer
    from prunekit.pipelines.magnitude_methods import MagnitudeOptions, run_magnitude

    @dataclasses.dataclass
    class RowsOnly(MagnitudeOptions):
        fisher_samples: int = 16
        constraints = {**getattr(MagnitudeOptions, "constraints", {}), "fisher_samples": Integer(1)}

    assert not hasattr(RowsOnly(), "fisher_batch") and not hasattr(RowsOnly(), "fresh_samples")
    method = prunekit.Method("rows_only", "weights", RowsOnly, run_magnitude)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    result = prunekit.prune(model, (x, y), method=method, sparsity=0.5, fisher_samples=32)
    assert result.model is not None
    with pytest.raises(PrunekitError, match="holds 64 samples, 65 gradient rows of one sample asked: lower "
                                            "fisher_samples to 64 or fewer"):
        prunekit.prune(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), (x, y), method=method,
                       sparsity=0.5, fisher_samples=65)


def test_a_ranks_gradient_share_is_its_columns_plus_a_piece_of_rows_in_transit(steady_usage):
    """A walk read "gradients 256 x 1,074,000 in float32; each of 2 ranks holds a share of its
    columns, 74 MB" against 1.0 GB / 2: the figure is right (``distributed.gradients``: a rank holds
    its n x p/R columns plus, in transit, one piece of n/(4R^2) of its rows x p and a block of it:
    1/2 + 1/16 + 1/32 of n x p on 2 ranks), and the refusal now says what it counts."""
    model, example = wide_model(), torch.zeros(1, 1, 8, 8)
    space = ParamSpace(model)
    n = 256
    one = memory_plan.plan(model, space, example, n=n, max_memory="100G")
    two = memory_plan.plan(model, space, example, n=n, max_memory="100G", ranks=2)
    assert one.gradients == n * one.p * 4
    expected = one.gradients * (1 / 2 + 1 / 16 + 1 / 32)
    assert abs(two.gradients - expected) <= 0.01 * expected, (two.gradients, expected)
    with pytest.raises(PrunekitError) as refused:
        memory_plan.plan(model, space, example, n=100_000, max_memory=steady_usage + 400 * MB, ranks=2)
    assert "each of 2 ranks holds its 1/2 of the columns and a piece of its rows in transit, " in str(refused.value)
