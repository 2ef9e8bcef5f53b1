"""The fingerprint of the code a Python run is given (``prunekit.callables``), issue s52: what the
run writes into its loss (``self.calls += 1``, a global counter) is its output, not its input, so
the same call again in the same process is not refused, while a setting the run did not write is
still compared (a); imports in a function's body are followed to the user's modules (b); a loss
holding a deep model (a distillation teacher), a logger or a sentinel object is hashed, not left
unchecked (c)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.callables import fingerprint
from prunekit.errors import PrunekitWarning


def _prune(out, **kwargs):
    """prunekit.prune of a fresh (16 -> 12 -> 3) classifier on X (256, 16), Y (256,) into ``out``:
    (result, the PrunekitWarnings said, then its notes)."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x[:, :3].argmax(1)
    net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    logger, notes = logging.getLogger("prunekit"), _Notes()
    level = logger.level
    logger.addHandler(notes)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            result = prunekit.prune(net, (x, y), **{"method": "magnitude", "sparsity": 0.7, "out": str(out),
                                                    **kwargs})
    finally:
        logger.removeHandler(notes)
        logger.setLevel(level)
    return result, [str(w.message) for w in said if issubclass(w.category, PrunekitWarning)] + notes.said


class _Notes(logging.Handler):
    """The notes (``errors.note``: a finished run given back) the ``prunekit`` logger says while installed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.said = []

    def emit(self, record):
        self.said.append(record.getMessage())


class _Counting(nn.Module):
    """Cross-entropy times ``scale`` that counts its calls, keeps its last value and logs each
    value into a list of its own (what the run writes), over outputs (B, 3) and labels (B,)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.calls = 0
        self.history = []
        self.stats = {"seen": 0}

    def forward(self, out, y):
        value = self.scale * nn.functional.cross_entropy(out, y)
        self.calls += 1
        self.last = value.item()
        self.history.append(self.last)
        self.stats["seen"] += int(y.shape[0])
        return value


def test_a_loss_writing_into_its_own_attributes_is_the_same_loss_run_again(tmp_path):
    loss = _Counting()
    first, _ = _prune(tmp_path / "run", loss=loss)
    assert loss.calls > 0
    for again in (loss, _Counting()):       # the same object run again, or a new one: the stored result
        result, said = _prune(tmp_path / "run", loss=again)
        assert result.record == first.record and len(said) == 1 and "given back" in said[0], said
    written = json.loads((tmp_path / "run" / "code-written.json").read_text())["loss_fingerprint"]["written"]
    assert written == ["calls", "history", "last", "stats.seen"], written
    loss.scale = 2.0                        # a setting the run did not write: another loss
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run, made with another loss= "
                                                     r"\(loss-fingerprint differs"):
        _prune(tmp_path / "run", loss=loss)
    loss.stats["other"] = 1                 # a key the run did not write, in a dict it writes into
    loss.scale = 1.0
    with pytest.raises(prunekit.PrunekitError, match=r"another loss="):
        _prune(tmp_path / "run", loss=loss)
    del loss.stats["other"]                 # (each call ran it: its counters moved past where a run left them)
    with pytest.raises(prunekit.PrunekitError, match=r"its attribute calls, which its run writes"):
        _prune(tmp_path / "run", loss=loss)
    _, said = _prune(tmp_path / "run", loss=_Counting())      # made afresh: the same loss
    assert len(said) == 1 and "given back" in said[0], said
    _prune(tmp_path / "smooth", loss=nn.CrossEntropyLoss())       # nothing written: no file, settings compared
    assert not (tmp_path / "smooth" / "code-written.json").exists()
    with pytest.raises(prunekit.PrunekitError, match=r"another loss="):
        _prune(tmp_path / "smooth", loss=nn.CrossEntropyLoss(label_smoothing=0.5))
    _, said = _prune(tmp_path / "run", loss=loss, force=True)      # run anew: its own record
    assert not any("given back" in s for s in said) and (tmp_path / "run" / "code-written.json").is_file()


_CALLS = 0
_SCALE = 1.0


