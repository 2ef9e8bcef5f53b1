"""A memory plan for the quadratic-model methods, made before any gradient is computed.

The peak of a request is estimated from its parts, each counted from the model itself:

    resident now         what the process already holds (model, data, the Python runtime), plus the
                         data it will still decode (``data_to_load``: the commands scan an image
                         folder, plan, and decode only if the plan passes; the bytes it counts are
                         the decoded array's, and a CPU run only: on a GPU resident is its tensors)
  + X                    n × p in the storage dtype (the gradient matrix; usually dominant)
  + the larger of the gradient phase (stage vectors + activations + layer gradients) and the
    solver phase:
    stage vectors        the stage loop's p-long vectors, made before the gradients and held
                         through them (STAGE_VECTOR_BYTES: MACs, weights, free mask and index).
                         Measured on random weights, 2 threads, n = 8 (the solver's terms cut,
                         so that the gradient phase decides small models): ResNet-50's gradient
                         phase peaked 0.37 GB above the plan without them; MobileNetV1's whole
                         peak was 9-12 % above the plan without them and 50 more MB of
                         BACKWARD_OVERHEAD, 1-7 % above with them only (three runs each).
    activations          one chunk of samples through the model with autograd: the bytes autograd
                         saves for the backward pass plus the prunable layers' inputs, measured
                         on one sample (saved-tensor hooks), times the chunk, times
                         ACTIVATION_FACTOR. Calibrated on ResNet-20-B, MobileNetV1 and
                         ResNet-50 (chunks of 8-64): within about 10 % of the measured phase.
                         Not counted: freed blocks glibc keeps on its heap. An M5-like Conv1d net
                         (per-chunk tensors of 31 MB, just under the largest mmap threshold)
                         peaked at 293-427 MB in identical runs against 250 planned, 178-180 MB
                         with every block over 1 MiB returned on free (docs/benchmarks.md).
                         Rows with BatchNorm on batch statistics (fisher_bn="batch") forward a
                         whole mini-batch of fisher_batch samples at once, measured in that mode
                         (BatchNorm then saves its input and statistics too).
    layer gradients      the largest layer's per-sample gradients for a chunk, the check of
                         the first row against autograd (2p floats), BACKWARD_OVERHEAD. A model
                         with a prunable weight the per-layer hooks do not handle (attention's
                         packed projection, a custom layer) takes the whole-model vmap path,
                         which holds every weight's per-sample gradient for the chunk (chunk × p
                         float32): counted, and the chunk capped so that it stays under
                         ACTIVATION_BUDGET (on a GPU, where X is allocated at once, ResNet-50's
                         peak exceeded an estimate without it by 3.6 GB). So does a model whose
                         layers the hooks handle but whose calls they cannot write rows for (the
                         collector's run-time fallback: a convolution on an unbatched input or on a
                         sample's frames folded into the batch, a Linear whose sample dimension is
                         not the samples): the probing forward applies the collector's own test
                         (layer_grads.call_mismatch) to each such call, for one sample (mini-batch
                         rows: the test for summed rows). A clip net with a folded Conv2d (p = 2.1M,
                         chunk 64, bfloat16 X) was planned at 185 MB of gradient phase against
                         389-396 measured; it is planned at 634 now. (On a CPU the phase measured
                         beside X is lower than chunk × p float32 by the last chunk's rows of X,
                         whose pages are not yet touched at the peak.)
    solver work arrays   per weight, what the solver holds at its peak (solver_bytes_per_weight):
                         one-process CHITA its live arrays, CHITA_BYTES_PER_WEIGHT (84, measured
                         at the swap search's peak), WoodFisher WOODFISHER_BYTES_PER_WEIGHT (48)
                         beside its block inverses (p × B float32, one allocation), FALCON
                         FALCON_SOLVER_VECTORS float64 (below); the sliced (torchrun) solvers
                         SOLVER_VECTORS float64 of p/R each with R ranks, plus REPLICATED_VECTORS
                         whole float32 ones. CHITA and WoodFisher add HEAP_RETAINED_BYTES (40)
                         when a float32 p-long vector is under glibc's largest mmap threshold
                         (32 MB, p < 8.4M): such blocks come from the heap, and the freed ones stay
                         resident (this, not a different solver, is why one constant could not
                         fit MobileNetV1, p = 4.2M, 123 B/weight above its solver entry, and
                         ResNet-50, p = 25.5M, 81). Then the stage loop's own vectors
                         (PIPELINE_BYTES_PER_WEIGHT), a few n × n float64 factors, two column
                         blocks; CHITA's IHT active set holds 1.5k columns of X (one copy:
                         quadratic.select_columns gathers them row by row). Measured for one-process
                         FALCON on ResNet-50 (n = 8, float32 X, random weights, 2 threads): 4.9 GB
                         peak RSS (144 B/weight beside X) before the solver's arrays were cut,
                         3.5 GB (87 B/weight) after, 3.6 GB once the ILP kept its last order; the plan counts 96
                         and SOLVER_OVERHEAD.
    judge                (layer search, FALCON++'s final pick) beside the solver: the training
                         batches it holds (JUDGE_BATCHES of judge_batch samples, the inputs'
                         bytes) and one forward pass without autograd of a batch, counted as
                         INFERENCE_FACTOR times the largest module output per sample.
  or, instead of X and the phases above (the stage loop frees X before it), the re-fit of the
  kept weights (``prunekit.refit``, on by default since session 33; refit_samples images):
    activations          both networks' activations on all the images at once (under torchrun
                         the images of a rank's share of the batches, the last batch holding
                         the rest: refit_rank_images, not whole batches): the lockstep's
                         own count for one sample (refit.lockstep_bytes, what Lockstep.check
                         measures) times the images, times REFIT_ACTIVATION_FACTOR; or one batch
                         of INFERENCE_FACTOR x the largest output per sample where that exceeds
                         the re-fit's allowance (refit.lockstep_allowance: it then runs truncated
                         forwards); and the images' inputs (twice: each network's layout);
    solve                the largest layer's float64 moments and normal equations (6 D x D per
                         group: fit and held-out images) and its block preconditioner (K x D x kh·kw);
    copies               the re-fit layers' parameters before and after (two float32 copies,
                         the loss check's), the stage loop's vectors and the kept candidate;
    judge                the loss check after it, its own phase (MemoryPlan.phases): the copies,
                         REFIT_JUDGE_VECTORS p-long vectors, one batch (it reads its batches afresh
                         from the loader rather than holding them) as JUDGE_INPUT_COPIES of its
                         inputs, and a forward pass (not beside the activations: they are freed by
                         then). The re-fit and the judge hand freed heap back around each layer's
                         fit and each read (session 48: on MobileNetV1 at 224 x 224 that heap was
                         the 450-500 MB neither phase's term held).
                         Measured on ResNet-20-B at 60 % MACs, the re-fit's default 1,024
                         images: one-shot FALCON (n = 1000) ran the re-fit beside X before
                         session 34, 1,978 MB peak against 1,664 planned; now 1,574 against
                         1,657. Default FALCON++ (n = 500, five re-fits) 1,481 against 1,141
                         before, 1,153-1,183 against 1,137-1,140 now: its peak is a later
                         stage's gradient phase (entered about 50 MB above the first's), no
                         longer the re-fit, which peaks about 60 MB under its plan there.

The plan refuses a request whose estimate exceeds the limit (``max_memory``; default: the memory
available to this process, from /proc/meminfo and the cgroup limit, less a margin) in one line
naming the largest n that fits in each storage dtype with SUGGESTION_SPARE to spare (what the process
holds moves by some 10 MB between runs: the n suggested is still accepted then), and resolves ``fisher_samples="auto"`` to
the largest n ≤ 1000 that fits. It also picks the chunk: as many samples as keep the activations
under ACTIVATION_BUDGET (at most 64).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from . import attention_explicit, layer_grads
from .errors import PrunekitError
from .fisher_batches import check_sample_count
from .fisher_hooks import hooked_layers      # the collector's own layers (and test): not a copy
from .memory_probe import activation_bytes, inference_bytes
from .options import OptionError
from .process_memory import current_usage, default_limit, parse_memory
from .refit import ROWS_PER_INPUT as REFIT_ROWS_PER_INPUT, lockstep_allowance, lockstep_bytes

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATION_FACTOR = 1.0          # saved tensors are freed as the backward pass goes (calibrated)
BACKWARD_OVERHEAD = 100 * 2**20  # the backward pass's own buffers and the data batch being read (calibrated:
                                 # MobileNetV1's gradient phase alone, chunk 8, measured 518 MB against
                                 # 427 MB planned with 50 MB here, 37 MB of it the batch of 64 inputs;
                                 # ResNet-50's, chunk 8, 968 MB against 972; both random, 2 threads)
ACTIVATION_BUDGET = 2 * 2**30    # bytes of activations a chunk may take
MAX_CHUNK = 64
SOLVER_VECTORS = 12              # p-long float64 vectors alive at once in the sliced (torchrun) solvers
                                # (counted; not re-measured) and any other one-process solver. CHITA and
                                # WoodFisher in one process count their measured bytes instead (below):
                                # with these 96 B/weight the plan was 21 % over ResNet-50's CHITA peak
                                # and 4 % over MobileNetV1's (glibc's heap, HEAP_RETAINED_BYTES)
CHITA_BYTES_PER_WEIGHT = 84      # one-process CHITA's live p-long arrays at its peak (the swap search: the
                                # supports and their backsolved points and gradients, H's diagonal, the
                                # IHT and magnitude solutions, the scores' temporaries and top-k sort),
                                # float32 products, n = 8, keep 0.3; measured above X: 83 B/weight on a
                                # p = 10M problem (random X), 81 on ResNet-50 (p = 25.5M) above the RSS
                                # it enters the solver at. The IHT active set's columns are counted apart
WOODFISHER_BYTES_PER_WEIGHT = 48  # WoodFisher's p-long arrays beside its block inverses (w, the diagonal
                                # of the inverses, saliencies and their temporaries, the pruned mask,
                                # the top-k removals); measured with HEAP_RETAINED_BYTES: 80 on
                                # p = 65k-262k (random X, n = 8 and 64)
HEAP_RETAINED_BYTES = 40        # bytes per weight of freed p-long blocks that stay resident when those
                                # blocks are under glibc's mmap threshold (it rises to at most
                                # MMAP_THRESHOLD_MAX as large blocks are freed) and so come from the heap:
                                # CHITA measured 117-122 B/weight above X at p = 1-4M, 83 at p = 10M
                                # (random X, n = 8); MobileNetV1 (p = 4.2M) 123 above its solver entry,
                                # ResNet-50 (25.5M) 81
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: blocks at least this
                                # large are always mapped, and unmapped when freed
FALCON_SOLVER_VECTORS = 9       # the same for one-process FALCON, measured: on ResNet-50 (p = 25.5M,
                                # n = 8) it peaks 71 B/weight above the RSS it starts at inside the
                                # stage loop (46 B/weight of live arrays: the float64 scores, the ILP's
                                # sorted scores, prefix sums and int32 order, the float32 point, step
                                # and gradient; the rest is blocks glibc keeps after free), 7 more
                                # since the ILP keeps the last projection's order (PreviousOrder)
STAGE_VECTOR_BYTES = 17         # the stage loop's vectors made before the gradients and held through
                                # them: the MACs per weight (int32), the weights (float32), the free-weight
                                # mask (bool) and index (int64). Missing from the gradient phase until
                                # measured: ResNet-50 (n = 8) peaked 0.37 GB (15 B/weight) above it there
PIPELINE_BYTES_PER_WEIGHT = 24  # what the stage loop holds beside the solver, whole on every rank: the
                                # MAC cost per weight (int32), the free-weight mask and index (int64),
                                # the weights (float32; stage 1 passes them and the MACs to the solver
                                # without copies). Measured: ResNet-50 enters FALCON 16 B/weight above
                                # the resident set and X (after malloc_trim of the gradient phase's heap)
SOLVER_OVERHEAD = 80 * 2**20   # the solver phase's part that does not grow with p (measured: with the
                                # per-weight terms above, ResNet-50 and MobileNetV1 at n = 8 both peak
                                # about 80 MB above them: sort buffers, malloc's kept blocks)
REPLICATED_VECTORS = 4          # p-long float32 vectors every rank holds whole under torchrun (w̄, the
                                # solution and the all-gather's buffers for it)
JUDGE_BATCHES = 12               # RecalibratedLoss: 4 batches to re-estimate BatchNorm, 8 to judge by
INFERENCE_FACTOR = 3            # a forward pass without autograd holds a module's input and output and a
                                # residual branch's input at most: 3x the largest output (an upper bound)
REFIT_ACTIVATION_FACTOR = 1.3   # the re-fit's activations in RSS against what Lockstep.check counts
                                # (freed per-batch blocks under glibc's mmap threshold stay on the heap
                                # while the next node's are made): measured 1.12 on ResNet-20-B (2,048
                                # images), 1.10 on MobileNetV1, 1.15 and 1.28 in two identical ResNet-56
                                # runs (1,024 images; random weights, the 2 cores)
REFIT_JUDGE_VECTORS = 3         # p-long float32 vectors the judge after the re-fit holds beside the stage
                                # loop's: RecalibratedLoss's copy of the weights, the vector it is given,
                                # the re-fit layers' fitted parameters (the unfitted ones are in copies)
JUDGE_INPUT_COPIES = 4          # a batch's inputs in float32 while the judge after the re-fit reads it: the
                                # batch, the normalisation's temporaries (x/255, then - mean, then / std:
                                # two alive at once) and the batch the count of its batches read before
                                # (session 48, MobileNetV1 at 224 x 224, 32 images: 1,093-1,157 MB peak)
DATA_BATCH_COPIES = 2           # the training batch being read in the gradient phase, in float32 inputs:
                                # the batch and its normalisation's temporary (session 48, MobileNetV1
                                # at 224 x 224, fisher_samples 32: the phase peaked 2,610 MB with batches
                                # of 32 images, 2,710-2,785 with batches of 128)
GiB, MiB = 2**30, 2**20


@dataclass
class MemoryPlan:
    """The estimate of one request. Byte counts; ``total`` is the estimated peak RSS."""

    n: int
    p: int
    dtype: torch.dtype
    chunk: int
    resident: int           # what the process holds, plus the data it will still decode (CPU)
    gradients: int          # X
    activations: int
    layer_gradients: int
    solver: int
    limit: int
    judge: int = 0          # the judge's held batches and forward pass, beside the solver
    stage_vectors: int = 0  # the stage loop's p-long vectors, held through the gradient phase too
    refit: int = 0          # the re-fit of the kept weights after a stage, once X is freed (0: none)
    refit_fitting: int = 0  # its two parts: the fitting and the judge after it (refit is the larger;
    refit_judge: int = 0    # 0: not told apart)
    data_batch: int = 0     # the training batch being read in the gradient phase

    @property
    def total(self) -> int:
        """Gradients are collected, then the solver runs (and the judge with it), then X is freed
        and the re-fit runs: the phases do not overlap."""
        return max(self.phases().values())

    def phases(self) -> dict[str, int]:
        """The estimated peak RSS of each phase (resident set included); ``total`` is the largest.
        "refit" is the re-fit's fitting and "refit_judge" the judge after it, where planned."""
        phases = {"gradients": self.resident + self.gradients + self.stage_vectors + self.activations
                  + self.layer_gradients + self.data_batch,
                  "solver": self.resident + self.gradients + self.solver + self.judge}
        if self.refit:
            phases["refit"] = self.resident + (self.refit_fitting or self.refit)
            phases["refit_judge"] = self.resident + (self.refit_judge or self.refit)
        return phases

    @property
    def total_mb(self) -> float:
        return self.total / MiB

    def fits(self) -> bool:
        return self.total <= self.limit


