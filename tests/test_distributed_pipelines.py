"""prunekit.prune on 2 gloo processes (the gradient matrix sharded by columns) gives what one
process gives, also with batch-statistic rows from fresh samples, with the layer search, with the
kept weights re-fit by least squares and with a channel method whose cut is re-fit: the
same mask, weights within 1e-5 of their scale (1e-3 where the re-fit runs); a 2-rank training step is a one-rank step on the
whole batch; a 2-rank gradual run matches one rank."""

import pytest
import torch
from torch import nn

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_pipelines")

import prunekit
from closeness import assert_close_to_scale
from distributed_spawn import run_ranks_once
from prunekit.train import sgd, cosine, train_epoch

CASES = {
    "magnitude": dict(method="magnitude", sparsity=0.8),
    "chita": dict(method="chita", sparsity=0.7, fisher_samples=48, relative_ridge=0.5),
    # the layer search on by default ("auto": a network this small is cheap to search): every rank
    # resolves it alike
    "falcon": dict(method="falcon", sparsity=0.7, flops=0.4, fisher_samples=48),
    "falcon++": dict(method="falcon++", sparsity=0.8, flops=0.35, fisher_samples=48, stages=3, layer_search=0),
    # draws of the model's Fisher: a sample's draw follows it to whichever rank computes its row
    "falcon model-Fisher rows": dict(method="falcon", sparsity=0.7, flops=0.4, fisher_samples=48, fisher_kind="model",
                                     layer_search=0),
    "gradual": dict(method="magnitude", sparsity=0.8, gradual=True, events=2, epochs_per_event=1, final_epochs=1),
    # BatchNorm on each 8-image row's statistics, every stage's rows from images the earlier ones did
    # not use: 3 stages of 24 rows read the 256 images more than twice
    "falcon++ batch-statistic rows": dict(method="falcon++", sparsity=0.7, flops=0.5, fisher_samples=24,
                                          fisher_batch=8, fisher_bn="batch", fresh_samples=True, stages=3,
                                          layer_search=0),
    # the layer search: every rank re-estimates BatchNorm alike and judges its share of the batches
    "falcon layer search": dict(method="falcon", sparsity=0.7, flops=0.5, fisher_samples=24, fisher_batch=8,
                                fisher_bn="batch", layer_search=6, batch_size=16),
    "falcon++ look-ahead search": dict(method="falcon++", sparsity=0.8, flops=0.35, fisher_samples=48, stages=3,
                                       layer_search=4, layer_search_mode="ahead", batch_size=16),
    "magnitude-flops layer search": dict(method="magnitude-flops", flops=0.4, layer_search=6, batch_size=16),
    # channels: replicated gate training, then the layers reading cut channels re-fit by least squares on
    # batches every rank reads alike, then the fine-tune under DistributedDataParallel
    # the kept weights re-fit by least squares (the ranks share the batches and the output channels)
    "falcon re-fit": dict(method="falcon", sparsity=0.7, flops=0.4, fisher_samples=48, refit_batches=2, batch_size=32,
                          layer_search=0),
    # and after every stage: every rank calls the re-fit at the same points
    "falcon++ re-fit every stage": dict(method="falcon++", sparsity=0.7, flops=0.4, fisher_samples=48, stages=2,
                                        refit_batches=2, batch_size=32, layer_search=0),
    "autobot reconstructed": dict(method="autobot", flops=0.5, gate_batches=4, reconstruct_batches=2,
                                  finetune_epochs=1, batch_size=32),
}
NETS_WITH_BATCHNORM = {"falcon++ batch-statistic rows", "falcon layer search", "magnitude-flops layer search",
                       "falcon re-fit", "falcon++ re-fit every stage"}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12),
                         nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 6, 6, generator=g)
    return x, (x.flatten(1)[:, :4].argmax(1) + (x.flatten(1)[:, 4] > 1).long()) % 4