def _counting_loss(out, y):
    global _CALLS
    _CALLS += 1
    return _SCALE * nn.functional.cross_entropy(out, y)


def _closure_loss():
    seen = 0

    def loss(out, y):
        nonlocal seen
        seen += 1
        return nn.functional.cross_entropy(out, y)
    return loss


def test_a_function_counting_its_calls_in_a_global_or_closure_is_the_same_run_again(tmp_path):
    global _SCALE
    _prune(tmp_path / "global", loss=_counting_loss)
    _, said = _prune(tmp_path / "global", loss=_counting_loss)
    assert len(said) == 1 and "given back" in said[0], said
    _SCALE = 3.0                            # a global it reads and did not write: another loss
    try:
        with pytest.raises(prunekit.PrunekitError, match=r"another loss="):
            _prune(tmp_path / "global", loss=_counting_loss)
    finally:
        _SCALE = 1.0
    loss = _closure_loss()
    _prune(tmp_path / "closure", loss=loss)
    _, said = _prune(tmp_path / "closure", loss=loss)
    assert len(said) == 1 and "given back" in said[0], said
    assert json.loads((tmp_path / "closure" / "code-written.json").read_text())["loss_fingerprint"]["written"] \
        == ["closure:seen"]


def test_written_by_run_keeps_the_deepest_slot_and_what_came_or_went():
    from prunekit.callables import slots, written_by_run
    before = {"calls": "1", "stats": "a", "stats.n": "x", "stats.m": "y", "scale": "s", "gone": "g", "gone.k": "k"}
    after = {"calls": "2", "stats": "b", "stats.n": "z", "stats.m": "y", "scale": "s", "new": "n", "new.k": "k"}
    assert written_by_run(before, after) == ["calls", "gone", "new", "stats.n"]
    assert written_by_run(before, before) == []
    loss = _Counting()
    start = slots(loss)
    assert start is not None and {"scale", "calls", "history", "stats.seen", "_modules"} <= start.keys(), start
    loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    written = written_by_run(start, slots(loss))
    assert written == ["calls", "history", "last", "stats.seen"], written
    left_out = fingerprint(loss, skip=written)[0]
    assert left_out is not None and left_out != fingerprint(loss)[0]
    assert fingerprint(_Counting(), skip=written)[0] == left_out       # the run's writes: left out
    assert fingerprint(_Counting(scale=2.0), skip=written)[0] != left_out


def _write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def _forget(*names):
    for name in names:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def test_imports_in_a_function_body_are_followed_to_the_users_module(tmp_path, monkeypatch):
    """``def loss(o, y): import mylosses; return mylosses.f(o, y)`` (or ``from mylosses import f``,
    or ``from .losses import f`` in a package): an edit of mylosses.f is another loss; a module not
    imported yet when the fingerprint is taken gives the digest it gives once imported."""
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    names = ("pk_s52_losses", "pk_s52_pkg", "pk_s52_pkg.losses", "pk_s52_pkg.api")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)       # each edit read from its source
    space = {}
    exec(textwrap.dedent("""
        def plain(out, y):
            import pk_s52_losses
            return pk_s52_losses.f(out, y)

        def named(out, y):
            from pk_s52_losses import f
            return f(out, y)

        def packaged(out, y):
            from pk_s52_pkg.api import g
            return g(out, y)
    """), space)
    seen = []
    for scale in ("1.0", "2.0", "1.0"):
        _write(tmp_path / "lib" / "pk_s52_losses.py", f"""
            import torch.nn.functional as F
            def f(out, y):
                return {scale} * F.cross_entropy(out, y)
        """)
        _write(tmp_path / "lib" / "pk_s52_pkg" / "__init__.py", "")
        _write(tmp_path / "lib" / "pk_s52_pkg" / "losses.py", f"""
            import torch.nn.functional as F
            def h(out, y):
                return {scale} * F.cross_entropy(out, y)
        """)
        _write(tmp_path / "lib" / "pk_s52_pkg" / "api.py", """
            def g(out, y):
                from .losses import h
                return h(out, y)
        """)
        _forget(*names)
        unloaded = [fingerprint(space[name])[0] for name in ("plain", "named", "packaged")]
        loaded = [fingerprint(space[name])[0] for name in ("plain", "named", "packaged")]
        assert None not in unloaded and unloaded == loaded, (unloaded, loaded)
        seen.append(loaded)
        if len(seen) == 1:
            _prune(tmp_path / "run", loss=space["plain"])
        elif scale == "2.0":
            with pytest.raises(prunekit.PrunekitError, match=r"another loss="):
                _prune(tmp_path / "run", loss=space["plain"])
    try:
        for k in range(3):
            assert seen[0][k] != seen[1][k] and seen[0][k] == seen[2][k], k
        _, said = _prune(tmp_path / "run", loss=space["plain"])
        assert len(said) == 1 and "given back" in said[0], said
    finally:
        _forget(*names)


