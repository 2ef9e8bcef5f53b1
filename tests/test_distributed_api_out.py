"""``prunekit.prune(..., out=DIR)`` in a script under torchrun (2 gloo ranks) works as the CLI
does: rank 0 alone holds the run folder's lock and writes the folder (rank 1, watched by an audit
hook, writes nothing there), every rank computes and returns one process's result, and calling
again with the same ``out=`` after a kill resumes on both ranks. Before, each rank took the lock
and one of them was refused by the other's."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_api_out")

from distributed_spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "prunekit" / "assets"

# prune MLPNet into OUT, then (rank 0, as if killed after stage 1) cut the folder back and call
# again: each call's masks and accuracy go to RESULTS/rank<R>-<call>.pt; rank 1's writes under OUT
# are reported as "WROTE path" on stderr
_SCRIPT = """
import os, sys
import torch
OUT, RESULTS, ASSETS = (os.path.realpath(os.environ[k]) for k in ("OUT", "RESULTS", "ASSETS"))
RANK = int(os.environ.get("RANK", "0"))
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def under(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(OUT)
    except (TypeError, ValueError):
        return False
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        if under(path) and ((mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE):
            sys.__stderr__.write(f"WROTE {path}\\n")
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        if under(args[0]):
            sys.__stderr__.write(f"WROTE {event} {args[0]}\\n")
if RANK != 0:
    sys.addaudithook(hook)

import json
from pathlib import Path
import torch.distributed as dist
from safetensors.torch import load_file
import prunekit
from prunekit import zoo
from prunekit.data import Normalization, load_dataset, make_loader

torch.set_num_threads(1)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
norm = Normalization((0.1307,), (0.3081,))
train = load_dataset("mnist", Path(ASSETS) / "mnist", "train")
test = load_dataset("mnist", Path(ASSETS) / "mnist", "test")

def call(name):
    net = zoo.build("mlpnet")
    net.load_state_dict(load_file(Path(ASSETS) / "mlpnet.safetensors"))
    result = prunekit.prune(net, make_loader(train, norm, batch_size=500, shuffle=True),
                            eval_data=make_loader(test, norm, batch_size=2500), method="chita++", sparsity=0.9,
                            stages=2, fisher_samples=32, stage_eval=False, out=OUT)
    masks = {k: (v != 0) for k, v in result.model.state_dict().items()}
    torch.save({"masks": masks, "accuracy": result.accuracy, "sparsity": result.sparsity},
               os.path.join(RESULTS, f"rank{RANK}-{name}.pt"))

call("first")
if os.environ["RESUME"] == "0":
    sys.exit(0)
if dist.is_initialized():
    dist.barrier()
if RANK == 0:                          # as if killed after stage 1
    run = Path(OUT)
    (run / "checkpoints" / "stage-002.safetensors").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "status": "running", "stages": metrics["stages"][:1]}))
    for name in ("model.safetensors", "model.json", "result.json", "report.md"):
        (run / name).unlink()
if dist.is_initialized():
    dist.barrier()
