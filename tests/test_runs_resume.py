"""Run folders and resume: a real `prunekit prune --out` killed with SIGKILL after its first stage
checkpoint, resumed, ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import prunekit
from prunekit.cli import main

ASSETS = Path(prunekit.__file__).parent / "assets"
SRC = Path(prunekit.__file__).parent.parent
# Four CHITA++ stages on the bundled MLPNet, killed (by itself) right after the first.
ARGS = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
        "--data-dir", str(ASSETS / "mnist"), "--train-samples", "1024", "--fisher-samples", "256",
        "--method", "chita++", "--stages", "4", "--sparsity", "0.95", "--json"]


def _cli(*argv: str, entry: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *(entry or ["-m", "prunekit.cli"]), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# `prunekit ARGS` that SIGKILLs itself once its first stage's checkpoint is saved: the kill lands
# there however fast the machine is (a watcher polling for stage-001 came too late when the test
# process was descheduled on a loaded machine, or on a quick one where the 4 stages took a second)
_KILLED_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from prunekit.runs import RunCheckpointer
from prunekit.cli import main
save = RunCheckpointer.save
def save_then_die(self, state, model):
    save(self, state, model)
    os.kill(os.getpid(), signal.SIGKILL)
RunCheckpointer.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    victim = _cli(*ARGS, "--out", str(killed), entry=["-c", _KILLED_AFTER_FIRST_CHECKPOINT])
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert (killed / "checkpoints" / "stage-001.safetensors").exists()
    assert not (killed / "model.safetensors").exists()
    done_before = sorted(p.name for p in (killed / "checkpoints").glob("stage-*.safetensors"))
    assert "stage-004.safetensors" not in done_before and json.loads(
        (killed / "metrics.json").read_text())["status"] == "running"

    resumed = _cli("prune", "--resume", str(killed), "--json")
    reference = _cli(*ARGS, "--out", str(whole))
    out_resumed, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()[-2000:]
    out_whole, err = reference.communicate()
    assert reference.returncode == 0, err.decode()[-2000:]

    log = (killed / "run.log").read_text()
    assert ", after stage " in log
    a, b = _weights(killed), _weights(whole)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key                     # bit for bit, BN buffers included
    ra, rb = json.loads(out_resumed), json.loads(out_whole)
    assert ra["accuracy"] == rb["accuracy"] and ra["nonzeros"] == rb["nonzeros"]
    stages = json.loads((killed / "metrics.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == [1, 2, 3, 4]


MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
       "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--fisher-samples", "64",
       "--solver", "backsolve"]      # magnitude support + backsolve: the fast CHITA


def test_run_folder_holds_config_log_metrics_checkpoints_model_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *MLP, "--method", "chita++", "--stages", "2", "--sparsity", "0.8",
                 "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    for name in ("config.toml", "run.log", "metrics.json", "model.safetensors", "model.json", "report.md",
                 "checkpoints/stage-001.safetensors", "checkpoints/stage-002.safetensors",
                 "plots/accuracy_vs_budget.png", "plots/accuracy_per_stage.png", "plots/layer_density.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["final"]["accuracy"] == record["accuracy"]
    for stage in metrics["stages"]:
        for key in ("max_nonzeros", "max_macs", "sparsity", "flops_kept", "loss", "accuracy", "seconds"):
            assert key in stage, key
    assert metrics["stages"][-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    layers = metrics["layers"]
    assert sum(r["params"] for r in layers) == record["nonzeros"]   # MLPNet: every weight layer is prunable
    assert all(0 <= r["params_kept"] <= 1 and 0 <= r["macs_kept"] <= 1 for r in layers)
    # Accuracy in the metrics is the evaluation's: the sidecar's model reloads to it.
    assert main(["eval", "--model", "mlpnet", "--checkpoint", str(out / "model.safetensors"),
                 "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(record["accuracy"])
    # The same command again finds the run done; another one is refused.
    assert main(["prune", *MLP, "--method", "chita++", "--stages", "2", "--sparsity", "0.8",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == record["accuracy"]
    assert main(["prune", *MLP, "--method", "chita++", "--stages", "3", "--sparsity", "0.8",
                 "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_run_refused_before_its_first_stage_leaves_the_folder_free(tmp_path, capsys):
    # Found by a user: 256 training samples cannot give 1,000 gradient rows, which only the run
    # finds; its config, metrics and log stayed, and the corrected command was "another run".
    out = tmp_path / "run"
    too_many = [*MLP[:MLP.index("--fisher-samples")], "--solver", "backsolve", "--fisher-samples", "1000"]
    assert main(["prune", *too_many, "--method", "chita", "--sparsity", "0.8", "--out", str(out)]) == 2
    assert "--fisher-samples" in capsys.readouterr().err
    assert not any(p.name in ("config.toml", "metrics.json", "run.log") for p in out.glob("*"))
    assert main(["prune", *MLP, "--method", "chita", "--sparsity", "0.8", "--out", str(out), "--json"]) == 0
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    # a folder with a finished run keeps it when a resume is refused
    assert main(["prune", "--resume", str(out), "--stages", "3"]) == 2
    assert (out / "config.toml").is_file() and (out / "metrics.json").is_file()


def test_a_refusal_inside_a_run_of_prunekit_prune_frees_its_out(tmp_path):
    from prunekit.data import load_dataset, make_loader
    from prunekit.errors import PrunekitError
    from prunekit.loading import load_model
    loaded = load_model("mlpnet", str(ASSETS / "mlpnet.safetensors"))
    data = load_dataset("mnist", str(ASSETS / "mnist"), "train")
    train = make_loader(data, loaded.normalization, batch_size=64, shuffle=False)
    out = tmp_path / "run"
    with pytest.raises(PrunekitError, match="fisher_samples"):
        prunekit.prune(loaded.model, train, method="chita", sparsity=0.8, fisher_samples=5000, out=out)
    assert not (out / "config.toml").exists() and not (out / "metrics.json").exists()
    result = prunekit.prune(loaded.model, train, method="chita", sparsity=0.8, fisher_samples=64, out=out)
    assert (out / "model.safetensors").is_file() and result.sparsity == pytest.approx(0.8, abs=1e-3)


def test_resume_refuses_other_options_and_non_run_folders(tmp_path, capsys):
    assert main(["prune", "--resume", str(tmp_path)]) == 2
    assert "config.toml" in capsys.readouterr().err
    assert main(["prune", "--resume", str(tmp_path), "--stages", "3"]) == 2
    assert "--stages" in capsys.readouterr().err


def test_no_stage_eval_measures_before_and_after_only(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *MLP, "--method", "chita++", "--stages", "2", "--sparsity", "0.8", "--no-stage-eval",
                 "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["accuracy"] is not None and record["dense_accuracy"] is not None
    assert [("accuracy" in s, "eval_seconds" in s, "flops_kept" in s) for s in record["stages"]] == [(False, False, True)] * 2
    assert (out / "report.md").is_file()
    assert "no-stage-eval = true" in (out / "config.toml").read_text()      # a resume keeps it


def test_resume_of_a_training_run_folder_says_how_to_carry_that_run_on(tmp_path, capsys):
    out = tmp_path / "trained"
    assert main(["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(ASSETS / "mnist"),
                 "--epochs", "1", "--json", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["prune", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prunekit train" in err and "unknown key" not in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_names_its_folder_and_data_plainly(tmp_path, capsys):
    """--resume '' asked for --data; the folder's config.toml named instead of the folder was 'not a run
    folder'; data moved since the run began pointed to --data-dir, which --resume refuses."""
    import shutil
    assert main(["prune", "--resume", ""]) == 2
    assert "--resume needs the run folder" in capsys.readouterr().err
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(ASSETS / "mnist", data)
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(data), "--train-samples", "256", "--method", "magnitude", "--sparsity", "0.5",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["prune", "--resume", str(out / "config.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == first["accuracy"]
    data.rename(tmp_path / "moved")
    assert main(["prune", "--resume", str(out)]) == 2
    assert "put the data back there" in capsys.readouterr().err


def test_resume_refuses_an_edited_config_before_importing_what_it_names(tmp_path, capsys):
    """An edited config.toml was noticed only after the model file it named had been imported (its
    code run), and a finished run's result came back for options it was not run with."""
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--method", "magnitude", "--sparsity",
            "0.5", "--out", str(out), "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    config = (out / "config.toml").read_text()
    (out / "config.toml").write_text(config.replace('sparsity = "0.5"', 'sparsity = "0.8"'))
    assert main(["prune", "--resume", str(out), "--json"]) == 2
    assert "config.toml was changed (sparsity)" in capsys.readouterr().err
    marker = tmp_path / "marker"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n\n\ndef build():\n    return None\n")
    (out / "config.toml").write_text(config.replace('model = "mlpnet"', f'model = "{tmp_path}/evil.py:build"'))
    assert main(["prune", "--resume", str(out), "--json"]) == 2
    assert "config.toml was changed (model)" in capsys.readouterr().err and not marker.exists()


def test_resume_refuses_a_checkpoint_changed_since_the_run_began(tmp_path, capsys, monkeypatch):
    """The starting checkpoint overwritten between a kill and the resume: the run went on from the new
    weights without a word (and reported the old dense accuracy)."""
    import shutil
    from prunekit import executor
    checkpoint, out = tmp_path / "start.safetensors", tmp_path / "run"
    shutil.copy(ASSETS / "mlpnet.safetensors", checkpoint)
    shutil.copy(ASSETS / "mlpnet.json", tmp_path / "start.json")
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(checkpoint), "--data", "mnist", "--data-dir",
            str(ASSETS / "mnist"), "--train-samples", "256", "--method", "magnitude", "--sparsity", "0.5",
            "--out", str(out), "--json"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "_run", killed)
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    import torch
    from prunekit.loading import load_model
    from prunekit.saving import save_model
    model = load_model("mlpnet", str(checkpoint)).model
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)
    save_model(model, checkpoint, {"model": "mlpnet"})
    assert main(argv) == 2
    assert "the checkpoint this run" in capsys.readouterr().err


