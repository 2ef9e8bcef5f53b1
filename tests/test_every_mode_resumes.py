"""Every method in every mode it runs in (one-shot, multi-stage, gradual, structured) with --out:
interrupted, then resumed with --resume, ends with bit-identical weights to an uninterrupted run;
one SIGKILL per mode family in a real process; --out onto another run is refused in one line;
an option of another method is refused with the same message in Python and on the command line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunekit
from prunekit import executor
from prunekit.cli import build_parser, main
from prunekit.cli import _flags as cli_flags
from prunekit.methods import method_names
from prunekit.options import cli_message
from prunekit.runs import RunCheckpointer

ASSETS = Path(prunekit.__file__).parent / "assets"
BASE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
        "--data-dir", str(ASSETS / "mnist"), "--train-samples", "128", "--batch-size", "2000", "--json"]
# The weights methods prune fc2 and fc3 only (1,000 weights, 1,000 of the 32,360 MACs): the
# solvers then take milliseconds and the test is about the run folder, not the solver.
SMALL = ["--include", "fc2", "fc3"]
QUADRATIC = [*SMALL, "--fisher-samples", "16"]
BUDGET = {"magnitude": ["--sparsity", "0.8", *SMALL], "magnitude-uniform": ["--sparsity", "0.8", *SMALL],
          "magnitude-flops": ["--sparsity", "0.5", "--flops", "0.98", *SMALL],
          "chita": ["--sparsity", "0.8", *QUADRATIC], "chita++": ["--sparsity", "0.8", "--stages", "3", *QUADRATIC],
          "woodfisher": ["--sparsity", "0.8", *QUADRATIC], "falcon": ["--flops", "0.98", *QUADRATIC],
          "falcon++": ["--flops", "0.98", "--stages", "2", *QUADRATIC]}
GRADUAL = ["--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "1"]
STRUCTURED = {"autobot": ["--flops", "0.5", "--gate-batches", "4", "--finetune-epochs", "2"],
              "taper": ["--flops", "0.5", "--snapshots", "0.7", "--taper-epochs", "1", "--finetune-epochs", "2"],
              "hybrid": ["--flops", "0.3", "--structured-flops", "0.6", "--gate-batches", "4", "--fisher-samples", "16",
                         "--finetune-epochs", "2"]}

# (method flags, checkpoints written before the interrupt; 0 = killed just before the model is saved)
CASES = {f"{m} one-shot": ([*BUDGET[m]] if m not in ("chita++", "falcon++") else None, 0) for m in BUDGET}
CASES = {k: v for k, v in CASES.items() if v[0] is not None}
CASES.update({"chita++ multi-stage": (BUDGET["chita++"], 1), "falcon++ multi-stage": (BUDGET["falcon++"], 1),
              "woodfisher multi-stage": ([*BUDGET["woodfisher"], "--stages", "2"], 1),
              # the layer search's per-layer scales carry from stage to stage, also across a resume
              "falcon++ multi-stage with layer search": ([*BUDGET["falcon++"], "--layer-search", "3"], 1),
              # allocation first: stage 2 prunes with (and refines) the multipliers stage 1 searched
              "falcon++ multi-stage with layer search first": (["--flops", "0.98", "--stages", "3", *QUADRATIC,
                                                               "--layer-search", "3", "--layer-search-mode",
                                                               "first", "--layer-search-refine", "2"], 1)})
CASES.update({f"{m} gradual": ([*BUDGET[m], *GRADUAL], 1) for m in BUDGET})
CASES.update({f"{m} structured": (STRUCTURED[m], 3) for m in STRUCTURED})   # gates, bn, fine-tune epoch 1
# the hybrid's checkpoints: gates (the channel cut), sparsify (FALCON), bn, fine-tune epochs; also cut after the first
CASES["hybrid structured (stopped after the channel cut)"] = (STRUCTURED["hybrid"], 1)
# the kept weights re-fit by least squares after the last stage (a kill before the model is saved redoes it)
CASES["falcon++ multi-stage with re-fit"] = ([*BUDGET["falcon++"], "--refit-batches", "2"], 1)
CASES["falcon one-shot with re-fit"] = ([*BUDGET["falcon"], "--refit-batches", "2"], 0)
# the consumers re-fit by least squares after the cut (part of the cut's phase), stopped right after it
CASES["autobot structured (reconstructed, stopped after the cut)"] = (
    [*STRUCTURED["autobot"], "--reconstruct-batches", "2"], 1)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """report.md without its plots: drawing them is most of a tiny run's time, and not tested here."""
    from prunekit import report

    def missing():
        raise report.MissingPlotting("plots skipped in this test")
    monkeypatch.setattr(report, "_pyplot", missing)