call("resumed")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _run(script: Path, out: Path, results: Path, ranks: int) -> tuple[int, str]:
    """The script under torchrun with ``ranks`` processes (1: plain python, no resume): (exit code,
    stderr of the launcher and its ranks); every process is killed on a timeout."""
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg",
           "OUT": str(out), "RESULTS": str(results), "ASSETS": str(ASSETS), "PRUNEKIT_DIST_TIMEOUT": "60", "RESUME": str(int(ranks > 1))}
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())] if ranks > 1 else [sys.executable])
    process = subprocess.Popen([*command, str(script)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, err


def test_prune_out_under_two_ranks_writes_on_rank_0_alone_and_resumes(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    code, err = _run(script, tmp_path / "one", tmp_path / "results-one", 1)
    assert code == 0, err[-3000:]
    code, err = _run(script, tmp_path / "two", tmp_path / "results-two", 2)
    assert code == 0, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("WROTE")] == []       # rank 1 wrote nothing there
    single = torch.load(tmp_path / "results-one" / "rank0-first.pt", weights_only=True)
    for rank in (0, 1):
        for call in ("first", "resumed"):
            got = torch.load(tmp_path / "results-two" / f"rank{rank}-{call}.pt", weights_only=True)
            assert got["accuracy"] == pytest.approx(single["accuracy"], abs=0.02), (rank, call)
            assert got["sparsity"] == single["sparsity"], (rank, call)
            for name, mask in single["masks"].items():
                assert torch.equal(got["masks"][name], mask), (rank, call, name)
    run = tmp_path / "two"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "done" and len(metrics["stages"]) == 2
    assert (run / "report.md").exists() and (run / "model.safetensors").exists()
    assert "resume" in (run / "run.log").read_text()
    assert not (run / ".prunekit.lock").exists()


def _prune_into_another_run(rank, world, out):
    """prunekit.prune into ``out``, which holds another run: each rank's refusal message."""
    import prunekit
    from prunekit.errors import PrunekitError
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    data = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    try:
        prunekit.prune(net, data, method="magnitude", sparsity=0.5, recalibrate_bn=False, out=out)
    except PrunekitError as err:
        return str(err)
    return "not refused"


def test_a_folder_holding_another_run_is_refused_on_both_ranks_in_the_same_words(two_rank_cases):
    """Rank 0 claims the folder for the ranks and tells rank 1 its refusal (rank 1 reads nothing
    of the folder itself): both stop with the same words and the folder is left as it was."""
    folder, said = _case(two_rank_cases, "another_run")
    assert said[0] == said[1] and "holds another run" in said[0], said
    before = json.loads((folder / "another_run_files.json").read_text())
    assert len(before) > 3 and sorted(p.name for p in (folder / "another" / "run").iterdir()) == before


def _prune_into(rank, world, out):
    """prunekit.prune into ``out``: each rank's exception, as type and message."""
    import prunekit
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    try:
        prunekit.prune(net, (torch.randn(32, 8), torch.randint(0, 3, (32,))), method="magnitude", sparsity=0.5,
                       recalibrate_bn=False, out=out)
    except Exception as err:     # noqa: BLE001 - what each rank met
        return f"{type(err).__name__}: {err}"
    return "not refused"


def _claim_denied_on_rank_0(rank, world, out):
    """claim_on_rank_0 where rank 0's write of config.toml is denied: each rank's exception."""
    from prunekit import run_claims, runs

    def denied(folder, *_, **__):
        raise PermissionError(13, "Permission denied", str(folder.config))
    real = run_claims.claim      # the claim claim_on_rank_0 calls
    if rank == 0:
        run_claims.claim = denied
    try:
        runs.claim_on_rank_0(out, "method = 'magnitude'\n")
    except Exception as err:     # noqa: BLE001 - what each rank met
        return f"{type(err).__name__}: {err}"
    finally:
        run_claims.claim = real
    return "not refused"


def test_an_out_rank_0_cannot_write_is_refused_on_both_ranks_in_the_same_words(two_rank_cases):
    """out= under a regular file (the lock's folder cannot be made; so for root too), and a
    config.toml rank 0 may not write (its claim): every rank gets one PrunekitError naming the path.
    Before, rank 0 alone met the OSError and rank 1 waited in the collective until rank 0 was gone."""
    folder, said = _case(two_rank_cases, "not_a_directory")
    out = folder / "file" / "run"
    # (since s56 refused before any work by the out= check the CLI shares, in its words)
    assert said[0] == said[1] and said[0].startswith("PrunekitError: out=") and str(out) in said[0], said
    assert "is a file, not a folder: pass an out= whose parent is a folder" in said[0], said
    _, said = _case(two_rank_cases, "claim_denied")
    assert said[0] == said[1] and "Permission denied" in said[0] and "config.toml" in said[0], said
    assert "PrunekitError" in said[0] and "check the path and its permissions" in said[0], said


def _prune_apart(rank, world, what):
    """prunekit.prune where each rank has its own model weights or its own part of the data (a
    script's usual DistributedSampler habit): each rank's exception, as type and message."""
    import prunekit
    torch.manual_seed(rank if what == "weights" else 0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    if what == "data":
        x, y = x[rank::world], y[rank::world]
    data = (x, y)
    if what == "samples":     # the same first batches; rank 1 has 8 images more at the end
        extra = torch.randn(8 * rank, 8), torch.randint(0, 3, (8 * rank,))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x, extra[0]]),
                                                                          torch.cat([y, extra[1]])), batch_size=16)
    sparsity = 0.5 + 0.1 * rank if what == "options" else 0.5
    fisher_samples = 16 + 16 * rank if what == "options" else 16
    try:
        prunekit.prune(net, data, method="chita", sparsity=sparsity, fisher_samples=fisher_samples,
                       recalibrate_bn=False)
    except Exception as err:     # noqa: BLE001 - what each rank met
        return f"{type(err).__name__}: {err}"
    return "not refused"


