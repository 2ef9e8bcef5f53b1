"""Gradient rows by per-layer hooks: each prunable layer writes its own columns during the
backward pass (the formulas of ``layer_grads``); attention modules run their explicit forward so
their projections can be hooked. The first rows are checked against plain autograd of the
modules' own forwards until one agrees; CHECK_ATTEMPTS disagreements raise :class:`HooksDisagree`
(the caller falls back to ``fisher_vmap``)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attention_explicit, layer_grads
from .fisher_batches import check_filled, gradient_bar, group_size, row_groups
from .errors import PrunekitError
from .losses import LossFn, summed_loss
from .params import Entry, ParamSpace


class HooksDisagree(Exception):
    pass


class _LayerHooks:
    """Forward hooks on the prunable layers that, during the backward pass, write each layer's
    weight gradients into its columns of ``self.target`` (rows × p). An attention module's
    projection weights (``in_proj_weight`` or ``q/k/v_proj_weight``, and nn.MultiheadAttention's
    ``out_proj.weight``) are written by ``project``, which its explicit forward calls for each
    projection (``attention_explicit.explicit_attention``)."""

    def __init__(self, model: nn.Module, space: ParamSpace, summed: bool):
        modules = dict(model.named_modules())
        parents = layer_grads.attention_parent(model)
        dims = layer_grads.sample_dims(model)
        users = layer_grads.weight_users(model)
        self.summed = summed
        self.target: torch.Tensor | None = None
        self.samples = 0
        self.expanded = False                     # an embedding's batch-shared output was expanded
        self.expansion_checked = False
        self.written: set[tuple[str, int]] = set()
        self.projections: dict[tuple[int, str], Entry] = {}     # (id(attention), weight name/"out") -> entry
        attention: dict[str, nn.Module] = {}
        self.handles = []
        for e in space.entries:
            if _is_projection(e, modules, parents):
                name = parents.get(e.module, e.module)
                attention[name] = modules[name]
                which = "out" if e.module in parents else e.param_name.rsplit(".", 1)[-1]
                self.projections[(id(modules[name]), which)] = e
            else:                                  # every module holding the weight (tied) adds its part
                for name, user in _holders(e, model, modules, users):
                    self.handles.append(user.register_forward_hook(self._forward_hook(e, dims.get(name, 0))))
        self.attention_modules = list(attention.values())

    def _forward_hook(self, entry: Entry, sample_dim: int):
        def hook(module, inputs, output):
            if self.target is None:               # not collecting (e.g. the autograd check)
                return None
            a = inputs[0]
            if isinstance(module, nn.Embedding) and not self.summed and a.shape[0] == 1 < self.samples:
                a, output = self._expand(a, output)
            reason = layer_grads.call_mismatch(module, a, None if self.summed else self.samples, sample_dim)
            if reason is not None:
                raise HooksDisagree(f"layer {entry.module_name!r}: {reason}")
            return self._capture(entry, entry.slice, a, output,
                                 lambda a, g, dest, accumulate: layer_grads.write_weight_grads(
                                     module, a, g, dest, accumulate=accumulate, summed=self.summed,
                                     sample_dim=sample_dim))
        return hook

    def _expand(self, ids: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An embedding looked up once for the whole batch (position ids (1, T)) and broadcast
        over it: its output is expanded to the samples so that its gradient is per sample (the
        forward's values are unchanged where the batch broadcasts; ``backward`` checks that)."""
        self.expanded = True
        return (ids.expand(self.samples, *ids.shape[1:]),
                output.expand(self.samples, *output.shape[1:]))

    def _capture(self, entry: Entry, columns: slice, inputs: torch.Tensor, output: torch.Tensor, write):
        """Hook ``output`` so that its gradient writes ``entry``'s ``columns`` by ``write``."""
        saved = [inputs.detach()]                 # dropped as soon as the gradient is written
        if not output.requires_grad:              # nothing upstream needs a gradient: start here
            output = output + torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)

        def on_gradient(g):
            key = (entry.module_name, columns.start)
            write(saved.pop(), g, self.target[:, columns], self.summed or key in self.written)
            self.written.add(key)
        output.register_hook(on_gradient)
        return output

    def project(self, module: nn.Module, which: str, a: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, rows: tuple[int, int] | None) -> torch.Tensor:
        """One projection of an attention's explicit forward: F.linear, its gradient written into
        the columns of weight ``which`` (``rows`` of ``in_proj_weight``, or all of the weight)."""
        output = F.linear(a, weight, bias)
        entry = self.projections.get((id(module), which))
        if self.target is None or entry is None:
            return output
        reason = layer_grads.projection_mismatch(a, None if self.summed else self.samples)
        if reason is not None:
            raise HooksDisagree(f"layer {entry.module_name!r}: {reason}")
        width = weight.shape[1]
        columns = entry.slice if rows is None else slice(entry.slice.start + rows[0] * width,
                                                          entry.slice.start + rows[1] * width)
        # always added: an attention's columns are zeroed before each forward (``backward``), as
        # its calls may write overlapping parts (self-attention all of in_proj, cross-attention q, kv)
        return self._capture(entry, columns, a, output,
                             lambda a, g, dest, accumulate: layer_grads.write_linear_grads(
                                 a, g, dest, True, self.summed))

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 loss_scale: float, entries: list[Entry], loss_fn: LossFn | None = None) -> None:
        """Forward x, backpropagate Σ loss / loss_scale, writing into ``target``."""
        self.target, self.written, self.samples = target, set(), x.shape[0]
        if not self.summed:                        # (a mini-batch's accumulator is zeroed by the caller)
            for entry in self.projections.values():
                target[:, entry.slice] = 0
        self.expanded = False
        try:
            loss = summed_loss(loss_fn, model(x), y) / loss_scale
        except attention_explicit.AttentionUnsupported as error:
            raise HooksDisagree(str(error)) from error
        except PrunekitError:
            raise
        except Exception as error:  # noqa: BLE001 - only where an expanded embedding output may be the cause
            if not self.expanded:
                raise
            raise HooksDisagree(f"the forward fails with an embedding's batch-shared output expanded ({error})") \
                from error
        if self.expanded and not self.expansion_checked:
            self._check_expansion(model, x, y, float(loss.detach()) * loss_scale, loss_fn)
        if loss.requires_grad:
            loss.backward()
        if not self.summed:                        # layers the forward never reached: zero gradient
            starts = {name for name, _ in self.written}
            for entry in entries:
                if entry.module_name not in starts:
                    target[:, entry.slice] = 0
        self.target = None

    def _check_expansion(self, model, x, y, loss: float, loss_fn) -> None:
        """The loss with embeddings' batch-shared outputs expanded must be the model's own (a
        forward that sums over the batch dimension of such an output would not be)."""
        target, self.target = self.target, None           # the hooks stand aside
        try:
            with torch.no_grad():
                plain = float(summed_loss(loss_fn, model(x), y))
        finally:
            self.target = target
        if abs(loss - plain) > 1e-4 * max(abs(plain), 1e-30):
            raise HooksDisagree(f"expanding an embedding's batch-shared output changes the loss ({plain:.6g} -> "
                                f"{loss:.6g})")
        self.expansion_checked = True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _is_projection(entry: Entry, modules: dict[str, nn.Module], parents: dict[str, str]) -> bool:
    """Whether ``entry`` is an attention's projection weight (written by ``project``), not the
    weight of a layer whose own forward hook writes it."""
    return entry.module in parents or isinstance(modules[entry.module], layer_grads.ATTENTION)