def _flags_for(case: str) -> list[str]:
    return ["--method", case.split()[0], *CASES[case][0]]


def test_the_cases_cover_every_method():
    assert {case.split()[0] for case in CASES} == set(method_names())


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_run_resumes_to_the_same_weights(case, tmp_path, monkeypatch, capsys):
    flags, kill_after = _flags_for(case), CASES[case][1]
    assert main([*BASE, *flags, "--out", str(tmp_path / "whole")]) == 0
    saved, save, save_pruned = [], RunCheckpointer.save, executor.save_pruned
    if kill_after:
        def save_then_stop(self, state, model):
            save(self, state, model)
            saved.append(state.stage)
            if len(saved) == kill_after:
                raise KeyboardInterrupt
        monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    else:
        def stop(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(executor, "save_pruned", stop)
    assert main([*BASE, *flags, "--out", str(tmp_path / "cut")]) == 130
    assert "resume with `prunekit prune --resume" in capsys.readouterr().err
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    monkeypatch.setattr(RunCheckpointer, "save", save)
    monkeypatch.setattr(executor, "save_pruned", save_pruned)
    assert main(["prune", "--resume", str(tmp_path / "cut"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mode"] == case.split()[1]
    _same_weights(tmp_path / "whole", tmp_path / "cut")
    # a multi-stage run compares its last stage with the best final-budget candidate kept from an
    # earlier one, which must come back from the checkpoint too
    whole, cut = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("whole", "cut"))
    last_choice = lambda metrics: (metrics.get("stages") or [{}])[-1].get("final_choice")   # noqa: E731
    assert last_choice(whole) == last_choice(cut)
    assert (last_choice(whole) is not None) == ("multi-stage" in case)
    if "structured" in case:       # seconds: every phase (fine-tune too) once, restored or not; gates apart
        for run_record in (record, json.loads((tmp_path / "whole" / "result.json").read_text())):
            phases = run_record["phases"]
            assert run_record["seconds"] == pytest.approx(sum(p["seconds"] for p in phases), rel=1e-6)
            if "reconstruct" in run_record:      # the cut's phase: the gates, then the reconstruction
                assert run_record["gate_seconds"] < phases[0]["seconds"]
            else:
                assert run_record["gate_seconds"] == pytest.approx(phases[0]["seconds"], rel=1e-6)
            assert run_record["seconds"] > run_record["gate_seconds"]
    if case.endswith("structured"):        # taper's snapshot too
        for snapshot in (tmp_path / "whole").glob("snapshot-*"):
            _same_weights(snapshot, tmp_path / "cut" / snapshot.name)


# `prunekit ARGS` that SIGKILLs itself once its first checkpoint is saved
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


@pytest.mark.parametrize("case", ["magnitude gradual", "autobot structured"])
def test_a_sigkilled_run_resumes_to_the_same_weights(case, tmp_path, capsys):
    """One real SIGKILL per mode family, right after the first checkpoint is on disk (the
    multi-stage family's is tests/test_runs_resume.py::test_killed_run_resumes_to_the_same_weights).
    The run kills itself there, so the kill lands at the same point however fast the run is (a
    watcher polling for the file could come too late on a tiny, fast run)."""
    flags = _flags_for(case)
    assert main([*BASE, *flags, "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    # the killed run must compute as this process does (test modules set 1 thread at import)
    env = {**os.environ, "PYTHONPATH": str(Path(prunekit.__file__).parent.parent),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.run([sys.executable, "-c", _KILLED_AFTER_FIRST_CHECKPOINT, *BASE, *flags, "--out", str(cut)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert process.returncode == -signal.SIGKILL             # killed mid-run, not finished first
    assert (cut / "checkpoints" / "stage-001.safetensors").exists()
    assert not (cut / "model.safetensors").exists()
    assert main(["prune", "--resume", str(cut), "--json"]) == 0
    _same_weights(tmp_path / "whole", cut)


def test_out_onto_another_run_is_refused_in_one_line_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--method", "magnitude", "--sparsity", "0.8", "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    for other in (["--method", "magnitude", "--sparsity", "0.5"], ["--method", "autobot", "--flops", "0.5"],
                  ["--method", "magnitude", "--sparsity", "0.5", *GRADUAL]):
        assert main([*BASE, *other, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds another run" in err and "--force" in err
        assert (out / "model.safetensors").read_bytes() == first        # nothing was touched
    (out / "notes.txt").write_text("mine")
    assert main([*BASE, "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "result.json").read_text())["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (out / "notes.txt").read_text() == "mine"                    # force clears the run's files only


@pytest.mark.parametrize("method,option,value", [("magnitude", "stages", 9), ("chita", "gate_batches", 3),
                                                 ("autobot", "fisher_samples", 7), ("taper", "beta", 2.0)])
def test_an_option_of_another_method_is_refused_alike_in_python_and_on_the_command_line(
        method, option, value, capsys):
    budget = {"flops": 0.5} if method in ("autobot", "taper") else {"sparsity": 0.5}
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(prunekit.PrunekitError) as refused:
        prunekit.prune(net, example_input=torch.zeros(1, 1, 28, 28), method=method, **budget, **{option: value})
    python_message = str(refused.value)
    assert f"method {method} takes no option {option}" in python_message and "--" not in python_message
    flag = "--" + option.replace("_", "-")
    budget_flags = [f"--{k}" for k in budget] + [str(v) for v in budget.values()]
    assert main([*BASE, "--method", method, budget_flags[0], budget_flags[1], flag, str(value)]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert cli_line == f"prunekit: error: {cli_message(refused.value, cli_flags(build_parser(), 'prune'))}"
    assert f"method {method} takes no option {flag}" in cli_line


def test_a_run_started_with_force_resumes_instead_of_being_cleared_again(tmp_path, monkeypatch, capsys):
    """--force clears another run once, when the run starts: the run's --resume (and the same
    command again) carry on from its checkpoints rather than clearing them and starting over."""
    out, flags = tmp_path / "run", ["--method", "chita++", *BUDGET["chita++"]]
    assert main([*BASE, "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)]) == 0
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    assert main([*BASE, *flags, "--out", str(out), "--force"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(RunCheckpointer, "save", save)
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    log = (out / "run.log").read_text()
    assert ", after stage 1 from stage-001.safetensors" in log and log.count("start:") == 1
    assert main([*BASE, *flags, "--out", str(out), "--json"]) == 0        # the same command, unforced: done
    assert "already complete" in (out / "run.log").read_text()


def test_a_run_whose_every_checkpoint_is_unreadable_is_refused_not_started_over(tmp_path, monkeypatch, capsys):
    """A damaged newest checkpoint falls back to the one before (tests/test_stages.py); when none
    can be read, the resume stops in one line and leaves the folder alone rather than starting the
    run over on top of it."""
    out, flags = tmp_path / "run", ["--method", "chita++", *BUDGET["chita++"]]
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    assert main([*BASE, *flags, "--out", str(out)]) == 130
    monkeypatch.setattr(RunCheckpointer, "save", save)
    checkpoint = out / "checkpoints" / "stage-001.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])             # truncated
    damaged = checkpoint.read_bytes()
    capsys.readouterr()
    for again in (["prune", "--resume", str(out)], [*BASE, *flags, "--out", str(out)]):
        assert main(again) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "stage-001.safetensors" in err and "checkpoints" in err
        assert checkpoint.read_bytes() == damaged and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("edit", [('sparsity = "0.8"', 'sparsity = "0.5"'), ("seed = 0", "seed = 3"),
                                  ("fisher-samples = 16", "fisher-samples = 32")])
def test_a_resume_after_its_config_was_edited_is_refused_in_one_line(edit, tmp_path, monkeypatch, capsys):
    """The stages done ran with the options they were saved with: a --resume under other options
    would finish a run that is neither (a 0.8 run edited to 0.5 ended at 0.59, recorded as 0.5)."""
    out, flags = tmp_path / "run", ["--method", "chita++", *BUDGET["chita++"]]
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    assert main([*BASE, *flags, "--out", str(out)]) == 130
    monkeypatch.setattr(RunCheckpointer, "save", save)
    config = out / "config.toml"
    original = config.read_text()
    assert edit[0] in original
    config.write_text(original.replace(edit[0], edit[1]))
    capsys.readouterr()
    assert main(["prune", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.toml" in err and edit[0].split(" =")[0] in err
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints" / "stage-002.safetensors").exists()
    config.write_text(original)                                         # put back: the run carries on
    assert main(["prune", "--resume", str(out)]) == 0
    assert ", after stage 1 from stage-001.safetensors" in (out / "run.log").read_text()


def test_a_folder_with_a_config_toml_of_its_own_is_not_taken_for_a_run_nor_cleared_by_force(tmp_path, capsys):
    """A project folder may hold a config.toml (and plots) that no prunekit run wrote: --out there
    is refused as a folder of other files, --force included, and nothing in it is removed."""
    mine = tmp_path / "project"
    (mine / "plots").mkdir(parents=True)
    (mine / "config.toml").write_text('name = "my project"\n')
    (mine / "plots" / "figure.png").write_bytes(b"my figure")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    for force in ([], ["--force"]):
        assert main([*BASE, "--method", "magnitude", "--sparsity", "0.5", "--out", str(mine), *force]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a run folder" in err, err
        assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_force_clears_the_run_s_own_files_in_its_subfolders_only(tmp_path, capsys):
    """Files of the user's own kept inside a run's export/, plots/ or checkpoints/ stay through
    --force (export refuses to write over them; force must not delete them either)."""
    out = tmp_path / "run"
    assert main([*BASE, "--method", "magnitude", "--sparsity", "0.8", "--out", str(out)]) == 0
    assert main(["export", str(out), "--dense"]) == 0
    mine = {out / "export" / "notes.txt": b"my notes", out / "plots" / "my-figure.png": b"my figure",
            out / "checkpoints" / "README": b"mine", out / "snapshot-notes.txt": b"my notes on taper",
            out / "model.onnx": b"my own export (the run had no --onnx)"}
    for path, content in mine.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    capsys.readouterr()
    assert main([*BASE, "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--force"]) == 0
    assert {path: path.read_bytes() for path in mine} == mine
    assert not (out / "export" / "model-dense.safetensors").exists()     # the old run's export is gone
    assert json.loads((out / "result.json").read_text())["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_the_same_forced_command_again_carries_its_own_run_on(tmp_path, monkeypatch, capsys):
    """--force clears another run; the run it started is not another run: the same command
    (--force and all) again after a kill carries it on, as prunekit.prune(force=True) again does."""
    out, flags = tmp_path / "run", ["--method", "chita++", *BUDGET["chita++"], "--force"]
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    assert main([*BASE, *flags, "--out", str(out)]) == 130
    monkeypatch.setattr(RunCheckpointer, "save", save)
    assert main([*BASE, *flags, "--out", str(out)]) == 0
    log = (out / "run.log").read_text()
    assert ", after stage 1 from stage-001.safetensors" in log and log.count("start:") == 1


def test_a_resumed_run_says_on_the_console_where_it_carries_on(tmp_path, monkeypatch, capsys):
    """Only run.log said "resuming after stage 1"; the console showed the stages left without a word.
    Said once a checkpoint is read, so a refusal (an unreadable checkpoint) stays one line."""
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    cut = tmp_path / "cut"
    assert main([*BASE, *_flags_for("chita++ multi-stage"), "--out", str(cut)]) == 130
    monkeypatch.setattr(RunCheckpointer, "save", save)
    capsys.readouterr()
    assert main(["prune", "--resume", str(cut)]) == 0
    assert f"resuming {cut} after stage 1\n" in capsys.readouterr().err
