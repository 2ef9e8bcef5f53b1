"""The ``prunekit`` command line: the parser and the dispatch; each command lives in its own
module under ``prunekit.commands`` (info, eval, prune, sweep/compare, export, train, demo,
bench-latency).

Every command turns bad input into a one-line error naming the fix and exit code 2
(``PrunekitError``; a message that names a parameter shows it as its flag); ``--json`` prints
exactly one JSON object on stdout, progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import tomllib
import warnings
from pathlib import Path

import torch.distributed

from . import __version__, distributed, interrupts, recipes, run_lock, runs, startup
from .distributed.lost import first_line as _first_line, is_lost_rank as _lost_rank, lost_ranks_words
from .api import run_had_finished
from .api_checks import check_out_place
from .commands import bench_latency, demo, eval as eval_command, export, info, prune, sweep, train
from .errors import PrunekitError, PrunekitWarning, printable_paths, refusal_of, say
from .data.load import check_image_sizes
from .options import MAX_COUNT, cli_message
from .run_folder import read_config
from .suggest import closest


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), naming the command's --help, and no
    abbreviated flags (``--flop`` is a typo to point out, not ``--flops``: an abbreviation would
    also change meaning the day a second flag shares its prefix)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # every rank parses the same command line: under torchrun rank 0 alone says what is wrong
        quiet = distributed.launched_by_torchrun() and os.environ.get("RANK", "0") != "0"
        self.exit(2, None if quiet else f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        self._given: set[int] = set()          # the options met so far in this parse (``_get_values``)
        return super().parse_known_args(args, namespace)

    def _get_values(self, action, arg_strings):
        """argparse's, refusing an option that takes a list given twice (``sweep --method magnitude
        --method chita`` ran chita alone: the second list replaced the first). An option taking one
        value keeps argparse's rule, the last one given wins (``--epochs 2 ... --epochs 5``: a
        command line written once and overridden at its end, as scripts do)."""
        if action.option_strings and action.nargs in ("+", "*"):
            if id(action) in self._given:
                flag = action.option_strings[-1]
                raise argparse.ArgumentError(None, f"{flag} given twice: give all its values after one {flag}")
            self._given.add(id(action))
        return super()._get_values(action, arg_strings)

    def _get_value(self, action, arg_string):
        """argparse's, refusing digits other than 0-9 in a number (``--fisher-samples ８``: int()
        reads full-width and other scripts' digits, the budgets do not)."""
        if action.type is not None and isinstance(arg_string, str) and _foreign_digits(arg_string):
            flag = action.option_strings[-1] if action.option_strings else action.dest
            raise argparse.ArgumentError(None, f"{flag} {arg_string}: {NOT_ASCII_DIGITS}")
        return super()._get_value(action, arg_string)

    def parse_args(self, args=None, namespace=None):
        """argparse's, with options no command takes reported by the command's own parser and
        a mistyped flag's likely spelling ("--sparsty" -> "did you mean --sparsity?"), or the
        command that takes it (``prune --zeros`` -> "--zeros is an option of `prunekit train`")."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            name = getattr(parsed, "command", None)
            command = self._command(name)
            flags = [flag for action in command._actions for flag in action.option_strings]
            given = [extra.split("=", 1)[0] for extra in extras if extra.startswith("--")]
            elsewhere = next((hint for flag in given if flag not in flags
                              and (hint := self._taken_by_other(flag, name))), None)
            guesses = (closest(flag, flags) for flag in given)
            close = next((guess for guess in guesses if guess), None)
            hint = f" ({elsewhere})" if elsewhere else f" (did you mean {close}?)" if close else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def _taken_by_other(self, flag: str, name: str | None) -> str | None:
        """"--zeros is an option of `prunekit train`, not of prune" when ``flag`` is no option of
        command ``name`` but is one of other commands (None otherwise)."""
        if self._subparsers is None or name is None:
            return None
        choices = self._subparsers._group_actions[0].choices
        others = [other for other, p in choices.items() if other != name
                  and any(flag in action.option_strings for action in p._actions)]
        if not others:
            return None
        named = [f"`prunekit {other}`" for other in others[:3]]
        named = ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0]
        return f"{flag} is an option of {named}, not of {name}"

    def _command(self, name: str | None) -> argparse.ArgumentParser:
        """The subcommand's parser (this parser itself where there is none)."""
        if self._subparsers is None or name is None:
            return self
        return self._subparsers._group_actions[0].choices.get(name, self)