def _prune_cases(names):
    out = {}
    for name in names:
        net = _bn_net() if name in NETS_WITH_BATCHNORM else _net()
        result = prunekit.prune(net, _data(), **CASES[name])
        out[name] = torch.cat([p.detach().flatten() for p in result.model.parameters()])   # shrunk by a channel method
        if "refit" in result.record:
            out[f"{name}: re-fit"] = torch.tensor([result.record["refit"]["layers"], result.record["refit"]["centred"]])
        if "reconstruct" in result.record:
            out[f"{name}: re-fit"] = torch.tensor([next(iter(result.record["reconstruct"].values()))["layers"]])
        if result.history and "final_choice" in result.history[-1]:     # multi-stage: the judge's losses
            choice = result.history[-1]["final_choice"]
            out[f"{name} final choice"] = torch.tensor([choice["last_stage_loss"], choice["kept_candidate_loss"]])
        searches = [h for h in [*result.history, result.record] if "layer_search_loss" in h]
        if searches:                           # the layer search's (start, best) losses per stage
            out[f"{name}: search losses"] = torch.tensor([[h["layer_search_start_loss"], h["layer_search_loss"]]
                                                  for h in searches])
    return out


def _gradients(rank=0, world=1):
    """Per rank: its column shard of X for n = 5 (rows 3 + 2: pieces with gaps) over all weights
    and over every third weight, and of 4-image batch-statistic rows of a BatchNorm net starting
    24 samples into the 30-sample stream (so read past its end, pass after pass), with offsets;
    one process: the full matrices."""
    from prunekit.distributed import current
    from prunekit.distributed.gradients import collect_sharded_gradients
    from prunekit.fisher import collect_gradients, passes, skip_samples
    from prunekit.params import ParamSpace
    net, bn_net = _net(), _bn_net()
    space, bn_space = ParamSpace(net), ParamSpace(bn_net)
    x, y = _data()
    batches = lambda: [(x[i:i + 3], y[i:i + 3]) for i in range(0, 30, 3)]   # noqa: E731
    columns = torch.arange(0, space.numel, 3)
    bn_rows = dict(batch=4, bn="batch")
    if world == 1:
        full = collect_gradients(net, space, batches(), 5, progress=False)
        bn = collect_gradients(bn_net, bn_space, skip_samples(passes(batches()), 24), 5, progress=False, **bn_rows)
        return {"all": full, "some": full[:, columns].contiguous(), "bn": bn}
    shard, offset = collect_sharded_gradients(net, space, batches, 5, current())
    some, some_offset = collect_sharded_gradients(net, space, batches, 5, current(), columns)
    bn, bn_offset = collect_sharded_gradients(bn_net, bn_space, batches, 5, current(), skip=24, repeat=True,
                                              **bn_rows)
    return {"all": shard.contiguous(), "all_offset": torch.tensor(offset), "some": some.contiguous(),
            "some_offset": torch.tensor(some_offset), "bn": bn.contiguous(), "bn_offset": torch.tensor(bn_offset)}


def _too_many_rows():
    """More per-sample rows than the data holds: refused before any gradient where the data's size
    is known (a DataLoader), else when the rows run out (a function of batches)."""
    x, y = _data()
    sized = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    unsized = lambda: ((x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32))   # noqa: E731
    said = []
    for data in (sized, unsized):
        try:
            prunekit.prune(_net(), data, method="chita", sparsity=0.5, fisher_samples=300)
            said.append("not refused")
        except prunekit.PrunekitError as error:
            said.append(str(error))
    return said


