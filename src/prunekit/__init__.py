"""prunekit: prune neural networks to a budget."""
