"""prunekit as 2 ranks (the environment torchrun gives), rank 1 watched by an audit hook that
reports every file it opens for writing, creates, renames or removes under the watched folder:
``prunekit sweep``, ``export`` and ``compare --out`` write on rank 0 alone and rank 1 prints
nothing; woodfisher is refused before a run folder is written; rank 0 shows one gradient bar per
stage; the hybrid's FALCON phase reads one process's rows; a refusal every rank meets is printed
once, one rank's own refusal by that rank; a locked run folder refuses every rank."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_rank_writes")

from cli_in_ranks import cli as _cli, watch_writes
from distributed_spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "prunekit" / "assets"
DATA = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
        "--data-dir", str(ASSETS / "mnist"), "--train-samples", "128", "--batch-size", "2000"]

# `python -m prunekit ARGS` that prints "WROTE path" on stderr for each write under WATCHED
_WATCHED = """
import os, sys
watched = os.path.realpath(os.environ["WATCHED"])
def under(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(watched)
    except (TypeError, ValueError):
        return False
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        if under(path) and ((mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE):
            sys.__stderr__.write(f"WROTE {path}\\n")
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        if under(args[0]):
            sys.__stderr__.write(f"WROTE {event} {args[0]}\\n")
sys.addaudithook(hook)
if "REFUSAL_WAIT_S" in os.environ:
    import prunekit.distributed.collective
    prunekit.distributed.collective.REFUSAL_WAIT_S = float(os.environ["REFUSAL_WAIT_S"])
if os.environ.get("REFUSE_ALONE") == os.environ["RANK"]:      # a refusal this rank meets alone after loading
    import prunekit.commands.prune
    from prunekit.errors import PrunekitError
    def refused(*args, **kwargs):
        raise PrunekitError("refused on this rank alone")
    prunekit.commands.prune.execute = refused
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _two_ranks(args: list[str], watched: Path, rank_args: dict[int, list[str]] | None = None,
               more_env: dict[str, str] | None = None, agent_store: bool = False) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each rank; ``rank_args``: more arguments for some ranks;
    ``more_env``: more environment variables for both; ``agent_store``: the group's store lives in
    this process, as torchrun's lives in its launcher (else in rank 0)."""
    port, ranks = free_port(), []
    store = None
    if agent_store:
        from datetime import timedelta
        store = torch.distributed.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=60),
                                           wait_for_workers=False)
        more_env = {**(more_env or {}), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    for rank in range(2):
        more = (rank_args or {}).get(rank, [])
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src"), "WATCHED": str(watched),
               "MPLBACKEND": "Agg", **(more_env or {})}
        ranks.append(subprocess.Popen([sys.executable, "-c", _WATCHED, *args, *more], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in ranks:
        try:
            out, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            raise
        results.append((process.returncode, out, err))
    del store
    return results


# The cases below that run after the ranks joined their group share one spawn of the two ranks
# (``_every_case``; a launch of two processes, each importing torch and prunekit, cost more than
# most of these cases): each calls ``prunekit.cli.main`` in both ranks (``cli_in_ranks.cli``), its
# output caught on file descriptors 1 and 2 and its writes under a watched folder reported as
# ``_WATCHED``'s hook reports them. Refusals met before joining and a rank that leaves the group
# stay launches of their own (``_two_ranks``).
HYBRID = ["prune", *DATA, "--method", "hybrid", "--flops", "0.3", "--structured-flops", "0.6", "--gate-batches", "4",
          "--fisher-samples", "16", "--finetune-epochs", "1", "--json"]


def _test_split_alone(folder: Path) -> Path:
    """A --data-dir holding MNIST's test split alone (in ``folder``)."""
    data_dir = folder / "mnist"
    data_dir.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data_dir / name).symlink_to(ASSETS / "mnist" / name)
    return data_dir


def _no_training_data(data_dir, recalibration: list[str]) -> list[str]:
    return ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(data_dir), "--method", "magnitude", "--sparsity", "0.8", *recalibration, "--json"]


