"""Third-party warnings we expect are caught where they arise and said once in our words (or
not at all), and our own warnings print as one CLI line (issue 10)."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from prunekit.commands import info as info_command
from prunekit.cli import main
from prunekit.errors import PrunekitWarning
from prunekit.fisher import collect_gradients
from prunekit.params import ParamSpace
from prunekit.structured.groups import find_groups

TORCH_NOTICE = ("There is a performance drop because we have not yet implemented the batching rule for "
                "aten::{}. Please file us an issue on GitHub so that we can prioritize its implementation.")


class NoticeNet(nn.Module):
    """Emits torch.func's fallback notice from forward, as an op without a batched rule does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        warnings.warn(TORCH_NOTICE.format("fake_op"), UserWarning)
        warnings.warn(TORCH_NOTICE.format("fake_op_backward"), UserWarning)
        return self.fc(x)


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x.view(x.shape[0], 1, 2, 4))         # (batch, heads, tokens, features)
        h = nn.functional.scaled_dot_product_attention(h, h, h)
        return self.out(h.mean((1, 2)))


def _data(features, n=12):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, features, generator=gen), torch.randint(0, 3, (n,), generator=gen))]


def _collect(model, features):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = collect_gradients(model, ParamSpace(model), _data(features), n=12, chunk=4, progress=False)
    return rows, caught


def test_vmap_fallback_notice_becomes_one_warning_in_our_words():
    rows, caught = _collect(NoticeNet(), 6)
    assert rows.shape == (12, 18)
    assert [w.category for w in caught] == [PrunekitWarning]           # one, ours; torch's kept in
    assert "aten::fake_op " in str(caught[0].message) and "fisher_batch" in str(caught[0].message)


def test_other_warnings_still_pass_through():
    class Other(NoticeNet):
        def forward(self, x):
            warnings.warn("something else", RuntimeWarning)
            return self.fc(x)

    _, caught = _collect(Other(), 6)
    assert {w.category for w in caught} == {RuntimeWarning} and "something else" in str(caught[0].message)


def test_real_attention_model_shows_no_torch_notice():
    model = AttentionNet()
    x, y = _data(8)[0]
    with warnings.catch_warnings(record=True) as raw:          # does this torch lack the rule?
        warnings.simplefilter("always")
        vmap(grad(lambda w, xi, yi: nn.functional.cross_entropy(
            torch.func.functional_call(model, w, (xi[None],)), yi[None])), in_dims=(None, 0, 0))(
            dict(model.named_parameters()), x[:2], y[:2])
    if not any("performance drop" in str(w.message) for w in raw):
        pytest.skip("this torch has a batched rule for attention: nothing to catch")
    _, caught = _collect(model, 8)
    assert not any("performance drop" in str(w.message) for w in caught)      # torch's notice never leaks
    assert all(w.category is PrunekitWarning and "scaled_dot_product" in str(w.message) for w in caught)


def test_cli_prints_our_warning_on_one_line(capsys, monkeypatch):
    def warns(args):
        warnings.warn(PrunekitWarning("a note for the user"))
        return 0

    monkeypatch.setattr(info_command, "cmd_info", warns)
    assert main(["info", "mlpnet"]) == 0
    assert capsys.readouterr().err == "prunekit: warning: a note for the user\n"


class BareParameterNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) * self.scale)))


def test_bare_parameter_group_is_left_dense_without_torch_pruning_notice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = find_groups(BareParameterNet(), torch.randn(1, 4))
    assert not caught
    assert [g.root for g in groups] == ["b"]                    # a's channels meet `scale`: kept
    assert ("a", "touches parameter scale outside a Conv/Linear/BatchNorm layer") in groups.skipped


MNIST_ASSETS = str(__import__("pathlib").Path(__import__("prunekit").__file__).parent / "assets" / "mnist")


