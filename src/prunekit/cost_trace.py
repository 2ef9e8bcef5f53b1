"""Tracing one forward pass to price every parameterised operation (the engine of ``CostModel``).

Three views of the same forward pass:

* **module hooks** give the scope (which module is running) and each leaf module's output, for
  the element-wise costs of norms and pools (``other_ops``);
* a **``TorchDispatchMode``** sees every aten operation, also those inside functional code
  (``F.linear(x, self.w)``, ``x @ self.w``) and inside composites such as
  ``F.multi_head_attention_forward``. An operand that is a parameter, or a view of one (a
  transpose, a chunk of a packed ``in_proj_weight``, a ``torch.cat`` / ``torch.stack`` of
  parameters) is found by its storage; each element is
  charged the number of times it is multiplied. A product of two activations (attention's
  QKᵀ and AV) is charged to the running module as *activation MACs*: real, never prunable. A
  product of two parameters (a weight made in forward from factors, ``U @ V``; an element-wise
  ``(a * b).sum(-1)``) is charged to both factors, each MAC to one of them
  (``_OpCounter._parameter_product``, ``_OpCounter._summed_parameter_products``);
* a **``TorchFunctionMode``** sees tensor additions written in ``forward`` code (residual adds).

A parameter used by an operation without a cost rule is *unpriced*: ``CostModel`` refuses the
model, naming the parameter, its module and the operation. A module type with a registered
cost function (``register_cost``) is priced by that function for its own code: its direct
parameters and its own activation products; its child modules (and a child's parameter used in
its code) are traced as everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .cost_params import ParamIndex, ParamUses, ScaledProducts, storage_key

aten = torch.ops.aten

_ADD_FUNCS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
              torch.Tensor.__iadd__, torch.Tensor.__radd__}

# Operations a parameter may take part in without costing MACs (besides element-wise and view ops).
_NO_MAC_OPS = {
    "native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "native_group_norm",
    "cudnn_batch_norm", "miopen_batch_norm",          # what batch_norm dispatches to on GPUs
    "cat", "stack", "clone", "_to_copy", "copy_", "copy", "detach", "alias", "lift_fresh", "_unsafe_view",
    "expand", "unsafe_split", "split", "split_with_sizes", "unbind", "chunk", "contiguous",
    "_prelu_kernel", "_fused_rms_norm", "embedding", "_embedding_bag", "_embedding_bag_forward_only",
    "embedding_renorm_",                              # Embedding(max_norm=...) rescales rows in place
}
_EMBEDDING_OPS = {"embedding", "_embedding_bag", "_embedding_bag_forward_only"}
_RNN_OPS = {"mkldnn_rnn_layer", "lstm", "gru", "rnn_tanh", "rnn_relu", "_cudnn_rnn", "miopen_rnn",
            "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell"}
_COPY_OPS = {"clone", "_to_copy", "contiguous"}
_JOIN_OPS = {"cat", "stack"}
_REDUCTIONS = {"sum", "mean", "nansum"}


@dataclass
class ModuleCost:
    """What a registered cost function returns for one call of its module.

    uses: the module's own parameter names (as in ``module.named_parameters(recurse=False)``;
        a child layer is counted by its own operations) -> how many times
        each element of that parameter is multiplied in this call, for the call's whole input
        (a Linear on (B, T, F) inputs: B*T; the trace runs on one example, B = 1). Those
        parameters become prunable weights costing ``uses`` MACs each; one named with ``0`` costs
        nothing and is kept dense (not pruned). A parameter that an operation of the module's own
        code multiplies (or uses in an operation without a cost rule, such as a table read by
        ``torch.index_select``) must be named (``0`` if it truly costs nothing): leaving it out is
        refused. One used only element-wise (a scale, a bias) may be left out: it costs no MACs.
    activation_macs: MACs of the call not tied to a parameter, for the call's whole input.
    """

    uses: dict[str, int] = field(default_factory=dict)
    activation_macs: int = 0


CostFunction = Callable[[nn.Module, tuple, object], "ModuleCost | dict[str, int]"]
_REGISTRY: dict[type, CostFunction] = {}


def register_cost(module_type: type, fn: CostFunction) -> None:
    """Price every module of ``module_type`` (and its subclasses) with ``fn(module, inputs, output)``.

    ``fn`` returns a ``ModuleCost`` or a plain dict ``{parameter name: uses in the call}``, naming
    only the module's own direct parameters (``module.named_parameters(recurse=False)``); the
    module's own operations on them (and its activation products) are then not traced. Its child
    modules are traced and counted as everywhere else, so ``fn`` must not price them. An own
    parameter that the module's own code multiplies and ``fn`` leaves out is refused (name it, with
    ``0`` if it truly costs nothing: it is then kept dense, not pruned); so is an exception inside
    ``fn`` or a return of another type, naming ``fn``. Use it for a layer whose operations
    prunekit cannot price (it refuses such a model and names the layer). Example: a layer whose
    ``weight`` (out, in) multiplies every token of a (B, T, in) input::

        prunekit.register_cost(MyLayer, lambda m, inputs, out: {"weight": inputs[0].shape[0] * inputs[0].shape[1]})
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        from .errors import PrunekitError
        raise PrunekitError(f"register_cost needs an nn.Module subclass, got {module_type!r}")
    _REGISTRY[module_type] = fn


