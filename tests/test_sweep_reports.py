"""The reports of `compare` and `sweep`: a gradual run is a series of its own, apart from the one-shot
runs of its method; a sweep run again reports every run of its folder and never writes over a
report.md the user edited."""

import json
from pathlib import Path

import pytest

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
