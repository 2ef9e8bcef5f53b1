"""Budget schedules for multi-stage pruning (CHITA++, FALCON++, gradual pruning).

A schedule gives, for stages t = 1..T, the share of the *dense* quantity still kept
(weights or MACs), going from near 1 down to exactly the target at t = T.
"""

from __future__ import annotations

import math

from ..errors import PrunekitError

KINDS = ("poly", "exp", "linear", "const")


def keep_schedule(target_keep: float, stages: int, kind: str = "poly", start_keep: float = 0.9) -> list[float]:
    """Kept shares for each stage, ending at ``target_keep``.

    poly:   keep_t = target + (start − target)·(1 − t/T)³   (Zhu & Gupta's cubic; CHITA++'s default)
    exp:    keep_t = start·(target/start)^(t/T)             (the same factor every stage)
    linear: keep_t = start + (target − start)·t/T
    const:  keep_t = target for every stage (repeat the full prune T times)

    ``start_keep`` is the share kept before stage 1 (0.9 = the "base 0.1" sparsity of the papers);
    it is clipped to be at least the target.
    """
    if kind not in KINDS:
        raise PrunekitError(f"unknown schedule {kind!r}: choose one of {', '.join(KINDS)}")
    if stages < 1:
        raise PrunekitError(f"stages must be at least 1, got {stages}")
    start = max(start_keep, target_keep)
    shares = []
    for t in range(1, stages + 1):
        frac = t / stages
        if kind == "poly":
            shares.append(target_keep + (start - target_keep) * (1 - frac) ** 3)
        elif kind == "exp":
            shares.append(start * math.exp(frac * math.log(target_keep / start)))
        elif kind == "linear":
            shares.append(start + (target_keep - start) * frac)
        else:
            shares.append(target_keep)
    shares[-1] = target_keep
    return shares
