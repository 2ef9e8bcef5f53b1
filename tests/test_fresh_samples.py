"""``fresh_samples``: each stage of a multi-stage run takes its gradient rows from training images
the earlier stages did not use (default: the same first n·fisher_batch images every stage)."""

import pytest
import torch
from torch import nn

import prunekit
import prunekit.pipelines.fisher_methods as fisher_methods
from prunekit.fisher import skip_samples


def _tiny(samples: int = 96):
    torch.manual_seed(0)
    x = torch.randn(samples, 8)
    x[:, 0] = torch.arange(samples, dtype=torch.float32)      # each sample carries its index
    y = (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    return net, x, y


def _samples_per_stage(monkeypatch, **options) -> list[set[int]]:
    """The indices of the samples each stage's gradient rows were taken from."""
    seen, real = [], fisher_methods.collect_gradients

    def recording(model, space, batches, n, batch=1, **kwargs):
        taken = []

        def tap():
            for x, y in batches:
                taken.append(x[:, 0].long())
                yield x, y
        rows = real(model, space, tap(), n, batch=batch, **kwargs)
        seen.append(set(torch.cat(taken)[:n * batch].tolist()))
        return rows

    monkeypatch.setattr(fisher_methods, "collect_gradients", recording)
    net, x, y = _tiny()
    prunekit.prune(net, (x, y), method="chita++", sparsity=0.5, stages=3, fisher_samples=12, fisher_batch=2,
                   batch_size=10, recalibrate_bn=False, **options)
    return seen


def test_stages_reuse_the_same_images_by_default(monkeypatch):
    seen = _samples_per_stage(monkeypatch)
    assert len(seen) == 3 and all(len(s) == 24 for s in seen) and seen[0] == seen[1] == seen[2]


def test_fresh_samples_give_each_stage_images_the_earlier_stages_did_not_use(monkeypatch):
    seen = _samples_per_stage(monkeypatch, fresh_samples=True)
    assert len(seen) == 3 and all(len(s) == 24 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] | seen[1]) & seen[2]
    assert seen[0] == _samples_per_stage(monkeypatch)[0]          # stage 1 is unchanged


def test_skip_samples_slices_the_batch_that_straddles_the_cut():
    batches = [(torch.arange(i, i + 4), torch.arange(i, i + 4)) for i in range(0, 12, 4)]
    kept = list(skip_samples(batches, 6))
    assert [x.tolist() for x, _ in kept] == [[6, 7], [8, 9, 10, 11]]
    assert [y.tolist() for _, y in kept] == [[6, 7], [8, 9, 10, 11]]
    assert list(skip_samples(batches, 12)) == []
    with pytest.raises(StopIteration):
        next(iter(skip_samples(iter(batches), 100)))


def test_fresh_samples_beyond_the_data_are_said_and_recorded():
    """Three stages of 40 images from 96 cannot all be fresh: the third reads images again, which the
    summary had hidden ("each stage on fresh images")."""
    from prunekit.errors import PrunekitWarning
    net, x, y = _tiny()
    with pytest.warns(PrunekitWarning, match=r"take 120 images and the training data holds 96: stages after 2"):
        result = prunekit.prune(net, (x, y), method="chita++", sparsity=0.5, stages=3, fisher_samples=20,
                                fisher_batch=2, batch_size=10, recalibrate_bn=False, fresh_samples=True)
    assert result.record["fresh_stages"] == 2
    net, x, y = _tiny()
    assert prunekit.prune(net, (x, y), method="chita++", sparsity=0.5, stages=3, fisher_samples=12, fisher_batch=2,
                          batch_size=10, recalibrate_bn=False, fresh_samples=True).record["fresh_stages"] == 3


def test_falcon_says_so_too_when_its_layer_search_is_auto():
    """FALCON's layer_search "auto" is resolved into new options: what the user set (here
    fresh_samples) must survive it, or the warning above was never given for falcon."""
    from prunekit.errors import PrunekitWarning
    net, x, y = _tiny()
    with pytest.warns(PrunekitWarning, match=r"take 120 images and the training data holds 96: stages after 2"):
        prunekit.prune(net, (x, y), method="falcon", flops=0.5, stages=3, fisher_samples=20, fisher_batch=2,
                       batch_size=10, recalibrate_bn=False, fresh_samples=True)
