"""Pipelines: pruning single weights (one shot, in stages, gradually) on top of the model and
solver layers. The methods themselves are listed in ``prunekit.methods``."""
