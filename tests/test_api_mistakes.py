"""prunekit.prune on the mistakes a script makes (found by a user's walk-through): each is one
PrunekitError naming the fix, never an error from inside torch, and never a silent run."""

import pytest
import torch
from torch import nn

import prunekit
import prunekit.loading
from prunekit import PrunekitError
from prunekit.data import load_dataset
from prunekit.export import load_sparse
from prunekit.pipelines.magnitude_methods import MagnitudeOptions
from prunekit.pipelines.weights import Pruned


def _data(n=64, classes=4):
    torch.manual_seed(0)
    return torch.randn(n, 1, 8, 8), torch.randint(0, classes, (n,))


def _net(*head):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), *head, nn.ReLU(), nn.Linear(16, 4))


def test_a_model_with_one_value_per_example_is_told_to_pass_its_loss():
    x, y = _data()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0))
    with pytest.raises(prunekit.PrunekitError, match=r"one value per example.*pass loss="):
        prunekit.prune(net, (x, y), method="chita", sparsity=0.5, fisher_samples=16)
    result = prunekit.prune(net, (x, y.float()), method="chita", sparsity=0.5, fisher_samples=16, loss=nn.MSELoss())
    assert result.sparsity == pytest.approx(0.5, abs=0.01)


def test_a_training_batch_of_one_sample_in_batchnorm():
    x, y = _data(257)        # 257 = 4 x 64 + 1
    # tensors: prunekit makes the batches and leaves no batch of one
    result = prunekit.prune(_net(nn.BatchNorm1d(16)), (x, y), method="magnitude", sparsity=0.5, batch_size=64,
                            gradual=True, events=1, final_epochs=1)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    # the user's DataLoader: the fix named (torch said "Expected more than 1 value per channel")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    with pytest.raises(prunekit.PrunekitError, match="batch of one sample.*drop_last=True"):
        prunekit.prune(_net(nn.BatchNorm1d(16)), loader, method="magnitude", sparsity=0.5)


def test_gradual_pruning_of_a_frozen_model_names_the_frozen_parameters():
    x, y = _data()
    net = _net()
    net.requires_grad_(False)
    with pytest.raises(prunekit.PrunekitError, match="frozen"):
        prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, gradual=True, events=1, final_epochs=1)
    half = _net()
    half[1].requires_grad_(False)            # partly frozen: trains the rest, holds the zeros of both
    result = prunekit.prune(half, (x, y), method="magnitude", sparsity=0.5, gradual=True, events=1, final_epochs=1)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("dtype, fix", [(torch.float64, r"x.to\(torch.float32\)"),
                                        (torch.uint8, "convert them to float32, scaled and normalized")])
def test_inputs_of_another_dtype_than_the_weights_are_named(dtype, fix):
    x, y = _data()
    with pytest.raises(prunekit.PrunekitError, match=f"inputs are {str(dtype)[6:]}.*{fix}"):
        prunekit.prune(_net(), (x.to(dtype), y), method="magnitude", sparsity=0.5)
    with pytest.raises(prunekit.PrunekitError, match=f"eval_data.*inputs are {str(dtype)[6:]}"):
        prunekit.prune(_net(), (x, y), method="magnitude", sparsity=0.5, eval_data=(x.to(dtype), y))


def test_numpy_arrays_and_raw_image_sets_are_told_their_conversion(tmp_path):
    from prunekit.data import ImageDataset
    x, y = _data()
    with pytest.raises(prunekit.PrunekitError, match="torch.from_numpy"):
        prunekit.prune(_net(), (x.numpy(), y.numpy()), method="magnitude", sparsity=0.5)
    pixels = ImageDataset(torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), ["a"])
    with pytest.raises(prunekit.PrunekitError, match=r"make_loader\(data, normalization\)"):
        prunekit.prune(_net(), pixels, method="magnitude", sparsity=0.5)


@pytest.mark.parametrize("defer", [False, True])
def test_an_image_folder_loaded_deferred_is_told_its_conversion_too(tmp_path, defer):
    """load_dataset(..., defer=True) gives a DeferredImageDataset, not an ImageDataset: prunekit.prune
    (and batches_of, prunekit's other reader of batches) said only "data must be a DataLoader ...",
    losing the make_loader hint the decoded form gets."""
    import numpy as np
    from PIL import Image
    from prunekit.train import batches_of
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8), "L").save(tmp_path / name / f"{k}.png")
    pixels = load_dataset("imagefolder", tmp_path, defer=defer)
    assert type(pixels).__name__ == ("DeferredImageDataset" if defer else "ImageDataset")
    for run in (lambda: prunekit.prune(_net(), pixels, method="magnitude", sparsity=0.5),
                lambda: batches_of(pixels)):
        with pytest.raises(prunekit.PrunekitError, match=r"raw uint8 pixels: pass make_loader\(data, normalization\)"):
            run()


