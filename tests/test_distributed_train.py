"""Fine-tuning under torch.distributed (2 gloo ranks): each rank trains on its share of every batch,
so each BatchNorm's running statistics came out of other samples on each rank; train_epoch averages
them over the ranks at the end of the pass and every rank holds the same model."""

import torch

from distributed_spawn import run_ranks


def _train_conv_bn(rank, world):
    """One train_epoch of a Conv+BN+Linear net on 4 batches that every rank sees alike: each rank's
    BatchNorm buffers and its mean loss."""
    from torch import nn
    from prunekit.train import cosine, sgd, train_epoch
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3))
    batches = [(torch.randn(8, 3, 6, 6) * (1 + i), torch.randint(0, 3, (8,))) for i in range(4)]
    optimizer = sgd(net, 0.1)
    loss = train_epoch(net, batches, optimizer, cosine(optimizer, len(batches)), progress=False)
    buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    return {"buffers": buffers, "loss": torch.tensor(loss)}


def test_train_epoch_leaves_the_same_batchnorm_statistics_on_every_rank(tmp_path):
    """Before, rank 1's running_mean / running_var were from its own half of each batch (and DDP's
    broadcast of rank 0's buffers before each forward left the last step's apart)."""
    ranks = run_ranks(_train_conv_bn, 2, tmp_path)
    assert ranks[0]["buffers"].keys() == ranks[1]["buffers"].keys() and len(ranks[0]["buffers"]) == 6
    for name, value in ranks[0]["buffers"].items():
        assert torch.equal(value, ranks[1]["buffers"][name]), name
    assert int(ranks[0]["buffers"]["1.num_batches_tracked"]) == 4
    assert torch.equal(ranks[0]["loss"], ranks[1]["loss"])
