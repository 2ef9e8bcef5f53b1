"""Fingerprints of the functions and modules a user hands ``prunekit.prune`` (a loss, an
``importance`` score, an own ``Method``'s ``run``), so that a run folder can tell another one from
the one its run was made with.

``fingerprint(obj)`` -> ``(digest, None)``, a SHA-256 hex string that is the same in every process
for the same code and state, or ``(None, why)`` when ``obj`` cannot be hashed faithfully (``why``
says what could not be read: a compiled function of the user's, an object whose state is not
plain values). What is hashed:

- a Python function: its code (bytecode ``co_code``, constants ``co_consts`` recursively, names
  ``co_names``/``co_varnames``, argument counts; not its name, file or line numbers), its default
  values, its closure's values and the values of the globals its code loads (``LOAD_GLOBAL``); its
  docstring is not hashed (code reading its own ``__doc__`` is rare: a docstring added is the same code); a
  module of the user's among them by the attributes the code can reach on it (those named in its
  ``co_names``: ``helpers.my_loss`` hashes ``my_loss``'s code), and so a module of the user's the
  code imports in its body (``import mylosses`` or ``from mylosses import f`` inside the function,
  ``from .losses import f`` in a package) by its source file's bytes and the user modules that
  source imports, loaded or not: never imported here (an import in a branch not taken neither runs
  nor fails); one loaded without a source file by the attributes the code names;
- a list, set, bytearray, deque or dict with other than string keys the code writes into
  (``history.append(v)``: a log, not an input) among those globals, closure values and defaults: by
  its type only, since what it holds changes as the code runs (the same loss run again in the same
  process is the same loss); one it only reads (``name in KEEP``) by its values; a dict with string
  keys it writes into (``opts.setdefault('calls', 0)``) by its keys, a slot each, so that a setting
  it also reads (``opts['smoothing']``) is compared and the key the run wrote left out (``skip``);
- a ``torch.compile``'d function or module by the function or module it compiles
  (``_torchdynamo_orig_callable``, ``_orig_mod``; not its compile options); a ``torch.Generator``
  (by its device and ``get_state()``), a NumPy ``Generator`` or ``RandomState`` and a
  ``random.Random`` by their state;
- an ``nn.Module`` (a loss such as ``CrossEntropyLoss(label_smoothing=0.1)``) or another callable
  object: its class (by name; a class of the user's by its methods' code too) and its state
  (``vars()``: plain attributes, parameters and buffers by their bytes, submodules; the ``training``
  flag of a torch.nn loss class, none of which reads it, as ``True`` whatever it is (``.eval()``
  is the same loss, with the digest it always had), while a module of the user's and a teacher it
  holds keep theirs: dropout, batch norm; a module's hooks
  by their functions in the order they run, not by their handles' process-wide ids); submodules
  nest as deep as they are built (a distillation loss holding a teacher model), only functions
  reaching functions count towards the depth read;
- a ``logging.Logger`` by its name (its level and handlers say where it writes, not what the
  code computes), a bare ``object()`` (a sentinel) as such;
- a value: numbers, strings, None, tensors and arrays (dtype, shape, bytes), lists, tuples, dicts
  and sets of those;
- anything from a library (torch, numpy, the standard library, prunekit, an installed package):
  its qualified name (the library's version is not recorded, as for a built-in method). Whether a
  module is a library's is decided by where its file lies (the standard library's directories,
  a ``site-packages``/``dist-packages`` directory, prunekit's own), not by its name: a user's own
  ``profile.py`` is the user's code.

A module of the user's is one outside those directories, wherever it lies: next to the script, on
``PYTHONPATH``, or a package installed with ``pip install -e`` (its edits are edits of the code
given; it is hashed by what the code reaches of it, not whole).

What a run writes into the code it is given is its output, not its input (issue s52): ``slots(obj)``
names every place a value is reached by (an object's attribute ``calls``, a dict's key
``stats.seen``, a submodule's ``_modules.inner.calls``, ``global:COUNT``, ``closure:n``,
``import:mylosses``; a dict's key holding ".", ":" or "%" escaped: ``layer1%2E0``; the parts of a
tuple handed in, an own Method's, ``item:3``) with the digest of what it holds; ``written_by_run`` compares them before
and after a run, and ``fingerprint(obj, skip=...)`` leaves those the run wrote out
(``api._note_written`` records them in the run folder, ``runs.CODE_WRITTEN``, with each one's
digest at the run's first start, which a rerun's start must match: a value written may be read).
Without ``skip`` the digest is the one ``fingerprint`` always gave.

``slot_record`` keeps the slots (digests shortened) for a run folder (``api``'s ``runs.CODE_SLOTS``)
and ``differing`` names, in words (``describe``), the places in which other code differs from the
one recorded: "its attribute scale", "global opts['smoothing']", "its code".

A tensor's digest is kept for the call (``forget_tensors`` starts one) while its storage, version,
shape, dtype and strides are the same object's: a 200 MB teacher is read once a call, not three
times (before, in the config, after the run).

No ``id()`` or ``repr`` with an address enters a digest, and ``fingerprint`` never raises: what
it cannot read gives ``(None, why)``.
"""