def test_a_run_folder_refusal_names_the_settings_that_differ(tmp_path):
    x, y = _data()
    out = str(tmp_path / "run")
    prunekit.prune(_net(), (x, y), method="magnitude", sparsity=0.5, out=out)
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other sparsity, seed\)"):
        prunekit.prune(_net(), (x, y), method="magnitude", sparsity=0.6, seed=1, out=out)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, z):
        return self.out(torch.relu(self.a(x) + self.b(z)))


def test_a_model_of_several_inputs_is_told_to_be_wrapped():
    """Batches ((x, z), y), dict batches and (inputs, Y) gave 'must give (x, y) batches' with no fix,
    or (for ((x, z), y) passed whole) a wrong complaint about the labels' dtype."""
    torch.manual_seed(0)
    x, z, y = torch.randn(32, 8), torch.randn(32, 6), torch.randint(0, 3, (32,))
    for data in ([((x, z), y)], ((x, z), y), [{"x": x, "z": z, "labels": y}]):
        with pytest.raises(prunekit.PrunekitError, match="wrap it in a module whose forward takes one tensor"):
            prunekit.prune(_TwoInputs(), data, method="magnitude", sparsity=0.5)


def test_an_ambiguous_example_input_is_told_what_prune_takes():
    """CostModel's refusal named its own batched= argument, which prune refuses as an unknown option."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.o = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x, mask):
            return self.o((self.l(x) * mask.unsqueeze(-1)).sum(1))

    x, mask = torch.randn(4, 6, 8), torch.ones(4, 6)
    with pytest.raises(prunekit.PrunekitError, match="pass an example input of batch 1") as refused:
        prunekit.prune(Masked(), method="magnitude", flops=0.5, example_input=(x, mask))
    assert "batched=" not in str(refused.value)
    result = prunekit.prune(Masked(), method="magnitude", flops=0.5, example_input=(x[:1], mask[:1]))
    assert result.flops_kept <= 0.5


def test_a_layer_left_with_no_weight_is_named():
    """Global magnitude on a layer of much smaller weights pruned all of it without a word: the model's
    output no longer depended on its input."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 3))
    with torch.no_grad():
        net[0].weight.mul_(100)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    from prunekit.errors import PrunekitWarning
    with pytest.warns(PrunekitWarning, match=r"^layer '2' kept no weight"):      # quoted: "2" read as a count
        result = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.8)
    assert result.record["empty_layers"] == ["2"] and not net[2].weight.any()
    assert "empty_layers" not in prunekit.prune(_net(), _data(), method="magnitude-uniform", sparsity=0.8).record


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_pruned_model_comes_back_in_the_mode_it_was_given(mode):
    """One-shot kept the model's mode; gradual and channel methods returned it in eval mode."""
    x, y = _data()
    for method, extra in (("magnitude", {}), ("magnitude", {"gradual": True, "events": 1, "final_epochs": 0}),
                          ("autobot", {"gate_batches": 2, "finetune_epochs": 0})):
        net = _net().train(mode == "train")
        budget = {"flops": 0.7} if method == "autobot" else {"sparsity": 0.5}
        assert prunekit.prune(net, (x, y), method=method, **budget, **extra).model.training == (mode == "train")


