"""Benchmark scripts never overwrite a result file that was there before they ran; the checkpoint they ship is intact."""

import json
import sys
from pathlib import Path

import pytest
import torch

import prunekit

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


def _readme() -> str:
    return " ".join((Path(common.__file__).parents[1] / "README.md").read_text().split())   # lines rejoined


def _accuracies(*names: str) -> dict:
    """(row name less its seed, seed, budget) -> test accuracy, from result files of bench_oneshot.py."""
    import re
    found = {}
    for name in names:
        for row in json.loads((Path(common.__file__).parent / "results" / name).read_text())["rows"]:
            named = re.fullmatch(r"(.*)-s(\d+)", row["name"])
            found[(named.group(1), int(named.group(2)), row["budget"])] = row["test_accuracy"]
    return found


def test_the_readme_gives_todays_fashion_mnist_gains_as_their_result_files_do():
    """Session 38's rows (FALCON++'s the same to the digit on session 44's code): the table's cells
    and the Status line say the same gains."""
    readme = _readme()
    rows = _accuracies(*(f"oneshot_s38_defaults_fmnist_seed{s}.json" for s in range(3)))
    rerun = _accuracies("oneshot_s44_last_judge_fmnist_40_30.json", "oneshot_s44_last_judge_fmnist_20_10.json")
    assert rerun and all(rows[key] == accuracy for key, accuracy in rerun.items())
    for method in ("falcon", "falcon++"):
        gains = []
        for budget in (0.4, 0.3, 0.2, 0.1):
            gain = sum(rows[(method, s, budget)] - rows[("magnitude-flops", s, budget)] for s in range(3)) / 3
            gains.append(f"{gain:+.2f}")
            assert f"{rows[(method, 0, budget)]:.2f} (" in readme and f"**{gains[-1]}** over 3 seeds) ⁵" in readme
        if method == "falcon++":
            assert f"(FALCON++ {' / '.join(gains)}, 10,000 test images)" in readme


def test_the_readme_gives_todays_mlpnet_figures_at_0_98_as_their_result_files_do():
    readme = _readme()
    falcon = _accuracies("oneshot_s39_mlpnet_auto.json")
    one_shot = [falcon[("falcon", s, 0.02)] for s in range(3)]
    assert f"one-shot FALCON {one_shot[0]:.2f}% for seed 0, {sum(one_shot) / 3:.2f}% over three seeds" in readme
    thorough = _accuracies("oneshot_s40_mlpnet_parts.json")
    plus = sum(thorough[("falcon++-15-n1000-fresh", s, 0.02)] for s in range(3)) / 3
    assert f"FALCON++ **{plus:.2f}%** over three seeds" in readme and f"0.98 {plus:.2f}% (falcon++" in readme
    results = Path(common.__file__).parent / "results"
    chita = json.loads((results / "chita_mlpnet_s47.json").read_text())["rows"]
    chita = next(r["accuracy"] for r in chita if r["method"] == "chita-iht" and r["sparsity"] == 0.98)
    chita_pp = json.loads((results / "oneshot_s33_mlpnet_chita_defaults.json").read_text())["rows"]
    chita_pp = next(r["test_accuracy"] for r in chita_pp if r["name"] == "chita++" and r["budget"] == 0.02)
    assert f"CHITA {chita:.2f}% (session 47" in readme and f"CHITA++ {chita_pp:.2f}% (seed 0" in readme


