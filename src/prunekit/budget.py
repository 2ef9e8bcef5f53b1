"""Budgets: what the user asks for, and its resolution into integers against a cost model.

Conventions (the papers'):

* ``sparsity``: share of the prunable weights set to zero (0.9 keeps 10%), or an absolute
  number of prunable weights to *keep* ("50k").
* ``flops``: share of the dense model's MACs the pruned model may keep (0.3 keeps at most
  30%), or an absolute number of MACs per example to keep ("20M").
* ``params``: share of all parameters kept (prunable nonzeros plus the rest), or an absolute
  count ("200k").

Values are fractions (0.9), percents ("90%") or counts with an optional k/M/G suffix.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from dataclasses import dataclass

from .costs import CostModel, padding_rows, padding_zeros
from .options import OptionError
from .params import ParamSpace

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_NUMBER = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([kmg%]?)\s*$", re.IGNORECASE)

# What each budget means as a share and the range it must lie in: the one notation every
# message uses ([ includes the end, ( excludes it).
SHARE_RANGE = {"sparsity": "[0, 1)", "flops": "(0, 1]", "params": "(0, 1]"}
SHARE_MEANING = {"sparsity": "the share of prunable weights removed", "flops": "the share of dense MACs kept",
                 "params": "the share of all parameters kept"}
COUNT_MEANING = {"sparsity": "prunable weights kept", "flops": "MACs kept", "params": "parameters kept"}


def budget_text(budget: dict) -> str:
    """A request's budget as words, e.g. ``{"sparsity": "0.9", "flops": None}`` -> "sparsity 0.9"."""
    return ", ".join(f"{key} {value}" for key, value in budget.items() if value is not None) or "none"


def _range_hint(what: str) -> str:
    """'as a share (0.9 or 90%), the share of ... must be in [0, 1); as a count (50k), the number
    of ... must be a positive whole number'."""
    example = {"sparsity": "0.9 or 90%", "flops": "0.3 or 30%", "params": "0.1 or 10%"}[what]
    count = {"sparsity": "50k", "flops": "20M", "params": "200k"}[what]
    return (f"as a share ({example}), {SHARE_MEANING[what]} must be in {SHARE_RANGE[what]}; as a count "
            f"({count}), the number of {COUNT_MEANING[what]} must be a positive whole number")


