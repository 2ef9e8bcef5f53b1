"""prunekit: prune neural networks to a budget.

The stable public API::

    from prunekit import Budget, CostModel, ParamSpace, prune_oneshot, prune_structured
    prunekit.prune(model, data, method=..., sparsity=..., flops=...)   # -> prunekit.Result
"""

__version__ = "0.1.0"     # the package version (pyproject.toml reads it from here)

from .budget import Budget, ResolvedBudget
from .costs import CostModel, Counts, ModuleCost, register_cost
from .errors import PrunekitError
from .masks import MaskHold
from .params import ParamSpace
from .pipelines.oneshot import PruneResult, method_names
from .pipelines.oneshot import prune as prune_oneshot
from .saving import save_model
from .structured.pipeline import StructuredResult, prune_structured
from .api import Result, prune

__all__ = ["Budget", "ResolvedBudget", "CostModel", "Counts", "ModuleCost", "register_cost", "PrunekitError", "MaskHold", "ParamSpace",
           "PruneResult", "method_names", "prune_oneshot", "save_model",
           "StructuredResult", "prune_structured", "Result", "prune"]
