"""prunekit: prune neural networks to a budget.

The public API::

    import prunekit
    result = prunekit.prune(model, data, method="falcon", flops=0.3)     # -> prunekit.Result
    prunekit.methods.METHODS                                             # every method, its options
    prunekit.add_method(prunekit.Method(...))                            # your own method
    prunekit.remove_method(name)                                         # ... gone again

    net = prunekit.load_pruned(MyNet(), "runs/x")                        # a saved result, reloaded

and the building blocks ``Budget``, ``CostModel``, ``ParamSpace``, ``MaskHold``, ``masks_from_weights``,
``save_model``.
"""

__version__ = "0.1.0"     # the package version (pyproject.toml reads it from here)

from . import startup

if startup.is_the_program():          # a Ctrl-C while torch and prunekit import: one line, exit 130
    startup.quiet_until_started()

from . import threads_env

if threads_env.run_as_program():      # before torch loads: libgomp reads OMP_NUM_THREADS then
    threads_env.refuse_bad_omp_threads()

from . import methods
from .api import LostRank, prune
from .budget import Budget, ResolvedBudget
from .costs import CostModel, Counts, ModuleCost, register_cost
from .errors import PrunekitError
from .loading import load_pruned
from .masks import MaskHold, masks_from_weights
from .methods import Method, add_method, method_names, remove_method
from .params import ParamSpace
from .record import Result
from .saving import save_model

__all__ = ["prune", "Result", "Method", "add_method", "remove_method", "method_names", "methods", "Budget",
           "ResolvedBudget", "CostModel", "Counts", "ModuleCost", "register_cost", "PrunekitError", "LostRank", "MaskHold",
           "masks_from_weights", "ParamSpace", "save_model", "load_pruned"]
