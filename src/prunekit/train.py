"""Training, evaluation and BatchNorm recalibration loops (plain PyTorch, with progress bars)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from tqdm.auto import tqdm

from .errors import PrunekitError, PrunekitWarning
from .options import OptionError
from .layout import model_input
from .losses import LossFn, class_indices, class_scores, mean_loss, summed_loss
from .errors import warn as warn_ours


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def nonfinite_weight(model: nn.Module) -> str | None:
    """The name of the first floating parameter of ``model`` holding nan or inf; None if all are
    finite (buffers are not looked at: they may hold -inf masks; nor are a lazy module's parameters
    not made yet: ``CostModel`` refuses those, naming the fix)."""
    return next((name for name, t in model.named_parameters()
                 if not is_lazy(t) and t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())),
                None)


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose weights hold nan or inf (a diverged training's): every measurement of
    it would be nan, and training or pruning it only spreads them."""
    broken = nonfinite_weight(model)
    if broken is not None:
        raise PrunekitError(f"the model's {broken} holds nan or inf values: load finite weights (did its training "
                            "diverge?)")


def check_finite_loss(loss: float) -> None:
    """Refuse a model whose mean loss on the evaluation data is nan or inf: its weights may be finite
    (``check_finite_weights``) while its outputs overflow or are nan (huge weights, a forward that
    divides by zero, inputs on the wrong scale); every accuracy or loss reported of it would mean nothing."""
    if not math.isfinite(loss):
        raise PrunekitError(f"the model's loss on the evaluation data is {loss}: its outputs are not finite numbers; "
                            "check its forward, weights and input normalization")


class TrainingDiverged(OptionError):
    """A training (a fine-tune) whose loss or weights became nan or inf: its learning rate is too
    high. A ``PrunekitError`` (a ``ValueError``); ``params`` holds the learning rate's option name,
    which the command line writes as its flag (``lr`` as ``--lr``).

    where: the pass that diverged ("epoch 2/3"); cause: what became non-finite ("its loss became
    nan"); lr: the peak learning rate it trained with, the option ``lr_name``."""

    def __init__(self, where: str, cause: str, lr: float, lr_name: str = "lr"):
        super().__init__(f"training diverged in {where} ({cause}): lower {lr_name} (it is {lr:g}); "
                         "nothing diverged was saved", (lr_name,))
        self.where, self.cause, self.lr, self.lr_name = where, cause, lr, lr_name


def check_converging(loss: float, model: nn.Module, lr: float, where: str, lr_name: str = "lr") -> None:
    """Raise ``TrainingDiverged`` if the mean training loss ``loss`` of a pass, or a weight of
    ``model`` after it, is nan or inf (what the ``train`` command checks after every epoch).
    ``lr``: the peak learning rate the pass trained with, named ``lr_name`` (an option name);
    ``where``: the pass, e.g. "epoch 2/3". Called before anything saves the model."""
    broken = None if not math.isfinite(loss) else nonfinite_weight(model)
    if math.isfinite(loss) and broken is None:
        return
    what = f"its loss became {loss}" if broken is None else f"its {broken} became nan or inf"
    raise TrainingDiverged(where, what, lr, lr_name)


def _peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate ``optimizer`` started from (its first group's; a scheduler keeps it as
    ``initial_lr``)."""
    group = optimizer.param_groups[0]
    return float(group.get("initial_lr", group["lr"]))


class _Progress:
    """One pass over ``loader`` (a single ``iter()`` of it) behind a progress bar (tqdm.auto: a
    widget in a notebook, else text on stderr; nothing when not ``enabled``), ticked once per batch.

    The bar is not handed the loader: tqdm.auto's bar (tqdm.asyncio's) calls ``iter()`` on an
    iterable when it is made, even disabled, and the loop calls it again, so every epoch would
    start two passes (a prunekit loader's epoch moving by 2, a DataLoader's workers started twice).
    ``len(loader)`` is asked only for a shown bar's total (None where it has none)."""

    def __init__(self, loader: Iterable, desc: str, enabled: bool):
        self.loader = loader
        total = None
        if enabled:
            try:
                total = len(loader)
            except TypeError:           # a generator's, an iterable without __len__
                pass
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        try:
            for batch in self.loader:
                yield batch
                self.bar.update(1)
        finally:                        # also when the loop stops early (a break, an exception)
            self.bar.close()

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)