def test_a_loss_that_indexes_an_output_with_logits_is_told_to_read_them():
    class Output(dict):
        @property
        def logits(self):
            return self["logits"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _net()

        def forward(self, x):
            return Output(logits=self.body(x))

    x, y = _data()
    with pytest.raises(prunekit.PrunekitError, match=r"returns Output outputs, not a tensor: read outputs.logits"):
        prunekit.prune(Net(), (x, y), method="magnitude", sparsity=0.5,
                       loss=lambda out, t: nn.functional.cross_entropy(out[:, :4], t))


def _tiny():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("call,needle", [
    (lambda tmp: prunekit.loading.load_model(None), "name must be a zoo model name"),
    (lambda tmp: prunekit.load_pruned(_tiny(), 5), "path must be a run folder or its model.safetensors, got int"),
    (lambda tmp: load_dataset("mnist", None, "test"), "data_dir must be the folder"),
    (lambda tmp: prunekit.save_model(_tiny(), tmp / "a.safetensors", None), "meta must be a dict"),
    (lambda tmp: prunekit.save_model(_tiny(), tmp / "b.safetensors", {"x": object()}), "meta must hold JSON values"),
    (lambda tmp: load_sparse(tmp / "missing.safetensors"), "missing.safetensors does not exist"),
    (lambda tmp: load_sparse(tmp / "text.safetensors"), "text.safetensors is not a safetensors file"),
    (lambda tmp: prunekit.CostModel(5, torch.randn(1, 16)), "model must be a torch.nn.Module, got int"),
    (lambda tmp: prunekit.add_method("x"), "add_method takes a prunekit.Method"),
    (lambda tmp: prunekit.Method("bad-family", "bogus", MagnitudeOptions, lambda ctx, o: None),
     "family must be one of weights, channels, got 'bogus'"),
], ids=["load_model", "load_pruned", "load_dataset", "save_model-None", "save_model-object", "load_sparse-missing",
        "load_sparse-text", "CostModel", "add_method", "Method-family"])
def test_api_calls_with_wrong_arguments_raise_one_prunekit_error_and_write_nothing(tmp_path, call, needle):
    """These raised a raw TypeError / AttributeError / SafetensorError / FileNotFoundError, and
    save_model with a bad meta left a .safetensors without its sidecar."""
    (tmp_path / "text.safetensors").write_text("hello\n")
    with pytest.raises(PrunekitError) as err:
        call(tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.safetensors"]


@pytest.mark.parametrize("run,needle", [
    (lambda ctx, o: None, "returned NoneType: its run(ctx, options) must return"),
    (lambda ctx, o: Pruned(ctx.space.vector().clone()), "returned 160 nonzero weights, over the budget's 80"),
    (lambda ctx, o: Pruned(ctx.space.vector() * float("nan")), "returned weights holding nan or inf"),
    (lambda ctx, o: Pruned(ctx.space.vector()[:3]), "returned weights of shape (3,)"),
], ids=["None", "over-budget", "nan", "shape"])
def test_a_method_of_ones_own_that_returns_a_wrong_result_is_named(run, needle):
    """A user method returning None raised AttributeError; one over its budget or NaN was reported
    as prunekit's "internal error ... please report this"."""
    own = prunekit.Method("mine", "weights", MagnitudeOptions, run)
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 4, (32,))
    with pytest.raises(PrunekitError) as err:
        prunekit.prune(_tiny(), (x, y), method=own, sparsity=0.5)
    assert "method 'mine' (your own)" in str(err.value) and needle in str(err.value), str(err.value)


# --- the walk-through of session 49 --------------------------------------------------------------

class _BnNet(nn.Module):
    """A tiny CNN with BatchNorm (its modes matter) whose channels a channel method can remove."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).flatten(1))


@pytest.mark.parametrize("method,extra", [("magnitude", {}), ("chita", {"fisher_samples": 16})])
def test_a_compiled_model_is_pruned_through_the_module_it_wraps(method, extra):
    """torch.compile'd: CHITA failed inside Dynamo (a symbolic shape in the memory probe); now both
    prune the wrapped module, in place, so the compiled model runs pruned too."""
    x, y = _data()
    net = _net()
    compiled = torch.compile(net)
    result = prunekit.prune(compiled, (x, y), method=method, sparsity=0.7, **extra)
    assert result.model is net and result.sparsity == pytest.approx(0.7, abs=0.01)
    zeros = float((torch.cat([net[1].weight.flatten(), net[3].weight.flatten()]) == 0).float().mean())
    assert zeros == pytest.approx(0.7, abs=0.01)
    assert compiled._orig_mod[1].weight is net[1].weight


def test_train_epochs_and_evaluate_take_the_data_forms_prune_takes():
    """(X, Y) tensors and a TensorDataset crashed train_epochs (unpacking a sample) and evaluate;
    they are batched as prune batches them; data prune refuses is refused in prune's words."""
    from prunekit.train import evaluate, train_epochs
    x, y = _data(96)
    for data in ((x, y), torch.utils.data.TensorDataset(x, y), lambda: [(x[:48], y[:48]), (x[48:], y[48:])]):
        net = _net()
        before = net[1].weight.detach().clone()
        train_epochs(net, data, epochs=1, lr=0.05, progress=False, batch_size=32)
        assert not torch.equal(before, net[1].weight)
        accuracy = evaluate(net, data)
        assert accuracy == pytest.approx(evaluate(net, torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=32)), rel=1e-6)
    for bad, needle in ((x, "one tensor"), ([(x, y, y)], "3 items"), (iter([(x, y)]), "one-pass")):
        with pytest.raises(PrunekitError, match=needle):
            train_epochs(_net(), bad, epochs=1, progress=False)
    with pytest.raises(PrunekitError, match="data must be data"):
        evaluate(_net(), "test")



