"""A model of your own on the command line: ``--model path/to/net.py:function``.

The file is imported as a module (its folder first on ``sys.path`` while it is imported and
while the function runs, so that it may import its neighbours) and ``function()`` is called
with no arguments; it must return the ``nn.Module`` to prune, its weights then loaded from
``--checkpoint`` as for a zoo model. This runs the file's code, as ``python net.py`` would: it
is the user's own file named on the command line, never a path read from a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path

from torch import nn

from .errors import PrunekitError

EXAMPLE = "path/to/net.py:build_model"


def is_model_file(name: str) -> bool:
    """Whether ``--model`` names a Python file (``net.py:function``) rather than a zoo model."""
    path = name.rpartition(":")[0] if ":" in name else name
    return path.endswith(".py")


def parse(name: str) -> tuple[Path, str]:
    """``net.py:function`` -> (path, function name); refuses a spec without a valid function."""
    path, sep, function = name.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise PrunekitError(f"--model {name} names a file but no function: write {name}:FUNCTION, the "
                            f"function that returns your nn.Module (e.g. {EXAMPLE})")
    if not function.isidentifier():
        raise PrunekitError(f"{function!r} after the colon of --model {name} is not a Python function name "
                            f"(e.g. {EXAMPLE})")
    return Path(path).expanduser(), function


def function_name(name: str) -> str:
    return parse(name)[1]


def resolved(name: str) -> str:
    """``name`` with its file's absolute path (a run folder's config works from any directory)."""
    path, function = parse(name)
    return f"{path.resolve()}:{function}"


def file_digest(name: str) -> str:
    """SHA-256 of the model file (recorded with a run, to tell later if the code changed)."""
    return hashlib.sha256(parse(name)[0].read_bytes()).hexdigest()


def check_file(name: str) -> tuple[Path, str]:
    """``parse(name)``, refusing a model file that does not exist (nothing is imported)."""
    path, function = parse(name)
    if not path.is_file():
        raise PrunekitError(f"model file {path} does not exist: pass the .py file that defines {function}()")
    return path, function


# Model files imported within ``importing_once`` (one command call): {(resolved path, size, mtime): module},
# so that a file checked before the data is read (``check_function``) is not run a second time to build
# its model; None outside that scope (each build imports the file afresh: a notebook sees its edits)
_IMPORTED: dict[tuple, object] | None = None


@contextlib.contextmanager
def importing_once():
    """The scope (one command call) in which a model file is imported once: ``check_function``
    imports it before the data is read and ``build_model`` takes that module (the same unchanged
    file) rather than running the file again. Dropped on the way out, however the call ends."""
    global _IMPORTED
    outer = _IMPORTED
    _IMPORTED = {} if outer is None else outer
    try:
        yield
    finally:
        _IMPORTED = outer


def _module(path: Path):
    """``_import(path)``, or the module imported already from the same unchanged file in this
    ``importing_once`` scope."""
    if _IMPORTED is None:
        return _import(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _IMPORTED:
        _IMPORTED[key] = _import(path)
    return _IMPORTED[key]


def _factory(path: Path, function: str, name: str):
    """The function ``function`` of model file ``path`` (imported: ``sys.path`` holds its folder),
    refusing a file that does not define it or whose function needs arguments."""
    module = _module(path)
    factory = getattr(module, function, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise PrunekitError(f"{path} defines no function {function!r}"
                            + (f"; it defines {', '.join(found)}" if found else ""))
    _check_takes_no_arguments(factory, name)
    return factory


def check_function(name: str) -> None:
    """Refuse a model file ``name`` (``net.py:function``) that does not exist, fails to import, does
    not define its function or whose function needs arguments, without calling the function: the
    file is imported (run, as ``build_model`` runs it), within ``importing_once`` once for the call."""
    path, function = check_file(name)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        _factory(path, function, name)
    finally:
        sys.path.remove(folder)


def build_model(name: str) -> nn.Module:
    """Import the file of ``name`` (``net.py:function``) and return ``function()``, in eval mode
    (within ``importing_once``, the module ``check_function`` imported is taken)."""
    path, function = check_file(name)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        factory = _factory(path, function, name)
        try:
            model = factory()
        except Exception as error:  # the user's code: one line that says where, not a traceback
            raise PrunekitError(f"{name}() failed: {_where(error, path)}") from error
        except SystemExit as error:     # sys.exit() in the user's code: say so, not exit with its code unexplained
            raise PrunekitError(f"{name}() exited (sys.exit({error.code!r}){_line(error, path)}) instead of "
                                "returning a model: remove the exit from the function") from None
    finally:
        sys.path.remove(folder)
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"{name}() returned a {type(model).__name__}, not a torch nn.Module: return the model")
    if next(model.parameters(), None) is None:
        raise PrunekitError(f"the model has no parameters: {name}() returned a {type(model).__name__} without "
                            "weights, nothing to prune, train or evaluate; return the network with its layers")
    return model.eval()


def _import(path: Path):
    module_name = f"prunekit_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PrunekitError(f"cannot import {path} as Python: pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module      # dataclasses and pickling look a class's module up here
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True   # no __pycache__ in the user's folder
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise PrunekitError(f"importing {path} failed: {_where(error, path)}") from error
    except SystemExit as error:      # a script's sys.exit() run on import
        del sys.modules[module_name]
        raise PrunekitError(f"importing {path} exited (sys.exit({error.code!r}){_line(error, path)}): a model file "
                            "must not exit when imported; put script code under `if __name__ == \"__main__\":`") from None
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


def _check_takes_no_arguments(factory, name: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):        # a builtin or C callable: let the call tell
        return
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise PrunekitError(f"{name} needs arguments ({', '.join(required)}); prunekit calls it with none: give "
                            "them defaults, or add a function that calls it with yours")


def _where(error: BaseException, path: Path) -> str:
    """``ValueError: message (net.py line 12)``: the innermost line of the user's file."""
    place = _line(error, path)
    return f"{type(error).__name__}: {error}{f' ({place[2:]})' if place else ''}"