def _prepare(folder: Path) -> None:
    """What the shared cases start from, made by this (one) process: a finished run to export and
    compare, the hybrid's one-process run, a --data-dir without a training split and one process's
    prunes of it (``one.json``: their exit codes)."""
    from prunekit.cli import main
    codes = {"export": main(["prune", *DATA, "--method", "magnitude", "--sparsity", "0.8", "--out",
                             str(folder / "export" / "run"), "--json"])}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as the ranks (one thread each): the same gates, the same cut
    try:
        codes["hybrid"] = main([*HYBRID, "--out", str(folder / "hybrid" / "one")])
    finally:
        torch.set_num_threads(threads)
    data_dir = _test_split_alone(folder)
    for recalibration in ([], ["--no-bn-recalibration"]):
        codes[f"no_training_data{recalibration}"] = main(_no_training_data(data_dir, recalibration))
    (folder / "one.json").write_text(json.dumps(codes))


def _resume_a_finished_run(rank: int, folder: Path) -> dict:
    out = folder / "peaks" / "run"
    flags = ["prune", *DATA, "--method", "magnitude", "--sparsity", "0.8", "--include", "fc2", "fc3", "--json"]
    said = {"first": _cli([*flags, "--out", out], folder / "peaks" / "nothing")}
    if rank == 0 and said["first"][0] == 0:
        first = json.loads((out / "result.json").read_text())
        first["peak_rss_mb_per_rank"][1] += 1000.0     # as if rank 1 had peaked higher than rank 0
        (out / "result.json").write_text(json.dumps(first))
        said["edited"] = first
    torch.distributed.barrier()
    said["resumed"] = _cli(["prune", "--resume", out, "--json"], folder / "peaks" / "nothing")
    return said


def _refused_a_held_folder(rank: int, folder: Path) -> dict:
    from test_run_lock import Holder
    out = folder / "held" / "run"
    holder = Holder(out) if rank == 0 else None
    torch.distributed.barrier()
    said = {"pid": holder.pid if holder else None, "commands": []}
    try:
        for command in (["prune", *DATA, "--method", "magnitude", "--sparsity", "0.8"],
                        ["train", *DATA[:8], "--epochs", "1", "--eval-split", "train", "--batch-size", "500"]):
            said["commands"].append((_cli([*command, "--out", out, "--json"], folder / "held" / "nothing"),
                                     sorted(os.listdir(out))))
            torch.distributed.barrier()
    finally:
        if holder is not None:
            holder.kill()
    return said