NOT_ASCII_DIGITS = "write the number with the digits 0-9"


def _foreign_digits(text: str) -> bool:
    """Whether ``text`` holds a digit other than 0-9 (full-width ８, Arabic-Indic ٨, ...)."""
    return any(not c.isascii() and c.isnumeric() for c in text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunekit", description="Prune neural networks to a budget.")
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info.add_parser(sub)
    eval_command.add_parser(sub)
    prune.add_parser(sub)
    bench_latency.add_bench_latency_parser(sub)
    sweep.add_parsers(sub)
    export.add_parser(sub)
    train.add_parser(sub)
    demo.add_parser(sub)
    return parser


def build_parser_for(command: str) -> argparse.ArgumentParser:
    """The subparser of ``command`` in a fresh parser."""
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[command]


def _apply_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--recipe FILE`` (prune, sweep) or ``--resume DIR`` (prune): their options become the
    subcommand's defaults before the real parse, so command-line flags override a recipe."""
    if argv and argv[0] == "train":
        _refuse_train_resume(argv)
    if not argv or argv[0] not in ("prune", "sweep"):
        return
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--recipe")
    peek.add_argument("--resume")
    known, _ = peek.parse_known_args(argv[1:])
    _expand_home(known)
    _refuse_dash_paths(known, peek)
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    if known.resume and argv[0] == "sweep":
        raise PrunekitError("sweep takes no --resume: run the same sweep command again to finish it "
                            "(finished runs are kept)")
    if known.resume is not None and not known.resume.strip():
        raise PrunekitError("--resume needs the run folder to carry on, e.g. --resume runs/mine")
    if known.resume and Path(known.resume).name == "config.toml" and Path(known.resume).is_file():
        known.resume = str(Path(known.resume).parent)        # the folder's config named: the folder
    if known.resume:
        others = [a for a in argv[1:] if a.startswith("-") and a.split("=")[0] not in ("--resume", "--json")]
        if others:
            # --force with --resume: it would run anew what --resume carries on; the command that does that
            anew = (f" (to run it anew with its config.toml's values: `{prune.anew_command(known.resume)}`)"
                    if any(a.split("=")[0] == "--force" for a in others) and Path(known.resume).is_dir() else "")
            raise PrunekitError(f"--resume takes every option from {Path(known.resume) / 'config.toml'}; "
                                f"leave out {', '.join(others)}{anew}")
        config = Path(known.resume) / "config.toml"
        if not Path(known.resume).exists():
            if distributed.launched_by_torchrun() and distributed.on_several_machines():   # there it may be: not shared
                raise PrunekitError(f"--resume {known.resume} does not exist on machine {socket.gethostname()} (check "
                                    "the path; on several machines the run folder must be on a file system they all "
                                    "share, at the same path)")
            raise PrunekitError(f"--resume {known.resume} does not exist (check the path)")
        if not config.exists():
            pending = runs.pending_config(known.resume)     # a run killed while it took the folder
            if pending is None and runs.only_leftovers(known.resume) and any(Path(known.resume).iterdir()):
                raise PrunekitError(f"{known.resume} holds no run yet (it was stopped before it wrote its "
                                    f"config.toml): run the original command again with --out {known.resume}")
            if pending is None:
                raise PrunekitError(f"{known.resume} is not a prunekit run folder (no config.toml): "
                                    "pass the --out folder of a `prunekit prune` run")
            config = pending        # read here; the run writes config.toml and removes the temporary
        if _is_training_config(config):
            raise PrunekitError(f"{known.resume} is the folder of a `prunekit train` run: run that train command "
                                "again to carry it on (--resume is for `prunekit prune` runs)")
        if _is_python_config(config):
            raise PrunekitError(f"{known.resume} is a run started from Python (prunekit.prune(..., out=)): resume it "
                                f"by calling prunekit.prune again with the same arguments and out={known.resume!r}; "
                                "`prunekit prune --resume` carries on runs of the command line")
        runs.check_config_unchanged(known.resume, prune.anew_command(known.resume))    # before code is imported
        options = _taken_only(recipes.load_recipe(config, sub))
        data_dir = options.get("data_dir")
        if data_dir and not Path(data_dir).exists():
            raise PrunekitError(f"the run reads its data from {data_dir} (its config.toml), which does not exist: "
                                "put the data back there (a resumed run reads the data it started on), or start "
                                "a new run with --out and --data-dir")
        recipes.apply_recipe(sub, {**options, "out": known.resume})
    elif known.recipe:
        recipes.apply_recipe(sub, recipes.load_recipe(known.recipe, sub))


def _refuse_train_resume(argv: list[str]) -> None:
    """``prunekit train ... --resume DIR``: train has no --resume (argparse would say only that
    --data and --data-dir are required, or that --resume is unknown). A train run carries on when
    the same train command runs again with the same --out."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--resume" or arg.startswith("--resume="):
            folder = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            out = f"--out {folder}" if folder.strip() and not folder.startswith("-") else "--out"
            raise PrunekitError("train takes no --resume: a train run carries on when you run the same train "
                                f"command again with the same {out} (from its last completed epoch)")


def _taken_only(options: dict) -> dict:
    """A run folder's options less the method options its method does not take: a sweep of an
    older version wrote every option of the sweep into each run's config.toml (``--stages`` of
    chita into magnitude's), which the run never used; prune itself refuses them."""
    from .commands.option_flags import OPTION_NAMES
    try:
        taken = prune.taken_options(options.get("method", "magnitude"), bool(options.get("gradual")))
    except PrunekitError:          # an unknown method: the run's own checks say so
        return options
    return {k: v for k, v in options.items() if k not in OPTION_NAMES or k in taken}


PATH_OPTIONS = ("checkpoint", "data_dir", "out", "pruned", "model", "model_flag", "recipe", "resume", "runs")


def _expand_home(args) -> None:
    """``~/x`` in a path option, quoted so that the shell left it (``--out '~/runs'`` made a folder
    named ``~`` here), is the user's home, as the shell would have made it."""
    for dest in PATH_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, dest, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, dest, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                                 for v in value])