def test_train_epochs_takes_batches_without_a_length_and_anneals_over_all_of_them():
    """A function returning a generator, or a re-iterable without __len__ (forms the docstring
    accepts), failed with "object of type 'generator' has no len()" building the cosine schedule:
    one pass is counted, and the learning rate reaches 0 at the last batch of the last epoch."""
    from prunekit.train import train_epochs
    x, y = _data(96)

    def generator():
        for start in range(0, 96, 32):
            yield x[start:start + 32], y[start:start + 32]

    class Reiterable:
        def __iter__(self):
            return generator()
    for data in (generator, Reiterable()):
        net = _net()
        optimizer = train_epochs(net, data, epochs=2, lr=0.05, progress=False)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
        assert optimizer.state[net[1].weight]["momentum_buffer"] is not None


def test_train_epochs_drops_a_last_batch_of_one_sample_and_shuffles_from_the_global_rng():
    """(X, Y) tensors of 129 samples in batches of 128 ended each epoch with a batch of one, which a
    BatchNorm layer cannot train on ("Expected more than 1 value per channel"); prune drops it, and
    train_epochs now builds its loader with the same function. Its order is still torch's global
    RNG's, a new one each epoch."""
    from prunekit.train import train_epochs
    x, y = _data(129)
    weights = []
    for seed in (1, 1, 2):
        net = _net(nn.BatchNorm1d(16))
        torch.manual_seed(seed)
        train_epochs(net, (x, y), epochs=2, lr=0.05, progress=False, batch_size=128)
        weights.append(net[1].weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_the_data_form_check_of_train_epochs_starts_no_pass_of_a_prunekit_loader():
    """A prunekit loader's shuffle follows its pass count (``epoch``); the data-form check started a
    pass of its own (``iter(data) is data``), so every fine-tune read other batches than before and
    a gradual run killed under the previous version resumed to other weights."""
    from prunekit.data.dataset import ImageDataset
    from prunekit.data.loaders import Normalization, make_loader
    from prunekit.train import batches_of
    gen = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen),
                        torch.randint(0, 4, (40,), generator=gen), [str(k) for k in range(4)])
    loader = make_loader(data, Normalization((0.5,), (0.25,)), batch_size=8, shuffle=True, seed=3)
    assert batches_of(loader, shuffle=True) is loader and loader.epoch == 0


def test_a_model_with_non_tensor_extra_state_is_refused_by_out_and_save_model_in_one_line(tmp_path):
    """A module's get_extra_state (any object) puts a non-tensor in the state dict: prune(out=) and
    save_model died on it ('dict' object has no attribute 'detach'). A .safetensors file holds
    tensors only: both refuse in one line before writing anything; prune without out= prunes it."""
    class Scaled(nn.Linear):
        def get_extra_state(self):
            return {"scale": 1.0}

        def set_extra_state(self, state):
            pass
    x, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), Scaled(64, 16), nn.ReLU(), nn.Linear(16, 4))
    needle = r"the model's state dict holds 1._extra_state, a dict \(a module's get_extra_state\), and a .safetensors"
    with pytest.raises(PrunekitError, match=rf"^out=: {needle} .*: prune without out= and save the result with "
                                            r"torch.save$"):
        prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))
    with pytest.raises(PrunekitError, match=rf"^save_model: {needle}"):
        prunekit.save_model(net, tmp_path / "m.safetensors", {})
    assert not any(tmp_path.rglob("*.safetensors")) and not (tmp_path / "run").exists()
    assert prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5).sparsity == pytest.approx(0.5, abs=0.01)