@dataclass(frozen=True)
class Amount:
    """A parsed budget value: a share in [0, 1] or an absolute count."""

    value: float
    absolute: bool

    @classmethod
    def parse(cls, text: str | float | int, what: str) -> "Amount":
        if isinstance(text, (int, float)):
            text = repr(text)
        if any(not c.isascii() and c.isnumeric() for c in str(text)):    # (as the command line's numbers)
            raise OptionError(f"{what} {text!r}: write the number with the digits 0-9", (what,))
        match = _NUMBER.match(str(text))
        if not match:
            raise OptionError(f"{what} {text!r} is not a number: write a fraction (0.9), a "
                                f"percent (90%) or a count (50k, 20M)", (what,))
        number, suffix = Decimal(match.group(1)), match.group(2).lower()
        if not math.isfinite(float(number * _SUFFIX[suffix] if suffix != "%" else number)):
            raise OptionError(f"{what} {text!r} is not a finite number: {_range_hint(what)}", (what,))
        if number < 0:
            raise OptionError(f"{what} {text!r} is out of range: {_range_hint(what)}", (what,))
        if suffix == "%":
            return cls(float(number / 100), absolute=False)
        if suffix or number > 1:
            count = number * _SUFFIX[suffix]
            if count != count.to_integral_value():
                raise OptionError(f"{what} {text!r} is out of range: {_range_hint(what)}", (what,))
            if not suffix and count <= 100:
                raise OptionError(f"{what} {text!r} is ambiguous: write {text}% for a share, or a "
                                    f"count with a suffix (e.g. 0.1k) to keep that many", (what,))
            return cls(float(count), absolute=True)
        return cls(float(number), absolute=False)


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget in integers for one model.

    Attributes:
        max_nonzeros: k, the most prunable weights that may stay nonzero.
        max_macs: F, the most MACs per example the prunable weights may cost: the MACs the
            flops budget allows (its share of the dense MACs, or the count given), rounded down,
            less ``fixed_macs``; None = no limit.
        total_prunable: p, the number of prunable weights.
        fixed_macs: MACs not paid by prunable weights (layers outside the ParamSpace,
            activation products such as attention's QKᵀ and AV): always kept.
    """

    max_nonzeros: int
    max_macs: int | None
    total_prunable: int
    fixed_macs: int = 0

    @property
    def sparsity(self) -> float:
        return 1 - self.max_nonzeros / self.total_prunable


@dataclass(frozen=True)
class Budget:
    """What the user asked for; any of the three may be None (no limit)."""

    sparsity: Amount | None = None
    flops: Amount | None = None
    params: Amount | None = None

    @classmethod
    def parse(cls, sparsity=None, flops=None, params=None) -> "Budget":
        budget = cls(*(None if v is None else Amount.parse(v, name)
                       for v, name in ((sparsity, "sparsity"), (flops, "flops"), (params, "params"))))
        if budget.sparsity is None and budget.flops is None and budget.params is None:
            raise OptionError("no budget given: pass sparsity (e.g. 0.9), flops (e.g. 0.3) or params (e.g. 0.1)",
                              ("sparsity", "flops", "params"))
        return budget

    def resolve(self, costs: CostModel, space: ParamSpace) -> ResolvedBudget:
        """Integers for this model; refuses an infeasible or meaningless budget."""
        p = space.numel
        prunable_params = p
        # never pruned: every other parameter, and the zeros of embeddings' padding rows (counted as
        # kept, as CostModel.count counts them: zero in the dense model too, no pruning removes them)
        other_params = costs.params - prunable_params + structural_zeros(space)
        # Everything the prunable weights do not pay for: excluded layers, attention products.
        # sums, not the (p,) vector of space.macs_per_weight: 1.7 GB at its peak for BERT-base
        weight_macs, least_macs, free_weight = space.macs_summary(costs)
        # and the MACs of the padding rows' zeros (an output head tied to the table computes them:
        # CostModel.count counts them kept, so the prunable weights may not spend them)
        fixed_macs = costs.macs - weight_macs + padding_macs(costs, space)
        k = p
        if self.sparsity is not None:
            k = min(k, self._keep_count(self.sparsity, p, "sparsity"))
        if self.params is not None:
            k = min(k, self._params_keep(self.params, costs.params, other_params))
        max_macs = None
        if self.flops is not None:
            # with weights that cost no MACs (embeddings) some weight always fits
            cheapest = None if free_weight else least_macs
            max_macs = self._macs_cap(self.flops, costs.macs, fixed_macs, cheapest)
        return ResolvedBudget(max_nonzeros=k, max_macs=max_macs, total_prunable=p, fixed_macs=fixed_macs)

    @staticmethod
    def _keep_count(amount: Amount, p: int, what: str) -> int:
        if amount.absolute:
            if not 1 <= amount.value <= p:
                raise OptionError(f"{what} {amount.value:.0f} weights to keep is out of range: "
                                    f"this model has {p} prunable weights (keep 1 to {p})", (what,))
            return int(amount.value)
        if not 0 <= amount.value < 1:
            raise OptionError(f"{what} {amount.value} is out of range: {SHARE_MEANING['sparsity']} "
                                f"must be in {SHARE_RANGE['sparsity']}, e.g. 0.9 keeps 10%", (what,))
        keep = math.floor(round((1 - amount.value) * p, 6))
        if keep < 1:
            raise OptionError(f"{what} {amount.value} keeps no weight of {p}: the largest "
                                f"feasible sparsity is {1 - 1 / p:.6f}", (what,))
        return keep

    @staticmethod
    def _params_keep(amount: Amount, total: int, other: int) -> int:
        limit = amount.value if amount.absolute else amount.value * total
        if not amount.absolute and not 0 < amount.value <= 1:
            raise OptionError(f"params {amount.value} is out of range: {SHARE_MEANING['params']} "
                                f"must be in {SHARE_RANGE['params']}, e.g. 0.1 keeps 10%", ("params",))
        if limit < other + 1 or limit > total:
            asked = f"{limit:.0f}" if amount.absolute else f"{amount.value:g} ({limit:.0f} parameters)"
            raise OptionError(f"params {asked} is infeasible: the parameters that are never pruned (biases, "
                              f"norms, layers excluded or not run, embeddings' padding rows) already take {other}; "
                              f"ask for {other + 1} to "
                              f"{total} ({_share_text((other + 1) / total)} to 1)", ("params",))
        return int(limit - other)

    @staticmethod
    def _macs_cap(amount: Amount, dense: int, fixed: int, cheapest: int | None = None) -> int:
        """MACs the prunable weights may keep; ``cheapest``: the MACs of the cheapest prunable
        weight, when every one costs some (a cap under it would remove them all)."""
        if not amount.absolute and not 0 < amount.value <= 1:
            raise OptionError(f"flops {amount.value} is out of range: {SHARE_MEANING['flops']} "
                                f"must be in {SHARE_RANGE['flops']}, e.g. 0.3 keeps 30%", ("flops",))
        limit = amount.value if amount.absolute else amount.value * dense
        if limit > dense or limit <= fixed:
            asked = f"{limit:.0f} MACs" if amount.absolute else f"{amount.value:g} ({limit:.0f} MACs)"
            raise OptionError(f"flops {asked} is infeasible: the dense model has {dense} MACs and {fixed} of "
                              "them no pruning removes (layers left dense, products of two activations such "
                              "as attention's); ask for "
                                f"more than {_share_text(fixed / dense)} and at most 1 (or {fixed + 1} to {dense} MACs)", ("flops",))
        if cheapest is not None and int(math.floor(limit)) - fixed < cheapest:
            raise OptionError(f"flops {amount.value:g}{' MACs' if amount.absolute else ''} keeps no prunable weight: "
                              f"the cheapest costs {cheapest} MACs; ask for at least "
                              f"{(fixed + cheapest) / dense:.6f} (or {fixed + cheapest} MACs)", ("flops",))
        return int(math.floor(limit)) - fixed


def padding_macs(costs: CostModel, space: ParamSpace) -> int:
    """MACs (per example) of the zero weights in the padding rows of ``space``'s prunable embedding
    tables (``costs.padding_rows``): an output head tied to the table pays them, zero or not
    (``CostModel.count`` counts them kept), so no pruning removes them."""
    rows = padding_rows(space.model)
    if not rows:
        return 0
    params = dict(space.model.named_parameters())
    total = 0
    for e in space.entries:
        row = rows.get(e.param_name)
        layer = costs.layer(e.name) if row is not None and costs.has_layer(e.name) else None
        if layer is None or layer.param_name != e.param_name or len(layer.weight_shape) != 2:
            continue
        zeros = (params[e.param_name].detach()[row] == 0).cpu()
        total += int(layer.weight_costs().view(layer.weight_shape)[row][zeros].sum())
    return total


def structural_zeros(space: ParamSpace) -> int:
    """Zeros of the padding rows of ``space``'s prunable embedding tables (``costs.padding_zeros``)."""
    padding = padding_zeros(space.model)
    return sum(padding.get(name, 0) for name in space.param_names())


def _share_text(share: float) -> str:
    """A share for a message with the digits that tell it from its neighbours: 0.25, 3.09e-05
    (never "0.0000" for a share above 0)."""
    return "0" if share == 0 else f"{share:.4f}" if share >= 0.01 else f"{share:.3g}"