def test_an_unfinished_or_damaged_run_folder_says_what_to_do(tmp_path, capsys, monkeypatch):
    """eval on an unfinished run said 'is a folder, not a file'; --resume of a finished run whose
    model.safetensors was cut short gave a SafetensorError traceback."""
    from prunekit import executor
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--method", "magnitude", "--sparsity",
            "0.5", "--out", str(out), "--json"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "save_pruned", killed)
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data", "mnist", "--data-dir", str(ASSETS / "mnist")]) == 2
    assert f"holds a prune run that has not finished (no model.safetensors yet): resume it with `prunekit prune " \
           f"--resume {out}`" in capsys.readouterr().err
    assert main(argv) == 0
    capsys.readouterr()
    with open(out / "model.safetensors", "r+b") as f:
        f.truncate(500)
    assert main(["prune", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "this finished run's model, cannot be read" in err and err.count("\n") == 1
    # --resume takes no --force: it said "run the command again with --force" there
    assert "restore it, or run it anew with the original command and --force (--resume takes none)" in err, err
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith("restore it, or run it anew with --force"), err
    from types import SimpleNamespace
    from prunekit.errors import PrunekitError
    from prunekit.runs import RunFolder
    with pytest.raises(PrunekitError, match=r"restore it, or run it anew with force=True$"):     # Python's words
        executor._load_final(SimpleNamespace(request=SimpleNamespace(model=None)), RunFolder(out))


def test_a_finished_run_missing_its_sidecar_or_result_gets_them_back(tmp_path, capsys):
    """--resume of a finished run reported success while its model.json was gone (info and eval then
    failed) or its result.json damaged; they are written again from the run's record."""
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--method", "magnitude", "--sparsity",
            "0.5", "--out", str(out), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    (out / "model.json").unlink()
    (out / "result.json").write_text("{")
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == first["accuracy"]
    assert json.loads((out / "result.json").read_text())["accuracy"] == first["accuracy"]
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == first["macs"]
    (out / "model.json").write_text("[]")            # JSON, not prunekit's: a run folder's own file, written again
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    assert json.loads((out / "model.json").read_text())["prunekit_sidecar"] == 1


def _old_config(folder: Path, max_memory: str) -> None:
    """The config.toml an older prunekit wrote for ``--max-memory``, recorded as the text given."""
    folder.mkdir()
    (folder / "config.toml").write_text(
        f'model = "mlpnet"\ncheckpoint = "{ASSETS / "mlpnet.safetensors"}"\ndata = "mnist"\n'
        f'data-dir = "{ASSETS / "mnist"}"\ntrain-samples = 256\nfisher-samples = 64\nmethod = "chita"\n'
        f'sparsity = "0.5"\nmax-memory = "{max_memory}"\nout = "{folder}"\n')


def test_resume_takes_an_old_runs_max_memory_written_as_a_float(tmp_path, capsys):
    """Old versions recorded a TOML float 3e9 as max-memory = "3000000000.0": the run could no
    longer be resumed ('--max-memory must be a size like 16G ...'), and no workaround was taken."""
    _old_config(tmp_path / "old", "3000000000.0")
    assert main(["prune", "--resume", str(tmp_path / "old"), "--json"]) == 0, capsys.readouterr().err
    assert (tmp_path / "old" / "model.safetensors").exists()
    _old_config(tmp_path / "bad", "1.5")
    assert main(["prune", "--resume", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error: --max-memory must be a size like 16G") and err.count("\n") == 1
    assert f"(in {tmp_path / 'bad' / 'config.toml'})" in err


def test_resume_of_a_run_made_from_python_says_to_call_prunekit_prune_again(tmp_path, capsys):
    """`prune --resume` of prunekit.prune(..., out=RUN)'s folder said "unknown key 'model-class' in
    .../config.toml: not an option of `prunekit prune` (did you mean 'model'?)"."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    run = tmp_path / "py"
    prunekit.prune(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), (x, y), method="magnitude",
                   sparsity=0.5, out=str(run))
    assert "model-class" in (run / "config.toml").read_text()
    assert main(["prune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"prunekit: error: {run} is a run started from Python (prunekit.prune(..., out=)): resume it by "
                   f"calling prunekit.prune again with the same arguments and out={str(run)!r}; `prunekit prune "
                   "--resume` carries on runs of the command line\n")


def test_resume_of_a_finished_run_says_a_command_that_runs_it_anew(tmp_path, capsys, monkeypatch):
    """--resume of a finished run says how to run it anew; --resume takes no --force, so its note
    names a command that does (found by a user: "--force runs it anew", then "leave out --force")."""
    import re
    import shlex
    monkeypatch.chdir(tmp_path)
    args = ["prune", *MLP[:MLP.index("--fisher-samples")], "--sparsity", "0.5", "--out", "run", "--json"]
    assert main(args) == 0
    os.utime(tmp_path / "run" / "model.safetensors", ns=(0, 0))     # shows whether it ran anew
    capsys.readouterr()
    assert main(["prune", "--resume", "run", "--json"]) == 0
    assert os.stat(tmp_path / "run" / "model.safetensors").st_mtime_ns == 0
    note = capsys.readouterr().err
    command = re.search(r"as does `(prunekit prune [^`]*)`", note)
    assert command and "--force" in command.group(1) and "the original command with --force runs it anew" in note, note
    assert main(shlex.split(command.group(1))[1:] + ["--json"]) == 0, capsys.readouterr().err
    assert os.stat(tmp_path / "run" / "model.safetensors").st_mtime_ns != 0
    assert "holds this run, finished" not in capsys.readouterr().err
    os.utime(tmp_path / "run" / "model.safetensors", ns=(0, 0))     # and the original command with --force
    assert main([*args, "--force"]) == 0
    assert os.stat(tmp_path / "run" / "model.safetensors").st_mtime_ns != 0
    assert "holds this run, finished" not in capsys.readouterr().err


def test_a_resume_with_another_world_size_says_so_and_records_each_sessions(tmp_path, capsys, monkeypatch):
    """A run whose stage 1 was written by 2 torchrun ranks (``run_checkpoints._world_size`` stands in for the
    group), resumed by one process: run.log and stderr say the world size changed and that the result
    matches an uninterrupted run only within the rounding; result.json's ``world_sizes`` is [2, 1].
    Before, nothing was said and the record described the last session alone (no ``ranks`` at all)."""
    from prunekit import run_checkpoints, runs
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--fisher-samples", "32", "--method",
            "chita", "--stages", "2", "--sparsity", "0.8", "--out", str(out), "--json"]
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(run_checkpoints, "_world_size", lambda: 2)     # where RunCheckpointer calls it
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    said = ("resumed with 1 rank; stage-001.safetensors was written with 2: the result matches an uninterrupted "
            "run only within the documented rounding (resume with 2 ranks for the same bits)")
    err = capsys.readouterr().err
    assert said in err and err.count(said) == 1, err
    assert said in (out / "run.log").read_text()
    assert json.loads((out / "result.json").read_text())["world_sizes"] == [2, 1]
    assert main(["prune", "--resume", str(out), "--json"]) == 0      # finished: nothing run, nothing said
    assert said not in capsys.readouterr().err


def test_a_moved_run_folder_is_carried_on_by_the_same_command_and_by_resume(tmp_path, capsys, monkeypatch):
    """A run folder renamed between a kill and its resume: the folder is the run (its config.toml
    records the resolved --out it was made at). The same command with the new --out carries it on
    (it said "holds another run (other --out)"), run.log says where it was made, config.toml is left
    as it was, other options are still refused (naming them, not --out), and a finished moved run's
    --resume note names a --recipe command with the folder's own --out (the config's would write to
    the old place)."""
    import re
    import shlex
    from prunekit import runs
    monkeypatch.chdir(tmp_path)
    args = ["prune", *MLP, "--method", "chita", "--stages", "2", "--sparsity", "0.8", "--json"]
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    assert main([*args, "--out", "made"]) == 130
    monkeypatch.setattr(runs.RunCheckpointer, "save", save)
    (tmp_path / "made").rename(tmp_path / "moved")
    config = (tmp_path / "moved" / "config.toml").read_text()
    capsys.readouterr()
    assert main([*args, "--sparsity", "0.7", "--out", "moved"]) == 2
    err = capsys.readouterr().err
    assert "(other sparsity)" in err and "out" not in err.split("(other")[1].split(")")[0], err
    assert main([*args, "--out", "moved"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert (tmp_path / "moved" / "model.safetensors").exists() and not (tmp_path / "made").exists()
    assert (tmp_path / "moved" / "config.toml").read_text() == config
    log = (tmp_path / "moved" / "run.log").read_text()
    assert f"this run folder was made at {tmp_path / 'made'} and has moved to {tmp_path / 'moved'}" in log
    assert ", after stage 1 from stage-001.safetensors" in log, log      # carried on from its checkpoint, not anew
    assert main(["prune", "--resume", "moved", "--json"]) == 0
    command = re.search(r"as does `(prunekit prune [^`]*)`", capsys.readouterr().err)
    assert main([*args, "--out", "moved"]) == 0                        # the same command again
    log = (tmp_path / "moved" / "run.log").read_text()
    assert log.count("has moved to") == 1, log        # once per move: it was logged at every rerun and resume
    assert command and "--out moved" in command.group(1), command
    assert main(shlex.split(command.group(1))[1:] + ["--json"]) == 0, capsys.readouterr().err
    assert not (tmp_path / "made").exists()          # run anew in the moved folder, not at the old place


@pytest.mark.parametrize("redo, said", [(None, "run it anew with --force"),
                                        ("run it anew with the original command and --force (--resume takes none)",
                                         "(--resume takes none)"),
                                        ("run the sweep anew with another --out", "another --out")])
def test_a_phase_checkpoint_without_the_optimizer_state_says_to_redo_in_the_commands_words(redo, said):
    """It said "start the run again with --force" under `prune --resume DIR` and in a sweep, neither
    of which takes --force; the run checkpointer's redo words now (Python's: force=True)."""
    from prunekit.options import cli_message
    from prunekit.structured.pipeline import _load_optimizer
    from prunekit.errors import PrunekitError
    with pytest.raises(PrunekitError) as caught:
        _load_optimizer(None, None, None, redo)
    assert str(caught.value).endswith("optimizer state: run it anew with force=True")
    assert cli_message(caught.value).endswith(said) and "start the run again" not in cli_message(caught.value)

