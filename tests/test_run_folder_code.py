"""A Python run folder records a fingerprint of the code it is given (``importance=``, ``loss=``,
an own ``Method``): a rerun into the same ``out=`` with other code is refused in one line, the
same code (the same object, or the same function defined again, in this or another process) gets
the stored result, code that cannot be hashed faithfully is said once, and a finished run given
back says so (issue s51: the walker's repros 1, 2, 3 and 5)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitWarning
from prunekit.pipelines.magnitude_methods import MagnitudeOptions
from prunekit.pipelines.weights import Pruned

SRC = Path(prunekit.__file__).resolve().parents[1]


def _tiny():
    """A (256, 16) -> 3 classifier and its data: X (256, 16), Y (256,) class indices."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, :3].argmax(1)).long()
    net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    return net, x, y


class _Notes(logging.Handler):
    """The notes (``errors.note``) the ``prunekit`` logger says while installed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.said = []

    def emit(self, record):
        self.said.append(record.getMessage())


def _prune(out, **kwargs):
    """prunekit.prune of a fresh tiny net into ``out``: (result, the PrunekitWarnings said, then its
    notes: a finished run given back is a note, ``errors.note``)."""
    net, x, y = _tiny()
    logger, notes = logging.getLogger("prunekit"), _Notes()
    level = logger.level
    logger.addHandler(notes)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            result = prunekit.prune(net, (x, y), **{"method": "magnitude", "sparsity": 0.7, "eval_data": (x, y),
                                                    "out": str(out), **kwargs})
    finally:
        logger.removeHandler(notes)
        logger.setLevel(level)
    return result, [str(w.message) for w in said if issubclass(w.category, PrunekitWarning)] + notes.said


def by_size(name, w):
    return w.abs()


def smallest(name, w):
    return 1.0 / (w.abs() + 1e-3)


def test_another_importance_function_is_refused_the_same_one_gets_the_stored_result(tmp_path):
    first, _ = _prune(tmp_path / "run", importance=by_size)
    for other in (smallest, None):          # another function, or none: that run's result would be wrong
        with pytest.raises(prunekit.PrunekitError, match=r"holds another run, made with another importance= .*"
                                                         r"force=True\)$") as refused:
            _prune(tmp_path / "run", **({"importance": other} if other else {}))
        assert "\n" not in str(refused.value)
    again, said = _prune(tmp_path / "run", importance=by_size)
    assert again.record == first.record
    redefined = lambda name, w: w.abs()     # noqa: E731 - the same code, another object
    _prune(tmp_path / "lambda", importance=lambda name, w: w.abs())
    again, _ = _prune(tmp_path / "lambda", importance=redefined)
    with pytest.raises(prunekit.PrunekitError, match="another importance="):
        _prune(tmp_path / "lambda", importance=lambda name, w: w.abs() ** 2)
    assert "importance-fingerprint = " in (tmp_path / "run" / "config.toml").read_text()


def test_a_loss_of_the_same_class_with_other_settings_is_refused(tmp_path):
    _prune(tmp_path / "run", loss=nn.CrossEntropyLoss())
    again, _ = _prune(tmp_path / "run", loss=nn.CrossEntropyLoss())
    for other in (nn.CrossEntropyLoss(label_smoothing=0.5), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0]))):
        with pytest.raises(prunekit.PrunekitError, match=r"holds another run, made with another loss= "
                                                         r"\(loss-fingerprint differs"):
            _prune(tmp_path / "run", loss=other)
    with pytest.raises(prunekit.PrunekitError, match=r"another loss= \(CrossEntropyLoss, now <lambda>\)"):
        _prune(tmp_path / "run", loss=lambda o, y: nn.functional.cross_entropy(o, y))


def _v1(ctx, options):                  # keep the largest |w|
    w = ctx.space.vector().clone()
    w[torch.argsort(w.abs(), descending=True)[ctx.budget.max_nonzeros:]] = 0
    return Pruned(w)


def _v2(ctx, options):                  # version 2: keep the smallest nonzero |w| (another result)
    w = ctx.space.vector().clone()
    w[torch.argsort(w.abs())[ctx.budget.max_nonzeros:]] = 0
    return Pruned(w)


def test_an_own_method_of_the_same_name_with_another_run_function_is_refused(tmp_path):
    first, _ = _prune(tmp_path / "run", method=prunekit.Method("mine", "weights", MagnitudeOptions, _v1))
    again, _ = _prune(tmp_path / "run", method=prunekit.Method("mine", "weights", MagnitudeOptions, _v1))
    assert again.record == first.record
    with pytest.raises(prunekit.PrunekitError, match=r"another method= \('mine': its run function"):
        _prune(tmp_path / "run", method=prunekit.Method("mine", "weights", MagnitudeOptions, _v2))
    _prune(tmp_path / "builtin")
    assert 'method-fingerprint = "built-in"' in (tmp_path / "builtin" / "config.toml").read_text()


def test_a_fingerprint_is_the_same_in_another_process(tmp_path):
    """No id() or address: the same source gives the same digest under another hash seed, and
    another source (or module state) another digest."""
    script = tmp_path / "fp.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from prunekit.callables import fingerprint
        K = {"a", "b", "c"}
        def f(name, w, k=2.0):
            return w.abs() ** k if name in K else w.abs()
        g = lambda name, w: w.abs()
        h = lambda name, w: w.abs()
        assert fingerprint(g) == fingerprint(h) and fingerprint(g) != fingerprint(lambda name, w: w.abs() ** 2)
        assert fingerprint(nn.CrossEntropyLoss())[0] != fingerprint(nn.CrossEntropyLoss(label_smoothing=0.1))[0]
        print(fingerprint(f)[0], fingerprint(nn.CrossEntropyLoss(label_smoothing=0.1))[0],
              fingerprint(lambda o, y: nn.functional.mse_loss(o, y))[0])
    """))
    seen = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(SRC)})
        seen.add(done.stdout)
    assert len(seen) == 1 and "None" not in seen.pop()


