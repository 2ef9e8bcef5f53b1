"""The solver layer is math on tensors: every file of prunekit/solvers imports no torch.nn, no
model, nothing of prunekit but other solver files and errors."""

import ast
import pathlib

import pytest

import prunekit.solvers

SOLVER_FILES = sorted(pathlib.Path(prunekit.solvers.__file__).parent.glob("*.py"))
THIRD_PARTY = {"__future__", "math", "operator", "time", "dataclasses", "typing", "collections", "torch",
               "numpy", "scipy"}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file: level 0 absolute, 1 = solvers/, 2 = prunekit/."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_every_solver_file_is_checked():
    names = {path.name for path in SOLVER_FILES}
    assert {"backsolve.py", "chita.py", "iht.py", "swap_search.py", "falcon.py", "woodfisher.py",
            "ilp.py", "quadratic.py", "magnitude.py"} <= names


@pytest.mark.parametrize("path", SOLVER_FILES, ids=lambda path: path.name)
def test_solver_file_imports_only_math_solvers_and_errors(path):
    for level, module in _imports(path):
        if level == 0 and module.startswith("prunekit"):
            assert module == "prunekit.errors" or module.startswith("prunekit.solvers"), (path.name, module)
        elif level == 0:
            assert module.split(".")[0] in THIRD_PARTY and not module.startswith("torch.nn"), (path.name, module)
        elif level == 2:
            assert module == "errors", (path.name, module)
        else:
            assert level == 1 and (path.parent / f"{module}.py").exists(), (path.name, level, module)


@pytest.mark.parametrize("path", SOLVER_FILES, ids=lambda path: path.name)
def test_solver_file_never_touches_torch_nn(path):
    """Not through an import, nor as an attribute (torch.nn.Module)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "nn":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), path.name