def _progress(loader: Iterable, desc: str, enabled: bool) -> _Progress:
    return _Progress(loader, desc, enabled)


class _EachPass:
    """A function returning batches, as an iterable: each pass calls it again.

    A prunekit loader it gives (``lambda: loader`` over a ``BatchLoader``) is read as
    ``prunekit.prune``'s replay reads it (``replay.at_pass``): pass ``k`` of this wrapper (``epoch``,
    counted from 0) reads a copy at the loader's own epoch moved on by ``k``, so the user's loader
    stays at its epoch, and a training carried on by setting ``loader.epoch`` to the epochs done
    reads what an uninterrupted one reads. A first-batch peek puts ``epoch`` back
    (``replay.epoch_mark``). Anything else it gives (a DataLoader, a list) is read as it comes."""

    wraps_passes = True

    def __init__(self, make):
        self.make = make
        self.epoch = 0

    def __iter__(self):
        from .data.replay import at_pass
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(at_pass(self.make(), epoch))

    def __len__(self):
        return len(self.make())     # a TypeError where what it returns has none (a generator)


def batches_per_pass(loader: Iterable) -> int:
    """How many batches one pass over ``loader`` holds: its ``len()``, or where it has none (a
    generator, a re-iterable without ``__len__``) counted by reading one pass."""
    try:
        return len(loader)
    except TypeError:
        return sum(1 for _ in loader)


def batches_of(data, what: str = "data", batch_size: int = 128, shuffle: bool = False,
               class_labels: bool = True) -> Iterable:
    """``data`` in any form ``prunekit.prune`` takes, as a re-iterable of ``(x, y)`` batches: a
    DataLoader or other re-iterable of batches as it is; ``(X, Y)`` tensors (X: (N, ...), Y: (N,))
    or a map-style ``Dataset`` of ``(x, y)`` pairs in a DataLoader of ``batch_size`` samples
    (shuffled from torch's global RNG when ``shuffle``); a function of no arguments returning
    batches, called again at every pass. Anything else (a path, one tensor, a one-pass iterator, a
    Dataset of triples ...) is refused in one line naming the fix, as ``prune`` refuses it."""
    from .api_checks import check_data, first_batch
    from .data.dataset import DeferredImageDataset, ImageDataset, refuse_raw_pixels
    from .data.loaders import BatchLoader, dataset_loader, map_style
    from .data.replay import ReplayedLoader
    check_data(data, what, class_labels=class_labels)
    dataset = map_style(data)
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if dataset is not None:         # a fresh order at every pass, from torch's global RNG
        batches = dataset_loader(dataset, batch_size, shuffle)
    elif isinstance(data, (ImageDataset, DeferredImageDataset)):       # load_dataset's, defer=True's too
        refuse_raw_pixels(data, what)
    elif callable(data):
        batches = _EachPass(data)
    elif isinstance(data, (BatchLoader, ReplayedLoader)):       # prunekit's own: (x, y) batches
        return data
    elif isinstance(data, Iterable):
        # by its type, not iter(data) is data: an iter() would start a pass (a loader's epoch, its shuffle)
        if isinstance(data, Iterator):
            raise PrunekitError(f"{what} is a one-pass iterator: pass a DataLoader, a Dataset, (X, Y) tensors "
                                "or a function returning batches, so that every epoch can read it again")
        batches = data
    else:
        raise PrunekitError(f"{what} must be a DataLoader, a Dataset, (X, Y) tensors or a function returning "
                            f"batches, got {type(data).__name__}")
    first_batch(lambda: batches, what)          # (x, y) batches, or one line saying what they are
    return batches


