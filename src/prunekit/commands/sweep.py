"""``prunekit sweep`` (each method at each budget, one run folder each, then a report) and
``prunekit compare`` (one table and plots of run folders)."""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from pathlib import Path

from .. import distributed, interrupts, report, run_folder, run_lock, runs
from ..api_checks import check_out
from ..budget import budget_text
from ..errors import PrunekitError
from ..options import OptionError
from .common import check_out_not_input, emit, loaded_model, resolve_model, warn_if_random_weights, write_report
from . import option_flags
from .prune import (add_prune_args, check_request_values, data_on_demand, method_options, plan_of, prune_into,
                    request_of, run_config, taken_options, traced_before_the_scan)


def sweep_plan(args) -> list[tuple[str, dict]]:
    """(method, {"sparsity": s, "flops": f, "params": p}) for every method and budget of a sweep;
    budget lists of equal length go together, a single value goes with every budget."""
    lists = {k: getattr(args, k) for k in ("sparsity", "flops", "params") if getattr(args, k)}
    if not lists:
        raise PrunekitError("a sweep needs budgets: e.g. --flops 0.6 0.4 0.3 or --sparsity 0.5 0.9")
    n = max(len(v) for v in lists.values())
    if any(len(v) not in (1, n) for v in lists.values()):
        raise PrunekitError("budget lists of a sweep must have the same length (or one value each): "
                            + ", ".join(f"--{k} has {len(v)}" for k, v in lists.items()))
    budgets = [{k: v[i] if len(v) > 1 else v[0] for k, v in lists.items()} for i in range(n)]
    plan = [(method, budget) for method in args.method for budget in budgets]
    asked = [(method, {k: _as_share(v) for k, v in budget.items()}) for method, budget in plan]    # 30% = 0.3
    twice = next((run_name(*one) for one, key in zip(plan, asked) if asked.count(key) > 1), None)
    if twice is not None:
        raise PrunekitError(f"this sweep would run {twice} twice: give each method and budget once")
    return plan


def _as_share(value):
    """A budget value as a share where it is one (0.3 and 30% alike), else as given (50k)."""
    text = str(value).strip()
    try:
        return round(float(text[:-1]) / 100 if text.endswith("%") else float(text), 12)
    except ValueError:
        return text


def run_name(method: str, budget: dict) -> str:
    return method.replace("+", "p") + "".join(f"_{k}-{v}" for k, v in budget.items()).replace("%", "pct")


def run_args_of(args, method: str, budget: dict) -> argparse.Namespace:
    """The arguments of one run of a sweep: its method, budget and run folder, and of the sweep's
    method options only those ``method`` takes (its config.toml is a recipe of that run, which
    ``prune --resume`` and ``--recipe`` read again)."""
    taken = taken_options(method, bool(args.gradual))
    run = {**vars(args), "method": method, "sparsity": None, "flops": None, "params": None, **budget,
           "out": str(Path(args.out) / run_name(method, budget))}
    own = argparse.Namespace(**{**run, **{k: None for k in option_flags.OPTION_NAMES if k not in taken}})
    # a run folder of an older version's sweep holds every option of the sweep in its config.toml:
    # the same sweep again carries that run on under the config it was made with
    config = Path(own.out) / "config.toml"
    if config.is_file() and run != vars(own):
        every = argparse.Namespace(**run)
        try:
            if config.read_text(encoding="utf-8") == run_config(every):
                return every
        except (OSError, UnicodeDecodeError):
            pass            # check_run_folder says what is wrong with the folder
    return own


def check_run_folder(run_args: argparse.Namespace) -> None:
    """Refuse a run folder of the sweep that holds a run of other options (or files a run would
    overwrite, or files of the user's in a folder that is no run's, as ``prune --out`` refuses)
    in a sweep's words: prune's refusal names --resume and --force, a sweep has neither."""
    path = Path(run_args.out)
    try:
        runs.check_claim(runs.RunFolder(run_args.out), run_config(run_args))
    except runs.EditedConfig as err:        # a sweep has no --force: the folder goes by hand
        state, back = ("finished", "have that run's result again") if err.finished else ("unfinished", "carry it on")
        raise PrunekitError(f"{path / 'config.toml'} was changed ({', '.join(err.changed[:3])}) since {err.since} "
                            f"was saved, so the {state} run there is not the one it now records: put its values "
                            f"back to {back}, or move that folder away to run it anew") from None
    except OptionError:
        if (path / "config.toml").exists():
            raise PrunekitError(f"{run_args.out} holds a run made with other options (its config.toml records them): "
                                "pick another --out for this sweep, or give it that sweep's own options to finish "
                                "it") from None
        in_the_way = _named([path / name for name in run_folder._present(path)])
        raise PrunekitError(f"{run_args.out} holds files a run would overwrite ({in_the_way}), and no run's "
                            f"config.toml: move them out of {path}, then run this sweep again to finish it (or pick "
                            "another --out for this sweep)") from None
    try:
        check_out(run_args.out)
    except PrunekitError:
        where = f"{run_args.out} (this sweep's run folder for {run_args.method})"
        if path.is_file() or not path.is_dir():
            raise PrunekitError(f"{where} is a file: move it away, then run this sweep again to finish it (or "
                                "pick another --out for this sweep)") from None
        others = sorted(p for p in path.iterdir() if p.name != run_lock.LOCK_NAME
                        and p not in set(runs.stale_temporaries(path)))
        raise PrunekitError(f"{where} holds {_named(others)}, not a run's: move {'it' if len(others) == 1 else 'them'} "
                            f"out of {path}, then run this sweep again to finish it (or pick another --out for this "
                            "sweep); nothing there is written over") from None


