"""Float16 gradient rows of a tiny loss collected across 2 gloo ranks: the ranks agree on the one
process's loss scale (``fisher.float16_loss_scale``), so the rows, ridge, objective and masks are the
one process's (relative to scale)."""

from __future__ import annotations

import warnings

import pytest
import torch

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_float16")

import prunekit
from prunekit.errors import PrunekitWarning
from closeness import assert_close_to_scale
from distributed_spawn import run_ranks_once
from test_fisher import _nearly_perfect_classifier


def _tinier_classifier():
    """``_nearly_perfect_classifier`` 21 logits from the boundary (loss ~1e-9): its gradient entries lie
    below float16's smallest subnormal (6e-8) unless the loss is scaled, so rows stored unscaled are zero."""
    model, x, y = _nearly_perfect_classifier()
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    return model, x, y


def _prune(fisher_dtype: str) -> dict:
    model, x, y = _tinier_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = prunekit.prune(model, (x, y), method="chita", sparsity=0.5, fisher_samples=48, fisher_dtype=fisher_dtype,
                           fisher_kind="empirical",   # the tiny loss's own gradients (the model Fisher's draws are larger)
                           recalibrate_bn=False, batch_size=64, stage_eval=False)
    weights = torch.cat([p.detach().flatten() for p in r.model.parameters()])
    return {"ridge": torch.tensor(r.history[0]["ridge"], dtype=torch.float64),
            "objective": torch.tensor(r.history[0]["objective"], dtype=torch.float64), "weights": weights}


def _rows(rank=0, world=1) -> dict:
    """The float16 rows at the loss scale the ranks agree on (each rank's column shard), and that scale."""
    from prunekit.distributed import current
    from prunekit.distributed.gradients import collect_sharded_gradients
    from prunekit.fisher import collect_gradients, float16_loss_scale, float16_probe_top, float16_scale_for
    from prunekit.params import ParamSpace
    model, x, y = _tinier_classifier()
    space = ParamSpace(model)
    batches = lambda: [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]   # noqa: E731
    if world == 1:
        scale = float16_loss_scale(model, space, batches(), 48)
        rows = collect_gradients(model, space, batches(), 48, dtype=torch.float16, progress=False, loss_scale=scale)
        return {"rows": rows, "scale": torch.tensor(scale), "offset": torch.tensor(0)}
    top = torch.tensor([float16_probe_top(model, space, batches(), 48)], dtype=torch.float64)
    scale = float16_scale_for(float(current().all_reduce_max(top)))
    rows, offset = collect_sharded_gradients(model, space, batches, 48, current(), dtype=torch.float16, loss_scale=scale)
    return {"rows": rows.contiguous(), "scale": torch.tensor(scale), "offset": torch.tensor(offset)}


