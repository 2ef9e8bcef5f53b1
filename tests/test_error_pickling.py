"""Every exception and warning prunekit defines pickles back to the same type, message and
attributes: rank 0's refusal of a run folder is broadcast to the other ranks
(``collective.broadcast_object``), and ``EditedConfig`` (whose constructor takes more than the
message) crashed rank 1 with ``TypeError: EditedConfig.__init__() missing 2 required positional
arguments`` under torchrun while rank 0 printed the refusal."""

import importlib
import inspect
import pickle
import pkgutil
import typing

import pytest

import prunekit
from prunekit.errors import PrunekitError, PrunekitWarning


def _every_module() -> None:
    for info in pkgutil.walk_packages(prunekit.__path__, "prunekit."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:         # an optional dependency (matplotlib, onnx) not installed here
            pass


def _subclasses(root: type) -> list[type]:
    found, todo = [], [root]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__.startswith("prunekit")]


_SAMPLES = {str: "a message", int: 3, float: 0.5, bool: True, list: ["epochs"], tuple: ("lr",),
            dict: {"a": 1}}


def _sample(parameter: inspect.Parameter, hints: dict) -> object:
    hint = hints.get(parameter.name, str)
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        origin = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(origin) or origin
    if origin is tuple and parameter.name == "shape":
        return (2, 3)
    return _SAMPLES.get(origin, f"{parameter.name} value")


def _instance(cls: type) -> BaseException:
    """``cls`` called with a sample value for each of its constructor's required arguments."""
    init = cls.__init__
    if init in (Exception.__init__, BaseException.__init__, ValueError.__init__, UserWarning.__init__):
        return cls("a message naming the fix")
    hints = typing.get_type_hints(init)
    parameters = list(inspect.signature(init).parameters.values())[1:]
    args = [_sample(p, hints) for p in parameters
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cls(*args)


def _ours() -> list[type]:
    _every_module()
    return sorted({*_subclasses(PrunekitError), *_subclasses(PrunekitWarning)}, key=lambda c: c.__qualname__)


def test_the_walk_finds_the_errors_whose_constructor_takes_more_than_a_message():
    names = {cls.__name__ for cls in _ours()}
    assert {"PrunekitError", "OptionError", "EditedConfig", "TrainingDiverged", "AmbiguousBatchError",
            "MachineRefusal", "PrunekitWarning"} <= names, names


@pytest.mark.parametrize("cls", _ours(), ids=lambda cls: cls.__qualname__)
def test_every_prunekit_error_and_warning_pickles_to_the_same_type_message_and_attributes(cls):
    err = _instance(cls)
    err.cli_text = "the command line's words"          # errors.worded's attribute travels too
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err) and back.args == err.args
    assert vars(back) == vars(err)

