"""A pickle module that rebuilds tensors and nothing else.

Why this exists: ``torch.load(path, weights_only=True)`` refuses any checkpoint that pickles
an object it does not know, for example the SGD optimizer saved next to the weights in the
MLPNet reference checkpoint. The unsafe way out, ``weights_only=False``, lets the file run
arbitrary code while it loads. This module is the safe way out: it is passed to
``torch.load(..., pickle_module=restricted_pickle)``, and its :class:`Unpickler` resolves only

* the torch functions that rebuild a tensor or a parameter from a storage,
* ``collections.OrderedDict`` (the container of every ``state_dict``),

while torch itself resolves the storage types (``torch.FloatStorage`` ...). Every other class
or function named in the file (an optimizer, a scheduler, ``os.system`` ...) is replaced by an
inert placeholder: "calling" it builds an :class:`InertObject` that ignores its arguments and
its state. So nothing from the file is executed; the weights come back as tensors and
everything else as harmless placeholders that the caller can ignore.
"""

from __future__ import annotations

import collections
import pickle
from typing import IO, Any

import torch._utils

__all__ = ["InertObject", "Unpickler", "load"]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class InertObject:
    """Stand-in for an object whose class the file names but we refuse to import.

    Accepts and discards whatever the unpickler hands it (constructor arguments, ``BUILD``
    state, list/dict items), so the rest of the file can still be read.
    """

    source = "?"  # "module.name" of the refused global, set on each placeholder subclass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.source}>"


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns tensor-rebuild helpers."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return type("Inert_" + name, (InertObject,), {"source": f"{module}.{name}"})


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """``pickle.load`` through :class:`Unpickler` (torch calls it for the legacy format's headers)."""
    return Unpickler(file, **kwargs).load()
