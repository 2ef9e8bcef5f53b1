"""Parameters inside a traced forward pass: which parameter elements a tensor's storage holds
(a view, a chunk of a packed weight, a copy), how many times each element is multiplied, and the
products ``x * w`` of a scale that a later reduction may turn into dot products. Used by the
trace of ``cost_trace``."""

from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef


class ParamUses:
    """Per parameter: how many times each element is multiplied in the traced pass, accumulated.

    ``uniform[name]`` is added to every element; ``partial[name]`` (numel,) holds extra uses of
    some elements only (a chunk of a packed projection). ``weights`` are the parameters used as
    a weight operand at least once (an embedding table too, at zero uses).
    """

    def __init__(self):
        self.uniform: dict[str, int] = {}
        self.partial: dict[str, torch.Tensor] = {}
        self.weights: list[str] = []

    def mark(self, name: str) -> None:
        if name not in self.weights:
            self.weights.append(name)
            self.uniform.setdefault(name, 0)

    def per_element(self, name: str, numel: int) -> tuple[int | None, torch.Tensor | None]:
        """(uses per element, None) if every element costs the same, else (None, (numel,))."""
        base = self.uniform.get(name, 0)
        extra = self.partial.get(name)
        if extra is None or bool((extra == extra[0]).all()):
            total = base + (0 if extra is None else int(extra[0]))
            return total, None
        return None, extra + base


