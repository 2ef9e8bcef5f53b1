"""The fine-tune's distillation loss against its formula, and ``finetune_distill`` reaching the
channel methods' fine-tune and gradual pruning's, with each method's default."""

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit import zoo
from prunekit.errors import PrunekitError
from prunekit.train import cosine, distillation_loss, sgd, train_epoch, train_epochs

torch.set_num_threads(1)


def test_distillation_loss_is_the_weighted_sum_of_cross_entropy_and_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), 3 * torch.randn(5, 7)
    labels = torch.randint(0, 7, (5,))
    temperature, weight = 3.0, 0.7
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    log_p_student = torch.log_softmax(student / temperature, dim=1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=1).mean()      # per sample, then mean
    hard = nn.functional.cross_entropy(student, labels)
    expected = (1 - weight) * hard + weight * temperature ** 2 * kl
    got = distillation_loss(student, teacher, labels, weight, temperature)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(student, teacher, labels, 0.0, temperature)) == pytest.approx(float(hard), rel=1e-6)
    assert float(distillation_loss(teacher, teacher, labels, 1.0, temperature)) == pytest.approx(0.0, abs=1e-6)


def _one_epoch(model, data, teacher=None, distill=0.0):
    torch.manual_seed(1)
    optimizer = sgd(model, 0.05)
    train_epoch(model, data, optimizer, cosine(optimizer, len(data)), progress=False, teacher=teacher,
                distill=distill)
    return model


def test_full_distillation_ignores_the_labels_and_plain_training_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    inputs = [torch.randn(10, 6) for _ in range(3)]
    labels_a = [torch.randint(0, 4, (10,)) for _ in inputs]
    labels_b = [(y + 1) % 4 for y in labels_a]
    a, b = list(zip(inputs, labels_a)), list(zip(inputs, labels_b))
    distilled = [_one_epoch(copy.deepcopy(model), data, teacher, 1.0) for data in (a, b)]
    plain = [_one_epoch(copy.deepcopy(model), data) for data in (a, b)]
    assert all(torch.equal(p, q) for p, q in zip(distilled[0].parameters(), distilled[1].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(plain[0].parameters(), plain[1].parameters()))
    with pytest.raises(ValueError, match="teacher"):
        _one_epoch(copy.deepcopy(model), a, None, 0.5)


def test_channel_fine_tune_distils_from_the_dense_model(monkeypatch):
    """The channel pipeline's fine-tune gets the dense model (weights as given, not the shrunk
    ones) as its teacher with the asked weight and temperature, else the method's default."""
    import prunekit.structured.pipeline as pipeline
    torch.manual_seed(0)
    model = zoo.build("resnet20-b").eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    with torch.no_grad():
        dense_out = model(x)
    seen = []

    def spy(*args, **kwargs):
        teacher = kwargs["teacher"]
        with torch.no_grad():
            seen.append((None if teacher is None else teacher.eval()(x), kwargs["distill"], kwargs["temperature"]))
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_epoch", spy)
    prunekit.prune(copy.deepcopy(model), lambda: data, method="autobot", flops=0.5, example_input=x, gate_batches=2,
                   finetune_epochs=2, finetune_distill=0.9, finetune_temperature=3.0)
    assert len(seen) == 2
    for out, distill, temperature in seen:
        assert torch.allclose(out, dense_out, rtol=1e-5, atol=1e-6 * float(dense_out.abs().max()))
        assert (distill, temperature) == (0.9, 3.0)
    seen.clear()
    prunekit.prune(copy.deepcopy(model), lambda: data, method="taper", flops=0.5, example_input=x, taper_epochs=1,
                   max_hold_steps=10, finetune_epochs=1)
    assert len(seen) == 1 and seen[0][0] is None and seen[0][1] == 0          # the taper's default: labels only
    seen.clear()
    prunekit.prune(copy.deepcopy(model), lambda: data, method="autobot", flops=0.5, example_input=x, gate_batches=2,
                   finetune_epochs=1)
    assert len(seen) == 1 and seen[0][0] is not None and seen[0][1:] == (0.9, 4.0)   # AutoBot's default
    seen.clear()
    prunekit.prune(copy.deepcopy(model), lambda: data, method="hybrid", flops=0.3, example_input=x, gate_batches=2,
                   structured_flops=0.6, fisher_samples=8, finetune_epochs=1)
    assert len(seen) == 1 and seen[0][0] is not None and seen[0][1:] == (0.9, 4.0)   # the hybrid's default
    with pytest.raises(PrunekitError, match="finetune_epochs"):
        prunekit.prune(copy.deepcopy(model), lambda: data, method="autobot", flops=0.5, example_input=x,
                       gate_batches=2, finetune_distill=0.9)


def test_gradual_fine_tunes_distil_from_the_model_as_passed_in(monkeypatch):
    """Every event's fine-tune gets the dense model (not the pruned one it is fine-tuning) as
    its teacher when finetune_distill is set, and none by default; without gradual the option is
    refused (weights methods fine-tune only in gradual mode)."""
    import prunekit.pipelines.gradual as gradual
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 1, 4, 4)
    batches = [(x[i:i + 16], x.flatten(1)[i:i + 16, :4].argmax(1)) for i in range(0, 64, 16)]
    with torch.no_grad():
        dense_out = model(x)
    seen = []

    def spy(*args, **kwargs):
        teacher = kwargs["teacher"]
        with torch.no_grad():
            seen.append((None if teacher is None else teacher(x), kwargs["distill"]))
        return train_epochs(*args, **kwargs)

    monkeypatch.setattr(gradual, "train_epochs", spy)
    options = dict(method="magnitude", sparsity=0.9, gradual=True, events=3, epochs_per_event=1, final_epochs=1,
                   example_input=x[:1])
    prunekit.prune(copy.deepcopy(model), lambda: batches, finetune_distill=0.5, **options)
    assert len(seen) == 3
    assert all(torch.equal(out, dense_out) and distill == 0.5 for out, distill in seen)
    seen.clear()
    prunekit.prune(copy.deepcopy(model), lambda: batches, **options)
    assert seen == [(None, 0.0)] * 3
    with pytest.raises(PrunekitError, match="gradual"):
        prunekit.prune(copy.deepcopy(model), lambda: batches, method="magnitude", sparsity=0.9, example_input=x[:1],
                       finetune_distill=0.5)