def hooked_layers(model: nn.Module, space: ParamSpace) -> dict[nn.Module, int]:
    """{module: the dimension of its input that indexes the samples} for the layers whose own
    forward hook writes their rows (every prunable layer but the attention projections): those
    whose calls :func:`layer_grads.call_mismatch` tests."""
    modules = dict(model.named_modules())
    parents = layer_grads.attention_parent(model)
    dims = layer_grads.sample_dims(model)
    users = layer_grads.weight_users(model)
    return {user: dims.get(name, 0) for e in space.entries if not _is_projection(e, modules, parents)
            for name, user in _holders(e, model, modules, users)}


def _holders(entry: Entry, model: nn.Module, modules: dict[str, nn.Module],
             users: dict[int, list[tuple[str, nn.Module]]]) -> list[tuple[str, nn.Module]]:
    """[(name, module)] of every module that holds ``entry``'s weight (several when it is tied,
    ``layer_grads.weight_users``), each of which the collector hooks."""
    return users.get(id(model.get_parameter(entry.param_name)), [(entry.module, modules[entry.module])])


def collect_with_hooks(model, space, batches, rows, batch, chunk, progress, loss_fn=None,
                        on_checked=lambda: None) -> None:
    n = rows.shape[0]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)                   # only activation gradients are needed
    hooks = _LayerHooks(model, space, summed=batch > 1)
    device = rows.device
    accumulator = torch.zeros(1, space.numel, dtype=torch.float32, device=device) if batch > 1 else None
    filled = 0
    checked, disagreements = False, []
    bar = progress if isinstance(progress, tqdm) else gradient_bar(n, progress)
    restore = contextlib.ExitStack()
    try:
        patch = restore.enter_context(attention_explicit.explicit_attention(hooks.attention_modules, hooks.project))
        for group in row_groups(batches, batch, chunk):
            group = [(x.to(device), y.to(device)) for x, y in group]
            if batch == 1:
                (x, y), = group
                take = min(x.shape[0], n - filled)
                group = [(x[:take], y[:take])]
                hooks.backward(model, x[:take], y[:take], rows[filled:filled + take], 1.0, space.entries, loss_fn)
            elif group_size(group) < batch:
                break                               # a short last mini-batch would weigh rows unequally
            else:
                take = 1
                accumulator.zero_()
                for x, y in group:                  # pieces of one shape each (``regroup``)
                    for xs, ys in zip(x.split(chunk), y.split(chunk)):
                        hooks.backward(model, xs, ys, accumulator, float(batch), space.entries, loss_fn)
                rows[filled] = accumulator[0]
            if not checked:                     # against autograd of the modules' own forwards
                with patch.suspended():
                    checked = _check_rows(model, space, group, rows[filled:filled + take], batch, chunk, loss_fn,
                                          disagreements)
                if checked:
                    on_checked()
            filled += take
            bar.update(take)
            if filled >= n:
                break
        if not checked:                         # every row is written and none could be checked twice
            raise HooksDisagree("; ".join(disagreements))
    finally:
        if bar is not progress:             # a bar of the caller's (pieces of a rank's rows) stays open
            bar.close()
        hooks.remove()
        restore.close()                     # the attention modules' own forwards
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    check_filled(filled, n, batch)


