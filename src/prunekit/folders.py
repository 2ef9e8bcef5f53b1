"""What marks a folder prunekit wrote, and which of its files are prunekit's own.

Every kind of folder a prunekit command writes, by what marks it:

* ``prune --out`` (and each run of a sweep, ``prunekit.prune(out=...)``): ``metrics.json``;
* ``train --out``: a run's ``config.toml`` (``api_checks._is_run_config``) naming no method, and
  no ``metrics.json``;
* ``sweep --out`` / ``compare --out``: the comparison's report state (``.prunekit-report.json``)
  or its ``runs.json`` rows; a sweep's also holds its runs' folders (each a prune folder). A sweep
  writes that state before its first run, naming the run folders it plans (``report.SWEEP_RUNS``),
  so a sweep killed before its report is still known as one, and ``save_model`` writes nothing
  inside its run folders, made or not (``inside_a_sweeps_run``); a sweep of an older version is
  known by its report's title ("# Sweep: ...") or its empty mark, and its runs by its runs.json rows
  and their folder names ("magnitude_sparsity-0.5"); one such sweep killed before its report, by
  its lock file and run folders of those names holding a prune run's config.toml
  (``_older_killed_sweep``). A comparison writes only its report files
  (report.md, runs.json, plots/), never runs: only those are its own (``compare --out`` of the
  runs' own parent folder makes no sweep of it);
* ``export`` (``prunekit export RUN`` writes ``RUN/export``): the manifest ``exported.json``.

``own_file(path)`` says whether ``path`` is one of the files the prunekit folder it lies in writes
(so that nothing else, ``save_model`` say, writes over it); the imports are lazy because the
modules that know each kind's files import ``saving``.
"""

from __future__ import annotations

import re
from pathlib import Path


def kind(folder: str | Path) -> str | None:
    """What prunekit wrote ``folder`` as: "run" (of prune), "training run", "sweep", "comparison",
    "export"; None for a folder that is none of them (or no folder)."""
    from .api_checks import _is_run_config
    from .export import _written_before
    from .report import REPORT_STATE, _is_comparison_rows
    from .runs import METRICS
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / METRICS).is_file():
        return "run"
    if _is_run_config(folder / "config.toml"):       # a training run's, or a run killed before its metrics.json
        return "training run" if not _names_a_method(folder / "config.toml") else "run"
    if (folder / REPORT_STATE).is_file() or _is_comparison_rows(folder / "runs.json"):
        return "sweep" if _sweeps_runs(folder) is not None else "comparison"
    if _older_killed_sweep(folder):
        return "sweep"
    if _written_before(folder):
        return "export"
    return None


def own_names(folder: str | Path) -> frozenset[str]:
    """The names (in ``folder``) of the files and subfolders the prunekit folder ``folder`` writes
    (``kind``); empty for a folder prunekit did not write."""
    from .export import _written_before, FORMATS, MANIFEST
    from .report import COMPARISON_FILES, EDITED_REPORT, REPORT_STATE
    from .runs import RUN_FILES
    what = kind(folder)
    if what in ("run", "training run"):
        return frozenset(RUN_FILES)
    if what in ("sweep", "comparison"):
        return frozenset({name.split("/")[0] for name in COMPARISON_FILES} | {EDITED_REPORT, REPORT_STATE})
    if what == "export":
        return frozenset({*FORMATS.values(), MANIFEST, *_written_before(Path(folder))})
    return frozenset()


def own_file(path: str | Path) -> str | None:
    """The kind of prunekit folder (``kind``) whose own file ``path`` is (a name of
    ``own_names`` in the folder ``path`` lies in, or a run's stage checkpoint or taper snapshot
    model in its subfolder), or None when it is no prunekit folder's."""
    path = Path(path)
    if path.name in own_names(path.parent):
        return kind(path.parent)
    run = kind(path.parent.parent)      # a run's own subfolder: its stage checkpoints, a taper snapshot's model
    if run in ("run", "training run") and (
            (path.parent.name == "checkpoints" and re.fullmatch(r"stage-\d+\.safetensors", path.name))
            or (path.parent.name.startswith("snapshot-")
                and path.name in ("model.safetensors", "model.json", "result.json"))):
        return run
    return None