class _Holder:
    """An object whose state cannot be hashed faithfully (``__slots__``, no ``vars()``)."""

    __slots__ = ("gen",)

    def __init__(self):
        self.gen = torch.Generator()

    def score(self, name, w):
        return w.abs()


def test_code_that_cannot_be_hashed_is_recorded_and_said_once_on_a_rerun(tmp_path):
    from prunekit.callables import fingerprint
    digest, why = fingerprint(_Holder().score)
    assert digest is None and "whose state cannot be read" in why, why
    _, said = _prune(tmp_path / "run", importance=_Holder().score)
    assert not any("could not be checked" in s for s in said), said
    assert 'importance-fingerprint = "unchecked: ' in (tmp_path / "run" / "config.toml").read_text()
    _, said = _prune(tmp_path / "run", importance=_Holder().score)
    told = [s for s in said if "importance=" in s]
    assert len(told) == 1 and "could not be checked" in told[0] and "force=True" in told[0], said
    assert "if that code or what it holds changed" in told[0], told
    assert len(said) == 1, said         # no second note that the result is given back


def test_an_older_folder_without_code_fingerprints_is_given_back_with_one_warning(tmp_path):
    first, _ = _prune(tmp_path / "run", importance=by_size)
    config = tmp_path / "run" / "config.toml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "-fingerprint" not in line))
    again, said = _prune(tmp_path / "run", importance=smallest)        # cannot be told apart: said
    assert again.record == first.record
    assert len(said) == 1 and "recorded no fingerprint of the code" in said[0] and "force=True" in said[0], said
    with pytest.raises(prunekit.PrunekitError, match=r"other sparsity"):   # the rest is compared as before
        _prune(tmp_path / "run", importance=by_size, sparsity=0.5)


def test_a_finished_run_given_back_says_so_once_and_names_a_reseeded_loader(tmp_path):
    _, said = _prune(tmp_path / "run")
    assert said == []                       # a run made afresh: nothing to say
    _, said = _prune(tmp_path / "run")
    assert len(said) == 1 and "holds this run, finished: its stored result is given back" in said[0], said
    assert "manual_seed" not in said[0]     # (X, Y) tensors shuffle by seed=, not torch's RNG
    net, x, y = _tiny()
    loader = lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,  # noqa: E731
                                                 shuffle=True)
    kwargs = dict(method="magnitude", sparsity=0.7, out=str(tmp_path / "loader"))
    first, second = _tiny()[0], _tiny()[0]       # (_tiny seeds torch: made before the seeds below)
    torch.manual_seed(0)
    prunekit.prune(first, loader(), **kwargs)
    torch.manual_seed(1)                        # the docstring's way to pick another shuffle: ignored here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prunekit.prune(second, loader(), **kwargs)
    said = [str(w.message) for w in caught if issubclass(w.category, PrunekitWarning)]
    assert len(said) == 1 and "given back" in said[0] and "torch.manual_seed" in said[0], said