from __future__ import annotations

import collections
import dis
import enum
import functools
import hashlib
import logging
import os
import site
import sys
import sysconfig
import random
import types
import weakref

import numpy as np
import torch
from torch import nn

_DEPTH = 8          # functions calling functions ... deeper than this: not followed (unhashable)
# Methods by which code writes into a container it reached (``history.append(v)``).
_WRITES = frozenset(("append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "remove",
                     "discard", "clear", "appendleft", "extendleft", "__setitem__", "__delitem__", "__iadd__"))
_MUTABLE = (list, dict, set, bytearray, collections.deque)


class Unhashable(Exception):
    """``obj`` (or something it reads) cannot be hashed faithfully; the message says what."""


def fingerprint(obj, skip=()) -> tuple[str | None, str | None]:
    """``(sha256 hex, None)`` of callable or module ``obj`` (see the module docstring), or
    ``(None, why)`` when it cannot be hashed faithfully. ``skip``: slots left out (paths as
    ``slots`` names them: what a run wrote, ``written_by_run``); without, the digest of all."""
    hasher = _Hasher(skip=skip)
    return _digest(hasher, obj)


def slots(obj) -> dict[str, str] | None:
    """Every slot of ``obj`` (a place a value is reached by, named by its path: ``calls`` for a
    loss's ``self.calls``, ``_modules.inner.calls`` for a submodule's, ``global:COUNT`` for a
    function's global, ``closure:n``, ``default:x``, ``global:helpers.count`` for an attribute of a
    user's module, ``import:mylosses.f``, ``class:n``, ``__self__.n`` of a bound method) -> the
    digest of the value it holds, or None when ``obj`` cannot be hashed faithfully. Compared
    before and after a run by ``written_by_run``."""
    hasher = _Hasher(record=True)
    return hasher.slots if _digest(hasher, obj)[0] is not None else None


def slot_record(obj, width: int = 16) -> dict | None:
    """What a run folder keeps of ``obj``'s slots (``api``'s ``code-slots.json``) so that a refusal
    can name what differs: ``{"slots": {path: the first ``width`` hex digits of its digest}, "keys":
    [the paths that are a dict's key, not an attribute]}``, or None when ``obj`` cannot be hashed."""
    hasher = _Hasher(record=True)
    if _digest(hasher, obj)[0] is None:
        return None
    return {"slots": {path: digest[:width] for path, digest in hasher.slots.items()}, "keys": sorted(hasher.keys)}


def differing(recorded: dict, now: dict, skip=(), limit: int = 3, items=None) -> list[str] | None:
    """The places (``describe``d) in which code whose ``slot_record`` is ``now`` differs from the
    code whose record is ``recorded`` (the deepest of each, as ``written_by_run`` finds them; its
    code first), leaving out ``skip`` (the slots a run wrote) and what is under them; at most
    ``limit`` and then "N more places" (``items``: as ``describe``'s). None when nothing named differs (the records say nothing,
    and the caller says only that the code or its state differs)."""
    try:
        before, after = dict(recorded["slots"]), dict(now["slots"])
        keys = {str(path) for path in recorded.get("keys", ())} | set(now.get("keys", ()))
        width = min((len(digest) for digest in before.values()), default=16)
        after = {path: digest[:width] for path, digest in after.items()}
        skip = tuple(str(path) for path in skip)
        found = [path for path in written_by_run(before, after)
                 if not any(path == s or path.startswith(s + ".") for s in skip)]
    except (KeyError, TypeError, ValueError, AttributeError):      # a damaged record: nothing named
        return None
    if not found or not all(isinstance(path, str) for path in found):
        return None
    found.sort(key=lambda path: (path.split(".")[-1] != "code", path))
    said = list(dict.fromkeys(describe(path, keys, items) for path in found))    # a place reached twice: said once
    more = len(said) - limit
    return said[:limit] + ([f"{more} more place{'s' if more > 1 else ''}"] if more > 0 else [])


_KINDS = {"global": "global", "closure": "closure variable", "default": "the default of",
          "import": "imported module", "class": "its class's"}