# Rows checked against autograd before the hooks' rows are trusted: the first that agrees settles it,
# CHECK_ATTEMPTS that disagree fall back to vmap. One disagreement can be float32's: a ReLU input
# within rounding of 0 can fall on either side of it in two correct float32 forwards, and the
# gradient then takes another route. Seen on ResNet-20-B (FALCON++ stage 5, seed 4): the hooks' row
# for conv1 was 2.1e-3 off float32 autograd's but 5e-7 off float64 autograd's; float32 autograd's
# was the one 2.1e-3 off (one ReLU of layer1.0 routed it differently).
CHECK_ATTEMPTS = 2


def _check_rows(model, space, group, rows, batch, chunk, loss_fn, disagreements: list[str]) -> bool:
    """Check this step's rows (take, p) against autograd: the samples of a chunk one by one
    (``batch`` 1: ``group`` [(x (take, ...), y)]), or the one mini-batch row of ``group``'s pieces
    [(x, y)]. True at the first agreement; each disagreement is appended to ``disagreements``, and
    the CHECK_ATTEMPTS-th raises HooksDisagree."""
    for i in range(rows.shape[0]):
        pieces = [(x[i:i + 1], y[i:i + 1]) for x, y in group] if batch == 1 else group
        try:
            _check_row(model, space, pieces, rows[i], chunk, loss_fn)
            return True
        except HooksDisagree as error:
            disagreements.append(str(error) if not disagreements else f"again on another sample: {error}")
            if len(disagreements) >= CHECK_ATTEMPTS:
                raise HooksDisagree("; ".join(disagreements)) from None
    return False


def _check_row(model, space, pieces, row, chunk, loss_fn=None) -> None:
    """Compare one row with plain autograd of the mean loss over ``pieces`` [(x, y)] (the samples
    of one row), layer by layer; raise HooksDisagree if off by more than :func:`tolerance` of the
    layer's weight and the row's dtype. Autograd's gradient is rounded to the row's dtype first:
    storing a row in bfloat16/float16 is no disagreement. A half-precision model whose row
    disagrees is checked again against autograd of a float32 copy of it on the same samples
    (:func:`_float32_reference`): half-precision autograd drifts by itself (an embedding's
    backward summing thousands of positions in float16 is several percent off), while the row,
    computed from the half-precision forward, may drift from the float32 one (an attention's
    query weights of a float16 BERT at 512 tokens: 4e-2); only a layer off both references
    disagrees, as a missed or wrong term is."""
    weights = space.weights()
    off = _disagreements(space, row, weights, _reference(model, weights, pieces, chunk, loss_fn))
    if off and any(w.dtype in _HALF for w in weights):
        reference = _float32_reference(model, space, pieces, chunk, loss_fn)
        if reference is not None:            # a layer off the half-precision reference may be on this one
            wide = _disagreements(space, row, weights, reference)
            off = {name: why for name, why in off.items() if name in wide}
    if off:
        raise HooksDisagree(next(iter(off.values())))