def test_a_limit_above_the_data_set_warns_with_the_count_used():
    from prunekit.data import load_dataset
    with pytest.warns(PrunekitWarning, match=r"holds 2000 .*using all 2000") as caught:
        ds = load_dataset("mnist", MNIST_ASSETS, "train", limit=5000, seed=0)
    assert len(ds) == 2000 and len(caught) == 1


def test_train_samples_above_the_data_set_is_said_and_recorded(tmp_path, capsys):
    ckpt = str(__import__("pathlib").Path(MNIST_ASSETS).parent / "mlpnet.safetensors")
    argv = ["prune", "--model", "mlpnet", "--checkpoint", ckpt, "--data", "mnist", "--data-dir", MNIST_ASSETS,
            "--sparsity", "0.5", "--train-samples", "5000", "--out", str(tmp_path / "run"), "--json"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("prunekit: warning:")]
    assert len(warned) == 1 and "2000" in warned[0] and "5000" in warned[0], err
    assert "train-samples = 2000" in (tmp_path / "run" / "config.toml").read_text()
    assert main(argv) == 0          # the same command again carries the run on, not "holds another run"


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.5"], ["eval"]])
def test_a_zoo_model_without_checkpoint_is_said_to_have_random_weights(capsys, command):
    """Forgetting --checkpoint must not silently prune or score a random network; with one, no word."""
    ckpt = str(__import__("pathlib").Path(MNIST_ASSETS).parent / "mlpnet.safetensors")
    data = ["--data", "mnist", "--data-dir", MNIST_ASSETS, "--json"]
    assert main([command[0], "--model", "mlpnet", *data, *command[1:]]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: warning:")]
    assert len(warned) == 1 and "no --checkpoint: mlpnet has random weights" in warned[0]
    assert main([command[0], "--model", "mlpnet", "--checkpoint", ckpt, *data, *command[1:]]) == 0
    assert "random weights" not in capsys.readouterr().err


def test_every_warning_of_ours_is_a_prunekit_warning():
    # a plain warnings.warn("...") prints as Python's two lines with our source path, not as the CLI's
    # one "prunekit: warning: ..." line (three did, found by a user's walk-through in session 43)
    import ast
    from pathlib import Path
    import prunekit
    trees = [(path, ast.parse(path.read_text())) for path in Path(prunekit.__file__).parent.rglob("*.py")]
    # a function of ours annotated to return a PrunekitWarning makes one (worded_warning, say)
    makers = {"PrunekitWarning"} | {node.name for _, tree in trees for node in ast.walk(tree)
                                    if isinstance(node, ast.FunctionDef) and isinstance(node.returns, ast.Name)
                                    and node.returns.id == "PrunekitWarning"}
    plain, ours = [], 0
    for path, tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr == "warn" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings":
                if path.name != "errors.py":   # errors.warn alone: where the user sees it, rank 0 alone
                    plain.append(f"{path.name}:{node.lineno} (warnings.warn: use errors.warn)")
            elif isinstance(node.func, ast.Name) and node.func.id == "warn_ours":
                ours += 1
                first = node.args[0] if node.args else None
                if not (isinstance(first, ast.Call) and getattr(first.func, "id", None) in makers):
                    plain.append(f"{path.name}:{node.lineno}")
    assert plain == [] and ours > 20


def _subprocess_env(**changes) -> dict:
    import os
    from pathlib import Path

    import prunekit
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(prunekit.__file__).parent.parent), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(changes)
    return env


def test_an_unwritable_home_gives_no_matplotlib_notice(tmp_path):
    """HOME that cannot be written (a path under a regular file: not even root can) leaves
    matplotlib without its config folder; the report's plots are still drawn, and matplotlib's two
    lines about it ("mkdir -p failed", "created a temporary cache directory") do not reach stderr."""
    import subprocess
    import sys
    from pathlib import Path

    import prunekit
    pytest.importorskip("matplotlib")
    (tmp_path / "afile").write_text("")
    assets = Path(prunekit.__file__).parent / "assets"
    done = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--model", "mlpnet", "--checkpoint",
                           str(assets / "mlpnet.safetensors"), "--data", "mnist", "--data-dir", str(assets / "mnist"),
                           "--train-samples", "64", "--sparsity", "0.5", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300,
                          env=_subprocess_env(HOME=str(tmp_path / "afile" / "home")))
    assert done.returncode == 0, done.stderr
    assert "matplotlib" not in done.stderr.lower() and "mkdir" not in done.stderr, done.stderr
    assert list((tmp_path / "run" / "plots").glob("*.png"))