def _kind(kind: str, name: str, items) -> tuple[str, str]:
    """A path's lead part (``global:opts``) as (lead words, name): an ``item:N`` of a tuple of
    parts by ``items`` (``{3: "run"}``: "its run")."""
    if kind == "item":
        try:
            return "its", (items or {}).get(int(name)) or f"item {name}"
        except ValueError:
            return "its", f"item {name}"
    return _KINDS.get(kind, kind), _unescape(name)


def describe(path: str, keys=(), items=None) -> str:
    """A slot's path (``slots``) in words: ``its code``, ``its attribute scale``, ``its attribute
    teacher.0.weight`` (a submodule's parameter), ``global opts['smoothing']``, ``the code of its
    class's forward``, ``closure variable n``, ``its training flag (.train()/.eval())``; a place a
    function reached deeper reads, by that function: ``global SCALE (read by its class's
    forward)``; ``keys``: the paths that are a dict's key; ``items``: what the parts of a tuple
    handed in are, by index (an own Method's ``{3: "run", 4: "sparsify"}``: "the code of its run")."""
    parts = path.split(".")
    deeper = [i for i, part in enumerate(parts) if i > 0 and ":" in part]
    if deeper:      # read by a function it reaches (a method of its class, a function it calls)
        j = deeper[-1]
        prefix = ".".join(parts[:j]) + "."
        inner = describe(".".join(parts[j:]), {str(k)[len(prefix):] for k in keys if str(k).startswith(prefix)},
                         items if parts[j].startswith("item:") else None)
        owners = [part for part in parts[:j] if ":" in part]
        if owners:
            owner = " ".join(_kind(*owners[-1].split(":", 1), items if owners[-1] == parts[0] else None))
        else:
            owner = "its method" if parts[0] == "__self__" else describe(prefix[:-1], keys, items)
        return f"{inner} (read by {owner})"
    lead, expr, table, code = "its attribute", "", False, False
    for i, part in enumerate(parts):
        here = ".".join(parts[:i + 1])
        if part == "code" and i == len(parts) - 1:
            code = True
        elif i == 0 and ":" in part:
            lead, expr = _kind(*part.split(":", 1), items)
        elif part == "__self__":
            lead, expr = "its object's attribute", ""
        elif part in ("_modules", "_parameters", "_buffers") and here in keys or \
                part in ("_modules", "_parameters", "_buffers") and i < len(parts) - 1:
            table = True
        elif here in keys and not table:
            expr += f"[{_unescape(part)!r}]"
        else:
            expr += ("." if expr else "") + _unescape(part)
            table = False
    if code:
        return f"the code of {lead} {expr}".replace("its object's attribute ", "its method ").strip() \
            if expr else "its code"
    if expr.split(".")[-1] == "training" and lead == "its attribute":
        owner = expr.rpartition(".")[0]
        return f"the training flag (.train()/.eval()) of its {owner}" if owner else "its training flag (.train()/.eval())"
    if not expr:
        return lead
    return f"{lead} {expr}"


# Tensor digests of this call (``forget_tensors`` starts one): an unchanged tensor is hashed once
# (a teacher of 200 MB is read before, at and after a run). By id, checked to be the same object
# (a weak reference) at the same storage, version, shape, dtype and strides.
_TENSORS: dict[int, tuple] = {}


def forget_tensors() -> None:
    """Forget the tensor digests kept (``prunekit.prune`` calls it as it starts: a tensor written
    without its version counting it, ``t.data.mul_(2)``, is read again by the next call)."""
    _TENSORS.clear()


def _tensor_digest(tensor: torch.Tensor) -> str:
    from .runs import tensors_sha256
    try:
        key = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tuple(tensor.stride()),
               tensor.device)
        ref = weakref.ref(tensor)
    except (RuntimeError, TypeError, NotImplementedError):     # a sparse or otherwise storage-less tensor
        return tensors_sha256([("t", tensor)])
    held = _TENSORS.get(id(tensor))
    if held is not None and held[0]() is tensor and held[1] == key:
        return held[2]
    digest = tensors_sha256([("t", tensor)])
    _TENSORS[id(tensor)] = (ref, key, digest)
    return digest