def _worker(rank, world):
    return {"prune": _prune_cases(list(CASES)), "train": _train_steps(rank, world),
            "gradients": _gradients(rank, world), "too_many_rows": _too_many_rows()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case, and the training steps, on each of 2 ranks (one spawn for the module)."""
    return run_ranks_once("distributed_pipelines", _worker, 2, tmp_path_factory, timeout=300)


def test_distributed_prune_matches_one_process(two_ranks):
    names = list(CASES)
    expected = _prune_cases(names)
    assert "falcon++ final choice" in expected
    searched = [key for key in expected if key.endswith(": search losses")]
    assert len(searched) == 4 and all(bool((expected[key][:, 1] < expected[key][:, 0]).any()) for key in searched)
    assert int(expected["autobot reconstructed: re-fit"]) >= 1
    assert expected["falcon re-fit: re-fit"].tolist() == [3, 2]      # two layers before a BatchNorm, the head
    for got in (result["prune"] for result in two_ranks):
        for key in ("autobot reconstructed: re-fit", "falcon re-fit: re-fit"):
            assert torch.equal(got[key], expected[key])
        for key in ["falcon++ final choice", *searched]:
            assert_close_to_scale(got[key], expected[key], 1e-5)
        for name in names:
            assert torch.equal(got[name] != 0, expected[name] != 0), name
            # the re-fit (on by default for these methods) sums each layer's moments over the ranks and
            # its conjugate gradients stop at a relative residual of 1e-3 (prunekit.refit.TOLERANCE), so
            # float rounding in the sums and in the weights they start from shows at about that scale
            refit = f"{name}: re-fit" in expected or "reconstructed" in name
            assert_close_to_scale(got[name], expected[name], 1e-3 if refit else 1e-5)


def _train_steps(rank=0, world=1):
    net = _net()
    x, y = _data()
    optimizer = sgd(net, 0.05)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    loss = train_epoch(net, batches, optimizer, cosine(optimizer, len(batches)), progress=False)
    return {"weights": torch.cat([p.detach().flatten() for p in net.parameters()]), "loss": torch.tensor(loss)}


def test_two_rank_training_steps_match_one_rank(two_ranks):
    expected = _train_steps()
    for got in (result["train"] for result in two_ranks):
        assert_close_to_scale(got["weights"], expected["weights"], 1e-5)
    assert not torch.equal(expected["weights"], torch.cat([p.detach().flatten() for p in _net().parameters()]))


def test_two_ranks_report_the_mean_training_loss_over_every_rank(two_ranks):
    """The epoch's loss train_epoch returns (printed by `prunekit train`, recorded by gradual
    pruning and fine-tunes) is the mean over all the samples of every rank: the one-process figure
    on the same batches, on every rank (it was each rank's own half)."""
    expected = _train_steps()["loss"]
    for got in (result["train"]["loss"] for result in two_ranks):
        assert abs(float(got) - float(expected)) <= 1e-5 * abs(float(expected)), (float(got), float(expected))


def test_sharded_gradients_are_the_columns_of_one_process(two_ranks):
    expected = _gradients()
    for which in ("all", "some", "bn"):
        parts = sorted(((int(r["gradients"][f"{which}_offset"]), r["gradients"][which]) for r in two_ranks),
                       key=lambda part: part[0])
        assert parts[0][0] == 0 and parts[1][0] == parts[0][1].shape[1]
        # the same rows (computed in other chunk sizes: equal to rounding)
        assert_close_to_scale(torch.cat([part for _, part in parts], 1), expected[which], 1e-6)


def test_more_rows_than_samples_is_refused_on_every_rank(two_ranks):
    sized, unsized = _too_many_rows()
    assert "holds 256 samples, 300 gradient rows" in sized and "gave only 256 gradient rows" in unsized
    for result in two_ranks:          # rank 1's rows (150-299) run out; rank 0's do not, and it is told
        sized, unsized = result["too_many_rows"]
        assert "holds 256 samples, 300 gradient rows" in sized
        assert "gave only" in unsized or "ran out before the 300 gradient rows" in unsized
    assert "ran out before the 300 gradient rows of 1 sample(s) on another rank" in two_ranks[0]["too_many_rows"][1]
