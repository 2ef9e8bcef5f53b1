"""A model file (``--model net.py:build``) edited between an interrupt and the resume so that the
model it builds no longer fits the run's checkpoints (a layer widened): the resume is refused in
one line naming the edit and its fix, before any work, leaving the folder's records as they were;
put back, the run carries on. A comment-only edit carries on with its warning
(tests/test_model_file.py::test_a_resumed_run_says_when_the_model_file_changed)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.runs import RunCheckpointer

ASSETS = Path(prunekit.__file__).parent / "assets"
DATA = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--train-samples", "128", "--batch-size", "2000",
        "--normalize", "0.1307/0.3081"]
NET = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 10))
"""
WIDER = NET.replace("12", "14")
QUADRATIC = ["--fisher-samples", "16"]
MODES = {"falcon++": ["--method", "falcon++", "--flops", "0.9", "--stages", "2", *QUADRATIC],
         "chita++": ["--method", "chita++", "--sparsity", "0.6", "--stages", "2", *QUADRATIC],
         "gradual": ["--method", "magnitude", "--sparsity", "0.6", "--gradual", "--events", "2",
                     "--epochs-per-event", "1", "--final-epochs", "1"],
         "autobot": ["--method", "autobot", "--flops", "0.5", "--gate-batches", "4", "--finetune-epochs", "1"],
         "taper": ["--method", "taper", "--flops", "0.5", "--taper-epochs", "1", "--finetune-epochs", "1"],
         "hybrid": ["--method", "hybrid", "--flops", "0.3", "--structured-flops", "0.6", "--gate-batches", "4",
                    *QUADRATIC, "--finetune-epochs", "1"]}


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """report.md without its plots (most of a tiny run's time, not tested here)."""
    from prunekit import report

    def missing():
        raise report.MissingPlotting("plots skipped in this test")
    monkeypatch.setattr(report, "_pyplot", missing)


def _stop_after_first_checkpoint(monkeypatch):
    """Interrupt the run once its first checkpoint is saved; returns the function that undoes it."""
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    return lambda: monkeypatch.setattr(RunCheckpointer, "save", save)


def _records(run: Path) -> dict[str, bytes]:
    """The folder's files but its log (a refusal may say itself there)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "run.log"}


def _one_error(err: str) -> str:
    assert "Traceback" not in err and "resuming" not in err and "use the new code" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("prunekit: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_model_file_widened_after_a_kill_is_refused_before_any_work_and_its_records_kept(
        mode, tmp_path, monkeypatch, capsys):
    net, run = tmp_path / "net.py", tmp_path / "run"
    net.write_text(NET)
    argv = ["prune", "--model", f"{net}:build", *DATA, *MODES[mode], "--out", str(run), "--json"]
    undo = _stop_after_first_checkpoint(monkeypatch)
    assert main(argv) == 130
    undo()
    assert (run / "checkpoints" / "stage-001.safetensors").exists() and not (run / "model.safetensors").exists()
    before = _records(run)
    net.write_text(WIDER)
    capsys.readouterr()
    for again in (["prune", "--resume", str(run), "--json"], argv):     # --resume, and the same command
        assert main(again) == 2
        error = _one_error(capsys.readouterr().err)
        assert "the model file changed since the run in" in error and "stage-001.safetensors" in error
        assert "put the model file back as it was" in error
        assert _records(run) == before          # metrics.json keeps the digest of the file stage 1 ran
    if mode == "chita++":       # as it says: the original command with --force runs it anew on the edited file
        assert main([*argv, "--force"]) == 0
        assert "--force starts the run anew" in (run / "run.log").read_text()
    if mode == "falcon++":      # put back: the run carries on
        net.write_text(NET)
        assert main(["prune", "--resume", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "multi-stage"


def test_a_checkpoint_that_no_longer_fits_the_edited_model_file_names_the_edit(tmp_path, monkeypatch, capsys):
    """With --checkpoint: the checkpoint, unchanged, is not blamed (nor a channel layout advised)."""
    net, run, mine = tmp_path / "net.py", tmp_path / "run", tmp_path / "mine.pth"
    net.write_text(NET)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                             nn.Linear(12, 10)).state_dict(), mine)
    argv = ["prune", "--model", f"{net}:build", "--checkpoint", str(mine), *DATA, *MODES["falcon++"],
            "--out", str(run), "--json"]
    undo = _stop_after_first_checkpoint(monkeypatch)
    assert main(argv) == 130
    undo()
    before = _records(run)
    net.write_text(WIDER)
    capsys.readouterr()
    for again in (["prune", "--resume", str(run), "--json"], argv):
        assert main(again) == 2
        error = _one_error(capsys.readouterr().err)
        assert "the model file changed since the run in" in error and "mine.pth" in error, error
        assert "put the model file back as it was" in error and "save_model" not in error, error
        assert _records(run) == before


def test_an_edited_model_file_is_refused_when_a_training_run_is_carried_on(tmp_path, monkeypatch, capsys):
    net, run = tmp_path / "net.py", tmp_path / "run"
    net.write_text(NET)
    argv = ["train", "--model", f"{net}:build", *DATA[:6], "--batch-size", "64", *DATA[-2:], "--epochs", "2",
            "--lr", "0.05", "--out", str(run), "--json"]
    undo = _stop_after_first_checkpoint(monkeypatch)
    assert main(argv) == 130
    undo()
    before = _records(run)
    net.write_text(WIDER)
    capsys.readouterr()
    assert main(argv) == 2
    error = _one_error(capsys.readouterr().err)
    assert "the model file changed since the run in" in error and "stage-001.safetensors" in error, error
    assert "or --force to train anew with it" in error
    assert _records(run) == before
    assert main([*argv, "--force"]) == 0        # as it says: trained anew with the edited file
    assert "its model changed since this run started: --force starts it anew" in (run / "run.log").read_text()