@pytest.mark.parametrize("what", ["weights", "data"])
def test_ranks_of_a_script_with_other_weights_or_data_are_refused(two_rank_cases, what):
    """Each rank went on with its own start and returned its own pruned model (the CLI refused it)."""
    _, said = _case(two_rank_cases, what)
    assert said[0] == said[1] and f"rank 1 has other {'model weights' if what == 'weights' else 'data'}" in said[0]
    if what == "weights":    # each message says what to change for what differs, not the other's fix
        assert "the same seed, or load the same checkpoint" in said[0] and "DistributedSampler" not in said[0], said
    else:
        assert "DistributedSampler" in said[0] and "the same files on every machine" in said[0], said
        assert "seed" not in said[0] and "model weights" not in said[0], said


def test_ranks_of_a_script_given_other_options_are_refused(two_rank_cases):
    """Rank 0 with sparsity 0.5 and rank 1 with 0.6: they waited on each other's collectives until the
    timeout (a script's own process group: without end)."""
    _, said = _case(two_rank_cases, "options")
    assert said[0] == said[1] and said[0].startswith("OptionError: rank 1 was given other options than rank 0 "
                                                     "(fisher_samples 32 against 16, sparsity 0.6 against 0.5): "
                                                     "every rank must run the same call"), said


def test_ranks_of_a_script_whose_data_run_longer_on_one_rank_are_refused(two_rank_cases):
    """Rank 1's data set had 8 images more at the end, its first batch rank 0's: only the first
    batches were compared, and rank 1 waited for ever on its extra batch's collectives."""
    _, said = _case(two_rank_cases, "samples")
    assert said[0] == said[1] and said[0].startswith(
        "PrunekitError: rank 1 has other data than rank 0 (72 samples a pass against 64): "
        "every rank must pass the same data, whole"), said


def _prune_with_rank_memory(rank, world):
    """falcon whose "auto" n comes out larger on rank 0 than on rank 1 (free memory differs per
    machine): each rank's number of gradient rows, or its exception."""
    from dataclasses import replace
    import prunekit
    import prunekit.pipelines.fisher_methods as fisher_methods
    real = fisher_methods.plan_memory

    def per_rank(family):
        check = real(family)

        def smaller_on_rank_1(*args, **kwargs):
            plan = check(*args, **kwargs)
            return replace(plan, n=plan.n - 8 * rank)
        return smaller_on_rank_1
    fisher_methods.plan_memory = per_rank
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    try:
        result = prunekit.prune(net, (x, y), method="falcon", flops=0.5, fisher_samples=32, recalibrate_bn=False)
    except Exception as err:     # noqa: BLE001 - what each rank met
        return f"{type(err).__name__}: {err}"
    finally:
        fisher_methods.plan_memory = real
    return result.record["fisher_samples"]


def test_ranks_whose_memory_allows_other_row_counts_take_the_least(two_rank_cases):
    """--fisher-samples auto under a tight --max-memory: each rank chose its own n, and gloo aborted
    on the first exchange of rows ('Received data size doesn't match expected size')."""
    assert _case(two_rank_cases, "rank_memory")[1] == [24, 24]


