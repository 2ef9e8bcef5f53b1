"""Fingerprints of the functions and modules a user hands ``prunekit.prune`` (a loss, an
``importance`` score, an own ``Method``'s ``run``), so that a run folder can tell another one from
the one its run was made with.

``fingerprint(obj)`` -> ``(digest, None)``, a SHA-256 hex string that is the same in every process
for the same code and state, or ``(None, why)`` when ``obj`` cannot be hashed faithfully (``why``
says what could not be read: a compiled function of the user's, an object whose state is not
plain values). What is hashed:

- a Python function: its code (bytecode ``co_code``, constants ``co_consts`` recursively, names
  ``co_names``/``co_varnames``, argument counts; not its name, file or line numbers), its default
  values, its closure's values and the values of the globals its code loads (``LOAD_GLOBAL``);
- an ``nn.Module`` (a loss such as ``CrossEntropyLoss(label_smoothing=0.1)``) or another callable
  object: its class (by name; a class of the user's by its methods' code too) and its state
  (``vars()``: plain attributes, parameters and buffers by their bytes, submodules);
- a value: numbers, strings, None, tensors and arrays (dtype, shape, bytes), lists, tuples, dicts
  and sets of those;
- anything from a library (torch, numpy, the standard library, prunekit, an installed package):
  its qualified name (the library's version is not recorded, as for a built-in method).

No ``id()`` or ``repr`` with an address enters a digest.
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import sys
import types

import numpy as np
import torch
from torch import nn

_DEPTH = 8          # functions calling functions ... deeper than this: not followed (unhashable)
_LIBRARIES = ("torch", "numpy", "prunekit", "scipy", "safetensors", "tqdm", "transformers", "timm", "torchvision",
              "typing_extensions")


class Unhashable(Exception):
    """``obj`` (or something it reads) cannot be hashed faithfully; the message says what."""


def fingerprint(obj) -> tuple[str | None, str | None]:
    """``(sha256 hex, None)`` of callable or module ``obj`` (see the module docstring), or
    ``(None, why)`` when it cannot be hashed faithfully."""
    hasher = _Hasher()
    try:
        hasher.add(obj, 0)
    except Unhashable as err:
        return None, str(err)
    except RecursionError:
        return None, "it nests too deeply to be read"
    return hasher.digest.hexdigest(), None


def _library(module_name: str | None) -> bool:
    """Whether ``module_name`` is a library's (identified by name), not the user's own code."""
    if not module_name:
        return False
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in _LIBRARIES or top == "builtins":
        return True
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None) or ""
    return "site-packages" in path or "dist-packages" in path


def _named(obj) -> str | None:
    """``module:qualname`` of ``obj`` when that name finds ``obj`` itself, else None."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    found = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}:{qualname}" if found is obj else None


