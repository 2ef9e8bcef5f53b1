"""Reports of run folders: ``report.md`` with tables and PNG plots (matplotlib, Agg backend).

A run's report shows its stages (budget asked, sparsity and MACs reached, loss, accuracy), the
accuracy against the budget reached, the accuracy per stage and the per-layer density (kept
share of weights and of MACs per layer, from the CostModel, so it holds for shrunk models too).
A comparison report (``prunekit sweep``/``compare``) tabulates runs and draws accuracy against
sparsity and against MACs kept, one curve per model and method.

Everything is read from ``metrics.json``; the plots need matplotlib (``python -m pip install
matplotlib`` with the interpreter that runs prunekit, or the ``report`` extra). Without it the markdown is still written, and ``MissingPlotting`` says why
it has no plots.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import textwrap
import urllib.parse
from pathlib import Path

from .budget import budget_text
from .errors import PrunekitError, pip_install
from .runs import METRICS, RUN_PLOTS, RunFolder, is_run, shown_status
from .saving import atomic_write_bytes


class MissingPlotting(PrunekitError):
    """matplotlib is not installed: reports are written without plots."""


def _writable_config_dir() -> None:
    """Point MPLCONFIGDIR at a temporary folder (removed at exit) when it is unset and the folders
    matplotlib would use by default cannot be written (HOME read-only or missing): matplotlib would
    do the same, but say so on stderr in two lines of its own."""
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    home = os.path.expanduser("~")
    if sys.platform.startswith(("linux", "freebsd")):
        folders = [os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"), "matplotlib"),
                   os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "matplotlib")]
    else:
        folders = [os.path.join(home, ".matplotlib")]
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            break
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            break
    else:
        return
    temporary = tempfile.mkdtemp(prefix="prunekit-matplotlib-")
    atexit.register(shutil.rmtree, temporary, True)
    os.environ["MPLCONFIGDIR"] = temporary


def _pyplot():
    _writable_config_dir()
    try:
        import matplotlib
    except ImportError:
        extra = pip_install("'prunekit[report]'")
        raise MissingPlotting(f"plots need matplotlib: {pip_install('matplotlib')} (or prunekit's extra: {extra}); "
                              "report.md was written without them") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


NO_PLOTS = f"No plots: they need matplotlib (`{pip_install('matplotlib')}`)."


def _pyplot_or_none() -> tuple:
    """(pyplot, None), or (None, the ``MissingPlotting`` to raise once the markdown is written)."""
    try:
        return _pyplot(), None
    except MissingPlotting as err:
        return None, err


def _save(fig, path: Path) -> None:
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _num(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def seconds_text(x) -> str:
    """A run's pruning seconds (its record's ``seconds``) as the comparison tables and
    ``Result.summary`` show them: two decimals under 1 s, one under 100 s, none above (a gradual
    MLPNet run's 0.33 s showed as "0"), the range judged on the rounded value (0.996 is "1.0",
    not "1.00"; 99.96 is "100", not "100.0"); "–" for None."""
    if x is None:
        return "–"
    for decimals, below in ((2, 1), (1, 100)):
        text = f"{x:.{decimals}f}"
        if float(text) < below:
            return text
    return f"{x:.0f}"


def _acc(x) -> str:
    return "–" if x is None else f"{x:.2f}%"


# --- one run ---------------------------------------------------------------------------------

def stage_rows(metrics: dict) -> list[dict]:
    """Dense, every stage, final: label, asked shares, reached shares, loss, accuracy, seconds."""
    p = metrics.get("prunable_weights")
    dense_macs, fixed = metrics.get("dense_macs"), metrics.get("fixed_macs", 0)
    dense = metrics.get("dense", {})
    rows = [{"label": "dense", "asked_sparsity": None, "asked_flops": None, "sparsity": dense.get("sparsity"),
             "flops_kept": dense.get("flops_kept"), "loss": dense.get("loss"),
             "accuracy": dense.get("accuracy"), "seconds": None}]
    for s in metrics.get("stages", []):
        # a stage of a multi-stage method, an event of a gradual run or a phase of a channel method;
        # max_macs counts the whole model's MACs, the fixed ones included
        label = (str(s["stage"]) if "stage" in s else f"event {s['event']}" if "event" in s
                 else " ".join(str(s[k]) for k in ("phase", "flops", "epoch") if s.get(k)))
        macs = s.get("max_macs")
        if macs is not None and "stage" in s and fixed and s.get("macs") is not None \
                and s.get("model_macs") == s["macs"] + fixed:
            macs += fixed        # recorded by an older prunekit: the prunable weights' MACs only
        rows.append({"label": label, "asked_sparsity": _asked_sparsity(s.get("max_nonzeros"), p),
                     "asked_flops": macs / dense_macs if macs is not None and dense_macs else None,
                     "sparsity": s.get("sparsity"), "flops_kept": s.get("flops_kept"), "loss": s.get("loss"),
                     "accuracy": s.get("accuracy"), "seconds": s.get("seconds"),
                     **({"finetune_loss": s["finetune_loss"]} if "finetune_loss" in s else {})})
    final = metrics.get("final")
    if final:
        budget = metrics.get("budget", {})
        rows.append({"label": "final" + ("\n(BN recal.)" if final.get("bn_recalibrated") else ""),
                     "asked_sparsity": _asked_sparsity(budget.get("max_nonzeros"), p),
                     "asked_flops": budget["max_macs"] / dense_macs
                     if budget.get("max_macs") is not None and dense_macs else None,
                     "sparsity": final.get("sparsity"), "flops_kept": final.get("flops_kept"),
                     "loss": final.get("loss"), "accuracy": final.get("accuracy"), "seconds": final.get("seconds")})
    return rows


def _asked_sparsity(max_nonzeros, p) -> float | None:
    """The sparsity a count budget asks for; None when there is no count budget (all may stay)."""
    return 1 - max_nonzeros / p if p and max_nonzeros is not None and max_nonzeros < p else None


def _gradual_text(g: dict) -> str:
    """A gradual run's settings, in one line of the report's header."""
    distill = (f", distillation {g['finetune_distill']:g} at temperature {g['finetune_temperature']:g}"
               if g.get("finetune_distill") else ", no distillation")
    epochs = lambda n: f"{n} epoch{'' if n == 1 else 's'}"      # noqa: E731
    events = (f"{g['events']} events ({g['event_schedule']} schedule), fine-tuned {epochs(g['epochs_per_event'])} "
              f"after each but the last, {epochs(g['final_epochs'])} after the last" if g["events"] > 1
              else f"1 event, fine-tuned {epochs(g['final_epochs'])} after it")
    return f"Gradual pruning: {events}, lr {g['lr']:g} (a cosine cycle per event){distill}."


def _quality(record: dict) -> str:
    """The headline's measure of the model before → after: accuracy, else (a user's loss: no
    accuracy) the evaluation loss, else that there was no evaluation."""
    if record.get("accuracy") is not None or record.get("dense_accuracy") is not None:
        return f"Accuracy {_acc(record.get('dense_accuracy'))} → **{_acc(record.get('accuracy'))}**"
    if record.get("loss") is not None or record.get("dense_loss") is not None:
        name = f" ({record['loss_function']})" if record.get("loss_function") else ""
        return f"Loss{name} {_num(record.get('dense_loss'), '.4g')} → **{_num(record.get('loss'), '.4g')}**"
    return "No evaluation data (no loss or accuracy)"


def write_run_report(path: str | Path) -> Path:
    """Write ``report.md`` (and ``plots/*.png``) of the run folder at ``path``."""
    folder = RunFolder(path)
    m = folder.read_metrics()
    rows = stage_rows(m)
    final = m.get("final", {})
    lines = [f"# {m.get('model')} pruned with {m.get('method')}" + (" (gradual)" if m.get("mode") == "gradual" else ""),
             "",
             f"Status: **{shown_status(folder, m)}**. Budget asked: "
             + ", ".join(f"{k} {v}" for k, v in m.get("request", {}).items() if v is not None) + ".", ""]
    gradual = final.get("gradual_options")
    if gradual:
        lines += [_gradual_text(gradual), ""]
    if final:
        lines += [f"{_quality(final)}, sparsity {_pct(final.get('sparsity'))}, "
                  f"MACs kept {_pct(final.get('flops_kept'))} "
                  f"({final.get('macs', 0):,} of {final.get('dense_macs', 0):,} per example), "
                  f"parameters kept {_pct(final.get('params_kept'))}.", ""]
    finetuned = any("finetune_loss" in r for r in rows)     # events, fine-tune phases: their training loss apart
    lines += ["| stage | sparsity asked | sparsity | MACs kept asked | MACs kept | loss | accuracy | "
              + ("fine-tune loss | " if finetuned else "") + "seconds |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if finetuned else "")]
    for r in rows:
        label = r["label"].replace("\n", " ")
        lines.append(f"| {label} | {_pct(r['asked_sparsity'])} | {_pct(r['sparsity'])} | "
                     f"{_pct(r['asked_flops'])} | {_pct(r['flops_kept'])} | "
                     f"{_num(r['loss'], '.4f')} | {_acc(r['accuracy'])} | "
                     + (f"{_num(r.get('finetune_loss'), '.4f')} | " if finetuned else "")
                     + f"{_num(r['seconds'], '.1f')} |")
    lines += ["", "Loss and accuracy are on the evaluation split; a stage's row is measured right after "
              "the stage" + (" (before the final BatchNorm recalibration)." if final.get("bn_recalibrated") else ".")
              + (" Fine-tune loss: the mean training loss of the event's last fine-tune epoch (a phase's: of "
                 "its epoch)." if finetuned else ""), ""]
    plots = RUN_PLOTS
    plt, missing = _pyplot_or_none()
    lines += ([f"![{name[:-4].replace('_', ' ')}](plots/{name})" for name in plots] if plt is not None
              else [NO_PLOTS]) + [""]
    layers = m.get("layers", [])
    if layers:
        lines += ["| layer | weights kept | MACs kept |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['params']:,} / {r['dense_params']:,} ({_pct(r['params_kept'])}) | "
                  f"{r['macs']:,} / {r['dense_macs']:,} ({_pct(r['macs_kept'])}) |" for r in layers]
    atomic_write_bytes(folder.report_path, ("\n".join(lines) + "\n").encode())
    if missing is not None:
        raise missing
    (folder.path / "plots").mkdir(exist_ok=True)
    _plot_run_budget(plt, rows, folder.path / "plots" / plots[0])
    _plot_run_stages(plt, rows, folder.path / "plots" / plots[1])
    _plot_layers(plt, layers, folder.path / "plots" / plots[2])
    return folder.report_path


def point_labels(pts: list[tuple], close: float = 0.02) -> list[tuple]:
    """(x, y, label) per labelled place: points within ``close`` of the plot's span of each other in
    both x and y share one label, their labels joined ("event 3 = final" where they are the same
    point, "/" where only near), instead of labels printed over each other."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    dx, dy = close * ((max(xs) - min(xs)) or 1.0), close * ((max(ys) - min(ys)) or 1.0)
    groups: list[list[tuple]] = []
    for point in pts:
        group = next((g for g in groups if abs(g[0][0] - point[0]) <= dx and abs(g[0][1] - point[1]) <= dy), None)
        if group is None:
            groups.append([point])
        else:
            group.append(point)
    return [(g[0][0], g[0][1], (" = " if all(p[:2] == g[0][:2] for p in g) else " / ").join(
        p[2].replace("\n", " ") for p in g)) for g in groups]


def _label_point(ax, x: float, y: float, text: str) -> None:
    """Write ``text`` by point (x, y) (data units) inside ``ax``: wrapped to lines of at most 22
    characters (8 lines at most), set left of a point in the axes' right half and below one in its top half."""
    ax.get_xlim(), ax.get_ylim()             # the limits the points gave, before placing by them
    fx, fy = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))
    right, top = fx > 0.5, fy > 0.5
    ax.annotate(textwrap.fill(text, 22, max_lines=8, placeholder=" ..."), (x, y), textcoords="offset points",
                xytext=(-4 if right else 4, -4 if top else 4), ha="right" if right else "left",
                va="top" if top else "bottom", fontsize=8)


def _plot_run_budget(plt, rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    placed = []
    for ax, key, label in ((axes[0], "sparsity", "sparsity reached (%)"),
                           (axes[1], "flops_kept", "MACs kept (% of dense)")):
        pts = [(100 * r[key], r["accuracy"], r["label"]) for r in rows
               if r[key] is not None and r["accuracy"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
            placed += [(ax, *point) for point in point_labels(pts)]
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[1].invert_xaxis()       # left to right: more pruning
    for ax, x, y, text in placed:            # once both plots set the shared y limits
        _label_point(ax, x, y, text)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle("accuracy against the budget reached (dense, each stage, final)")
    _save(fig, path)
    plt.close(fig)


def _plot_run_stages(plt, rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [r["label"] for r in rows]
    x = range(len(rows))
    acc = [r["accuracy"] if r["accuracy"] is not None else float("nan") for r in rows]
    ax.plot(x, acc, "o-", color="C0", label="accuracy")
    ax.set_ylabel("accuracy (%)", color="C0")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("stage")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    for key, color, name in (("sparsity", "C1", "sparsity"), ("flops_kept", "C2", "MACs kept")):
        vals = [100 * r[key] if r[key] is not None else float("nan") for r in rows]
        twin.plot(x, vals, "s--", color=color, alpha=0.7, label=name)
    twin.set_ylabel("sparsity / MACs kept (%)")
    twin.set_ylim(0, 100)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title("accuracy per stage")
    _save(fig, path)
    plt.close(fig)


def _plot_layers(plt, layers: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(layers) + 1)))
    y = list(range(len(layers)))
    ax.barh([i - 0.2 for i in y], [100 * r["params_kept"] for r in layers], height=0.4, label="weights kept")
    ax.barh([i + 0.2 for i in y], [100 * r["macs_kept"] for r in layers], height=0.4, label="MACs kept")
    ax.set_yticks(y, [r["name"] or "(model)" for r in layers], fontsize=8)
    ax.invert_yaxis()            # first layer on top
    ax.set_xlim(0, 100)
    ax.set_xlabel("kept share of the layer's dense count (%)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("per-layer density", pad=22)
    _save(fig, path)
    plt.close(fig)


# --- several runs ----------------------------------------------------------------------------

def find_runs(paths) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder, or a folder holding run folders."""
    found = []
    for path in map(Path, paths):
        if is_run(path):
            found.append(path)
            continue
        if not path.exists():
            raise PrunekitError(f"{path} does not exist (check the path)")
        inside = sorted(p.parent for p in path.glob(f"*/{METRICS}")) if path.is_dir() else []
        if not inside:
            raise PrunekitError(f"{path} is not a run folder (no {METRICS}) and holds none: "
                                "pass folders written by `prunekit prune --out` or `prunekit sweep`")
        found += inside
    resolved = [path.resolve() for path in found]
    twice = next((path for path, real in zip(found, resolved) if resolved.count(real) > 1), None)
    if twice is not None:
        raise PrunekitError(f"run folder {twice} is named twice (itself, or inside a sweep folder also named): "
                            "name each run once")
    return found


def collect(folders) -> list[dict]:
    """One summary row per run folder, and one per snapshot a taper run with ``--snapshots`` saved
    (``snapshot-<budget>/result.json``), after its run's, named ``<run>/snapshot-<budget>`` and
    asked its own budget; a run's snapshot folders without a result.json are named in its row's
    ``snapshots_not_compared`` (``notes`` words them)."""
    rows = []
    for folder in map(RunFolder, folders):
        m = folder.read_metrics()
        if not isinstance(m.get("method"), str):          # e.g. another tool's metrics.json
            raise PrunekitError(f"{folder.metrics_path} is not the metrics of a prunekit run (no method): pass "
                                "only folders written by `prunekit prune --out` or `prunekit sweep`")
        final = m.get("final") or {}
        row = {"run": str(folder.path), "name": folder.path.name, "model": m.get("model"),
               "method": m.get("method"), "mode": m.get("mode"), "request": m.get("request", {}),
               "status": shown_status(folder, m),
               "sparsity": final.get("sparsity"), "flops_kept": final.get("flops_kept"),
               "params_kept": final.get("params_kept"),
               "dense_accuracy": m.get("dense", {}).get("accuracy"), "accuracy": final.get("accuracy"),
               "loss": final.get("loss"), "seconds": final.get("seconds"),
               "stages": len(m.get("stages", []))}
        snapshots, missing = _snapshot_rows(folder.path, row)
        if missing:
            row["snapshots_not_compared"] = missing
        rows += [row, *snapshots]
    return rows


def _snapshot_share(path: Path) -> float:
    """The budget in a snapshot folder's name (``snapshot-0.45``: 0.45; -1 where it names none)."""
    try:
        return float(path.name.removeprefix("snapshot-"))
    except ValueError:
        return -1.0


def _snapshot_rows(run: Path, parent: dict) -> tuple[list[dict], list[str]]:
    """The rows of the snapshots in ``run`` (largest budget first) and the names of its snapshot
    folders that have no readable result.json (not compared)."""
    rows, missing = [], []
    for path in sorted((p for p in run.glob("snapshot-*") if p.is_dir()), key=_snapshot_share, reverse=True):
        try:
            result = json.loads((path / "result.json").read_text())
        except (OSError, ValueError):
            result = None
        if not isinstance(result, dict) or not isinstance(result.get("method"), str):
            missing.append(path.name)
            continue
        rows.append({**parent, "run": str(path), "name": f"{parent['name']}/{path.name}", "snapshot_of": parent["run"],
                     "model": result.get("model", parent["model"]), "request": result.get("request") or {},
                     **{key: result.get(key) for key in ("sparsity", "flops_kept", "params_kept", "accuracy", "loss",
                                                         "seconds")},
                     "dense_accuracy": result.get("dense_accuracy", parent["dense_accuracy"]), "stages": 0})
    return rows, missing


def notes(rows: list[dict]) -> list[str]:
    """Lines under a table of ``rows``: the snapshots of a run that are not in it, and why."""
    return [f"note: {r['name']}'s {', '.join(r['snapshots_not_compared'])} "
            f"{'has' if len(r['snapshots_not_compared']) == 1 else 'have'} no result.json: snapshots not compared"
            for r in rows if r.get("snapshots_not_compared")]


def _asked(row: dict) -> str:
    return budget_text(row["request"])


def method_label(row: dict) -> str:
    """The method of a row as tables and plots show it: a gradual run's is "magnitude (gradual)",
    another series than the method's one-shot (or multi-stage) runs, which prune at once."""
    return f"{row['method']} (gradual)" if row.get("mode") == "gradual" else row["method"]


def shows_params(rows: list[dict]) -> bool:
    """Whether a table of ``rows`` has a params-kept column: where a run asked a params budget
    (``--params``), the share of parameters kept is what it is to be read by."""
    return any((r.get("request") or {}).get("params") is not None for r in rows)


def table_lines(rows: list[dict]) -> list[str]:
    """A plain-text table of ``collect``'s rows."""
    # the text columns as wide as their longest entry: a cut name or budget ("flops 0.") says nothing
    run = max([3, *(len(r["name"]) for r in rows)])
    method = max([6, *(len(method_label(r)) for r in rows)])
    asked = max([5, *(len(_asked(r)) for r in rows)])
    # runs of several models: a model column
    shown = (len({str(r.get("model")) for r in rows}) > 1) * max([5, *(len(str(r.get("model"))) for r in rows)])
    model = lambda r: f"{str(r.get('model')):<{shown}} " if shown else ""     # noqa: E731
    params = shows_params(rows)
    kept = lambda r: f"{_pct(r.get('params_kept')):>11} " if params else ""     # noqa: E731
    head = (f"{'run':<{run}} {model({'model': 'model'})}{'method':<{method}} {'asked':<{asked}} {'sparsity':>9} "
            f"{'MACs kept':>9} {'params kept ' if params else ''}{'dense':>7} {'acc':>7} {'prune s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<{run}} {model(r)}{method_label(r):<{method}} {_asked(r):<{asked}} "
                     f"{_pct(r['sparsity']):>9} "
                     f"{_pct(r['flops_kept']):>9} {kept(r)}{_acc(r['dense_accuracy']):>7} {_acc(r['accuracy']):>7} "
                     f"{seconds_text(r['seconds']):>7}"     # pruning (fine-tunes too), not evaluations
                     # "running": a process holds the folder, or (no lock to tell by, another machine's
                     # lock file) a kill left it so; a killed run nobody holds is "interrupted" (shown_status)
                     + ("" if r["status"] == "done" else
                        "  (not finished)" if r["status"] == "running" else f"  ({r['status']})"))
    return lines + notes(rows)


COMPARISON_FILES = ("report.md", "runs.json", "plots/accuracy_vs_sparsity.png", "plots/accuracy_vs_macs.png")


def check_report_folder(out: str | Path, runs: list | None = None, planned: list | None = None) -> None:
    """Refuse (``PrunekitError``) an ``--out`` for ``write_comparison_report`` where it would
    overwrite what it did not write: a file, a run folder of ``prunekit prune``, or a folder with
    a report.md, runs.json or plot of its own. An earlier comparison's folder is fine, and a
    sweep's when the runs compared (``runs``: their folders) are all its own. ``planned``: the run
    folders of the sweep writing its report there; once one of them exists the folder is that
    sweep's, and its report files (a report.md whose runs.json a kill left unwritten) are its own."""
    if not str(out).strip():
        raise PrunekitError("--out is an empty path: name a folder for the report")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out} is a file: pass a folder for the report")
    if (out / METRICS).exists():
        raise PrunekitError(f"--out {out} is the run folder of a `prunekit prune`: pass another folder for the report")
    from .folders import kind
    written_as = kind(out)
    if written_as in ("training run", "export"):
        raise PrunekitError(f"--out {out} is the folder of a prunekit {written_as}: pass another folder for the report")
    sweeps_own = False         # a sweep's report of its own runs: its files are the sweep's to write again
    if runs is not None and out.is_dir():
        own = {p.resolve() for p in out.iterdir() if (p / METRICS).exists()}
        if own and not {Path(r).resolve() for r in runs} <= own:
            raise PrunekitError(f"--out {out} is a sweep's folder, whose report is of its own runs: pass another "
                                "folder for this comparison")
        sweeps_own = bool(own)
    if planned is not None and out.is_dir():
        own = {p.resolve() for p in out.iterdir() if (p / METRICS).exists()}
        sweeps_own = bool(own) and own <= {Path(r).resolve() for r in planned}
    present = [name for name in COMPARISON_FILES if (out / name).exists()]
    if present and not sweeps_own and not _is_comparison_rows(out / "runs.json"):
        raise PrunekitError(f"--out {out} holds a {present[0]} that prunekit did not write: pass a new folder "
                            "(nothing in it was changed)")


