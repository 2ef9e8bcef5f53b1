"""Benchmark scripts never overwrite a result file that was there before they ran; the checkpoint they ship is intact."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402


def test_an_existing_result_file_is_kept_and_the_new_one_goes_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_TARGETS", {})
    old = tmp_path / "results.json"
    old.write_text('{"rows": ["an earlier run"]}')
    first = common.write_json(old, {"rows": [1]})
    again = common.write_json(old, {"rows": [1, 2]})        # the same run writing as it goes
    assert first == again == tmp_path / "results-2.json"
    assert json.loads(old.read_text()) == {"rows": ["an earlier run"]}
    assert json.loads(again.read_text())["rows"] == [1, 2]
    assert common.write_json(old, {"rows": [3]}, extends=True) == tmp_path / "results-2.json"
    monkeypatch.setattr(common, "_TARGETS", {})
    assert common.write_json(old, {"rows": ["read", "and more"]}, extends=True) == old     # a resumed run
    assert common.unused_path(old) == tmp_path / "results-3.json"
    (tmp_path / "autobot-0.5").mkdir()
    assert common.unused_path(tmp_path / "autobot-0.5") == tmp_path / "autobot-0.5-2"


def test_bad_input_exits_with_code_2(capsys):
    with pytest.raises(SystemExit) as stop:
        common.refuse("pass --data the shared data folder")
    assert stop.value.code == 2 and "pass --data" in capsys.readouterr().err


@pytest.mark.parametrize("model, path", [("resnet20", common.FMNIST_CHECKPOINT),
                                         ("mlpnet", common.FMNIST_MLPNET_CHECKPOINT)])
def test_the_shipped_fashion_mnist_checkpoints_match_their_readme_and_load(model, path):
    """benchmarks/checkpoints/fmnist-*: the md5 their README states, and a model for 1-channel
    28 x 28 images with the Fashion-MNIST normalisation once loaded (weights only: safetensors)."""
    import hashlib
    import re

    import torch

    from prunekit.loading import load_model

    stated = re.search(rf"\| `{path.parent.name}/` \|.*\| ([0-9a-f]{{32}}) \|", (path.parents[1] / "README.md").read_text())
    assert stated and hashlib.md5(path.read_bytes()).hexdigest() == stated.group(1)
    loaded = load_model(model, path)
    assert loaded.normalization is not None
    with torch.no_grad():
        logits = loaded.model.eval()(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 10) and bool(torch.isfinite(logits).all())


def test_the_one_shot_benchmark_runs_rows_per_seed_and_compares_each_with_its_seeds_magnitude():
    import bench_oneshot
    specs = bench_oneshot.with_seeds([{"name": "falcon", "method": "falcon"}], [0, 2])
    assert specs == [{"name": "falcon-s0", "method": "falcon", "seed": 0, "row": "falcon"},
                     {"name": "falcon-s2", "method": "falcon", "seed": 2, "row": "falcon"}]
    assert "--row" not in bench_oneshot.prune_command(
        {**specs[0], "budget": 0.5}, {"model": "m", "checkpoint": "c", "data": "d", "dir": "x", "sparsity_too": False},
        "data", "out")

    def row(name, seed, accuracy, loss):
        return {"model": "m", "name": f"{name}-s{seed}", "budget": 0.5, "test_accuracy": accuracy,
                "train_loss": loss, "spec": {"row": name, "seed": seed}}
    rows = [row("magnitude-flops", 0, 80.0, 0.5), row("magnitude-flops", 1, 82.0, 0.4),
            row("falcon", 0, 85.0, 0.2), row("falcon", 1, 84.0, 0.3)]
    falcon = next(m for m in bench_oneshot.seed_means(rows) if m["name"] == "falcon")
    assert falcon["seeds"] == 2 and falcon["test_accuracy"] == pytest.approx(84.5, rel=1e-12)
    assert falcon["gain"] == pytest.approx(3.5, rel=1e-12)        # +5 and +2: each against its own seed
    assert falcon["train_loss"] == pytest.approx(0.25, rel=1e-12)
    assert bench_oneshot.seed_means(rows[:1] + rows[2:3]) == []           # one seed: no mean


def test_the_one_shot_show_groups_custom_rows_named_with_their_seed():
    """`--custom '{"name": "falcon-s0", "seed": 0, ...}'` rows (session 38's files) carry no "row":
    --show groups them by the name less its own seed's suffix, so gains and means come back."""
    import bench_oneshot

    def row(name, seed, accuracy):
        return {"model": "m", "name": f"{name}-s{seed}", "budget": 0.3, "test_accuracy": accuracy,
                "train_accuracy": accuracy, "train_loss": 0.1,
                "spec": {"name": f"{name}-s{seed}", "method": name, "seed": seed}}
    rows = [row("magnitude-flops", 0, 80.0), row("magnitude-flops", 1, 82.0),
            row("falcon", 0, 85.0), row("falcon", 1, 84.0)]
    assert bench_oneshot._row_name(rows[2]) == "falcon"
    assert bench_oneshot._row_name({"name": "falcon-s1", "spec": {"seed": 0}}) == "falcon-s1"   # not its seed
    assert bench_oneshot._row_name({"name": "falcon-s1"}) == "falcon-s1"                        # no seed
    falcon = next(m for m in bench_oneshot.seed_means(rows) if m["name"] == "falcon")
    assert falcon["gain"] == pytest.approx(3.5, rel=1e-12)


@pytest.mark.parametrize("script", ["plan_probe.py", "plan_probe_solver.py"])
def test_the_plan_probes_print_their_usage_on_help(script):
    import subprocess
    done = subprocess.run([sys.executable, str(Path(common.__file__).parent / script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-500:]


def test_a_row_process_gets_one_thread_whatever_the_shell_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = common.one_thread_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    assert "quiet at start" in common.quiet_note(0.0, 1) and "NOT quiet" in common.quiet_note(1e6, 1)


def _fake_prunekit(calls):
    def run(*args, threads=None):
        calls.append((args, threads))
        return {"accuracy": 50.0, "nonzeros": 10, "seconds": 1.0, "peak_rss_mb": 1.0, "dense_accuracy": 90.0,
                "flops_kept": 0.3, "macs": 1, "budget_max_macs": 1, "sparsity": 0.5}
    return run


@pytest.mark.parametrize("script, argv, key", [
    ("bench_chita", ["--sparsities", "0.9", "0.98", "--methods", "magnitude"], "sparsity"),
    ("bench_falcon", ["--flops", "0.3", "0.2", "--methods", "magnitude-flops"], "flops")])
def test_chita_and_falcon_rows_run_on_one_thread_record_the_load_and_resume(script, argv, key, tmp_path, monkeypatch):
    """Every row's process is told one thread (recorded with the load); the JSON is written after
    each row, and --resume runs only the rows missing from it."""
    import importlib
    module = importlib.import_module(script)
    calls = []
    monkeypatch.setattr(module, "prunekit", _fake_prunekit(calls))
    monkeypatch.setattr(common, "_TARGETS", {})
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [script, *argv[:2], *argv[3:], "--out", str(out)])   # the first budget only
    module.main()
    first = json.loads(out.read_text())
    assert len(first["rows"]) == 1 and first["threads_per_row"] == 1
    assert first["rows"][0]["threads"] == 1 and "load_average" in first["rows"][0]
    assert calls and all(threads == 1 for _, threads in calls)
    calls.clear()
    monkeypatch.setattr(common, "_TARGETS", {})
    monkeypatch.setattr(sys, "argv", [script, *argv, "--out", str(out), "--resume"])
    module.main()
    rows = json.loads(out.read_text())["rows"]
    assert [row[key] for row in rows] == [float(argv[1]), float(argv[2])]
    assert calls and all(argv[1] not in args for args, _ in calls)    # the row already there was not run again


def test_the_structured_benchmark_saves_its_models_beside_out_and_makes_no_folder_at_start(tmp_path, monkeypatch):
    import bench_structured
    seen = {}

    def accuracy_part(args):
        seen["models_dir"] = args.models_dir
        seen["data_dir"] = args.data_dir
        return {"model": "m", "dense_accuracy": 90.0, "dense_macs": 1, "rows": []}
    monkeypatch.setattr(bench_structured, "accuracy_part", accuracy_part)
    monkeypatch.setattr(common, "_TARGETS", {})
    checkout_models = bench_structured.RESULTS / "structured_models"
    existed = checkout_models.exists()
    out = tmp_path / "elsewhere" / "structured.json"
    monkeypatch.setattr(sys, "argv", ["bench_structured", "--data", "/some/data", "--out", str(out), "--no-latency"])
    bench_structured.main()
    assert Path(seen["models_dir"]) == out.parent.resolve() / "structured_models"
    assert seen["data_dir"] == "/some/data"                          # --data: the alias of --data-dir
    assert not Path(seen["models_dir"]).exists()                     # made only when a model is saved
    assert checkout_models.exists() == existed                       # nothing made in the checkout
    assert out.exists()