def _refuse_dash_paths(args, parser: argparse.ArgumentParser) -> None:
    """Refuse a path option whose value starts with "-" (``--out -weird``, glued to its option by
    ``_glue_dash_values``): almost always a mistyped or misplaced option, and a folder so named
    is read as an option by every tool after. ``./-weird`` names such a folder on purpose.
    Before any file is read or written, so the same for every command."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    for dest in (d for d in PATH_OPTIONS if d not in ("model", "model_flag")):   # "unknown model" lists them
        value = getattr(args, dest, None)
        if dest in flags and isinstance(value, str) and value.startswith("-"):
            raise PrunekitError(f"{flags[dest]} {value}: a path starting with '-' is most likely a mistyped "
                                f"option; give the path (for a file or folder of that name, write ./{value})")


def _refuse_bad_paths(args) -> None:
    """Refuse, before any file is read or written, the paths no command can use: an empty
    ``--data-dir`` (it read the current folder), an ``--out`` that is a symbolic link to nothing
    or lies under a file (refused late, as "File exists" or "Not a directory"), and an ``--out``
    inside an image folder's ``--data-dir`` (the run's folder became a class, its files data; the
    other data sets read only their own files, so a run beside them is theirs to place)."""
    data_dir, out = getattr(args, "data_dir", None), getattr(args, "out", None)
    if isinstance(data_dir, str) and not data_dir.strip():
        raise PrunekitError("--data-dir is an empty path: name the folder holding the data (e.g. --data-dir data/mnist)")
    if not isinstance(out, str) or not out.strip():
        return              # an empty --out: each command's own check says so
    try:
        _refuse_bad_out(out, data_dir if getattr(args, "data", None) == "imagefolder" else None)
    except OSError:         # a folder it may not look into: the command's own checks say what is wrong
        return


# counts every command checks before it loads anything: dest -> (flag, least value); the most is
# what Python's range and islice take (``MAX_COUNT``: past it a huge --batch-size ran as the whole split)
COUNTS = {"batch_size": ("--batch-size", 1), "train_samples": ("--train-samples", 1), "epochs": ("--epochs", 1),
          "warmup": ("--warmup", 0), "repeats": ("--repeats", 1)}


def _refuse_bad_counts(args) -> None:
    """Refuse, before the model or data are loaded, a count past ``MAX_COUNT``, a ``--batch-size``
    below 1 and a ``--resize`` / ``--crop`` out of range (eval refused them after loading the model;
    the other lower bounds are each command's own)."""
    check_image_sizes(getattr(args, "resize", None), getattr(args, "crop", None))
    for dest, (flag, least) in COUNTS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if value > MAX_COUNT:
            raise PrunekitError(f"{flag} must be at most {MAX_COUNT}, got {value}")
        if dest == "batch_size" and value < least:
            raise PrunekitError(f"{flag} must be at least {least} (samples per batch), got {value}")


def _refuse_bad_out(out: str, data_dir: str | None) -> None:
    path = Path(out)
    check_out_place(out, "--out")
    if isinstance(data_dir, str) and Path(data_dir).is_dir():
        data, run = Path(data_dir).resolve(), path.resolve()
        if run == data or data in run.parents:
            raise PrunekitError(f"--out {out} is inside the image folder --data-dir {data_dir}: the run's files "
                                "would be read as data (each subfolder is a class); pick an --out outside it")


def _from_config(err: PrunekitError, args) -> str:
    """" (in DIR/config.toml)" when ``err`` refuses an option a resumed run read from its
    config.toml (--resume takes no other flag), else ""."""
    resume, params = getattr(args, "resume", None), getattr(err, "params", ())
    if args.command != "prune" or not resume or not params:
        return ""
    config = Path(resume) / "config.toml"
    try:
        keys = {k.replace("-", "_") for k in tomllib.loads(read_config(config))}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    return f" (in {config})" if any(p in keys for p in params) else ""


def _is_python_config(config: Path) -> bool:
    """Whether ``config`` is the config.toml of ``prunekit.prune(..., out=)`` (it records the
    model's class, not a model the command line names)."""
    try:
        keys = {k.replace("-", "_") for k in tomllib.loads(read_config(config))}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False        # load_recipe says what is wrong with it
    return "model_class" in keys and "model" not in keys


def _is_training_config(config: Path) -> bool:
    """Whether ``config`` is the config.toml of a `prunekit train` run (it has epochs, no method)."""
    try:
        keys = tomllib.loads(read_config(config)).keys()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False        # load_recipe says what is wrong with it
    return "epochs" in keys and "method" not in keys


def _how_to_resume(args) -> str:
    """What an interrupted command left behind and how to carry on (the end of one line)."""
    out = getattr(args, "out", None)
    if args.command == "sweep":
        return "run the same command again to finish the sweep (finished runs are kept)"
    if args.command == "prune" and out:
        if (Path(out) / "config.toml").exists():
            launcher = "torchrun ... -m prunekit" if distributed.launched_by_torchrun() else "prunekit"
            if run_had_finished(Path(out)):     # stopped after metrics.json said "done" (writing the report, leaving)
                return runs.finished_note(out, f"`{launcher} prune --resume {out}`")
            return f"resume with `{launcher} prune --resume {out}`"
        return f"stopped before {out} held a run: run the same command again"
    if args.command == "train" and out:
        return "run the same command again to carry on after the last completed epoch"
    return "nothing was saved: run the command again" + (
        " (with --out DIR, a prune run can be resumed)" if args.command == "prune" and not out else "")


def _flags(parser: argparse.ArgumentParser, command: str | None = None) -> set[str]:
    """The options of ``command`` (default: of every command), by their Python names (the dests
    of their flags)."""
    choices = parser._subparsers._group_actions[0].choices
    commands = [choices[command]] if command in choices else choices.values()
    return {a.dest for p in commands for a in p._actions if a.option_strings} | {"data"}


def _ours_on_one_line(show_others):
    """A ``warnings.showwarning`` that prints our own warnings as one line in our words and
    passes any other to ``show_others``. Under torchrun rank 0 alone prints ours: every rank runs
    the same command on the same files, so each met it (an image folder without train/ and test/,
    a zoo model without --checkpoint, --train-samples above the split: once per rank before)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, PrunekitWarning):      # errors.worded_warning: the command line's words
            if not _prints_warnings():
                return
            print(f"prunekit: warning: {getattr(message, 'cli_text', None) or message}", file=sys.stderr)
        else:
            show_others(message, category, filename, lineno, file, line)
    return show


def _prints_warnings() -> bool:
    """Whether this process prints prunekit's warnings: the only process, or rank 0 under torchrun
    (by its group once joined, else by RANK, as the parser's refusals)."""
    try:
        if not distributed.launched_by_torchrun():
            return True
    except PrunekitError:             # WORLD_SIZE not a number: refused on its own, in one line
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0").strip() == "0"


def _chain(err: BaseException):
    """``err`` and the errors it was raised in the handling of (``__context__``, ``__cause__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def lost_peer(err: BaseException) -> RuntimeError | None:
    """Under torchrun, the collective error that stopped this rank where the reason is a rank
    that stopped on its own (``kill -9``, a crash, the group's timeout): None where nothing
    failed in a collective (a plain Ctrl-C or SIGTERM), where the launcher is gone, or where every
    peer left for a SIGTERM or a refusal of its own (``distributed.peers_stopped``). torchrun
    SIGTERMs the ranks left once one dies, and that SIGTERM could come before, during or after
    this rank's handling of the failed collective: the store, not the order of arrival, decides.
    The verdict is kept on the error, so run.log and the printed line agree."""
    if not distributed.launched_by_torchrun():
        return None
    failed = next((e for e in _chain(err) if isinstance(e, RuntimeError) and _lost_rank(e)), None)
    if failed is None:
        return None
    if not hasattr(failed, "prunekit_rank_lost"):      # (kept on the error: asked again, the same answer)
        if interrupts.sigint_here():   # this rank got the Ctrl-C too (the launcher's process group): a peer obeyed it
            failed.prunekit_rank_lost = False
            return None
        gone = distributed.launcher_lost() or _first_line(failed).startswith(distributed.LAUNCHER_GONE)
        stopped = None if gone else distributed.peers_stopped(interrupts.terminated())
        # no store that answers: as before, a SIGTERM's stop if one came, else a lost rank
        failed.prunekit_rank_lost = not gone and (stopped is False or stopped is None and not interrupts.terminated())
    return failed if failed.prunekit_rank_lost else None


def _lost_line(failed: RuntimeError) -> str:
    return f"interrupted: a rank stopped or could not be reached ({_first_line(failed)})"


def stop_line(err: BaseException) -> str | None:
    """What run.log says when ``err`` stops a run: a Ctrl-C or SIGTERM, a lost torchrun rank; None
    for any other error (a bug's traceback: the run is shown interrupted by its lock)."""
    if isinstance(err, KeyboardInterrupt):
        failed = lost_peer(err)
        if failed is None and (what := _lost_outside_collectives(err)) is not None:
            return f"interrupted: a rank stopped or could not be reached ({what})"
        return _lost_line(failed) if failed is not None else f"interrupted ({interrupts.stopped_by()[0]})"
    if isinstance(err, RuntimeError) and distributed.launched_by_torchrun() and _lost_rank(err):
        if distributed.launcher_lost() or _first_line(err).startswith(distributed.LAUNCHER_GONE):
            return f"interrupted ({distributed.LAUNCHER_GONE})"
        if lost_peer(err) is None and interrupts.sigint_here():
            return "interrupted (Ctrl-C)"       # the Ctrl-C every rank got: a peer obeyed it first
        if lost_peer(err) is None and (interrupts.terminated() or not distributed.peer_refused()):
            return "interrupted (SIGTERM)"      # torchrun's SIGTERM to every rank: a peer obeyed it first
        return _lost_line(err)
    return None


def _log_stop(args, line: str, err: BaseException | None = None) -> None:
    """Under ``prune --out`` (``train --out`` writes its own, ``stop_recorded``), write why the run ends here to its run.log (rank 0 alone) and mark a
    running run interrupted: ``--resume`` carries on from the last completed stage. A run stopped
    while it held its folder has written both before letting its lock go (``prune_into``; ``err``
    says so); one stopped before it took the lock writes them now, holding the lock while it does,
    and not in a folder another process holds by now: that run's log and status are its own."""
    out = getattr(args, "out", None)
    if any(getattr(e, "prunekit_stop_written", False) for e in _chain(err)):   # (a SIGTERM raised while it was handled)
        return
    if not (args.command == "prune" and out and (Path(out) / "run.log").exists() and distributed.is_main_process()):
        return
    try:
        with run_lock.held(out):
            runs.mark_stopped(runs.RunFolder(out), line)
    except (PrunekitError, OSError):      # held by another process (or not writable): not this run's to mark
        return


class _RankLost(Exception):
    """A collective failed because another rank died; its one-line message is already printed."""


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():      # restores the warning display when main returns
        warnings.showwarning = _ours_on_one_line(warnings.showwarning)
        joined_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        code, returned = 1, False
        startup.started()               # a Ctrl-C from here on is the command's (``interrupts.caught``)
        # the program alone (not a caller's process, not a torchrun rank: _end_now ends those at once)
        ends_here = startup.is_the_program() and not distributed.launched_by_torchrun()
        try:
            with interrupts.caught(), printable_paths():
                code = _main(argv)
                if code == 0 and not joined_before and torch.distributed.is_initialized():
                    code = _last_barrier()
                if ends_here:
                    try:
                        _ignore_stops()
                    except KeyboardInterrupt:       # one that came as the command returned: ignored too
                        _ignore_stops()
            returned = True
            return code
        except _RankLost as lost:
            _end_now(lost.args[0] if lost.args else 1)      # the run folder is already on disk
        finally:
            if not joined_before and returned and torch.distributed.is_initialized():
                _end_now(code)
            if not joined_before:         # an unexpected error: leave the group, show the traceback
                distributed.shutdown(wait=False)


def _ignore_stops() -> None:
    """The command has ended, its result printed and its files written: a Ctrl-C or SIGTERM while
    the process exits (flushing, finalizers) is ignored and the exit code stays the command's (README).
    They had raised KeyboardInterrupt (a traceback, or "Exception ignored in" a finalizer) or ended it
    by the signal, with no word, after a sweep had printed its report's path (exit -15)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _last_barrier() -> int:
    """Under torchrun, after this rank's command succeeded: wait for the other ranks (no rank leaves while
    another has a collective in flight, or rank 0 still writes the run's report), inside ``caught``. There
    a SIGTERM (a ``kill -TERM`` of the launcher) is said in the store the moment it comes (``say_stopped``,
    from ``caught``'s thread): outside it, SIGTERM at its default ended the waiting rank saying nothing, and
    rank 0, stopped by the same SIGTERM, took it for a rank lost on its own. A rank stopped here prints
    nothing (rank 0 says the stop; a rank 0 stopped here had finished its own work) and returns the stop's
    exit code; the exit code is 0 otherwise."""
    try:
        distributed.barrier_if_alive()
        _ending_on_our_own()        # all done: a SIGTERM from here on is no stop of anything
    except KeyboardInterrupt:       # a SIGTERM or Ctrl-C while it waited (raised once the barrier ended)
        _ending_on_our_own()
        return interrupts.stopped_by()[1]
    return 0


def _end_now(code: int) -> None:
    """End the process under torchrun without tearing the gloo group down. Rank 0 hosts the
    group's store, and a rank that tears its group down (here or at interpreter exit) after rank 0
    or a peer has gone can abort ("terminate called without an active exception", exit -6), which
    hides our exit code: 1 run in 4 of a two-rank lock refusal, and now and then a run that
    succeeded. Everything prunekit writes is already closed on disk (written whole, then renamed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    from .commands.common import forget_notes
    forget_notes()                           # each command says its notes once (a sweep's runs share them)
    parser = build_parser()
    argv = _glue_dash_values(sys.argv[1:] if argv is None else list(argv), parser)
    try:
        _apply_recipe(parser, argv)          # reads --resume DIR or --recipe FILE: one machine may lack them
    except PrunekitError as err:
        return _refuse_before_joining(f"prunekit: error: {cli_message(err, _flags(parser))}")
    args = parser.parse_args(argv)
    _expand_home(args)
    try:
        _refuse_dash_paths(args, parser._command(args.command))
        _refuse_bad_paths(args)
        _refuse_bad_counts(args)
    except PrunekitError as err:
        return _refuse_before_joining(f"prunekit: error: {cli_message(err)}")     # (--resize in the CLI's words)
    try:
        if distributed.init_from_env(getattr(args, "device", None)):
            if any(distributed.early_refusals(None)):      # another rank refused: it said why
                return 2
            if not distributed.is_main_process():
                args.json = True                      # ranks other than 0 print nothing, draw no bars
                sys.stdout = open(os.devnull, "w")
        return args.func(args)
    except PrunekitError as err:
        _ending_on_our_own()
        line = f"prunekit: error: {cli_message(err, _flags(parser, args.command))}{_from_config(err, args)}"
        if isinstance(err, distributed.MachineRefusal):   # met before joining by every rank on this machine
            if os.environ.get("LOCAL_RANK", "0") == "0":
                say(line)
        else:
            distributed.print_refusal(line)     # under torchrun: once, not once per rank
        return 2
    except KeyboardInterrupt as err:
        return _interrupted(args, err)
    except BrokenPipeError:  # e.g. `prunekit info resnet50 | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RuntimeError as err:
        if not (distributed.launched_by_torchrun() and _lost_rank(err)):
            raise
        _ending_on_our_own()
        if interrupts.terminated() or (lost_peer(err) is None and not distributed.launcher_lost()
                                       and not _first_line(err).startswith(distributed.LAUNCHER_GONE)
                                       and not distributed.peer_refused()):
            raise _RankLost(_interrupted(args, err)) from None     # the launcher's SIGTERM: a peer obeyed it first
        first = _first_line(err)
        if distributed.launcher_lost() or first.startswith(distributed.LAUNCHER_GONE):   # no one waits for it
            interrupts.taken()          # the watcher's SIGINT, if on its way, raises nothing in here
            _log_stop(args, f"interrupted ({distributed.LAUNCHER_GONE})", err)
            if distributed.is_main_process():
                print(f"prunekit: interrupted ({distributed.LAUNCHER_GONE}); {_how_to_resume(args)}", file=sys.stderr)
            raise _RankLost from None
        distributed.say_reported()          # a peer SIGTERMed meanwhile names the lost rank, not this one
        _log_stop(args, f"interrupted: a rank stopped or could not be reached ({first})", err)
        if distributed.peer_refused():      # that rank printed its refusal: the one line of this run
            raise _RankLost(2) from None
        print(f"prunekit: error: rank {os.environ.get('RANK')}: a rank stopped or could not be reached "
              f"({first}); {_how_to_resume(args)}",
              file=sys.stderr)
        raise _RankLost from None
    except OSError as err:   # unwritable --out, full disk, unreadable data
        say(f"prunekit: error: {refusal_of(err)}")
        return 2


def _interrupted(args, err: BaseException) -> int:
    """A run stopped by Ctrl-C or SIGTERM (under torchrun: the launcher's, sent to every rank):
    its run.log and status say so (``_log_stop``) and one line says how to carry on, printed once
    (by rank 0 under torchrun); the exit code (``interrupts.stopped_by``). Under torchrun, a
    SIGTERM that came because another rank refused its input (torchrun stops the rest when one
    exits) adds no line: that rank's refusal is the run's one line, and the code is its 2."""
    how, code = interrupts.stopped_by()
    if distributed.launched_by_torchrun():
        _ending_on_our_own()               # a second SIGTERM does not cut this short
        if interrupts.terminated():
            distributed.say_stopped()      # before this rank leaves: its peers tell this from a lost rank
            if distributed.peer_refused():
                return 2
        failed = lost_peer(err)
        if failed is not None:             # a rank died and torchrun SIGTERMed the rest: the lost rank is the news
            distributed.say_reported()
            _log_stop(args, _lost_line(failed), err)
            print(f"prunekit: error: rank {os.environ.get('RANK')}: a rank stopped or could not be reached "
                  f"({_first_line(failed)}); {_how_to_resume(args)}", file=sys.stderr)
            return 1
        what = _lost_outside_collectives(err)
        if what is not None:               # a rank died while this one computed; torchrun SIGTERMed the rest
            _log_stop(args, f"interrupted: a rank stopped or could not be reached ({what})", err)
            print(f"prunekit: error: rank {os.environ.get('RANK')}: a rank stopped or could not be reached ({what}); "
                  f"{_how_to_resume(args)}", file=sys.stderr)
            return 1
        if isinstance(err, RuntimeError) and interrupts.sigint_here():    # its Ctrl-C, not raised yet
            how, code = "Ctrl-C", 128 + signal.SIGINT
        elif isinstance(err, RuntimeError) and not interrupts.terminated():     # its SIGTERM was ignored, not lost
            how, code = "SIGTERM", 128 + signal.SIGTERM
    _log_stop(args, f"interrupted ({how})", err)
    if distributed.is_main_process() and (not distributed.launched_by_torchrun()    # once, by rank 0 (also
                                          or os.environ.get("RANK", "0").strip() == "0"):  # before joining)
        print(f"prunekit: interrupted{'' if how == 'Ctrl-C' else f' ({how})'}; {_how_to_resume(args)}",
              file=sys.stderr)
    return code


def _lost_outside_collectives(err: BaseException) -> str | None:
    """Under torchrun, after a SIGTERM that stopped this rank outside any collective (it was computing:
    nothing failed, so ``lost_peer`` has no error to judge): the ranks known to be lost
    (``distributed.silent_peers``: silent in the store and their process ended). torchrun sends SIGTERM
    to the ranks left once one dies, and such a stop was reported as ``interrupted (SIGTERM)``, the lost
    rank unnamed. None for a stop every rank was sent (a stopped launcher: each rank says so the moment
    its SIGTERM comes, even inside a collective), a SIGTERM sent to this rank alone (its peers alive),
    a peer that only reported the loss itself, no store that answers, or any other stop. Said as what
    happened ("rank 1 was lost: ..."); the verdict is kept on ``err``, so run.log (``stop_line``) and the
    printed line agree."""
    if not (distributed.launched_by_torchrun() and isinstance(err, KeyboardInterrupt) and interrupts.terminated()):
        return None
    if distributed.launcher_lost() or any(isinstance(e, RuntimeError) and _lost_rank(e) for e in _chain(err)):
        return None
    if not hasattr(err, "prunekit_lost_ranks"):
        err.prunekit_lost_ranks = distributed.silent_peers() or []
    lost = err.prunekit_lost_ranks
    return lost_ranks_words(lost) if lost else None


def _ending_on_our_own() -> None:
    """Under torchrun, ignore SIGTERM from here on: this rank is ending, with its own exit code and
    its run folder's status, within seconds (a refusal, a lost rank). torchrun sends SIGTERM to the
    ranks left once one has exited, and without this a rank told by the store that its peer refused
    its input (exit 2) was now and then ended by it in between (exit -15), or mid-write of the
    'interrupted' status; torchrun waits 30 s before a SIGKILL."""
    ranks = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")     # (a bad value: refused as it is)
    if ranks and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _glue_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--out -weird``, ``--input-shape -1,28,28``, ``--max-memory -5G`` as ``--out=-weird`` ...,
    refused then (or taken) by the option's own check: argparse reads a word that starts with "-"
    and is not a plain number as a flag, and says only "expected one argument". Glued: a word
    after an option of the command that takes one value, starting with a single "-" and not
    itself a flag of the command (``--out -h`` still asks for help; ``--out --bogus`` stays a
    missing value, a long word being most likely a flag)."""
    command = next((word for word in argv if not word.startswith("-")), None)
    commands = parser._subparsers._group_actions[0].choices
    if command not in commands:
        return argv
    actions = [*parser._actions, *commands[command]._actions]
    flags = {flag for action in actions for flag in action.option_strings}
    one_value = {flag for action in actions if action.option_strings and action.nargs is None
                 for flag in action.option_strings}
    glued: list[str] = []
    for word in argv:
        if (glued and glued[-1] in one_value and word.startswith("-") and not word.startswith("--")
                and len(word) > 1 and word not in flags):
            glued[-1] += "=" + word
        else:
            glued.append(word)
    return glued


def _refuse_before_joining(line: str) -> int:
    """Print refusal ``line``, met before the process group was joined, and return exit code 2.

    Under torchrun the rank joins the group all the same and every rank tells the others whether
    it refused (``early_refusals``): a refusal every rank meets is printed once, by rank 0; one
    this rank meets alone (a ``--resume`` folder missing on its machine) by this rank, while the
    others stop at once instead of waiting for it until ``PRUNEKIT_DIST_TIMEOUT``.
    """
    if distributed.launched_by_torchrun():
        try:
            distributed.init_from_env()      # the backend the others join with, whatever their --device
            said_by_rank_0 = distributed.early_refusals(line)[0] == line and not distributed.is_main_process()
        except (PrunekitError, RuntimeError):   # no group to tell: say it here
            said_by_rank_0 = False
        if said_by_rank_0:
            return 2
    say(line)
    return 2


if __name__ == "__main__":
    sys.exit(main())