@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(label_smoothing=0.1),
                                  nn.CrossEntropyLoss(weight=torch.arange(1., 5.)), "mse", "dict"], ids=["label-smoothing", "class-weights", "mse", "dict-output"])
def test_losses_that_are_means_over_the_batch_pass_the_mean_check(loss):
    x, y = _data()
    net = _net()
    if loss == "mse":
        y = torch.randn(len(x), 4)
        loss = nn.MSELoss()
    elif loss == "dict":
        class Dict(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = _net()

            def forward(self, x):
                return {"logits": self.inner(x)}
        net = Dict()
        loss = lambda out, y: nn.functional.cross_entropy(out["logits"], y)    # noqa: E731
    result = prunekit.prune(net, (x, y), method="chita", sparsity=0.5, fisher_samples=16, loss=loss)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)


def test_numpy_integers_are_whole_numbers():
    """seed=np.int64(3) was refused as 'not a whole number'; NumPy integers (a seed grid) and floats
    stand for the Python numbers, and give what they give."""
    np = pytest.importorskip("numpy")
    x, y = _data()
    runs = []
    for seed, batch, samples in ((np.int64(3), np.int32(16), np.int64(16)), (3, 16, 16)):
        net = _net()
        result = prunekit.prune(net, (x, y), method="chita", sparsity=np.float32(0.5), seed=seed, batch_size=batch,
                                fisher_samples=samples)
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        assert result.sparsity == pytest.approx(0.5, abs=0.01)
    assert torch.equal(*runs)
    for bad in (np.bool_(True), np.float64(1.0), np.int64(-1)):
        with pytest.raises(PrunekitError, match="seed must be a whole number"):
            prunekit.prune(_net(), (x, y), sparsity=0.5, seed=bad)


def test_a_shrunk_model_saved_with_save_model_loads_with_load_pruned(tmp_path):
    """save_model wrote a channel method's smaller model without its channel layout, and
    load_pruned then said 'pick the model it was trained for' (the class was right)."""
    x, y = _data()
    result = prunekit.prune(_BnNet(), (x, y), method="autobot", flops=0.5, gate_batches=2, finetune_epochs=0)
    assert result.model.c2.out_channels < 8                      # shrunk
    prunekit.save_model(result.model, tmp_path / "small.safetensors", {})
    loaded = prunekit.load_pruned(_BnNet(), tmp_path / "small.safetensors")
    assert loaded.c2.out_channels == result.model.c2.out_channels
    with torch.no_grad():
        got, want = loaded(x), result.model.eval()(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # a file without the layout (saved by an older prunekit) is named for what it is
    prunekit.save_model(result.model, tmp_path / "bare.safetensors", {"channel_layout": {}})
    with pytest.raises(PrunekitError, match="narrower than the model's: a model with channels removed"):
        prunekit.load_pruned(_BnNet(), tmp_path / "bare.safetensors")


def test_prune_documents_seed_and_progress():
    import inspect
    doc = inspect.getdoc(prunekit.prune)
    args = doc.split("Args:")[1]
    assert "\n    seed:" in args and "\n    progress:" in args
    assert "torch.manual_seed" in args.split("\n    seed:")[1].split("\n    progress:")[0]


@pytest.mark.parametrize("formats", [["torchscript", "sparse"], ["onnx"]])
def test_export_all_gives_the_model_back_in_its_modes(tmp_path, formats):
    """export_all left a train()-mode model in eval mode; a module frozen in eval stays so."""
    if formats == ["onnx"]:
        pytest.importorskip("onnx")
    from prunekit.export import export_all
    net = _BnNet().train()
    net.bn.eval()
    export_all(net, torch.randn(2, 1, 8, 8), tmp_path / "export", formats)
    assert net.training and net.c1.training and not net.bn.training


class _NonNegative(nn.Module):
    def forward(self, w):
        return w.abs()


def _independent_sparsity(net):
    """Share of zeros among every Linear's weight as the forward uses it (its own count)."""
    weights = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_a_weight_under_a_parametrization_is_refused_or_excluded_not_left_dense_silently():
    """A weight under torch.nn.utils.parametrize (not weight norm) was left dense, no warning, while
    the reported sparsity (0.70) read as the model's (really 0.49): refused naming the fix; with
    that layer excluded the run goes on and the layer stays as it was."""
    from torch.nn.utils import parametrize
    x, y = _data()
    net = _net()
    parametrize.register_parametrization(net[3], "weight", _NonNegative())
    before = net[3].weight.detach().clone()
    with pytest.raises(PrunekitError, match=r"^3\.weight is under a torch parametrization \(_NonNegative\).*"
                                            r"remove_parametrizations\(module, 'weight'\), or exclude '3'$"):
        prunekit.prune(net, (x, y), method="chita", sparsity=0.7, fisher_samples=16)
    assert torch.equal(net[3].weight, before)
    result = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.7, exclude=["3"])
    assert torch.equal(net[3].weight, before) and result.sparsity == pytest.approx(0.7, abs=0.01)
    assert (net[1].weight == 0).float().mean().item() == pytest.approx(result.sparsity, rel=1e-6)


