"""A notebook cell run again (issue s52, the walker's repros 6, 8 and 9): ``add_method`` of the
same method is accepted, another one under a taken name is refused naming ``replace=True`` (or
``remove_method``), a built-in method is never replaced; a cell registering a cost again works; a
finished run given back is a note, not a warning (``python -W error`` runs it); and config.toml
says what its code digests cover and names the function each was taken of."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError, PrunekitWarning
from prunekit.methods import BUILT_IN, METHODS

SRC = Path(prunekit.__file__).resolve().parents[1]

# One cell's source, as a notebook runs it again and again (each run makes new function objects).
CELL = """
from prunekit.pipelines.magnitude_methods import MagnitudeOptions
from prunekit.pipelines.weights import Pruned
def keep_first(ctx, options):
    w = ctx.space.vector().clone()
    w[ctx.budget.max_nonzeros:] = 0
    return Pruned(w)
method = prunekit.Method("nb-keep-first", "weights", MagnitudeOptions, keep_first)
"""
EDITED = CELL.replace("w[ctx.budget.max_nonzeros:] = 0", "w[:w.numel() - ctx.budget.max_nonzeros] = 0")


def _run_cell(source: str) -> prunekit.Method:
    """The ``Method`` a cell of ``source`` defines, made anew (as a cell run again makes it)."""
    space = {"prunekit": prunekit}
    exec(compile(textwrap.dedent(source), "<ipython-input-1-cell>", "exec"), space)
    return space["method"]


@pytest.fixture
def own_table():
    """The method table as it was, back after the test (what a test adds is removed)."""
    before = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(before)


def test_a_cell_adding_its_method_runs_again_and_an_edited_one_is_replaced_only_when_asked(own_table):
    first = prunekit.add_method(_run_cell(CELL))
    again = _run_cell(CELL)
    assert again.run is not first.run
    assert prunekit.add_method(again) is again and METHODS["nb-keep-first"] is again     # the same: accepted
    edited = _run_cell(EDITED)
    with pytest.raises(PrunekitError) as refused:
        prunekit.add_method(edited)
    message = str(refused.value)
    assert "'nb-keep-first' exists already" in message and "replace=True" in message and "\n" not in message
    assert METHODS["nb-keep-first"] is again            # refused: the table left as it was
    assert prunekit.add_method(edited, replace=True) is edited and METHODS["nb-keep-first"].run is edited.run
    assert prunekit.remove_method("nb-keep-first") is edited and "nb-keep-first" not in METHODS
    prunekit.add_method(_run_cell(CELL))                # gone: its name is free again
    with pytest.raises(PrunekitError, match=r"no method 'nb-gone' of your own to remove: yours are nb-keep-first$"):
        prunekit.remove_method("nb-gone")


@pytest.mark.filterwarnings("ignore:layer .* kept no weight")  # keep-first empties the last layer
def test_the_edited_method_is_the_one_that_runs(own_table):
    x = torch.randn(64, 6)
    y = x[:, :3].argmax(1)

    def pruned(method):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        model = prunekit.prune(net, (x, y), method=method, sparsity=0.5).model
        return torch.cat([model[0].weight.detach().reshape(-1),            # the space's order
                          model[2].weight.detach().reshape(-1)])
    prunekit.add_method(_run_cell(CELL))
    first = pruned("nb-keep-first")
    prunekit.add_method(_run_cell(EDITED), replace=True)
    edited = pruned("nb-keep-first")
    assert first[first.numel() // 2:].count_nonzero() == 0 < first[:first.numel() // 2].count_nonzero()
    assert edited[:edited.numel() // 2].count_nonzero() == 0 < edited[edited.numel() // 2:].count_nonzero()


@pytest.mark.parametrize("name", sorted(BUILT_IN)[:3])
def test_a_built_in_method_is_never_replaced_nor_removed(own_table, name):
    mine = _run_cell(CELL.replace('"nb-keep-first"', repr(name)))
    for replace in (False, True):
        with pytest.raises(PrunekitError, match=re.escape(f"method {name!r} is one of prunekit's own and cannot be "
                                                          "replaced: give yours another name")):
            prunekit.add_method(mine, replace=replace)
    with pytest.raises(PrunekitError, match=r"cannot be removed$"):
        prunekit.remove_method(name)
    assert METHODS[name] is not mine and METHODS[name].run is not mine.run


def test_a_cell_registering_a_cost_runs_again_and_its_edit_is_the_one_used():
    """A cell defining a layer and its cost function, run again (a new class), then edited."""
    from prunekit.cost_trace import unregister_cost
    cell = """
        class Scale(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(5, 5))
            def forward(self, x):
                return x @ self.weight.t()
        prunekit.register_cost(Scale, lambda m, inputs, out: {"weight": 2})
        macs = prunekit.CostModel(nn.Sequential(Scale()), torch.randn(1, 5)).macs
    """
    made = []
    try:
        for source in (cell, cell, cell.replace('"weight": 2', '"weight": 3')):
            space = {"nn": nn, "torch": torch, "prunekit": prunekit}
            exec(textwrap.dedent(source), space)
            made.append((space["Scale"], space["macs"]))
    finally:
        for cls, _ in made:
            unregister_cost(cls)
    assert [macs for _, macs in made] == [2 * 25, 2 * 25, 3 * 25]


def _tiny():
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), x, x[:, :3].argmax(1)


class _Notes(logging.Handler):
    """What the ``prunekit`` logger says (its notes), while installed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.said = []

    def emit(self, record):
        self.said.append(record.getMessage())