def check_sweep_folder(out: str, planned: list[str]) -> None:
    """Refuse an ``--out`` holding files of the user's, as ``prune --out`` and ``train --out`` do:
    a folder no prunekit command wrote (``folders.kind``) holding anything but this sweep's own
    run folders, folders prunekit wrote (``sweep --out .`` next to the run ./r5 it reads) and a
    killed process's leftovers (``runs.stale_temporaries``, the lock). Nothing there would be
    written over, but the sweep's runs, report and plots would land among the user's files."""
    from ..folders import kind
    path = Path(out)
    if not path.is_dir() or kind(path) is not None:
        return
    ours = {Path(run).name for run in planned}
    stale = set(runs.stale_temporaries(path))
    others = sorted(p for p in path.iterdir() if p.name != run_lock.LOCK_NAME and p not in stale
                    and p.name not in ours and kind(p) is None)      # (a run folder there is prunekit's: read)
    if others:
        raise PrunekitError(f"--out {out} is a folder holding other files ({_named(others)}), not a sweep's folder: "
                            "pass a new folder so that nothing there is written over")


def _named(paths: list[Path], shown: int = 2) -> str:
    """``paths`` for a one-line message: the first ``shown`` in full, then how many more."""
    more = len(paths) - shown
    return ", ".join(str(p) for p in paths[:shown]) + (f" and {more} more" if more > 0 else "")


def cmd_sweep(args) -> int:
    plan = sweep_plan(args)
    resolve_model(args)                   # --model DIR: the checkpoint it names
    planned = [run_args_of(args, method, budget).out for method, budget in plan]
    # its runs' folders and its report are inside --out: refused where they would write over the input
    check_out_not_input(args, run_folders=planned,
                        report_files=(*report.COMPARISON_FILES, report.EDITED_REPORT, report.REPORT_STATE))
    taken = {n for m in args.method for n in taken_options(m, bool(args.gradual))}
    unused = [k for k in method_options(args) if k not in taken]
    if unused:
        raise OptionError(f"no method of this sweep takes {unused[0]}", (unused[0],))
    report.check_report_folder(args.out, planned=planned)  # and a folder whose own files the report would overwrite
    check_sweep_folder(args.out, planned)
    for method, budget in plan:           # every run's bad method, option or budget value before the model is
        check_request_values(args, method, budget)          # loaded and any image read
    dense_model = loaded_model(args)
    data = data_on_demand(args, dense_model)
    if not traced_before_the_scan(args):  # a model file's evaluation split first (read already: its input shape)
        data()
    # every run's checks on the traced model (its budget against the model's weights and MACs) before
    # any run reads the training split (the first run's plan_of scans it), and a zoo model's before an
    # image folder's evaluation split is scanned too; one run: its plan_of's own
    traced = {}                           # the model traced once, its trace taken by every run's plan
    resolved = {}                         # each run's budget in the model's integers -> the run
    for method, budget in plan if len(plan) > 1 else []:
        request = request_of(args, dense_model, method, budget, costs=traced.get("costs"))
        request.check()
        if request.costs is not None:
            traced.setdefault("costs", request.costs)
        key = getattr(request, "resolved_key", None)
        if key is not None and key in resolved:     # 0.5 and 16180 of 32,360 weights: one pruning, twice
            first = resolved[key]
            raise PrunekitError(f"this sweep would run the same pruning twice: {run_name(*first)} and "
                                f"{run_name(method, budget)} name one budget of {args.model} "
                                f"({budget_text(first[1])} and {budget_text(budget)}): give each budget once")
        if key is not None:
            resolved[key] = (method, budget)
    for method, budget in plan:           # refuse a bad data size before the first run: prune's own checks,
        # in its order, for every run (plan_of checks the rows against the data)
        plan_of(args, dense_model, None, None, method, budget, data=data, traced=traced)
    eval_loader, train_batches = data()
    try:
        for method, budget in plan:       # a run folder of another sweep is refused before the first run
            check_run_folder(run_args_of(args, method, budget))
    except PrunekitError:
        _mark_before_refusing(args.out, planned)
        raise
    warn_if_random_weights(args)
    with run_lock.held_by_rank_0(args.out):    # one sweep at a time in it (each run locks its own)
        if distributed.is_main_process():
            # a sweep's folder from its first run on, killed or not, with the run folders it plans
            report.mark_report_folder(args.out, [Path(run).name for run in planned])
        table = run_sweep(args, plan, dense_model, eval_loader, train_batches, traced)
    written = report.comparison_report_path(args.out)
    emit(args, {"runs": table, "report": str(written)}, report.table_lines(table) + [_report_line(written)])
    return 0