def _line(error: BaseException, path: Path) -> str:
    """``, net.py line 12``: the innermost line of the user's file that ``error`` passed, or ""."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if Path(frame.filename).resolve() == path.resolve()]
    return f", {path.name} line {lines[-1]}" if lines else ""


SHAPE, CODE, EITHER, NO_FORWARD = "shape", "code", "either", "no forward"


def forward_fault(error: BaseException) -> str:
    """What a model's forward raising ``error`` on an example input points at, for the line that
    says so: ``NO_FORWARD`` where the model defines no forward (``nn.Module._forward_unimplemented``
    raised NotImplementedError), ``EITHER`` for an AssertionError (an ``assert x.shape[-1] == 32``
    on the input, or a forward that is wrong), ``SHAPE`` for what torch raises on an input of the
    wrong shape (RuntimeError, ValueError, IndexError), else ``CODE`` (a TypeError, an
    AttributeError: the model's code)."""
    if isinstance(error, NotImplementedError):
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and tb.tb_frame.f_code.co_name == "_forward_unimplemented":
            return NO_FORWARD
    if isinstance(error, AssertionError):
        return EITHER
    if isinstance(error, (RuntimeError, ValueError, IndexError)):
        return SHAPE
    return CODE


def no_forward_text(name: str, error: BaseException) -> str:
    """The line for model ``name`` whose class defines no forward (``forward_fault``: ``NO_FORWARD``)."""
    return (f"{name}: the model has no forward ({str(error).strip() or type(error).__name__}): define "
            "forward(self, x) in its class (a method of the class, indented inside it), or return a model that has one")


def error_line(error: BaseException, path: Path) -> str:
    """``net.py line 12``: the innermost line of the user's file ``path`` that ``error`` passed
    (its forward, say), or "" when it passed none."""
    return _line(error, path)[2:]
