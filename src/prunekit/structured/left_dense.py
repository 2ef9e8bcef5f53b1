"""What a user is told of the groups left dense (``GroupSet.skipped``: (root, reason)): their causes,
which are by design and which unexpected, counts and lists in words, and the refusal of a model
without a prunable group."""

from __future__ import annotations

from ..errors import PrunekitError
from ..options import OptionError


# What left a group dense, from its reason in GroupSet.skipped: the first cause whose words it holds.
_CAUSES = (("output", "reaches the network's output", ("reaches the network output",)),
           ("residual", "is a residual stream kept at full width",
            ("residual stream", "zero-pad (option-A) shortcut", "a single head")),
           ("resize", "touches a layer or parameter that channel surgery cannot resize",
            ("cannot resize", "touches parameter", "outside a known layer", "do not shrink", "attention heads kept")),
           ("multiplier", "feeds a depthwise conv with a channel multiplier (one channel per conv group)",
            ("channel multiplier",)),
           ("gqa", "is in grouped-query attention (k/v heads shared between q heads, as Llama's), which the "
                   "channel methods do not prune", ("grouped-query attention",)),
           ("cycle", "has a channel trace that goes round a cycle without end (e.g. a layer's output added to a "
                     "copy of itself with its channel halves swapped, as a rotate-half does)", ("round a cycle",)),
           ("map", "passes an operation the dependency analysis cannot map", ("",)))
_EXPECTED = ("output", "residual")       # left dense by design: no reason to warn


def _cause(why: str) -> tuple[str, str]:
    return next((kind, text) for kind, text, words in _CAUSES if any(w in why for w in words))


def listed_skips(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    """The first ``shown`` of ``skipped`` as "root: why", then how many more."""
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return "; ".join(f"{root}: {why}" for root, why in skipped[:shown]) + more


def unexpected_skips(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The groups of ``skipped`` left dense for a reason a user may not expect (a layer or parameter
    channel surgery cannot resize, an operation the analysis cannot map), not by design (the
    network output, a residual stream kept at full width)."""
    return [(root, why) for root, why in skipped if _cause(why)[0] not in _EXPECTED]


def is_whole_layer(why: str) -> bool:
    """Whether a reason in ``GroupSet.skipped`` names a whole layer the channel methods do not shrink
    (a recurrent layer, an embedding: ``_unshrunk_layer_reason``, "LSTM: the channel methods do not
    shrink ..."), not a channel group rooted at a traced layer."""
    kind, sep, rest = why.partition(": ")
    return bool(sep) and kind.isidentifier() and rest.startswith("the channel methods do not shrink ")


def left_dense_count(skipped: list[tuple[str, str]]) -> str:
    """How many of ``skipped`` are whole layers and how many channel groups, in words: "2 layers and
    1 channel group", "1 layer", "3 channel groups"."""
    layers = sum(is_whole_layer(why) for _, why in skipped)
    groups = len(skipped) - layers
    parts = ([f"{layers} layer{'s' if layers > 1 else ''}"] if layers else []) + \
            ([f"{groups} channel group{'s' if groups > 1 else ''}"] if groups else [])
    return " and ".join(parts)


def dense_groups_text(skipped: list[tuple[str, str]]) -> str:
    """", N channel groups left dense among them (root: why; ... and N more)" for a refusal of a budget
    below the channel floor ("" if none): those a user may not expect first (a GroupNorm, a layer
    channel surgery cannot resize), then those dense by design. Recurrent layers and embeddings
    among them are counted as layers ("2 layers and 1 channel group", ``left_dense_count``)."""
    if not skipped:
        return ""
    unexpected = unexpected_skips(skipped)
    ordered = unexpected + [s for s in skipped if s not in unexpected]
    return f", {left_dense_count(ordered)} left dense among them ({listed_skips(ordered)})"


def dense_groups_warning(skipped: list[tuple[str, str]]) -> str | None:
    """What a user is told of the groups (and whole layers: ``left_dense_count``) left dense that they
    may expect pruned; None if none."""
    unexpected = unexpected_skips(skipped)
    if not unexpected:
        return None
    return (f"{left_dense_count(unexpected)} left dense (the budget is met "
            f"from the others): {listed_skips(unexpected)} (skipped_groups in the record lists every one left dense)")


def no_group_error(skipped: list[tuple[str, str]]) -> PrunekitError:
    """The refusal of a model without a prunable group: the causes that apply, the first reasons in
    ``skipped`` (those of groups reaching the output only if nothing else applies), and the fix."""
    first: dict[str, str] = {}
    for root, why in skipped:       # one entry per layer: the first reason given for it
        first.setdefault(root, why)
    skipped = list(first.items())
    causes = list(dict.fromkeys(_cause(why)[1] for _, why in skipped))
    listed = [(root, why) for root, why in skipped if _cause(why)[0] != "output"] or skipped
    why = (f"every coupled channel set {' or '.join(causes)} ({listed_skips(listed)})" if causes else
           "structured pruning needs Conv/Linear layers with channels feeding other layers")
    return OptionError(f"the model has no prunable channel group: {why}; prune its weights instead, e.g. "
                       "method falcon", ("method",))