def written_by_run(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The slots (``slots``' paths) a run wrote, from ``obj``'s slots before and after it: each
    slot that came or went (not those under it), and each whose value changed with nothing under
    it changed (the deepest: ``history`` for a list the run appended to, ``stats.n`` for one key of
    a dict, not ``stats``), sorted. What is under a slot that came or went is left out with it."""
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    came_or_went = {path for path in changed if (path in before) != (path in after)}

    def ancestors(path: str):
        while "." in path:
            path = path.rpartition(".")[0]
            yield path
    # every changed slot's ancestors, once (O(n * depth), not a scan of all changed per slot)
    above = {ancestor for path in changed for ancestor in ancestors(path)}
    written = {path for path in came_or_went if not any(a in came_or_went for a in ancestors(path))}
    written |= {path for path in changed - came_or_went if path not in above}
    return sorted(written)


def _escape(name: str) -> str:
    """A dict's key (or a module's dotted name) as one part of a slot's path (parts are joined by
    ".", a kind named before ":"): "." as "%2E", ":" as "%3A" and "%" as "%25", so that a key ``layer1.0`` is not the key ``0`` of a key ``layer1`` (a key with
    neither, every attribute name, is itself)."""
    if not any(c in name for c in ".%:"):
        return name
    return name.replace("%", "%25").replace(".", "%2E").replace(":", "%3A")


def _unescape(part: str) -> str:
    return part.replace("%3A", ":").replace("%2E", ".").replace("%25", "%") if "%" in part else part


def _digest(hasher: "_Hasher", obj) -> tuple[str | None, str | None]:
    try:
        hasher.add(obj, 0)
    except Unhashable as err:
        return None, str(err)
    except RecursionError:
        return None, "it nests too deeply to be read"
    except Exception as err:            # noqa: BLE001 - whatever reading it raises: unchecked, never a crash
        return None, f"reading it failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return hasher.digest.hexdigest(), None


def _library(module_name: str | None) -> bool:
    """Whether module ``module_name`` is a library's, not the user's own code: decided by where its
    file lies (``_library_file``), so that a user's ``profile.py`` next to the script is the
    user's though the standard library has a ``profile``. A module compiled into Python or frozen
    is a library's; a submodule without a file is its package's; a module not loaded at all is a
    library's only when the standard library names it."""
    if not module_name:
        return False
    name = module_name
    while name:
        module = sys.modules.get(name)
        if module is not None:
            path = getattr(module, "__file__", None)
            if isinstance(path, str):
                return _library_file(path)
            paths = [p for p in getattr(module, "__path__", None) or () if isinstance(p, str)]   # a namespace package
            if paths:
                return all(_library_file(p) for p in paths)
            origin = getattr(getattr(module, "__spec__", None), "origin", None)
            if name in sys.builtin_module_names or origin in ("built-in", "frozen"):
                return True
            if "." not in name:         # a module made in code (no file): the user's
                return False
        name = name.rpartition(".")[0]     # a submodule without a file (torch._C._nn): its package's
    top = module_name.split(".")[0]
    return top in sys.builtin_module_names or top in sys.stdlib_module_names


@functools.lru_cache(maxsize=None)
def _library_roots() -> tuple[str, ...]:
    """The directories whose modules are a library's: the standard library's, the site-packages
    directories and prunekit's own package."""
    roots = {os.path.dirname(os.path.abspath(__file__))}
    for scheme_paths in (sysconfig.get_paths(), sysconfig.get_paths(vars={"base": sys.base_prefix,
                                                                          "platbase": sys.base_prefix})):
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if scheme_paths.get(key):
                roots.add(scheme_paths[key])
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:          # an old virtualenv's site module
        pass
    return tuple(sorted({os.path.realpath(r) for r in roots if r}))