class _Sizes:
    """What the estimate needs from the model, measured once."""

    def __init__(self, model: nn.Module, space, example_input: torch.Tensor, batch_statistics: bool = False,
                 summed: bool = False):
        """``summed``: mini-batch rows (fisher_batch > 1), whose calls the collector tests less."""
        self.p = space.numel
        self.largest_layer = max(e.numel for e in space.entries)
        modules = dict(model.named_modules())
        self.whole_model_rows = bool(layer_grads.unsupported_layers(model, space))
        self.batch_statistics = batch_statistics
        attention = [] if self.whole_model_rows else [
            m for m in model.modules() if layer_grads.attention_supported(m)]
        hooked = None if self.whole_model_rows else hooked_layers(model, space)
        prunable = [modules[e.module] for e in space.entries]
        try:
            self.activation_per_sample = activation_bytes(model, example_input, prunable, batch_statistics,
                                                           attention, hooked, summed)
        except (attention_explicit.AttentionUnsupported, layer_grads.CallUnsupported):
            # e.g. unbatched attention, a convolution on a sample's frames: the collector falls back
            self.whole_model_rows = True
            self.activation_per_sample = activation_bytes(model, example_input, prunable, batch_statistics)
        self.input_per_sample, self.largest_output_per_sample = inference_bytes(model, example_input)
        self.device = space.weights()[0].device
        layers = [modules[e.module] for e in space.entries if isinstance(modules.get(e.module), (nn.Conv2d, nn.Linear))]
        self.refit_layers = _output_positions(model, example_input, layers)