def _worker(rank, world):
    """Every two-rank case of this module in one spawn of the ranks (a spawn costs more than these
    tiny prunes): the overflow cases (defined below) last, the one made an error at the very end, as
    it leaves through a raised warning."""
    return {"float16": _prune("float16"), "rows": _rows(rank, world), "overflow": _prune_overflowing(),
            "as_error": _overflow_as_error_worker(rank, world)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks_once("distributed_float16", _worker, 2, tmp_path_factory, timeout=300)


def test_two_ranks_store_float16_rows_at_the_one_process_scale(two_ranks):
    expected = _rows()
    assert float(expected["scale"]) > 2.0**10                     # a tiny loss: its rows are scaled
    parts = sorted(((int(r["rows"]["offset"]), r["rows"]["rows"]) for r in two_ranks), key=lambda part: part[0])
    for result in two_ranks:
        assert float(result["rows"]["scale"]) == float(expected["scale"])
    got = torch.cat([part for _, part in parts], 1).double()
    live = expected["rows"].double().norm(dim=0) > 0
    assert int((got == 0).sum()) == int((expected["rows"] == 0).sum())
    error = ((got - expected["rows"].double()).norm(dim=0)[live] / expected["rows"].double().norm(dim=0)[live]).max()
    assert error < 2.0**-10, float(error)                         # float16's rounding, no more


def test_two_rank_float16_prune_matches_one_process(two_ranks):
    """The ridge and objective as one process records them (unscaled), the same masks and weights:
    without the agreed scale the sharded rows were stored unscaled, their tiny entries zero."""
    expected = _prune("float16")
    exact = _prune("float32")
    for result in two_ranks:
        got = result["float16"]
        for key in ("ridge", "objective"):
            assert_close_to_scale(got[key], expected[key], 1e-3)
            assert_close_to_scale(got[key], exact[key], 1e-2)     # float16 rows: near the float32 solve
        assert torch.equal(got["weights"] != 0, expected["weights"] != 0)
        assert_close_to_scale(got["weights"], expected["weights"], 1e-3)


def _overflowing_classifier():
    """``_tinier_classifier`` with sample 30 (past the probe's first rows) shrunk to a millionth and on the
    boundary (its first input 0): its loss is ~0.7, not ~1e-9, so at the probe's loss scale (2^37) its
    gradient overflows float16 in the last layer's columns (rank 1's half of the 160 weights) alone; the
    first layer's entries (rank 0's half) stay finite."""
    model, x, y = _tinier_classifier()
    x[30] = 1e-6 * x[30]
    x[30, 0] = 0.0
    return model, x, y


def _prune_overflowing() -> dict:
    model, x, y = _overflowing_classifier()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = prunekit.prune(model, (x, y), method="chita", sparsity=0.5, fisher_samples=48, fisher_dtype="float16",
                           fisher_kind="empirical", recalibrate_bn=False, batch_size=64, stage_eval=False)
    weights = torch.cat([p.detach().flatten() for p in r.model.parameters()])
    said = [str(w.message) for w in seen if "overflowed at loss scale" in str(w.message)]
    return {"ridge": torch.tensor(r.history[0]["ridge"], dtype=torch.float64),
            "objective": torch.tensor(r.history[0]["objective"], dtype=torch.float64), "weights": weights,
            "warned": torch.tensor(len(said))}


def test_a_float16_overflow_on_one_rank_makes_every_rank_collect_again_unscaled(two_ranks):
    """The retry after a float16 overflow is decided across the ranks (``any_broken``: a sum of every rank's
    verdict): rank 1's columns overflow, rank 0's do not, and both collect their rows again unscaled. Were
    the verdict each rank's own, rank 1 would gather its rows again while rank 0 went on to the ridge's
    all-reduce: the ranks' collectives would no longer pair (a hang to the timeout, or an error), or their
    solves would differ. Both must give the one process's result (which also collects again)."""
    from prunekit.distributed.gradients import shard_bounds
    from prunekit.fisher import collect_gradients, float16_loss_scale
    from prunekit.params import ParamSpace
    model, x, y = _overflowing_classifier()
    space = ParamSpace(model)
    batches = lambda: [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]   # noqa: E731
    scale = float16_loss_scale(model, space, batches(), 48)
    rows = collect_gradients(model, space, batches(), 48, dtype=torch.float32, progress=False)
    over = (rows.abs() * scale > torch.finfo(torch.float16).max).any(0)
    (a, b), (c, d) = shard_bounds(rows.shape[1], 2)
    assert scale > 1.0 and not over[a:b].any() and over[c:d].any()      # one rank's columns overflow, not the other's
    expected = _prune_overflowing()
    assert int(expected["warned"]) == 1                                    # one process collected again too
    ranks = [r["overflow"] for r in two_ranks]
    assert [int(r["warned"]) for r in ranks] == [1, 0]                      # rank 0 says it, once
    for got in ranks:
        for key in ("ridge", "objective"):
            assert_close_to_scale(got[key], expected[key], 1e-3)
        assert torch.equal(got["weights"] != 0, expected["weights"] != 0)
        assert_close_to_scale(got["weights"], expected["weights"], 1e-3)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])           # the ranks agree exactly


def _overflow_as_error_worker(rank, world):
    """The overflowing prune with prunekit's warnings turned into errors (``python -W error``): what each rank
    raised, and its rows' scale would not matter. The rank leaves through ``run_ranks``' barrier afterwards
    (``_worker`` runs it last)."""
    model, x, y = _overflowing_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        try:
            prunekit.prune(model, (x, y), method="chita", sparsity=0.5, fisher_samples=48, fisher_dtype="float16",
                           fisher_kind="empirical", recalibrate_bn=False, batch_size=64, stage_eval=False)
        except Exception as err:           # noqa: BLE001 - what it was is the result
            return {"raised": type(err).__name__, "message": str(err)[:80]}
    return {"raised": "nothing", "message": ""}


def test_a_warning_made_an_error_is_raised_on_every_rank_not_rank_0_alone(two_ranks):
    """Under ``python -W error`` prunekit's warning (issued on rank 0 alone) raised on rank 0 only: rank 1
    went on into the rows' gathers and failed on a raw gloo error ("Connection closed by peer") once rank 0
    left (or waited for the timeout). Every rank now raises the same warning at the same point."""
    ranks = [r["as_error"] for r in two_ranks]
    assert [r["raised"] for r in ranks] == ["PrunekitWarning"] * 2, ranks
    assert "overflowed at loss scale" in ranks[0]["message"] and ranks[1]["message"] == ranks[0]["message"]