@functools.lru_cache(maxsize=4096)
def _library_file(path: str) -> bool:
    """Whether the module file (or package directory) ``path`` lies in a library's directory."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    for root in _library_roots():
        if os.path.commonpath([real, root]) == root:
            return True
    return False


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
    def __init__(self, skip=frozenset(), record: bool = False) -> None:
        self.digest = hashlib.sha256()
        self.open: set[int] = set()     # objects being hashed (cycles): never hashed by id
        self.path: list[str] = []       # the slots (``_slot``) leading to what is hashed now
        self.skip = frozenset(skip)     # slots left out (what a run wrote: ``fingerprint``'s ``skip``)
        self.slots: dict[str, str] | None = {} if record else None     # ``slots``: each slot's own digest
        self.keys: set[str] = set()     # the recorded slots that are a dict's key (not an object's attribute)
        self.states: set[int] = set()   # the dicts being hashed that are an object's attributes (``vars``)
        self.sources: set[str] = set()  # the source files being hashed (``_add_source``: import cycles)

    def _slot(self, name: str, hash_value, key: bool = False) -> bool:
        """Hash one named place a value is reached by (an object's attribute, a string key of a
        dict, a function's global, closure cell, default or import) by calling ``hash_value()``;
        its path (``self.path`` joined by ".") is left out when in ``self.skip`` (then nothing is
        hashed and False is returned), and recorded with its own digest in ``self.slots``. With
        neither, the bytes hashed are those of ``hash_value()`` alone. ``key``: the place is a
        dict's key, not an object's attribute (``self.keys``: ``describe`` says ``opts['s']``)."""
        self.path.append(name)
        is_key = key
        try:
            key = ".".join(self.path)
            if key in self.skip:
                return False
            if self.slots is None:
                hash_value()
                return True
            outer, self.digest = self.digest, hashlib.sha256()
            try:
                hash_value()
                own = self.digest.hexdigest()
            finally:
                self.digest = outer
            self.slots[key] = own
            if is_key:
                self.keys.add(key)
            self.put("slot", own)
            return True
        finally:
            self.path.pop()

    def _skipped(self, names) -> int:
        """How many of the slots ``names`` under the current path are left out (``self.skip``)."""
        if not self.skip:
            return 0
        prefix = "".join(part + "." for part in self.path)
        return sum(1 for name in names if prefix + name in self.skip)

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
            self.put("tensor", type(obj).__name__, obj.requires_grad, _tensor_digest(obj))
            return
        if isinstance(obj, torch.Generator):        # a random stream: by its device and state
            from .runs import tensors_sha256
            self.put("torch generator", str(obj.device), tensors_sha256([("state", obj.get_state())]))
            return
        if isinstance(obj, np.random.Generator):
            self.put("numpy generator")
            self.add(obj.bit_generator.state, depth)
            return
        if isinstance(obj, np.random.RandomState):
            self.put("numpy random state")
            self.add(obj.get_state(legacy=False), depth)
            return
        if isinstance(obj, random.Random):
            self.put("random", type(obj).__qualname__ if _library(type(obj).__module__) else "user's")
            self.add(obj.getstate(), depth)
            if not _library(type(obj).__module__):
                self._add_class(type(obj), depth + 1)
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
        if type(obj) is object:                 # a sentinel (``_MISSING = object()``): no state
            self.put("object")
            return
        if isinstance(obj, logging.Logger):     # by its name: its level and handlers say where it writes
            self.put("logger", obj.name)
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
            if type(obj) is tuple and not self.path and depth == 0:      # parts handed in together (an own
                for i, item in enumerate(obj):                          # Method's run and sparsify): a slot
                    self._slot(f"item:{i}", lambda item=item: self.add(item, depth))    # each, none shared
                return
            for item in obj:
                self.add(item, depth)
            return
        if isinstance(obj, (set, frozenset)):       # in an order that does not hang on str hashing
            self.put(type(obj).__name__, len(obj))
            for item in sorted(self._apart(item, depth) for item in obj):
                self.put(item)
            return
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):      # a slot each (``_slot``): an object's state, a table
                is_key = id(obj) not in self.states
                self.put(type(obj).__name__, len(obj) - self._skipped(map(_escape, obj)))
                for key, name in sorted((self._apart(k, depth), k) for k in obj):
                    if ".".join([*self.path, _escape(name)]) in self.skip:
                        continue
                    self.put(key)
                    self._slot(_escape(name), lambda value=obj[name]: self.add(value, depth), key=is_key)
                return
            self.put(type(obj).__name__, len(obj))
            for key, value in sorted(((self._apart(k, depth), v) for k, v in obj.items()), key=lambda kv: kv[0]):
                self.put(key)
                self.add(value, depth)
            return
        if isinstance(obj, types.CodeType):
            self._add_code(obj, depth)
            return
        if isinstance(obj, types.FunctionType):
            original = obj.__dict__.get("_torchdynamo_orig_callable")
            if original is not None and _library(getattr(torch.compile, "__module__", "torch")):
                self.put("torch.compile")       # torch.compile(f): the function it compiles (its options unread)
                self.add(original, depth)
                return
            self._add_function(obj, depth)
            return
        if isinstance(obj, types.MethodType):      # a bound method: its function and its object's state
            self.put("method")
            self.add(obj.__func__, depth + 1)
            self._slot("__self__", lambda: self.add(obj.__self__, depth + 1))
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

    def _add_code(self, code: types.CodeType, depth: int, doc=None) -> None:
        """``doc``: the docstring of the function whose code it is, hashed as no docstring (code
        reading its own ``__doc__`` is rare: a docstring added or reworded is the same code)."""
        consts, flags = code.co_consts, code.co_flags
        if isinstance(doc, str) and consts and consts[0] == doc:      # a function's docstring: its first constant
            consts = (None, *consts[1:])
            flags &= ~0x4000000         # CO_HAS_DOCSTRING (Python 3.14)
        self.put("code", code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, flags,
                 code.co_code, ",".join(code.co_names), ",".join(code.co_varnames),
                 ",".join(code.co_freevars), ",".join(code.co_cellvars))
        self.put(len(consts))
        for const in consts:
            self.add(const, depth)

    def _add_function(self, fn: types.FunctionType, depth: int) -> None:
        if _library(fn.__module__) and (name := _named(fn)) is not None:
            self.put("library function", name)
            return
        self.put("function")
        self._slot("code", lambda: self._add_code(fn.__code__, depth, doc=fn.__doc__))
        loads, attributes, written, imports = _reads(fn.__code__)
        # the defaults as a tuple and a dict (as ``add`` puts them), each value as one reached by its name
        defaults, kwdefaults = fn.__defaults__, fn.__kwdefaults__
        if defaults is None:
            self.add(None, depth + 1)
        else:
            names = fn.__code__.co_varnames[:fn.__code__.co_argcount][-len(defaults):] if defaults else ()
            self.put("tuple", len(defaults))
            for name, value in zip(names, defaults):
                self._slot(f"default:{name}", lambda value=value, name=name: self._add_reached(
                    value, name, attributes, written, depth + 1))
        if kwdefaults is None:
            self.add(None, depth + 1)
        else:
            self.put("dict", len(kwdefaults))
            for key, name in sorted((self._apart(name, depth + 1), name) for name in kwdefaults):
                self.put(key)
                self._slot(f"default:{name}", lambda name=name: self._add_reached(
                    kwdefaults[name], name, attributes, written, depth + 1))
        cells = fn.__closure__ or ()
        for name, cell in zip(fn.__code__.co_freevars, cells):
            self._slot(f"closure:{name}", lambda name=name, cell=cell: self._add_cell(
                name, cell, attributes, written, depth + 1))
        builtins = fn.__globals__.get("__builtins__", {})
        for name in sorted(loads):
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
                self._slot(f"global:{name}", lambda value=value, name=name: self._add_reached(
                    value, name, attributes, written, depth + 1))
            except Unhashable as err:
                message = str(err)
                raise Unhashable(message if message.startswith("it reads global") else
                                 f"it reads global {name} ({message})") from None
        # modules the code imports when it runs (``import mylosses`` or ``from mylosses import f`` in
        # its body), never imported here (an import in a branch not taken must not run, nor fail the
        # fingerprint): a module of the user's with a source file by its bytes (loaded or not: the
        # same digest before and after a run imports it), one loaded without a source file by the
        # attributes the code names, as a global module is
        for name in sorted(_imported(fn, imports)):
            found = _user_import(name)
            if found is None:       # a library's (by name, as ever: nothing hashed), or none to be found
                continue
            self.put("import", name)
            try:
                if isinstance(found, types.ModuleType):
                    self._slot(f"import:{_escape(name)}", lambda module=found: self._add_module(
                        module, attributes, written, depth + 1))
                else:
                    self._slot(f"import:{_escape(name)}", lambda found=found, name=name: self._add_source(
                        name, found, depth + 1))
            except Unhashable as err:
                message = str(err)
                raise Unhashable(message if message.startswith("it reads") else
                                 f"it imports {name} ({message})") from None

    def _add_source(self, name: str, path: str, depth: int) -> None:
        """A module of the user's by its source file's bytes (``path``, not executed), and the
        modules of the user's that source imports, the same way (a package's ``from .losses import
        h``: an edit of ``losses.py`` is another digest)."""
        if depth > _DEPTH:
            raise Unhashable("it imports modules nested too deeply to be read")
        key = f"source:{os.path.realpath(path)}"
        if key in self.sources:
            self.put("cycle")
            return
        try:
            with open(path, "rb") as handle:
                source = handle.read()
        except OSError as err:
            raise Unhashable(f"its source file {path} cannot be read ({err.strerror})") from None
        self.put("source", source)
        if not path.endswith(".py"):
            return
        try:
            code = compile(source, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            return          # (it fails when imported: its bytes say all there is)
        self.sources.add(key)
        try:
            package = name if os.path.basename(path) == "__init__.py" else name.rpartition(".")[0]
            for inner in sorted(_imported_from(_reads(code)[3], package)):
                found = _user_import(inner)
                if isinstance(found, str):
                    self.put("imports", inner)
                    self._add_source(inner, found, depth + 1)
                elif found is not None:
                    self.put("imports", inner, "loaded")
        finally:
            self.sources.discard(key)

    def _add_cell(self, name: str, cell, attributes: frozenset, written: frozenset, depth: int) -> None:
        try:
            value = cell.cell_contents
        except ValueError:          # a cell not filled yet
            self.put(name, "empty cell")
            return
        self.put("closure", name)
        try:
            self._add_reached(value, name, attributes, written, depth)
        except Unhashable as err:
            raise Unhashable(f"its closure's {name} cannot be read ({err})") from None

    def _add_reached(self, value, name: str, attributes: frozenset, written: frozenset, depth: int) -> None:
        """A value a function reaches by ``name`` (a global, a closure's cell, a default): a module
        of the user's by the attributes its code names (``attributes``: ``helpers.my_loss``), a
        container the code writes into (``name`` in ``written``: ``history.append(v)``) by its
        type only, anything else as ``add``."""
        if isinstance(value, types.ModuleType) and not _library(value.__name__):
            self._add_module(value, attributes, written, depth)
        elif isinstance(value, _MUTABLE) and name in written and not (
                isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            self.put("written", type(value).__module__, type(value).__qualname__)
        else:
            self.add(value, depth)

    def _add_module(self, module: types.ModuleType, attributes: frozenset, written: frozenset, depth: int) -> None:
        """A module of the user's: its name and those of its attributes ``attributes`` names (the
        ones the code reaching it can read), each as a value reached by that name (``written``:
        as in ``_add_reached``)."""
        key = id(module)
        self.put("user module", module.__name__)
        if key in self.open:
            self.put("cycle")
            return
        self.open.add(key)
        try:
            found = vars(module)
            for name in sorted(attributes):
                try:
                    self._slot(name, lambda name=name: self._add_attribute(found, name, attributes, written,
                                                                            depth + 1))
                except Unhashable as err:
                    message = str(err)
                    raise Unhashable(message if message.startswith("it reads") else
                                     f"it reads {module.__name__}.{name} ({message})") from None
        finally:
            self.open.discard(key)

    def _add_attribute(self, found: dict, name: str, attributes: frozenset, written: frozenset, depth: int) -> None:
        if name in found:       # (none: nothing hashed)
            self.put("attribute", name)
            self._add_reached(found[name], name, attributes, written, depth)

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
            self._slot(f"class:{name}", lambda value=value: self.add(value, depth + 1))

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
        if isinstance(obj, nn.Module) and cls.__name__ == "OptimizedModule" and _library(cls.__module__) \
                and isinstance(obj.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module):
            self.put("torch.compile")      # torch.compile(module): the module it compiles (its options unread)
            self.add(obj._orig_mod, depth)
            return
        self.put("instance")
        self._add_class(cls, depth + 1)
        try:
            state = vars(obj)
        except TypeError:
            raise Unhashable(f"it is a {cls.__name__}, whose state cannot be read") from None
        if isinstance(obj, nn.Module):
            state = _module_state(state)
            if cls.__module__ == "torch.nn.modules.loss" and "training" in state:
                state["training"] = True     # no torch.nn loss reads it: .eval() is the same loss (and digest)
        state = dict(state)
        self.states.add(id(state))
        try:       # a module's submodules (a teacher model a loss holds) nest as deep as they are built
            self.add(state, depth if isinstance(obj, nn.Module) else depth + 1)
        except Unhashable as err:
            raise Unhashable(f"the state of its {cls.__name__} cannot be read ({err})") from None
        finally:
            self.states.discard(id(state))


# An nn.Module's own fields that hold what it computes with; its other underscored fields (hooks,
# flags) are hashed only when they hold something (an empty hook table changes nothing).
_MODULE_STATE = ("_parameters", "_buffers", "_modules")


def _module_state(state: dict) -> dict:
    """What of an ``nn.Module``'s ``vars()`` is hashed: its public fields, its parameters, buffers
    and submodules, its other underscored fields when they hold something (``self._w = tensor``;
    an empty hook table changes nothing), and its hook tables as their functions in the order
    they run with their flags, not keyed by the handles' ids (which count every hook made in the
    process: the same loss would get another digest after any other hook was registered)."""
    kept = {}
    for name, value in state.items():
        if name in _HOOK_FLAGS:
            continue
        if name.startswith("_") and name not in _MODULE_STATE and (
                value is None or value is False or isinstance(value, (dict, list, tuple, set, frozenset, str))
                and len(value) == 0):
            continue
        if name in _HOOK_TABLES:
            if not isinstance(value, dict):
                kept[name] = value
                continue
            flags = [(flag, state.get(flag)) for flag, table in _HOOK_FLAGS.items() if table == name]
            kept[name] = [(hook, *[isinstance(held, dict) and key in held for _, held in flags])
                          for key, hook in value.items()]
            continue
        kept[name] = value
    return kept


# nn.Module's hook tables ({handle id: hook}) and the tables of flags keyed by the same ids
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")
_HOOK_FLAGS = {"_forward_hooks_with_kwargs": "_forward_hooks", "_forward_hooks_always_called": "_forward_hooks",
               "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks"}


@functools.lru_cache(maxsize=1024)
def _reads(code: types.CodeType) -> tuple[frozenset, frozenset, frozenset, frozenset]:
    """What ``code`` (and the code objects nested in it) reads: the global names it loads, every
    name it can reach an attribute by (``co_names``), the names whose container it writes
    into (a load followed by a writing method: ``history.append``, ``helpers.history.append``)
    and the modules it imports, as ``(name, level)`` (``import a.b``: ``("a.b", 0)``; ``from .
    import x`` in a package: ``("", 1)``)."""
    loads, attributes, written, imports = set(), set(code.co_names), set(), set()
    previous, recent = None, []
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            loads.add(instruction.argval)
        if instruction.opname in ("LOAD_METHOD", "LOAD_ATTR") and instruction.argval in _WRITES \
                and previous is not None and previous.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF",
                                                                 "LOAD_FAST", "LOAD_CLASSDEREF", "LOAD_ATTR"):
            written.add(previous.argval)
        if instruction.opname == "IMPORT_NAME":     # LOAD_CONST level; LOAD_CONST fromlist; IMPORT_NAME
            level = recent[0].argval if len(recent) == 2 and recent[0].opname in ("LOAD_CONST", "LOAD_SMALL_INT") \
                and isinstance(recent[0].argval, int) else 0
            imports.add((instruction.argval, level))
        recent = (recent + [instruction])[-2:]
        previous = instruction
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = _reads(const)
            loads |= inner[0]
            attributes |= inner[1]
            written |= inner[2]
            imports |= inner[3]
    return frozenset(loads), frozenset(attributes), frozenset(written), frozenset(imports)


def _imported(fn: types.FunctionType, imports: frozenset) -> set[str]:
    """The absolute names of the modules ``imports`` (``_reads``) names, in the package of ``fn``
    for a relative import (``from . import x``: the package; ``from .losses import f``: its
    ``losses``); a relative one that cannot be resolved is left out. ``import a.b.c`` binds ``a``
    and reaches ``a.b.c`` through it: each of ``a``, ``a.b``, ``a.b.c`` is named."""
    package = fn.__globals__.get("__package__") or fn.__globals__.get("__name__", "").rpartition(".")[0]
    return _imported_from(imports, package)


def _imported_from(imports, package: str) -> set[str]:
    """``_imported`` for the code of a module (or function) in ``package``."""
    import importlib.util
    names = set()
    for name, level in imports:
        if level:
            try:
                name = importlib.util.resolve_name("." * level + name, package)
            except (ImportError, ValueError):
                continue
        parts = name.split(".")
        names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names


def _find_spec(name: str):
    """The spec an import of ``name`` would load, found without executing any module (for a
    submodule whose package is not loaded, in the package's directories: ``importlib``'s own
    ``find_spec`` would import the package); None when not found."""
    import importlib.machinery
    import importlib.util
    try:
        parent, _, last = name.rpartition(".")
        if not parent or parent in sys.modules:
            return importlib.util.find_spec(name)
        outer = _find_spec(parent)
        places = list(outer.submodule_search_locations or ()) if outer is not None else []
        return importlib.machinery.PathFinder.find_spec(last, places) if places else None
    except (ImportError, ValueError, AttributeError, TypeError):
        return None


def _user_import(name: str):
    """How a module ``name`` a function imports in its body is hashed, never importing it: None
    for a library's module or one not found; its source file's path for a module of the user's
    with one (loaded or not); the module itself for a loaded module of the user's without one."""
    module = sys.modules.get(name)
    if module is not None:
        if _library(module.__name__):
            return None
        path = getattr(module, "__file__", None)
        return path if isinstance(path, str) and os.path.isfile(path) else module
    spec = _find_spec(name)
    if spec is None:
        return None
    where = [spec.origin] if isinstance(spec.origin, str) and spec.has_location else \
        [p for p in spec.submodule_search_locations or () if isinstance(p, str)]
    if not where or all(_library_file(p) for p in where):
        return None
    return spec.origin if isinstance(spec.origin, str) and spec.has_location and os.path.isfile(spec.origin) \
        else None