def _user_module(monkeypatch, tmp_path, name, source):
    """Module ``name`` loaded from ``tmp_path/<name>.py`` holding ``source`` (the user's own file, as
    one next to a script is), registered in sys.modules for this test only."""
    import importlib.util
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_a_loss_reaching_the_users_module_by_attribute_is_hashed_by_that_code(tmp_path, monkeypatch):
    """``import helpers; def loss(o, y): return helpers.my_loss(o, y)``: an edit of helpers.py is
    another loss, not this run's stored result."""
    from prunekit.callables import fingerprint
    seen = []
    for scale in ("1.0", "100.0", "1.0"):
        helpers = _user_module(monkeypatch, tmp_path, "pk_test_helpers", f"""
            import torch.nn.functional as F
            log = []
            def my_loss(out, y):
                return {scale} * F.cross_entropy(out, y)
        """)
        space = {"helpers": helpers}
        exec("def loss(out, y):\n    helpers.log.append(0)\n    return helpers.my_loss(out, y)\n", space)
        seen.append(fingerprint(space["loss"])[0])
        helpers.log.append(1.0)         # a log the loss writes into: not its code
        assert fingerprint(space["loss"])[0] == seen[-1]
        if scale == "1.0" and len(seen) == 1:
            _prune(tmp_path / "run", loss=space["loss"])
        elif scale == "100.0":
            with pytest.raises(prunekit.PrunekitError, match=r"holds another run, made with another loss="):
                _prune(tmp_path / "run", loss=space["loss"])
    assert None not in seen and seen[0] != seen[1] and seen[0] == seen[2], seen
    _, said = _prune(tmp_path / "run", loss=space["loss"])          # the first code again: given back
    assert len(said) == 1 and "given back" in said[0], said


def test_a_users_module_named_as_a_standard_library_one_is_the_users_code(tmp_path, monkeypatch):
    """A local profile.py (the standard library has a profile): hashed by its code, not by name."""
    from prunekit.callables import _library, fingerprint
    seen = []
    for scale in ("100", "99"):
        mine = _user_module(monkeypatch, tmp_path, "profile", f"""
            import torch.nn.functional as F
            def my_loss(o, y):
                return {scale} * F.mse_loss(o, y)
        """)
        seen.append(fingerprint(mine.my_loss)[0])
    assert None not in seen and seen[0] != seen[1], seen
    assert not _library("profile")
    for library in ("torch", "torch.nn.functional", "numpy", "math", "os", "builtins", "prunekit.api", "torch._C._nn"):
        assert _library(library), library


class _WeightedCE(nn.Module):
    """Cross-entropy with class weights (3,) kept in a private plain attribute (a tensor or array)."""

    def __init__(self, w):
        super().__init__()
        self._w = w

    def forward(self, o, y):
        return nn.functional.cross_entropy(o, y, weight=torch.as_tensor(self._w, dtype=o.dtype))


class _Unreadable:
    def __getattribute__(self, name):
        raise KeyError(name)


def test_a_loss_with_a_private_tensor_is_hashed_and_fingerprint_never_raises(tmp_path):
    import numpy as np
    from prunekit.callables import fingerprint
    for make in (torch.tensor, np.array):
        one, why = fingerprint(_WeightedCE(make([1.0, 2.0, 1.0])))
        assert one is not None and why is None, why
        assert one == fingerprint(_WeightedCE(make([1.0, 2.0, 1.0])))[0]
        assert one != fingerprint(_WeightedCE(make([1.0, 3.0, 1.0])))[0]
    digest, why = fingerprint(_Unreadable())
    assert digest is None and "KeyError" in why, why
    _prune(tmp_path / "run", loss=_WeightedCE(torch.tensor([1.0, 2.0, 1.0])))
    with pytest.raises(prunekit.PrunekitError, match="another loss="):
        _prune(tmp_path / "run", loss=_WeightedCE(torch.tensor([1.0, 3.0, 1.0])))


_HISTORY = []
_SEEN = []
_KEEP = ["a", "b"]


def _logging_loss(out, y):
    value = nn.functional.cross_entropy(out, y)
    _HISTORY.append(value.item())
    return value


def _log_hook(module, inputs, output):
    _SEEN.append(float(output))


def _keep_loss(out, y):
    return nn.functional.cross_entropy(out, y) * len(_KEEP)


