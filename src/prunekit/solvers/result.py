"""What every weight-space solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Solution:
    """A sparse weight vector and how it was found.

    w:            (p,) the new weights; pruned entries are exactly 0.
    objective:    the solver's objective at ``w`` (for CHITA and WoodFisher: the quadratic
                  model Q(w) of :class:`~prunekit.solvers.quadratic.QuadraticModel`).
    support_size: number of nonzeros of ``w``.
    iterations:   main-loop iterations (IHT steps, pruning rounds, ...).
    seconds:      wall-clock time of the solve.
    info:         solver-specific counters (line searches, active-set rounds, ...).
    """

    w: torch.Tensor
    objective: float
    support_size: int
    iterations: int
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        """(p,) bool, True where the weight is kept (nonzero)."""
        return self.w != 0