_HALF = (torch.float16, torch.bfloat16)


def _reference(model, weights, pieces, chunk, loss_fn) -> list[torch.Tensor]:
    """Autograd's gradient of the mean loss over ``pieces`` for each of ``weights``, in float32
    (each shaped as its weight)."""
    for w in weights:
        w.requires_grad_(True)
    reference = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    samples = group_size(pieces)
    try:
        for xs, ys in ((xs, ys) for x, y in pieces for xs, ys in zip(x.split(chunk), y.split(chunk))):
            loss = summed_loss(loss_fn, model(xs), ys) / samples
            for total, g in zip(reference, torch.autograd.grad(loss, weights, allow_unused=True)):
                if g is not None:
                    total += g
    finally:
        for w in weights:
            w.requires_grad_(False)
    return reference


# The float32 re-check's copy of a half-precision model (twice its half-precision tensors' bytes:
# the memory plan does not count it) is made only where it takes at most this share of the memory
# still available on the model's device; a larger model keeps the half-precision check's verdict
# (its rows go to vmap after CHECK_ATTEMPTS disagreements: slower, not wrong).
FLOAT32_COPY_SHARE = 0.5


def _float32_reference(model, space, pieces, chunk, loss_fn) -> list[torch.Tensor] | None:
    """:func:`_reference` on a float32 copy of ``model`` (half-precision floating inputs cast to
    float32), for the weights of ``space`` by name; None where the copy cannot be made or run
    (memory: more than FLOAT32_COPY_SHARE of what is available, or a failure; a model that cannot
    be copied): the half-precision check's verdict then stands."""
    from .process_memory import available_memory
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        if float32_copy_bytes(model) > FLOAT32_COPY_SHARE * available_memory(device):
            return None
        copy = _float32_copy(model)
        weights = [copy.get_parameter(e.param_name) for e in space.entries]
        wide = [(x.float() if x.dtype in _HALF else x, y) for x, y in pieces]
        return _reference(copy, weights, wide, chunk, loss_fn)
    except Exception:  # noqa: BLE001 - any failure of the extra check keeps the first verdict
        return None


def float32_copy_bytes(model: nn.Module) -> int:
    """Bytes :func:`_float32_copy` of ``model`` allocates: its parameters and buffers (each tensor
    once, tied ones too), the half-precision ones at 4 bytes an element."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    return sum(t.numel() * (4 if t.dtype in _HALF else t.element_size()) for t in tensors)


def _float32_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose half-precision parameters and buffers are float32 (tied ones
    stay tied). Each half-precision tensor is cast straight into the copy (``deepcopy``'s memo
    gives the float32 tensor for it), not deep-copied in half precision and then cast: the copy
    holds ``float32_copy_bytes`` and no more."""
    import copy
    memo: dict = {}
    for p in model.parameters():
        if p.dtype in _HALF and id(p) not in memo:
            memo[id(p)] = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
    for b in model.buffers():
        if b.dtype in _HALF and id(b) not in memo:
            memo[id(b)] = b.detach().float()
    return copy.deepcopy(model, memo)


def _disagreements(space, row, weights, reference) -> dict[str, str]:
    """{entry name: the difference in words} for each layer whose part of ``row`` is off
    ``reference`` by more than :func:`tolerance` (empty where the row agrees)."""
    off = {}
    for entry, w, ref in zip(space.entries, weights, reference):
        tol = tolerance(w.dtype, row.dtype)
        got = row[entry.slice].float()
        ref = ref.reshape(-1).to(row.dtype).float()
        diff, scale = float((got - ref).norm()), float(ref.norm())
        if diff > tol * scale + 1e-12:
            off.setdefault(entry.name, f"layer {entry.module_name!r}: |difference| / |autograd| = "
                                              f"{diff / max(scale, 1e-30):.2e}, tolerance {tol:.1e}")
    return off


def tolerance(*dtypes: torch.dtype) -> float:
    """The largest |difference| / |autograd| (norms over one layer's gradient) a row may show
    against autograd when computed or stored in ``dtypes``: 1e-3, or 16 machine epsilons of the
    least precise of them where that is larger (bfloat16 0.125, float16 0.0156). Autograd's own
    half-precision gradient drifts: its embedding backward sums a row's positions in the weight's
    dtype on CPU, 4 epsilons off on a BERT's token-type embedding over 64 positions in bfloat16,
    10 in float16 (the hooks' sum is nearer the exact one), while a missed or wrong term is off
    by far more (a weight also used outside its layer: 0.7 in every dtype)."""
    return max(1e-3, 16 * max(torch.finfo(d).eps for d in dtypes))