@pytest.mark.parametrize("value", ["0", "abc", "-3", ""])
def test_a_bad_omp_num_threads_is_refused_before_torch_loads(value):
    """libgomp answers OMP_NUM_THREADS it cannot use with a blank line and a notice of its own as
    torch loads; the command line refuses the value in one line first (exit 2), under
    ``python -m prunekit`` and the ``prunekit`` script alike. A library import is left alone."""
    import subprocess
    import sys

    env = _subprocess_env(OMP_NUM_THREADS=value)
    script = "import sys; sys.argv[0] = '/usr/local/bin/prunekit'; from prunekit.cli import main; sys.exit(main())"
    for argv in ([sys.executable, "-m", "prunekit", "info", "mlpnet"], [sys.executable, "-c", script, "info", "mlpnet"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (f"prunekit: error: OMP_NUM_THREADS must be a whole number of threads >= 1, "
                               f"got {value!r}: unset it or set e.g. 1\n")
        assert done.stdout == ""


def test_omp_num_threads_that_libgomp_takes_passes():
    from prunekit.threads_env import omp_threads_problem
    assert [omp_threads_problem(v) for v in (None, "1", " 2", "4,2", "16")] == [None] * 5
    assert all(omp_threads_problem(v) for v in ("0", "-1", "1.5", "abc", "", "2,0"))


UNUSED_NET = """import torch
from torch import nn


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 32), nn.Linear(32, 10)
        self.spare = nn.Linear(32, 32)          # never called: the plan warns of it

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def unused():
    return Unused()
"""


def test_a_refusal_after_the_plan_comes_without_the_plans_warnings(tmp_path, capsys):
    """More gradient rows than training samples, refused once the plan is made: the plan's warning
    (a layer the trace never ran) was printed first, two lines for one refusal."""
    (tmp_path / "net.py").write_text(UNUSED_NET)
    argv = ["prune", "--model", f"{tmp_path}/net.py:unused", "--normalize", "0.1307/0.3081", "--data", "mnist",
            "--data-dir", MNIST_ASSETS, "--method", "chita", "--sparsity", "0.5", "--train-samples", "100",
            "--fisher-samples", "500", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prunekit: error: the training data holds 100 samples"), err
    assert not (tmp_path / "run").exists()
    import prunekit
    torch.manual_seed(0)
    data = (torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    ns = {}
    exec(UNUSED_NET, ns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(prunekit.PrunekitError, match="holds 100 samples"):
            prunekit.prune(ns["unused"](), data, method="chita", sparsity=0.5, fisher_samples=500)
    assert not [w for w in caught if issubclass(w.category, PrunekitWarning)], [str(w.message) for w in caught]


def test_our_warning_points_at_the_users_call_not_at_prunekits_line():
    """The BatchNorm "not re-estimated" warning of ``prunekit.prune(...)`` was located at
    prunekit/pipelines/weights.py:196 (Python prints that file and line): it is the user's call."""
    import inspect
    import warnings

    import torch
    import prunekit
    from prunekit.errors import PrunekitWarning
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        prunekit.prune(net, None, method="magnitude", sparsity=0.5, example_input=torch.randn(2, 1, 8, 8))
    ours = [w for w in caught if issubclass(w.category, PrunekitWarning)]
    assert any("BatchNorm statistics were not re-estimated" in str(w.message) for w in ours), \
        [str(w.message) for w in caught]
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line)] * len(ours)
