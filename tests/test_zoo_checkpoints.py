"""Checkpoint reading: formats, key normalization, misfit messages, and that no pickled code runs."""

import io
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prunekit import zoo
from prunekit.errors import PrunekitError
from prunekit.zoo import restricted_pickle

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "checkpoints"


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def trained_like(name: str) -> torch.nn.Module:
    """A model whose BN statistics differ from a fresh one's, so a round trip is a real test."""
    model = zoo.build(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("legacy_format", [False, True])
def test_round_trip_through_dataparallel_style_file(tmp_path, legacy_format):
    source = trained_like("resnet20")
    path = tmp_path / "r20.th"
    state = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy_format)
    target = zoo.build("resnet20")
    assert not states_equal(source, target)
    zoo.load_checkpoint(target, path)
    assert states_equal(source, target)


def test_safetensors_and_top_level_and_model_key(tmp_path):
    source = trained_like("resnet20-b")
    save_file(source.state_dict(), tmp_path / "m.safetensors")
    torch.save(source.state_dict(), tmp_path / "top.pt")
    torch.save({"model": source.state_dict()}, tmp_path / "under_model.pt")
    for file in ("m.safetensors", "top.pt", "under_model.pt"):
        loaded = zoo.load_model("resnet20-b", tmp_path / file)
        assert states_equal(source, loaded)
        assert not loaded.training


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    """Checkpoints saved by PyTorch < 0.4.1 (akamaster's) have no num_batches_tracked."""
    source = zoo.build("resnet20")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.th")
    target = zoo.build("resnet20")
    zoo.load_checkpoint(target, tmp_path / "old.th")
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def woodfisher_state(model: torch.nn.Module, mask: torch.Tensor) -> dict:
    state = {}
    for name in ("fc1", "fc2", "fc3"):
        weight = getattr(model, name).weight.detach().clone()
        state[f"module.{name}._layer.weight"] = weight
        state[f"module.{name}._weight_mask"] = mask if name == "fc2" else torch.ones_like(weight)
    return state


def test_masked_layer_keys_are_renamed_and_masks_applied(tmp_path):
    source = zoo.build("mlpnet")
    mask = (torch.rand(20, 40) > 0.5).float()
    torch.save({"model_state_dict": woodfisher_state(source, torch.ones(20, 40))}, tmp_path / "ones.ckpt")
    torch.save({"model_state_dict": woodfisher_state(source, mask)}, tmp_path / "mask.ckpt")
    assert set(zoo.read_state_dict(tmp_path / "ones.ckpt")) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert states_equal(source, zoo.load_model("mlpnet", tmp_path / "ones.ckpt"))
    masked = zoo.load_model("mlpnet", tmp_path / "mask.ckpt")
    assert torch.equal(masked.fc2.weight, source.fc2.weight * mask)
    assert torch.equal(masked.fc1.weight, source.fc1.weight)


def test_misfit_names_the_problem_and_the_fitting_model(tmp_path):
    torch.save({"state_dict": zoo.build("resnet20").state_dict()}, tmp_path / "a.th")
    target = zoo.build("resnet20-b")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(PrunekitError) as err:
        zoo.load_checkpoint(target, tmp_path / "a.th")
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit model 'resnet20-b'" in message
    assert "12 missing keys e.g. 'layer2.0.downsample.0.weight'" in message
    assert "2 unexpected keys e.g. 'linear.weight'" in message
    assert "trained for ('resnet20'?)" in message and "--" not in message   # Python names no flag
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_shape_mismatch_suggests_num_classes(tmp_path):
    torch.save(zoo.build("resnet20").state_dict(), tmp_path / "a.th")
    expected = (
        r"2 shape mismatches e\.g\. 'linear\.weight' \(10, 64\) in the file vs \(100, 64\) in the model\): "
        r"build the model with the checkpoint's num_classes"
    )
    with pytest.raises(PrunekitError, match=expected):
        zoo.load_model("resnet20", tmp_path / "a.th", num_classes=100)
    torch.save(zoo.build("resnet20", in_channels=1).state_dict(), tmp_path / "gray.th")
    with pytest.raises(PrunekitError, match=r"build the model with the checkpoint's in_channels \(1\)$"):
        zoo.load_model("resnet20", tmp_path / "gray.th")