def _output_positions(model: nn.Module, example_input, layers: list[nn.Module]) -> list[tuple[nn.Module, int]]:
    """Each of ``layers`` with its output positions per sample (a conv's H x W; 1 for a Linear),
    from one forward of the first sample; layers the forward does not reach are left out."""
    found: dict[int, tuple[nn.Module, int]] = {}

    def hook(module, _args, out):
        found[id(module)] = (module, out[0, 0].numel() if isinstance(module, nn.Conv2d) and out.dim() == 4 else 1)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(x[:1] for x in (example_input if isinstance(example_input, (tuple, list)) else (example_input,))))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(found.values())


def _refit_solve_bytes(layer: nn.Module, positions: int, samples: int, batch: int) -> int:
    """One layer's re-fit at its peak: a batch's sampled conv patches (float32, ``positions`` per
    image at most, ROWS_PER_INPUT x D rows in all) and its float64 moments and normal equations
    (about 6 D x D per group: XᵀX of the fit and of the held-out images, their centred copies, the
    system with its ridge, CG's products) and block preconditioner (K x D x kh·kw); D =
    C_in/groups·kh·kw inputs, K = C_out/groups."""
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    d, taps = layer.weight[0].numel(), layer.weight[0, 0].numel() if isinstance(layer, nn.Conv2d) else 1
    k = layer.weight.shape[0] // groups
    patches = 4 * batch * groups * d * min(positions, -(-REFIT_ROWS_PER_INPUT * d // samples)) if taps > 1 else 0
    return patches + 8 * groups * (6 * d * d + k * d * (taps + 3))


def refit_rank_images(samples: int, batch: int, ranks: int = 1) -> int:
    """The most images one of ``ranks`` processes runs in the re-fit of ``samples`` images read in
    batches of ``batch`` (the last one holds the rest): rank r runs batches r, r + ranks, ...,
    and the re-fit holds the activations of its images, not of its batches rounded up (192 images
    in batches of 128 are 128 + 64, not 256: session 48)."""
    samples, batch, ranks = max(1, samples), max(1, batch), max(1, ranks)
    count = -(-samples // batch)
    sizes = [batch] * (count - 1) + [samples - (count - 1) * batch]
    return max(sum(sizes[rank::ranks]) for rank in range(min(ranks, count)))


def refit_bytes(sizes: _Sizes, model: nn.Module, example_input, samples: int, batch: int, ranks: int = 1,
                ranks_here: int = 1) -> int:
    """Bytes the re-fit of the kept weights holds at its peak on ``samples`` images in batches of
    ``batch`` (see the module doc), on one of ``ranks`` processes (``ranks_here`` of them on this
    machine), which runs every ranks-th batch: the larger of its two parts (:func:`refit_parts`)."""
    return max(refit_parts(sizes, model, example_input, samples, batch, ranks, ranks_here))


def refit_parts(sizes: _Sizes, model: nn.Module, example_input, samples: int, batch: int, ranks: int = 1,
                ranks_here: int = 1) -> tuple[int, int]:
    """(the fitting, the judge after it): the bytes each holds above the resident set at its peak,
    the copies the stage loop keeps through both included."""
    first = example_input[:1] if isinstance(example_input, torch.Tensor) else None
    per_sample = lockstep_bytes(model, first) if first is not None else None
    own_samples = refit_rank_images(samples, batch, ranks)
    activations = 2 * per_sample * own_samples if per_sample is not None else None
    if activations is None or activations > lockstep_allowance(sizes.device) // ranks_here:   # the re-fit's rule:
        activations = 2 * INFERENCE_FACTOR * sizes.largest_output_per_sample * batch   # truncated forwards
    activations = int(REFIT_ACTIVATION_FACTOR * activations)
    solve = max((_refit_solve_bytes(layer, positions, samples, batch) for layer, positions in sizes.refit_layers),
                default=0)
    fitting = activations + 2 * samples * sizes.input_per_sample + solve
    judge = (REFIT_JUDGE_VECTORS * 4 * sizes.p
             + batch * (JUDGE_INPUT_COPIES * sizes.input_per_sample + INFERENCE_FACTOR * sizes.largest_output_per_sample))
    copies = (2 * 4 + PIPELINE_BYTES_PER_WEIGHT + 4) * sizes.p
    return copies + fitting, copies + judge


def plan(model: nn.Module, space, example_input: torch.Tensor, *, n: int | str, dtype: str = "float32",
         family: str = "falcon", max_memory=None, fisher_batch: int = 1, obs_block_size: int = 128,
         keep_share: float = 1.0, fisher_bn: str = "frozen", ranks: int = 1,
         ranks_here: int = 1, judge_batch: int = 0, refit_samples: int = 0, refit_batch: int = 0,
         most_rows: int = 1000, data_batch: int = 0, data_to_load: int = 0, data_samples: int | None = None,
         n_default: bool = False) -> MemoryPlan:
    """The memory plan of gradients + solve for ``space``'s weights, refusing what does not fit.

    n:          fisher_samples, an int or "auto" (the largest n ≤ ``most_rows`` that fits; the
                pipeline lowers most_rows from 1000 to the samples its training data holds).
    dtype:      storage dtype of X, a key of STORAGE_DTYPES.
    family:     "chita", "falcon" or "woodfisher" (their solvers' work arrays differ).
    max_memory: the limit, bytes or "16G"/"1.5GiB"/"500MB" (None: available memory less a margin).
    keep_share: k/p, the share of weights kept (CHITA's active set is 1.5k columns).
    fisher_bn:  "frozen" or "batch" (BatchNorm on each mini-batch's statistics: the whole mini-batch
                is one forward pass, so the chunk is fisher_batch).
    ranks:      processes sharing X by columns (torchrun): the plan is one rank's.
    ranks_here: those of them on this machine; without max_memory each gets this share of it.
    judge_batch: samples per training batch when the run judges candidates by their loss (the
                layer search, the final pick); 0: no judge.
    refit_samples, refit_batch: the images the kept weights are re-fit on after a stage, and their
                batch size (0: no re-fit).
    data_batch: samples per training batch the gradients read (0: not counted).
    data_to_load: bytes of data this process will decode and hold during the run but does not hold
                yet (an image folder scanned, not decoded), counted in ``resident`` on a CPU.
    data_samples: the samples one pass of the training data holds, where the n rows are per-sample
                rows read from one pass (None: not known, or rows of another kind). A refusal then
                names no n above it; and where n is above it but n = data_samples fits, the refusal
                is the data's (``fisher_batches.check_sample_count``: lower fisher_samples to
                data_samples), so that the value a refusal names is one that runs.
    n_default:  n is the method's default fisher_samples, not the user's (the data refusal says so).
    Raises PrunekitError when the request does not fit.
    """
    storage = storage_dtype(dtype)
    sizes = _Sizes(model, space, example_input, batch_statistics=fisher_bn == "batch", summed=fisher_batch > 1)
    limit = parse_memory(max_memory) if max_memory is not None else default_limit(sizes.device) // ranks_here
    resident = current_usage(sizes.device) + (max(0, int(data_to_load)) if sizes.device.type == "cpu" else 0)
    judge = judge_batch * (JUDGE_BATCHES * sizes.input_per_sample
                           + INFERENCE_FACTOR * sizes.largest_output_per_sample)
    refit_fitting, refit_judge = (refit_parts(sizes, model, example_input, refit_samples,
                                              refit_batch or refit_samples, ranks, ranks_here)
                                  if refit_samples else (0, 0))
    batch_bytes = DATA_BATCH_COPIES * data_batch * sizes.input_per_sample
    estimate = lambda rows, kind: replace(
        _estimate(sizes, rows, kind, family, fisher_batch, obs_block_size, keep_share, resident, limit, ranks, judge,
                  max(refit_fitting, refit_judge)),
        refit_fitting=refit_fitting, refit_judge=refit_judge, data_batch=batch_bytes)
    if n == "auto":
        rows = largest_n(lambda rows: estimate(rows, storage), most_rows)
        if rows == 0:
            raise OptionError(_refusal(estimate(1, storage), estimate, limit, refit_samples, ranks,
                                       max_memory is not None), REFUSAL_OPTIONS)
        return estimate(rows, storage)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PrunekitError(f"fisher_samples must be a positive integer or 'auto', got {n!r}")
    result = estimate(n, storage)
    if not result.fits():
        if data_samples is not None and 0 < data_samples < n and _fits_with_spare(estimate(data_samples, storage),
                                                                                  limit):
            check_sample_count(data_samples, n, n_default)      # refuses: its n (the data's count) fits
        raise OptionError(_refusal(result, estimate, limit, refit_samples, ranks, max_memory is not None,
                                   data_samples), REFUSAL_OPTIONS)
    return result


def _estimate(sizes: _Sizes, n: int, storage: torch.dtype, family: str, fisher_batch: int,
              obs_block_size: int, keep_share: float, resident: int, limit: int, ranks: int = 1,
              judge: int = 0, refit: int = 0) -> MemoryPlan:
    item = torch.tensor([], dtype=storage).element_size()
    chunk = max(1, min(MAX_CHUNK, ACTIVATION_BUDGET // max(1, int(ACTIVATION_FACTOR * sizes.activation_per_sample))))
    if fisher_batch == 1:
        chunk = min(chunk, n)
        if sizes.whole_model_rows:                # chunk × p float32 per-sample gradients at once
            chunk = max(1, min(chunk, ACTIVATION_BUDGET // (4 * sizes.p)))
    if sizes.batch_statistics:
        chunk = fisher_batch                      # a row's mini-batch is forwarded whole
    gradients = n * sizes.p * item
    if ranks > 1:      # its columns (all rows, padded), one piece of its rows (all columns), a block
        per, columns_here = -(-n // ranks), -(-sizes.p // ranks)
        piece = -(-per // (4 * ranks))        # distributed.gradients: 4R pieces per rank
        gradients = (piece * 4 * ranks * ranks * columns_here + piece * sizes.p + piece * columns_here) * item
    activations = int(ACTIVATION_FACTOR * sizes.activation_per_sample * chunk)
    rows_at_once = 1 if fisher_batch > 1 else chunk
    # one layer's gradients for the rows at once; the autograd check of the first row (two p-long
    # float32 vectors); the mini-batch mode's float32 accumulator
    per_row = sizes.p if sizes.whole_model_rows else sizes.largest_layer
    layer_gradients = (per_row * rows_at_once * 4 + 2 * sizes.p * 4 + BACKWARD_OVERHEAD
                       + (sizes.p * 4 if fisher_batch > 1 else 0))
    if ranks > 1:      # sliced, p/R each; w̄, the solution and its all-gather buffers whole
        vectors = SOLVER_VECTORS * -(-sizes.p // ranks) * 8 + REPLICATED_VECTORS * sizes.p * 4
    else:
        vectors = solver_bytes_per_weight(family, sizes.p) * sizes.p
    solver = vectors + PIPELINE_BYTES_PER_WEIGHT * sizes.p + 4 * n * n * 8 + 2 * 8 * MiB + SOLVER_OVERHEAD
    if family == "chita":
        solver += int(min(1.0, 1.5 * keep_share) * n * sizes.p * item / ranks)   # the active set's columns of X
    elif family == "woodfisher":      # the block inverses, float32, in one allocation; one block's float64 work
        solver += sizes.p * obs_block_size * 4 + (obs_block_size + 2 * n) * obs_block_size * 8
    return MemoryPlan(n=n, p=sizes.p, dtype=storage, chunk=chunk, resident=resident, gradients=gradients,
                      activations=activations, layer_gradients=layer_gradients, solver=solver, limit=limit,
                      judge=judge, stage_vectors=STAGE_VECTOR_BYTES * sizes.p, refit=refit)


def solver_bytes_per_weight(family: str, p: int) -> int:
    """Bytes per weight the one-process solver of ``family`` holds at its peak beside X (and the
    stage loop's vectors), for float32 products: its live p-long arrays, plus, when a float32
    p-long vector is under glibc's largest mmap threshold (MMAP_THRESHOLD_MAX), the freed blocks
    the heap keeps resident between them (HEAP_RETAINED_BYTES)."""
    if family == "falcon":
        return FALCON_SOLVER_VECTORS * 8      # measured whole on ResNet-50 (session 25); left as is
    live = {"chita": CHITA_BYTES_PER_WEIGHT, "woodfisher": WOODFISHER_BYTES_PER_WEIGHT}.get(family)
    if live is None:
        return SOLVER_VECTORS * 8
    return live + (HEAP_RETAINED_BYTES if 4 * p < MMAP_THRESHOLD_MAX else 0)


def largest_n(estimate, upper: int) -> int:
    """The largest n ≤ ``upper`` whose plan fits (0 if none); the estimate grows with n."""
    if estimate(1).total > estimate(1).limit:
        return 0
    lo, hi = 1, upper
    if estimate(hi).fits():
        return hi
    while hi - lo > 1:                 # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(mid).fits() else (lo, mid)
    return lo


REFUSAL_OPTIONS = ("fisher_samples", "max_memory", "refit_batches")      # the options a refusal names
SUGGESTION_SPARE = 32 * MiB     # bytes a suggested fisher_samples leaves free, at least (or 1 % of the limit)


def _spare(limit: int) -> int:
    """Bytes a suggested n leaves free: what the process holds moves by some 10 MB from run to run."""
    return max(SUGGESTION_SPARE, limit // 100)


def _fits_with_spare(result: MemoryPlan, limit: int) -> bool:
    """Whether ``result`` fits ``limit`` with the room a suggested n leaves (``_spare``)."""
    return replace(result, limit=limit - _spare(limit)).fits()


def _refusal(result: MemoryPlan, estimate, limit: int, refit_samples: int = 0, ranks: int = 1,
             given: bool = True, data_samples: int | None = None) -> str:
    """The refusal's one line; ``given``: the limit is max_memory (else the memory available);
    ``data_samples``: the samples one pass of the training data holds (the n it names are no more)."""
    cap = (f"max_memory is {_human(limit)}" if given else
           f"this {'rank' if ranks > 1 else 'process'} may grow to {_human(limit)} ({'its share of ' if ranks > 1 else ''}"
           "the memory available less a margin; max_memory not given)")
    more = "raise max_memory" if given else "free more memory"
    if result.resident + result.refit > limit and replace(result, refit=0).fits():   # the re-fit alone
        return (f"the re-fit after pruning needs about {_human(result.resident + result.refit)} "
                f"({refit_samples:,} images through the pruned and the dense network) but {cap}: "
                f"set refit_batches to fewer batches, or 0 (or {more})")
    # the n suggested fits with room to spare: what the process holds moves by some 10 MB from run to run
    spare = _spare(limit)
    most = data_samples if data_samples is not None and data_samples > 0 else 10**7
    largest = {name: largest_n(lambda rows: replace(estimate(rows, storage), limit=limit - spare), most)
               for name, storage in STORAGE_DTYPES.items()}
    # a rank holds its n x p/R columns and, in transit, one piece of its rows (n/(4R^2) x p) and a block of it
    # (``distributed.gradients``): more than n x p / R (2 ranks: 1/2 + 1/16 + 1/32 of n x p)
    share = (f"; each of {ranks} ranks holds its 1/{ranks} of the columns and a piece of its rows in transit, "
             if ranks > 1 else " = ")
    if not any(largest.values()):        # not one row fits: what the rest of the run takes is the limit
        least = estimate(1, STORAGE_DTYPES["bfloat16"]).total
        return (f"this request needs about {_human(least)}{' per rank' if ranks > 1 else ''} whatever fisher_samples "
                f"(the model, its data and the method's work besides the gradients) but {cap}: "
                + (f"raise max_memory to more than {_human(least + spare)}" if given else
                   f"free memory until more than {_human(least + spare)} is available")
                + f" (the {_human(least)} it needs and {_human(spare)} to spare: what a process holds moves from run to run)")
    fitting = ", ".join(f"{n:,} in {name}" + (" (all the training data holds)" if n == most else "")
                        for name, n in largest.items())
    return (f"this request needs about {_human(result.total)}{' per rank' if ranks > 1 else ''} (gradients "
            f"{result.n:,} x {result.p:,} in {str(result.dtype).removeprefix('torch.')}{share}"
            f"{_human(result.gradients)}) but {cap}: the largest fisher_samples that fits is {fitting} "
            f"({_human(spare)} to spare; or {more})")


def _human(count: int) -> str:
    if count >= GiB:
        return f"{count / GiB:.1f} GB"
    return f"{count / MiB:.0f} MB" if count >= MiB else f"{count / 2**10:.0f} KB"


def storage_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in STORAGE_DTYPES.values():
        return name
    if name not in STORAGE_DTYPES:
        raise PrunekitError(f"fisher_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]
