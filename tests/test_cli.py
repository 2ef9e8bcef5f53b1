"""End-to-end CLI runs on the bundled MLPNet and MNIST sample, and the one-line errors."""

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import zoo
from prunekit.cli import main

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors")]
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json(capsys):
    out = run_json(capsys, ["eval", *MLP, *MNIST, "--json"])
    assert out["accuracy"] > 90 and out["images"] == 10000 and 0 < out["loss"] < 1
    info = run_json(capsys, ["info", *MLP[1:], "--json"])
    assert (out["macs"], out["params"]) == (info["macs"], info["params"])
    assert run_json(capsys, ["eval", *MLP, *MNIST, "--device", "cpu", "--json"])["accuracy"] == out["accuracy"]


@pytest.mark.parametrize("method", ["magnitude", "magnitude-uniform", "magnitude-flops"])
def test_prune_meets_budget_and_saves(capsys, tmp_path, method):
    out_dir = tmp_path / "run"
    out = run_json(capsys, ["prune", *MLP, *MNIST, "--method", method, "--sparsity", "0.8",
                            "--flops", "0.15", "--out", str(out_dir), "--json"])
    for key in ("method", "sparsity", "flops_kept", "params_kept", "nonzeros", "macs",
                "dense_accuracy", "accuracy", "seconds", "peak_rss_mb"):
        assert key in out
    assert out["nonzeros"] <= 0.2 * 32360 and out["flops_kept"] <= 0.15
    # The saved model reloads and is counted the same.
    reloaded = run_json(capsys, ["eval", "--model", "mlpnet", "--checkpoint",
                                 str(out_dir / "model.safetensors"), *MNIST, "--json"])
    assert reloaded["accuracy"] == pytest.approx(out["accuracy"])
    # a prunekit checkpoint of a zoo model says which model it is: --model may be left out
    unnamed = run_json(capsys, ["eval", "--checkpoint", str(out_dir / "model.safetensors"), *MNIST, "--json"])
    assert unnamed["model"] == "mlpnet" and unnamed["accuracy"] == reloaded["accuracy"]
    info = run_json(capsys, ["info", "mlpnet", "--checkpoint", str(out_dir / "model.safetensors"), "--json"])
    assert info["macs"] == out["macs"]


def test_random_weights_without_a_checkpoint_come_from_the_seed(capsys):
    """A zoo model without --checkpoint is drawn from --seed (default 0): the same command twice
    measures the same network, another seed another one."""
    def pruned(*seed):
        assert main(["prune", "--model", "mlpnet", *MNIST, "--sparsity", "0.5", "--json", *seed]) == 0
        return json.loads(capsys.readouterr().out)["dense_loss"]
    assert pruned() == pruned() == pruned("--seed", "0") != pruned("--seed", "1")


