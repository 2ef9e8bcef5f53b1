"""The reports of `compare` and `sweep`: a gradual run is a series of its own, apart from the one-shot
runs of its method; a sweep run again reports every run of its folder and never writes over a
report.md the user edited."""

import json
from pathlib import Path

import prunekit
from prunekit import report
from prunekit.cli import main

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
       "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256"]


def _run_folder(path: Path, mode: str, sparsity: float, accuracy: float) -> Path:
    """A finished run's folder as `compare` reads it (its metrics.json alone)."""
    path.mkdir(parents=True)
    final = {"sparsity": sparsity, "flops_kept": 1 - sparsity, "params_kept": 1 - sparsity, "accuracy": accuracy,
             "loss": 0.1, "seconds": 1.0}
    (path / "metrics.json").write_text(json.dumps({
        "status": "done", "model": "mlpnet", "method": "magnitude", "mode": mode, "request": {"sparsity": sparsity},
        "dense": {"accuracy": 96.81}, "final": final, "stages": []}))
    return path


def test_compare_keeps_a_gradual_run_apart_from_one_shot_runs_of_its_method(tmp_path, capsys, monkeypatch):
    """A gradual run was labelled "magnitude" like the one-shot runs, and plotted on one
    "magnitude" curve with them; runs.json had no mode."""
    runs = [_run_folder(tmp_path / "o5", "one-shot", 0.5, 95.0), _run_folder(tmp_path / "o9", "one-shot", 0.9, 80.0),
            _run_folder(tmp_path / "g8", "gradual", 0.8, 95.8)]
    assert main(["compare", *map(str, runs)]) == 0
    table = capsys.readouterr().out
    assert " magnitude (gradual) " in table.splitlines()[-1] and "(gradual)" not in table.splitlines()[-2]
    curves = []

    class Axes:
        def plot(self, xs, ys, *args, label, **kwargs):
            curves.append((label, len(xs)))

        def __getattr__(self, name):
            return lambda *args, **kwargs: (0, 1)

    class Plt:
        def subplots(self, **kwargs):
            return None, Axes()

        def close(self, fig):
            pass

    monkeypatch.setattr(report, "_save", lambda fig, path: None)
    monkeypatch.setattr(report, "_pyplot_or_none", lambda: (Plt(), None))
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "c")]) == 0
    assert sorted(curves) == [("magnitude", 2), ("magnitude", 2), ("magnitude (gradual)", 1),
                              ("magnitude (gradual)", 1)]        # vs sparsity, vs MACs
    rows = json.loads((tmp_path / "c" / "runs.json").read_text())
    assert [(r["name"], r["mode"]) for r in rows] == [("o5", "one-shot"), ("o9", "one-shot"), ("g8", "gradual")]
    assert "| mlpnet | magnitude (gradual) |" in (tmp_path / "c" / "report.md").read_text()


def _rows(path: Path) -> int:
    return sum(line.startswith("| [") for line in path.read_text().splitlines())


def test_a_sweep_run_again_keeps_every_finished_run_and_the_users_edited_report(tmp_path, capsys):
    """A rerun with fewer runs shrank the table to them (the other finished runs stay in the
    folder), and a rerun wrote over the report.md its user had added notes to."""
    out = tmp_path / "sweep"
    sweep = ["sweep", *MLP, "--method", "magnitude", "--no-bn-recalibration", "--out", str(out)]
    assert main([*sweep, "--flops", "0.5", "0.3"]) == 0
    assert _rows(out / "report.md") == 2
    capsys.readouterr()
    assert main([*sweep, "--flops", "0.5"]) == 0                 # one of the two again: both reported
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {out / 'report.md'}"
    assert _rows(out / "report.md") == 2 and len(json.loads((out / "runs.json").read_text())) == 2
    assert not (out / "report.new.md").exists()

    with (out / "report.md").open("a") as notes:
        notes.write("MY NOTES: keep this\n")
    edited = (out / "report.md").read_bytes()
    assert main([*sweep, "--flops", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(out / "report.new.md")
    assert (out / "report.md").read_bytes() == edited and _rows(out / "report.new.md") == 2
    assert main([*sweep, "--flops", "0.5"]) == 0                  # again: its own report.new.md is rewritten
    assert capsys.readouterr().out.splitlines()[-1].endswith("was edited since prunekit wrote it: kept as it is)")
    assert (out / "report.md").read_bytes() == edited

    (out / "report.md").unlink()                                   # the user took their report away
    assert main([*sweep, "--flops", "0.5"]) == 0
    capsys.readouterr()
    assert _rows(out / "report.md") == 2 and not (out / "report.new.md").exists()


def test_an_edited_report_beside_a_report_new_of_the_users_is_refused_in_one_line(tmp_path, capsys):
    runs = [str(_run_folder(tmp_path / "o5", "one-shot", 0.5, 95.0))]
    out = tmp_path / "c"
    assert main(["compare", *runs, "--out", str(out)]) == 0
    (out / "report.md").write_text("mine\n")
    (out / "report.new.md").write_text("mine too\n")
    capsys.readouterr()
    assert main(["compare", *runs, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was edited since prunekit wrote it" in err, err
    assert (out / "report.md").read_text() == "mine\n" and (out / "report.new.md").read_text() == "mine too\n"


def test_compare_lists_each_snapshot_of_a_taper_run_as_a_row_of_its_budget(tmp_path, capsys):
    """A taper run made with --snapshots saves a model per budget (snapshot-<budget>/ with its
    result.json), but compare listed only the final model: each snapshot is now a row asked its
    own budget; snapshot folders with no result.json are said not to be compared."""
    run = _run_folder(tmp_path / "taper", "structured", 0.0, 90.0)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(method="taper", request={"flops": "0.3"}, final={**metrics["final"], "flops_kept": 0.3})
    (run / "metrics.json").write_text(json.dumps(metrics))
    for share, accuracy in ((0.6, 94.5), (0.45, 92.25)):
        (run / f"snapshot-{share:g}").mkdir()
        (run / f"snapshot-{share:g}" / "result.json").write_text(json.dumps({
            "model": "mlpnet", "method": "taper", "request": {"flops": str(share)}, "sparsity": None,
            "flops_kept": share - 0.001, "params_kept": share, "accuracy": accuracy, "dense_accuracy": 96.81,
            "loss": 0.2, "seconds": 5.0}))
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["name"], r["request"], r["accuracy"]) for r in rows] == [
        ("taper", {"flops": "0.3"}, 90.0), ("taper/snapshot-0.6", {"flops": "0.6"}, 94.5),
        ("taper/snapshot-0.45", {"flops": "0.45"}, 92.25)]
    written = (tmp_path / "cmp" / "report.md").read_text()
    assert "| flops 0.6 |" in written and "94.50%" in written and "snapshot-0.45/result.json" in written
    assert main(["compare", str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[3].split()[:3] == ["taper/snapshot-0.6", "taper", "flops"] and "59.90%" in table[3]
    (run / "snapshot-0.45" / "result.json").unlink()        # a snapshot folder with no record
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp2")]) == 0
    out = capsys.readouterr().out
    assert "taper/snapshot-0.45" not in out and "note: taper's snapshot-0.45 has no result.json: snapshots not compared" in out
    assert "snapshot-0.45 has no result.json" in (tmp_path / "cmp2" / "report.md").read_text()