def _mark_before_refusing(out: str, planned: list[str]) -> None:
    """Mark ``out`` as this sweep's folder (``report.mark_report_folder``, with the run folders it
    plans) where it refuses to start over a run folder holding what is not its run, when ``out`` is
    already a sweep's (an older version's killed before its report wrote no mark): a file saved there
    meanwhile (``save_model``) is then refused, as in a folder this version's sweep marked. Left as it
    is where another process holds its lock or it cannot be written (the refusal is said all the same)."""
    from ..folders import kind
    if not distributed.is_main_process() or kind(out) != "sweep":
        return
    try:
        with run_lock.held(out):
            report.mark_report_folder(out, [Path(run).name for run in planned])
    except (PrunekitError, OSError):
        pass


def _report_line(written: Path) -> str:
    """The summary's last line: where the report went (report.new.md: the user's report.md is kept)."""
    if written.name == "report.md":
        return f"report: {written}"
    return f"report: {written} ({written.parent / 'report.md'} was edited since prunekit wrote it: kept as it is)"


def _other_finished_runs(out: Path, folders: list[Path]) -> list[Path]:
    """The finished run folders in sweep folder ``out`` other than ``folders`` (this sweep's runs):
    an earlier sweep's into the same folder, which its report keeps listing. In name order."""
    mine = {folder.resolve() for folder in folders}
    found = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        if path.resolve() in mine or not runs.is_run(path):
            continue
        try:
            metrics = runs.RunFolder(path).read_metrics()
        except PrunekitError:
            continue
        if metrics.get("status") == "done" and isinstance(metrics.get("method"), str):
            found.append(path)
    return found


def run_sweep(args, plan: list[tuple[str, dict]], dense_model, eval_loader, train_batches,
              traced: dict | None = None) -> list[dict]:
    """Run every method and budget of ``plan`` into its folder, then write the sweep's report;
    returns the report's table. ``traced``: ``{"costs": CostModel}``, ``dense_model``'s trace, which
    each run's model (a copy of it) is planned with rather than traced again."""
    folders, dense = [], None
    for i, (method, budget) in enumerate(plan, start=1):
        interrupts.check()               # a Ctrl-C the last run's cleanup swallowed stops the sweep here
        run_args = run_args_of(args, method, budget)
        finished = runs.RunFolder(run_args.out).read_metrics().get("status") == "done"
        if not args.json:
            print(f"[{i}/{len(plan)}] {method}, {budget_text(budget)} -> {run_args.out}"
                  + (" (finished before: its result again)" if finished else ""), file=sys.stderr)
        loaded = copy.deepcopy(dense_model)
        prune_into(run_args, plan_of(run_args, loaded, eval_loader, train_batches, method, budget, traced=traced),
                   loaded, eval_loader, train_batches, dense)
        dense = dense or runs.RunFolder(run_args.out).read_metrics().get("dense")
        folders.append(Path(run_args.out))
    if not distributed.is_main_process():     # under torchrun, rank 0 alone reads the runs back and reports
        return []
    folders += _other_finished_runs(Path(args.out), folders)    # a rerun of fewer runs keeps reporting them all
    table = report.collect(folders)
    write_report(lambda: report.write_comparison_report(args.out, table, title=f"Sweep: {args.model}",
                                                        planned=[str(f) for f in folders]), args.json)
    return table


def cmd_compare(args) -> int:
    if not distributed.is_main_process():   # under torchrun, rank 0 alone reads the runs and reports
        return 0
    runs = report.find_runs(args.runs)
    if args.out is not None:
        report.check_report_folder(args.out, runs)
    # one process at a time writes in --out (another compare, a sweep writing its report there)
    with run_lock.held(args.out) if args.out else nullcontext():
        table = report.collect(runs)
        if args.out:
            write_report(lambda: report.write_comparison_report(args.out, table, title="Comparison"), args.json)
        written = report.comparison_report_path(args.out) if args.out else None
    emit(args, {"runs": table, **({"report": str(written)} if written else {})},
          report.table_lines(table) + ([_report_line(written)] if written else []))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="prune with each method at each budget, then report and plot")
    add_prune_args(p, sweep=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="one table (and plots with --out) of run folders")
    p.add_argument("runs", nargs="+", metavar="DIR", help="run folders, or sweep folders holding them")
    p.add_argument("--out", help="folder for report.md and its plots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_compare)
