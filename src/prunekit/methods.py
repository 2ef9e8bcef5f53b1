"""Every pruning method, in one table: its name, family, options and the function that runs it.

Family ``"weights"``: the method zeroes single weights; it runs one-shot (or in its own stages,
``stages=``), or gradually with fine-tuning between prune events (``gradual=True``).
``run(ctx: pipelines.weights.PruneContext, options) -> pipelines.weights.Pruned``.

Family ``"channels"``: the method removes whole channels to a MAC budget (``flops``) and returns
smaller models. ``run(ctx: structured.family.ChannelContext, options) -> structured.family.Cut``.
One whose options class says ``takes_params = True`` also takes a params budget
(``ctx.max_params``: all the parameters the result keeps): autobot's cut meets both
(``ctx.params_budget()``), the hybrid's weights phase meets it with zeros; the others refuse ``params``.

A channel method may have a second phase, ``sparsify(ctx, model, share, options, recalibrate_bn)``
(the hybrid's FALCON on the shrunk model; see ``structured.pipeline``).

``check(resolved_budget, options)`` (optional) refuses a request the method cannot serve before
any work; ``plan_memory(model, space, example_input, resolved_budget, options, data_to_load=0)`` (optional)
refuses one whose estimated peak memory does not fit and returns its ``memory_plan.MemoryPlan``
(``data_to_load``: bytes of data still to decode that the run will hold, counted as held; a
plan_memory without that parameter, the earlier form, still works: prunekit adds those bytes to
the resident set of the ``MemoryPlan`` it returns and refuses it when it no longer fits; one that
names a ``data_samples=None`` parameter is also told the samples one pass of the training data
holds, and then checks per-sample rows past them itself, as the built-in one does: its refusal
names no more rows than the data holds);
``defaults`` are the method's own defaults over its options class's.

Add your own method with ``add_method(Method(...))`` (or pass a ``Method`` as ``method=`` to
``prunekit.prune``; the same method added again is accepted, another under its name needs
``replace=True``, ``remove_method(name)`` takes it out); for a new importance score only, pass ``importance=`` to a magnitude
method (see ``pipelines.magnitude_methods``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import PrunekitError
from .suggest import closest
from .pipelines.fisher_methods import needs_flops, plan_memory, run_chita, run_falcon, run_woodfisher
from .pipelines.fisher_options import ChitaOptions, FalconOptions, WoodFisherOptions
from .pipelines.magnitude_methods import (MagnitudeFlopsOptions, MagnitudeOptions, run_magnitude, run_magnitude_flops,
                                          run_magnitude_uniform)
from .structured.autobot import AutoBotOptions, run_autobot
from .structured.hybrid import HybridOptions, run_hybrid, sparsify_shrunk
from .structured.taper import TaperOptions, run_taper

FAMILIES = ("weights", "channels")


@dataclass(frozen=True)
class Method:
    """One row of the table. ``options``: an ``options.Options`` dataclass (its fields are the
    method's options, its ``constraints`` their rules). ``check_budget(budget, options)``: refuses
    a request from the budget as asked (``budget.Budget``: sparsity, flops, params, None where not
    given) and the checked options, before the model is traced (FALCON without flops: at once, not
    after seconds of tracing); ``check(resolved, options)``: from the budget resolved against the
    model (``budget.ResolvedBudget``: counts and MACs), after the trace."""

    name: str
    family: str
    options: type
    run: Callable
    about: str = ""
    defaults: dict = field(default_factory=dict)
    check: Callable | None = None        # check(resolved budget, options), after the model is traced
    plan_memory: Callable | None = None
    sparsify: Callable | None = None     # channels family: a second phase pruning single weights
    # added after the fields above and keyword-only, so that a Method built positionally
    # (name, family, options, run, about, defaults, check, plan_memory, sparsify) means what it did
    check_budget: Callable | None = field(default=None, kw_only=True)  # check_budget(budget as asked, options): before the trace

    def __post_init__(self) -> None:
        """Refuse a row that cannot run, naming the field (a method of your own is built here)."""
        from .options import Options
        if not isinstance(self.name, str) or not self.name.strip():
            raise PrunekitError(f"Method name must be a non-empty string, got {self.name!r}")
        if self.family not in FAMILIES:
            raise PrunekitError(f"Method {self.name!r}: family must be one of {', '.join(FAMILIES)}, "
                                f"got {self.family!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise PrunekitError(f"Method {self.name!r}: options must be an Options dataclass (a class deriving "
                                f"from prunekit.options.Options), got {self.options!r}")
        if not callable(self.run):
            raise PrunekitError(f"Method {self.name!r}: run must be a function run(ctx, options), "
                                f"got {type(self.run).__name__}")


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("magnitude", "weights", MagnitudeOptions, run_magnitude, "largest |w| over all layers"),
    Method("magnitude-uniform", "weights", MagnitudeOptions, run_magnitude_uniform, "largest |w|, same share per layer"),
    Method("magnitude-flops", "weights", MagnitudeFlopsOptions, run_magnitude_flops,
           "most w² under the count and the MAC budget (ILP)"),
    Method("chita", "weights", ChitaOptions, run_chita, "L0-constrained least squares on a low-rank Fisher",
           plan_memory=plan_memory("chita")),
    Method("chita++", "weights", ChitaOptions, run_chita, "CHITA over a schedule of stages", {"stages": 15},
           plan_memory=plan_memory("chita")),
    Method("woodfisher", "weights", WoodFisherOptions, run_woodfisher, "OBS with a block-diagonal inverse Fisher",
           plan_memory=plan_memory("woodfisher")),
    Method("falcon", "weights", FalconOptions, run_falcon, "CHITA's model under a count and a MAC budget",
           check_budget=needs_flops, plan_memory=plan_memory("falcon")),
    Method("falcon++", "weights", FalconOptions, run_falcon, "FALCON over a schedule of stages",
           {"stages": "auto", "fisher_samples": 500}, check_budget=needs_flops, plan_memory=plan_memory("falcon")),
    # AutoBot's weights stay frozen while its gates train: its fine-tune (and the hybrid's, whose
    # channel phase is AutoBot) gains most from the dense model's outputs (ResNet-56: +1.2 points at
    # 50% MACs, +2.7 at 30%, +3.8 at 20% over three seeds; hybrid +1.9 / +3.2 at 20 / 10%; docs/benchmarks.md)
    Method("autobot", "channels", AutoBotOptions, run_autobot, "trainable bottlenecks on a frozen network",
           {"finetune_distill": 0.9}),
    Method("taper", "channels", TaperOptions, run_taper, "gates and weights trained as the MAC budget tapers"),
    Method("hybrid", "channels", HybridOptions, run_hybrid,
           "channels removed (AutoBot) to structured_flops, then FALCON on the rest to flops",
           {"finetune_distill": 0.9}, sparsify=sparsify_shrunk),
]}


BUILT_IN = frozenset(METHODS)      # the table as shipped; add_method's rows are the user's own


def method_names(family: str | None = None) -> list[str]:
    return [name for name, m in METHODS.items() if family is None or m.family == family]


def lookup(method: str | Method) -> Method:
    """The table's row for ``method`` (a name, or a ``Method`` of your own, used as it is)."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        close = closest(str(method), METHODS)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise PrunekitError(f"unknown method {method!r}{hint}: choose one of {', '.join(METHODS)}")
    return METHODS[method]


def add_method(method: Method, replace: bool = False) -> Method:
    """Add your own method to the table (then ``prunekit.prune(..., method=name)`` and the CLI's
    ``--method`` know it). Refuses an unknown family, and a name already taken by another method:
    adding the same method again (a notebook cell run twice: the same family, options class, defaults,
    ``run`` and ``sparsify`` code, ``code_of``) is accepted, the table then holding this one (a
    reworded ``about`` is only text, an edited ``check``, ``check_budget`` or ``plan_memory`` only a
    gate, run anew at every call: the new one is kept; ``result_parts``); another one under that name
    is refused unless ``replace=True`` (or ``remove_method(name)`` first). A built-in method is never
    replaced."""
    if not isinstance(method, Method):
        raise PrunekitError(f"add_method takes a prunekit.Method (Method(name, family, options, run)), "
                            f"got {type(method).__name__}")
    if method.family not in FAMILIES:
        raise PrunekitError(f"method family must be one of {', '.join(FAMILIES)}, got {method.family!r}")
    if method.name in BUILT_IN:
        raise PrunekitError(f"method {method.name!r} is one of prunekit's own and cannot be replaced: "
                            "give yours another name")
    before = METHODS.get(method.name)
    if before is not None and not replace and before is not method:
        # compared by code_of only: ``before != method`` compares defaults with ==, which raises for
        # an array or a tensor in them, and tells nothing of code defined again from the same source
        now, then = code_of(method), code_of(before)
        if now is None or now != then:
            why = ("its code could not be fingerprinted to tell whether it is the same" if now is None or then is None
                   else "its code, options or defaults differ")
            raise PrunekitError(f"method {method.name!r} exists already and this is another one ({why}): "
                                f"pass replace=True to add_method to replace it, or pick another name")
    METHODS[method.name] = method
    return method


def remove_method(name: str | Method) -> Method:
    """Remove your own method ``name`` (its name, or the ``Method`` that ``add_method`` took) from the
    table (returned); refuses a built-in method and a name the table does not hold."""
    if isinstance(name, Method):
        name = name.name
    if not isinstance(name, str):
        raise PrunekitError(f"remove_method takes a method's name or its prunekit.Method, got {type(name).__name__}")
    if name in BUILT_IN:
        raise PrunekitError(f"method {name!r} is one of prunekit's own and cannot be removed")
    if name not in METHODS:
        own = [n for n in METHODS if n not in BUILT_IN]
        raise PrunekitError(f"no method {name!r} of your own to remove: "
                            + (f"yours are {', '.join(own)}" if own else "add_method added none"))
    return METHODS.pop(name)


def result_parts(method: Method) -> tuple:
    """What in ``method`` decides a result: its family, options class, defaults, ``run`` and
    ``sparsify``. This is the method's identity, in one rule for ``add_method`` (``code_of``) and
    for a run folder's ``method-fingerprint`` (``api._code_objects``). Not its name, nor ``about``
    (text only), nor its gates ``check``, ``check_budget`` and ``plan_memory``: they only accept or
    refuse a request, never change what an accepted one computes, and every call runs them anew
    before a run folder is looked at (``request.PruneRequest.plan``), so an edited gate refuses what
    it now refuses, run folder or not, and a run it still accepts is the same run (a folder is given
    back or carried on). Kept as the tuple run folders have hashed since they fingerprinted a
    Method: their ``method-fingerprint`` stays valid."""
    return (method.family, method.options, method.defaults, method.run, method.sparsify)


def code_of(method: Method) -> str | None:
    """A SHA-256 (``callables.fingerprint``) of ``result_parts(method)``: its family, options class,
    defaults, ``run`` and ``sparsify`` (not its name, ``about``, nor the gates ``check``,
    ``check_budget`` and ``plan_memory``); the same for a method defined again from the same
    source, and the hash a run folder records as ``method-fingerprint`` for it. None when that
    cannot be hashed faithfully."""
    from .callables import fingerprint
    return fingerprint(result_parts(method))[0]