def test_a_loss_logging_into_a_global_list_is_the_same_loss_when_run_again(tmp_path):
    """A list the code writes into (``history.append``) is a log: its type is hashed, not what it
    holds; a list the code only reads is hashed by its values."""
    from prunekit.callables import fingerprint
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(_log_hook)
    first, _ = _prune(tmp_path / "run", loss=_logging_loss)
    _prune(tmp_path / "hooked", loss=hooked)
    before = fingerprint(_logging_loss)[0], fingerprint(hooked)[0]
    _logging_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))        # the logs grow as the loss runs
    hooked(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert _HISTORY and _SEEN
    assert (fingerprint(_logging_loss)[0], fingerprint(hooked)[0]) == before
    again, said = _prune(tmp_path / "run", loss=_logging_loss)
    assert again.record == first.record and len(said) == 1 and "given back" in said[0], said
    _, said = _prune(tmp_path / "hooked", loss=hooked)
    assert len(said) == 1 and "given back" in said[0], said
    read = fingerprint(_keep_loss)[0]
    _KEEP.append("c")
    try:
        assert fingerprint(_keep_loss)[0] != read
    finally:
        _KEEP.pop()


def test_a_loss_hook_is_hashed_by_its_function_not_its_handle_id():
    """Hook handles' ids count every hook made in the process: another hook registered first
    (on anything) leaves the loss's fingerprint as it was."""
    from prunekit.callables import fingerprint

    def hooked_loss():
        loss = nn.CrossEntropyLoss()
        loss.register_forward_hook(_log_hook)
        return loss

    first = fingerprint(hooked_loss())[0]
    for _ in range(3):
        nn.Linear(2, 2).register_forward_hook(lambda *a: None)
    assert first is not None and fingerprint(hooked_loss())[0] == first
    assert first != fingerprint(nn.CrossEntropyLoss())[0]
    other = nn.CrossEntropyLoss()
    other.register_forward_hook(lambda module, inputs, output: None)
    assert fingerprint(other)[0] != first
    flagged = nn.CrossEntropyLoss()
    flagged.register_forward_hook(_log_hook, always_call=True)
    assert fingerprint(flagged)[0] != first


def test_a_config_that_differs_only_in_text_gets_the_general_refusal(tmp_path):
    """Broken TOML in config.toml: no key differs, so no "made with another": the refusal of another
    run. A comment added (the same keys and values; prunekit's own comments name the functions the
    digests were taken of) is the same run: given back (issue s52)."""
    first, _ = _prune(tmp_path / "run")
    config = tmp_path / "run" / "config.toml"
    text = config.read_text()
    config.write_text("# my note\n" + text)
    again, said = _prune(tmp_path / "run")
    assert again.record == first.record and len(said) == 1 and "given back" in said[0], said
    for edited in (text + "\n[[[",):
        config.write_text(edited)
        with pytest.raises(prunekit.PrunekitError) as refused:
            _prune(tmp_path / "run")
        message = str(refused.value)
        assert "holds another run: pick another out" in message and "made with another" not in message, message
    config.write_text(text)


def _refuse_half(budget, options):
    if budget.sparsity is not None and budget.sparsity.value < 0.5:
        raise prunekit.PrunekitError("mine takes a sparsity of 0.5 or more")


def _refuse_most(budget, options):
    if budget.sparsity is not None and budget.sparsity.value < 0.9:
        raise prunekit.PrunekitError("mine takes a sparsity of 0.9 or more")


def _check_resolved(resolved, options):
    return None


def _plan_nothing(*args, **kwargs):
    return None


def test_an_own_methods_fingerprint_is_code_of_and_leaves_its_gates_out(tmp_path):
    """s53: the run folder's ``method-fingerprint`` is ``methods.code_of`` (one rule with
    add_method): family, options class, defaults, run and sparsify, as folders recorded it since
    they fingerprinted a Method (an older folder's stays valid); ``check``, ``check_budget`` and
    ``plan_memory`` are gates every call runs anew before the folder is looked at: an edited one
    that still accepts the budget gets the stored result, one that now refuses it refuses the call
    (its own words, the folder left as it was)."""
    import tomllib
    from prunekit.callables import fingerprint
    from prunekit.methods import code_of
    gated = prunekit.Method("mine", "weights", MagnitudeOptions, _v1, check_budget=_refuse_half,
                            check=_check_resolved, plan_memory=_plan_nothing)
    first, _ = _prune(tmp_path / "run", method=gated)
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["method-fingerprint"]
    assert recorded == code_of(gated)
    assert recorded == fingerprint(("weights", MagnitudeOptions, {}, _v1, None))[0]      # the form folders hold
    ungated = prunekit.Method("mine", "weights", MagnitudeOptions, _v1)
    again, said = _prune(tmp_path / "run", method=ungated)
    assert again.record == first.record and any("given back" in line for line in said), said
    model = (tmp_path / "run" / "model.safetensors").read_bytes()
    stricter = prunekit.Method("mine", "weights", MagnitudeOptions, _v1, check_budget=_refuse_most)
    with pytest.raises(prunekit.PrunekitError, match=r"^mine takes a sparsity of 0\.9 or more$"):
        _prune(tmp_path / "run", method=stricter)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == model
    with pytest.raises(prunekit.PrunekitError, match=r"another method= \('mine': its run function"):
        _prune(tmp_path / "run", method=prunekit.Method("mine", "weights", MagnitudeOptions, _v2,
                                                        check_budget=_refuse_half))
