"""Recipes: every prune option can live in TOML, flags override, bad keys and types are refused."""

import json
import re
import tomllib
from pathlib import Path

import pytest

import prunekit
from prunekit import recipes
from prunekit.cli import build_parser_for, main

ASSETS = Path(prunekit.__file__).parent / "assets"
RECIPE = f"""
model = "mlpnet"
checkpoint = "{ASSETS / 'mlpnet.safetensors'}"
data = "mnist"
data-dir = "{ASSETS / 'mnist'}"
train_samples = 256
method = "chita++"
stages = 2
sparsity = 0.9
fisher-samples = 64
solver = "backsolve"
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_recipe_runs_flags_override_and_config_is_saved(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--recipe", write(tmp_path, RECIPE), "--sparsity", "0.8", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "chita++" and len(record["stages"]) == 2
    assert record["sparsity"] == pytest.approx(0.8, abs=1e-4)          # the flag won over the recipe's 0.9
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["sparsity"] == "0.8" and config["fisher-samples"] == 64 and config["stages"] == 2
    assert config["train-samples"] == 256 and Path(config["data-dir"]).is_absolute()
    # The saved config is itself a recipe giving the same run.
    assert main(["prune", "--recipe", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nonzeros"] == record["nonzeros"]


def test_every_prune_option_is_a_recipe_key_and_nothing_else():
    parser = build_parser_for("prune")
    keys = set(recipes.schema(parser))
    flags = {a.dest for a in parser._actions if a.option_strings} - recipes.NOT_IN_RECIPES
    assert keys == flags and {"fisher_samples", "sparsity", "exclude", "no_bn_recalibration"} <= keys


@pytest.mark.parametrize("line,message", [
    ("fisher_sample = 10", "unknown key 'fisher_sample'.*did you mean 'fisher_samples'"),
    ("sparsity = 0.5\nepochs = 3", "unknown key 'epochs'.*did you mean 'final-epochs'"),   # hyphens: as saved
    ("data-dir = \"x\"\nepochs = 3", "did you mean 'final-epochs'"),
    ("fisher_samples = 5\nepochs = 3", "did you mean 'final_epochs'"),     # the recipe's own underscores
    ("stages = 2.5", "key 'stages'.*integer"),
    ("stages = \"3\"", "key 'stages'.*integer"),
    ("ridge = \"big\"", "key 'ridge'.*number"),
    ("revive = 1", "key 'revive'.*true or false"),
    ("fisher-samples = 10\nfisher_samples = 20", "key 'fisher_samples'.*given twice"),
    ("flops = [0.3, 0.2]", "key 'flops'.*one value here: a sweep takes lists"),
    ("schedule = \"cubic\"", "key 'schedule'.*one of poly"),
    ("model = true", "key 'model'.*string"),
    ("json = true", "key 'json' can't be in a recipe"),
])
def test_bad_keys_and_types_are_refused_by_name(tmp_path, capsys, line, message):
    assert main(["prune", "--recipe", write(tmp_path, line + "\n")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error:") and err.count("\n") == 1
    assert re.search(message, err), err


def test_broken_or_missing_recipe(tmp_path, capsys):
    assert main(["prune", "--recipe", write(tmp_path, "model = [")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["prune", "--recipe", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dump_reads_back_to_the_same_values():
    parser = build_parser_for("prune")
    values = {"model": "mlpnet", "sparsity": "90%", "stages": 3, "ridge": 1e-4, "revive": True,
              "exclude": [], "include": ["fc*", 'we"ird'], "out": None}
    back = recipes.validate(tomllib.loads(recipes.dump_recipe(values)), parser)
    assert back == {k: v for k, v in values.items() if v is not None}


def test_a_device_in_a_recipe_or_a_run_folder_is_read_as_the_flag_is(tmp_path, capsys):
    """``device`` is an option like the others: a recipe may name it, and the config.toml of a run
    made with --device resumes. Before, both were refused ("key 'device' has a type recipes do
    not handle"), so no --device run could be resumed."""
    parser = build_parser_for("prune")
    assert recipes.load_recipe(write(tmp_path, 'device = "cpu"\n'), parser) == {"device": "cpu"}
    with pytest.raises(prunekit.PrunekitError, match=r"key 'device' in .*run.toml: 'tpu!' is not a torch device"):
        recipes.load_recipe(write(tmp_path, 'device = "tpu!"\n'), parser)
    out = tmp_path / "run"
    flags = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
             "--data-dir", str(ASSETS / "mnist"), "--method", "magnitude", "--sparsity", "0.5"]
    assert main(["prune", *flags, "--device", "cpu", "--out", str(out), "--json"]) == 0
    assert 'device = "cpu"' in (out / "config.toml").read_text()
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--json"]) == 0, capsys.readouterr().err


def test_one_value_where_a_list_is_taken_is_a_list_of_one():
    """exclude = "fc3" in a prune recipe, method = "falcon" in a sweep's (both were refused as not a list)."""
    assert recipes.validate({"exclude": "fc3"}, build_parser_for("prune"))["exclude"] == ["fc3"]
    assert recipes.validate({"method": "falcon"}, build_parser_for("sweep"))["method"] == ["falcon"]


@pytest.mark.parametrize("text,needle", [
    ('resume = "runs/a"\n', "key 'resume' can't be in a recipe"),
    ('recipe = "other.toml"\n', "key 'recipe' can't be in a recipe"),
    ("[extra]\na = 1\n", "has a table [extra]: a recipe holds flat keys"),
])
def test_recipe_keys_that_cannot_be_in_one_are_said_so(tmp_path, capsys, text, needle):
    """resume and recipe were met with "did you mean 'resize'?", a table [extra] with 'beta'."""
    recipe = write(tmp_path, f'model = "mlpnet"\nsparsity = 0.5\n{text}')
    assert main(["prune", "--recipe", recipe]) == 2
    err = capsys.readouterr().err
    assert needle in err and "did you mean" not in err and err.count("\n") == 1, err