def test_a_first_linear_layers_input_width_is_no_class_count(tmp_path):
    """fc1.weight (40, 783) vs (40, 784) was told to build the model with the checkpoint's
    num_classes / in_channels: the class count is the last layer's outputs."""
    state = zoo.build("mlpnet").state_dict()
    save_file({**state, "fc1.weight": torch.zeros(40, 783)}, tmp_path / "narrow.safetensors")
    with pytest.raises(PrunekitError) as err:
        zoo.load_model("mlpnet", tmp_path / "narrow.safetensors")
    assert "num_classes" not in str(err.value) and "in_channels" not in str(err.value)
    assert str(err.value).endswith("its first layer 'fc1.weight' takes 783 inputs, the model's 784: the checkpoint was "
                                   "made for inputs of another size; pick the model (and data) it was trained for")
    save_file({**state, "fc3.weight": torch.zeros(7, 20)}, tmp_path / "seven.safetensors")
    with pytest.raises(PrunekitError, match=r"build the model with the checkpoint's num_classes \(7\)$"):
        zoo.load_model("mlpnet", tmp_path / "seven.safetensors")


def test_damaged_torch_files_are_called_damaged(tmp_path):
    """A truncated torch.save file was refused with torch's "[Errno 22] Invalid argument"."""
    torch.save(zoo.build("mlpnet").state_dict(), tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:20000])
    with pytest.raises(PrunekitError, match=r"checkpoint .*cut\.pth is cut short \(its zip archive has no end, .*\): save "
                                            r"or download it again$"):
        zoo.read_state_dict(tmp_path / "cut.pth")


def test_a_shrunk_models_loose_dense_file_is_not_called_another_class_count(tmp_path):
    """A dense export of a shrunk model moved away from its run folder (no metadata in old versions)
    was told to 'build the model with the checkpoint's num_classes / in_channels'."""
    shrunk = zoo.build("mlpnet")
    shrunk.fc1, shrunk.fc2 = torch.nn.Linear(784, 19, bias=False), torch.nn.Linear(19, 20, bias=False)
    save_file(dict(shrunk.state_dict()), tmp_path / "loose.safetensors")
    with pytest.raises(PrunekitError) as err:
        zoo.load_model("mlpnet", tmp_path / "loose.safetensors")
    message = str(err.value)
    assert "num_classes" not in message and "\n" not in message
    assert message.endswith("the file's layer widths differ from the model's, e.g. a model with channels removed: "
                            "load its run folder, which records the channel layout (the command line's --checkpoint "
                            "RUNDIR, Python's prunekit.load_pruned(model, RUNDIR))")


def test_unreadable_files_raise_prunekit_error(tmp_path):
    with pytest.raises(PrunekitError, match="not found"):
        zoo.read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(PrunekitError, match=r"junk.pt is not a model checkpoint \(a text file\): pass a torch.save"):
        zoo.read_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(PrunekitError, match="junk.safetensors is not a model checkpoint"):
        zoo.read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x20" + b"\x00" * 7 + b'{"a": ')     # a header cut short
    with pytest.raises(PrunekitError, match=r"cut\.safetensors is damaged \(it does not read as a safetensors file\): save or download it again$"):
        zoo.read_state_dict(tmp_path / "cut.safetensors")
    torch.save({"epoch": 3, "best": 0.9}, tmp_path / "nostate.pt")
    with pytest.raises(PrunekitError, match="holds no state dict .*'epoch'"):
        zoo.read_state_dict(tmp_path / "nostate.pt")


