"""The record and report.md of a run say one thing per key: per-stage MACs as the top level
counts them, the fine-tune's loss apart from the evaluation's, the loss where there is no
accuracy, a gradual run's settings, no plot links without plots."""

import json
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.zoo import build


def _vit_data():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 32, 16)]
    return x[:1], (lambda: batches)


def test_stage_and_event_macs_count_the_attention_products_as_the_top_level_does():
    """vit-tiny's attention products (costs.activation_macs) are in the record's macs and
    budget_max_macs: every stage's and event's macs / max_macs count them too."""
    example, loader = _vit_data()
    runs = [prunekit.prune(build("vit-tiny"), loader, example_input=example, flops=0.5, method="falcon", stages=2,
                           fisher_samples=8, batch_size=16, layer_search=0, eval_data=loader()),
            prunekit.prune(build("vit-tiny"), loader, example_input=example, flops=0.5, method="magnitude",
                           gradual=True, events=2, epochs_per_event=0, final_epochs=0, eval_data=loader())]
    for result in runs:
        record, history = result.record, result.history
        assert len(history) == 2
        assert history[-1]["max_macs"] == record["budget_max_macs"] and history[-1]["macs"] == record["macs"]
        for entry in history:
            assert entry["macs"] == entry["model_macs"] <= entry["max_macs"]     # model_macs: counted afresh
        assert history[0]["max_macs"] > history[1]["max_macs"]


def test_report_asks_the_stage_its_whole_model_macs_also_of_a_folder_written_before():
    from prunekit.report import stage_rows
    new = {"stage": 1, "max_macs": 1_075_200, "macs": 1_075_200, "model_macs": 1_075_200}
    old = {"stage": 1, "max_macs": 1_009_664, "macs": 1_009_664, "model_macs": 1_075_200}   # walk46d/runs/gpt2
    for stage in (new, old):
        rows = stage_rows({"dense_macs": 2_150_400, "fixed_macs": 65_536, "stages": [stage]})
        assert rows[1]["asked_flops"] == 0.5


def _tiny_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(128, 1, 4, 4)
    y = x.flatten(1)[:, :4].argmax(1)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    return model, x[:1], (lambda: batches)


GRADUAL = dict(sparsity=0.8, gradual=True, events=2, epochs_per_event=1, final_epochs=1, lr=0.05)


def _metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.mark.parametrize("stage_eval", [True, False])
def test_an_events_loss_is_the_evaluations_and_its_fine_tune_loss_has_its_own_key(tmp_path, stage_eval):
    model, example, loader = _tiny_setup()
    out = tmp_path / "run"
    result = prunekit.prune(model, loader, method="magnitude-uniform", example_input=example, eval_data=loader(),
                            out=str(out), stage_eval=stage_eval, **GRADUAL)
    for history in (result.history, result.record["events"], _metrics(out)["stages"],
                    json.loads((out / "result.json").read_text())["events"]):
        assert all(e["finetune_loss"] is not None for e in history)      # every event fine-tunes here
        assert all((e["loss"] is not None) == stage_eval for e in history)
    last = result.history[-1]
    if stage_eval:         # the last event's evaluation is the final model's
        assert last["loss"] == result.loss != last["finetune_loss"]
    report = (out / "report.md").read_text()
    assert "| fine-tune loss |" in report and f"{last['finetune_loss']:.4f}" in report


def test_without_matplotlib_report_md_links_no_plot(tmp_path, monkeypatch):
    from prunekit import report
    model, example, loader = _tiny_setup()
    out = tmp_path / "run"
    prunekit.prune(model, loader, method="magnitude-uniform", example_input=example, eval_data=loader(),
                   out=str(out), sparsity=0.5)
    (out / "report.md").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # import matplotlib raises ImportError
    with pytest.raises(report.MissingPlotting):
        report.write_run_report(out)
    text = (out / "report.md").read_text()
    assert "plots/" not in text and "need matplotlib" in text
    with pytest.raises(report.MissingPlotting):
        report.write_comparison_report(tmp_path / "compare", report.collect([out]))
    text = (tmp_path / "compare" / "report.md").read_text()
    assert "plots/" not in text and "need matplotlib" in text


