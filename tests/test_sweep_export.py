"""sweep, compare, reports with plots, and export on the bundled MLPNet."""

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import prunekit
from prunekit.cli import main
from prunekit.export import export_all, load_sparse
from prunekit.loading import load_model
from closeness import assert_close_to_scale

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
       "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--fisher-samples", "64"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_then_compare(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", *MLP, "--method", "magnitude-flops", "falcon", "--flops", "0.5", "0.2",
                 "--out", str(out), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["method"], r["request"]["flops"]) for r in runs] == [
        ("magnitude-flops", "0.5"), ("magnitude-flops", "0.2"), ("falcon", "0.5"), ("falcon", "0.2")]
    assert all(r["flops_kept"] <= float(r["request"]["flops"]) + 1e-9 and r["status"] == "done" for r in runs)
    assert len({r["dense_accuracy"] for r in runs}) == 1
    report = (out / "report.md").read_text()
    for name in ("accuracy_vs_sparsity.png", "accuracy_vs_macs.png"):
        assert f"plots/{name}" in report and (out / "plots" / name).read_bytes().startswith(PNG)
    for r in runs:                                          # each run has its own report and plots
        assert (Path(r["run"]) / "plots" / "layer_density.png").read_bytes().startswith(PNG)
    # The same sweep again redoes nothing; compare reads the folders back.
    assert main(["sweep", *MLP, "--method", "magnitude-flops", "falcon", "--flops", "0.5", "0.2",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == runs
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "falcon_flops-0.2" in text and "magnitude-flops_flops-0.5" in text
    assert (tmp_path / "cmp" / "plots" / "accuracy_vs_macs.png").exists()
    # a sweep's folder keeps the report of its own runs: another comparison goes elsewhere
    other = tmp_path / "other"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(other)]) == 0
    capsys.readouterr()
    before = (out / "report.md").read_bytes()
    assert main(["compare", str(other), "--out", str(out)]) == 2
    assert "is a sweep's folder" in capsys.readouterr().err and (out / "report.md").read_bytes() == before
    assert main(["compare", str(out), "--out", str(out)]) == 0      # its own runs: written again


def test_compare_keeps_apart_runs_of_other_starting_models(monkeypatch):
    """Runs of one model from two checkpoints (another dense accuracy) were one curve through both;
    the terminal table names the model where several are compared."""
    from prunekit import report
    rows = [{"name": f"r{i}", "run": f"r{i}", "model": model, "method": "falcon", "request": {"flops": "0.5"},
             "status": "done", "sparsity": 0.5, "flops_kept": kept, "params_kept": 0.5, "dense_accuracy": dense,
             "accuracy": 90.0, "loss": 0.1, "seconds": 1.0, "stages": 1}
            for i, (model, dense, kept) in enumerate([("mlpnet", 96.81, 0.5), ("mlpnet", 93.97, 0.4),
                                                      ("mlpnet", 96.81, 0.3), ("net.py:build", 90.0, 0.5)])]
    curves = []

    class Axes:
        def plot(self, xs, ys, *args, label, **kwargs):
            curves.append((label, len(xs)))

        def __getattr__(self, name):
            return lambda *args, **kwargs: (0, 1)

    class Plt:
        def subplots(self, **kwargs):
            return None, Axes()

        def close(self, fig):
            pass

    monkeypatch.setattr(report, "_save", lambda fig, path: None)
    report._plot_curves(Plt(), rows, "flops_kept", "MACs kept", Path("unused.png"))
    assert sorted(curves) == [("mlpnet falcon (dense 93.97%)", 1), ("mlpnet falcon (dense 96.81%)", 2),
                              ("net.py:build falcon (dense 90.00%)", 1)]
    table = report.table_lines(rows)
    assert table[0].split()[:3] == ["run", "model", "method"] and "net.py:build" in table[-1]
    assert "model" not in report.table_lines(rows[:1])[0]


