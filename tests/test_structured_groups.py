"""Channel groups from torch-pruning's dependency graph, through our adapter."""

import pytest
import torch
import torch_pruning as tp

from prunekit import zoo
from prunekit.structured.groups import find_groups

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads


def _groups(name, hw=16):
    model = zoo.build(name).eval()
    shape = zoo.spec(name).input_shape
    return model, find_groups(model, torch.zeros(1, shape[0], hw, hw) if name != "mlpnet" else torch.zeros(1, *shape))


def test_option_a_resnet_inner_only_mode_prunes_only_block_internal_channels():
    model = zoo.build("resnet20").eval()
    groups = find_groups(model, torch.zeros(1, 3, 16, 16), pads_residual=False)
    assert len(groups) == 9                                  # one per BasicBlock
    for g in groups:
        block = g.root.rsplit(".", 1)[0]
        assert {(m.module, m.role) for m in g.members} == {
            (f"{block}.conv1", "out"), (f"{block}.bn1", "bn"), (f"{block}.conv2", "in")}
        assert g.size == dict(model.named_modules())[g.root].out_channels
    assert any("zero-pad" in why for _, why in groups.skipped)


def test_inner_only_mode_keeps_every_add_joined_stream_of_an_option_b_resnet_and_a_model_of_ones_own():
    """residual_channels "keep" pruned option-B block outputs all the same (the flag was silently
    ignored off option-A ResNets)."""
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = (torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                                         torch.nn.Conv2d(8, 8, 3, padding=1))
            self.head = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.head(x + self.b(torch.relu(self.a(x)))).mean((2, 3))

    for model in (zoo.build("resnet20-b").eval(), Residual()):
        pruned, kept = (find_groups(model, torch.zeros(1, 3, 16, 16), pads_residual=mode) for mode in (True, False))
        inner = [g for g in pruned if len(g.layers("out")) == 1]
        assert len(kept) == len(inner) < len(pruned)
        assert all(len(g.layers("out")) == 1 for g in kept)
        assert any("joined by an add" in why for _, why in kept.skipped)


def test_option_a_resnet_stage_outputs_are_one_group_each_across_the_zero_pad_shortcut():
    model, groups = _groups("resnet20")
    assert len(groups) == 12                                 # 3 stage groups + 9 block-internal
    stages = {g.root: g for g in groups if g.root in ("conv1", "layer2.0.conv2", "layer3.0.conv2")}
    assert len(stages) == 3 and [stages[r].size for r in ("conv1", "layer2.0.conv2", "layer3.0.conv2")] == [16, 32, 64]
    stage1, stage2, stage3 = stages["conv1"], stages["layer2.0.conv2"], stages["layer3.0.conv2"]
    assert {m.module for m in stage1.layers("out")} == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    # the shortcut consumes the previous stage's channels and produces the next stage's
    assert ("layer2.0.shortcut", "in") in {(m.module, m.role) for m in stage1.members}
    assert ("layer2.0.shortcut", "out") in {(m.module, m.role) for m in stage2.members}
    assert ("layer3.0.shortcut", "in") in {(m.module, m.role) for m in stage2.members}
    assert {"layer3.1.conv1", "layer3.2.conv1", "linear"} <= {m.module for m in stage3.layers("in")}
    assert "layer3.0.conv1" in {m.module for m in stage2.layers("in")}
    assert {"bn1", "layer1.2.bn2"} <= {m.module for m in stage1.layers("bn")}
    assert not any("zero-pad" in why for _, why in groups.skipped)


def test_torch_pruning_alone_gets_option_a_wrong():
    """The reason for the adapter rule: torch-pruning ties stage 1's 16 channels to BN layers
    of 32 and 64 channels across the zero-pad shortcut."""
    model = zoo.build("resnet20").eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 16, 16))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0])
    widths = {item.dep.target.module.num_features for item in group.items
              if isinstance(item.dep.target.module, torch.nn.BatchNorm2d)}
    assert widths == {16, 32, 64}


def test_option_b_residual_stage_is_one_group():
    _, groups = _groups("resnet20-b")
    stage2 = next(g for g in groups if g.root == "layer2.0.downsample.0")
    outs = {m.module for m in stage2.layers("out")}
    assert outs == {"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"}
    assert {"layer3.0.conv1", "layer3.0.downsample.0", "layer2.1.conv1"} <= {m.module for m in stage2.layers("in")}
    assert stage2.size == 32 and len(groups) == 12          # 3 stage groups + 9 block-internal