def test_a_finished_run_given_back_is_a_note_not_a_warning(tmp_path):
    """With every warning an error (``-W error``, pytest's filterwarnings = error) the same call again
    returns the stored result; the note goes to the ``prunekit`` logger."""
    logger, notes = logging.getLogger("prunekit"), _Notes()
    net, x, y = _tiny()
    first = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))
    logger.addHandler(notes)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = prunekit.prune(_tiny()[0], (x, y), method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))
    finally:
        logger.removeHandler(notes)
        logger.setLevel(level)
    assert again.record == first.record
    assert len(notes.said) == 1 and "holds this run, finished: its stored result is given back" in notes.said[0]


def test_under_w_error_a_script_rerun_prints_the_note_on_stderr(tmp_path):
    """A script without logging set up: the note is one ``prunekit: note:`` line on stderr, and a
    ``setLevel(logging.WARNING)`` on the ``prunekit`` logger silences it."""
    script = tmp_path / "rerun.py"
    script.write_text(textwrap.dedent(f"""
        import logging, sys, torch, torch.nn as nn, prunekit
        torch.manual_seed(0); x = torch.randn(64, 6); y = x[:, :3].argmax(1)
        for quiet in (False, False, True):
            if quiet:
                logging.getLogger("prunekit").setLevel(logging.WARNING)
            print("call", file=sys.stderr)
            torch.manual_seed(1)
            prunekit.prune(nn.Sequential(nn.Linear(6, 3)), (x, y), sparsity=0.5, out={str(tmp_path / 'run')!r})
    """))
    done = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    calls = done.stderr.split("call\n")[1:]
    assert len(calls) == 3, done.stderr[-2000:]
    assert calls[0].strip() == "" and calls[2].strip() == "", done.stderr[-2000:]
    assert calls[1].startswith("prunekit: note: ") and "holds this run, finished" in calls[1], calls[1]
    assert len(calls[1].strip().splitlines()) == 1


def row_scaled(name, w):
    return w.abs() * w.abs().mean(1, keepdim=True)


def test_config_says_what_its_code_digests_cover_and_names_each_function(tmp_path):
    net, x, y = _tiny()
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    first = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, importance=row_scaled, loss=loss,
                           out=str(tmp_path / "run"))
    text = (tmp_path / "run" / "config.toml").read_text()
    lines = {line.split(" = ")[0]: line for line in text.splitlines()}
    assert lines["importance-fingerprint"].endswith("  # row_scaled: the function's code"), text
    assert lines["loss-fingerprint"].endswith("  # CrossEntropyLoss: its class and state"), text
    assert "# *-fingerprint: a SHA-256 of the code given" in text and "not names, files or line numbers" in text
    parsed = tomllib.loads(text)            # comments only: the values are the digests, as before
    assert len(parsed["importance-fingerprint"]) == 64 and parsed["method-fingerprint"] == "built-in"
    # the same code under another name: the same run, given back without a warning
    space = {}
    exec("def renamed(name, w):\n    return w.abs() * w.abs().mean(1, keepdim=True)\n", space)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        again = prunekit.prune(_tiny()[0], (x, y), method="magnitude", sparsity=0.5, importance=space["renamed"],
                               loss=loss, out=str(tmp_path / "run"))
    assert again.record == first.record
    assert not [w for w in said if issubclass(w.category, PrunekitWarning)], [str(w.message) for w in said]
    assert (tmp_path / "run" / "config.toml").read_text() == text          # the record is the run's, kept