class _Hasher:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.open: set[int] = set()     # objects being hashed (cycles): never hashed by id

    def put(self, *parts) -> None:
        for part in parts:
            text = part if isinstance(part, bytes) else str(part).encode()
            self.digest.update(len(text).to_bytes(8, "little") + text)

    def add(self, obj, depth: int) -> None:
        if depth > _DEPTH:
            raise Unhashable("it calls functions nested too deeply to be read")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            self.put(type(obj).__name__, repr(obj))
            return
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format, type(Ellipsis))):
            self.put(type(obj).__name__, str(obj))
            return
        if isinstance(obj, torch.Tensor):
            from .runs import tensors_sha256
            self.put("tensor", type(obj).__name__, obj.requires_grad, tensors_sha256([("t", obj)]))
            return
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise Unhashable("it reads a NumPy array of Python objects")
            self.put("ndarray", obj.dtype.str, obj.shape, np.ascontiguousarray(obj).tobytes())
            return
        if isinstance(obj, np.generic):
            self.put("np", obj.dtype.str, obj.tobytes())
            return
        if isinstance(obj, types.ModuleType):
            self.put("module", obj.__name__)
            return
        if isinstance(obj, enum.Enum):
            self.put("enum", _named(type(obj)) or type(obj).__qualname__, obj.name)
            return
        key = id(obj)
        if key in self.open:            # a cycle (a function calling itself): its place, not its id
            self.put("cycle")
            return
        self.open.add(key)
        try:
            self._add_object(obj, depth)
        finally:
            self.open.discard(key)

    def _add_object(self, obj, depth: int) -> None:
        if isinstance(obj, (list, tuple)):
            self.put(type(obj).__name__, len(obj))
            for item in obj:
                self.add(item, depth)
            return
        if isinstance(obj, (set, frozenset)):       # in an order that does not hang on str hashing
            self.put(type(obj).__name__, len(obj))
            for item in sorted(self._apart(item, depth) for item in obj):
                self.put(item)
            return
        if isinstance(obj, dict):
            self.put(type(obj).__name__, len(obj))
            for key, value in sorted(((self._apart(k, depth), v) for k, v in obj.items()), key=lambda kv: kv[0]):
                self.put(key)
                self.add(value, depth)
            return
        if isinstance(obj, types.CodeType):
            self._add_code(obj, depth)
            return
        if isinstance(obj, types.FunctionType):
            self._add_function(obj, depth)
            return
        if isinstance(obj, types.MethodType):      # a bound method: its function and its object's state
            self.put("method")
            self.add(obj.__func__, depth + 1)
            self.add(obj.__self__, depth + 1)
            return
        if isinstance(obj, functools.partial):
            self.put("partial")
            self.add(obj.func, depth + 1)
            self.add(obj.args, depth + 1)
            self.add(obj.keywords, depth + 1)
            return
        if isinstance(obj, (staticmethod, classmethod)):
            self.put(type(obj).__name__)
            self.add(obj.__func__, depth + 1)
            return
        if isinstance(obj, property):
            self.put("property")
            for part in (obj.fget, obj.fset, obj.fdel):
                self.add(part, depth + 1)
            return
        if isinstance(obj, type):
            self._add_class(obj, depth)
            return
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                            types.MethodDescriptorType, types.MethodWrapperType, types.ClassMethodDescriptorType)):
            self._add_compiled(obj)
            return
        self._add_instance(obj, depth)

    def _apart(self, obj, depth: int) -> str:
        """The digest of ``obj`` alone (a set's item, a dict's key: sorted by it)."""
        inner = _Hasher()
        inner.open = self.open
        inner.add(obj, depth)
        return inner.digest.hexdigest()

    def _add_code(self, code: types.CodeType, depth: int) -> None:
        self.put("code", code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
                 code.co_code, ",".join(code.co_names), ",".join(code.co_varnames),
                 ",".join(code.co_freevars), ",".join(code.co_cellvars))
        self.put(len(code.co_consts))
        for const in code.co_consts:
            self.add(const, depth)

    def _add_function(self, fn: types.FunctionType, depth: int) -> None:
        if _library(fn.__module__) and (name := _named(fn)) is not None:
            self.put("library function", name)
            return
        self.put("function")
        self._add_code(fn.__code__, depth)
        self.add(fn.__defaults__, depth + 1)
        self.add(fn.__kwdefaults__, depth + 1)
        cells = fn.__closure__ or ()
        for name, cell in zip(fn.__code__.co_freevars, cells):
            try:
                value = cell.cell_contents
            except ValueError:          # a cell not filled yet
                self.put(name, "empty cell")
                continue
            self.put("closure", name)
            try:
                self.add(value, depth + 1)
            except Unhashable as err:
                raise Unhashable(f"its closure's {name} cannot be read ({err})") from None
        builtins = fn.__globals__.get("__builtins__", {})
        for name in sorted(_global_loads(fn.__code__)):
            if name in fn.__globals__:
                value = fn.__globals__[name]
            elif name in (builtins if isinstance(builtins, dict) else vars(builtins)):
                self.put("builtin", name)
                continue
            else:
                self.put("undefined global", name)
                continue
            self.put("global", name)
            try:
                self.add(value, depth + 1)
            except Unhashable as err:
                message = str(err)
                raise Unhashable(message if message.startswith("it reads global") else
                                 f"it reads global {name} ({message})") from None

    def _add_class(self, cls: type, depth: int) -> None:
        if _library(cls.__module__):
            self.put("library class", _named(cls) or f"{cls.__module__}:{cls.__qualname__}")
            return
        self.put("class", cls.__qualname__)      # the user's: its methods' code, and its bases
        for base in cls.__mro__[1:]:
            self.add(base, depth + 1)
        for name, value in sorted(vars(cls).items()):
            if name == "__dataclass_fields__":         # an Options dataclass: its fields' defaults
                import dataclasses
                self.put(name)
                for f in sorted(value.values(), key=lambda f: f.name):
                    self.put(f.name)
                    self.add(None if f.default is dataclasses.MISSING else f.default, depth + 1)
                    self.add(None if f.default_factory is dataclasses.MISSING else f.default_factory, depth + 1)
                continue
            if name in ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__firstlineno__",
                        "__static_attributes__", "__annotations__", "__slots__", "__parameters__", "__orig_bases__",
                        "__dataclass_params__", "__match_args__", "_abc_impl"):
                continue
            self.put(name)
            self.add(value, depth + 1)

    def _add_compiled(self, obj) -> None:
        owner = getattr(obj, "__objclass__", None) or getattr(getattr(obj, "__self__", None), "__class__", None)
        module = getattr(obj, "__module__", None) or getattr(owner, "__module__", None)
        if isinstance(getattr(obj, "__self__", None), types.ModuleType):
            module = obj.__self__.__name__
        bound = getattr(obj, "__self__", None)
        if _library(module):
            if bound is not None and not isinstance(bound, (types.ModuleType, type)):
                self.add(bound, 1)          # a method bound to an object: the object's state too
            self.put("compiled", module, getattr(owner, "__qualname__", ""), getattr(obj, "__qualname__", ""),
                     getattr(obj, "__name__", ""))
            return
        raise Unhashable(f"{getattr(obj, '__name__', type(obj).__name__)} is a compiled function, whose code "
                         "cannot be read")

    def _add_instance(self, obj, depth: int) -> None:
        cls = type(obj)
        self.put("instance")
        self._add_class(cls, depth + 1)
        try:
            state = vars(obj)
        except TypeError:
            raise Unhashable(f"it is a {cls.__name__}, whose state cannot be read") from None
        if isinstance(obj, nn.Module):
            state = {k: v for k, v in state.items() if not k.startswith("_") or k in _MODULE_STATE or v}
        try:
            self.add(dict(state), depth + 1)
        except Unhashable as err:
            raise Unhashable(f"the state of its {cls.__name__} cannot be read ({err})") from None


# An nn.Module's own fields that hold what it computes with; its other underscored fields (hooks,
# flags) are hashed only when they hold something (an empty hook table changes nothing).
_MODULE_STATE = ("_parameters", "_buffers", "_modules")


def _global_loads(code: types.CodeType) -> set[str]:
    """The global names ``code`` (and the code objects nested in it) loads."""
    names = set()
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            names.add(instruction.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_loads(const)
    return names