def test_mobilenet_depthwise_ties_input_to_output():
    _, groups = _groups("mobilenetv1-cifar")
    g = next(g for g in groups if any(m.module == "features.2.depthwise.0" for m in g.members))
    assert {(m.module, m.role) for m in g.members} >= {
        ("features.1.pointwise.0", "out"), ("features.2.depthwise.0", "out"), ("features.2.pointwise.0", "in")}
    assert len(groups) == 14                                 # stem + 13 pointwise outputs, not the logits


def test_logits_are_never_a_group():
    for name in ("mlpnet", "vgg16-bn", "resnet20-b"):
        model, groups = _groups(name, 32)
        head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        assert all(m.module != head or m.role == "in" for g in groups for m in g.members)


class _RotaryGQA(torch.nn.Module):
    """Llama's attention in small: rotary position embedding (x cos + rotate_half(x) sin, with
    rotate_half = cat(-x[..., D/2:], x[..., :D/2])) on q and k, and grouped-query attention
    (2 query heads share 1 key/value head, expanded). torch-pruning's group trace never ends here."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads, self.dim = heads, width // heads
        self.embed = torch.nn.Embedding(20, width)
        self.q, self.o = torch.nn.Linear(width, width, bias=False), torch.nn.Linear(width, width, bias=False)
        self.k, self.v = torch.nn.Linear(width, self.dim, bias=False), torch.nn.Linear(width, self.dim, bias=False)
        self.head = torch.nn.Linear(width, 20, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        angle = torch.arange(t, dtype=torch.float32)[:, None] * torch.arange(self.dim // 2)[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        split = lambda z, h: z.view(b, t, h, self.dim).transpose(1, 2)                      # noqa: E731
        half = lambda z: torch.cat((-z[..., self.dim // 2:], z[..., :self.dim // 2]), -1)   # noqa: E731
        q, k, v = split(self.q(x), self.heads), split(self.k(x), 1), split(self.v(x), 1)
        q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        k, v = (z.expand(b, self.heads, t, self.dim) for z in (k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


class _RotaryGQAWithMLP(_RotaryGQA):
    """_RotaryGQA plus a SwiGLU MLP after it, as a Llama block: the MLP's hidden units are an
    ordinary channel group, whatever the attention's trace does."""

    def __init__(self, width=16, hidden=24):
        super().__init__(width)
        self.gate = torch.nn.Linear(width, hidden, bias=False)
        self.up = torch.nn.Linear(width, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, width, bias=False)

    def forward(self, ids):
        head, self.head = self.head, torch.nn.Identity()
        try:
            x = super().forward(ids)
        finally:
            self.head = head
        return self.head(x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x)))


def _within_seconds(fn, seconds=30):
    import signal

    def hang(*_):
        raise AssertionError(f"the channel analysis did not finish in {seconds} s")
    before = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_a_channel_trace_without_end_leaves_that_group_dense_and_others_prunable():
    import time
    torch.manual_seed(0)
    start = time.process_time()     # CPU seconds: a loaded machine's wall clock ran 10x this
    groups = _within_seconds(lambda: find_groups(_RotaryGQAWithMLP(), torch.randint(20, (2, 6))))
    assert time.process_time() - start < 5
    assert [g.size for g in groups] == [24]
    assert {(m.module, m.role) for m in groups.groups[0].members} == {("gate", "out"), ("up", "out"), ("down", "in")}
    cycling = {root for root, why in groups.skipped if "round a cycle" in why}
    assert {"k", "v"} <= cycling and "gate" not in cycling


def test_a_model_whose_only_groups_cycle_is_refused_in_one_line_within_seconds():
    import time

    from prunekit.errors import PrunekitError
    torch.manual_seed(0)
    start = time.process_time()     # CPU seconds: a loaded machine's wall clock ran 10x this
    with pytest.raises(PrunekitError, match=r"^the model has no prunable channel group: every coupled channel set "
                                            r"has a channel trace that goes round a cycle without end \(e\.g\. .* \(v: .*method falcon$"):
        _within_seconds(lambda: find_groups(_RotaryGQA(), torch.randint(20, (2, 6))))
    assert time.process_time() - start < 5