def test_a_run_with_a_users_loss_shows_the_loss_in_report_md_and_run_log(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(64, 8)
    batches = [(x[i:i + 16], x[i:i + 16, :2] * 2) for i in range(0, 64, 16)]       # a regression
    out = tmp_path / "run"
    result = prunekit.prune(model, lambda: batches, method="magnitude-uniform", sparsity=0.5, example_input=x[:1],
                            eval_data=batches, loss=torch.nn.MSELoss(), out=str(out))
    assert result.accuracy is None and result.loss is not None
    headline = f"Loss (MSELoss) {result.dense_loss:.4g} → **{result.loss:.4g}**"
    assert headline in (out / "report.md").read_text() and "Accuracy" not in (out / "report.md").read_text()
    done = (out / "run.log").read_text().splitlines()[-1]
    assert done.endswith(f"done: MACs kept {result.flops_kept:.4f}, loss {result.dense_loss:.4g} -> {result.loss:.4g}")


def test_a_gradual_runs_settings_are_in_its_record_and_report_header(tmp_path):
    model, example, loader = _tiny_setup()
    out = tmp_path / "run"
    result = prunekit.prune(model, loader, method="magnitude-uniform", example_input=example, eval_data=loader(),
                            out=str(out), finetune_distill=0.5, **GRADUAL)
    for record in (result.record, json.loads((out / "result.json").read_text())):
        assert record["gradual"] is True
        options = record["gradual_options"]
        assert [options[k] for k in ("events", "epochs_per_event", "final_epochs", "lr")] == [2, 1, 1, 0.05]
        assert (options["finetune_distill"], options["finetune_temperature"]) == (0.5, 4.0)
    report = (out / "report.md").read_text().splitlines()
    assert report[0] == "# Sequential pruned with magnitude-uniform (gradual)"
    assert ("Gradual pruning: 2 events (poly schedule), fine-tuned 1 epoch after each but the last, 1 epoch after "
            "the last, lr 0.05 (a cosine cycle per event), distillation 0.5 at temperature 4.") in report


def test_the_batchnorm_note_is_only_in_the_report_of_a_model_recalibrated(tmp_path):
    def bn_net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                   torch.nn.ReLU(), torch.nn.Linear(32, 4))
    _, example, loader = _tiny_setup()
    for name, model, noted in (("plain", _tiny_setup()[0], False), ("bn", bn_net(), True)):
        result = prunekit.prune(model, loader, method="magnitude-uniform", sparsity=0.5, example_input=example,
                                eval_data=loader(), out=str(tmp_path / name))
        assert result.record["bn_recalibrated"] is noted
        assert ("BatchNorm" in (tmp_path / name / "report.md").read_text()) is noted


class _Stop(Exception):
    pass


def test_run_log_names_a_gradual_runs_checkpoints_events(tmp_path, monkeypatch):
    from prunekit.runs import RunCheckpointer
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise _Stop
    out = tmp_path / "run"
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    with pytest.raises(_Stop):
        model, example, loader = _tiny_setup()
        prunekit.prune(model, loader, method="magnitude-uniform", example_input=example, out=str(out), **GRADUAL)
    monkeypatch.setattr(RunCheckpointer, "save", save)
    model, example, loader = _tiny_setup()
    prunekit.prune(model, loader, method="magnitude-uniform", example_input=example, out=str(out), **GRADUAL)
    log = (out / "run.log").read_text()
    assert "event 1 saved to stage-001.safetensors" in log and "event 2 saved to stage-002.safetensors" in log
    assert "stage 1" not in log
    # one line says the run is carried on, and from where (s54: "resume: ..." then "resuming after ...")
    said = [line.split(" ", 2)[2] for line in log.splitlines() if "resum" in line]
    assert len(said) == 1 and said[0].startswith("resume: ") \
        and said[0].endswith(", after event 1 from stage-001.safetensors"), said


def test_run_log_names_a_structured_runs_checkpoints_phases(tmp_path, monkeypatch):
    """A structured run's run.log said 'stage 1 saved', 'resuming after stage 1' of its gates,
    BatchNorm and fine-tune phases; its one resume line names the phase."""
    from prunekit.runs import RunCheckpointer
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise _Stop
    out = tmp_path / "run"
    options = dict(method="autobot", flops=0.6, finetune_epochs=1, out=str(out))
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    with pytest.raises(_Stop):
        model, example, loader = _tiny_setup()
        prunekit.prune(model, loader, example_input=example, **options)
    monkeypatch.setattr(RunCheckpointer, "save", save)
    model, example, loader = _tiny_setup()
    prunekit.prune(model, loader, example_input=example, **options)
    log = (out / "run.log").read_text()
    assert "phase 1 (gates) saved to stage-001.safetensors" in log
    said = [line.split(" ", 2)[2] for line in log.splitlines() if "resum" in line]
    assert len(said) == 1 and said[0].endswith(", after phase 1 (gates) from stage-001.safetensors"), said
    assert "phase 2 (bn, flops 0.6) saved" in log and "phase 3 (finetune, flops 0.6, epoch 1) saved" in log
    assert "stage 1" not in log and "stage 2" not in log