# The name of a sweep's run folder (``commands.sweep.run_name``): its method, then each budget
# ("magnitude_sparsity-0.5", "chita_flops-0.6_params-50k")
_RUN_NAME = re.compile(r".+?(_(sparsity|flops|params)-[^_/]+)+")


def _sweeps_runs(folder: Path) -> tuple[set[str], bool] | None:
    """(names, named) of the run folders in ``folder`` of the sweeps that wrote it (``folder``
    holding a report state or runs.json): the names its report state records (``report.SWEEP_RUNS``,
    written before a sweep's first run) and those of its runs.json rows that lie in it; ``named``:
    the state records them (else, for a sweep of an older version, any subfolder named as a sweep
    names its runs, ``_RUN_NAME``, is taken for one). None when no sweep wrote ``folder`` (a
    comparison's: neither that record nor a report titled "# Sweep: ...", as a sweep of an older
    version wrote it, nor an older version's killed sweep, ``_older_killed_sweep``)."""
    import json
    from .report import EDITED_REPORT, REPORT_STATE, SWEEP_RUNS
    try:
        state = json.loads((folder / REPORT_STATE).read_text())
    except (OSError, ValueError):
        state = None
    planned = state.get(SWEEP_RUNS) if isinstance(state, dict) else None
    named = isinstance(planned, list)
    if (not named and not any(_titled_a_sweep(folder / name) for name in ("report.md", EDITED_REPORT))
            and not _older_killed_sweep(folder)):
        return None
    names = {name for name in planned or [] if isinstance(name, str)}
    try:
        rows = json.loads((folder / "runs.json").read_text())
    except (OSError, ValueError):
        rows = []
    for row in rows if isinstance(rows, list) else []:
        run = Path(row.get("run", "")) if isinstance(row, dict) and isinstance(row.get("run"), str) else None
        if run is not None and run.name and _same_folder(run.parent, folder):
            names.add(run.name)
    return names, named


def _older_killed_sweep(folder: Path) -> bool:
    """Whether ``folder`` is the folder of a sweep of an older version killed before its report: that
    version marked it only with its report, so what is left is its lock file (``.prunekit.lock``,
    which a kill leaves behind) and run folders named as a sweep names them (``_RUN_NAME``) holding a
    prune run's config.toml (a run's folder of its own has no lock beside it, the sweep's does)."""
    from .api_checks import _is_run_config
    from .run_lock import LOCK_NAME
    if not (folder / LOCK_NAME).is_file() or (folder / "config.toml").exists():
        return False
    try:
        subfolders = [path for path in folder.iterdir() if path.is_dir() and _RUN_NAME.fullmatch(path.name)]
    except OSError:
        return False
    return any(_is_run_config(run / "config.toml") and _names_a_method(run / "config.toml") for run in subfolders)


def _titled_a_sweep(report: Path) -> bool:
    try:
        with open(report, encoding="utf-8") as f:
            return f.readline().startswith("# Sweep: ")
    except (OSError, UnicodeDecodeError):
        return False


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def inside_a_sweeps_run(path: str | Path) -> tuple[Path, Path] | None:
    """(sweep folder, run folder) where ``path`` lies (at any depth) inside a run folder of a
    prunekit sweep (one it planned, made or not yet: ``_sweeps_runs``), or None. Such a folder is
    the sweep's to write: a killed sweep, run again, finishes its runs into folders not made yet,
    which a file of another's would be in the way of. The rest of a sweep's folder is not (a sweep
    into a folder of the user's leaves its other files and folders theirs; the sweep's own files
    are refused by ``own_file``), nor is anything in a comparison's folder but its own files."""
    path = Path(path).absolute()
    for run in (path, *path.parents):        # (a file named as a run folder is in its way too)
        folder = run.parent
        if folder == run:
            break
        if kind(folder) == "sweep":
            names, named = _sweeps_runs(folder) or (set(), True)
            if run.name in names or (not named and _RUN_NAME.fullmatch(run.name)):
                return folder, run
    return None


def _names_a_method(config: Path) -> bool:
    import tomllib
    from .run_folder import read_config
    try:
        return "method" in tomllib.loads(read_config(config))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
