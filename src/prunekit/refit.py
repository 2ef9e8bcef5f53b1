"""Re-fit the kept weights of a pruned network, layer by layer, by least squares (after one shot).

A one-shot method chooses which weights stay and their values from a model of the loss around
the dense weights. ``refit`` then takes every pruned Conv2d / Linear in forward order and solves,
on a few training batches, for the kept weights that make the layer's outputs in the pruned network
closest to the dense layer's outputs (the zeros stay zeros: the budget does not move):

    for each output channel c:  w_c = argmin_{w : w_j = 0 off S_c} ||X w - y_c||² + λ||w||²

X (rows, D): the layer's inputs in the pruned network, whose earlier layers are already re-fit
(a conv's unfolded patches, D = C_in/groups·kh·kw, rows = images·positions); y_c: the dense layer's
output channel c on the same images; S_c: the channel's kept weights; λ = ``ridge`` × the mean
diagonal of XᵀX/rows. Both sides are accumulated over the batches, float32 products summed in
float64 (XᵀX (D, D) per group of a grouped conv, XᵀY (D, C_out/groups)), so memory does not grow
with the batches. A conv keeps about ``ROWS_PER_INPUT`` = 256 rows per input D, positions drawn at
random per image (a fixed seed): ResNet-20's first stage has 1,024 positions x 1,024 images for
D = 144, 28x more rows than that, and the products cost rows x D². Measured on ResNet-20-B
(session 32): the re-fit 0.74x the time, one-shot FALCON + re-fit the same to the third digit of
the training loss at 60 / 40 / 30 / 20% MACs.

**Judged on images the fit never saw.** Every ``HELD_OUT``-th image (1 in 8) is left out of the
sums above and summed apart; after the solve the layer moves from its pruned weights w0 towards the
solution w1 by the one step t ∈ [0, 1] (per layer) that minimises its output error on those
images, w0 + t(w1 − w0), in closed form (the error is quadratic in t); t = 0 leaves the layer as the
method made it. A fit can only reproduce its own images where its rows barely determine it: a
classifier of 2,048 inputs re-fit on 1,024 images (ResNet-50's), or inputs uncorrelated enough that
the kept weights as they are were already the best fit off the sample. In-sample errors cannot see
that; the held-out step does, and keeps what the fit gains elsewhere.

**What BatchNorm recalibration will do is built in.** A layer whose output goes straight into a
BatchNorm loses each output channel's mean and scale when the pruned network's statistics are
re-estimated, so only the direction of w_c matters there: such layers are fit on the centred
moments (Cov(X), Cov(X, Y)), which gives the direction most correlated with the dense output and
spends nothing on a mean the recalibration restores anyway. While the inputs are collected, every
BatchNorm of the pruned network normalises with its batch's statistics (what the recalibrated
network will see; its running statistics are not touched). Other layers (the classifier, a Linear
before a LayerNorm; every layer when the statistics will not be re-estimated) are fit on the raw
moments, with their bias when they have one. Measured on
ResNet-20-B (docs/benchmarks.md, session 30): one-shot FALCON at 40% MACs 89.18 -> 90.66% on
the 1,017 test images, training loss 0.136 -> 0.065.

The masked least squares is solved for all output channels of a group at once by conjugate
gradients (one (C, D) x (D, D) product per iteration), started at zero and preconditioned per
input channel: the inverse of each output channel's kh x kw block of its kept
taps, which carries the strong correlation of neighbouring pixels that a diagonal misses. They stop
at a relative residual of ``TOLERANCE``: on ResNet-20-B (30% MACs) 1e-3 takes at most 18 iterations
per layer where 1e-6 took up to 57, and the layers' output errors agree to four digits, far
below the sampling error of a few batches. At that tolerance a start at the pruned weights left
its trace in the weakly determined directions (MLPNet's near-constant border pixels: a start
moved by 2e-7, as a sharded solve moves it, moved the fit by 0.09), so two ranks and one process
re-fit differently; from zero the fit depends only on the support and the data, and takes about
as many iterations (session 33). The products stay float64: in float32 they are twice
as fast, but on badly conditioned layers (ResNet-50's last 3 x 3 convolutions with random weights)
CG then needed 56% more iterations. No D x D factorisation per channel is needed.

Skipped (left as pruned, named in the record): Conv2d with a padding mode other than zeros or
string padding, layers called more than once per forward (shared weights), layers the batches never
reach, and layers whose fit would raise their output error on the held-out images (t = 0).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import ranks_on_this_machine
from .layer_capture import capture, forward_order
from .lockstep import Lockstep
from .process_memory import available_memory, current_usage, parse_memory, release_freed_memory
from .layout import model_input
from .solvers.collective import Collective, shard_bounds

RIDGE = 1e-3           # λ as a share of the mean diagonal of XᵀX/rows
HELD_OUT = 8           # every HELD_OUT-th image is held out of a layer's fit to judge it (SplitMoments)
ROWS_PER_INPUT = 256   # a conv's rows are sampled down to about this many per input D (see Moments)
GATHER_BYTES = 32 << 20  # a conv's patches are gathered from at most about this many bytes of its input and output at once
TOLERANCE = 1e-3       # conjugate gradients stop at this residual, relative to the right-hand side
MAX_ITERATIONS = 1000
# Under torchrun the ranks share a layer's solve when its CG product, K·D² multiply-adds per
# iteration, is at least this (tens of milliseconds of one thread); a smaller one costs less than
# the collective each shared iteration takes, and rank 0 solves it alone.
SHARED_SOLVE_WORK = 10**8


def why_skipped(module: nn.Module) -> str | None:
    """Why ``module`` cannot be re-fit, or None if it can."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__}, not a Conv2d or Linear"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return "padding other than explicit zeros"
    return None