class ParamIndex:
    """Finds which parameters (and which of their elements) a tensor's storage holds."""

    def __init__(self, model: nn.Module):
        self.by_storage: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._maps: dict[int, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
        self.keep_alive: list[torch.Tensor] = []
        self.numels: dict[str, int] = {}
        for name, p in model.named_parameters():
            self.numels[name] = p.numel()
            if p.numel() == 0:
                continue
            self.by_storage.setdefault(storage_key(p), []).append((name, p))

    def is_param(self, t) -> bool:
        return isinstance(t, torch.Tensor) and storage_key(t) in self.by_storage

    def owners(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
        """[(parameter name, None if ``t`` covers it exactly once else the flat indices (m,) of
        the parameter's elements ``t`` holds, with repeats)]."""
        entries = self.by_storage.get(storage_key(t), [])
        if len(entries) == 1 and entries[0][1] is not None and _same_elements(t, entries[0][1]):
            return [(entries[0][0], None)]
        return [(name, idx) for name, idx, _ in self.locate(storage_key(t), self.positions(t).reshape(-1))]

    def _map(self, key: int):
        if key not in self._maps:
            self._maps[key] = self._build_map(key, self.by_storage[key])
        return self._maps[key]

    def positions(self, t: torch.Tensor) -> torch.Tensor:
        """Storage position of each element of parameter view ``t`` (t's shape; repeats where
        ``t`` is expanded)."""
        flat = self._map(storage_key(t))[0]
        return torch.arange(flat.numel()).as_strided(t.size(), t.stride(), t.storage_offset())

    def locate(self, key: int, positions: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """[(parameter name, flat indices (m,) of its elements, where they are in ``positions``
        (m,))] for storage positions (N,) of the parameter storage ``key``."""
        flat, owner, names = self._map(key)
        which, idx = owner[positions], flat[positions]
        found = []
        for i in which.unique().tolist():
            if i >= 0:
                where = (which == i).nonzero().squeeze(1)
                found.append((names[i], idx[where], where))
        return found

    def add_alias(self, out: torch.Tensor, src: torch.Tensor, repeats=None) -> bool:
        """``out`` is an element-wise copy of ``src`` (a parameter view), tiled by ``repeats`` if
        given (``Tensor.repeat``): charge ``out``'s uses to it. False if that cannot be done."""
        found = self.owners(src)
        if len(found) != 1:
            return False
        name, idx = found[0]
        idx = torch.arange(src.numel()) if idx is None else idx
        if idx.numel() != src.numel():
            return False
        idx = idx.view(src.shape)
        if repeats is not None:
            idx = idx.repeat(*repeats)
        if idx.shape != out.shape:
            return False
        size = out.untyped_storage().nbytes() // out.element_size()
        flat = torch.full((size,), -1, dtype=torch.int64)
        flat.as_strided(out.size(), out.stride(), out.storage_offset()).copy_(idx.view(out.shape))
        owner = torch.where(flat >= 0, 0, -1)
        key = storage_key(out)
        self.by_storage[key] = [(name, None)]
        self._maps[key] = (flat, owner, [name])
        self.keep_alive.append(out)
        return True

    def add_joined(self, out: torch.Tensor, srcs: list, join) -> bool:
        """``out`` = ``join(srcs)`` (``torch.cat`` / ``torch.stack`` of parameter views, of one
        parameter or several: ``torch.cat([self.weight, self.u])``): charge ``out``'s uses to the
        elements it holds, as for a view. ``join`` is the same operation, applied to the parameter
        element indices of ``srcs``. False (nothing recorded) if an element of a source is not a
        parameter's, or the result does not match ``out``."""
        names: list[str] = []
        flats, owners = [], []
        for t in srcs:
            flat, owner, entry_names = self._map(storage_key(t))
            positions = self.positions(t)
            mine = owner[positions]
            if bool((mine < 0).any()):
                return False
            names.extend(n for n in entry_names if n not in names)
            ids = torch.tensor([names.index(n) for n in entry_names], dtype=torch.int64)
            flats.append(flat[positions])
            owners.append(ids[mine])
        idx, which = join(flats), join(owners)
        if idx.shape != out.shape:
            return False
        size = out.untyped_storage().nbytes() // out.element_size()
        flat = torch.full((size,), -1, dtype=torch.int64)
        owner = torch.full((size,), -1, dtype=torch.int64)
        flat.as_strided(out.size(), out.stride(), out.storage_offset()).copy_(idx)
        owner.as_strided(out.size(), out.stride(), out.storage_offset()).copy_(which)
        key = storage_key(out)
        self.by_storage[key] = [(name, None) for name in names]
        self._maps[key] = (flat, owner, names)
        self.keep_alive.append(out)
        return True

    @staticmethod
    def _build_map(key, entries):
        size = max(p.storage_offset() + _extent(p) for _, p in entries)
        size = max(size, entries[0][1].untyped_storage().nbytes() // entries[0][1].element_size())
        flat = torch.full((size,), -1, dtype=torch.int64)
        owner = torch.full((size,), -1, dtype=torch.int64)
        for i, (_, p) in enumerate(entries):
            flat.as_strided(p.size(), p.stride(), p.storage_offset()).copy_(
                torch.arange(p.numel()).view(p.shape))
            owner.as_strided(p.size(), p.stride(), p.storage_offset()).fill_(i)
        return flat, owner, [name for name, _ in entries]


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _extent(p: torch.Tensor) -> int:
    return 1 + sum((s - 1) * st for s, st in zip(p.shape, p.stride()))


def _same_elements(t: torch.Tensor, p: torch.Tensor) -> bool:
    """True if ``t`` is a permuted view of all of ``p``, each element once."""
    if t.storage_offset() != p.storage_offset() or t.numel() != p.numel():
        return False
    layout = lambda x: sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1)  # noqa: E731
    return layout(t) == layout(p)


class ScaledProducts:
    """Products ``x * w`` of an activation and a parameter scale ``w``, or ``a * b`` of two
    parameters, until a reduction decides whether they were dot products. Found by storage, so a
    view of a product (``.view``, ``.transpose``, ``.unsqueeze``) is found too; a copy (``.reshape``
    of a transposed product, a dtype cast) is recorded with the positions of the tensor it copies."""

    def __init__(self, index: ParamIndex):
        self.index = index
        # storage of a product -> (weak ref to that storage, the product's size, stride and
        # offset in it, [(storage of a factor, positions in it of the product's elements)])
        self.products: dict[int, tuple] = {}

    def add(self, out: torch.Tensor, *factors: torch.Tensor) -> None:
        """``out`` = the element-wise product of parameter views ``factors`` (one: a scale of an
        activation; two: a product of parameters), broadcast to out's shape."""
        self._record(out, [(storage_key(w), self.index.positions(w).broadcast_to(out.shape)) for w in factors])

    def holds(self, t: torch.Tensor) -> bool:
        return self._lookup(t) is not None

    def copy(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` is an element-wise copy of ``src`` (a product or a view of one)."""
        self._record(out, [(key, positions.clone().view(out.shape)) for key, positions in self._lookup(src)])

    def take(self, t: torch.Tensor) -> list[tuple[int, torch.Tensor]] | None:
        """[(storage of a factor, positions in it of ``t``'s elements (t.shape))], one per factor,
        forgetting the product (its products are charged once); None if ``t`` is not within a
        product."""
        found = self._lookup(t)
        self.products.pop(storage_key(t), None)
        return found

    def _record(self, out: torch.Tensor, factors: list[tuple[int, torch.Tensor]]) -> None:
        layout = (out.size(), out.stride(), out.storage_offset(), out.element_size())
        self.products[storage_key(out)] = (StorageWeakRef(out.untyped_storage()), layout, factors)

    def _lookup(self, t: torch.Tensor) -> list[tuple[int, torch.Tensor]] | None:
        entry = self.products.get(storage_key(t))
        if entry is None:
            return None
        storage, (size, stride, offset, element_size), factors = entry
        if storage.expired():               # freed: its memory may now hold something else
            self.products.pop(storage_key(t))
            return None
        if t.element_size() != element_size:
            return None                     # the product's bytes read as another dtype
        found = []
        for key, positions in factors:
            flat = torch.full((t.untyped_storage().nbytes() // element_size,), -1, dtype=torch.int64)
            flat.as_strided(size, stride, offset).copy_(positions)
            mine = flat.as_strided(t.size(), t.stride(), t.storage_offset())
            if bool((mine < 0).any()):
                return None                 # reaches outside the product
            found.append((key, mine))
        return found
