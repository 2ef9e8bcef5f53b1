"""Pipelines: one-shot and multi-stage pruning on top of the model and solver layers.

Importing this package registers every method in ``oneshot.METHODS``.
"""

from . import fisher_methods, oneshot  # noqa: F401  (fisher_methods registers its methods)