def test_the_readme_gives_the_layer_search_cost_of_mlpnet_as_auto_counts_it():
    """`--layer-search auto`'s figures for MLPNet (one shot; falcon++ with `--stages auto`'s 15 stages),
    counted as ``fisher_methods._search_cost`` counts them at the command line's training batch of 128;
    each figure as stated to its last digit."""
    import re

    import torch

    from prunekit import zoo
    from prunekit.costs import CostModel
    from prunekit.params import ParamSpace
    from prunekit.pipelines import fisher_methods as fm
    from prunekit.pipelines.allocation import SEARCH_CALIBRATION_BATCHES, SEARCH_JUDGE_BATCHES
    model = zoo.build("mlpnet")
    macs, weights = CostModel(model, torch.zeros(1, 1, 28, 28)).macs, ParamSpace(model).numel
    trials = [fm.AUTO_LAYER_SEARCH_TRIALS, fm.THOROUGH_SCHEDULE["stages"] * fm.AUTO_LAYER_SEARCH_TRIALS]
    forward = [t * (SEARCH_CALIBRATION_BATCHES + SEARCH_JUDGE_BATCHES) * 128 * macs for t in trials]
    solves = [t * weights for t in trials]
    assert max(forward) <= fm.AUTO_LAYER_SEARCH_MACS and max(solves) <= fm.AUTO_LAYER_SEARCH_WEIGHTS
    number = r"([\d.]+)·10([⁰¹²³⁴⁵⁶⁷⁸⁹]+)"
    readme = _readme()
    said_forward = re.search(rf"\(MLPNet: {number} one shot, {number} in FALCON\+\+'s 15 searches", readme)
    said_solves = re.search(rf"\(MLPNet: {number} one shot, {number} in FALCON\+\+, (\d+)% of the limit", readme)
    assert said_forward and said_solves

    def agrees(mantissa: str, exponent: str, value: float) -> bool:
        power = int(exponent.translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")))
        digits = len(mantissa.partition(".")[2])
        return round(value / 10 ** power, digits) == float(mantissa)
    for said, values in ((said_forward, forward), (said_solves, solves)):
        assert agrees(*said.group(1, 2), values[0]) and agrees(*said.group(3, 4), values[1]), (said.group(0), values)
    assert int(said_solves.group(5)) == round(100 * solves[1] / fm.AUTO_LAYER_SEARCH_WEIGHTS)


def test_eval_jpeg10k_names_the_missing_model_and_the_command_that_makes_it(tmp_path):
    """s53: the committed session-16 rows name saved models that are not kept; eval_jpeg10k read
    them (after unpacking the tar) and failed with a traceback. Now one line before any work: the
    missing file, and the issue16_rows.sh chain that makes the row anew with its model."""
    import os
    import subprocess
    import prunekit
    here = Path(common.__file__).parent
    row = here / "results" / "structured_s16_autobot-inner_0.5_seed0.json"
    saved = json.loads(row.read_text())["rows"][0]["saved"]
    assert not (here.parent / saved).exists()           # (else this test checks nothing)
    done = subprocess.run([sys.executable, str(here / "eval_jpeg10k.py"), "--inputs", str(row), "--data-dir",
                           str(tmp_path / "no-data"), "--cache-dir", str(tmp_path / "cache"), "--out",
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120, cwd=here.parent,
                          env={**os.environ, "PYTHONPATH": str(Path(prunekit.__file__).parents[1])})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert saved in done.stderr and "bash benchmarks/issue16_rows.sh --results NEW models50 b" in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out.json").exists()


GOOD_ROW = {"saved": "/nonexistent/m.safetensors", "method": "x", "budget": 0.5, "flops_kept": 0.5,
            "accuracy_finetuned": 90.0}
MALFORMED = {"no rows": ({"settings": {"seed": 0}, "model": "resnet20-b"}, 'no "rows" list'),
             "rows a number": ({"settings": {"seed": 0}, "model": "resnet20-b", "rows": 5}, 'no "rows" list'),
             "no row": ({"settings": {"seed": 0}, "model": "resnet20-b", "rows": []}, "no rows"),
             "a row a string": ({"settings": {"seed": 0}, "model": "resnet20-b", "rows": ["saved-this"]},
                                "row 0 is a str, not an object"),
             "a row without method": ({"settings": {"seed": 0}, "model": "resnet20-b",
                                       "rows": [{k: v for k, v in GOOD_ROW.items() if k != "method"}]},
                                      "row 0 has no 'method' (a string)"),
             "no model": ({"settings": {"seed": 0}, "rows": [GOOD_ROW]}, 'no "model" name'),
             "no seed": ({"settings": {}, "model": "resnet20-b", "rows": [GOOD_ROW]}, '"seed"'),
             "a list": ([GOOD_ROW], "a JSON list, not an object")}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_eval_jpeg10k_refuses_a_malformed_input_in_one_line(case, tmp_path, monkeypatch, capsys):
    """s53 review: the up-front refusal read row["method"] and payload["rows"] unchecked: a row without
    "method", no "rows", "rows": 5 or a row that is a string ended in a traceback. Now one line naming
    the file and what it lacks, exit 2, before any work. The script's main() runs in this process (a
    traceback is an exception here); the script run as a program, a refusal's exit code and its one
    line on stderr, is test_eval_jpeg10k_names_the_missing_model_and_the_command_that_makes_it's."""
    import torch
    import eval_jpeg10k
    payload, said = MALFORMED[case]
    given = tmp_path / "in.json"
    given.write_text(json.dumps(payload))
    monkeypatch.setattr(sys, "argv", ["eval_jpeg10k.py", "--inputs", str(given), "--data-dir", str(tmp_path / "no-data"),
                                      "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out.json")])
    threads = torch.get_num_threads()                    # main() sets its --threads (1) for the process
    try:
        with pytest.raises(SystemExit) as stopped:
            eval_jpeg10k.main()
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and err.count("\n") == 1 and out == "", (out, err)
    assert str(given) in err and said in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out.json").exists()


def test_the_docs_one_shot_commands_name_no_committed_out():
    """s53: bench_oneshot.py refuses an existing --out unless --resume, and docs/benchmarks.md's
    commands named the committed result files as --out: each now writes NEW*.json (a second
    invocation into it with --resume), the committed file named beside it."""
    import re
    root = Path(common.__file__).parent.parent
    committed = {p.name for p in (root / "benchmarks" / "results").glob("*.json")}
    text = (root / "docs" / "benchmarks.md").read_text()
    named = []
    for found in re.finditer(r"--out\s+`?\s*([^\s`;)]+)", text):
        before = text[max(0, found.start() - 1500):found.start()]
        scripts = re.findall(r"\b(\w+\.(?:py|sh))\b", before)
        if scripts and scripts[-1] == "bench_oneshot.py":
            pattern = re.sub(r"\\\$\\\{?\w+\\\}?|<\w+>", ".*", re.escape(Path(found.group(1)).name))
            named += [found.group(1) for name in committed if re.fullmatch(pattern, name)]
    assert text.count("bench_oneshot.py") > 40 and not named, sorted(set(named))


def test_the_structured_benchmarks_autobot_call_passes_depth_options_only_with_a_depth_cut(tmp_path, monkeypatch):
    """Every autobot row of bench_structured.py stopped on a refusal (depth_batches / depth_per given
    without depth_flops) after prunekit.prune began refusing them (session 55's walk)."""
    import bench_structured
    seen = {}

    def accuracy_part(args):
        seen["args"] = args
        return {"model": "m", "dense_accuracy": 90.0, "dense_macs": 1, "rows": []}
    monkeypatch.setattr(bench_structured, "accuracy_part", accuracy_part)
    monkeypatch.setattr(common, "_TARGETS", {})
    monkeypatch.setattr(sys, "argv", ["bench_structured", "--data", "/some/data", "--out", str(tmp_path / "s.json"),
                                      "--no-latency", "--methods", "autobot"])
    bench_structured.main()
    args = seen["args"]
    assert bench_structured._depth_options(args, None) == {}
    assert bench_structured._depth_options(args, 0.4) == {"depth_flops": 0.4, "depth_batches": args.depth_batches,
                                                          "depth_per": args.depth_per}
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    result = prunekit.prune(net, (x, y), method="autobot", flops=0.6, example_input=x[:1], gate_batches=2,
                            **bench_structured._depth_options(args, None))
    assert result.record["flops_kept"] <= 0.6