def test_taper_weight_training_distils_from_the_untouched_dense_model(monkeypatch):
    """With taper_distill the taper's weight-and-gate steps learn the dense model's outputs (the
    model as given, not the one being trained), at the asked weight and temperature (default 1);
    by default they see the labels only."""
    import prunekit.structured.taper as taper
    torch.manual_seed(0)
    model = zoo.build("resnet20-b").eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    reference = copy.deepcopy(model).eval()
    calls = []

    def spy(logits, teacher_logits, labels, weight, temperature):
        calls.append((teacher_logits.detach(), weight, temperature))
        return distillation_loss(logits, teacher_logits, labels, weight, temperature)

    monkeypatch.setattr(taper, "distillation_loss", spy)
    # max_hold_steps: on 3 batches of 8 images the taper would hold its budget ~116 steps until its gates
    # settle; what is checked here is the loss of every step, not the settling
    prunekit.prune(copy.deepcopy(model), lambda: data, method="taper", flops=0.5, example_input=x, taper_epochs=1,
                   max_hold_steps=10, taper_distill=0.9, taper_temperature=3.0)
    assert len(calls) >= len(data)
    with torch.no_grad():
        expected = [reference(inputs) for inputs, _ in data]
    for step, (teacher_logits, weight, temperature) in enumerate(calls):
        want = expected[step % len(data)]
        assert torch.allclose(teacher_logits, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert (weight, temperature) == (0.9, 3.0)
    calls.clear()
    prunekit.prune(copy.deepcopy(model), lambda: data, method="taper", flops=0.5, example_input=x, taper_epochs=1,
                   max_hold_steps=10, taper_distill=0.5)
    assert calls and all(call[1:] == (0.5, 1.0) for call in calls)
    calls.clear()
    prunekit.prune(copy.deepcopy(model), lambda: data, method="taper", flops=0.5, example_input=x, taper_epochs=1,
                   max_hold_steps=10)
    assert calls == []
