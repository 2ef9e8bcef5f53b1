""""Did you mean": the closest of a set of names to one mistyped."""

from __future__ import annotations

import difflib
from typing import Iterable

CUTOFF = 0.6          # difflib.get_close_matches' default: below it, no suggestion


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``word`` by difflib's similarity ratio (at least CUTOFF), a tie going
    to the fewer edits, then to the earlier choice; None when no choice is that close. (difflib's
    own ``get_close_matches`` breaks ties by reverse alphabetical order: 'resnet21' got 'resnet32'
    rather than 'resnet20'.)"""
    best, best_key = None, None
    for order, choice in enumerate(choices):
        ratio = difflib.SequenceMatcher(None, word, choice).ratio()
        if ratio < CUTOFF:
            continue
        key = (-ratio, edits(word, choice), order)
        if best_key is None or key < best_key:
            best, best_key = choice, key
    return best


def edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions turning a into b."""
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]