class RunsShellCommand:
    """Pickles as a call to os.system: unpickling it unsafely would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, ("touch " + shlex.quote(str(self.marker)),)


SIDE_EFFECTS: list[str] = []


def _record_side_effect(tag: str) -> str:
    SIDE_EFFECTS.append(tag)
    return tag


class CallsLocalFunction:
    def __reduce__(self):
        return _record_side_effect, ("ran",)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_pickled_code_in_a_checkpoint_is_not_executed(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    source = zoo.build("mlpnet")
    payload = {
        "state_dict": source.state_dict(),
        "optimizer": RunsShellCommand(marker),
        "extra": CallsLocalFunction(),
    }
    torch.save(payload, tmp_path / "evil.pt", _use_new_zipfile_serialization=not legacy_format)
    assert not marker.exists()
    loaded = zoo.load_model("mlpnet", tmp_path / "evil.pt")
    assert states_equal(source, loaded)
    assert not marker.exists()
    assert SIDE_EFFECTS == []


def test_restricted_unpickler_returns_inert_placeholders():
    data = pickle.dumps({"hook": CallsLocalFunction(), "cls": pickle.Pickler, "n": [1, 2]})
    out = restricted_pickle.load(io.BytesIO(data))
    assert SIDE_EFFECTS == []
    assert isinstance(out["hook"], restricted_pickle.InertObject)
    assert out["hook"].source.endswith("_record_side_effect")
    assert issubclass(out["cls"], restricted_pickle.InertObject)
    assert out["n"] == [1, 2]


REFERENCE = {
    "mlpnet": "mnist_25_epoch_93.97.ckpt",
    "resnet20-b": "resnet20_cifar10.pth.tar",
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}


@pytest.mark.parametrize("name", REFERENCE)
def test_shared_reference_checkpoints_fit_their_models(name):
    path = SHARED / REFERENCE[name]
    if not path.is_file():
        pytest.skip(f"{path} not present")
    model = zoo.load_model(name, path)
    with torch.no_grad():
        assert model(torch.zeros(1, *zoo.spec(name).input_shape)).shape == (1, 10)


def test_integer_weights_and_misshapen_masks_are_refused(tmp_path):
    """An int8 state dict loaded silently (9.80%, '1 MACs'); a (3,) mask failed inside torch and a
    (rows, 1) mask was broadcast over whole rows."""
    from torch import nn
    from prunekit.errors import PrunekitError
    from prunekit.zoo.checkpoints import load_checkpoint
    model = nn.Linear(4, 3)
    torch.save({k: v.to(torch.int8) for k, v in model.state_dict().items()}, tmp_path / "int8.pt")
    with pytest.raises(PrunekitError, match=r"holds 'weight' as torch.int8.*quantized or integer checkpoint"):
        load_checkpoint(nn.Linear(4, 3), tmp_path / "int8.pt")
    net = nn.Sequential(nn.Linear(4, 3))
    for shape in ((3,), (3, 1)):
        torch.save({**net.state_dict(), "0._weight_mask": torch.ones(shape)}, tmp_path / "masked.pt")
        with pytest.raises(PrunekitError, match=r"a mask for '0.weight' of shape .* but the tensor is \(3, 4\)"):
            load_checkpoint(nn.Sequential(nn.Linear(4, 3)), tmp_path / "masked.pt")


@pytest.mark.parametrize("edit", [{"build_kwargs": {"num_classes": 10, "foo": 1}}, {"build_kwargs": [10]},
                                  {"build_kwargs": {"num_classes": 10**12}}, {"input_shape": "x"},
                                  {"input_shape": [1, 28, -28]}, {"normalization": {"mean": [0.1]}}])
def test_a_hand_edited_sidecar_is_refused_in_one_line(tmp_path, edit):
    """Each of these edits of model.json gave a TypeError, KeyError or allocation failure from inside torch."""
    import json
    from torch import nn
    from prunekit.loading import load_model
    from prunekit.saving import save_model
    path = tmp_path / "model.safetensors"
    save_model(nn.Linear(2, 2), path, {"model": "mlpnet"})
    meta = {"model": "mlpnet", "build_kwargs": {"num_classes": 10}, "input_shape": [1, 28, 28],
            "normalization": {"mean": [0.1307], "std": [0.3081]}, **edit}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PrunekitError, match=r"model.json is damaged \(.*\): restore it"):
        load_model("mlpnet", path)


def test_a_marked_sidecar_hand_edited_is_refused(tmp_path):
    import json
    from prunekit.loading import load_model
    from prunekit.saving import save_model
    path = tmp_path / "model.safetensors"
    save_model(zoo.build("mlpnet"), path, {"model": "mlpnet"})
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "note": "mine", "input_shape": "x"}))
    with pytest.raises(PrunekitError, match=r"model.json is damaged \(input_shape"):
        load_model("mlpnet", path)


@pytest.mark.parametrize("theirs", [{"architectures": ["MLP"], "model_type": "mlp"},
                                    {"model": "my-mlp", "notes": "trained on tuesday"}, ["a", "list"]])
def test_a_users_json_beside_a_safetensors_is_no_sidecar(tmp_path, theirs):
    """X.json of the user's beside X.safetensors was read as prunekit's sidecar: refused (no 'model'
    key) or misread (its 'model' named as the checkpoint's); prunekit's save_model replaced it."""
    import json
    from prunekit.loading import load_model
    from prunekit.saving import read_meta, save_model
    path, side = tmp_path / "mine.safetensors", tmp_path / "mine.json"
    save_file(dict(zoo.build("mlpnet").state_dict()), path)
    side.write_text(json.dumps(theirs))
    assert read_meta(path) == {}
    assert load_model("mlpnet", path).name == "mlpnet"
    before = path.read_bytes()
    with pytest.raises(PrunekitError, match=r"^\S*mine.json is not a prunekit sidecar and saving mine.safetensors "
                                            r"would replace it: move it away, or save under another name$"):
        save_model(zoo.build("mlpnet"), path, {"model": "mlpnet"})
    assert json.loads(side.read_text()) == theirs and path.read_bytes() == before


def test_save_model_refuses_to_replace_a_users_own_safetensors(tmp_path):
    """save_model replaced a .safetensors the user made (their own tensors, no sidecar) without a
    word; it replaces only a model it wrote itself (marked in its metadata, or, from before the
    mark, with its prunekit sidecar beside it)."""
    import json
    from safetensors.torch import load_file
    from prunekit.saving import save_model
    from torch import nn
    mine = tmp_path / "features.safetensors"
    save_file({"my_embedding": torch.randn(100, 16)}, mine)
    before = mine.read_bytes()
    with pytest.raises(PrunekitError, match=r"^\S*features.safetensors was not written by prunekit.save_model and "
                                            r"saving would replace it: move it away, or save under another name"):
        save_model(nn.Linear(2, 2), mine, {})
    assert mine.read_bytes() == before and not (tmp_path / "features.json").exists()
    # its own model file is replaced: marked, and (an older one, unmarked) known by its sidecar
    own = tmp_path / "own.safetensors"
    save_model(nn.Linear(2, 2), own, {})
    save_model(nn.Linear(2, 3), own, {})
    assert load_file(own)["weight"].shape == (3, 2)
    save_file({"weight": torch.zeros(2, 2)}, own)           # as old versions wrote it: no mark
    save_model(nn.Linear(2, 4), own, {})
    assert load_file(own)["weight"].shape == (4, 2) and "prunekit_sidecar" in json.loads(
        (tmp_path / "own.json").read_text())
    # a run folder's model is its run's, though prunekit wrote it: refused, a file of another name taken
    run = tmp_path / "run"
    run.mkdir()
    save_model(nn.Linear(2, 2), run / "model.safetensors", {})
    (run / "config.toml").write_text('method = "magnitude"\n')
    (run / "metrics.json").write_text('{"status": "done"}\n')
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(PrunekitError, match="is the model of the prunekit run in"):
        save_model(nn.Linear(2, 5), run / "model.safetensors", {})
    assert (run / "model.safetensors").read_bytes() == before
    save_model(nn.Linear(2, 5), run / "mine.safetensors", {})


def test_save_model_refuses_the_own_files_of_every_kind_of_prunekit_folder(tmp_path):
    """save_model knew a prune folder (config.toml + metrics.json) as a run's, not a `prunekit train
    --out` folder (config.toml + result.json, no metrics.json): it replaced the trained model and
    wiped its sidecar to the bare mark, and the same train command then printed the old result. Every
    kind of folder prunekit writes (train, prune, sweep, compare, export) keeps its own files."""
    import hashlib
    import json
    from torch import nn
    from prunekit.export import export_all
    from prunekit.record import save_pruned
    from prunekit.saving import save_model

    def snapshot(folder):
        return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    train = tmp_path / "train"      # as `prunekit train --out` leaves it
    train.mkdir()
    (train / "config.toml").write_text('model = "mlpnet"\nepochs = 2\nout = "train"\n')
    (train / "run.log").write_text("epoch 2 saved to stage-002.safetensors\n")
    save_pruned(train, nn.Linear(4, 3), {"model": "mlpnet", "normalization": [[0.5], [0.25]]},
                {"accuracy": 97.0}, shrunk=False)
    prune = tmp_path / "prune"      # `prunekit prune --out`
    save_pruned(prune, nn.Linear(4, 3), {"model": "mlpnet"}, {"accuracy": 90.0}, shrunk=False)
    (prune / "config.toml").write_text('method = "magnitude"\n')
    (prune / "metrics.json").write_text('{"status": "done"}\n')
    save_pruned(prune / "snapshot-0.5", nn.Linear(4, 3), {"model": "mlpnet"}, {"accuracy": 91.0}, shrunk=False)
    (prune / "checkpoints").mkdir()
    row = {"run": str(prune), "method": "magnitude", "accuracy": 90.0}
    compare = tmp_path / "compare"  # `prunekit compare --out`: its rows and report state
    compare.mkdir()
    (compare / "runs.json").write_text(json.dumps([row]))
    (compare / ".prunekit-report.json").write_text('{"report.md": ["0"]}')
    (compare / "report.md").write_text("# Comparison\n")
    sweep = tmp_path / "sweep"      # `prunekit sweep --out`: the same, around its runs' folders
    save_pruned(sweep / "magnitude_sparsity-0.5", nn.Linear(4, 3), {"model": "mlpnet"}, {}, shrunk=False)
    (sweep / "magnitude_sparsity-0.5" / "metrics.json").write_text('{"status": "done"}\n')
    (sweep / "runs.json").write_text(json.dumps([{**row, "run": str(sweep / "magnitude_sparsity-0.5")}]))
    (sweep / ".prunekit-report.json").write_text('{"report.md": ["0"], "sweep_runs": ["magnitude_sparsity-0.5"]}')
    export = tmp_path / "export"    # `prunekit export`
    export_all(nn.Linear(4, 3), torch.zeros(1, 4), export, ["dense", "sparse"])
    before = {folder: snapshot(folder) for folder in (train, prune, compare, sweep, export)}
    refused = [(train, "model.safetensors", "is the model of the prunekit training run in"),
               (train, "result.safetensors", "would write result.json, a file of the prunekit training run"),
               (prune, "model.safetensors", "is the model of the prunekit run in"),
               (prune, "metrics.safetensors", "would write metrics.json, a file of the prunekit run in"),
               (prune / "snapshot-0.5", "model.safetensors", "is the model of the prunekit run in"),   # taper's
               (prune / "checkpoints", "stage-002.safetensors", "would write stage-002.safetensors, a file of the "
                                                               "prunekit run"),
               (compare, "runs.safetensors", "would write runs.json, a file of the prunekit comparison"),
               (sweep, "runs.safetensors", "would write runs.json, a file of the prunekit sweep"),
               (export, "model-dense.safetensors", "would write model-dense.safetensors, a file of the prunekit "
                                                   "export"),
               (export, "exported.safetensors", "would write exported.json, a file of the prunekit export")]
    for folder, name, words in refused:
        with pytest.raises(PrunekitError, match=words + r".*nothing was changed\)$"):
            save_model(nn.Linear(2, 5), folder / name, {})
    assert {folder: snapshot(folder) for folder in before} == before
    assert json.loads((train / "model.json").read_text())["normalization"] == [[0.5], [0.25]]
    for folder in (train, prune, export):     # a file of another name in a run's or an export's is the user's
        save_model(nn.Linear(2, 5), folder / "mine.safetensors", {})
        assert (folder / "mine.json").is_file()
    for folder in (compare, sweep):     # beside a comparison's or a sweep's own files: the user's
        save_model(nn.Linear(2, 5), folder / "mine.safetensors", {})
        assert (folder / "mine.json").is_file()
    run = sweep / "magnitude_sparsity-0.5"      # a sweep's run folder, at any depth: its runs write there
    for path in (run / "mine.safetensors", run / "deeper" / "mine.safetensors"):
        with pytest.raises(PrunekitError, match="lies inside .*, a run folder of the prunekit sweep in"):
            save_model(nn.Linear(2, 5), path, {})
        assert not path.exists()


def test_save_model_where_it_cannot_write_is_one_line_naming_the_users_path(tmp_path, monkeypatch):
    """save_model into a folder it could not write raised PermissionError naming its hidden temporary
    (.m.safetensors.XXXXXXXX.tmp), and under a path whose folder is a file, FileExistsError: a
    PrunekitError names the path asked for and the fix, and nothing is left behind."""
    import tempfile
    from torch import nn
    from prunekit import atomic
    from prunekit.saving import save_model
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    with pytest.raises(PrunekitError, match=rf"^cannot save {notes}/m.safetensors: {notes} is a file, not a folder: "
                                            r"save into a folder \(nothing was changed\)$"):
        save_model(nn.Linear(4, 3), notes / "m.safetensors", {})
    assert notes.read_text() == "mine\n"
    ro = tmp_path / "ro"
    ro.mkdir()

    def refused(*args, dir=None, prefix="", suffix="", **kwargs):     # an unwritable folder, as mkstemp meets it
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abcd1234{suffix}")
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PrunekitError) as caught:
        save_model(nn.Linear(4, 3), ro / "m.safetensors", {})
    message = str(caught.value)
    assert message == (f"cannot save {ro}/m.safetensors: Permission denied writing in {ro}: save into a folder you can "
                       "write (or make this one writable)") and ".tmp" not in message
    assert list(ro.iterdir()) == [] and atomic.tempfile.mkstemp is refused


    def full(*args, dir=None, prefix="", suffix="", **kwargs):      # a full disk is no matter of permissions
        raise OSError(28, "No space left on device", f"{dir}/{prefix}abcd1234{suffix}")
    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(PrunekitError) as caught:
        save_model(nn.Linear(4, 3), ro / "m.safetensors", {})
    assert str(caught.value) == (f"cannot save {ro}/m.safetensors: No space left on device writing in {ro}: the disk "
                                 "(or the quota) is full; free some space there, or save elsewhere")


@pytest.mark.parametrize("name,suggested", [(".safetensors", "model.safetensors"), ("net.pt", "net.safetensors"),
                                            (".hidden", ".hidden.safetensors")])
def test_save_model_names_a_model_file_it_would_take(tmp_path, name, suggested):
    """A file named '.safetensors' (a hidden name, no suffix) was told to be named '.safetensors.safetensors'."""
    from torch import nn
    from prunekit.saving import save_model
    with pytest.raises(PrunekitError, match=rf"got {name!r}: name it e.g. {suggested}$".replace(".", r"\.")):
        save_model(nn.Linear(2, 2), tmp_path / name, {})
    save_model(nn.Linear(2, 2), tmp_path / suggested, {})      # the name suggested is taken
    assert (tmp_path / suggested).is_file() and (tmp_path / Path(suggested).with_suffix(".json").name).is_file()


@pytest.mark.parametrize("prefix", ["_orig_mod.", "model.", "module._orig_mod."])
def test_a_compiled_or_wrapped_models_state_dict_loads(tmp_path, prefix):
    """torch.compile's ``_orig_mod.`` and a training wrapper's ``model.`` prefix: 'pick the model it was
    trained for', although it was the right model."""
    from torch import nn
    from prunekit.zoo.checkpoints import load_checkpoint
    source = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "wrapped.pt")
    target = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    load_checkpoint(target, tmp_path / "wrapped.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_a_whole_pickled_model_is_named_by_its_class(tmp_path):
    """'holds a Inert_Linear': the placeholder's name (and grammar) reached the user."""
    from torch import nn
    from prunekit.zoo.checkpoints import load_checkpoint
    torch.save(nn.Linear(4, 3), tmp_path / "whole.pt")
    with pytest.raises(PrunekitError, match=r"holds an object \(torch.nn.modules.linear.Linear\), not a state dict"):
        load_checkpoint(nn.Linear(4, 3), tmp_path / "whole.pt")


def test_load_pruned_names_a_device_or_numpy_checkpoint(tmp_path):
    """load_pruned("/dev/null") said 'no saved model at /dev/null'; a NumPy state dict 'holds no state dict'."""
    import prunekit
    with pytest.raises(PrunekitError, match=r"^checkpoint /dev/null is a device, not a file: pass a run folder"):
        prunekit.load_pruned(zoo.build("mlpnet"), "/dev/null")
    torch.save({k: v.numpy() for k, v in zoo.build("mlpnet").state_dict().items()}, tmp_path / "np.pth")
    with pytest.raises(PrunekitError, match=r"holds NumPy arrays \('fc1.weight' ...\), not torch tensors.*"
                                            r"torch.from_numpy"):
        prunekit.load_pruned(zoo.build("mlpnet"), tmp_path / "np.pth")


def test_prunekit_exports_read_as_checkpoints(tmp_path):
    """A sparse export is read as the state dict it holds; a dense or sparse export of a shrunk
    model says so and points to its run folder (it said: pick another model / num_classes)."""
    from prunekit.export import export_dense, export_sparse
    source = zoo.build("mlpnet")
    with torch.no_grad():
        source.fc2.weight[:, ::2] = 0
    (tmp_path / "export").mkdir()
    export_sparse(source, tmp_path / "export" / "model-sparse.safetensors")
    assert states_equal(source, zoo.load_model("mlpnet", tmp_path / "export" / "model-sparse.safetensors"))
    shrunk = zoo.build("mlpnet")
    shrunk.fc1, shrunk.fc2 = torch.nn.Linear(784, 19, bias=False), torch.nn.Linear(19, 20, bias=False)
    for export in (export_dense, export_sparse):
        export(shrunk, tmp_path / "export" / "model.safetensors")
        with pytest.raises(PrunekitError) as err:
            zoo.load_model("mlpnet", tmp_path / "export" / "model.safetensors")
        assert "export of a shrunk model (channels removed), whose channel layout is in its run folder: " \
               f"load {tmp_path} instead" in str(err.value)


def test_an_unmarked_dense_export_is_known_by_its_folders_manifest(tmp_path):
    """Dense exports written before they carried metadata are named by exported.json."""
    shrunk = zoo.build("mlpnet")
    shrunk.fc1, shrunk.fc2 = torch.nn.Linear(784, 19, bias=False), torch.nn.Linear(19, 20, bias=False)
    (tmp_path / "export").mkdir()
    save_file(shrunk.state_dict(), tmp_path / "export" / "model-dense.safetensors", metadata={"format": "pt"})
    (tmp_path / "export" / "exported.json").write_text('{"files": ["model-dense.safetensors"]}')
    with pytest.raises(PrunekitError, match="dense export of a shrunk model"):
        zoo.load_model("mlpnet", tmp_path / "export" / "model-dense.safetensors")


def test_an_old_sidecar_with_the_users_extra_key_is_read_and_replaceable(tmp_path):
    """Old save_model wrote meta as given and users added keys ("note"): such a model.json was
    ignored silently (its normalization lost: 96.81% -> 85.40%) and save_model refused to replace it."""
    import json
    from prunekit.loading import load_model
    from prunekit.saving import SIDECAR_MARK, is_sidecar, read_meta, save_model
    path, side = tmp_path / "base.safetensors", tmp_path / "base.json"
    save_file(dict(zoo.build("mlpnet").state_dict()), path)
    old = {"model": "mlpnet", "build_kwargs": {"num_classes": 10, "in_channels": 1}, "input_shape": [1, 28, 28],
           "normalization": {"mean": [0.5], "std": [0.5]}, "note": "my baseline, 96.8%"}
    side.write_text(json.dumps(old))
    assert read_meta(path) == old
    loaded = load_model("mlpnet", path)
    assert loaded.normalization is not None and list(loaded.normalization.mean) == [0.5]
    save_model(zoo.build("mlpnet"), path, {"model": "mlpnet"})
    assert json.loads(side.read_text()) == {SIDECAR_MARK: 1, "model": "mlpnet"}
    assert not is_sidecar({"model": "x", "hidden_size": 3})
    assert not is_sidecar({"model": 3, "normalization": {"mean": [0.5], "std": [0.5]}})


def test_a_state_dict_of_a_layer_pruned_with_torch_prune_names_prune_remove(tmp_path, capsys):
    """weight_orig + weight_mask in place of weight (torch.nn.utils.prune's state dict) was refused
    as a checkpoint of another model ('pick the model it was trained for')."""
    import torch.nn.utils.prune as torch_prune
    from prunekit.cli import main
    model = zoo.build("mlpnet")
    torch_prune.l1_unstructured(model.fc1, "weight", 0.5)
    torch.save(model.state_dict(), tmp_path / "masked.pth")
    assert main(["info", "--model", "mlpnet", "--checkpoint", str(tmp_path / "masked.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit: error: checkpoint") and "\n" not in err
    assert "holds 'fc1.weight_orig' and 'fc1.weight_mask' in place of 'fc1.weight'" in err
    assert "torch.nn.utils.prune.remove(model.fc1, 'weight')" in err


def test_a_safetensors_whose_header_length_starts_like_onnx_is_not_taken_for_an_export(tmp_path):
    """ONNX is known by its first bytes (0x08, ir_version, then 0x12 or 0x3a); a safetensors file's
    header length can start with the same bytes (0x120008 = a 1.2 MB header), its 9th byte is '{'."""
    from prunekit.zoo.checkpoints import _export_file_kind
    look_alike = tmp_path / "big.safetensors"
    look_alike.write_bytes((0x120008).to_bytes(8, "little") + b'{"__metadata__": {}}')
    assert _export_file_kind(look_alike) is None
    onnx_like = tmp_path / "model.bin"
    onnx_like.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x062.13.0:" + bytes(16))
    assert _export_file_kind(onnx_like) == "ONNX"
