"""prunekit prune --method autobot|taper, info on a shrunk model, bench-latency, and their errors
(bundled MLPNet and MNIST sample: offline and fast)."""

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.cli import main

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors")]
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--train-samples", "512"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_autobot_end_to_end(capsys, tmp_path):
    out = run_json(capsys, ["prune", *MLP, *MNIST, "--method", "autobot", "--flops", "0.5",
                            "--gate-batches", "5", "--out", str(tmp_path / "run"), "--onnx", "--json"])
    assert out["flops_kept"] <= 0.5 and out["accuracy"] > 50
    assert (tmp_path / "run" / "model.onnx").exists()
    evaluated = run_json(capsys, ["eval", "--model", "mlpnet", "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
                                  "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--json"])
    assert evaluated["accuracy"] == pytest.approx(out["accuracy"])
    info = run_json(capsys, ["info", "mlpnet", "--checkpoint", str(tmp_path / "run" / "model.safetensors"), "--json"])
    assert info["shrunk"]["macs"] == out["macs"] and info["macs"] == out["macs"]
    assert main(["info", "mlpnet", "--checkpoint", str(tmp_path / "run" / "model.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "shrunk (channels removed)" in text and f"{out['kept_channels'][0]}" in text
    bench = run_json(capsys, ["bench-latency", "--pruned", str(tmp_path / "run"),     # its sidecar names mlpnet
                              "--repeats", "5", "--warmup", "1", "--threads", "1", "2", "--json"])
    assert [(r["threads"], r["batch"]) for r in bench["rows"]] == [(1, 1), (1, 64), (2, 1), (2, 64)]
    assert all(r["repeats"] == 5 and r["dense_ms"] > 0 and r["ratio"] > 0 for r in bench["rows"])


def test_a_count_budget_works_for_channel_methods(capsys):
    """--flops as MACs kept (16k of MLPNet's 32,360), as for every other method."""
    out = run_json(capsys, ["prune", *MLP, *MNIST, "--method", "autobot", "--flops", "16k", "--gate-batches", "5",
                            "--json"])
    assert out["macs"] <= 16_000 and out["flops"] == pytest.approx(16_000 / 32_360)


def test_taper_snapshots_end_to_end(capsys, tmp_path):
    out = run_json(capsys, ["prune", *MLP, *MNIST, "--method", "taper", "--flops", "0.4", "--snapshots", "0.8", "0.6",
                            "--taper-epochs", "6", "--channel-multiple", "8", "--out", str(tmp_path / "run"), "--json"])
    assert out["flops_kept"] <= 0.4
    for r in [out, *out["snapshots"]]:      # rounded: multiples of 8 (or a group's full size)
        assert all(k % 8 == 0 or k == n for k, n in zip(r["kept_channels"], r["group_sizes"]))
    assert sorted(r["flops"] for r in out["snapshots"]) == [0.6, 0.8]
    assert all(r["flops_kept"] <= r["flops"] for r in out["snapshots"])
    for b in ("0.8", "0.6"):
        assert (tmp_path / "run" / f"snapshot-{b}" / "model.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "autobot", "--sparsity", "0.5"], "not --sparsity"),
    (["--method", "taper"], "needs --flops"),
    (["--method", "autobot", "--flops", "half"], "is not a number"),
    (["--method", "autobot", "--flops", "1.2"], "out of range"),
    (["--method", "autobot", "--flops", "0.5", "--snapshots", "0.7"], "method autobot takes no option --snapshots"),
    (["--method", "taper", "--flops", "0.5", "--gate-batches", "3"], "method taper takes no option --gate-batches"),
    (["--method", "autobot", "--flops", "0.5", "--gate-batches", "0"], "--gate-batches must be at least 1"),
    (["--method", "autobot", "--flops", "0.0001"], "at least"),
    (["--method", "autobot", "--flops", "0.5", "--channel-multiple", "0"], "--channel-multiple must be at least 1"),
    (["--method", "autobot", "--flops", "0.5", "--gradual"], "gradual is for the weights methods"),
    (["--method", "taper", "--flops", "0.5", "--depth-flops", "0.3"], "--depth-flops 0.3 must be above"),
    (["--method", "hybrid", "--flops", "0.3", "--depth-flops", "0.6"], "method hybrid takes no option --depth-flops"),
    (["--method", "magnitude", "--sparsity", "0.5", "--stages", "9"], "method magnitude takes no option --stages"),
    (["--method", "chita", "--sparsity", "0.5", "--gate-batches", "9"], "method chita takes no option --gate-batches"),
    (["--method", "chita", "--sparsity", "0.5", "--events", "3"], "--events is a setting of step-by-step pruning with fine-tuning: add --gradual"),
])
def test_structured_errors(capsys, extra, message):
    assert main(["prune", *MLP, *MNIST, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_latency_needs_a_pruned_model(capsys, tmp_path):
    assert main(["bench-latency", "--model", "mlpnet", "--pruned", str(tmp_path)]) == 2
    assert "no pruned model" in capsys.readouterr().err


def test_the_result_asked_for_is_printed_last_and_snapshots_are_labelled():
    from prunekit.commands.prune import prune_lines

    def record(kept):
        return {"model": "m", "method": "taper", "mode": "one-shot", "dense_accuracy": 90.0, "accuracy": 80.0,
                "sparsity": None, "flops_kept": kept, "macs": int(kept * 100), "dense_macs": 100,
                "params_kept": kept, "params": 10}

    lines = prune_lines({**record(0.3), "snapshots": [record(0.5)], "seconds": 1.0, "peak_rss_mb": 1.0})
    headers = [line for line in lines if "pruned with" in line]
    assert headers == ["m pruned with taper (snapshot at 50% MACs, one-shot):", "m pruned with taper (one-shot):"]
    assert lines.index(headers[1]) > lines.index(headers[0])
    assert "MACs kept  30.00%" in "\n".join(lines[lines.index(headers[1]):])


def test_the_summary_counts_a_grouped_convs_blocks_and_says_when_the_taper_ran_late():
    from prunekit.commands.prune import prune_lines
    record = {"model": "m", "method": "autobot", "mode": "structured", "dense_accuracy": 90.0, "accuracy": 80.0,
              "sparsity": None, "flops_kept": 0.5, "macs": 50, "dense_macs": 100, "params_kept": 0.5, "params": 10,
              "seconds": 1.0, "peak_rss_mb": 1.0, "groups": 2, "kept_channels": [2, 3], "group_sizes": [4, 4],
              "group_segments": [3, 1]}      # the first group: a conv of 3 groups, 4 channels each
    assert "  channels   9 of 16 in 2 groups" in prune_lines(record)
    late = {**record, "taper_steps": 318, "planned_steps": 16}
    assert "  taper      318 steps where 16 were planned (--taper-epochs): the gates reached the budget late" \
        in prune_lines(late)
    assert not any(line.startswith("  taper") for line in prune_lines({**late, "taper_steps": 16}))


def test_a_hybrid_result_reports_its_shrunk_share_and_its_nonzero_share_apart(capsys, tmp_path):
    """Hybrid: channels removed to ~60%, then single weights zeroed to 30%. The kernels compute the
    shrunk structure (its zeros at dense cost): info and bench-latency give both shares, and the
    latency ratio is judged against the shrunk one."""
    out = run_json(capsys, ["prune", *MLP, *MNIST, "--method", "hybrid", "--flops", "0.3",
                            "--structured-flops", "0.6", "--gate-batches", "3", "--fisher-samples", "128", "--out", str(tmp_path / "run"),
                            "--json"])
    saved = str(tmp_path / "run" / "model.safetensors")
    info = run_json(capsys, ["info", "mlpnet", "--checkpoint", saved, "--json"])["shrunk"]
    assert info["flops_kept"] == pytest.approx(out["flops_kept"], rel=1e-9) and info["flops_kept"] <= 0.3
    assert 0.3 < info["structure_flops_kept"] <= 0.6 and info["zeros_in_shrunk"] is True
    assert main(["info", "mlpnet", "--checkpoint", saved]) == 0
    text = capsys.readouterr().out
    assert f"shrunk to {100 * info['structure_flops_kept']:.2f}% of the dense" in text
    assert f"{100 * info['flops_kept']:.2f}% and" in text and "counting only nonzero weights" in text
    assert "shrunk (channels removed)" not in text       # the nonzero share labelled as the channels' one
    bench = run_json(capsys, ["bench-latency", "--pruned", str(tmp_path / "run"), "--repeats", "5", "--warmup",
                              "1", "--threads", "1", "--batch-sizes", "1", "--json"])
    assert bench["zeros_in_shrunk"] is True and bench["masked"] is False
    assert bench["structure_flops_kept"] == pytest.approx(info["structure_flops_kept"], rel=1e-9)
    assert bench["flops_kept"] == pytest.approx(info["flops_kept"], rel=1e-9)
    row = bench["rows"][0]
    assert row["ratio_to_macs_kept"] == pytest.approx(row["ratio"] / bench["structure_flops_kept"], rel=1e-9)
    assert main(["bench-latency", "--pruned", str(tmp_path / "run"), "--repeats", "5", "--warmup", "1",
                 "--threads", "1", "--batch-sizes", "1"]) == 0
    text = capsys.readouterr().out
    assert "the zeros run at dense cost" in text and "shrunk MAC share kept" in text