def test_a_finished_run_with_an_edited_config_is_refused_on_both_ranks_as_edited_config(two_rank_cases):
    """prunekit.prune(out=) over a finished run whose config.toml was edited by hand: rank 0's
    ``EditedConfig`` is broadcast and raised on every rank (the README: the PrunekitError on every
    rank). Before, rank 1 crashed unpickling it (``TypeError: EditedConfig.__init__() missing 2
    required positional arguments``) while rank 0 raised the refusal."""
    folder, said = _case(two_rank_cases, "edited_config")
    assert "sparsity = 0.4\n" in (folder / "edited" / "run" / "config.toml").read_text()   # edited in _prepare
    assert said[0] == said[1], said
    assert said[0].startswith("EditedConfig: ") and "config.toml was changed (sparsity)" in said[0], said


def _prune_with_bn_and_no_data(rank, world):
    """prunekit.prune of a BatchNorm net without data (its "not re-estimated" warning), then the
    caller's own warning: each rank's warnings, as (category name, message start)."""
    import warnings
    import prunekit
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prunekit.prune(net, None, method="magnitude", sparsity=0.5, example_input=torch.randn(2, 1, 8, 8))
        warnings.warn("the script's own", UserWarning)
    return [(w.category.__name__, str(w.message)[:40]) for w in caught]


def test_prunekits_warnings_in_a_script_under_two_ranks_are_rank_0s_alone(two_rank_cases):
    """The README: warnings are rank 0's. The CLI printed ours on rank 0 alone, but
    ``prunekit.prune`` in a script under torchrun warned once per rank. The caller's own warnings are
    left alone on every rank."""
    _, said = _case(two_rank_cases, "bn_and_no_data")
    own = ("UserWarning", "the script's own")
    assert said[1] == [own], said
    assert said[0][-1] == own and [c for c, _ in said[0][:-1]] == ["PrunekitWarning"], said
    assert said[0][0][1].startswith("the model's BatchNorm statistics"), said


class _Unfingerprinted(torch.utils.data.Dataset):
    """A Dataset prunekit cannot fingerprint (not tensors, not its own): a run over it records its
    form and sample count only, so calling it again warns that its contents could not be checked."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _prune_over_a_dataloader(rank, world, out, as_error):
    """prunekit.prune over a plain torch DataLoader into ``out`` (``as_error``: prunekit's warnings
    made errors, as ``python -W error`` does): what each rank raised, as type and message."""
    import warnings
    import prunekit
    from prunekit.errors import PrunekitWarning
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error" if as_error else "ignore", PrunekitWarning)
        try:
            prunekit.prune(net, torch.utils.data.DataLoader(_Unfingerprinted(), batch_size=16), method="magnitude",
                           sparsity=0.5, recalibrate_bn=False, out=out)
        except Exception as err:     # noqa: BLE001 - what each rank met
            return f"{type(err).__name__}: {err}"
    return "not raised"


def test_a_finished_run_over_a_dataloader_called_again_under_w_error_raises_on_every_rank(two_rank_cases):
    """``python -W error`` script under torchrun, calling prunekit.prune(out=) again on a finished run
    over a plain DataLoader: rank 0 raised the "could not be checked" PrunekitWarning, but rank 1
    never issued it (``api._say_unchecked`` returned early off rank 0), went on to the next
    collective and waited for rank 0 until the group's timeout (a raw gloo error). Every rank now
    raises the same warning at the same point."""
    assert _case(two_rank_cases, "dataloader_first")[1] == ["not raised"] * 2
    _, said = _case(two_rank_cases, "dataloader_again")
    assert said[0] == said[1], said
    assert said[0].startswith("PrunekitWarning: ") and "its stored result is given back" in said[0] \
        and "could not be checked" in said[0], said


def _claim_warning_as_error(rank, world, out):
    """claim_on_rank_0 where rank 0's claim warns (as over an older prunekit's folder: "... it is
    carried on without checking ...") under an "error" filter: each rank's exception."""
    import warnings
    from prunekit import run_claims, runs
    from prunekit.errors import PrunekitWarning

    def older(folder, *_, **__):
        run_claims.warn_ours(PrunekitWarning(f"{folder.path} was written by an older prunekit: it is carried on"))
    real = run_claims.claim      # the claim claim_on_rank_0 calls
    if rank == 0:
        run_claims.claim = older
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        try:
            runs.claim_on_rank_0(out, "method = 'magnitude'\n")
        except Exception as err:     # noqa: BLE001 - what each rank met
            return f"{type(err).__name__}: {err}"
        finally:
            run_claims.claim = real
    return "not raised"