def evaluate(model: nn.Module, loader, progress: bool = False, batch_size: int = 128) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` in percent (eval mode, restored after).
    ``loader``: any data form ``prunekit.prune`` takes (``batches_of``); ``batch_size`` is used
    for a Dataset or ``(X, Y)`` tensors."""
    return evaluate_loss_accuracy(model, batches_of(loader, "data", batch_size), progress)["accuracy"]


@torch.no_grad()
def evaluate_loss_accuracy(model: nn.Module, loader: Iterable, progress: bool = False,
                           loss_fn: LossFn | None = None) -> dict:
    """Mean cross-entropy loss and top-1 accuracy (%) of ``model`` on ``loader`` (eval mode,
    restored after). With the user's ``loss_fn`` (``prunekit.losses``): its mean over the samples,
    and accuracy None (what the outputs mean is the user's). ``loader``: any data form
    ``prunekit.prune`` takes (``batches_of``; a Dataset or tensors in batches of 128)."""
    loader = batches_of(loader, "data", class_labels=loss_fn is None)
    was_training = model.training
    model.eval()
    device = _device(model)
    loss = correct = total = 0.0
    for x, y in _progress(loader, "eval", progress):
        out = model(model_input(model, x, device))
        y = y.to(device)
        loss += float(summed_loss(loss_fn, out, y))
        if loss_fn is None:
            correct += int((class_scores(out).argmax(1) == y).sum())
        total += y.shape[0]
    model.train(was_training)
    accuracy = 100.0 * correct / max(total, 1) if loss_fn is None else None
    return {"loss": loss / max(total, 1), "accuracy": accuracy}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, max_batches: int = 20,
                          progress: bool = False) -> bool:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average).

    Pruning changes the activations' statistics; without this, a pruned model with BN can
    lose far more accuracy than its weights deserve. Returns False if the model has no BN.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    was_training = model.training
    seen = 0
    try:
        for x, _ in _progress(loader, "recalibrate BN", progress):
            if seen >= max_batches:
                break
            x = model_input(model, x, _device(model))    # (its first call probes the model as it is)
            if seen == 0:
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None
                model.train()
            model(x)
            seen += 1
    finally:
        for m, (momentum, state) in zip(norms, saved):
            m.momentum = momentum
            if seen == 0:
                m.load_state_dict(state)    # no data: keep the old statistics, never reset ones
        model.train(was_training)
    return seen > 0


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The SGD optimizer of every fine-tune (Nesterov when there is momentum)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise PrunekitError("every parameter of the model is frozen (requires_grad=False) and this run trains it "
                            "(gradual pruning, a fine-tune): unfreeze what should train (requires_grad_(True)) or "
                            "prune without training")
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=momentum > 0)


def cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine learning rate from the optimizer's lr down to 0 over ``steps`` batches."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))


def _data_parallel(model: nn.Module) -> tuple[nn.Module, int, int]:
    """(the module to call, rank, number of ranks): under torch.distributed, ``model`` wrapped in
    DistributedDataParallel (gradients averaged over the ranks at every step); else itself."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model, 0, 1
    from torch.nn.parallel import DistributedDataParallel
    device = _device(model)
    wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return wrapped, dist.get_rank(), dist.get_world_size()


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float,
                      temperature: float) -> torch.Tensor:
    """(1 - weight) * cross-entropy + weight * T² * KL(teacher || student) at temperature T
    (Hinton et al. 2015; T² keeps the soft term's gradient scale independent of T).

    logits, teacher_logits: (batch, classes), or outputs holding them (``losses.class_scores``);
    labels: (batch,). weight 0 is plain cross-entropy.
    """
    logits, teacher_logits = class_scores(logits), class_scores(teacher_logits)
    hard = nn.functional.cross_entropy(logits, class_indices(labels))
    if weight == 0:
        return hard
    soft = nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=1),
                                nn.functional.log_softmax(teacher_logits / temperature, dim=1),
                                reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature ** 2 * soft


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, schedule, desc: str = "epoch",
                progress: bool = True, teacher: nn.Module | None = None, distill: float = 0.0,
                temperature: float = 4.0, loss_fn: LossFn | None = None) -> float:
    """One pass over ``loader`` on cross-entropy (or the user's ``loss_fn``, ``prunekit.losses``),
    stepping ``schedule`` every batch; mean loss.

    With ``teacher`` (in eval mode, no gradients) and ``distill`` > 0 the loss is
    ``distillation_loss``: the student also learns the teacher's softened outputs, which on a
    few thousand images keeps a pruned model closer to its dense original than labels alone.

    Under torch.distributed every rank iterates the same batches (same seed) and trains on its
    share of each (``tensor_split``: what a DistributedSampler gives, batch by batch) through
    DistributedDataParallel, so a step is one process's step on the whole batch, whatever its size:
    DDP averages the ranks' gradients, so each rank's mean loss is weighted by ``_share_weight``
    (R·n_r/n) first, making the average Σ_r (n_r/n)·grad_r, the whole batch's mean-loss gradient
    (a 3-sample batch on 2 ranks, split 2/1, weighs each sample alike; a rank left with no samples
    of a batch smaller than R runs its empty share, contributing a zero gradient and no samples to
    the mean loss, the first batch of the pass included). Exact for models without
    BatchNorm (to rounding); a BatchNorm layer in training mode normalises each rank's share by its
    own statistics, so there it is close, not equal, at any batch size. The mean loss returned is over every rank's samples, and the BatchNorm
    running statistics, each rank's from its own share, are averaged over the ranks (one all-reduce
    at the end of the pass): every rank ends the pass with the same model. The progress bar's
    running figure is rank 0's own."""
    if distill and teacher is None:
        raise ValueError("distill > 0 needs a teacher model")
    if distill and loss_fn is not None:
        raise ValueError("distillation softens a classifier's logits: it does not take a loss_fn")
    if teacher is not None:
        teacher.eval()
    model.train()
    forward, rank, ranks = _data_parallel(model)
    device = _device(model)
    total, count = 0.0, 0
    bar = _progress(loader, desc, progress and rank == 0)
    for x, y in bar:
        weight = 1.0
        if ranks > 1:
            whole = x.shape[0]
            x, y = x.tensor_split(ranks)[rank], y.tensor_split(ranks)[rank]
            weight = _share_weight(x.shape[0], whole, ranks)
        y = y.to(device)
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None and distill:
            with torch.no_grad():
                target = teacher(model_input(teacher, x, device))
            loss = distillation_loss(forward(model_input(model, x, device)), target, y, distill, temperature)
        else:
            loss = mean_loss(loss_fn, forward(model_input(model, x, device)), y)
        (loss if weight == 1.0 else loss * weight).backward()
        optimizer.step()
        schedule.step()
        if y.shape[0]:           # a rank with no samples of a short batch: its mean loss is nan, and counts for nothing
            total += loss.item() * y.shape[0]
            count += y.shape[0]
        if count:                # none yet: rank 1 of 2 on a first batch of 1 sample (its figure would be 0/0)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    if ranks > 1:
        total, count = _reduce_epoch_end(model, total, count, ranks, device)
    return total / max(count, 1)


def _share_weight(share: int, whole: int, ranks: int) -> float:
    """The factor on a rank's mean loss over its ``share`` of a ``whole`` batch split over ``ranks``
    ranks, so that DDP's average of the ranks' gradients is the whole batch's mean-loss gradient:
    (1/R)·Σ_r (R·n_r/n)·grad_r = Σ_r (n_r/n)·grad_r. Exactly 1.0 when the batch divides evenly
    (nothing changes there); 0.0 for a rank with no samples."""
    return ranks * share / whole


def _batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The floating running_mean / running_var buffers of every BatchNorm of ``model`` that tracks
    running statistics, in module order."""
    return [buffer for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for buffer in (m.running_mean, m.running_var)
            if buffer is not None and buffer.is_floating_point()]


@torch.no_grad()
def _reduce_epoch_end(model: nn.Module, total: float, count: int, ranks: int,
                      device: torch.device) -> tuple[float, int]:
    """At the end of a data-parallel pass, in one all-reduce: the loss sum and sample count over
    every rank, and the BatchNorm running statistics averaged over the ranks. Each rank normalised
    its own share of the batches, so its running_mean / running_var drifted from the others'; the
    average (what one process on the whole batches estimates, to first order) makes every rank hold
    the same model. num_batches_tracked needs nothing: every rank takes the same steps."""
    import torch.distributed as dist
    statistics = _batchnorm_statistics(model)
    # On the model's device: NCCL reduces CUDA tensors only (and float64 is one of its types).
    flat = torch.cat([torch.tensor([total, count], dtype=torch.float64, device=device)]
                     + [b.detach().reshape(-1).to(device=device, dtype=torch.float64) for b in statistics])
    dist.all_reduce(flat)
    offset = 2
    for buffer in statistics:
        n = buffer.numel()
        buffer.copy_((flat[offset:offset + n] / ranks).view_as(buffer))
        offset += n
    return float(flat[0]), int(flat[1])


def train_epochs(model: nn.Module, loader, epochs: int, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, optimizer: torch.optim.Optimizer | None = None,
                 on_epoch_end=None, progress: bool = True, teacher: nn.Module | None = None,
                 distill: float = 0.0, temperature: float = 4.0,
                 loss_fn: LossFn | None = None, batch_size: int = 128,
                 zeros: str | None = None) -> torch.optim.Optimizer:
    """SGD with a cosine learning rate over ``epochs`` on cross-entropy (with ``teacher`` and
    ``distill``, on ``distillation_loss``; with ``loss_fn``, on it).

    ``loader``: any data form ``prunekit.prune`` takes (``batches_of``): a DataLoader, a map-style
    Dataset or ``(X, Y)`` tensors (in shuffled batches of ``batch_size``, drawn from torch's global
    RNG), or a function returning batches.

    ``on_epoch_end(epoch, mean_loss)`` is called after each epoch. Returns the optimizer
    (pass your own to hold masks on it, see ``MaskHold``).

    ``zeros``: the exact zeros of ``model``'s prunable weights (conv / linear / embedding): "keep"
    holds them at zero (the trained model stays as sparse: a model pruned by prunekit,
    torch.nn.utils.prune or another tool), "train" trains every weight. Default None: every weight
    trains, as torch training does. Only ``zeros="keep"`` holds zeros: a function given a model
    cannot tell weights just initialised with zeros in them (eye_, dirac_, block-diagonal,
    zero-init branches), which must train, from pruned weights loaded from a file, so it does what
    plain training does and, without your own ``optimizer``, a ``PrunekitWarning`` names
    ``zeros="keep"`` where some layer (not all zeros) is at least 10% exact zeros
    (``masks.NOTABLE_LAYER_SHARE``). With your own ``optimizer`` nothing is said (hold masks on it
    yourself, or pass ``zeros="keep"``).

    Raises ``TrainingDiverged`` (a ``PrunekitError``) naming the learning rate as soon as an
    epoch's mean loss or a weight is nan or inf, before ``on_epoch_end`` sees that epoch: ``model``
    is left holding the diverged weights (it trains in place); reload it to train again.
    """
    if zeros not in (None, "keep", "train"):
        raise PrunekitError(f'zeros must be "keep" (hold the weights that are exactly zero at zero), "train" (train '
                            'every weight) or None (train every weight, saying so where a layer is many zeros), '
                            f'got {zeros!r}')
    loader = batches_of(loader, "data", batch_size, shuffle=True, class_labels=loss_fn is None)
    hold = _zeros_to_hold(model, zeros, own_optimizer=optimizer is not None)
    if optimizer is None:
        optimizer = sgd(model, lr, momentum, weight_decay)
    schedule = cosine(optimizer, epochs * batches_per_pass(loader))
    from .masks import MaskHold
    with MaskHold(*hold, optimizer) if hold is not None else nullcontext():
        for epoch in range(epochs):
            loss = train_epoch(model, loader, optimizer, schedule, f"epoch {epoch + 1}/{epochs}", progress,
                               teacher, distill, temperature, loss_fn)
            check_converging(loss, model, _peak_lr(optimizer), f"epoch {epoch + 1}/{epochs}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, loss)
    model.eval()
    return optimizer


def _zeros_to_hold(model: nn.Module, zeros: str | None, own_optimizer: bool):
    """``train_epochs``'s ``zeros``: the (space, masks) to hold, or None to train every weight
    (``zeros`` None or "train"; None says so where some layer is a notable share exact zeros)."""
    if zeros == "train" or (zeros is None and own_optimizer):
        return None
    from .masks import NOTABLE_LAYER_SHARE, exact_zeros, masks_from_weights
    from .params import ParamSpace
    space = ParamSpace(model)
    found = exact_zeros(space)
    if zeros is None:
        if found.notable:
            warn_ours(PrunekitWarning(
                f"layer(s) {found.layers(notable=True)} of the model are at least {NOTABLE_LAYER_SHARE:.0%} exact "
                f"zeros ({found.zeros:,} of its prunable weights): trained like every weight, so the trained model "
                'is dense; if they were pruned, zeros="keep" holds them at zero'))
        return None
    return (space, masks_from_weights(space)) if found.zeros else None