class _HalvesSwapped(torch.nn.Module):
    """A layer's output added to a copy of itself with its channel halves swapped (a rotate-half):
    a channel trace without end, in no attention at all."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + torch.cat((-h[..., 4:], h[..., :4]), -1))


def test_a_cycle_outside_attention_is_refused_with_an_example_that_fits_it():
    """The generic cycle's words gave "a rotary position embedding feeding grouped-query attention"
    as their example, though grouped-query attention has its own cause: an example without it."""
    from prunekit.errors import PrunekitError
    with pytest.raises(PrunekitError, match="round a cycle without end") as err:
        _within_seconds(lambda: find_groups(_HalvesSwapped(), torch.randn(2, 8)))
    message = str(err.value)
    assert "grouped-query" not in message and "channel halves swapped" in message, message
    assert "\n" not in message


class _CachedLM(torch.nn.Module):
    """A language model returning a dict (as HuggingFace's ModelOutput) with its logits and a
    key/value cache object of its own type (as HuggingFace's DynamicCache with use_cache=True)."""

    class KVCache:
        def __init__(self, k, v):
            self.layers = [(k, v)]

        def __iter__(self):                  # iterates to tuples, as DynamicCache does
            return iter(self.layers)

    def __init__(self, width=8, vocab=20):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.k, self.v = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, 16), torch.nn.Linear(16, width)
        self.head = torch.nn.Linear(width, vocab)
        self.use_cache = True

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(x)))
        out = {"logits": self.head(x), "hidden": None}
        if self.use_cache:
            out["cache"] = self.KVCache(self.k(x), self.v(x))
        return out


def test_an_output_holding_a_cache_object_is_refused_in_one_line_naming_it_and_the_fix():
    from prunekit.errors import PrunekitError
    model = _CachedLM()
    with pytest.raises(PrunekitError, match=r"^the model's output\['cache'\] is a KVCache, not a tensor .*"
                                            r"use_cache=False.* returns only tensors \(the logits\)$") as err:
        find_groups(model, torch.randint(20, (2, 5)))
    assert "\n" not in str(err.value)
    model.use_cache = False                  # the fix: dict output of tensors (and None) is traced
    assert [g.size for g in find_groups(model, torch.randint(20, (2, 5)))] == [16]


class Conv1D(torch.nn.Module):
    """HuggingFace's GPT-2 Conv1D in small: a Linear whose weight is stored (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = torch.nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def test_conv1d_style_layers_are_channel_pruned_as_the_linear_layers_they_are():
    # was refused ("a Conv1D-style layer ... which the channel methods do not shrink") up to session 50
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), Conv1D(16, 8), torch.nn.GELU(), Conv1D(8, 16),
                                torch.nn.Linear(8, 20))
    groups = find_groups(model, torch.randint(20, (2, 5)))
    assert sorted((g.root, g.size, sorted((m.module, m.role) for m in g.members)) for g in groups) == [
        ("1", 16, [("1", "out"), ("3", "in")]), ("3", 8, [("3", "out"), ("4", "in")])]
    # the logits (the network's output) and the embedding, whose width the channel methods keep
    assert [root for root, _ in groups.skipped] == ["4", "0"]


class _SE(torch.nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(relu(fc1(mean(x))))), a channel-wise product."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Conv2d(c, c // 2, 1), torch.nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def test_a_squeeze_excitation_gate_before_a_flatten_keeps_its_channel_group_prunable():
    # torch-pruning hands the channels of a flatten read backwards over as a set (any order); read
    # in root order they are the identity map, so the conv's group is pruned, not left dense
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _SE(8), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    groups = find_groups(model, torch.zeros(1, 3, 8, 8))
    assert [why for _, why in groups.skipped] == ["reaches the network output (no consuming layer)"]
    group = next(g for g in groups if any(m.module == "0" for m in g.members))
    assert {(m.module, m.role, m.offset, m.repeat) for m in group.members} >= {
        ("0", "out", 0, 1), ("1", "bn", 0, 1), ("3.fc2", "out", 0, 1), ("3.fc1", "in", 0, 1), ("6", "in", 0, 16)}
    import prunekit                                  # and the pruned, shrunk model runs at the budget
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    r = prunekit.prune(model, (x, y), method="autobot", flops=0.5, gate_batches=2)
    assert r.record["skipped_groups"] == ["6: reaches the network output (no consuming layer)"]
    assert r.model[0].out_channels < 8 and r.model(x).shape == (64, 4) and r.flops_kept <= 0.5
