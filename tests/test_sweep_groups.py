"""A sweep's channel-method runs share one channel-group search (find_groups and its numeric check,
about 1 s per check on ResNet-56, once for each run's checks and again for its run); their results
are byte-equal to the same runs made one by one."""

import json
from pathlib import Path

import torch

import prunekit
import prunekit.structured.pipeline as pipeline
from prunekit.cli import main

torch.set_num_threads(1)

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
       "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256"]
ONE = ["--method", "autobot", "--gate-batches", "3", "--seed", "1"]


def _counted(monkeypatch) -> list:
    calls = []
    searched = pipeline.find_groups

    def counting(*args, **kwargs):
        calls.append(1)
        return searched(*args, **kwargs)
    monkeypatch.setattr(pipeline, "find_groups", counting)
    return calls


def _result(folder: Path) -> dict:
    """A run's metrics less what differs between any two runs (timings, memory, paths, dates)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    # whole keys (a substring filter, "run", dropped prunable_weights): any *_seconds, the peak memory, the config
    # text (its paths), and the names of dates, hosts and versions should a record hold them
    varies = {"seconds", "peak_rss_mb", "time", "date", "started", "finished", "path", "run", "out", "host", "pid",
              "version", "config"}

    def kept(value, key=""):
        if isinstance(value, dict):        # a request's budget kinds not asked: None alone, or left out (a sweep's)
            return {k: kept(v, k) for k, v in value.items() if not (k in varies or k.endswith("_seconds"))
                    and not (key == "request" and v is None)}
        if isinstance(value, list):
            return [kept(v) for v in value]
        return value
    return kept(metrics)


def test_a_sweeps_channel_runs_search_the_groups_once_and_equal_separate_runs(tmp_path, capsys, monkeypatch):
    calls = _counted(monkeypatch)
    assert main(["sweep", *MLP, *ONE, "--flops", "0.6", "0.4", "--out", str(tmp_path / "sweep"), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 2 and all(r["status"] == "done" for r in runs)
    assert len(calls) == 1, f"{len(calls)} channel-group searches for one sweep"
    for r in runs:
        flops = r["request"]["flops"]
        alone = tmp_path / f"alone{flops}"
        assert main(["prune", *MLP, *ONE, "--flops", flops, "--out", str(alone), "--json"]) == 0
        capsys.readouterr()
        swept = Path(r["run"])
        assert (swept / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes(), flops
        assert _result(swept) == _result(alone), flops
        assert {"prunable_weights", "dense_macs", "final"} <= set(_result(swept)), flops      # compared, not filtered
    assert len(calls) == 3       # each run alone searches its own