def _every_case(rank: int, world: int, folder: str) -> dict:
    """Every shared case, one after the other in one spawn of the ranks: {case: this rank's result}.
    A barrier between cases would hang (and the fixture fail) if a case left the collectives unpaired."""
    os.environ["MPLBACKEND"] = "Agg"
    watch_writes()
    folder = Path(folder)
    chita = ["prune", *DATA, "--method", "chita", "--sparsity", "0.8", "--include", "fc2", "fc3", "--fisher-samples",
             "16", "--json"]
    cases = {
        "sweep": lambda: _cli(["sweep", *DATA, "--method", "magnitude", "chita", "--sparsity", "0.8", "--include", "fc2",
                               "fc3", "--fisher-samples", "16", "--out", folder / "sweep", "--json"], folder / "sweep"),
        "export": lambda: _cli(["export", folder / "export" / "run", "--dense", "--sparse", "--json"],
                               folder / "export" / "run"),
        "compare": lambda: _cli(["compare", folder / "export" / "run", "--out", folder / "compared", "--json"],
                                folder / "compared"),
        "woodfisher": lambda: _cli(["prune", *DATA, "--method", "woodfisher", "--sparsity", "0.8", "--include", "fc2",
                                    "fc3", "--fisher-samples", "16", "--out", folder / "woodfisher", "--json"],
                                   folder / "woodfisher"),
        "bars": lambda: _cli([*chita[:-1], "--out", folder / "bars"], folder / "bars",    # stderr is a file
                             env={"PRUNEKIT_PROGRESS": "1"}),
        "hybrid": lambda: _cli([*HYBRID, "--out", folder / "hybrid" / "two"], folder / "hybrid" / "two"),
        "peaks": lambda: _resume_a_finished_run(rank, folder),
        "train": lambda: _cli(["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", ASSETS / "mnist",
                               "--epochs", "1", "--train-samples", "256", "--batch-size", "64", "--out",
                               folder / "trained", "--json"], folder / "nothing"),
        "every_rank_refuses": lambda: _cli(["prune", *DATA, "--method", "magnitude", "--sparsity", "1.5", "--json"],
                                           folder / "refused"),
        **{f"no_training_data{recalibration}": (lambda recalibration=recalibration: _cli(
            _no_training_data(folder / "mnist", recalibration), folder / "nothing"))
           for recalibration in ([], ["--no-bn-recalibration"])},
        "held": lambda: _refused_a_held_folder(rank, folder),
        **{f"other{extra}": (lambda extra=extra: _cli([*chita, "--out", folder / "other", *(extra if rank else [])],
                                                      folder / "other"))
           for extra in (["--seed", "1"], ["--sparsity", "0.7"])},
    }
    said = {}
    for name, case in cases.items():
        said[name] = case()
        torch.distributed.barrier()
    return said


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(the cases' folder, each rank's {case: result}) of ``_every_case``, run once for the module
    (and both xdist workers)."""
    from distributed_spawn import run_ranks_in_folder_once
    return run_ranks_in_folder_once("distributed_rank_writes", _prepare, _every_case, 2, tmp_path_factory,
                                    timeout=900)


def _case(shared, name: str) -> tuple[Path, list]:
    """(the cases' folder, [rank 0's result of case ``name``, rank 1's])."""
    folder, ranks = shared
    return folder, [said[name] for said in ranks]



def test_a_two_rank_sweep_writes_its_report_on_rank_0_alone(shared):
    folder, [(zero, zero_out, zero_err), (one, one_out, one_err)] = _case(shared, "sweep")
    out = folder / "sweep"
    assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
    assert (one_out, one_err) == ("", ""), one_err[-3000:]
    assert any(line.startswith("WROTE ") and str(out) in line for line in zero_err.splitlines()), \
        zero_err[-2000:]                                            # the watch sees rank 0's writes
    assert (out / "report.md").exists() and (out / "runs.json").exists()
    assert {p.name for p in out.iterdir()} >= {"magnitude_sparsity-0.8", "chita_sparsity-0.8"}


def test_a_two_rank_export_and_compare_write_on_rank_0_alone(shared):
    folder, [(zero, zero_out, zero_err), (one, one_out, one_err)] = _case(shared, "export")
    assert json.loads((folder / "one.json").read_text())["export"] == 0        # the run, by one process
    run = folder / "export" / "run"
    assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
    assert (one_out, one_err) == ("", ""), one_err[-3000:]
    assert '"format": "sparse"' in zero_out
    assert {p.name for p in (run / "export").iterdir()} == {"exported.json", "model-dense.safetensors",
                                                              "model-sparse.safetensors"}
    _, [(zero, zero_out, zero_err), (one, one_out, one_err)] = _case(shared, "compare")
    assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
    assert (one_out, one_err) == ("", ""), one_err[-3000:]
    assert (folder / "compared" / "report.md").exists()


def test_woodfisher_under_two_ranks_is_refused_before_the_run_folder_is_written(shared):
    folder, results = _case(shared, "woodfisher")
    out = folder / "woodfisher"
    assert [code for code, _, _ in results] == [2, 2], results
    assert [stdout for _, stdout, _ in results] == ["", ""]
    zero_err, one_err = results[0][2], results[1][2]
    assert zero_err.count("\n") == 1 and "run them without torchrun" in zero_err and one_err == "", results
    assert not out.exists()          # no half-made run folder (status "running") for --resume to trip on


def test_two_ranks_show_one_gradient_bar_per_stage_over_rank_0s_rows(shared):
    """Rank 0 computes its rows in pieces (to bound the exchange's memory); its progress bar
    counts them all, 8 of 16, not one bar of 1 row per piece."""
    _, [(zero, _, zero_err), (one, one_out, one_err)] = _case(shared, "bars")
    assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
    assert (one_out, one_err) == ("", ""), one_err[-3000:]
    bars = {line.split("|")[-1].split("[")[0].strip() for line in zero_err.replace("\r", "\n").splitlines()
            if line.startswith("gradients:")}
    assert bars and all(bar.endswith("/8") for bar in bars), bars


def test_the_hybrids_falcon_phase_reads_one_processs_rows_on_two_ranks(shared):
    """The channel pipeline's loader starts a new epoch (a new order) at every pass; FALCON on two
    ranks reads its rows piece by piece, one pass each, so it must see one epoch throughout: the
    rows, hence the ridge (relative to the mean Fisher diagonal) and the objective, are one process's."""
    folder, [(zero, _, zero_err), (one, _, one_err)] = _case(shared, "hybrid")
    assert json.loads((folder / "one.json").read_text())["hybrid"] == 0      # one process, one thread
    assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
    falcon = [next(s for s in json.loads((folder / "hybrid" / run / "metrics.json").read_text())["stages"]
                   if s["phase"] == "sparsify")["falcon"][0] for run in ("one", "two")]
    assert falcon[1]["ridge"] == pytest.approx(falcon[0]["ridge"], rel=1e-4), falcon      # other rows: 6x off
    # the DFO path may turn on rounding (other sums on 2 ranks): the objective to a few percent
    assert falcon[1]["objective"] == pytest.approx(falcon[0]["objective"], rel=5e-2), falcon


def test_resuming_a_finished_two_rank_run_keeps_its_per_rank_peaks(shared):
    """--resume of a finished run has nothing to do: its result.json keeps every rank's peak (it
    was rewritten with rank 0's saved peak given for every rank)."""
    folder, said = _case(shared, "peaks")
    out = folder / "peaks" / "run"
    for step in ("first", "resumed"):
        (zero, zero_out, zero_err), (one, one_out, one_err) = (said[0][step], said[1][step])
        assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
        assert (one_out, one_err) == ("", "")
    first = said[0]["edited"]                 # rank 0's result.json, rank 1's peak raised by 1000 MB
    assert json.loads((out / "result.json").read_text()) == first
    assert json.loads(zero_out)["peak_rss_mb_per_rank"] == first["peak_rss_mb_per_rank"]


def test_a_two_rank_training_records_its_ranks_and_each_ranks_peak_as_prune_does(shared):
    """``train --out`` under two ranks: result.json and --json name the world size (``ranks``) and
    every rank's peak resident memory (``peak_rss_mb_per_rank``, rank order), as prune's do. Before,
    neither was recorded and ``peak_rss_mb`` was rank 0's alone."""
    folder, [(zero, zero_out, zero_err), (one, one_out, one_err)] = _case(shared, "train")
    out = folder / "trained"
    assert (zero, one) == (0, 0), zero_err[-2000:] + one_err[-2000:]
    for record in (json.loads((out / "result.json").read_text()), json.loads(zero_out)):
        assert record["ranks"] == 2, record
        peaks = record["peak_rss_mb_per_rank"]
        assert len(peaks) == 2 and all(100 < peak < 100_000 for peak in peaks), peaks
        assert abs(peaks[0] - record["peak_rss_mb"]) <= 0.001 * record["peak_rss_mb"] + 0.1, record


def test_a_mistyped_resume_folder_on_one_machine_says_check_the_path_alone(tmp_path):
    """``torchrun --nproc_per_node 2 ... prune --resume nowhere`` on one machine (LOCAL_WORLD_SIZE is
    the world size): the one-process line, once, every rank exit 2. Before, it named a machine and
    file systems shared by several machines, and had no "check the path"."""
    missing = tmp_path / "nowhere"
    results = _two_ranks(["prune", "--resume", str(missing)], tmp_path, more_env={"LOCAL_WORLD_SIZE": "2"})
    assert [code for code, _, _ in results] == [2, 2], results
    assert results[0][2] == f"prunekit: error: --resume {missing} does not exist (check the path)\n", results[0][2]
    assert results[1][2] == "", results[1][2]


def test_a_refusal_on_every_rank_is_printed_once(shared):
    """Every rank refuses the same request; rank 0 alone prints the line (each rank printed it)."""
    _, results = _case(shared, "every_rank_refuses")
    assert [code for code, _, _ in results] == [2, 2], results
    said = results[0][2] + results[1][2]
    assert said.count("prunekit: error:") == 1 and "--sparsity" in results[0][2], said


@pytest.mark.parametrize("args, env, says", [
    (["prune", *DATA, "--nosuch"], {}, "unrecognized arguments: --nosuch"),
    (["prune", "--recipe", "missing.toml"], {}, "missing.toml"),
    (["prune", "--resume", "missing"], {}, "--resume missing does not exist"),
    (["prune", *DATA, "--sparsity", "0.5"], {"PRUNEKIT_DIST_BACKEND": "bogus"}, "PRUNEKIT_DIST_BACKEND='bogus'"),
], ids=["argument", "recipe", "resume", "backend"])
def test_a_refusal_every_rank_meets_before_joining_is_printed_once(tmp_path, args, env, says):
    """Met before the group is joined (the command line, a --recipe or --resume missing on every
    machine, the backend): both ranks stop with exit 2, rank 0 alone prints the line (each rank did)."""
    results = _two_ranks(args, tmp_path, more_env=env)
    assert [code for code, _, _ in results] == [2, 2], results
    said = results[0][2] + results[1][2]
    assert said.count("\n") == 1 and says in results[0][2], said


@pytest.mark.parametrize("recalibration", [["--no-bn-recalibration"], []])
def test_two_ranks_of_a_method_that_reads_no_training_data_never_load_it(shared, recalibration):
    """magnitude without BatchNorm recalibration, or on a model without BatchNorm (MLPNet), reads no
    training data: with a --data-dir holding the test split alone, two ranks prune as one process
    does. Before, each rank loaded the whole training split up front for the ranks' first-batch check
    (refused here: no training split), and without --no-bn-recalibration one process did too."""
    folder, results = _case(shared, f"no_training_data{recalibration}")
    assert json.loads((folder / "one.json").read_text())[f"no_training_data{recalibration}"] == 0    # one process
    assert [code for code, _, _ in results] == [0, 0], results
    assert json.loads(results[0][1])["ranks"] == 2


@pytest.mark.parametrize("alone", [1, 0])
def test_a_refusal_of_one_rank_alone_is_printed_by_it_at_once(tmp_path, alone):
    """One rank alone cannot read its checkpoint (as if missing on its machine): it prints its own
    line (alone) and exits 2; the other, whose collective fails as that rank leaves, learns from
    the group's store (torchrun's, in its launcher) that it refused and exits 2 without a line.
    Neither waits out REFUSAL_WAIT_S (600 s here, as PRUNEKIT_DIST_TIMEOUT): the other rank says in
    the store that it got past loading. Before, the other rank added "a rank stopped or could not be
    reached ...: run the same command again" (which fails the same way) and exited 1."""
    missing = tmp_path / "missing.safetensors"
    start = time.monotonic()
    results = _two_ranks(["prune", *DATA, "--method", "magnitude", "--sparsity", "0.8", "--json"], tmp_path,
                         rank_args={alone: ["--checkpoint", str(missing)]},
                         more_env={"REFUSAL_WAIT_S": "600", "PRUNEKIT_DIST_TIMEOUT": "600"},
                         agent_store=True)
    took = time.monotonic() - start
    (code, _, err), (other_code, _, other_err) = results[alone], results[1 - alone]
    assert code == 2 and err.count("\n") == 1 and str(missing) in err, err
    assert other_code == 2 and "prunekit:" not in other_err and "Traceback" not in other_err, other_err
    assert took < 150, took      # far below the waits (600 s; a bound of 45 s against 90 s was load-sensitive)


@pytest.mark.parametrize("alone", [1, 0])
def test_a_refusal_one_rank_meets_alone_after_loading_is_printed_at_once(tmp_path, alone):
    """One rank alone is refused after loading and checking (where the pruning starts): it prints its
    line and exits 2, the other stops on the lost rank, quietly, exit 2 (that rank refused: the
    store says so), neither waiting out REFUSAL_WAIT_S (600 s here, as PRUNEKIT_DIST_TIMEOUT): the
    other rank says in the store that it went into a later collective. Before, it said so only after
    loading (``passed_checks``), so a refusal after that waited all REFUSAL_WAIT_S for a line from rank 0 (or rank 0 for rank 1 to
    read its line) that never came; and the other rank said "a rank stopped ... run the same command
    again", exit 1. With the store in rank 0 (no torchrun) a refused rank 0 takes the store with it:
    rank 1 says "a rank stopped", exit 1."""
    start = time.monotonic()
    results = _two_ranks(["prune", *DATA, "--method", "chita", "--sparsity", "0.8", "--fisher-samples", "16",
                          "--json"], tmp_path,
                         more_env={"REFUSAL_WAIT_S": "600", "PRUNEKIT_DIST_TIMEOUT": "600", "REFUSE_ALONE": str(alone)},
                         agent_store=True)
    took = time.monotonic() - start
    (code, _, err), (other_code, _, other_err) = results[alone], results[1 - alone]
    assert code == 2 and err == "prunekit: error: refused on this rank alone\n", err
    assert other_code == 2 and "prunekit:" not in other_err and "Traceback" not in other_err, other_err
    assert took < 150, took      # far below the waits (600 s; a bound of 45 s against 90 s was load-sensitive)


def test_a_folder_another_process_holds_is_refused_on_both_ranks(shared):
    """Rank 0 holds the run folder's lock for the ranks; refused, every rank stops with exit 2 and
    the line is printed once (prune: rank 1 went on alone and stopped on the lost rank, exit 1;
    train took no lock)."""
    _, said = _case(shared, "held")
    pid = said[0]["pid"]
    for (zero, zero_listed), (one, one_listed) in zip(said[0]["commands"], said[1]["commands"], strict=True):
        results = [zero, one]
        assert [code for code, _, _ in results] == [2, 2], results
        words = results[0][2] + results[1][2]
        assert words.count("\n") == 1 and f"in use by another prunekit process (pid {pid})" in words, words
        assert zero_listed == one_listed == [".prunekit.lock"]
    assert len(said[0]["commands"]) == 2


def test_an_out_folder_rank_0_cannot_write_stops_every_rank_at_once(tmp_path):
    """--out under a regular file (so unwritable for root too): rank 0 cannot take its lock; every
    rank stops with exit 2 and the line is printed once. Before, rank 0 alone stopped (exit 2) and
    rank 1 waited in the lock's collective until rank 0 was gone, then stopped on the lost rank
    (exit 1, a second line)."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    results = _two_ranks(["prune", *DATA, "--method", "magnitude", "--sparsity", "0.8", "--out", str(out), "--json"],
                         tmp_path / "nothing")
    assert [code for code, _, _ in results] == [2, 2], results
    said = results[0][2] + results[1][2]
    assert said.count("\n") == 1 and results[0][2].startswith(f"prunekit: error: --out {out}: "), said
    assert f"{tmp_path / 'file'} is a file, not a folder" in said, said     # checked up front since session 55


def test_ranks_started_with_other_options_are_refused_naming_the_options(shared):
    """Rank 1 with another --seed was told it read other training data (--data-dir); with another
    budget the ranks waited on each other until the timeout."""
    for extra, named in ((["--seed", "1"], "--seed 1 against 0"), (["--sparsity", "0.7"], "--sparsity 0.7 against 0.8")):
        _, results = _case(shared, f"other{extra}")
        assert [code for code, _, _ in results] == [2, 2], results
        assert (f"rank 1 was given other options than rank 0 ({named}): every rank must run the same command"
                in results[0][2]), results