def test_a_config_written_without_the_comments_is_the_same_run(tmp_path):
    """A folder of the version before the comments (the same keys and values): given back, no warning."""
    net, x, y = _tiny()
    first = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, importance=row_scaled,
                           out=str(tmp_path / "run"))
    config = tmp_path / "run" / "config.toml"
    bare = "".join(line.split("  # ")[0] + "\n" for line in config.read_text().splitlines() if not line.startswith("#"))
    config.write_text(bare)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        again = prunekit.prune(_tiny()[0], (x, y), method="magnitude", sparsity=0.5, importance=row_scaled,
                               out=str(tmp_path / "run"))
    assert again.record == first.record
    assert not [w for w in said if issubclass(w.category, PrunekitWarning)], [str(w.message) for w in said]


@pytest.mark.filterwarnings("ignore:layer .* kept no weight")  # keep-first empties the last layer
def test_an_own_method_digest_is_named_by_the_method(tmp_path, own_table):
    net, x, y = _tiny()
    prunekit.prune(net, (x, y), method=_run_cell(CELL), sparsity=0.5, out=str(tmp_path / "run"))
    line = next(line for line in (tmp_path / "run" / "config.toml").read_text().splitlines()
                if line.startswith("method-fingerprint"))
    assert line.endswith("  # nb-keep-first: an own Method's family, options class, defaults, run and sparsify"), line


# ---- review s52 part B: the Method's fields, add_method / remove_method, a method by name, temporaries

def _keep(ctx, options):
    from prunekit.pipelines.weights import Pruned
    w = ctx.space.vector().clone()
    w[ctx.budget.max_nonzeros:] = 0
    return Pruned(w)


def _plan(*args, **kwargs):
    return 0


def _refuse_all(budget, options):
    raise PrunekitError("no budget will do")


def test_a_method_built_positionally_means_what_it_did():
    """(name, family, options, run, about, defaults, check, plan_memory, sparsify) by position, as
    before check_budget was added: plan_memory is plan_memory; check_budget is keyword-only."""
    from prunekit.pipelines.magnitude_methods import MagnitudeOptions
    m = prunekit.Method("pos", "weights", MagnitudeOptions, _keep, "about", {}, None, _plan, None)
    assert m.plan_memory is _plan and m.check_budget is None and m.sparsify is None
    with pytest.raises(TypeError):
        prunekit.Method("pos", "weights", MagnitudeOptions, _keep, "about", {}, None, _plan, None, _refuse_all)
    assert prunekit.Method("pos", "weights", MagnitudeOptions, _keep, check_budget=_refuse_all).check_budget \
        is _refuse_all


def test_remove_method_takes_the_method_it_was_given_or_its_name(own_table):
    from prunekit.pipelines.magnitude_methods import MagnitudeOptions
    m = prunekit.add_method(prunekit.Method("rm-obj", "weights", MagnitudeOptions, _keep))
    assert prunekit.remove_method(m) is m and "rm-obj" not in METHODS
    with pytest.raises(PrunekitError, match="remove_method takes a method's name or its prunekit.Method, got int"):
        prunekit.remove_method(123)
    with pytest.raises(PrunekitError, match="cannot be removed"):
        prunekit.remove_method(METHODS["magnitude"])


@pytest.mark.parametrize("make", [lambda v: np.full(3, v), lambda v: torch.full((3,), float(v))],
                         ids=["ndarray", "tensor"])