def test_labels_of_one_point_in_the_budget_plot_are_merged_not_printed_over_each_other():
    from prunekit.report import point_labels
    pts = [(0.0, 94.0, "dense"), (50.0, 93.0, "event 1"), (90.0, 91.0, "event 2"), (90.0, 91.0, "final\n(BN recal.)"),
           (99.0, 80.0, "a"), (99.01, 80.01, "b")]
    assert point_labels(pts) == [(0.0, 94.0, "dense"), (50.0, 93.0, "event 1"),
                                 (90.0, 91.0, "event 2 = final (BN recal.)"), (99.0, 80.0, "a / b")]


def test_long_merged_labels_stay_inside_the_budget_plot(tmp_path, monkeypatch):
    """Merged labels ('event 1 = event 2 = ... = final (BN recal.)') ran past the axes' edge, over the
    other plot, and the figure grew to hold them."""
    pytest.importorskip("matplotlib")
    from prunekit import report
    plt, boxes = report._pyplot(), []

    def measure(fig, path):                   # as saved: the text boxes and their axes', in pixels
        renderer = fig.canvas.get_renderer()
        boxes.extend((t.get_text(), t.get_window_extent(renderer), ax.get_window_extent(renderer))
                     for ax in fig.axes for t in ax.texts)
    monkeypatch.setattr(report, "_save", measure)
    long = " = ".join([f"event {i}" for i in range(1, 9)] + ["final (BN recal.)"])
    rows = [{"label": "dense", "sparsity": 0.0, "flops_kept": 1.0, "accuracy": 94.0},
            {"label": "stage 1", "sparsity": 0.5, "flops_kept": 0.6, "accuracy": 93.5},
            *({"label": label, "sparsity": 0.9, "flops_kept": 0.1, "accuracy": 91.0} for label in long.split(" = "))]
    report._plot_run_budget(plt, rows, tmp_path / "budget.png")
    assert len(boxes) == 6 and any("event 8" in text for text, _, _ in boxes)
    for text, box, inside in boxes:
        assert (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1), \
            (text, box, inside)


def test_the_budget_plot_of_a_gradual_run_labels_its_last_event_and_final_once(tmp_path, monkeypatch):
    """The last event's fine-tune is the final one: the same point, whose two labels overlapped."""
    from matplotlib.axes import Axes
    from prunekit import report
    model, example, loader = _tiny_setup()
    out = tmp_path / "run"
    prunekit.prune(model, loader, method="magnitude-uniform", example_input=example, eval_data=loader(),
                   out=str(out), **GRADUAL)
    labels, annotate = [], Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda ax, text, *a, **k: labels.append(text) or annotate(ax, text, *a, **k))
    monkeypatch.setattr(report, "_plot_run_stages", lambda *a: None)     # the budget plot's labels only
    monkeypatch.setattr(report, "_plot_layers", lambda *a: None)
    report.write_run_report(out)
    assert labels == ["dense", "event 1", "event 2 = final"] * 2         # sparsity and MACs panels


def test_a_fine_tune_phases_loss_is_the_evaluations_and_its_training_loss_has_its_own_key(tmp_path):
    torch.manual_seed(0)
    model, x = build("resnet20-b").eval(), torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    out = tmp_path / "run"
    result = prunekit.prune(model, data, method="autobot", flops=0.6, example_input=x, finetune_epochs=1,
                            gate_batches=2, eval_data=data, out=str(out), stage_eval=False)
    epochs = [p for p in _metrics(out)["stages"] if p.get("epoch")]
    assert epochs and all(p["finetune_loss"] is not None and p.get("loss") is None for p in epochs)
    assert result.history == _metrics(out)["stages"]


@pytest.mark.parametrize("seconds,text", [(0.004, "0.00"), (0.333, "0.33"), (0.994, "0.99"), (0.996, "1.0"),
                                          (1.0, "1.0"), (99.94, "99.9"), (99.96, "100"), (100.4, "100"),
                                          (1234.5, "1234"), (None, "–")])
def test_seconds_keep_their_decimals_on_the_rounded_value(seconds, text):
    """0.996 s showed as "1.00" and 99.96 s as "100.0": the decimals were chosen on the value
    before rounding, across the function's own boundaries."""
    from prunekit.report import seconds_text
    assert seconds_text(seconds) == text


def test_the_summary_of_a_sub_second_run_shows_its_seconds_as_the_tables_do():
    """Result.summary printed "0.0 s" for a run under 50 ms, and 0.33 s as "0.3 s"; it shows what
    the comparison tables show (report.seconds_text)."""
    from prunekit.report import seconds_text
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))
    result = prunekit.prune(model, (x, y), method="magnitude", sparsity=0.5)
    for seconds in (0.004, 0.333, 0.996, 12.34):
        result.seconds = seconds
        assert result.summary().endswith(f", {seconds_text(seconds)} s"), result.summary()
    result.seconds = 0.004
    assert result.summary().endswith(", 0.00 s") and "0.0 s" not in result.summary()