def _deep(levels):
    """nn.Sequential nested ``levels`` deep around one Linear(3, 3): a teacher as deep as a BERT's
    LayerNorm is (Distill > Bert > BertModel > encoder > ModuleList > layer > attention > ...)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 3)
    for _ in range(levels):
        net = nn.Sequential(net)
    return net


class _Distill(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, out, y):
        return nn.functional.cross_entropy(out, y)


_LOG = logging.getLogger("pk_s52_test")
_MISSING = object()


def _logging_loss(out, y, weight=_MISSING):
    _LOG.debug("loss of %s", tuple(out.shape))
    return nn.functional.cross_entropy(out, y)


def test_a_loss_holding_a_teacher_nested_deeper_than_functions_may_is_hashed():
    teacher = _deep(12)
    one, why = fingerprint(_Distill(teacher))
    assert one is not None, why
    assert fingerprint(_Distill(_deep(12)))[0] == one
    with torch.no_grad():
        teacher[0][0][0][0][0][0][0][0][0][0][0][0].weight[0, 0] += 1.0
    assert fingerprint(_Distill(teacher))[0] != one


def test_a_loss_using_a_logger_and_a_sentinel_is_hashed():
    digest, why = fingerprint(_logging_loss)
    assert digest is not None, why
    _LOG.addHandler(logging.NullHandler())     # where it writes: not the loss
    try:
        assert fingerprint(_logging_loss)[0] == digest
    finally:
        _LOG.handlers.clear()


class _Stopping(nn.Module):
    """Cross-entropy that counts its calls and raises KeyboardInterrupt (Ctrl-C) at call ``stop_at``."""

    def __init__(self, stop_at):
        super().__init__()
        self.calls = 0
        self.stop_at = stop_at

    def forward(self, out, y):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("stop_at", [6, 20])
def test_a_run_stopped_by_ctrl_c_is_carried_on_by_the_same_call_in_the_same_process(tmp_path, stop_at):
    """Call 6 falls after the folder is claimed, before metrics.json (the dense model's evaluation;
    its config.toml, in a Python run's spelling, makes it a run folder), call 20 after a checkpoint:
    the loss counted its calls meanwhile, which is the run's output, not another loss."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x[:, :3].argmax(1)
    loss = _Stopping(stop_at)
    kwargs = {"method": "magnitude", "sparsity": 0.7, "gradual": True, "eval_data": (x, y), "loss": loss}
    with pytest.raises(KeyboardInterrupt):
        _prune(tmp_path / "run", **kwargs)
    assert loss.calls == stop_at and (tmp_path / "run" / "config.toml").is_file()
    result, said = _prune(tmp_path / "run", **kwargs)
    assert result.sparsity == pytest.approx(0.7, abs=0.05) and not any("given back" in s for s in said), said
    assert (tmp_path / "run" / "metrics.json").is_file()


# --- round 2 (issue s52): a written dict's settings, torch.compile, random streams, what differs, cost ---

_OPTS = {"smoothing": 0.0}


def _opts_loss(out, y):
    _OPTS.setdefault("calls", 0)                # writes into the dict (a count) ...
    _OPTS["calls"] += 1
    return nn.functional.cross_entropy(out, y, label_smoothing=_OPTS["smoothing"])     # ... and reads a setting


def test_a_global_dict_written_and_read_is_compared_by_the_keys_the_run_did_not_write(tmp_path):
    """The walker's repro 2: ``opts.setdefault('calls', 0)`` made ``opts`` a log hashed by its type
    only, and ``opts['smoothing']`` 0.0 -> 0.5 got the stale result back."""
    first, _ = _prune(tmp_path / "run", loss=_opts_loss)
    again, said = _prune(tmp_path / "run", loss=_opts_loss)      # the count grew: the run's own writing
    assert again.record == first.record and len(said) == 1 and "given back" in said[0], said
    _OPTS["smoothing"] = 0.5
    try:
        with pytest.raises(prunekit.PrunekitError,
                           match=r"another loss= \(loss-fingerprint differs in global _OPTS\['smoothing'\]\)"):
            _prune(tmp_path / "run", loss=_opts_loss)
    finally:
        _OPTS["smoothing"] = 0.0


def test_torch_compiled_code_is_hashed_by_what_it_compiles():
    """The walker's repro 5: a torch.compile'd function or module was left unchecked with torch's
    internals named, and a changed compiled function's stale result given back."""
    def first(out, y):
        return nn.functional.cross_entropy(out, y)

    def changed(out, y):
        return 10 * nn.functional.cross_entropy(out, y, label_smoothing=0.5)
    a, why = fingerprint(torch.compile(first, backend="eager"))
    assert a is not None, why
    assert fingerprint(torch.compile(first, backend="eager"))[0] == a
    assert fingerprint(torch.compile(changed, backend="eager"))[0] not in (a, None)
    plain = fingerprint(torch.compile(nn.CrossEntropyLoss(), backend="eager"))
    smooth = fingerprint(torch.compile(nn.CrossEntropyLoss(label_smoothing=0.2), backend="eager"))
    assert plain[0] is not None and smooth[0] not in (plain[0], None), (plain, smooth)


def test_a_random_generator_the_code_reads_is_hashed_by_its_state():
    import random

    import numpy as np
    for make in (lambda seed: torch.Generator().manual_seed(seed), lambda seed: np.random.default_rng(seed),
                 lambda seed: np.random.RandomState(seed), lambda seed: random.Random(seed)):
        gens = [make(0), make(0), make(1)]
        digests = [fingerprint(lambda out, y, g=g: nn.functional.cross_entropy(out, y) * 0 + hash(g))[0]
                   for g in gens]
        assert None not in digests and digests[0] == digests[1] != digests[2], (make, digests)


class _Scaled(nn.Module):
    """Cross-entropy times ``scale`` over outputs (B, 3) and labels (B,), and a (3,) ``bias`` buffer."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0
        self.register_buffer("bias", torch.zeros(3))

    def forward(self, out, y):
        return self.scale * nn.functional.cross_entropy(out + self.bias, y)


def _defined(source: str):
    """The function ``loss`` defined by ``source`` (a module-level name: run folders record it)."""
    space = {"nn": nn}
    exec(textwrap.dedent(source), space)
    return space["loss"]


def test_a_refusal_names_a_changed_code_and_a_docstring_added_is_the_same_loss(tmp_path):
    """The walker's repro 7: a refusal said only "its code or state is not the one"; a docstring
    added and ``nn.CrossEntropyLoss().eval()`` (no torch.nn loss reads ``training``) were refused."""
    plain = _defined("def loss(out, y):\n    return nn.functional.cross_entropy(out, y)\n")
    documented = _defined('def loss(out, y):\n    "mean cross-entropy (B,)"\n    return nn.functional.cross_entropy(out, y)\n')
    doubled = _defined("def loss(out, y):\n    return 2 * nn.functional.cross_entropy(out, y)\n")
    first, _ = _prune(tmp_path / "fn", loss=plain)
    again, said = _prune(tmp_path / "fn", loss=documented)
    assert again.record == first.record and len(said) == 1 and "given back" in said[0], said
    with pytest.raises(prunekit.PrunekitError, match=r"another loss= \(loss-fingerprint differs in its code\)"):
        _prune(tmp_path / "fn", loss=doubled)


def test_a_torch_loss_switched_to_eval_is_the_same_loss(tmp_path):
    """No torch.nn loss reads ``self.training``: ``nn.CrossEntropyLoss().eval()`` is the same loss."""
    _prune(tmp_path / "ce", loss=nn.CrossEntropyLoss())
    _, said = _prune(tmp_path / "ce", loss=nn.CrossEntropyLoss().eval())
    assert len(said) == 1 and "given back" in said[0], said


def test_a_refusal_names_the_attributes_that_differ_and_a_users_training_flag(tmp_path):
    mine = _Scaled()
    _prune(tmp_path / "mod", loss=mine)
    mine.scale, mine.note, mine.extra = 2.0, "tried on Monday", 1
    with torch.no_grad():
        mine.bias += 1
    with pytest.raises(prunekit.PrunekitError) as refused:
        _prune(tmp_path / "mod", loss=mine)
    assert "loss-fingerprint differs in its attribute bias, its attribute extra, its attribute note, 1 more place)" \
        in str(refused.value), refused.value
    record = tmp_path / "mod" / "code-slots.json"
    kept = record.read_text()
    damaged = json.loads(kept)
    damaged["loss_fingerprint"].update(slots={"scale": 5}, keys=7)
    record.write_text(json.dumps(damaged))              # a damaged record: the refusal names nothing, never a crash
    with pytest.raises(prunekit.PrunekitError, match=r"another loss= \(loss-fingerprint differs: its code or state"):
        _prune(tmp_path / "mod", loss=mine)
    record.write_text(kept)
    mine.scale, mine.bias = 1.0, torch.zeros(3)
    del mine.note, mine.extra
    mine.eval()                             # a user's module may read self.training: compared, and named
    with pytest.raises(prunekit.PrunekitError, match=r"differs in its training flag \(\.train\(\)/\.eval\(\)\)"):
        _prune(tmp_path / "mod", loss=mine)
    mine.train()
    _, said = _prune(tmp_path / "mod", loss=mine)
    assert len(said) == 1 and "given back" in said[0], said
    assert json.loads((tmp_path / "mod" / "code-slots.json").read_text())["loss_fingerprint"]["slots"]
    _prune(tmp_path / "mod", loss=mine, force=True)     # cleared with the run's other files, then written anew
    assert (tmp_path / "mod" / "code-slots.json").is_file()


def test_an_unchanged_tensor_is_hashed_once_in_a_call(monkeypatch):
    """A distillation teacher of 200 MB was read three times a call (before, in the config,
    after): its digest is kept while its storage, version, shape, dtype and strides are the same."""
    from prunekit import callables, runs
    read = []
    real = runs.tensors_sha256
    monkeypatch.setattr(runs, "tensors_sha256", lambda named: read.append(1) or real(named))
    teacher = nn.Linear(64, 64)
    callables.forget_tensors()
    first = fingerprint(teacher)[0]
    assert len(read) == 2                   # weight and bias
    assert fingerprint(teacher)[0] == first and callables.slots(teacher) and len(read) == 2
    with torch.no_grad():
        teacher.weight.mul_(2)              # in place: its version counts it
    assert fingerprint(teacher)[0] != first and len(read) == 3
    teacher.weight = nn.Parameter(teacher.weight.detach().clone())    # another tensor, the same values
    assert len(read) == 3 and fingerprint(teacher)[0] != first and len(read) == 4
    callables.forget_tensors()              # a new call reads it again
    fingerprint(teacher)
    assert len(read) == 6


# --- review s52 rev1a: a written slot compared at its start (d), imports never executed (e), writes
# through .data (f), written_by_run in O(n log n) (g), dotted keys (h), refusal wording (i) ---

class _Annealed(nn.Module):
    """A loss that reads and writes ``self.t`` (annealed each call)."""
    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, out, y):
        value = nn.functional.cross_entropy(out / self.t, y)
        self.t *= 0.999
        return value


class _Noisy(nn.Module):
    """A loss drawing noise from its own generator (its state: written and read)."""
    def __init__(self, seed):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, out, y):
        return nn.functional.cross_entropy(out + torch.randn(out.shape, generator=self.g), y)


def test_a_slot_the_run_writes_and_reads_is_compared_at_its_start(tmp_path):
    """(d) ``Annealed(1.0)`` run, then ``Annealed(50.0)`` into the same folder: another loss, refused
    naming ``t`` (it was given the t=1 result); a fresh ``Annealed(1.0)`` gets the stored result, as
    does that object as the call left it (the cell run again); called on since (t moved past where
    the run left it), it is refused naming t and the fix. So for a generator."""
    _prune(tmp_path / "run", loss=_Annealed(1.0))
    with pytest.raises(prunekit.PrunekitError, match=r"another loss=.*its attribute t, which its run writes"):
        _prune(tmp_path / "run", loss=_Annealed(50.0))
    saved = json.loads((tmp_path / "run" / "code-written.json").read_text())["loss_fingerprint"]
    assert saved["written"] == ["t"] and set(saved["start"]) == {"t"}, saved
    reused = _Annealed(1.0)
    _, said = _prune(tmp_path / "run", loss=reused)
    assert len(said) == 1 and "given back" in said[0], said
    _, said = _prune(tmp_path / "run", loss=reused)     # as the last call left it
    assert len(said) == 1 and "given back" in said[0], said
    reused(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))       # called on since
    with pytest.raises(prunekit.PrunekitError, match=r"its attribute t, .*a fresh object, or force=True"):
        _prune(tmp_path / "run", loss=reused)
    now = json.loads((tmp_path / "run" / "code-written.json").read_text())["loss_fingerprint"]
    assert now["start"] == saved["start"], (now, saved)       # the first start, never a later call's
    _prune(tmp_path / "gen", loss=_Noisy(0))
    with pytest.raises(prunekit.PrunekitError, match=r"another loss=.*its attribute g"):
        _prune(tmp_path / "gen", loss=_Noisy(12345))
    _, said = _prune(tmp_path / "gen", loss=_Noisy(0))
    assert len(said) == 1 and "given back" in said[0], said


def test_an_import_in_a_function_body_is_never_executed(tmp_path, monkeypatch):
    """(e) ``if w.is_cuda: import gpu_only`` (a branch not taken here): the fingerprint neither runs
    the module (its side effect) nor fails on it (no "unchecked"); the module is hashed by its
    source's bytes, so an edit of it is another digest."""
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    marker = tmp_path / "ran.txt"
    names = ("pk_s52_gpu_only", "pk_s52_lazypkg", "pk_s52_lazypkg.sub")
    space = {}
    exec(textwrap.dedent("""
        def importance(name, w):
            if w.is_cuda:
                import pk_s52_gpu_only
                from pk_s52_lazypkg.sub import h
                return pk_s52_gpu_only.score(w) + h(w)
            return w.abs()
    """), space)
    seen = []
    try:
        for scale in ("1", "2"):
            _write(tmp_path / "lib" / "pk_s52_gpu_only.py", f"""
                import pathlib
                pathlib.Path({str(marker)!r}).write_text("ran")
                raise RuntimeError("needs CUDA")
                def score(w):
                    return {scale} * w.abs()
            """)
            _write(tmp_path / "lib" / "pk_s52_lazypkg" / "__init__.py", f"""
                import pathlib
                pathlib.Path({str(marker)!r}).write_text("package ran")
            """)
            _write(tmp_path / "lib" / "pk_s52_lazypkg" / "sub.py", f"""
                def h(w):
                    return {scale} * w
            """)
            _forget(*names)
            seen.append(fingerprint(space["importance"]))
            assert not marker.exists() and not any(name in sys.modules for name in names)
        assert seen[0][0] is not None and seen[1][0] is not None and seen[0][0] != seen[1][0], seen
        _, said = _prune(tmp_path / "run", method="magnitude", importance=space["importance"])
        assert not any("could not be checked" in s for s in said) and not marker.exists(), said
    finally:
        _forget(*names)


class _Ema(nn.Module):
    """A loss keeping a running mean in a buffer it writes through ``.data`` (no version bump)."""
    def __init__(self):
        super().__init__()
        self.register_buffer("ema", torch.zeros(()))

    def forward(self, out, y):
        value = nn.functional.cross_entropy(out, y)
        self.ema.data.mul_(0.9).add_(0.1 * value.detach())
        return value


def test_a_write_through_data_is_seen(tmp_path):
    """(f) ``self.ema.data.mul_(0.9)`` bumps no tensor version: the run's write is still recorded
    (code-written.json names the buffer), and the object called on since is refused naming it."""
    loss = _Ema()
    _prune(tmp_path / "run", loss=loss)
    saved = json.loads((tmp_path / "run" / "code-written.json").read_text())["loss_fingerprint"]
    assert saved["written"] == ["_buffers.ema"], saved
    _, said = _prune(tmp_path / "run", loss=_Ema())
    assert len(said) == 1 and "given back" in said[0], said
    loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(prunekit.PrunekitError, match=r"ema, which its run writes"):
        _prune(tmp_path / "run", loss=loss)


def test_written_by_run_is_not_quadratic():
    """(g) 20,000 keys a run added and changed: written_by_run in well under a second (it took
    minutes comparing every changed slot with every other)."""
    import time
    from prunekit.callables import written_by_run
    n = 20_000
    before = {"global:C": "x", **{f"global:C.k{i}": "a" for i in range(n)}}
    after = {"global:C": "y", **{f"global:C.k{i}": "b" for i in range(n)}, "global:D": "n",
             **{f"global:D.k{i}": "d" for i in range(n)}}
    start = time.perf_counter()
    found = written_by_run(before, after)
    assert time.perf_counter() - start < 2.0
    assert found == sorted([f"global:C.k{i}" for i in range(n)] + ["global:D"])


def test_a_dotted_dict_key_is_its_own_slot():
    """(h) a per-layer counter ``CFG['layer1.0']`` the run writes and a nested setting
    ``CFG['layer1']['0']`` it reads are two places: with the counter left out, the setting changed
    is another digest; the refusal names ``CFG['layer1.0']``."""
    from prunekit.callables import describe, slot_record, slots, written_by_run
    space = {}
    exec(textwrap.dedent("""
        import torch.nn.functional as F
        CFG = {"layer1": {"0": 1.0}, "layer1.0": 0}
        def loss(out, y):
            CFG["layer1.0"] += 1
            return CFG["layer1"]["0"] * F.cross_entropy(out, y)
    """), space)
    before = slots(space["loss"])
    space["loss"](torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    written = written_by_run(before, slots(space["loss"]))
    assert len(written) == 1, written
    first = fingerprint(space["loss"], skip=written)[0]
    space["CFG"]["layer1"]["0"] = 5.0
    assert fingerprint(space["loss"], skip=written)[0] != first
    assert describe(written[0], slot_record(space["loss"])["keys"]) == "global CFG['layer1.0']"


SCALE_S52 = 1.0


class _ScaledS52(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, out, y):
        return SCALE_S52 * nn.functional.cross_entropy(out, y)


def test_a_refusal_names_a_place_once_in_words(monkeypatch):
    """(i) a global an nn.Module's forward reads, changed: named once, in words (it was named twice,
    with raw ``closure:``/``class:`` prefixes); an own Method's edited ``run`` is named as its run
    (run and sparsify shared one namespace: nothing was named)."""
    from prunekit.callables import differing, slot_record
    before = slot_record(_ScaledS52())
    monkeypatch.setitem(globals(), "SCALE_S52", 2.0)
    assert differing(before, slot_record(_ScaledS52())) == ["global SCALE_S52 (read by its class's forward)"]
    space = {}
    exec(textwrap.dedent("""
        A = 1
        def run(ctx, o): return A
        def run2(ctx, o): return A + 1
        def sparsify(ctx, o): return 2
    """), space)
    parts = {0: "family", 1: "options class", 2: "defaults", 3: "run", 4: "sparsify"}
    one = slot_record(("channels", None, {}, space["run"], space["sparsify"]))
    two = slot_record(("channels", None, {}, space["run2"], space["sparsify"]))
    assert differing(one, two, items=parts) == ["the code of its run"]
