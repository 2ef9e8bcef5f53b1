"""CHITA: k-sparse minimisers of the quadratic model by IHT and backsolve.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023 (arXiv 2302.14623). With Q the quadratic model of
:class:`~prunekit.solvers.quadratic.QuadraticModel` the problem is

    minimise Q(w)   subject to   ‖w‖₀ ≤ k.

:func:`chita` (below) chooses a support and backsolves on it; its parts live beside it:

* :mod:`~prunekit.solvers.backsolve`: the exact minimiser of Q on a fixed support;
* :mod:`~prunekit.solvers.iht`: iterative hard thresholding with CHITA's step sizes and active set;
* :mod:`~prunekit.solvers.swap_search`: swaps weights in and out of a support while the backsolve
  objective drops, each swap scored exactly from a few columns of X.

Solver variants: "backsolve" (magnitude support) and "iht" (IHT, then swap search).
Vectors are (p,) tensors; nothing of size p×p is ever formed.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import PrunekitError
from .backsolve import backsolve_blockwise, backsolve_with_parts
from .iht import iht
from .quadratic import QuadraticModel, check_k
from .result import Solution
from .swap_search import swap_search_from

VARIANTS = ("iht", "backsolve")


def chita(q: QuadraticModel, k: int, variant: str = "iht", *, block_size: int | None = None,
          swap_rounds: int = 10, swap_candidates: int = 256, **iht_options) -> Solution:
    """A k-sparse w for the quadratic model, by CHITA.

    variant="backsolve": keep the k largest |w̄| and backsolve on them.
    variant="iht":       run :func:`~prunekit.solvers.iht.iht` from w̄ (``iht_options`` go
                        there), then backsolve on its support ("IHT + backsolve" in the
                        paper). Then :func:`~prunekit.solvers.swap_search.swap_search`: from
                        the better of the magnitude and IHT supports, then from the other, then
                        kicks, in ``swap_rounds`` rounds in all (0: no search), each scoring
                        ``swap_candidates``² swaps. The best solution seen is returned, so it is
                        never worse than "backsolve" nor than IHT + backsolve. At n = 1000,
                        p ≈ 270,000 a round costs about two products with X.
    block_size:         backsolve with :func:`~prunekit.solvers.backsolve.backsolve_blockwise`
                        (for very large p); the swap search still scores supports by the exact backsolve, and its support is
                        kept only if its blockwise backsolve is better.
    """
    start = time.perf_counter()
    if variant not in VARIANTS:
        raise PrunekitError(f"unknown CHITA variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    k = check_k(k)
    if block_size is not None and q.sliced_vectors:
        raise PrunekitError("block_size needs every column of X on one process")
    full = q
    q = q.sliced()            # every (p,) vector below is this process's slice (all of it for one)

    def solve_on(support: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        if block_size is None:
            return backsolve_with_parts(q, support)
        return backsolve_blockwise(q, support, block_size), None

    magnitude = q.top_k_mask(q.w_bar.abs(), min(k, q.p))
    w, parts = solve_on(magnitude)
    objective = q.objective(w)
    info: dict = {"variant": variant, "magnitude_objective": objective}
    iterations = 0
    if variant == "iht":
        found = iht(full, k, **iht_options)
        w_iht, parts_iht = solve_on(q.local_part(found.mask))
        objective_iht = q.objective(w_iht)
        info.update(found.info, iht_objective=found.objective, improved=objective_iht < objective)
        iterations = found.iterations
        starts = [(magnitude, parts), (q.local_part(found.mask), parts_iht)]
        if objective_iht < objective:
            w, objective = w_iht, objective_iht
            starts.reverse()
        if swap_rounds and 0 < k < q.p:
            h_diag = q.hessian_diagonal()
            if any(q.count(s) < k for s, _ in starts):                      # IHT kept fewer than k:
                gain = q.gradient(w_iht).square() / h_diag                 # fill up (never hurts)
                starts = [(q.top_k_mask(torch.where(s, math.inf, gain), k), None) for s, _ in starts]
            found = swap_search_from(q, starts, rounds=swap_rounds, candidates=swap_candidates,
                                     max_swaps=None, kicks=3, tol=1e-10, h_diag=h_diag)
            info.update(found.info)
            w_swap = found.w if block_size is None else solve_on(found.mask)[0]
            objective_swap = q.objective(w_swap)
            info["swap_objective"] = objective_swap
            if objective_swap < objective:
                w, objective = w_swap, objective_swap
    w = q.to_global(w)                         # the one exchange of p values, at the end
    return Solution(w=w, objective=objective, support_size=int((w != 0).sum()), iterations=iterations,
                    seconds=time.perf_counter() - start, info=info)