def _is_comparison_rows(path: Path) -> bool:
    """Whether ``path`` is the runs.json of an earlier ``write_comparison_report``."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(rows, list) and bool(rows)
            and all(isinstance(r, dict) and {"run", "method", "accuracy"} <= r.keys() for r in rows))


# The hashes of the report files prunekit last wrote in a sweep's or comparison's folder: a
# report.md that is none of them was edited by its user, and is never written over.
REPORT_STATE = ".prunekit-report.json"
EDITED_REPORT = "report.new.md"       # the report, where the user edited report.md
# The report state's key that marks a sweep's folder (a comparison's has none): the names of the
# run folders its sweeps planned in it (``mark_report_folder``)
SWEEP_RUNS = "sweep_runs"


def mark_report_folder(out: str | Path, runs: list[str] | tuple[str, ...] = ()) -> None:
    """Mark ``out`` as a sweep's folder (``folders.kind``) before its first run, and record the
    names of its run folders (``runs``: the folder names in ``out`` of every run it plans, made or
    not) in its report state under ``SWEEP_RUNS``, added to those of earlier sweeps into ``out``.
    A sweep killed before its report is then known as one, and ``save_model`` refuses to write
    inside those run folders (``folders.inside_a_sweeps_run``), where its later runs go; the rest
    of ``out`` (a folder of the user's, say) stays theirs. A report.md there without a state (an
    older version's, taken as prunekit's) is recorded as prunekit's, as it was taken."""
    out = Path(out)
    hashes = _report_hashes(out)
    state = dict(hashes) if hashes is not None else {}
    if hashes is None and (out / "report.md").is_file():
        try:
            state["report.md"] = [_sha256((out / "report.md").read_bytes())]
        except OSError:
            return          # an unreadable report.md: the folder is left as it is
    known = [name for name in state.get(SWEEP_RUNS) or [] if isinstance(name, str)]
    names = known + [name for name in runs if name not in known]
    if hashes is not None and hashes.get(SWEEP_RUNS) == names:
        return
    atomic_write_bytes(out / REPORT_STATE, json.dumps({**state, SWEEP_RUNS: names}).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _report_hashes(out: Path) -> dict | None:
    """{report file name: [hashes of what prunekit wrote]}; None when no state was kept (a folder
    written before prunekit kept it: its report.md is taken as prunekit's, as it was then)."""
    try:
        state = json.loads((out / REPORT_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _as_written(path: Path, hashes: dict | None) -> bool:
    """Whether report file ``path`` is absent or as prunekit last wrote it."""
    if not path.exists():
        return True
    if hashes is None:
        return path.name == "report.md"
    known = hashes.get(path.name)
    try:
        return isinstance(known, list) and _sha256(path.read_bytes()) in known
    except OSError:
        return False


def report_temporaries(out: str | Path) -> list[Path]:
    """The temporaries (``.NAME.XXXXXXXX.tmp``) that killed atomic writes of a sweep's or
    comparison's own report files left in folder ``out``: of report.md, report.new.md, runs.json,
    its hash state, and its plots in ``plots/``. A file of the user's (another name) is none of them."""
    from .run_folder import _temporaries
    out = Path(out)
    own = {"report.md", EDITED_REPORT, "runs.json", REPORT_STATE}
    plots = {Path(name).name for name in COMPARISON_FILES if name.startswith("plots/")}
    return _temporaries(out, own.__contains__) + _temporaries(out / "plots", plots.__contains__)


def remove_report_temporaries(out: str | Path) -> None:
    """Remove ``report_temporaries(out)``: called by a process holding ``out``'s lock (a sweep,
    ``compare --out``), so no other process is writing them."""
    for temp in report_temporaries(out):
        temp.unlink(missing_ok=True)


def comparison_report_path(out: str | Path) -> Path:
    """Where ``write_comparison_report`` writes (wrote) the report of folder ``out``: report.md,
    or report.new.md when the user edited the report.md prunekit wrote there (kept as it is)."""
    out = Path(out)
    return out / "report.md" if _as_written(out / "report.md", _report_hashes(out)) else out / EDITED_REPORT


def write_comparison_report(out: str | Path, rows: list[dict], title: str = "Comparison",
                            planned: list | None = None) -> Path:
    """``out/report.md`` with the runs' table and accuracy-vs-sparsity / -vs-MACs plots (and
    ``runs.json``: the rows); refuses an ``out`` that ``check_report_folder`` refuses (``planned``:
    a sweep's run folders). A report.md the user edited since prunekit wrote it (its hash is kept in
    ``REPORT_STATE``) stays as it is: the report goes to report.new.md (``comparison_report_path``)."""
    check_report_folder(out, planned=planned)
    out = Path(out)
    remove_report_temporaries(out)       # a killed report's: the caller holds the folder's lock
    hashes = _report_hashes(out)
    target = comparison_report_path(out)
    if not _as_written(target, hashes):
        raise PrunekitError(f"{out / 'report.md'} was edited since prunekit wrote it, and {target} is not prunekit's "
                            f"either: move one of them out of {out} and run again (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    params = shows_params(rows)          # a params budget asked: the params kept beside the MACs kept
    lines = [f"# {title}", "", "| run | model | method | asked | sparsity | MACs kept | "
             + ("params kept | " if params else "") + "dense acc. | accuracy | pruning s |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if params else "")]
    for r in rows:
        page = Path(r["run"]) / ("result.json" if r.get("snapshot_of") else "report.md")   # a snapshot has no report
        link = urllib.parse.quote(os.path.relpath(page, out))   # spaces break a link
        lines.append(f"| [{r['name']}]({link}) | {r['model']} | {method_label(r)} | {_asked(r)} | {_pct(r['sparsity'])} | "
                     f"{_pct(r['flops_kept'])} | " + (f"{_pct(r.get('params_kept'))} | " if params else "")
                     + f"{_acc(r['dense_accuracy'])} | {_acc(r['accuracy'])} | {seconds_text(r['seconds'])} |")
    lines += [""] + notes(rows) if notes(rows) else []
    plt, missing = _pyplot_or_none()
    lines += (["", "![accuracy vs sparsity](plots/accuracy_vs_sparsity.png)",
               "![accuracy vs MACs](plots/accuracy_vs_macs.png)", ""] if plt is not None else ["", NO_PLOTS, ""])
    # runs.json first: it marks the folder as ours, so a kill between the two leaves one the same
    # command may finish (a report.md alone reads as a user's file, which is never written over)
    atomic_write_bytes(out / "runs.json", (json.dumps(rows, indent=2) + "\n").encode())
    text = ("\n".join(lines) + "\n").encode()
    before = [h for h in ((hashes or {}).get(target.name) or []) if isinstance(h, str)][-1:]
    # the new hash is kept before the file is written, the old one until after: a kill between them
    # leaves a report.md the state knows, never one taken for the user's
    kept = {k: v for k, v in (hashes or {}).items() if k in ("report.md", EDITED_REPORT, SWEEP_RUNS)}
    atomic_write_bytes(out / REPORT_STATE, json.dumps({**kept, target.name: before + [_sha256(text)]}).encode())
    atomic_write_bytes(target, text)
    if target.name == "report.md" and (out / EDITED_REPORT).exists() and _as_written(out / EDITED_REPORT, hashes):
        (out / EDITED_REPORT).unlink()           # the user's report.md went: the report is report.md again
        kept.pop(EDITED_REPORT, None)
    atomic_write_bytes(out / REPORT_STATE, json.dumps({**kept, target.name: [_sha256(text)]}).encode())
    if missing is not None:
        raise missing
    (out / "plots").mkdir(exist_ok=True)
    for key, label, name in (("sparsity", "sparsity (% of prunable weights removed)", "accuracy_vs_sparsity.png"),
                             ("flops_kept", "MACs kept (% of dense)", "accuracy_vs_macs.png")):
        _plot_curves(plt, rows, key, label, out / "plots" / name)
    return target


def _dense_key(row: dict) -> float | None:
    """The dense model's accuracy to two decimals: runs that share it started from one model."""
    return None if row["dense_accuracy"] is None else round(row["dense_accuracy"], 2)


def _plot_curves(plt, rows: list[dict], key: str, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # one curve per method (its gradual runs apart) and starting point: runs of one model from other
    # checkpoints (another dense accuracy) are other curves, not one line through both
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r[key] is not None and r["accuracy"] is not None:
            groups.setdefault((r["model"], _dense_key(r), method_label(r)), []).append(r)
    starts = {(model, start) for model, start, _ in groups}
    models = {model for model, _ in starts}
    dense = {}
    for i, ((model, start, method), runs) in enumerate(sorted(groups.items(), key=lambda g: str(g[0]))):
        runs.sort(key=lambda r: r[key])
        name = f"{model} {method}" if len(models) > 1 else method
        if len(starts) > len(models) and start is not None:
            name += f" (dense {start:.2f}%)"
        ax.plot([100 * r[key] for r in runs], [r["accuracy"] for r in runs], "o-", color=f"C{i}", label=name)
        if start is not None:
            dense[(model, start)] = start
    if dense:                    # room above the dense line for its label
        low, high = ax.get_ylim()
        ax.set_ylim(low, max(high, max(dense.values()) + 0.08 * (high - low)))
    for (model, _), acc in dense.items():
        ax.axhline(acc, color="grey", ls="--", lw=1)
        ax.annotate(f"dense {model} {acc:.2f}%", (0.01, acc), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="grey")
    if key == "flops_kept":
        ax.invert_xaxis()        # left to right: more pruning
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    ax.set_title(f"accuracy against {'MACs kept' if key == 'flops_kept' else 'sparsity'}")
    _save(fig, path)
    plt.close(fig)