def unregister_cost(module_type: type) -> None:
    """Remove a cost function given by ``register_cost`` (no error if there is none)."""
    _REGISTRY.pop(module_type, None)


def registered_cost(module: nn.Module) -> CostFunction | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def in_parametrization(scope: str) -> bool:
    """Whether module ``scope`` is (inside) a ``torch.nn.utils.parametrize`` parametrization
    (``layer.parametrizations.weight.0``)."""
    return ".parametrizations." in f".{scope}."


@dataclass
class Unpriced:
    """A parameter used by an operation that has no cost rule."""

    param: str
    op: str
    scope: str

class _OpCounter(TorchDispatchMode):
    """Charges parameter uses and activation MACs of every aten op (see the module docstring)."""

    def __init__(self, index: ParamIndex, scope: list[str], opaque: list):
        super().__init__()
        # opaque[-1]: None, or the direct parameter names of the registered-cost module whose own
        # code is running (not one of its children): its cost function prices those parameters
        # and the module's own activation products, so such ops are not traced here.
        self.index, self.scope, self.opaque = index, scope, opaque
        # per running module (pushed and popped with ``opaque``): {own parameter name: the first
        # op of the registered module's own code that would have charged or refused it}, so a cost
        # function that leaves such a parameter out is refused (``costs._registered_uses``)
        self.seen: list[dict[str, str]] = []
        self._shadow: _OpCounter | None = None
        self.uses = ParamUses()
        self.activation_macs: dict[str, int] = {}
        self.unpriced: list[Unpriced] = []
        self.order: list[str] = []          # parameter names and scopes in order of first charge
        self.elsewhere: dict[str, list[str]] = {}   # parameter name -> modules outside its owner using it (tied)
        self.scaled = ScaledProducts(index)  # x * w, w a scale so far, and the views of it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.scope and in_parametrization(self.scope[-1]):
            # a torch parametrization making its weight from the original (orthogonal's tril and
            # matrix_exp, spectral_norm's sigma): once per call, not per example, and no product of the
            # input; the weight it makes is priced where the layer uses it
            return out
        own = self.opaque[-1] if self.opaque else None
        if own is None or self._foreign_params_only(args, own):
            self._charge(func, args, out)
        else:
            self._observe(func, args, out, own)
        return out

    def _observe(self, func, args, out, own: frozenset) -> None:
        """An op of a registered module's own code: not charged (its cost function prices it), but
        note which of the module's own parameters the trace would have charged MACs (or refused),
        in ``seen[-1]``. A shadow counter does the charging, so a product made here and reduced
        later here (``(x * w).sum(-1)``) is seen too, and none of it reaches the real counts."""
        if self._shadow is None:
            self._shadow = _OpCounter(self.index, self.scope, [])
        shadow = self._shadow
        shadow.uses, shadow.unpriced = ParamUses(), []
        shadow._charge(func, args, out)
        touched = [*shadow.uses.weights, *(u.param for u in shadow.unpriced)]
        if self.seen:
            for name in touched:
                if name in own:
                    self.seen[-1].setdefault(name, str(func.overloadpacket.__name__))

    def _foreign_params_only(self, args, own: frozenset) -> bool:
        """True if the op uses parameters and none of them is in ``own``: a child layer's weight
        used in a registered module's own code is traced as usual."""
        names = {name for t in _flatten(args) if self.index.is_param(t) for name, _ in self.index.owners(t)}
        return bool(names) and not names & own

    # --- charging ----------------------------------------------------------------------------
    def _where(self) -> str:
        return self.scope[-1] if self.scope else ""

    def _activation(self, macs: int) -> None:
        where = self._where()
        self.activation_macs[where] = self.activation_macs.get(where, 0) + int(macs)
        if where not in self.order:
            self.order.append(where)

    def _used_elsewhere(self, name: str) -> None:
        """Note the running module as a user of parameter ``name`` if it is not the parameter's owner
        (nor inside it), nor an ancestor of it (an attention using its out_proj's weight in its own
        forward): a tied weight's second use (GPT-2's lm_head, tied to the token embedding)."""
        where, owner = self._where(), name.rpartition(".")[0]
        if not where or not owner:
            return
        related = where == owner or where.startswith(owner + ".") or owner.startswith(where + ".")
        if not related:
            users = self.elsewhere.setdefault(name, [])
            if where not in users:
                users.append(where)

    def _param(self, t: torch.Tensor, uses: int) -> None:
        for name, idx in self.index.owners(t):
            self._used_elsewhere(name)
            self.uses.mark(name)
            if name not in self.order:
                self.order.append(name)
            if idx is None:
                self.uses.uniform[name] += int(uses)
            else:
                numel = self.index.numels[name]
                extra = self.uses.partial.setdefault(name, torch.zeros(numel, dtype=torch.int64))
                extra.index_add_(0, idx, torch.full_like(idx, int(uses)))

    def _param_at(self, key: int, positions: torch.Tensor, uses: torch.Tensor) -> None:
        """Charge ``uses`` (N,) to the parameter elements at storage ``positions`` (N,) of ``key``."""
        for name, idx, where in self.index.locate(key, positions):
            self._used_elsewhere(name)
            self.uses.mark(name)
            if name not in self.order:
                self.order.append(name)
            extra = self.uses.partial.setdefault(name, torch.zeros(self.index.numels[name], dtype=torch.int64))
            extra.index_add_(0, idx, uses[where])

    def _param_each(self, t: torch.Tensor, uses: torch.Tensor) -> None:
        """Charge each element of parameter view ``t`` its own ``uses`` (broadcastable to t's shape)."""
        positions = self.index.positions(t)
        self._param_at(storage_key(t), positions.reshape(-1),
                       uses.to(torch.int64).broadcast_to(positions.shape).reshape(-1))

    def _owned(self, t: torch.Tensor) -> bool:
        """True if every parameter ``t`` holds belongs directly to the running module."""
        where = self._where()
        return all(name.rpartition(".")[0] == where for name, _ in self.index.owners(t))

    def _refuse(self, func, t: torch.Tensor) -> None:
        for name, _ in self.index.owners(t):
            self.unpriced.append(Unpriced(name, str(func.overloadpacket.__name__), self._where()))

    def _product(self, func, a, b, n: int, k: int, m: int, batch: int = 1) -> None:
        """(…, n, k) @ (…, k, m): a's elements are used m times each, b's n times each."""
        a_param, b_param = self.index.is_param(a), self.index.is_param(b)
        if a_param and b_param:
            # Learned queries/latents fed to a layer: the running module's own parameter is the
            # weight, the other operand is its input. Two parameters of the same standing (a
            # weight made in forward from low-rank factors, a merged LoRA update): both pay.
            a_own, b_own = self._owned(a), self._owned(b)
            if a_own == b_own:
                self._parameter_product(a, b, n, m)
                return
            a_param, b_param = a_own, b_own
        if b_param:
            self._param(b, n)
        elif a_param:
            self._param(a, m)
        else:
            self._activation(batch * n * k * m)

    def _parameter_product(self, a, b, n: int, m: int) -> None:
        """(…, n, k) @ (…, k, m), both parameters: n k m MACs per batch entry, each charged to one
        of its two factors, alternately: a[i, l] b[l, j] to a if i + j is even, else to b. So
        a[i, l] costs about m / 2 and b[l, j] about n / 2, the dense sum is exact, and with zeros
        in either factor the count never falls below the MACs of the sparse product (a MAC of two
        nonzero factors is always charged to a nonzero)."""
        parity = lambda size: torch.arange(size) % 2  # noqa: E731
        self._param_each(a, torch.where(parity(n) == 0, (m + 1) // 2, m // 2).unsqueeze(1))
        self._param_each(b, torch.where(parity(m) == 0, n // 2, (n + 1) // 2))

    def _charge(self, func, args, out) -> None:
        name = func.overloadpacket.__name__
        tensors = [a for a in _flatten(args) if isinstance(a, torch.Tensor)]
        if name in ("mm", "addmm", "bmm", "baddbmm", "addbmm"):
            a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm", "addbmm")) else (args[0], args[1])
            batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
            self._product(func, a, b, a.shape[-2], a.shape[-1], b.shape[-1], batch)
        elif name in ("mv", "addmv"):
            mat, vec = (args[1], args[2]) if name == "addmv" else (args[0], args[1])
            self._product(func, mat, vec.unsqueeze(1), mat.shape[0], mat.shape[1], 1)
        elif name in ("dot", "vdot"):
            self._product(func, args[0].unsqueeze(0), args[1].unsqueeze(1), 1, args[0].numel(), 1)
        elif name in ("convolution", "_convolution"):
            self._convolution(func, args, out)
        elif name == "_trilinear":
            self._trilinear(func, args)
        elif "scaled_dot_product" in name:
            q, k, v = args[:3]
            for t in (q, k, v):
                if self.index.is_param(t):
                    self._refuse(func, t)
            self._activation(q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        elif name in _EMBEDDING_OPS:
            if self.index.is_param(args[0]):
                self._param(args[0], 0)
        elif name in _RNN_OPS:
            self._rnn(args)
        elif name == "repeat" and self.index.is_param(args[0]) and isinstance(out, torch.Tensor):
            if not self.index.add_alias(out, args[0], repeats=args[1]):
                self._refuse(func, args[0])
        elif (name in _JOIN_OPS and tensors and isinstance(out, torch.Tensor)
              and all(self.index.is_param(t) for t in tensors)):
            # torch.cat / torch.stack of parameters (views of them): a parameter view too, so the
            # product that uses it charges each element (not activation MACs of a new tensor)
            self.index.add_joined(out, list(args[0]), lambda parts: func(parts, *args[1:]))
        elif name in _COPY_OPS and tensors and self.index.is_param(tensors[0]) and isinstance(out, torch.Tensor):
            self.index.add_alias(out, tensors[0])
        elif name in _COPY_OPS and tensors and isinstance(out, torch.Tensor) and self.scaled.holds(tensors[0]):
            self.scaled.copy(tensors[0], out)
        elif name in ("mul", "mul_") and isinstance(out, torch.Tensor):
            self._broadcast_product(args, out)
        elif name in _REDUCTIONS and tensors and self.scaled.holds(tensors[0]):
            self._reduced_scale(args)
        elif func.is_view or torch.Tag.pointwise in func.tags or name in _NO_MAC_OPS:
            pass
        else:
            for t in tensors:
                if self.index.is_param(t):
                    self._refuse(func, t)

    def _convolution(self, func, args, out) -> None:
        x, weight, transposed = args[0], args[1], bool(args[6])
        positions = math.prod(x.shape[2:]) if transposed else math.prod(out.shape[2:])
        uses = x.shape[0] * positions
        if self.index.is_param(x):
            self._refuse(func, x)
        if self.index.is_param(weight):
            self._param(weight, uses)
        else:
            self._activation(uses * weight.numel())

    def _broadcast_product(self, args, out) -> None:
        """``x * w``, ``w`` a parameter. If the product has the activation's shape, ``w`` is a scale
        (a norm's affine, LayerScale, a per-channel gate): element-wise, no MACs. If the activation
        is broadcast too (``(x.unsqueeze(-2) * w).sum(-1)``: a linear layer written element-wise),
        every output element is one multiplication by one weight element: MACs of ``w``. A
        product of two parameters ``a * b`` waits for a reduction (``_reduced_scale``)."""
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return
        a_param, b_param = self.index.is_param(a), self.index.is_param(b)
        if not (a_param or b_param):
            return
        if a_param and b_param:
            # As in _product: the running module's own parameter is the weight, the other its
            # input; two of the same standing are a product of parameters, MACs if it is summed.
            a_own, b_own = self._owned(a), self._owned(b)
            if a_own == b_own:
                self.scaled.add(out, a, b)
                return
            a_param = a_own
        w, x = (a, b) if a_param else (b, a)
        if out.numel() > x.numel():
            self._param(w, out.numel() // w.numel())
        else:
            self.scaled.add(out, w)

    def _reduced_scale(self, args) -> None:
        """``(x * w).sum(d)``, also through views or copies of the product (``.view(B, T, H,
        D).sum(-1)``): if the reduction adds products of different elements of ``w`` (``d`` runs
        along ``w``: ``(h * self.v).sum(-1)``, a learned query), the scale was a dot product and
        each summed product is a MAC of ``w``; summed along a broadcast dimension of ``w`` (a
        pool after a scale) it stays a scale."""
        t = args[0]
        found = self.scaled.take(t)         # [(storage of a factor, positions in it of t's elements)]
        if found is None:
            return
        dims = args[1] if len(args) > 1 and args[1] is not None else []
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % t.dim() for d in dims] if dims else list(range(t.dim()))     # none: all
        if not any(bool((positions != positions.narrow(d, 0, 1)).any())
                   for d in dims if t.shape[d] > 1 for _, positions in found):
            return
        if len(found) == 1:
            key, positions = found[0]
            self._param_at(key, positions.reshape(-1), torch.ones(positions.numel(), dtype=torch.int64))
        else:
            self._summed_parameter_products(t, found)

    def _summed_parameter_products(self, t: torch.Tensor, factors) -> None:
        """``(a * b).sum(d)``, ``a`` and ``b`` parameters: each summed product (an element of
        ``t``) is one MAC, charged to one of its two factors on a checkerboard, the element at
        (i0, i1, ...) of ``t`` to ``a`` if i0 + i1 + ... is even, else to ``b``. As in
        ``_parameter_product``: the dense sum is exact, and with zeros in either factor the count
        never falls below the MACs of the sparse product (a MAC of two nonzero factors is always
        charged to a nonzero)."""
        coords = torch.meshgrid(*[torch.arange(n) for n in t.shape], indexing="ij")
        to_a = (sum(coords, torch.zeros((), dtype=torch.int64)) % 2 == 0).reshape(-1)
        for (key, positions), mine in zip(factors, (to_a, ~to_a)):
            flat = positions.reshape(-1)[mine]
            self._param_at(key, flat, torch.ones(flat.numel(), dtype=torch.int64))

    def _trilinear(self, func, args) -> None:
        """``nn.Bilinear``: three operands unsqueezed at ``expand1..3``, multiplied, summed. A
        weight element is used once per element of the broadcast product it does not span."""
        shapes = []
        for t, dims in zip(args[:3], args[3:6]):
            shape = list(t.shape)
            for d in sorted(dims):
                shape.insert(d, 1)
            shapes.append(shape)
        total = math.prod(torch.broadcast_shapes(*shapes))
        params = [t for t in args[:3] if self.index.is_param(t)]
        if len(params) > 1:
            self._refuse(func, params[0])
        elif params:
            self._param(params[0], total // params[0].numel())
        else:
            self._activation(total)

    def _rnn(self, args) -> None:
        x = args[0]
        tokens = x.numel() // x.shape[-1]           # (T, B, F), (B, T, F) or packed (sum of lengths, F)
        for t in _flatten(args[1:]):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and self.index.is_param(t):
                self._param(t, tokens)


def get_mha_fastpath() -> bool:
    """Whether nn.MultiheadAttention / TransformerEncoderLayer may use their fused fast path
    (``torch.backends.mha`` in torch >= 2.2; older versions always may)."""
    mha = getattr(torch.backends, "mha", None)
    return mha.get_fastpath_enabled() if mha is not None else True


def set_mha_fastpath(enabled: bool) -> None:
    """Turn the fused attention fast path on or off (a no-op where torch has no switch: there the
    function mode of the trace keeps attention on its ordinary path)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is not None:
        mha.set_fastpath_enabled(enabled)


def _flatten(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


class _AddCounter(TorchFunctionMode):
    """Counts elementwise tensor additions made outside leaf modules (residual adds)."""

    def __init__(self, scope: list[str], leaf_depth: list[int]):
        super().__init__()
        self.scope, self.leaf_depth = scope, leaf_depth
        self.ops_by_scope: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if (func in _ADD_FUNCS and self.leaf_depth[0] == 0 and len(args) >= 2
                and all(isinstance(a, torch.Tensor) for a in args[:2])
                and isinstance(result, torch.Tensor)):
            key = self.scope[-1] if self.scope else ""
            self.ops_by_scope[key] = self.ops_by_scope.get(key, 0) + result.numel()
        return result