def test_a_claim_warning_made_an_error_is_raised_on_every_rank(two_rank_cases):
    """Rank 0's warning in ``runs.claim`` (an older folder, carried on or given back) under ``-W error``
    left claim_on_rank_0 on rank 0 before its broadcast: rank 1 waited in it until the group's timeout."""
    _, said = _case(two_rank_cases, "claim_warning")
    assert said[0] == said[1], said
    assert said[0].startswith("PrunekitWarning: ") and "it is carried on" in said[0], said


def _prepare(folder: Path) -> None:
    """The folders the two-rank cases below start from, made by this (one) process: a finished run
    (another/run: its file names in another_run_files.json), a regular file to put out= under, a
    finished run whose config.toml was edited (sparsity 0.5 to 0.4), empty folders."""
    import prunekit
    for sparsity, out in ((0.3, folder / "another" / "run"), (0.5, folder / "edited" / "run")):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        prunekit.prune(net, (torch.randn(32, 8), torch.randint(0, 3, (32,))), method="magnitude",
                       sparsity=sparsity, recalibrate_bn=False, out=str(out))
    (folder / "another_run_files.json").write_text(json.dumps(sorted(p.name for p in (folder / "another" / "run").iterdir())))
    config = (folder / "edited" / "run" / "config.toml").read_text()
    assert "sparsity = 0.5\n" in config
    (folder / "edited" / "run" / "config.toml").write_text(config.replace("sparsity = 0.5\n", "sparsity = 0.4\n"))
    (folder / "file").write_text("")
    for name in ("denied", "loader", "older/run"):
        (folder / name).mkdir(parents=True)


def _every_case(rank, world, folder):
    """Every two-rank case of this module's ``run_ranks`` tests, one after the other in one spawn of
    the ranks (a spawn, each rank importing torch and prunekit, costs more than these tiny prunes):
    {case: this rank's result}. Each case is one call that every rank ends alike (a refusal, a
    warning raised or a result), and patches it makes are undone after it; a barrier between cases
    would hang (and the fixture fail) if a case left the ranks' collectives unpaired."""
    import torch.distributed as dist
    folder = Path(folder)
    cases = {
        "another_run": lambda: _prune_into_another_run(rank, world, str(folder / "another" / "run")),
        "not_a_directory": lambda: _prune_into(rank, world, str(folder / "file" / "run")),
        "claim_denied": lambda: _claim_denied_on_rank_0(rank, world, str(folder / "denied" / "run")),
        **{what: (lambda what=what: _prune_apart(rank, world, what))
           for what in ("weights", "data", "options", "samples")},
        "rank_memory": lambda: _prune_with_rank_memory(rank, world),
        "edited_config": lambda: _prune_into(rank, world, str(folder / "edited" / "run")),
        "bn_and_no_data": lambda: _prune_with_bn_and_no_data(rank, world),
        "dataloader_first": lambda: _prune_over_a_dataloader(rank, world, str(folder / "loader" / "run"), False),
        "dataloader_again": lambda: _prune_over_a_dataloader(rank, world, str(folder / "loader" / "run"), True),
        "claim_warning": lambda: _claim_warning_as_error(rank, world, str(folder / "older" / "run")),
    }
    said = {}
    for name, case in cases.items():
        said[name] = case()
        dist.barrier()
    return said


@pytest.fixture(scope="module")
def two_rank_cases(tmp_path_factory):
    """(the cases' folder, each rank's {case: result}) of ``_every_case``, run once for the module
    (and both xdist workers)."""
    from distributed_spawn import run_ranks_in_folder_once
    return run_ranks_in_folder_once("distributed_api_out", _prepare, _every_case, 2, tmp_path_factory, timeout=300)


def _case(two_rank_cases, name: str) -> tuple[Path, list]:
    """(the cases' folder, [rank 0's result of case ``name``, rank 1's])."""
    folder, ranks = two_rank_cases
    return folder, [said[name] for said in ranks]
