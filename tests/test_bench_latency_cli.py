"""prunekit bench-latency on the command line: what it refuses and what it says beside the table
(tiny models, a handful of repeats: the logic, never the machine's speed)."""

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.cli import main

ASSETS = Path(prunekit.__file__).parent / "assets"
CKPT = str(ASSETS / "mlpnet.safetensors")
QUICK = ["--repeats", "5", "--warmup", "0", "--batch-sizes", "1", "--threads", "1"]


def refusal(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_an_unfinished_training_run_says_to_run_its_command_again(capsys, tmp_path):
    (tmp_path / "config.toml").write_text('model = "mlpnet"\nepochs = 3\n')
    err = refusal(capsys, ["bench-latency", "--pruned", str(tmp_path)])
    assert "training run that has not finished" in err and "`prunekit train` command again" in err


def test_an_input_shape_equal_to_the_recorded_one_is_accepted(capsys):
    assert main(["bench-latency", "--pruned", CKPT, "--input-shape", "1,28,28", *QUICK, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 1


def test_threads_past_the_cores_are_warned_about_not_refused(capsys, monkeypatch):
    from prunekit.commands import bench_latency
    monkeypatch.setattr(bench_latency, "available_cpus", lambda: 1)
    assert main(["bench-latency", "--pruned", CKPT, *QUICK[:-2], "--threads", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["threads"] for r in json.loads(out)["rows"]] == [2]
    assert "prunekit: warning: --threads 2 is more than the 1 CPU core(s)" in err and err.count("\n") == 1


def fake_rows(monkeypatch, **row):
    """bench-latency with one made-up timing row (the table's wording, not the machine's speed)."""
    from prunekit.commands import bench_latency
    base = {"threads": 1, "batch": 1, "dense_ms": 0.0412, "pruned_ms": 0.0405, "ratio": 0.98, "ratio_q1": 0.97,
            "ratio_q3": 0.99, "repeats": 5, "warmup": 0, "noisy": False}
    monkeypatch.setattr(bench_latency, "latency_table", lambda *a, **k: [{**base, **row}])


def test_times_have_three_significant_digits_in_microseconds_below_a_millisecond(capsys, monkeypatch):
    from prunekit.commands.bench_latency import duration
    assert [duration(ms) for ms in (0.0412, 0.04, 0.9996, 2, 2.345, 12.34, 123.4)] == \
        ["41.2 µs", "40.0 µs", "1.00 ms", "2.00 ms", "2.35 ms", "12.3 ms", "123 ms"]
    fake_rows(monkeypatch)
    assert main(["bench-latency", "--pruned", CKPT, *QUICK]) == 0
    assert "dense   41.2 µs   pruned   40.5 µs   ratio 0.98x" in capsys.readouterr().out


def test_a_masked_model_is_said_to_be_masked_not_shrunk(capsys, monkeypatch, tmp_path):
    from prunekit import saving
    from prunekit.loading import load_model
    loaded = load_model("mlpnet", CKPT)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p[: p.shape[0] // 2] = 0                # half of each layer's rows zeroed: same shapes
    saving.save_model(loaded.model, tmp_path / "model.safetensors", saving.read_meta(CKPT))
    fake_rows(monkeypatch)
    bench = ["bench-latency", "--pruned", str(tmp_path), *QUICK]
    assert main(bench) == 0
    line = "note: the pruned model is masked, not shrunk"
    assert line in capsys.readouterr().out
    assert main([*bench, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["masked"] is True
    assert main(["bench-latency", "--pruned", CKPT, *QUICK, "--json"]) == 0       # nothing pruned: not masked
    assert json.loads(capsys.readouterr().out)["masked"] is False


def test_a_shrunk_model_is_not_masked():
    from prunekit.commands.bench_latency import same_shapes
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    assert same_shapes(dense, torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)))
    assert not same_shapes(dense, torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)))


def test_noisy_rows_are_marked_with_one_warning_line_under_the_table(capsys, monkeypatch):
    fake_rows(monkeypatch, noisy=True)
    assert main(["bench-latency", "--pruned", CKPT, *QUICK]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("noisy")
    assert [line for line in lines if "warning" in line] == [lines[2]]
    assert lines[2].startswith("warning: 1 of 1 row(s) noisy") and "quiet machine" in lines[2] and "--repeats" in lines[2]
    fake_rows(monkeypatch, noisy=False)
    assert main(["bench-latency", "--pruned", CKPT, *QUICK]) == 0
    assert "noisy" not in capsys.readouterr().out


def test_the_json_rows_say_whether_noisy_and_on_what_figures(capsys):
    assert main(["bench-latency", "--pruned", CKPT, *QUICK, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert isinstance(row["noisy"], bool) and row["noise"]["limit"] == 0.25
    assert {"dense_spread", "pruned_spread", "ratio_spread", "fastest_ratio", "fastest_gap"} <= set(row["noise"])


def test_a_ratio_far_above_the_mac_share_kept_at_odd_channel_counts_hints_at_channel_multiple(capsys, monkeypatch,
                                                                                              tmp_path):
    """A shrunk MobileNet whose groups keep half their channels plus one (odd counts): a ratio to
    dense far above the MAC share kept earns one hint line naming --channel-multiple 8 and a
    depthwise layer; a ratio near the share, or counts that are multiples of 8, none."""
    from prunekit import saving, zoo
    from prunekit.structured.groups import find_groups
    from prunekit.structured.shrink import shrink
    x = torch.zeros(1, 3, 32, 32)
    for keep, folder in ((lambda n: n // 2 + 1, tmp_path / "odd"), (lambda n: n // 2, tmp_path / "even")):
        model = zoo.build("mobilenetv1-cifar").eval()
        groups = find_groups(model, x)
        small = shrink(model, groups, [torch.arange(g.size) < keep(g.size) for g in groups], x)
        saving.save_model(small, folder / "model.safetensors", {"model": "mobilenetv1-cifar"})
    bench = ["bench-latency", "--model", "mobilenetv1-cifar", *QUICK]
    fake_rows(monkeypatch, ratio=0.98)              # about 30% of the MACs kept: about 3x the share
    assert main([*bench, "--pruned", str(tmp_path / "odd")]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--channel-multiple 8" in hints[0] and "depthwise or grouped" in hints[0], hints
    assert main([*bench, "--pruned", str(tmp_path / "even")]) == 0          # multiples of 8 already
    assert "hint:" not in capsys.readouterr().out
    fake_rows(monkeypatch, ratio=0.3)               # near the share kept
    assert main([*bench, "--pruned", str(tmp_path / "odd")]) == 0
    assert "hint:" not in capsys.readouterr().out


def test_the_hint_for_a_run_with_a_params_budget_names_what_takes_a_channel_multiple(capsys, monkeypatch, tmp_path):
    """A channel method's run with a params budget was told to prune again with --channel-multiple 8,
    which that budget refuses ("params with channel_multiple above 1 is not supported"); the
    hybrid's (whose weights phase meets the params budget) takes it, and is told as before."""
    from prunekit import saving, zoo
    from prunekit.structured.groups import find_groups
    from prunekit.structured.shrink import shrink
    x = torch.zeros(1, 3, 32, 32)
    model = zoo.build("mobilenetv1-cifar").eval()
    groups = find_groups(model, x)
    small = shrink(model, groups, [torch.arange(g.size) < g.size // 2 + 1 for g in groups], x)
    for method in ("autobot", "hybrid"):
        record = {"method": method, "family": "channels", "request": {"sparsity": None, "flops": "0.6", "params": "0.5"}}
        saving.save_model(small, tmp_path / method / "model.safetensors", {"model": "mobilenetv1-cifar",
                                                                           "result": record})
    fake_rows(monkeypatch, ratio=0.98)
    bench = ["bench-latency", "--model", "mobilenetv1-cifar", *QUICK, "--pruned"]
    assert main([*bench, str(tmp_path / "autobot")]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and hints[0].endswith("prune again without --params (its --flops alone) and with "
                                                 "--channel-multiple 8, and time that"), hints
    assert main([*bench, str(tmp_path / "hybrid")]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and hints[0].endswith(": prune again with --channel-multiple 8 and time that"), hints
    refused = "params with channel_multiple above 1 is not supported"       # the refusal the hint steers clear of
    data = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    with pytest.raises(prunekit.PrunekitError, match=refused):
        prunekit.prune(zoo.build("mobilenetv1-cifar"), data, method="autobot", flops=0.6, params=0.5, channel_multiple=8,
                       example_input=x)


def test_bench_latency_thread_bound():
    from prunekit.commands.bench_latency import max_threads
    assert max_threads(2) == 64 and max_threads(16) == 256
