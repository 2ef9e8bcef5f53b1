"""Run folders written by an older prunekit (before checkpoints recorded ``epoch_passes`` and a
training epoch checkpoint its ``class_names``), carried on by this one: said, never silent.

That version read its loader twice per training epoch (tqdm.auto's bar started a pass of its
own), this one once: a gradual, structured or train run killed under it and resumed here ends
with weights equal to neither version's uninterrupted run. Its train checkpoints also recorded no
class names, so a resume over renamed class folders could shift the labels unseen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import prunekit
from prunekit import runs
from prunekit.cli import main

ASSETS = Path(prunekit.__file__).parent / "assets"
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256"]
OLDER = "was written by an older prunekit that read its loader twice per epoch: carried on, this run's weights " \
        "match no uninterrupted run (of either version); run it anew with --force for a reproducible result"


def _stop_after_first_checkpoint(monkeypatch) -> None:
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)


def _as_older(folder: Path, drop_meta: str | None = None, drop_extra: str | None = None) -> None:
    """Rewrite each checkpoint of ``folder`` as the older prunekit wrote it: without metadata key
    ``drop_meta`` and without key ``drop_extra`` of its ``extra``."""
    for path in sorted((folder / "checkpoints").glob("stage-*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            meta = dict(handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        assert drop_meta is None or meta.pop(drop_meta) == "1"           # this version writes the marker
        if drop_extra is not None:
            extra = json.loads(meta["extra"])
            assert drop_extra in extra
            del extra[drop_extra]
            meta["extra"] = json.dumps(extra)
        save_file(tensors, str(path), metadata=meta)


CASES = {
    "train": ["train", "--model", "mlpnet", *MNIST, "--epochs", "2", "--lr", "0.05", "--json"],
    "gradual": ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST,
                "--method", "magnitude", "--sparsity", "0.8", "--gradual", "--events", "2", "--epochs-per-event", "1",
                "--final-epochs", "1", "--lr", "0.01", "--json"],
    "structured": ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST,
                   "--method", "autobot", "--flops", "0.5", "--gate-batches", "2", "--finetune-epochs", "1",
                   "--json"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resume_of_an_older_folder_says_its_weights_match_no_uninterrupted_run(case, tmp_path, capsys,
                                                                                monkeypatch):
    """Killed after its first checkpoint; one copy with the marker removed (an older prunekit's
    folder) warns once on stderr and in run.log; the folder as written here carries on silently."""
    new, old = tmp_path / "new", tmp_path / "old"
    _stop_after_first_checkpoint(monkeypatch)
    assert main([*CASES[case], "--out", str(new)]) == 130
    monkeypatch.undo()
    shutil.copytree(new, old)
    _as_older(old, drop_meta="epoch_passes")
    capsys.readouterr()
    again = (lambda out: main([*CASES[case], "--out", str(out)])) if case == "train" else \
        (lambda out: main(["prune", "--resume", str(out), "--json"]))
    assert again(old) == 0
    err = capsys.readouterr().err
    # `prune --resume` takes no --force: its warning names the original command with it
    said = OLDER if case == "train" else OLDER.replace("--force", "the original command and --force (--resume "
                                                       "takes none)")
    assert err.count(said) == 1 and f"prunekit: warning: {old} {said}" in err, err
    assert f"{old} {said}" in (old / "run.log").read_text()
    assert again(new) == 0
    assert "older prunekit" not in capsys.readouterr().err
    assert "older prunekit" not in (new / "run.log").read_text()


COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220)}
NET = ("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), "
       "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")


def _write_colours(folder: Path, count: int, seed: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for k in range(count):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / name / f"{k}.png")


def test_an_older_train_checkpoint_without_class_names_warns_that_the_classes_went_unchecked(tmp_path, capsys,
                                                                                            monkeypatch):
    """`train --out` over an image folder killed under the older prunekit (its epoch checkpoint has
    no class_names), a class folder renamed (a -> z shifts every label), the same command again: it
    carried on silently with the shifted labels (0% top-1, exit 0). Now it says, once, that the
    classes could not be checked."""
    _write_colours(tmp_path / "photos" / "train", 4, seed=0)
    _write_colours(tmp_path / "photos" / "test", 2, seed=1)
    (tmp_path / "net.py").write_text(NET)
    out = tmp_path / "run"
    argv = ["train", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", "--epochs", "2", "--lr", "0.2",
            "--batch-size", "4", "--out", str(out), "--json"]
    _stop_after_first_checkpoint(monkeypatch)
    assert main(argv) == 130
    monkeypatch.undo()
    _as_older(out, drop_extra="class_names")
    _as_older(out, drop_extra="data_fingerprint")       # that version recorded neither
    for split in ("train", "test"):
        (tmp_path / "photos" / split / "a").rename(tmp_path / "photos" / split / "z")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = "recorded no class names: carried on without checking that the class folders (b, c, z) are the ones"
    assert err.count(said) == 1 and "--force" in err, err
    assert said in (out / "run.log").read_text()


def test_an_older_prune_run_without_class_names_warns_that_the_classes_went_unchecked(tmp_path, capsys,
                                                                                      monkeypatch):
    """The same for `prunekit prune --resume` of a run whose metrics.json records no class names
    (the older prunekit's): it carried on silently over renamed class folders."""
    from prunekit.commands import common
    _write_colours(tmp_path / "photos" / "train", 4, seed=0)
    _write_colours(tmp_path / "photos" / "test", 2, seed=1)
    (tmp_path / "net.py").write_text(NET)
    out = tmp_path / "run"
    argv = ["prune", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", "--method", "magnitude",
            "--sparsity", "0.5", "--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "1",
            "--batch-size", "4", "--out", str(out), "--json"]
    _stop_after_first_checkpoint(monkeypatch)
    assert main(argv) == 130
    monkeypatch.undo()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics.pop("class_names") == ["a", "b", "c"] and metrics["stages"]
    assert metrics.pop("data_fingerprint")              # that version recorded neither
    (out / "metrics.json").write_text(json.dumps(metrics))
    for split in ("train", "test"):
        (tmp_path / "photos" / split / "a").rename(tmp_path / "photos" / split / "z")
    common.evaluation_split.cache_clear()      # read once per process: a command line run is a new one
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    said = "recorded no class names: carried on without checking that the classes of the data (b, c, z) are"
    assert err.count(said) == 1 and "--force" in err, err
    assert said in (out / "run.log").read_text()


def test_export_of_an_unfinished_training_run_names_the_train_command_not_prune_resume(tmp_path, capsys,
                                                                                       monkeypatch):
    """`prune --resume` refuses a train folder, yet export told the user to run it first."""
    out = tmp_path / "run"
    _stop_after_first_checkpoint(monkeypatch)
    assert main([*CASES["train"], "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["export", str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "training run that has not finished" in err, err
    assert "`prunekit train ... --out` command again" in err and "--resume" not in err, err


@pytest.mark.parametrize("unrecorded", ["class names", "images", "loader passes"])
def test_the_older_folder_warnings_of_prune_resume_name_what_resume_takes(unrecorded, tmp_path, capsys, monkeypatch):
    """`prune --resume DIR` of a run an older prunekit wrote warned "run it anew with --force", yet
    --resume refuses --force ("leave out --force"). Under --resume the warning names the original
    command with --force; without --resume it still names --force."""
    from prunekit.commands import common
    _write_colours(tmp_path / "photos" / "train", 4, seed=0)
    _write_colours(tmp_path / "photos" / "test", 2, seed=1)
    (tmp_path / "net.py").write_text(NET)
    out = tmp_path / "run"
    argv = ["prune", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", "--method", "magnitude",
            "--sparsity", "0.5", "--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "1",
            "--batch-size", "4", "--out", str(out), "--json"]
    _stop_after_first_checkpoint(monkeypatch)
    assert main(argv) == 130
    monkeypatch.undo()
    shutil.copytree(out, tmp_path / "again")
    for folder in (out, tmp_path / "again"):
        if unrecorded == "loader passes":
            _as_older(folder, drop_meta="epoch_passes")
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics.pop("data_fingerprint")
        if unrecorded == "class names":
            assert metrics.pop("class_names") == ["a", "b", "c"]
        (folder / "metrics.json").write_text(json.dumps(metrics))
    said = {"class names": "recorded no class names", "images": "recorded no fingerprint of its images",
            "loader passes": "read its loader twice per epoch"}[unrecorded]
    common.evaluation_split.cache_clear()      # read once per process: a command line run is a new one
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if said in line]
    assert len(lines) == 1 and "the original command and --force" in lines[0], lines
    assert "anew with --force" not in lines[0]
    assert "the original command and --force" in (out / "run.log").read_text()
    common.evaluation_split.cache_clear()
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main(argv) == 0                     # the same command: there --force is the fix
    lines = [line for line in capsys.readouterr().err.splitlines() if said in line]
    assert len(lines) == 1 and "run it anew with --force" in lines[0], lines


# A Python run folder of the prunekit before this one (81244f6): its code digests were taken by an
# earlier rule (a function's docstring in, a loss module's train/eval mode out), so a digest of the
# same code now differs. Whether the code is the same cannot be told: refused, naming the rule and
# force=True (carried on, a run of other code could be handed back as this call's).

def _documented(name, w):
    """|w| (the docstring the earlier rule hashed)."""
    return w.abs()


def _tiny_python_run():
    import torch
    from torch import nn
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), x, x[:, :3].argmax(1)


def _as_earlier_rule(folder: Path, key: str, comments: bool = False) -> None:
    """Rewrite ``folder``'s config.toml as the earlier version wrote it: no comments (unless
    ``comments``) and ``key``'s digest another one (the same code's digest by the earlier rule)."""
    config = folder / "config.toml"
    lines = []
    for line in config.read_text().splitlines():
        if not comments and line.startswith("#"):
            continue
        name, _, value = line.partition(" = ")
        if name == key:
            line = f'{name} = "{"0" * 64}"' + ("  # " + value.split("  # ")[1] if comments and "  # " in value else "")
        lines.append(line if comments else line.split("  # ")[0])
    config.write_text("\n".join(lines) + "\n")
    metrics_path = folder / "metrics.json"          # the earlier version recorded the same config there
    metrics = json.loads(metrics_path.read_text())
    if "config" in metrics:
        metrics["config"] = config.read_text()
        metrics_path.write_text(json.dumps(metrics))


@pytest.mark.parametrize("given", ["importance", "loss"])
def test_an_older_python_folder_whose_code_digest_differs_is_refused_naming_the_rule_change(given, tmp_path):
    from torch import nn
    kw = {"importance": _documented} if given == "importance" else {"loss": nn.CrossEntropyLoss().eval()}
    net, x, y = _tiny_python_run()
    out = tmp_path / "run"
    prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, out=str(out), **kw)
    _as_earlier_rule(out, f"{given}-fingerprint")
    stored = (out / "config.toml").read_text()
    with pytest.raises(prunekit.PrunekitError) as refused:
        prunekit.prune(_tiny_python_run()[0], (x, y), method="magnitude", sparsity=0.5, out=str(out), **kw)
    said = str(refused.value)
    assert "older prunekit" in said and f"its {given}= by an earlier rule" in said and "force=True" in said, said
    assert "\n" not in said and (out / "config.toml").read_text() == stored          # nothing written
    again = prunekit.prune(_tiny_python_run()[0], (x, y), method="magnitude", sparsity=0.5, out=str(out),
                           force=True, **kw)
    assert again.record and "# *-fingerprint:" in (out / "config.toml").read_text()


def test_a_folder_of_this_version_whose_code_digest_differs_is_refused_as_other_code(tmp_path):
    from prunekit import api
    assert api.CODE_COMMENT.startswith(runs.CODE_RULE_MARK)      # the mark of a config of this version
    net, x, y = _tiny_python_run()
    out = tmp_path / "run"
    prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, out=str(out), importance=_documented)
    _as_earlier_rule(out, "importance-fingerprint", comments=True)
    with pytest.raises(prunekit.PrunekitError, match="holds another run, made with another importance="):
        prunekit.prune(_tiny_python_run()[0], (x, y), method="magnitude", sparsity=0.5, out=str(out),
                       importance=_documented)
