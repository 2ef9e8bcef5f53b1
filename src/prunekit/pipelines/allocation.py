"""The per-layer allocation search wired to a network: candidate weights are judged by the loss
the network has after BatchNorm is re-estimated, on training batches held fixed for the search.

``layer_search`` (an option of magnitude-flops, FALCON and FALCON++; 0 = off) is the number of
trials of :func:`prunekit.solvers.layer_search.search_layer_scales`. Each trial writes candidate
weights into the model, re-estimates BatchNorm on ``calibration`` batches, and measures the mean
cross-entropy on ``judge`` other batches (both taken once, at the start, from one pass over the
training data, so every trial sees the same images). The model's weights and BatchNorm
statistics are put back after the search.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn

from .. import distributed
from ..layout import model_input
from ..losses import LossFn, summed_loss
from ..options import OptionError
from ..params import ParamSpace
from ..process_memory import release_freed_memory
from ..solvers.layer_search import LayerSearch, layer_index, search_layer_scales
from ..train import recalibrate_batchnorm

# What the search holds: BatchNorm is re-estimated on the first 4 training batches and the loss
# taken on the next 8 (1,536 images at the usual 128), the same images at every trial.
SEARCH_CALIBRATION_BATCHES = 4
SEARCH_JUDGE_BATCHES = 8


class LoaderWindow:
    """Batches ``start`` to ``stop`` (exclusive) of ``loader()``, read afresh at every pass instead
    of held in memory: a judge of many batches costs one batch of memory. ``loader`` must give the
    same batches at every call (``PruneContext.train_batches`` does) and hold at least ``stop``."""

    def __init__(self, loader: Callable[[], Iterable], start: int, stop: int):
        self.loader, self.start, self.stop = loader, start, stop

    def __iter__(self):       # a generator: the loader is called at the first batch taken, not before
        yield from itertools.islice(self.loader(), self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


class RecalibratedLoss:
    """loss(w): the mean loss (cross-entropy, or the user's) of ``model`` with prunable weights
    w (p,), after BatchNorm re-estimation on ``calibration`` batches, on ``judge`` batches (both
    lists of (x, y), or ``LoaderWindow``s)."""

    def __init__(self, model: nn.Module, space: ParamSpace, calibration: list, judge: list,
                 loss_fn: LossFn | None = None, release_freed: bool = False):
        """``release_freed``: hand the heap's freed blocks back (malloc_trim) after BatchNorm's
        re-estimation, before the judged forwards (the re-fit's judge: its two calls would otherwise
        run their loss forwards beside the recalibration forward's freed blocks)."""
        if not judge:
            raise OptionError("the layer search needs training batches to judge by: pass more training data",
                              ("layer_search",))
        self.model, self.space = model, space
        self.calibration, self.judge = calibration, judge
        self.loss_fn = loss_fn
        self.release_freed = release_freed
        self._weights = space.vector().clone()
        self._buffers = {name: b.clone() for name, b in model.named_buffers()}

    @classmethod
    def from_batches(cls, model: nn.Module, space: ParamSpace, batches: Iterable,
                     calibration: int = SEARCH_CALIBRATION_BATCHES, judge: int = SEARCH_JUDGE_BATCHES,
                     loss_fn: LossFn | None = None) -> "RecalibratedLoss":
        """Take the first ``calibration`` batches for BatchNorm and the next ``judge`` to judge by;
        with fewer batches, a third of them for BatchNorm and the rest to judge by (one batch:
        the same batch for both). ``calibration=0``: BatchNorm is not re-estimated. ``loss_fn``:
        the loss judged by (``prunekit.losses``; None: cross-entropy)."""
        taken = list(itertools.islice(iter(batches), calibration + judge))
        if calibration and len(taken) < calibration + judge:
            calibration = len(taken) // 3
            if len(taken) == 1:
                return cls(model, space, taken, taken, loss_fn)
        return cls(model, space, taken[:calibration], taken[calibration:], loss_fn)

    @torch.no_grad()
    def __call__(self, w: torch.Tensor) -> float:
        """The loss with weights w (p,). Under torchrun every rank re-estimates BatchNorm on all
        calibration batches (the model stays the same everywhere), judges every R-th judge batch
        and the sums are all-reduced: each rank gets the same loss, for 1/R of the forward work."""
        self.space.assign(w)
        if self.calibration:
            recalibrate_batchnorm(self.model, self.calibration, max_batches=len(self.calibration))
            if self.release_freed:
                release_freed_memory()
        was_training = self.model.training
        self.model.eval()
        device = w.device
        collective = distributed.current()
        total, count = 0.0, 0
        for x, y in itertools.islice(self.judge, collective.rank, None, collective.size):
            outputs = self.model(model_input(self.model, x, device))
            total += float(summed_loss(self.loss_fn, outputs, y.to(device)))
            count += y.shape[0]
        self.model.train(was_training)
        if collective.distributed:
            total, count = collective.all_reduce(torch.tensor([total, count], dtype=torch.float64,
                                                              device=device)).tolist()
        return total / count

    @torch.no_grad()
    def restore(self) -> None:
        """Put the model's weights and buffers (BatchNorm statistics) back as they were."""
        self.space.assign(self._weights)
        for name, b in self.model.named_buffers():
            b.copy_(self._buffers[name])


def search_allocation(model: nn.Module, space: ParamSpace, batches: Iterable, trials: int,
                      candidate: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor | None = None,
                      seed: int = 0, progress: bool = False, start: torch.Tensor | None = None,
                      loss_fn: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor, LayerSearch]:
    """Search per-layer score multipliers for ``candidate``.

    candidate(weights_of_score): the full weight vector (p,) a method gives when every free
        weight's score is multiplied by weights_of_score (m,) (m = index.numel()).
    index: the free weights (m,) the method chooses among (None: all p).
    start: (L,) scales per layer of ``space`` to start from (an earlier stage's; None: all 1).
    Returns ((m,) float64 multipliers per free weight, (L,) the scales per layer found (layers
    without free weights keep their start), the search's record); the model is left as it was.
    """
    p = space.numel
    layers = layer_index(space.layer_slices(), p)
    if index is not None:
        layers = layers[index.cpu()]
    used, local = torch.unique(layers, return_inverse=True)      # only layers with free weights
    scales = (torch.ones(len(space.layer_slices()), dtype=torch.float64) if start is None
              else start.to(torch.float64).clone())
    judge = RecalibratedLoss.from_batches(model, space, batches, loss_fn=loss_fn)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=trials, desc="layer search", leave=False)

    def on_trial(trial: int, loss: float, best: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{best:.4f}")

    def loss_of(scales: torch.Tensor) -> float:
        return judge(candidate(scales[local]))

    try:
        found = search_layer_scales(loss_of, used.numel(), trials, seed=seed, start=scales[used], on_trial=on_trial)
    finally:
        judge.restore()
        if bar is not None:
            bar.close()
    scales[used] = found.scales
    return found.scales[local], scales, found