@functools.lru_cache(maxsize=256)
def sampled_positions(batch: int, images: int, positions: int, kept: int) -> torch.Tensor:
    """(images, kept) int64: which of each image's ``positions`` output positions a conv's re-fit
    rows take, drawn without replacement from a generator seeded by ``batch`` (the batch's index
    among the re-fit's batches). Every layer of the same shape and every stage's re-fit draws the
    same positions, so they are drawn once (the sort of images x positions random keys took 2.0 s
    of a profiled 101 s default FALCON++ run on ResNet-20-B). The tensor is shared: do not modify it."""
    generator = torch.Generator().manual_seed(batch)
    return torch.rand(images, positions, generator=generator).argsort(1)[:, :kept]


def patches_at(conv: nn.Conv2d, x: torch.Tensor, chosen: torch.Tensor, out_width: int) -> torch.Tensor:
    """The unfolded input patches of ``conv`` at some output positions only: x (N, C, H, W),
    ``chosen`` (N, P) indices into the N images' L = out_height x ``out_width`` output positions
    -> (N, C·kh·kw, P), equal to ``F.unfold(x, ...)`` gathered at ``chosen`` but without unfolding
    all L positions (9x the input's size for a 3 x 3 conv, most of it discarded when few are kept)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))                                     # (N, C, Hp, Wp)
    n, c, _, width = padded.shape
    corner = (chosen // out_width) * (sh * width) + (chosen % out_width) * sw   # (N, P): the patch's top left
    taps = (torch.arange(kh, device=x.device) * (dh * width)).view(kh, 1) + torch.arange(kw, device=x.device) * dw
    index = (taps.view(1, -1, 1) + corner.unsqueeze(1)).view(n, 1, -1)       # (N, 1, kh·kw·P)
    taken = padded.flatten(2).gather(2, index.expand(n, c, -1))             # (N, C, kh·kw·P)
    return taken.view(n, c * kh * kw, chosen.shape[1])


@dataclass
class Moments:
    """Sums over the rows of one layer, per group g: XᵀX (G, D, D), XᵀY (G, D, K), ΣX (G, D),
    ΣY (G, K), ΣY² (G, K), and the number of rows.

    ``positions``: a conv adds at most this many output positions per image (None: all), drawn at
    random without replacement, per image, seeded by the batch's index (:meth:`add`): the same rows
    on every run, whichever rank adds the batch. Early layers of a CNN have far more rows than a fit
    of D inputs needs (ResNet-20's first stage: 1,024 positions x 1,024 images for D = 144), and
    the products cost rows x D²."""

    xx: torch.Tensor
    xy: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    yy: torch.Tensor
    rows: int = 0
    positions: int | None = None

    @classmethod
    def zeros(cls, groups: int, d: int, k: int, device) -> "Moments":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)   # noqa: E731
        return cls(z(groups, d, d), z(groups, d, k), z(groups, d), z(groups, k), z(groups, k))

    @classmethod
    def of_layer(cls, layer: nn.Module, images: int | None = None) -> "Moments":
        """Zero sums shaped for ``layer`` (a Conv2d or Linear). ``images``: how many images will be
        added in all; a conv then keeps about ``ROWS_PER_INPUT`` x D rows of them, spread evenly
        over the images (None: every row)."""
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        weight = layer.weight
        moments = cls.zeros(groups, weight[0].numel(), weight.shape[0] // groups, weight.device)
        if images and isinstance(layer, nn.Conv2d):
            moments.positions = max(1, -(-ROWS_PER_INPUT * weight[0].numel() // images))
        return moments

    def add(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 0,
            images: torch.Tensor | None = None) -> None:
        """Add the rows of one batch: ``x`` the layer's input, ``y`` the target of its output
        ((N, C, H, W) for a Conv2d, (..., features) for a Linear); ``batch``: its index among the
        re-fit's batches, the seed of a conv's sampled positions; ``images``: the indices of the
        batch's images to add (None: all), as if ``x[images]`` and ``y[images]`` were passed, but
        without copying them whole. A conv's rows are its unfolded patches, one per image and
        output position (D = C_in/groups·kh·kw, in the order of its weight's last three axes).
        Products are taken in float32 over blocks of about 32 MB and summed in float64 (float64
        products of unfolded patches cost twice the time); each block's patches are gathered from
        at most about ``GATHER_BYTES`` of the layer's input and output at a time, so the batch's
        activations are never copied whole (a copy of the batch's fit images and a padded copy of
        the input took 0.5 GB beside the 128 images' activations on MobileNetV1 at 224 x 224)."""
        wide = torch.float64
        if isinstance(layer, nn.Conv2d):
            if images is None:
                images = torch.arange(int(y.shape[0]), device=y.device)
            groups = layer.groups
            n, positions = int(images.numel()), y.shape[2] * y.shape[3]
            k = y.shape[1] // groups
            d = x.shape[1] * layer.weight[0, 0].numel()                     # C_in·kh·kw
            chosen = None
            if self.positions is not None and positions > self.positions:
                chosen = sampled_positions(batch, n, positions, self.positions).to(y.device)   # (N, P)
                kept = self.positions
            else:
                kept = positions
            step = max(1, (32 << 20) // (4 * (d * kept + groups * k * kept
                                              + groups * (d // groups) * (d // groups + k))))
            # sampled positions: a block of images may span the whole batch, so its patches are gathered from
            # a few images at a time; all positions: the block's patches and outputs are within the block's
            # 32 MB already (its input too, but for a strided conv), and taken at once (as one tensor their
            # sums add in the order they always did)
            gather = max(1, GATHER_BYTES // (4 * (x[0].numel() + y[0].numel()))) if chosen is not None else step

            def rows(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
                """The patches (N', G, D, P) and outputs (N', G, K, P) of images[first:last]."""
                parts_x, parts_y = [], []
                for low in range(first, last, gather):
                    high = min(last, low + gather)
                    which = images[low:high]
                    xs, ys = x[which].float(), y[which].float()     # (indexing keeps their memory format)
                    ys = ys.reshape(high - low, groups, k, positions)
                    if chosen is not None:
                        picked = chosen[low:high]
                        cols = patches_at(layer, xs, picked, y.shape[3])
                        ys = ys.gather(3, picked.view(high - low, 1, 1, -1).expand(-1, groups, k, -1))
                    else:
                        cols = F.unfold(xs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                        stride=layer.stride)
                    parts_x.append(cols.view(high - low, groups, d // groups, kept))
                    parts_y.append(ys)
                return (torch.cat(parts_x) if len(parts_x) > 1 else parts_x[0],
                        torch.cat(parts_y) if len(parts_y) > 1 else parts_y[0])

            for first in range(0, n, step):
                xs, ys = rows(first, min(n, first + step))
                if kept >= xs.shape[2]:               # one product per image beats a copy into one GEMM
                    self.xx += (xs @ xs.transpose(2, 3)).sum(0).double()
                    self.xy += (xs @ ys.transpose(2, 3)).sum(0).double()
                else:                                 # few positions: (G, D, images·L) in one GEMM
                    xg = xs.permute(1, 2, 0, 3).reshape(groups, xs.shape[2], -1)
                    yg = ys.permute(1, 2, 0, 3).reshape(groups, ys.shape[2], -1)
                    self.xx += (xg @ xg.transpose(1, 2)).double()
                    self.xy += (xg @ yg.transpose(1, 2)).double()
                self.sx += xs.sum(3).sum(0).double()         # the last axis first: contiguous, fast
                self.sy += ys.sum(3).sum(0).double()
                self.yy += ys.square().sum(3).sum(0).double()
            self.rows += n * kept
            return
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        selected = None
        if images is not None:                      # the rows of the chosen images (each holds r rows)
            r = flat_x.shape[0] // int(x.shape[0])
            selected = (images.view(-1, 1) * r + torch.arange(r, device=images.device)).flatten()
        count = flat_x.shape[0] if selected is None else int(selected.numel())
        step = max(1, (32 << 20) // (4 * (flat_x.shape[1] + flat_y.shape[1])))
        for first in range(0, count, step):
            if selected is None:
                xs, ys = flat_x[first:first + step].float(), flat_y[first:first + step].float()
            else:
                which = selected[first:first + step]
                xs, ys = flat_x.index_select(0, which).float(), flat_y.index_select(0, which).float()
            self.xx[0] += (xs.t() @ xs).double()
            self.xy[0] += (xs.t() @ ys).double()
            self.sx[0] += xs.sum(0, dtype=wide)
            self.sy[0] += ys.sum(0, dtype=wide)
            self.yy[0] += (ys * ys).sum(0, dtype=wide)
        self.rows += count

    def all_reduce(self, collective: Collective) -> None:
        """Sum the moments over the ranks of ``collective`` (each added its share of the batches),
        in one collective; every rank then holds the same sums."""
        parts = (self.xx, self.xy, self.sx, self.sy, self.yy)
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=self.xx.device)
        total = collective.all_reduce(torch.cat([*(t.flatten() for t in parts), rows]))
        sizes = [t.numel() for t in parts]
        for t, summed in zip(parts, total[:sum(sizes)].split(sizes)):
            t.copy_(summed.view_as(t))
        self.rows = int(total[-1])

    def normal_equations(self, centred: bool, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (G, D', D'), B (G, D', K), Σy² per output (G, K)), all divided by the rows: the
        centred moments when ``centred``; with ``bias`` a last column of ones (D' = D + 1)."""
        n = max(self.rows, 1)
        xx, xy, yy = self.xx / n, self.xy / n, self.yy / n
        mx, my = self.sx / n, self.sy / n
        if centred:
            return (xx - mx.unsqueeze(2) * mx.unsqueeze(1), xy - mx.unsqueeze(2) * my.unsqueeze(1),
                    yy - my * my)
        if bias:
            g, d = mx.shape
            a = torch.zeros(g, d + 1, d + 1, dtype=xx.dtype, device=xx.device)
            a[:, :d, :d], a[:, :d, d], a[:, d, :d], a[:, d, d] = xx, mx, mx, 1.0
            return a, torch.cat([xy, my.unsqueeze(1)], 1), yy
        return xx, xy, yy


def held_out_images(n: int, batch: int, every: int = HELD_OUT) -> torch.Tensor:
    """(n,) bool: which of a batch's n images are held out of the fit: every ``every``-th of the
    re-fit's images, counted as if every batch held n (by the batch's index, so the same images on
    every rank); none when ``every`` is 0."""
    if every <= 0:
        return torch.zeros(n, dtype=torch.bool)
    return (torch.arange(n) + batch * n) % every == every - 1


@dataclass
class SplitMoments:
    """A layer's moments in two parts: ``fit`` over most images, ``held`` over every ``every``-th
    image (:func:`held_out_images`; 0: none), which the fit never sees; :func:`fit_layer` judges
    the fit on them. The held part samples as many conv positions per image as the fit part."""

    fit: Moments
    held: Moments
    every: int = HELD_OUT

    @classmethod
    def of_layer(cls, layer: nn.Module, images: int | None = None, every: int = HELD_OUT) -> "SplitMoments":
        fit = Moments.of_layer(layer, images - images // every if images and every > 0 else images)
        held = Moments.of_layer(layer)
        held.positions = fit.positions
        return cls(fit, held, every)

    def add(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 0) -> None:
        """:meth:`Moments.add` of a batch (its first axis the images; a tensor without one is all fit)."""
        if x.dim() < 2 or x.shape[0] != y.shape[0]:
            self.fit.add(layer, x, y, batch)
            return
        held = held_out_images(x.shape[0], batch, self.every).to(x.device)
        fit, judged = (~held).nonzero().flatten(), held.nonzero().flatten()     # indices: no copies of x, y
        if fit.numel():
            self.fit.add(layer, x, y, batch, fit)
        if judged.numel():
            self.held.add(layer, x, y, batch, judged)

    def all_reduce(self, collective: Collective) -> None:
        self.fit.all_reduce(collective)
        self.held.all_reduce(collective)


def _block_preconditioner(system: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """(K, C, s, s): per row and block of ``block`` consecutive entries (a conv's input channel:
    its kh·kw taps), the inverse of ``system``'s block restricted to the row's support (identity
    off it). system (D, D) with D = C·s; mask (K, D)."""
    k, d = mask.shape
    c = d // block
    diagonal_blocks = system.reshape(c, block, c, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # (C, s, s)
    m = mask.to(system.dtype).reshape(k, c, block)
    restricted = diagonal_blocks.unsqueeze(0) * m.unsqueeze(3) * m.unsqueeze(2)
    restricted = restricted + torch.diag_embed(1 - m)
    return torch.linalg.inv(restricted)


def masked_least_squares(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, start: torch.Tensor,
                         penalty: torch.Tensor, tolerance: float = TOLERANCE, block: int = 1,
                         collective: Collective | None = None) -> tuple[torch.Tensor, int]:
    """Minimise wᵀ(A + diag(penalty))w − 2bᵀw for each row w of (K, D) over the entries ``mask``
    (K, D) allows (others 0); A (D, D) symmetric positive semi-definite, b: (D, K), penalty (D,)
    ≥ 0 with A + diag(penalty) positive definite on every row's support. Conjugate gradients on
    all rows at once, from ``start`` (K, D), until every row's residual is below ``tolerance`` x its
    right-hand side, preconditioned by the inverse of each row's diagonal blocks of ``block``
    consecutive entries (1: the diagonal; a conv's kh·kw taps of one input channel); when D is not
    a multiple of ``block`` the last D mod block entries (a bias) get their diagonal. Returns the
    rows (K, D) and the iterations run. ``collective``: each rank holds some of the rows (K may be
    0) and all iterate until every rank's rows are done, so a row gets the iterations it would get
    in one process."""
    system = a + torch.diag(penalty)
    m = mask.to(system.dtype)
    d = system.shape[0]
    blocked = (d // block) * block if block > 1 else 0
    diagonal = system.diagonal().clamp_min(torch.finfo(system.dtype).tiny)
    blocks = _block_preconditioner(system[:blocked, :blocked], mask[:, :blocked], block) if blocked else None

    def precondition(r):
        if blocks is None:
            return r / diagonal
        z = r / diagonal
        z[:, :blocked] = (blocks @ r[:, :blocked].reshape(r.shape[0], blocked // block, block, 1)).reshape(
            r.shape[0], blocked)
        return z * m

    w = start.to(system.dtype) * m
    residual = (b.t() - w @ system) * m                   # the negative half-gradient, on the support
    scale = (b.t() * m).norm(dim=1).clamp_min(torch.finfo(system.dtype).tiny)
    z = precondition(residual)
    direction = z.clone()
    rz = (residual * z).sum(1)
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):
        done = (residual.norm(dim=1) <= tolerance * scale).all()
        if collective is not None and collective.distributed:
            done = collective.all_reduce_max((~done).to(torch.int64).reshape(1)) == 0
        if bool(done):
            iterations -= 1
            break
        product = (direction @ system) * m
        curvature = (direction * product).sum(1)
        step = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(system.dtype).tiny),
                           torch.zeros_like(rz))
        w += step.unsqueeze(1) * direction
        residual -= step.unsqueeze(1) * product
        z = precondition(residual)
        rz_next = (residual * z).sum(1)
        direction = z + (rz_next / rz.clamp_min(torch.finfo(system.dtype).tiny)).unsqueeze(1) * direction
        rz = rz_next
    return w, iterations


def _objective(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """Mean squared output error per row of w (K, D): wᵀAw − 2bᵀw + Σy²/rows."""
    return ((w @ a) * w).sum(1) - 2 * (w * b.t()).sum(1) + yy


def normalised_layers(model: nn.Module, names: list[str], x: torch.Tensor) -> set[str]:
    """Those of ``names`` whose output is the input of a BatchNorm (checked on one forward of ``x``)."""
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}     # the tensors are held: no id is reused
    found: set[str] = set()

    def is_input(_module, args):
        name, output = outputs.get(id(args[0]), ("", None))
        if output is args[0]:
            found.add(name)

    handles = [modules[n].register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(id(out), (n, out)))
               for n in names]
    handles += [m.register_forward_pre_hook(is_input)
                for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


class _BatchStatistics:
    """Within the block: every BatchNorm of ``model`` normalises with its batch's statistics and
    leaves its running statistics as they were (momentum 0); other modules stay in eval mode."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.training, m.momentum) for m in self.norms]
        for m in self.norms:
            m.train()
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, (training, momentum) in zip(self.norms, self.saved):
            m.train(training)
            m.momentum = momentum


def _kept(layer: nn.Module, y: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The dense output ``y`` of ``layer`` at its output channels ``keep`` (None: all)."""
    if keep is None:
        return y
    return y.index_select(1 if isinstance(layer, nn.Conv2d) else y.dim() - 1, keep.to(y.device))


def truncated_moments(model: nn.Module, dense: nn.Module, name: str, batches: list[torch.Tensor],
                      batch_statistics: bool = True, keep: torch.Tensor | None = None,
                      collective: Collective | None = None, held_out: int = HELD_OUT) -> SplitMoments:
    """The moments of layer ``name``: its inputs in ``model`` (BatchNorm on batch statistics when
    ``batch_statistics``) against the dense layer's outputs, from one forward of each network per
    batch that stops at the layer (for networks :class:`Lockstep` cannot run). ``collective``: each
    rank adds every size-th batch from its rank on, and the sums are all-reduced. ``held_out``: every
    such image is held out of the fit (:class:`SplitMoments`)."""
    collective = collective or Collective()
    layer, target = model.get_submodule(name), dense.get_submodule(name)
    moments = SplitMoments.of_layer(layer, sum(int(x.shape[0]) for x in batches), held_out)
    device = layer.weight.device
    for index in range(collective.rank, len(batches), collective.size):
        x_model = model_input(model, batches[index], device)   # before the block: its layout probe sets eval mode
        with _BatchStatistics(model) if batch_statistics else contextlib.nullcontext():
            inputs = capture(model, layer, x_model, "input")
        target_outputs = capture(dense, target, model_input(dense, batches[index], device), "output")
        moments.add(layer, inputs, _kept(layer, target_outputs, keep), index)
    moments.all_reduce(collective)
    return moments


def fit_layer(layer: nn.Module, moments: Moments | SplitMoments, centred: bool, ridge: float = RIDGE,
              collective: Collective | None = None) -> dict:
    """Re-fit the kept weights of ``layer`` from its ``moments`` (see the module doc), on the centred
    moments when ``centred``. With :class:`SplitMoments` the least squares is solved on the fit
    part and the layer then moves from its weights w0 towards that solution w1 by the step
    t ∈ [0, 1] that minimises the output error on the held-out images (w0 + t(w1 − w0), one t per
    layer, in closed form: the error is quadratic in t); t = 0 leaves the layer as it was. With
    plain :class:`Moments` the solution is taken whole if it lowers the error on the same rows.
    Returns the layer's figures: relative output error before and after (on the held-out images
    when there are any), the step, conjugate-gradient iterations, whether it was changed.
    ``collective``: the ranks (all holding the same moments) share the output channels, each solving
    a contiguous range of them (rank 0 all of them below ``SHARED_SOLVE_WORK``), and gather the
    result, so every rank ends with the same layer."""
    collective = collective or Collective()
    held_moments = moments.held if isinstance(moments, SplitMoments) and moments.held.rows else None
    moments = moments.fit if isinstance(moments, SplitMoments) else moments
    weight = layer.weight.detach()
    groups = moments.xx.shape[0]
    bias = layer.bias is not None and not centred
    a, b, yy = moments.normal_equations(centred, bias)
    a_held, b_held, yy_held = held_moments.normal_equations(centred, bias) if held_moments else (a, b, yy)
    per_group = weight.shape[0] // groups
    flat = weight.reshape(groups, per_group, -1).double()                   # (G, K, D)
    if bias:
        flat = torch.cat([flat, layer.bias.detach().double().view(groups, per_group, 1)], 2)
    mask = flat != 0
    if bias:
        mask[..., -1] = True
    total_rows = groups * per_group
    shared = collective.distributed and total_rows * a.shape[1] ** 2 >= SHARED_SOLVE_WORK
    if shared:                                 # this rank's output rows
        low, high = shard_bounds(total_rows, collective.size)[collective.rank]
    else:                                      # rank 0 solves them all: cheaper than a collective per iteration
        low, high = (0, total_rows) if collective.rank == 0 else (total_rows, total_rows)
    solved, iterations = [], 0
    # Σ over this rank's rows of: the judged error at w0, its slope along w1 − w0 (halved) and curvature
    judged = flat.new_zeros(3)
    taps = layer.weight[0, 0].numel() if isinstance(layer, nn.Conv2d) else 1     # kh·kw per input channel
    for g in range(groups):                    # (every rank, also with no rows of g: it solves in step)
        first = min(max(low - g * per_group, 0), per_group)
        rows = slice(first, max(first, min(high - g * per_group, per_group)))
        start, kept_mask = flat[g, rows], mask[g, rows]
        d = a.shape[1] - (1 if bias else 0)
        scale = float(a[g].diagonal()[:d].mean()) if d else 0.0
        penalty = torch.full((a.shape[1],), ridge * max(scale, 1e-300), dtype=a.dtype, device=a.device)
        if bias:
            penalty[-1] = 0.0
        fitted, used = masked_least_squares(a[g], b[g][:, rows], kept_mask, torch.zeros_like(start), penalty,
                                            TOLERANCE, taps, collective if shared else None)
        # A weight on an input that never varies (a channel cut away upstream, centred away) solves
        # to exactly 0; it keeps its value instead, so the re-fit never moves the method's support.
        fitted = torch.where(kept_mask & (fitted == 0), start, fitted)
        iterations = max(iterations, used)
        solved.append(fitted)
        step = fitted - start
        judged += torch.stack([_objective(start, a_held[g], b_held[g][:, rows], yy_held[g][rows]).sum(),
                               ((start @ a_held[g] - b_held[g][:, rows].t()) * step).sum(),
                               ((step @ a_held[g]) * step).sum()])
    mine = torch.cat([f.flatten() for f in solved]) if solved else flat.new_zeros(0)
    fitted = collective.all_gather(mine).view_as(flat)
    before, slope, curvature = (float(v) for v in collective.all_reduce(judged))
    iterations = int(collective.all_reduce_max(torch.tensor([iterations], device=flat.device)))
    if held_moments is None:                   # the whole solution, if it fits these rows better
        t = 1.0 if 2 * slope + curvature <= 0 else 0.0
    else:                                      # the best step on the held-out images
        t = min(1.0, max(0.0, -slope / curvature)) if curvature > 0 else (1.0 if slope < 0 else 0.0)
    total = float(yy_held.sum()) or 1.0
    error_before, error_after = before / total, (before + 2 * t * slope + t * t * curvature) / total
    kept = t > 0
    if kept:
        fitted = flat + t * (fitted - flat)
        with torch.no_grad():
            if bias:
                layer.bias.copy_(fitted[..., -1].reshape(-1).to(layer.bias.dtype))
                fitted = fitted[..., :-1]
            layer.weight.copy_((fitted * (flat[..., :weight[0].numel()] != 0)).reshape(weight.shape).to(weight.dtype))
    return {"error_before": error_before, "error_after": error_after, "step": t, "iterations": iterations,
            "kept": kept, "held_out": held_moments is not None}


_MEMORY_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("refit_memory_cap", default=None)


@contextlib.contextmanager
def memory_cap(max_memory):
    """Within it, :func:`lockstep_allowance` keeps under the user's ``max_memory`` (bytes or a size
    like "6G", per process; None: the machine's memory alone), as the memory plan does."""
    token = _MEMORY_CAP.set(None if max_memory is None else parse_memory(max_memory))
    try:
        yield
    finally:
        _MEMORY_CAP.reset(token)


def lockstep_allowance(device: torch.device) -> int:
    """Bytes the two networks' activations of all batches may take at once for the re-fit to run
    them in lockstep (half the memory available now, on this machine: its ranks share it); above
    it, truncated forwards per layer."""
    available, cap = available_memory(device), _MEMORY_CAP.get()
    if cap is not None:
        available = min(available, max(0, cap - current_usage(device)) * ranks_on_this_machine())
    return available // 2


@torch.no_grad()
def lockstep_bytes(model: nn.Module, x: torch.Tensor) -> int | None:
    """Bytes of activations :class:`Lockstep` holds at once running ``model`` on ``x`` (as the model
    takes it; the re-fit holds twice that: both networks), or None when it cannot run ``model``
    (the re-fit then forwards each layer's batches truncated). The model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return Lockstep(model).check(model, x)
    except Exception:                           # tracing fails in many ways on user models
        return None
    finally:
        model.train(was_training)


def lockstep_images(model: nn.Module, x: torch.Tensor) -> int | None:
    """How many images like ``x`` (one, as the model takes it) the re-fit can run in lockstep:
    both networks' activations of all of them within :func:`lockstep_allowance`; None when the
    model cannot run in lockstep."""
    per_image = lockstep_bytes(model, x)
    return None if per_image is None else lockstep_allowance(x.device) // (2 * max(per_image, 1))


def _lockstep(model: nn.Module, dense: nn.Module, x: torch.Tensor, images: int,
              collective: Collective) -> tuple[Lockstep | None, str]:
    """A :class:`Lockstep` of ``model`` when it can be traced, reproduces the eager forward on ``x``
    (one image, as the model takes it) and holds both networks' activations of this rank's
    ``images`` within :func:`lockstep_allowance` (shared by the ranks on this machine), on every
    rank; else None and why."""
    try:
        lockstep = Lockstep(model)
        peak = lockstep.check(dense, x)
    except Exception as error:                  # tracing fails in many ways on user models
        lockstep, why = None, f"not traceable by torch.fx ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
    else:
        need, have = 2 * peak * images, lockstep_allowance(x.device) // ranks_on_this_machine()
        why = "" if need <= have else f"the batches' activations need {need / 2**30:.1f} GiB at once, {have / 2**30:.1f} GiB allowed"
    if collective.distributed and bool(collective.all_reduce_max(torch.tensor([float(bool(why))], device=x.device))):
        return None, why or "another rank cannot run the networks in lockstep"
    return (None, why) if why else (lockstep, "")


@torch.no_grad()
def refit(model: nn.Module, dense: nn.Module, names: list[str], batches: list[torch.Tensor], *,
          ridge: float = RIDGE, recalibrated: bool = True, progress: bool = False,
          outputs: dict[str, torch.Tensor] | None = None, collective: Collective | None = None,
          held_out: int = HELD_OUT) -> dict:
    """Re-fit, in forward order, the layers ``names`` (Conv2d / Linear of ``model``, pruned from
    ``dense``, which has the same structure) on the input batches ``batches`` (each (N, ...)).
    ``recalibrated``: ``model``'s BatchNorm statistics will be re-estimated after, so its inputs are
    collected on batch statistics and the layers that feed a BatchNorm fit on centred moments;
    False: on its running statistics, every layer on raw moments. Both networks run once over all
    batches, node by node (:class:`prunekit.lockstep.Lockstep`), where ``torch.fx`` can trace them
    and memory allows; else one truncated forward per layer and batch. The models' modes are
    restored after. ``outputs``: per layer name, the dense layer's output channels (k,) that the
    layer of ``model`` keeps, when ``model`` is ``dense`` with channels cut (None: the same shapes).
    ``collective``: the ranks, which all pass the same ``batches`` and models, share the work: each
    runs every size-th batch from its rank on, the layers' moments are summed over the ranks and
    each rank solves a share of the output channels (:func:`fit_layer`), so every rank ends with
    the same weights; None: one process. ``held_out``: every such image of the batches is held out
    of the fits and judges them (:func:`fit_layer`); 0: none, each layer takes its whole solution
    if it lowers the error on the rows it was fit on.

    Returns the record: layers re-fit (centred among them) and skipped (with why), the mean relative
    output error before and after (on the held-out images), the mean step towards the solutions and
    how many layers took less than all of it, how the inputs were collected, the calibration images,
    seconds.
    """
    start = time.perf_counter()
    keep = outputs or {}
    collective = collective or Collective()
    mine = list(range(collective.rank, len(batches), collective.size))     # this rank's batches
    modes = [(m, m.training) for m in (*model.modules(), *dense.modules())]
    model.eval()
    dense.eval()
    try:
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        skipped = {n: why for n in names if (why := why_skipped(modules[n])) is not None}
        # the order, the layers that feed a BatchNorm and the lockstep's check from the first image alone:
        # on the whole first batch they held every layer's output of it at once (MobileNetV1 at 224 x 224,
        # 128 images: 2.4 GB above the re-fit's start, more than the re-fit itself)
        first = batches[0][:1].to(device)
        order, unseen = forward_order(model, [n for n in names if n not in skipped], first)
        skipped.update(unseen)
        centred = normalised_layers(model, order, first) if recalibrated else set()
        mine_images = sum(int(batches[i].shape[0]) for i in mine)
        lockstep, why_not = _lockstep(model, dense, model_input(dense, first, device), mine_images, collective)
        errors: dict[str, dict] = {}
        if lockstep is not None and set(order) <= lockstep.called_once:
            bar = _progress(len(order), progress)

            def at_layer(name, inputs, dense_outputs):
                # the heap's freed blocks (the nodes' outputs run since the last layer, the last fit's
                # patches and moments) go back before and after each fit: blocks under glibc's mmap
                # threshold stay resident once freed, and the next nodes' new sizes do not reuse them
                # (MobileNetV1 at 224 x 224, 32 images: the re-fit phase peaked 650 MB above its start,
                # 460 with this; allocation only, the fits are the same)
                release_freed_memory()
                moments = SplitMoments.of_layer(modules[name], images, held_out)
                for index, x, y in zip(mine, inputs, dense_outputs):
                    moments.add(modules[name], x, _kept(modules[name], y, keep.get(name)), index)
                moments.all_reduce(collective)
                errors[name] = fit_layer(modules[name], moments, name in centred, ridge, collective)
                del moments
                release_freed_memory()
                bar.update()

            images = sum(int(x.shape[0]) for x in batches)
            inputs = [model_input(model, batches[i], device) for i in mine]     # (its layout probe sets eval mode)
            dense_inputs = [model_input(dense, batches[i], device) for i in mine]
            with _BatchStatistics(model) if recalibrated else contextlib.nullcontext():
                lockstep.run(model, dense, inputs, dense_inputs, set(order), at_layer)
            bar.close()
            forwards = "one per network (torch.fx graph)"
        else:
            why_not = why_not or "the traced graph calls a layer more than once"
            for name in _progress_names(order, progress):
                moments = truncated_moments(model, dense, name, batches, recalibrated, keep.get(name), collective,
                                            held_out)
                errors[name] = fit_layer(modules[name], moments, name in centred, ridge, collective)
                del moments
                release_freed_memory()          # (as in the lockstep's at_layer)
            forwards = f"one truncated forward per layer: {why_not}"
        for name, figures in errors.items():
            if not figures["kept"]:
                skipped[name] = "the fit would raise its output error" + (" on the held-out images"
                                                                         if figures["held_out"] else "")
    finally:
        for module, mode in modes:
            module.training = mode
    done = [e for n, e in errors.items() if e["kept"]]
    mean = lambda key: sum(e[key] for e in done) / len(done) if done else None  # noqa: E731
    return {"layers": len(done), "centred": len(centred & {n for n, e in errors.items() if e["kept"]}),
            "skipped": len(skipped), "skipped_why": [f"{n}: {why}" for n, why in skipped.items()],
            "batches": len(batches), "images": sum(int(x.shape[0]) for x in batches), "ridge": ridge,
            "ranks": collective.size,
            "forwards": forwards,
            "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after"),
            "held_out_images": sum(int(held_out_images(int(x.shape[0]), i, held_out).sum()) for i, x in enumerate(batches)),
            "mean_step": mean("step"), "shrunk": sum(0 < e["step"] < 1 for e in errors.values()),
            "max_iterations": max((e["iterations"] for e in errors.values()), default=0),
            "seconds": time.perf_counter() - start}


class _NoBar:
    def update(self):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc="re-fit layers", unit="layer")


def _progress_names(names: list[str], enabled: bool):
    bar = _progress(len(names), enabled)
    for name in names:
        yield name
        bar.update()
    bar.close()