@pytest.mark.parametrize("method,budget", [("magnitude", {"sparsity": 0.8}),
                                           ("falcon", {"flops": 0.3, "fisher_samples": 16})])
def test_a_layer_pruned_with_torch_prune_is_refused_naming_prune_remove(method, budget):
    """A layer pruned with torch.nn.utils.prune (weight = weight_orig * weight_mask in a pre-hook)
    was silently left out: sparsity reported 0.80, really 0.60; flops_kept over-reported."""
    import torch.nn.utils.prune as torch_prune
    x, y = _data()
    net = _net()
    torch_prune.l1_unstructured(net[3], "weight", 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PrunekitError, match=r"^module '3' was pruned with torch.nn.utils.prune .* "
                                            r"torch.nn.utils.prune.remove\(module, 'weight'\)"):
        prunekit.prune(net, (x, y), method=method, **budget)
    # excluding it does not help, and the refusal says so: its weight is no parameter, so the cost
    # model would count it dense (MACs kept over-reported, as for the permanent zeros below they are not)
    with pytest.raises(PrunekitError, match=r"^module '3' was pruned .* cannot count or prune, excluded or not: "):
        prunekit.prune(net, (x, y), method=method, exclude=["3"], **budget)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    torch_prune.remove(net[3], "weight")                  # the fix named: the run's count is the model's
    result = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.8)
    assert result.sparsity == pytest.approx(_independent_sparsity(net), rel=1e-6)


@pytest.mark.parametrize("wrap, needle", [
    (lambda m: nn.utils.spectral_norm(m), r"^module '1' has spectral normalization .*"
                                          r"torch.nn.utils.remove_spectral_norm\(module, 'weight'\), then prune$"),
    (lambda m: nn.utils.parametrizations.orthogonal(m), r"^1.weight is under a torch parametrization \(_Orthogonal\).*"
                                                        r"remove_parametrizations\(module, 'weight'\), or exclude '1'$")],
    ids=["old spectral_norm", "orthogonal"])
def test_other_weights_made_before_each_call_are_refused_naming_their_fold(wrap, needle):
    """The old spectral_norm (weight_orig divided in a pre-hook) was left out silently like a
    torch.nn.utils.prune layer (sparsity 0.50 reported, 0.14 real); an orthogonal parametrization
    was refused asking for a cost rule of the parametrization's op (since session 55: as any
    parametrization, naming the fold or exclude=, which works: test_channel_methods_unusual_models)."""
    import warnings
    x, y = _data()
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # torch's deprecation of the old form
        net[1] = wrap(net[1])
    with pytest.raises(PrunekitError, match=needle):
        prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5)


def test_a_run_folders_model_named_before_the_run_was_made_says_to_make_it(tmp_path, monkeypatch):
    """Session 51: the README's vit-tiny block, run where it sat, read runs/fmnist-vit-tiny/model.safetensors,
    made by a recipe 40 lines later; the refusal said only "check the path". A missing run folder's
    model names the command that makes it; any other missing file still says to check the path."""
    from prunekit.loading import load_model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(prunekit.PrunekitError, match=r"runs/fmnist-vit-tiny is not made yet: run the `prunekit "
                                                     r"train` or `prunekit prune` command that writes --out "
                                                     r"runs/fmnist-vit-tiny first"):
        load_model("vit-tiny", "runs/fmnist-vit-tiny/model.safetensors")
    (tmp_path / "runs" / "empty").mkdir(parents=True)              # the folder is there: the path is wrong
    with pytest.raises(prunekit.PrunekitError, match=r"not found: check the path$"):
        load_model("vit-tiny", "runs/empty/model.safetensors")
