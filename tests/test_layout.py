"""model_input: channels-last batches only for models that take them, with the same results."""

import torch
from torch import nn

from prunekit.layout import model_input
from prunekit.train import evaluate_loss_accuracy
from prunekit.train import evaluate, recalibrate_batchnorm


def conv_net(seed=0, flatten="flatten"):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8 * 6 * 6, 4)

        def forward(self, x):
            h = self.features(x)
            if flatten == "view":                 # as many hand-written models do: needs NCHW strides
                return self.head(h.view(h.shape[0], -1))
            if flatten == "raw memory":           # reads storage order: a different answer in NHWC
                return self.head(h.as_strided((h.shape[0], 8 * 6 * 6), (h.stride(0), 1)))
            return self.head(torch.flatten(h, 1))
    return Net()


def batches(seed=1, count=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(count)]


def reference_loss_accuracy(model, data):
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x.contiguous()) for x, _ in data])
    y = torch.cat([y for _, y in data])
    return float(nn.functional.cross_entropy(out, y)), 100.0 * float((out.argmax(1) == y).float().mean())


def test_a_convolutional_net_gets_channels_last_and_the_same_results():
    model, data = conv_net(), batches()
    x = model_input(model, data[0][0], torch.device("cpu"))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    loss, accuracy = reference_loss_accuracy(model, data)
    measured = evaluate_loss_accuracy(model, data)
    assert abs(measured["loss"] - loss) <= 1e-5 * loss
    assert measured["accuracy"] == accuracy == evaluate(model, data)


def test_models_that_need_nchw_keep_it():
    for flatten in ("view", "raw memory"):
        model, data = conv_net(flatten=flatten), batches()
        x = model_input(model, data[0][0], torch.device("cpu"))
        assert x.is_contiguous()
        loss, accuracy = reference_loss_accuracy(model, data)
        measured = evaluate_loss_accuracy(model, data)
        assert measured["loss"] == loss or abs(measured["loss"] - loss) <= 1e-6 * loss
        assert measured["accuracy"] == accuracy


def test_batchnorm_recalibration_matches_a_plain_nchw_pass():
    for flatten in ("flatten", "view"):
        model, data = conv_net(flatten=flatten), batches()
        expected = conv_net(flatten=flatten)
        for m in expected.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        expected.train()
        with torch.no_grad():
            for x, _ in data:
                expected(x)
        model.eval()
        assert recalibrate_batchnorm(model, data)
        assert not model.training         # the caller's mode is restored
        for mine, theirs in zip(model.modules(), expected.modules()):
            if isinstance(mine, nn.BatchNorm2d):
                for name in ("running_mean", "running_var"):
                    a, b = getattr(mine, name), getattr(theirs, name)
                    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_other_inputs_pass_through():
    model = nn.Linear(5, 2)
    x = torch.randn(3, 5)
    assert model_input(model, x, torch.device("cpu")) is x
    gray = torch.randn(2, 1, 4, 4)
    assert model_input(conv_net(), gray, torch.device("cpu")) is gray