def test_sweep_and_compare_refuse_bad_input(tmp_path, capsys):
    assert main(["sweep", *MLP, "--method", "falcon", "--out", str(tmp_path / "s")]) == 2
    assert "needs budgets" in capsys.readouterr().err
    assert main(["sweep", *MLP, "--method", "falcon", "--flops", "0.5", "0.2", "--sparsity", "0.1", "0.2", "0.3",
                 "--out", str(tmp_path / "s")]) == 2
    assert "same length" in capsys.readouterr().err
    assert main(["sweep", *MLP, "--method", "falcon", "--sparsity", "0.5", "--out", str(tmp_path / "s")]) == 2
    assert "--flops" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()                    # refused before any run started
    assert main(["sweep", *MLP, "--method", "falcon", "--flops", "0.3", "30%", "--out", str(tmp_path / "s")]) == 2
    assert "would run falcon_flops-0.3 twice" in capsys.readouterr().err       # one budget written two ways
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "typo")]) == 2
    assert "typo does not exist" in capsys.readouterr().err


def test_sweep_and_compare_never_overwrite_what_they_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "plots" / "accuracy_vs_macs.png").write_bytes(b"my plot")
    (mine / "notes.md").write_text("my notes\n")
    (mine / "reports").mkdir()
    (mine / "reports" / "report.md").write_text("my report\n")
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(run)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (*mine.rglob("*"), *run.rglob("*")) if p.is_file()}
    sweep = ["sweep", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out"]
    for argv, needle in (([*sweep, str(mine)], "holds a plots/accuracy_vs_macs.png that prunekit did not write"),
                         (["compare", str(run), "--out", str(mine)], "that prunekit did not write"),
                         (["compare", str(run), "--out", str(mine / "notes.md")],
                          f"--out {mine / 'notes.md'} is a file: pass a folder for the report"),
                         (["compare", str(run), "--out", str(mine / "reports")],
                          "holds a report.md that prunekit did not write: pass a new folder"),
                         ([*sweep, str(run)], "is the run folder of a `prunekit prune`"),
                         ([*sweep, str(run / "model.json")], "is a file")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in (*mine.rglob("*"), *run.rglob("*")) if p.is_file()} == before
    # a comparison's own folder is written again
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_all_formats(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.9", "--out", str(run), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--onnx", "--torchscript", "--dense", "--sparse", "--json"]) == 0
    files = {f["format"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    for f in files.values():
        assert Path(f["path"]).stat().st_size == f["bytes"] > 0
    assert files["sparse"]["bytes"] < 0.3 * files["dense"]["bytes"]     # 10% of the weights kept
    assert "of the dense file's size" in files["sparse"]["note"]

    model = load_model("mlpnet", run / "model.safetensors").model
    state = model.state_dict()
    sparse = load_sparse(files["sparse"]["path"])
    assert sparse.keys() == state.keys() and all(sparse[k].equal(state[k]) for k in state)
    x = torch.randn(3, 1, 28, 28)
    expected = model(x).detach()
    scripted = torch.jit.load(files["torchscript"]["path"])
    assert_close_to_scale(scripted(x), expected, rel=1e-5)
    graph = onnx.load(files["onnx"]["path"])
    onnx.checker.check_model(graph)
    (got,) = ReferenceEvaluator(graph).run(None, {"input": x.numpy()})
    assert_close_to_scale(torch.from_numpy(got), expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_export_of_attention(tmp_path):
    """nn.MultiheadAttention takes its fused path only without autograd: the trace (with) and
    its check (without) recorded different graphs and the export failed with a traceback."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), layer, torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5, 4)
    files = {f["format"]: f for f in export_all(model, x, tmp_path, ["torchscript"])}
    scripted = torch.jit.load(files["torchscript"]["path"])
    other = torch.randn(3, 5, 4)
    with torch.no_grad():
        assert_close_to_scale(scripted(other), model(other), rel=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()            # switched back on after the trace


def test_export_replaces_its_own_files_only(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.9", "--out", str(run)]) == 0
    assert main(["export", str(run), "--dense"]) == 0
    assert main(["export", str(run), "--dense", "--sparse"]) == 0        # again: its own file refreshed
    capsys.readouterr()
    mine = run / "export" / "model.onnx"
    mine.write_bytes(b"my own model")
    assert main(["export", str(run), "--onnx", "--sparse"]) == 2
    assert "model.onnx was not written by prunekit export" in capsys.readouterr().err
    assert mine.read_bytes() == b"my own model"
    (run / "export" / "model.onnx").unlink()
    (run / "export" / "exported.json").write_text("my notes")              # not a manifest of ours
    assert main(["export", str(run), "--sparse"]) == 2
    assert (run / "export" / "exported.json").read_text() == "my notes"


def test_export_refuses_a_folder_without_a_prunekit_model(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--onnx"]) == 2
    assert "no prunekit model" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "--onnx" in capsys.readouterr().err


def test_onnx_export_without_onnx_names_the_extra_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """Without the onnx package (the README's plain install), `export --onnx` with other formats is
    refused up front (it used to write nothing, failing at the first format, in words of torch's:
    "Module onnx is not installed!"), and `prune --onnx` before any work; both name the extra. The
    install command names the interpreter running prunekit (session 51: a bare `pip` on PATH was
    another environment's, as the README's install never activates .venv)."""
    import shlex
    import sys
    this_pip = f"{shlex.quote(sys.executable)} -m pip install"
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(run), "--json"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)          # import fails
    before = sorted(p.name for p in run.iterdir())
    assert main(["export", str(run), "--onnx", "--torchscript", "--dense", "--sparse"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'prunekit[export]'" in err and "nothing was written" in err
    assert f"{this_pip} onnx" in err and f"{this_pip} 'prunekit[export]'" in err
    assert err.count("pip install") == err.count(this_pip)                # no bare pip
    assert sorted(p.name for p in run.iterdir()) == before                # no export/ folder at all
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--onnx",
                 "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{this_pip} onnx" in err and "--onnx" in err
    assert err.count("pip install") == err.count(this_pip)
    assert not (tmp_path / "other").exists()
    assert main(["export", str(run), "--torchscript"]) == 0              # the other formats need no onnx
    assert (run / "export" / "model.torchscript.pt").is_file()


def test_reports_without_matplotlib_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)     # import fails
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    this_pip = f"{__import__('sys').executable} -m pip install"          # the running interpreter's pip
    assert f"{this_pip} 'prunekit[report]'" in err and err.count("pip install") == err.count(this_pip)
    assert (run / "report.md").exists() and not (run / "plots").exists()


def test_a_sweep_without_matplotlib_says_so_once(tmp_path, capsys, monkeypatch):
    """Each run of a sweep and its report used to print the note: five times for four runs. Once per
    command; the next command says it again."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)     # import fails
    out = tmp_path / "sweep"
    assert main(["sweep", *MLP[:-2], "--method", "magnitude", "magnitude-flops", "--flops", "0.5", "0.3",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("plots need matplotlib") == 1
    assert len(list(out.glob("*/report.md"))) == 4 and (out / "report.md").exists()
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().err.count("plots need matplotlib") == 1


def test_sweep_and_compare_take_structured_and_gradual_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", *MLP[:-2], "--method", "magnitude-flops", "autobot", "--flops", "0.5",
                 "--gate-batches", "3", "--out", str(out), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert sorted(r["method"] for r in runs) == ["autobot", "magnitude-flops"]
    assert all(r["status"] == "done" and r["flops_kept"] <= 0.5 for r in runs)
    gradual = tmp_path / "gradual"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.8", "--gradual", "--events", "2",
                 "--final-epochs", "1", "--out", str(gradual), "--json"]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), str(gradual), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["runs"]
    assert len(table) == 3 and {r["method"] for r in table} == {"autobot", "magnitude-flops", "magnitude"}
    assert next(r for r in table if r["method"] == "magnitude")["stages"] == 2     # its two events


def test_a_sweep_onto_an_earlier_sweep_of_other_options_names_a_fix_sweep_takes(tmp_path, capsys):
    """sweep has no --resume or --force: the refusal of a run folder made with other options
    says what a sweep can do instead, and leaves the earlier run as it was."""
    out = tmp_path / "sweep"
    sweep = ["sweep", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--json"]
    assert main(sweep) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*sweep, "--no-bn-recalibration"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" not in err and "--force" not in err and "--out" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_export_killed_right_after_writing_a_file_is_run_again(tmp_path, capsys, monkeypatch):
    """A kill between an export's file and its record of what it wrote must not leave that file
    looking like the user's: the same export again replaces it."""
    from prunekit import export
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.9", "--out", str(run)]) == 0
    dense = export.export_dense

    def write_then_die(model, path):
        dense(model, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "export_dense", write_then_die)
    assert main(["export", str(run), "--dense"]) == 130
    monkeypatch.setattr(export, "export_dense", dense)
    capsys.readouterr()
    assert main(["export", str(run), "--dense"]) == 0, capsys.readouterr().err


def test_the_sweep_table_cuts_no_name_or_budget():
    from prunekit.report import table_lines
    row = {"name": "magnitude-flops_sparsity-0.8_flops-0.3", "method": "magnitude-flops", "status": "done",
           "request": {"sparsity": "0.8", "flops": "0.3", "params": None}, "sparsity": 0.8, "flops_kept": 0.3,
           "dense_accuracy": 96.8, "accuracy": 90.1, "seconds": 3.0}
    head, rule, line = table_lines([row])
    assert "magnitude-flops_sparsity-0.8_flops-0.3 " in line and "sparsity 0.8, flops 0.3 " in line
    assert len(head) == len(rule) and line.index("sparsity 0.8") == head.index("asked")


def test_export_all_takes_one_format_as_a_string_and_refuses_unknown_ones(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    files = export_all(model, torch.zeros(1, 4), tmp_path, "dense")
    assert [f["format"] for f in files] == ["dense"]
    with pytest.raises(prunekit.PrunekitError, match="unknown export format 'tflite'; choose from onnx, torchscript"):
        export_all(model, torch.zeros(1, 4), tmp_path / "other", ["tflite"])
    assert not (tmp_path / "other").exists()


def test_a_failed_export_lists_no_file_it_did_not_write(tmp_path):
    """A failed export takes its file off the manifest: a user's file put in its place is not
    taken for prunekit's and replaced by the next export."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(prunekit.PrunekitError, match="ONNX export failed"):
        export_all(model, torch.zeros(1, 1, 8, 8), tmp_path, ["onnx"])        # one channel, not three
    (tmp_path / "model.onnx").write_bytes(b"my own model")
    with pytest.raises(prunekit.PrunekitError, match="model.onnx was not written by prunekit export"):
        export_all(model, torch.zeros(1, 3, 8, 8), tmp_path, ["onnx"])
    assert (tmp_path / "model.onnx").read_bytes() == b"my own model"


class _OneBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.view(len(x), -1))        # len(x) is traced as the example's batch size


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_fixed_to_the_examples_batch_size_is_refused(tmp_path, fmt):
    """The file says its batch is dynamic: a graph that is wrong at any other batch is refused."""
    with pytest.raises(prunekit.PrunekitError, match=r"turns the batch size into a constant .* x.flatten\(1\)"):
        export_all(_OneBatch(), torch.zeros(1, 3, 2, 2), tmp_path / "export", [fmt])
    assert list(tmp_path.iterdir()) == []


def test_a_zoo_model_pruned_from_python_is_named_by_its_zoo_name(tmp_path, capsys):
    """The sidecar of a model saved from Python names its class only: for a zoo class the
    refusal names the zoo model (it asked for a model file), and --model NAME exports it."""
    from prunekit import zoo
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    prunekit.prune(zoo.build("mlpnet"), (x, y), method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--dense"]) == 2
    assert "if prunekit's zoo built it, name the zoo model, --model mlpnet;" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--dense", "--model", "mlpnet"]) == 0
    assert main(["info", str(tmp_path / "run")]) == 2
    assert "--model mlpnet;" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "a zoo model (e.g. mlpnet)" in " ".join(capsys.readouterr().out.split())


_KILLED_EXPORT = """
import os, signal, sys
import torch
from torch import nn
import prunekit.atomic
import prunekit.export as export
where = sys.argv[2]
if where == "before the file":
    export.export_dense = lambda model, path: os.kill(os.getpid(), signal.SIGKILL)
else:                          # the file's bytes in its temporary file, not yet renamed
    real = prunekit.atomic.os.replace
    def replace(source, target):
        if str(target).endswith("model-dense.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
        real(source, target)
    prunekit.atomic.os.replace = replace
export.export_all(nn.Linear(4, 2), torch.zeros(1, 4), sys.argv[1], ["sparse", "dense"])
"""


@pytest.mark.parametrize("where", ["before the file", "before the rename"])
def test_an_export_killed_before_its_file_is_there_lists_no_missing_file(tmp_path, where):
    """SIGKILL after the manifest says an export is being written and before its file is there:
    exported.json's "files" name only files that are there, whole (the one being written is
    "pending", still ours to replace); the same export again writes it, and leaves no temporary file."""
    import os
    import subprocess
    import sys
    from torch import nn
    from prunekit import export
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(Path(export.__file__).parents[1])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(out), where], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    manifest = json.loads((out / "exported.json").read_text())
    assert manifest["files"] == ["model-sparse.safetensors"] and manifest["pending"] == ["model-dense.safetensors"]
    assert not (out / "model-dense.safetensors").exists()
    assert export.load_sparse(out / "model-sparse.safetensors").keys() == {"weight", "bias"}
    written = export.export_all(nn.Linear(4, 2), torch.zeros(1, 4), out, ["dense"])
    assert [f["format"] for f in written] == ["dense"]
    assert json.loads((out / "exported.json").read_text()) == {"files": ["model-dense.safetensors",
                                                                         "model-sparse.safetensors"]}
    assert sorted(p.name for p in out.iterdir()) == ["exported.json", "model-dense.safetensors",
                                                     "model-sparse.safetensors"]


def test_a_sweeps_run_config_holds_only_its_methods_options_and_resumes(tmp_path, capsys, monkeypatch):
    """--stages and --fisher-samples (chita's) went into the magnitude run's config.toml too: that
    run could be neither resumed nor used as a recipe ("method magnitude takes no option ...")."""
    from prunekit.commands import option_flags, sweep as sweep_command
    out = tmp_path / "sweep"
    sweep = ["sweep", *MLP, "--method", "magnitude", "chita", "--sparsity", "0.5", "--stages", "2", "--json"]
    assert main([*sweep, "--out", str(out)]) == 0
    capsys.readouterr()
    magnitude, chita = out / "magnitude_sparsity-0.5", out / "chita_sparsity-0.5"
    assert "stages" not in (magnitude / "config.toml").read_text()
    assert "fisher-samples" not in (magnitude / "config.toml").read_text()
    assert "stages = 2" in (chita / "config.toml").read_text()
    assert main(["prune", "--resume", str(magnitude), "--json"]) == 0
    assert main(["prune", "--recipe", str(magnitude / "config.toml"), "--out", str(tmp_path / "again"),
                 "--json"]) == 0
    capsys.readouterr()
    # a folder an older sweep wrote (every option of the sweep in each run's config) resumes, and the
    # same sweep again carries it on rather than refusing it as a run of other options
    old = tmp_path / "old"
    with monkeypatch.context() as older:
        older.setattr(sweep_command, "taken_options", lambda method, gradual: set(option_flags.OPTION_NAMES))
        assert main([*sweep, "--out", str(old)]) == 0
    capsys.readouterr()
    assert "stages = 2" in (old / "magnitude_sparsity-0.5" / "config.toml").read_text()
    assert main(["prune", "--resume", str(old / "magnitude_sparsity-0.5"), "--json"]) == 0
    capsys.readouterr()
    assert main([*sweep, "--out", str(old)]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["done", "done"]


def test_a_sweep_refuses_a_run_folder_of_the_users_own(tmp_path, capsys):
    """prune --out refuses a folder holding other files; a sweep wrote its run into OUT/<run>/ that the
    user made, beside the user's notes.txt."""
    out = tmp_path / "sweep"
    (out / "magnitude_sparsity-0.5").mkdir(parents=True)
    (out / "magnitude_sparsity-0.5" / "notes.txt").write_text("my notes\n")
    assert main(["sweep", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    notes = out / "magnitude_sparsity-0.5" / "notes.txt"          # named, and what to do with it
    assert f"holds {notes}, not a run's: move it out of" in err and "pick another --out" in err, err
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in out.rglob("*")) == ["magnitude_sparsity-0.5", "notes.txt"]


def test_runs_with_a_params_budget_show_the_params_kept_in_the_table_and_the_report(tmp_path):
    """--params is a budget like --flops, but compare and sweep tables had no params-kept column:
    a run asked "params 0.3" could not be read against it. The column is there where a run asked
    a params budget, and absent otherwise (the other columns as they were)."""
    from prunekit import report
    row = {"name": "r", "run": str(tmp_path / "r"), "model": "mlpnet", "method": "magnitude", "status": "done",
           "request": {"flops": "0.4", "params": "0.3"}, "sparsity": 0.7, "flops_kept": 0.4, "params_kept": 0.2999,
           "dense_accuracy": 96.8, "accuracy": 90.1, "loss": 0.1, "seconds": 3.0, "stages": 1}
    head, rule, line = report.table_lines([row])
    assert "params kept" in head and line[head.index("params kept"):][:11].strip() == "29.99%"
    assert len(head) == len(rule) == len(line) and line.index("90.10%") + 6 == head.index("acc") + 3
    flops_only = {**row, "request": {"flops": "0.4", "params": None}}
    assert "params kept" not in report.table_lines([flops_only])[0]
    assert "params kept" in report.table_lines([flops_only, row])[0]      # any run with a params budget
    written = report.write_comparison_report(tmp_path / "cmp", [row]).read_text().splitlines()
    header = next(i for i, text in enumerate(written) if text.startswith("| run"))
    cells = [c.strip() for c in written[header].strip("|").split("|")]
    values = [c.strip() for c in written[header + 2].strip("|").split("|")]
    assert cells[cells.index("MACs kept") + 1] == "params kept" and values[cells.index("params kept")] == "29.99%"
    assert written[header + 1].count("---") == len(cells)


def test_the_seconds_column_is_labelled_pruning_time_and_shows_a_short_run_as_it_was(tmp_path):
    """A gradual magnitude run of MLPNet prunes and fine-tunes in 0.33 s (its run.log spans about
    2 s: loading, evaluations); compare's column showed "0" under a bare "s". It is the record's
    `seconds` (pruning, fine-tunes included, no evaluation), labelled so, with decimals below 100 s."""
    from prunekit import report
    row = {"name": "g", "run": str(tmp_path / "g"), "model": "mlpnet", "method": "magnitude", "mode": "gradual",
           "status": "done", "request": {"sparsity": "0.8"}, "sparsity": 0.8, "flops_kept": 0.2,
           "dense_accuracy": 96.81, "accuracy": 95.36, "loss": 0.17, "seconds": 0.3262, "stages": 4}
    head, rule, line = report.table_lines([row])
    assert head.endswith("prune s") and len(head) == len(line), (head, line)
    assert line.split()[-1] == "0.33", line
    assert report.table_lines([{**row, "seconds": 42.04}])[2].split()[-1] == "42.0"
    assert report.table_lines([{**row, "seconds": 1234.4}])[2].split()[-1] == "1234"
    written = report.write_comparison_report(tmp_path / "cmp", [row]).read_text().splitlines()
    header = next(i for i, text in enumerate(written) if text.startswith("| run"))
    assert written[header].endswith("| accuracy | pruning s |") and written[header + 2].endswith("| 0.33 |"), written