def test_info_table(capsys):
    assert main(["info", "resnet20-b"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "total:" in text


def test_info_without_a_checkpoint_counts_the_architecture(capsys, monkeypatch):
    """Random weights: an exact zero the initialisation drew is no pruning (resnet50's counts
    moved by a few params and MACs from run to run)."""
    real_build = zoo.build

    def build_with_zeros(*args, **kwargs):
        model = real_build(*args, **kwargs)
        with torch.no_grad():
            model.fc1.weight[0, :3] = 0
        return model
    monkeypatch.setattr(zoo, "build", build_with_zeros)
    assert main(["info", "mlpnet", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["params"] == counts["dense_params"] and counts["macs"] == counts["dense_macs"]
    assert counts["layers"][0]["params_kept"] == counts["layers"][0]["params"]


def test_info_takes_the_model_as_other_commands_do(capsys):
    """`info --model NAME` as `prune --model NAME`; the positional form stays; a prunekit
    checkpoint of a zoo model names it."""
    assert main(["info", "mlpnet", "--json"]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["info", "--model", "mlpnet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == positional
    assert main(["info", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "mlpnet"


def test_demo_runs_offline(capsys):
    out = run_json(capsys, ["demo", "--json"])
    assert out["model"] == "mlpnet" and out["accuracy"] > 10 and out["sparsity"] >= 0.9 - 1e-9


@pytest.fixture
def resnet_checkpoint(tmp_path):
    path = tmp_path / "resnet20.pth"
    torch.save({"state_dict": zoo.build("resnet20").state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--model", "nope", *MNIST, "--sparsity", "0.5"], "unknown model"),
    (["prune", *MLP, *MNIST, "--method", "nope", "--sparsity", "0.5"], "unknown method"),
    (["eval", "--model", "mlpnet", "--checkpoint", "/no/such/file.pth", *MNIST], "not found"),
    (["prune", *MLP, *MNIST, "--sparsity", "1.5"], "out of range"),
    (["prune", *MLP, *MNIST, "--flops", "0"], "out of range"),
    (["eval", "--model", "resnet20", *MNIST], "(C,H,W)"),
    (["eval", *MLP, "--data", "mnist", "--data-dir", "/no/such/dir"], "does not exist"),
    (["prune", *MLP, *MNIST], "no budget"),
    (["info", "nope"], "unknown model"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_checkpoint_of_another_architecture(capsys, resnet_checkpoint):
    assert main(["eval", "--model", "mlpnet", "--checkpoint", resnet_checkpoint, *MNIST]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit" in err and "\n" not in err


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_info_reports_the_papers_prunable_set_for_resnet20_b(capsys):
    info = run_json(capsys, ["info", "resnet20-b", "--json"])
    assert info["prunable_weights"] == 268_336           # the FALCON/CHITA count
    assert info["prunable_macs"] == pytest.approx(40.6e6, rel=0.002)
    assert info["macs"] == info["dense_macs"] and info["params"] == 272_474
    dense = [row["name"] for row in info["layers"] if row["shape"] and not row["prunable"]]
    assert dense == ["layer2.0.downsample.0", "layer3.0.downsample.0"]      # the 1x1 projections
    assert sum(row["params"] for row in info["layers"] if row["prunable"]) - 10 == info["prunable_weights"]  # fc's bias
    assert main(["info", "resnet20-b"]) == 0
    marked = [line.split()[0] for line in capsys.readouterr().out.splitlines() if ", dense" in line]
    assert marked == dense


def test_info_does_not_call_an_excluded_layer_with_zeros_dense(capsys, tmp_path):
    """An older hybrid pruned the 1x1 projections it now keeps dense: info labelled
    layer2.0.downsample.0 "Conv2d, dense" though 105 of its 480 weights were zero."""
    import torch
    from prunekit import zoo
    from prunekit.saving import save_model
    model = zoo.build("resnet20-b")
    with torch.no_grad():
        model.layer2[0].downsample[0].weight.view(-1)[:105] = 0
    save_model(model, tmp_path / "model.safetensors", {"model": "resnet20-b"})
    assert main(["info", "resnet20-b", "--checkpoint", str(tmp_path / "model.safetensors")]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("layer2.0.downsample.0 "))
    assert "Conv2d, excluded, 105 zeros" in row and "dense" not in row
    assert "Conv2d, dense" in next(line for line in out if line.startswith("layer3.0.downsample.0 "))
    prunable = next(line for line in out if line.startswith("prunable:"))
    assert "dense" not in prunable and prunable.endswith(
        "leaving out *.downsample.* (marked excluded above; some hold zeros, e.g. an older version's pruning)")


def test_unwritable_out_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["prune", *MLP, *MNIST, "--sparsity", "0.5", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "prunekit: error" in err and "\n" not in err


def test_bad_request_fails_before_any_evaluation(capsys, monkeypatch):
    from prunekit import executor
    monkeypatch.setattr(executor, "measure", lambda *a, **k: pytest.fail("evaluated before checking"))
    assert main(["prune", *MLP, *MNIST, "--method", "falcon", "--sparsity", "0.5"]) == 2
    assert main(["prune", *MLP, *MNIST, "--method", "chita", "--sparsity", "0.5", "--solver", "dfo"]) == 2


def test_falcon_on_mlpnet_searches_by_default_and_says_so(capsys):
    assert main(["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.1", "--fisher-samples", "64",
                 "--no-stage-eval"]) == 0
    lines = capsys.readouterr().out.splitlines()
    search = [line for line in lines if line.startswith("  search ")]
    assert search and search[0].startswith("  search     1 layer search of 100 trials, ")
    assert "(auto: forward passes of " in search[0] and ", within 100 GMACs)" in search[0]


def test_progress_bars_only_on_a_terminal(capsys, monkeypatch):
    """Bars are drawn on a terminal's stderr; a log file or pipe gets none (a long run's log filled
    with bar redraws). The printed result is the same either way."""
    assert main(["eval", *MLP, *MNIST]) == 0
    piped = capsys.readouterr()
    assert "%|" not in piped.err and "top-1" in piped.out
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["eval", *MLP, *MNIST]) == 0
    shown = capsys.readouterr()
    assert "%|" in shown.err and shown.out == piped.out


def test_info_prints_whole_names_and_says_what_activation_products_are(capsys):
    """The type column cut names ('NonDynamicallyQuan'), and products of two activations were called
    attention products in models with no attention."""
    assert main(["info", "vit-tiny"]) == 0
    out = capsys.readouterr().out
    assert "NonDynamicallyQuantizableLinear" in out and "VisionTransformer (parameters)" in out
    assert "in products of two activations" in out


def test_progress_bars_follow_prunekit_progress_in_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "1")
    assert main(["eval", *MLP, *MNIST]) == 0
    assert "%|" in capsys.readouterr().err                       # into a pipe, as asked
    import sys
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["eval", *MLP, *MNIST]) == 0
    assert "%|" not in capsys.readouterr().err                   # on a terminal, as asked


@pytest.mark.parametrize("env,said", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not a number"),
                                      ({"WORLD_SIZE": "2", "RANK": "3"}, "RANK=3 is not one of 0 to 1"),
                                      ({"WORLD_SIZE": "2", "PRUNEKIT_DIST_TIMEOUT": "abc"}, "give it in seconds"),
                                      ({"WORLD_SIZE": "2", "PRUNEKIT_DIST_TIMEOUT": "-1"}, "must be a positive number")])
def test_a_bad_launch_environment_is_refused_in_one_line(env, said, capsys, monkeypatch):
    """These gave a ValueError traceback, or C++ frames after a 20 s wait."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29599")
    monkeypatch.setenv("RANK", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["eval", *MLP, *MNIST, "--json"]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err


def test_info_takes_a_checkpoint_file_given_positionally(capsys, tmp_path):
    """`prunekit info PATH/model.safetensors` said "unknown model '...safetensors': pick one of mlpnet, ..."."""
    import torch
    from prunekit import zoo
    from prunekit.saving import save_model
    model = zoo.build("mlpnet")
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0
    save_model(model, tmp_path / "model.safetensors", {"model": "mlpnet"})
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    expected = run_json(capsys, ["info", "--checkpoint", str(tmp_path / "model.safetensors"), "--json"])
    assert expected["macs"] < expected["dense_macs"]
    assert run_json(capsys, ["info", str(tmp_path / "model.safetensors"), "--json"]) == expected
    assert run_json(capsys, ["info", str(tmp_path / "plain.pth"), "--model", "mlpnet", "--json"]) == expected
    assert main(["info", str(tmp_path / "missing.pth")]) == 2
    missing = tmp_path / "missing.pth"
    assert capsys.readouterr().err == f"prunekit: error: checkpoint {missing} not found: check the path\n"
    assert main(["info", str(tmp_path / "model.safetensors"), "--checkpoint", str(tmp_path / "plain.pth")]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_lost_ranks_torch_error_is_cut_at_a_sentence_or_word_never_mid_word():
    """Before, torch's text was cut at 160 characters: "... Check the logs of the re); resume with ..."."""
    from prunekit.distributed.lost import shortened
    torch_said = ("Read error [127.0.0.1]:54703: Connection reset by peer. This is typically caused by a remote "
                  "worker hanging or bugs in the application. Check the logs of the remote worker.")
    assert shortened(torch_said) == ("Read error [127.0.0.1]:54703: Connection reset by peer. This is typically "
                                     "caused by a remote worker hanging or bugs in the application.")
    assert shortened("short, as is") == "short, as is"
    one_sentence = "Connection closed by peer " + "while waiting on the collective " * 8
    cut = shortened(one_sentence)
    assert len(cut) <= 160 and cut.endswith("collective...") and one_sentence.startswith(cut[:-3]), cut
    assert shortened("x" * 300) == "x" * 157 + "..."


def test_a_value_starting_with_a_dash_reaches_the_options_own_check():
    """argparse reads ``-weird`` after ``--out`` as a flag ("expected one argument"); glued to its
    option it is the option's value, checked (or taken) as any other. Flags after flags stay."""
    from prunekit.cli import _glue_dash_values, build_parser
    parser = build_parser()
    argv = ["prune", "--model", "mlpnet", "--out", "-weird", "--max-memory", "-5G",
            "--sparsity", "-0.1", "--out", "-h", "--device", "--bogus", "--json", "--exclude", "-x"]
    assert _glue_dash_values(argv, parser) == [
        "prune", "--model", "mlpnet", "--out=-weird", "--max-memory=-5G",
        "--sparsity=-0.1", "--out", "-h", "--device", "--bogus", "--json", "--exclude", "-x"]
    assert _glue_dash_values(["info", "mlpnet", "--input-shape", "-1,28,28"], parser) == [
        "info", "mlpnet", "--input-shape=-1,28,28"]
    assert _glue_dash_values(["-h"], parser) == ["-h"]


def test_help_gives_the_range_of_each_number():
    from prunekit.cli import build_parser_for

    def helps(command):
        return {a.option_strings[0]: a.help for a in build_parser_for(command)._actions if a.option_strings}

    prune, train, bench = helps("prune"), helps("train"), helps("bench-latency")
    assert "[0, 1)" in prune["--sparsity"] and "(0, 1]" in prune["--flops"] and "(0, 1]" in prune["--params"]
    for flag in ("--train-samples", "--batch-size", "--stages", "--events"):
        assert ">= 1" in prune[flag], flag
    for flag in ("--lr", "--ridge", "--refit-ridge", "--relative-ridge"):
        assert "> 0" in prune[flag], flag
    assert "2**63-1" in prune["--seed"] and "2**63-1" in train["--seed"]
    assert ">= 1" in train["--epochs"] and "> 0" in train["--lr"] and ">= 1" in train["--train-samples"]
    assert ">= 1" in bench["--threads"] and ">= 1" in bench["--batch-sizes"]


def test_the_summary_says_when_the_flops_budget_bound_a_count_budget(capsys):
    """--sparsity 0.1 --flops 0.3 prunes 70% with magnitude: the summary says the MACs budget bound."""
    assets = Path(prunekit.__file__).parent / "assets"
    base = ["prune", "--model", "mlpnet", "--checkpoint", str(assets / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(assets / "mnist"), "--train-samples", "64"]
    assert main([*base, "--sparsity", "0.1", "--flops", "0.3"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  sparsity"))
    assert line.startswith("  sparsity   70.00%") and line.endswith(
        "; the flops budget bound: the weight budget allowed 10.00%"), line
    assert main([*base, "--sparsity", "0.8", "--flops", "0.3"]) == 0       # the sparsity bound: said as before
    assert "bound" not in capsys.readouterr().out


def test_the_summary_says_when_the_params_budget_bound_the_sparsity_budget(capsys):
    """--sparsity 0.1 --params 0.05 prunes 95% (MLPNet has no biases): the summary says the params budget bound."""
    assets = Path(prunekit.__file__).parent / "assets"
    base = ["prune", "--model", "mlpnet", "--checkpoint", str(assets / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(assets / "mnist"), "--train-samples", "64"]
    assert main([*base, "--sparsity", "0.1", "--params", "0.05"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  sparsity"))
    assert line.startswith("  sparsity   95.00%") and line.endswith(
        "; the params budget bound: the sparsity budget allowed 10.00%"), line
    assert main([*base, "--sparsity", "0.9", "--params", "0.5"]) == 0       # the sparsity bound: nothing said
    assert "bound" not in capsys.readouterr().out


def test_the_summary_says_when_the_checkpoint_was_already_sparser_than_asked(capsys, tmp_path):
    """--sparsity 0.3 on a 50%-sparse checkpoint gives 50%: the summary says the zeros were there before
    (the record's dense_sparsity); a dense checkpoint says nothing of it."""
    assets = Path(prunekit.__file__).parent / "assets"
    base = ["prune", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(assets / "mnist"),
            "--train-samples", "64"]
    assert main([*base, "--checkpoint", str(assets / "mlpnet.safetensors"), "--sparsity", "0.5",
                 "--out", str(tmp_path / "half")]) == 0
    assert "already had" not in capsys.readouterr().out
    assert main([*base, "--checkpoint", str(tmp_path / "half" / "model.safetensors"), "--sparsity", "0.3"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  sparsity"))
    assert line == ("  sparsity   50.00% (16,180 prunable weights kept); the model loaded already had 50.00% of its "
                    "prunable weights at zero, more than the 30.00% asked"), line
    assert main([*base, "--checkpoint", str(tmp_path / "half" / "model.safetensors"), "--sparsity", "0.3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense_sparsity"] == 0.5


def test_magnitude_on_a_folder_without_training_images_needs_them_only_for_batchnorm(capsys, tmp_path):
    """`prune --method magnitude` reads the training split only to re-estimate BatchNorm: a model
    without BatchNorm prunes from a test-only folder; one with BatchNorm is refused before any work,
    naming --no-bn-recalibration too (Python's data=None warns instead, as it has no folder to fix)."""
    import shutil
    test_only = tmp_path / "mnist"
    test_only.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(ASSETS / "mnist" / name, test_only / name)
    (tmp_path / "bn.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                    "nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), "
                                    "nn.Linear(4 * 26 * 26, 10))\n")
    data = ["--data", "mnist", "--data-dir", str(test_only), "--method", "magnitude", "--sparsity", "0.5"]
    assert run_json(capsys, ["prune", *MLP, *data, "--json"])["bn_recalibrated"] is False
    bn = ["prune", "--model", f"{tmp_path / 'bn.py'}:build", "--normalize", "0.1307/0.3081", *data]
    assert main([*bn, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no mnist train files" in err and "--no-bn-recalibration" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert run_json(capsys, [*bn, "--no-bn-recalibration", "--json"])["bn_recalibrated"] is False


def test_progress_takes_the_usual_switch_words_and_refuses_others(capsys, monkeypatch):
    """PRUNEKIT_PROGRESS=yes was silently ignored (only 0 and 1 were read)."""
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "yes")
    assert main(["eval", *MLP, *MNIST]) == 0
    assert "%|" in capsys.readouterr().err
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "sometimes")
    assert main(["eval", *MLP, *MNIST]) == 2
    err = capsys.readouterr().err
    assert "PRUNEKIT_PROGRESS=sometimes is not a switch" in err and err.count("\n") == 1, err


def test_messages_name_the_fix(capsys, tmp_path):
    """A model function calling sys.exit(3) ended prunekit with exit code 3 and no word; a truncated
    checkpoint printed only the library's text; infeasible budgets printed their bounds as 0.0000."""
    (tmp_path / "exits.py").write_text("import sys\n\n\ndef build():\n    sys.exit(3)\n")
    assert main(["info", f"{tmp_path / 'exits.py'}:build", "--input-shape", "1,28,28"]) == 2
    err = capsys.readouterr().err
    assert "build() exited (sys.exit(3), exits.py line 5) instead of returning a model" in err, err
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((ASSETS / "mlpnet.safetensors").read_bytes()[:1000])
    assert main(["info", "mlpnet", "--checkpoint", str(truncated)]) == 2
    assert f"checkpoint {truncated} is damaged (it does not read as a safetensors file): save or download it again\n" \
        == capsys.readouterr().err.removeprefix("prunekit: error: ")      # (not the reader's "incomplete metadata")
    assert main(["prune", *MLP, *MNIST, "--params", "1e-9"]) == 2
    assert "(3.09e-05 to 1)" in capsys.readouterr().err
    assert main(["prune", *MLP, *MNIST, "--flops", "32361"]) == 2
    assert "ask for more than 0 and at most 1" in capsys.readouterr().err


def test_a_sweep_out_that_only_holds_the_input_in_a_folder_of_its_own_is_taken(capsys, tmp_path, monkeypatch):
    """`sweep --out .` reading ./r5's model was refused ('--out . holds the model this command
    reads'), though the sweep writes nothing in r5 (its runs go to ./METHOD_BUDGET, its report to
    ./report.md): only an input at one of the paths a run or the report writes is refused."""
    code, out, err = _cli(capsys, ["prune", *MLP, *MNIST, "--sparsity", "0.5", "--train-samples", "64",
                                   "--out", str(tmp_path / "r5"), "--json"])
    assert code == 0, err
    files = lambda: {p: p.read_bytes() for p in (tmp_path / "r5").rglob("*") if p.is_file()}    # noqa: E731
    before = files()
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, ["sweep", "--checkpoint", "r5", *MNIST, "--method", "magnitude", "--sparsity",
                                   "0.7", "--train-samples", "64", "--out", ".", "--json"])
    assert code == 0, err
    assert [r["sparsity"] for r in json.loads(out)["runs"] if r["name"] == "magnitude_sparsity-0.7"] == [0.7]
    assert (tmp_path / "magnitude_sparsity-0.7" / "model.safetensors").is_file()
    assert files() == before      # the input untouched


def _cli(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fisher_samples_above_the_training_images_follow_the_api_with_stages_auto(capsys, monkeypatch):
    """falcon++'s --stages auto picks (on this model) the thorough schedule, which reads fresh images pass
    after pass: more rows than the 2,000 training images are allowed, as prunekit.prune allows them; a
    one-pass schedule (--stages 5) is still refused before any work."""
    from prunekit.commands import prune as prune_command
    from prunekit.pipelines import fisher_methods

    def reached(*args, **kwargs):
        raise prunekit.PrunekitError("reached the run")
    monkeypatch.setattr(prune_command, "warn_if_random_weights", reached)    # after the plan and its checks
    argv = ["prune", *MLP, *MNIST, "--method", "falcon++", "--flops", "0.5", "--fisher-samples", "2500"]
    for extra in ([], ["--stages", "auto"]):
        assert main([*argv, *extra]) == 2
        assert capsys.readouterr().err.strip() == "prunekit: error: reached the run"
    assert main([*argv, "--stages", "5"]) == 2
    assert "the training data holds 2000 samples, 2500 gradient rows of one sample asked" in capsys.readouterr().err
    # the API's own check agrees: it lets the auto schedule's 2,500 rows through and refuses 5 stages'
    model = zoo.build("mlpnet")
    data = (torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(2000) % 10)
    monkeypatch.setattr(fisher_methods, "run_stages", lambda *a, **k: (_ for _ in ()).throw(
        prunekit.PrunekitError("reached the run")))
    for stages, needle in (("auto", "reached the run"), (5, "the training data holds 2000 samples")):
        with pytest.raises(prunekit.PrunekitError, match=needle):
            prunekit.prune(model, data, method="falcon++", flops=0.5, fisher_samples=2500, stages=stages)


def test_info_refuses_a_time_first_lstm_and_a_scripted_submodule_in_one_line(capsys, tmp_path, monkeypatch):
    """info counted a time-first LSTM (input (B, *--input-shape) = (1, 7, 5)) as T=1, B=7: 1,974 MACs
    where one sequence costs 1,866; a torch.jit.script submodule printed a 24-line traceback."""
    (tmp_path / "seqnets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Seq(nn.Module):\n"
        "    def __init__(self, batch_first):\n"
        "        super().__init__(); self.rnn = nn.LSTM(5, 6, batch_first=batch_first); self.fc = nn.Linear(6, 3)\n"
        "    def forward(self, x):\n"
        "        out = self.rnn(x)[0]\n"
        "        return self.fc(out[:, -1] if self.rnn.batch_first else out[-1])\n"
        "def time_first(): return Seq(False)\n"
        "def batch_first(): return Seq(True)\n"
        "class J(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.s = torch.jit.script(nn.Linear(5, 6)); self.h = nn.Linear(6, 2)\n"
        "    def forward(self, x): return self.h(self.s(x))\n"
        "def scripted(): return J()\n")
    monkeypatch.chdir(tmp_path)
    for name, needles in (("time_first", ("module 'rnn' (LSTM, batch_first=False) takes its input (T, B, ...)",
                                          "one time step", "batch_first=True")),
                          ("scripted", ("submodule 's' is a TorchScript module", "before scripting"))):
        assert main(["info", f"seqnets.py:{name}", "--input-shape", "7,5"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("prunekit: error: ") and "\n" not in err
        assert all(needle in err for needle in needles), err
    assert main(["info", "seqnets.py:batch_first", "--input-shape", "7,5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == 7 * 4 * 6 * (5 + 6) + 6 * 3      # 1,866 by hand