def test_a_method_whose_defaults_hold_an_array_is_added_again_and_another_refused(make, own_table):
    from prunekit.pipelines.magnitude_methods import MagnitudeOptions
    prunekit.add_method(prunekit.Method("arr", "weights", MagnitudeOptions, _keep, defaults={"w": make(1)}))
    again = prunekit.Method("arr", "weights", MagnitudeOptions, _keep, defaults={"w": make(1)})
    assert prunekit.add_method(again) is again and METHODS["arr"] is again
    other = prunekit.Method("arr", "weights", MagnitudeOptions, _keep, defaults={"w": make(2)})
    with pytest.raises(PrunekitError, match="exists already and this is another one .*replace=True"):
        prunekit.add_method(other)
    assert METHODS["arr"] is again


def _accept_all(budget, options):
    return None


def test_an_edited_gate_is_the_same_method_and_a_reworded_about_too(own_table):
    """s53: ``check``, ``check_budget`` and ``plan_memory`` only accept or refuse (run anew at every
    call), so add_method follows the run folder's rule (``methods.result_parts``): a cell run again
    with an edited gate is the same method, the table keeping the new one; another ``run`` or
    ``sparsify`` is another method (refused without replace=True)."""
    from prunekit.methods import code_of
    from prunekit.pipelines.magnitude_methods import MagnitudeOptions
    first = prunekit.add_method(prunekit.Method("cb", "weights", MagnitudeOptions, _keep, "keeps the first weights"))
    for gate in ({"check_budget": _refuse_all}, {"check": _refuse_all}, {"plan_memory": _plan},
                 {"check_budget": _accept_all, "check": _accept_all, "plan_memory": _plan}):
        gated = prunekit.Method("cb", "weights", MagnitudeOptions, _keep, "keeps the first weights", **gate)
        assert code_of(gated) == code_of(first)
        assert prunekit.add_method(gated) is gated and METHODS["cb"] is gated       # the new gate is the one kept
    reworded = prunekit.Method("cb", "weights", MagnitudeOptions, _keep, "keeps the first weights (typo fixed)")
    assert prunekit.add_method(reworded) is reworded and METHODS["cb"].about == "keeps the first weights (typo fixed)"
    other = prunekit.Method("cb", "weights", MagnitudeOptions, _counting(), "keeps the first weights")
    with pytest.raises(PrunekitError, match="exists already and this is another one .*replace=True"):
        prunekit.add_method(other)
    assert METHODS["cb"] is reworded
    assert prunekit.add_method(other, replace=True) is other


def _counting():
    """A run function that counts its calls in its closure (what it runs changes as it runs)."""
    calls = 0

    def keep_counted(ctx, options):
        nonlocal calls
        calls += 1
        return _keep(ctx, options)
    return keep_counted


@pytest.mark.filterwarnings("ignore:layer .* kept no weight")  # keep-first empties the last layer
def test_an_own_method_passed_by_name_is_given_back_on_the_same_call_again(tmp_path, own_table):
    from prunekit.pipelines.magnitude_methods import MagnitudeOptions
    prunekit.add_method(prunekit.Method("cnt-name", "weights", MagnitudeOptions, _counting()))
    net, x, y = _tiny()
    first = prunekit.prune(net, (x, y), method="cnt-name", sparsity=0.5, out=str(tmp_path / "run"))
    assert (tmp_path / "run" / "code-written.json").exists()
    again = prunekit.prune(_tiny()[0], (x, y), method="cnt-name", sparsity=0.5, out=str(tmp_path / "run"))
    assert again.record == first.record


@pytest.mark.parametrize("name", ["code-slots.json", "code-written.json", "data-rng.json"])
def test_a_killed_write_of_a_code_record_leaves_a_temporary_force_removes(name, tmp_path):
    from prunekit import runs
    net, x, y = _tiny()
    prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, importance=row_scaled, out=str(tmp_path / "run"))
    temporary = tmp_path / "run" / f".{name}.abcd1234.tmp"
    temporary.write_text("{")
    mine = tmp_path / "run" / ".notes.abcd1234.tmp"            # a file of the user's: not prunekit's
    mine.write_text("mine")
    assert runs.stale_temporaries(tmp_path / "run") == [temporary]
    prunekit.prune(_tiny()[0], (x, y), method="magnitude", sparsity=0.5, importance=row_scaled,
                   out=str(tmp_path / "run"), force=True)
    assert not temporary.exists() and mine.read_text() == "mine"
