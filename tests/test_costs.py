"""CostModel: MAC counts of single layers against their textbook formulas, residual adds,
unknown modules, masked and shrunk counts."""

import itertools

import pytest
import torch
from torch import nn

from prunekit.costs import CostModel
from prunekit.errors import PrunekitError


def conv_macs(c_in, c_out, k, h_out, w_out, groups=1):
    return c_out * (c_in // groups) * k * k * h_out * w_out


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (2, 1, 1, 1), (1, 0, 2, 1), (2, 3, 1, 4), (1, 1, 1, 8)])
def test_conv2d_macs_match_formula(stride, padding, dilation, groups):
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
    x = torch.zeros(2, 8, 17, 13)
    h_out, w_out = conv(x).shape[2:]
    costs = CostModel(conv, x)
    assert costs.macs == conv_macs(8, 16, 3, h_out, w_out, groups)
    assert costs.layer("").macs_per_weight == h_out * w_out


def test_conv1d_and_linear_tokens():
    model = nn.Sequential(nn.Conv1d(4, 6, 5, stride=2), nn.Flatten(), nn.Linear(6 * 8, 3))
    costs = CostModel(model, torch.zeros(3, 4, 20))
    assert costs.layer("0").macs == 6 * 4 * 5 * 8
    assert costs.layer("2").macs == 48 * 3
    seq = nn.Linear(10, 7)  # a sequence of 5 tokens: each weight is used once per token
    assert CostModel(seq, torch.zeros(2, 5, 10)).macs == 5 * 70


def test_other_ops_batchnorm_pool_and_residual_add():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.bn(self.conv(x)) + x)

    costs = CostModel(Block(), torch.zeros(1, 4, 8, 8))
    assert costs.macs == 4 * 4 * 9 * 64
    assert costs.layer("bn").other_ops == 4 * 64
    assert costs.layer("pool").other_ops == 4 * 16 * 4
    assert costs.layer("(add)").other_ops == 4 * 64
    assert costs.params == 4 * 4 * 9 + 8


def test_unknown_leaf_module_is_reported_not_skipped():
    class Mystery(nn.Module):
        def forward(self, x):
            return x * 2

    costs = CostModel(nn.Sequential(nn.Linear(3, 3), Mystery()), torch.zeros(1, 3))
    assert costs.unknown == ["1"]
    assert "unknown" in costs.layer("1").kind


def test_zero_macs_attribute_marks_free_modules():
    class Shortcut(nn.Module):
        zero_macs = True

        def forward(self, x):
            return x

    assert CostModel(nn.Sequential(nn.Linear(3, 3), Shortcut()), torch.zeros(1, 3)).unknown == []


def test_empty_sequential_is_free_and_a_full_one_counted_as_today():
    class Block(nn.Module):
        def __init__(self, short):
            super().__init__()
            self.conv, self.short = nn.Conv2d(2, 2, 3, padding=1), short

        def forward(self, x):
            return self.conv(x) + self.short(x)

    x = torch.zeros(1, 2, 4, 4)
    assert CostModel(Block(nn.Sequential()), x).unknown == []
    full = CostModel(Block(nn.Sequential(nn.BatchNorm2d(2))), x)
    assert full.unknown == [] and full.layer("short.0").other_ops == 2 * 16
    mystery = type("Mystery", (nn.Module,), {"forward": lambda self, x: x * 2})
    assert CostModel(Block(nn.Sequential(mystery())), x).unknown == ["short.0"]


def test_shared_module_counted_once_for_params_twice_for_macs():
    lin = nn.Linear(4, 4, bias=False)
    costs = CostModel(nn.Sequential(lin, nn.ReLU(), lin), torch.zeros(1, 4))
    assert costs.params == 16
    assert costs.macs == 32


def test_count_masked_and_shrunk_models():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 25, 10))
    x = torch.zeros(1, 2, 5, 5)
    costs = CostModel(model, x)
    dense = costs.macs
    with torch.no_grad():
        model[0].weight[:2] = 0          # half the conv weights
        model[3].weight[:, :50] = 0      # half the linear weights
    counts = costs.count(model)
    assert counts.macs == dense // 2
    assert counts.params == 36 + 500 + 10
    shrunk = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                           nn.Linear(2 * 25, 10))
    shrunk_counts = costs.count(shrunk)
    assert shrunk_counts.macs == 2 * 2 * 9 * 25 + 50 * 10
    assert shrunk_counts.dense_macs == dense
    assert shrunk_counts.flops_kept == pytest.approx(shrunk_counts.macs / dense)


def test_bad_example_input_is_a_clear_error():
    with pytest.raises(PrunekitError, match=r"failed on one example of its input \(shape \(1, 5\)\).*pass data \(or an example input\)"):
        CostModel(nn.Linear(3, 3), torch.zeros(1, 5))


# --- every parameterised operation, not only Conv/Linear leaves ------------------------------

def test_multihead_attention_projections_and_products():
    E, heads, T, B = 16, 4, 5, 3
    mha = nn.MultiheadAttention(E, heads, batch_first=True)
    x = torch.zeros(B, T, E)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    for model, inputs in ((Wrap(), x), (mha, (x, x, x))):      # fused SDPA path, then explicit bmm path
        costs = CostModel(model, inputs)
        prefix = "attn." if model is not mha else ""
        assert costs.layer(prefix + "in_proj_weight").macs == 3 * E * E * T
        assert costs.layer(prefix + "out_proj").macs == E * E * T
        assert costs.activation_macs == 2 * T * T * E          # QKᵀ and AV over all heads
        assert costs.macs == 4 * E * E * T + 2 * T * T * E
        assert costs.params == sum(p.numel() for p in mha.parameters())


def test_cross_attention_prices_query_and_key_rows_apart():
    E, Lq, Lk = 8, 3, 7
    mha = nn.MultiheadAttention(E, 2, batch_first=True)
    costs = CostModel(mha, (torch.zeros(1, Lq, E), torch.zeros(1, Lk, E), torch.zeros(1, Lk, E)))
    layer = costs.layer("in_proj_weight")
    assert layer.macs_per_weight is None
    per_row = layer.element_macs.view(3 * E, E)[:, 0]
    assert per_row.tolist() == [Lq] * E + [Lk] * 2 * E
    assert costs.macs == E * E * (Lq + 2 * Lk) + E * E * Lq + 2 * Lq * Lk * E


def test_transformer_encoder_and_decoder_layers_are_counted_op_by_op():
    E, F, T = 16, 32, 6
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 4, F, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    costs = CostModel(enc, torch.zeros(1, T, E))               # eval + no_grad: the fused fast path
    assert costs.macs == 2 * (4 * E * E * T + 2 * E * F * T + 2 * T * T * E)
    assert torch.backends.mha.get_fastpath_enabled()           # restored after the trace
    dec = nn.TransformerDecoderLayer(E, 4, F, batch_first=True)
    S = 9
    costs = CostModel(dec, (torch.zeros(1, T, E), torch.zeros(1, S, E)))
    self_attn = 4 * E * E * T + 2 * T * T * E
    cross = 2 * E * E * T + 2 * E * E * S + 2 * T * S * E
    assert costs.macs == self_attn + cross + 2 * E * F * T


def test_functional_weights_embeddings_and_loose_parameters():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))
            self.pos = nn.Parameter(torch.zeros(1, 5, 8))
            self.w = nn.Parameter(torch.randn(12, 8))
            self.v = nn.Parameter(torch.randn(12, 3))
            self.k = nn.Parameter(torch.randn(4, 1, 3, 3))

        def forward(self, tokens):
            x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), self.embed(tokens)], 1) + self.pos
            h = nn.functional.linear(x, self.w)                   # (B, 5, 12)
            out = h @ self.v                                      # (B, 5, 3)
            return nn.functional.conv2d(out.unsqueeze(1), self.k, padding=1)

    model = Functional()
    costs = CostModel(model, torch.zeros(2, 4, dtype=torch.long))
    assert costs.layer("embed").macs == 0 and costs.layer("embed").is_weight_layer
    assert costs.layer("w").macs == 12 * 8 * 5
    assert costs.layer("v").macs == 12 * 3 * 5
    assert costs.layer("k").macs == 4 * 9 * 5 * 3
    assert costs.macs == 12 * 8 * 5 + 12 * 3 * 5 + 4 * 9 * 15
    assert costs.params == sum(p.numel() for p in model.parameters())
    assert not costs.layer("").is_weight_layer and costs.layer("").params == 8 + 40   # cls + pos


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_price_every_weight_once_per_token(cell):
    T, B, F, H = 7, 2, 5, 6
    rnn = cell(F, H, num_layers=2, bidirectional=True, batch_first=True)
    costs = CostModel(rnn, torch.zeros(B, T, F))
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
    per_direction = gates * H * (F + H) + gates * H * (2 * H + H)     # layer 0, layer 1
    assert costs.macs == 2 * per_direction * T
    assert costs.params == sum(p.numel() for p in rnn.parameters())


def test_parameter_used_by_an_unknown_operation_is_refused_by_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))

        def forward(self, x):
            return x @ torch.cumsum(self.table, 0)                  # cumsum has no cost rule

    model = nn.Sequential(nn.Linear(10, 10), Odd())
    with pytest.raises(PrunekitError, match=r"'1\.table'.*Odd.*cumsum.*register_cost\(Odd"):
        CostModel(model, torch.zeros(1, 3, 10))


def test_register_cost_prices_a_layer_the_trace_cannot(monkeypatch):
    from prunekit import register_cost
    from prunekit.costs import ModuleCost, unregister_cost

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))

        def forward(self, x):                                    # x (B, 10): each table row used once
            return torch.cumsum(self.table, 0).sum(1) * x

    register_cost(Odd, lambda m, inputs, out: ModuleCost({"table": inputs[0].shape[0]}, activation_macs=0))
    try:
        model = nn.Sequential(nn.Linear(10, 10), Odd())
        costs = CostModel(model, torch.zeros(3, 10))
        assert costs.layer("1.table").macs == 40 and costs.layer("1.table").is_weight_layer
        assert costs.macs == 100 + 40
        from prunekit.params import ParamSpace
        assert ParamSpace(model, costs=costs).names() == ["0", "1.table"]
        with pytest.raises(PrunekitError, match="names parameters"):
            register_cost(Odd, lambda m, i, o: {"nope": 1})
            CostModel(model, torch.zeros(3, 10))
    finally:
        unregister_cost(Odd)
    with pytest.raises(PrunekitError, match="no cost rule"):
        CostModel(nn.Sequential(nn.Linear(10, 10), Odd()), torch.zeros(3, 10))


def test_register_cost_counts_the_child_layers_of_a_registered_module():
    """A registered cost prices the module's own parameters; a child layer inside it is traced and
    counted as everywhere else (it was dropped: 408 of 664 MACs, and "did not run" warnings)."""
    from prunekit import register_cost
    from prunekit.costs import unregister_cost

    class RBF(nn.Module):                              # x (B, 16) -> (B, 8)
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)              # 256 MACs per example
            self.centres = nn.Parameter(torch.randn(8, 16))   # cdist: priced by the cost function

        def forward(self, x):
            return torch.exp(-torch.cdist(self.proj(x), self.centres) ** 2)

    register_cost(RBF, lambda m, inputs, out: {"centres": inputs[0].shape[0]})
    try:
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), RBF(), nn.Linear(8, 3))
        costs = CostModel(model, torch.zeros(4, 16))
        assert costs.layer("2.proj").macs == 256 and costs.layer("2.proj").is_weight_layer
        assert costs.layer("2.centres").macs == 128
        assert costs.macs == 256 + 256 + 128 + 24
        register_cost(RBF, lambda m, i, o: {"centres": 1, "proj.weight": 1})   # would count proj twice
        with pytest.raises(PrunekitError, match=r"'proj\.weight'.*child layers.*own parameters"):
            CostModel(model, torch.zeros(4, 16))
    finally:
        unregister_cost(RBF)


def test_register_cost_prices_a_parameter_tied_to_another_modules_once_whichever_module_comes_first():
    """An output head with a registered cost whose weight is the embedding's table (tied): the
    model names the shared parameter once, after the module that holds it first. With the
    embedding first, the head's registration was passed over: its own code was traced (a weight
    op without a cost rule refused the model, naming Embedding; a traceable one was counted by the
    trace, not by the cost function) and the function's figure was dropped. Now both orders count
    the function's uses (3 per element here, not the 5 tokens the trace would see), and pruning the
    table lowers them."""
    from prunekit import register_cost
    from prunekit.costs import unregister_cost
    V, E, T = 50, 8, 5

    class Head(nn.Module):                             # x (B, T, E) -> (B, T, V)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(V, E))

        def forward(self, x):
            return x @ torch.cumsum(self.weight, 1).t()      # cumsum: no cost rule of prunekit's

    class LM(nn.Module):
        def __init__(self, head_first: bool):
            super().__init__()
            if head_first:
                self.head, self.emb = Head(), nn.Embedding(V, E)
            else:
                self.emb, self.head = nn.Embedding(V, E), Head()
            self.head.weight = self.emb.weight         # tied

        def forward(self, ids):
            return self.head(self.emb(ids))

    ids = torch.zeros(1, T, dtype=torch.long)
    register_cost(Head, lambda m, inputs, out: {"weight": 3})
    try:
        for head_first in (True, False):
            model = LM(head_first)
            costs = CostModel(model, ids)
            holder = "head" if head_first else "emb"
            assert costs.macs == 3 * V * E, head_first
            assert costs.layer(holder).macs == 3 * V * E and costs.layer(holder).params == V * E
            with torch.no_grad():
                model.emb.weight[:10] = 0                  # 10 of V rows pruned, in both modules
            assert costs.count(model).macs == 3 * (V - 10) * E, head_first
    finally:
        unregister_cost(Head)

    class Twice(nn.Module):                            # one parameter under two names of the module itself
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 6))
            self.b = self.a

        def forward(self, x):                          # x (B, 6) -> (B, 4)
            return x @ torch.cumsum(self.a, 0).t() + x @ torch.cumsum(self.b, 1).t()

    register_cost(Twice, lambda m, inputs, out: {"a": 1, "b": 2})   # was refused: "does not have ['b']"
    try:
        assert CostModel(nn.Sequential(Twice()), torch.zeros(1, 6)).macs == (1 + 2) * 4 * 6
    finally:
        unregister_cost(Twice)


class _CdistWrap(nn.Module):
    """x (B, T=4, 6) -> (B, 24): cdist meets each element of ``scale`` once per token (4 uses),
    then a child Linear (traced as everywhere else)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6, 6))
        self.gain = nn.Parameter(torch.ones(6))                  # element-wise only: no MACs
        self.inner = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        d = torch.cdist(x, self.scale.unsqueeze(0).expand(x.shape[0], 6, 6))
        return self.inner(d * self.gain).flatten(1)


def test_register_cost_that_leaves_out_an_own_parameter_its_forward_multiplies_is_refused():
    """A cost function returning {} for a layer whose own code multiplies its ``scale`` (cdist) was
    taken: scale cost 0 MACs, dense 288 where a hand count is 432, and a flops budget was met on the
    undercount. Now it is refused naming the parameter, the op and the fix; an explicit 0 is taken,
    and a parameter used only element-wise (``gain``) needs no entry."""
    from prunekit import register_cost
    from prunekit.costs import unregister_cost
    model = nn.Sequential(_CdistWrap(), nn.Linear(24, 6))
    x = torch.randn(2, 4, 6)
    try:
        register_cost(_CdistWrap, lambda m, inputs, out: {})
        with pytest.raises(PrunekitError, match=r"cost function registered for _CdistWrap returns no entry for its "
                                                r"parameter 'scale' \(module '0'\).*aten\._cdist_forward.*"
                                                r"\{'scale': 0\} if it truly costs no MACs"):
            CostModel(model, x)
        register_cost(_CdistWrap, lambda m, inputs, out: {"scale": inputs[0].shape[0] * inputs[0].shape[1]})
        costs = CostModel(model, x)
        assert costs.macs == 4 * 36 + 4 * 36 + 24 * 6                   # 432, by hand
        assert costs.layer("0.scale").macs == 4 * 36 and costs.layer("0.scale").is_weight_layer
        register_cost(_CdistWrap, lambda m, inputs, out: {"scale": 0})   # said explicitly: taken
        assert CostModel(model, x).macs == 4 * 36 + 24 * 6
    finally:
        unregister_cost(_CdistWrap)


class _TableGate(nn.Module):
    """A matmul ``weight`` (16, 8) gated by a learned ``table`` (5, 16) read by ``index_select``
    (a gather: an operation with no cost rule, not a multiplication)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8))
        self.table = nn.Parameter(torch.rand(5, 16) * 0.01 + 0.001)

    def forward(self, x):                                            # x (B, 8) -> (B, 16)
        idx = (x.abs().sum(-1) * 0).long() % 5
        return (x @ self.weight.t()) * torch.index_select(self.table, 0, idx)


def test_register_cost_parameter_named_with_zero_uses_is_kept_dense():
    """A registered layer's learned table read by index_select: unregistered it is refused (the
    gather has no cost rule, as for any parameter op without one); registered without it, refused
    naming the table; named with 0, as the refusal says, it was made a prunable 0-MAC layer and
    magnitude at sparsity 0.5 zeroed all of it (the layer output zeros). Now a parameter named
    with 0 uses is kept dense, as one used only element-wise."""
    import warnings
    import prunekit
    from prunekit import register_cost
    from prunekit.costs import unregister_cost
    x = torch.randn(1, 8)
    with pytest.raises(PrunekitError, match=r"'0\.table'.*index_select"):
        CostModel(nn.Sequential(_TableGate(), nn.ReLU(), nn.Linear(16, 3)), x)
    try:
        register_cost(_TableGate, lambda m, inputs, out: {"weight": 1})
        with pytest.raises(PrunekitError, match=r"no entry for its parameter 'table' \(module '0'\).*"
                                                r"aten\.index_select.*\{'table': 0\} if it truly costs no MACs "
                                                r"\(it is then kept dense, not pruned\)"):
            CostModel(nn.Sequential(_TableGate(), nn.ReLU(), nn.Linear(16, 3)), x)
        register_cost(_TableGate, lambda m, inputs, out: {"weight": 1, "table": 0})
        torch.manual_seed(0)
        net = nn.Sequential(_TableGate(), nn.ReLU(), nn.Linear(16, 3))
        table = net[0].table.detach().clone()
        costs = CostModel(net, x)
        assert costs.macs == 16 * 8 + 16 * 3
        assert "0.table" not in [layer.param_name for layer in costs.weight_layers()]
        assert [layer.param_name for layer in costs.weight_layers()] == ["0.weight", "2.weight"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the small head loses all its weights: not the point
            prunekit.prune(net, method="magnitude", sparsity=0.5, example_input=x)
        assert torch.equal(net[0].table.detach(), table)                # dense, untouched
        assert float((net[0].weight == 0).float().mean()) > 0          # the weight is pruned
    finally:
        unregister_cost(_TableGate)


class _Joined(nn.Module):
    """``x @ join([weight, u]).t()``: two (6, 4) parameters joined by torch.cat (or stacked and
    flattened) into one (12, 4) matrix; on (B, T, 4) inputs each element is used B*T times."""

    def __init__(self, how="cat"):
        super().__init__()
        self.how = how
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.u = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        if self.how == "cat":
            w = torch.cat([self.weight, self.u])
        else:
            w = torch.stack([self.weight, self.u]).flatten(0, 1)
        return x @ w.t()


@pytest.mark.parametrize("how", ["cat", "stack"])
def test_register_cost_sees_own_parameters_joined_by_cat_or_stack(how):
    """Parameters joined by torch.cat / torch.stack inside a registered module escaped the check: a
    cost function returning only {'weight': 5} was taken at 120 MACs where the product costs 240.
    The trace now reads a join of parameters as a view of them (each element charged its uses), so
    the check names ``u``; unregistered, the 240 MACs are charged to weight and u (prunable, 120
    each), not to the module as activation MACs."""
    from prunekit import register_cost
    from prunekit.costs import unregister_cost
    x = torch.randn(1, 5, 4)
    costs = CostModel(nn.Sequential(_Joined(how)), x)
    assert costs.macs == 5 * 12 * 4
    assert {layer.param_name: layer.macs for layer in costs.weight_layers()} == {"0.weight": 120, "0.u": 120}
    assert sum(layer.activation_macs for layer in costs.layers) == 0
    try:
        register_cost(_Joined, lambda m, inputs, out: {"weight": 5})
        with pytest.raises(PrunekitError, match=r"no entry for its parameter 'u' \(module '0'\)"):
            CostModel(nn.Sequential(_Joined(how)), x)
        register_cost(_Joined, lambda m, inputs, out: {"weight": 5, "u": 5})
        assert CostModel(nn.Sequential(_Joined(how)), x).macs == 240
    finally:
        unregister_cost(_Joined)


def test_a_join_of_a_parameter_and_an_activation_stays_an_activation():
    """torch.cat of a learned token and activations (a ViT's class token) is not a parameter view:
    the attention-free product after it is activation MACs of the module, as before."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 4))

        def forward(self, x):                                        # x (B, 3, 4)
            t = torch.cat([self.cls.expand(x.shape[0], 1, 4), x], 1)  # (B, 4, 4)
            return t @ t.transpose(1, 2)

    costs = CostModel(nn.Sequential(Tokens()), torch.randn(1, 3, 4))
    assert costs.weight_layers() == [] and costs.macs == 4 * 4 * 4


def test_register_cost_sees_an_own_parameter_multiplied_element_wise_and_summed():
    """``(x.unsqueeze(-2) * w).sum(-1)`` (a linear layer written element-wise) in a registered
    module's own code is MACs of ``w``: left out of the cost function, refused; a bias added needs
    no entry."""
    from prunekit import register_cost
    from prunekit.costs import unregister_cost

    class ElementwiseLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5))
            self.b = nn.Parameter(torch.zeros(3))

        def forward(self, x):                                        # x (B, 5) -> (B, 3)
            return (x.unsqueeze(-2) * self.w).sum(-1) + self.b

    model = nn.Sequential(ElementwiseLinear())
    try:
        register_cost(ElementwiseLinear, lambda m, inputs, out: {})
        with pytest.raises(PrunekitError, match=r"no entry for its parameter 'w' \(module '0'\)"):
            CostModel(model, torch.randn(2, 5))
        register_cost(ElementwiseLinear, lambda m, inputs, out: {"w": 1})
        assert CostModel(model, torch.randn(2, 5)).macs == 15
    finally:
        unregister_cost(ElementwiseLinear)


@pytest.mark.parametrize("fn,needle", [
    (lambda m, i, o: {"scale": i[0].shap[1]},
     r"the cost function registered for _CdistWrap raised AttributeError: 'Tensor' object has no attribute 'shap' "
     r"\(on module '0'\); fix it \(it is called as fn\(module, inputs, output\)"),
    (lambda m, i, o: 1 / 0, r"registered for _CdistWrap raised ZeroDivisionError: division by zero"),
    (lambda m, i, o: None, r"the cost function registered for _CdistWrap returned None \(on module '0'\); it must "
                           r"return \{parameter name: .*\} \(a plain dict\) or a prunekit\.ModuleCost"),
    (lambda m, i, o: 4, r"registered for _CdistWrap returned 4 \(type int\) .*must return"),
    (lambda m, i, o: {"scale": -1}, r"registered for _CdistWrap gave 'scale' -1 .*whole number >= 0"),
    (lambda m, i, o: {"scale": 1.5}, r"registered for _CdistWrap gave 'scale' 1\.5 .*whole number >= 0"),
])
def test_a_failing_or_ill_formed_cost_function_is_named_not_the_data(fn, needle):
    """An exception inside a registered cost function (or a return of another type) was reported as
    "the model failed on one example of its input ... pass data shaped as the model takes it": the
    data were fine. The line names the cost function, the exception's type and message."""
    from prunekit import register_cost
    from prunekit.costs import unregister_cost
    register_cost(_CdistWrap, fn)
    try:
        with pytest.raises(PrunekitError, match=needle) as caught:
            CostModel(nn.Sequential(_CdistWrap(), nn.Linear(24, 6)), torch.randn(2, 4, 6))
        assert "\n" not in str(caught.value) and "shaped as the model takes it" not in str(caught.value)
    finally:
        unregister_cost(_CdistWrap)


def test_masked_attention_projection_costs_nothing():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.zeros(1, 4, 8)
    costs = CostModel(mha, (x, x, x))
    with torch.no_grad():
        mha.in_proj_weight[:8] = 0                                  # the query projection
    counts = costs.count(mha)
    assert counts.macs == costs.macs - 8 * 8 * 4
    assert counts.params == costs.params - 64


def test_repeated_parameters_bias_kv_and_max_norm_embedding_are_counted():
    E, heads, T, B = 8, 2, 5, 2
    mha = nn.MultiheadAttention(E, heads, batch_first=True, add_bias_kv=True, add_zero_attn=True)
    x = torch.zeros(B, T, E)
    costs = CostModel(mha, (x, x, x))                   # bias_k/bias_v go through aten.repeat
    keys = T + 2                                        # + bias_k row + the zero-attention row
    assert costs.macs == 4 * E * E * T + 2 * T * keys * E
    assert costs.activation_macs == 2 * T * keys * E
    assert costs.params == sum(p.numel() for p in mha.parameters())

    class Tiled(nn.Module):                            # a repeated weight is still the weight
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(E, 3))

        def forward(self, x):
            return x @ self.w.repeat(2, 1)             # (B, T, 2E) @ (2E, 3): each element twice per token

    costs = CostModel(Tiled(), torch.zeros(B, T, 2 * E))
    assert costs.layer("w").is_weight_layer and costs.layer("w").macs == 2 * E * 3 * T
    assert costs.macs == 2 * E * 3 * T

    emb = nn.Embedding(50, E, max_norm=1.0)            # renormalises rows in place: no MACs
    costs = CostModel(emb, torch.randint(0, 50, (B, T)))
    assert costs.macs == 0 and costs.layer("").is_weight_layer


def test_learned_queries_through_a_layer_price_the_layers_weight():
    E, N, T, B = 8, 3, 5, 2

    class Latents(nn.Module):                           # Perceiver/DETR-style learned queries
        def __init__(self):
            super().__init__()
            self.latents = nn.Parameter(torch.randn(N, E))
            self.to_q = nn.Linear(E, E)

        def forward(self, x):
            q = self.to_q(self.latents.expand(x.shape[0], -1, -1))      # (B, N, E)
            return q @ x.transpose(1, 2)

    model = Latents()
    costs = CostModel(model, torch.zeros(B, T, E))
    assert costs.layer("to_q").is_weight_layer and costs.layer("to_q").macs == N * E * E
    assert not costs.layer("").is_weight_layer and costs.layer("").params == N * E
    assert costs.macs == N * E * E + N * E * T
    assert costs.params == sum(p.numel() for p in model.parameters())

    class Detr(nn.Module):
        def __init__(self):
            super().__init__()
            self.queries = nn.Embedding(N, E)
            self.attn = nn.MultiheadAttention(E, 2)

        def forward(self, x):                              # x (B, T, E); attention is sequence-first
            memory = x.transpose(0, 1)
            q = self.queries.weight.unsqueeze(1).repeat(1, x.shape[0], 1)
            return self.attn(q, memory, memory)[0]

    costs = CostModel(Detr(), torch.zeros(B, T, E))
    assert costs.layer("attn.in_proj_weight").macs == E * E * (N + 2 * T)
    assert costs.macs == E * E * (N + 2 * T) + E * E * N + 2 * N * T * E


def test_bilinear_weight_costs_one_mac_per_token():
    bil = nn.Bilinear(4, 5, 3)
    costs = CostModel(bil, (torch.zeros(2, 7, 4), torch.zeros(2, 7, 5)))
    assert costs.layer("").is_weight_layer and costs.layer("").macs_per_weight == 7
    assert costs.macs == 3 * 4 * 5 * 7
    assert costs.params == 3 * 4 * 5 + 3
    with torch.no_grad():
        bil.weight[0] = 0
    assert costs.count(bil).macs == 2 * 4 * 5 * 7


class _Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 3))

    def forward(self, x):                              # (B, T, 8) -> (B, 4, T, 3): a weight per head
        return torch.einsum("btf,hfo->bhto", x, self.w)


class _BmmExpanded(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 8, 3))

    def forward(self, x):
        return torch.bmm(x, self.w.expand(x.shape[0], -1, -1))


class _LeftMatmul(nn.Module):                          # a weight mixing tokens: (3, T) @ (B, T, 8)
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return self.w @ x


class _SharedFunctional(nn.Module):                    # one weight, two products
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.linear(nn.functional.linear(x, self.w), self.w.t())


class _Sdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.long, self.short = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.long(x) if x.shape[1] > 3 else self.short(x)


# (model, input, MACs per example by the textbook formula); B = 2, T = 5 tokens of 8 features
_X = torch.zeros(2, 5, 8)
FORMULA_CASES = {
    "conv3d": (nn.Conv3d(3, 5, (2, 3, 3), stride=(1, 2, 2), padding=1), torch.zeros(2, 3, 6, 8, 8),
               5 * 3 * 18 * (7 * 4 * 4)),
    "conv_transpose2d": (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), torch.zeros(2, 4, 5, 5),
                         4 * 6 * 9 * 25),                       # once per input position
    "conv_transpose2d_grouped_dilated": (nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2, dilation=2),
                                         torch.zeros(2, 4, 5, 7), 4 * 3 * 9 * 35),
    "conv_transpose1d": (nn.ConvTranspose1d(4, 6, 3, stride=3), torch.zeros(2, 4, 7), 4 * 6 * 3 * 7),
    "depthwise_multiplier": (nn.Conv2d(4, 8, 3, groups=4), torch.zeros(2, 4, 6, 6), 8 * 9 * 16),
    "conv1d_dilated_strided": (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), torch.zeros(2, 4, 21),
                               6 * 4 * 3 * 11),
    "conv_same_padding": (nn.Conv2d(3, 4, 3, padding="same", dilation=2), torch.zeros(2, 3, 9, 9), 4 * 27 * 81),
    "linear_4d": (nn.Linear(8, 7), torch.zeros(2, 3, 5, 8), 15 * 56),
    "einsum_heads": (_Einsum(), _X, 4 * 5 * 8 * 3),
    "bmm_expanded_weight": (_BmmExpanded(), _X, 5 * 8 * 3),
    "left_matmul": (_LeftMatmul(), _X, 3 * 5 * 8),
    "shared_functional": (_SharedFunctional(), _X, 2 * 5 * 64),
    "sdpa_causal": (_Sdpa(), _X, 5 * 8 * 24 + 5 * 64 + 2 * 5 * 5 * 8),
    "branch_long": (_ShapeBranch(), _X, 5 * 64),
    "branch_short": (_ShapeBranch(), torch.zeros(2, 2, 8), 2 * 16),
    "embedding": (nn.Embedding(50, 8), torch.zeros(2, 5, dtype=torch.long), 0),
}


@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_macs_match_the_textbook_formula(case):
    model, x, expected = FORMULA_CASES[case]
    costs = CostModel(model, x)
    assert costs.macs == expected
    assert costs.params == sum(p.numel() for p in model.parameters())


def test_flops_budget_recounts_by_hand_from_the_saved_nonzeros():
    import prunekit

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1, stride=2)
            self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True)
            self.shared = nn.Linear(4, 4)
            self.bil = nn.Bilinear(4, 4, 10)

        def forward(self, x):
            y = self.up(self.dw(torch.relu(self.conv(x))))           # (B, 4, 8, 8)
            t = nn.functional.avg_pool2d(y, 2).flatten(2).transpose(1, 2)     # 16 tokens of 4
            t = self.shared(self.shared(self.attn(t, t, t, need_weights=False)[0]))
            return self.bil(t.mean(1), t.amax(1))

    def by_hand(m):
        nz = lambda p: int(torch.count_nonzero(p))  # noqa: E731
        return (nz(m.conv.weight) * 64 + nz(m.dw.weight) * 16 + nz(m.up.weight) * 16
                + nz(m.attn.in_proj_weight) * 16 + nz(m.attn.out_proj.weight) * 16 + 2 * 16 * 17 * 4
                + 2 * nz(m.shared.weight) * 16 + nz(m.bil.weight))

    torch.manual_seed(0)
    X, Y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    model = Net()
    dense = by_hand(model)
    result = prunekit.prune(model, (X, Y), method="magnitude-flops", flops=0.5, example_input=X[:1])
    assert result.dense_macs == dense
    assert result.macs == by_hand(result.model) <= dense // 2


# --- batch-independent work and element-wise weights -------------------------------------

class _PositionsThroughLinear(nn.Module):     # a learned table through a Linear: no batch in it
    def __init__(self, T=5, E=8):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, E))
        self.fc = nn.Linear(E, E)

    def forward(self, x):                     # fc sees the T positions once and the B*T tokens
        return self.fc(x) + self.fc(self.pos)


class _QueriesProjectedThenExpanded(nn.Module):
    def __init__(self, N=3, E=8):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(N, E))
        self.to_q = nn.Linear(E, E)

    def forward(self, x):
        q = self.to_q(self.queries).expand(x.shape[0], -1, -1)         # projected once per batch
        return q @ x.transpose(1, 2)


class _MaskedTokens(nn.Module):               # a tuple input: a per-example mask and a shared table
    def __init__(self, E=8):
        super().__init__()
        self.fc = nn.Linear(E, E)

    def forward(self, x, mask, table):
        return self.fc(x * mask.unsqueeze(-1)).sum(1) + self.fc(table).sum(0)


@pytest.mark.parametrize("B", [1, 2, 4, 7])
def test_batch_independent_work_is_charged_once_at_any_batch(B):
    E, T, N = 8, 5, 3
    model = _PositionsThroughLinear(T, E)
    costs = CostModel(model, torch.zeros(B, T, E))
    assert costs.layer("fc").macs_per_weight == 2 * T                  # T tokens + T positions
    assert costs.macs == 2 * T * E * E
    with torch.no_grad():
        model.fc.weight[:3] = 0
    assert costs.count(model).macs == 2 * T * int(torch.count_nonzero(model.fc.weight))

    costs = CostModel(_QueriesProjectedThenExpanded(N, E), torch.zeros(B, T, E))
    assert costs.layer("to_q").macs == N * E * E
    assert costs.activation_macs == N * E * T and costs.macs == N * E * E + N * E * T

    # the mask (B, T) is cut with x (said by batched=: the model also runs with it whole); the
    # table (6, E), whose first dimension is not B, is not
    inputs = (torch.zeros(B, T, E), torch.ones(B, T), torch.zeros(6, E))
    costs = CostModel(_MaskedTokens(E), inputs, batched=(0, 1))
    assert costs.macs == (T + 6) * E * E and costs.batched == (0, 1)
    if B > 1:
        with pytest.raises(PrunekitError, match=r"input 1 .*batched=\(0, 1\).*batched=\(0,\)"):
            CostModel(_MaskedTokens(E), inputs)


class _SharedTable(nn.Module):                # x (B, T, E) per example; table (N, E) shared by the batch
    def __init__(self, E=8, O=8):
        super().__init__()
        self.fc = nn.Linear(E, O, bias=False)

    def forward(self, x, table):
        return self.fc(x).sum(1) + self.fc(table).sum(0)


def test_a_shared_input_as_long_as_the_batch_is_not_cut_to_one_row():
    E, T, B = 8, 5, 4
    by_hand = (T + B) * E * E                 # T tokens and the table's B rows through fc
    x, table = torch.zeros(B, T, E), torch.zeros(B, E)
    with pytest.raises(PrunekitError, match=r"input 1 \(shape \(4, 8\)\).*batched=\(0,\)"):
        CostModel(_SharedTable(E), (x, table))               # was cut to one row: (T + 1) E^2
    costs = CostModel(_SharedTable(E), (x, table), batched=(0,))
    assert costs.macs == by_hand and costs.batched == (0,)
    assert costs.count(_SharedTable(E, 5)).macs == (T + B) * E * 5      # a shrunk model's re-trace too
    assert CostModel(_SharedTable(E), (x[:1], table)).macs == by_hand   # B = 1: nothing is cut
    bil = nn.Bilinear(4, 5, 3)                 # a second input the model cannot take whole: it is cut
    assert CostModel(bil, (torch.zeros(B, 7, 4), torch.zeros(B, 7, 5))).batched == (0, 1)
    for bad in ((0, 2), (0, 1), ("0",)):                    # no input 2; 4 and 3 rows; not a position
        with pytest.raises(PrunekitError, match="batched="):
            CostModel(_SharedTable(E), (x, torch.zeros(3, E)), batched=bad)


class _ElementwiseLinear(nn.Module):          # y = x W^T written as a broadcast product and a sum
    def __init__(self, E=8, O=6):
        super().__init__()
        self.w = nn.Parameter(torch.randn(O, E))

    def forward(self, x):
        return (x.unsqueeze(-2) * self.w).sum(-1)


class _Scales(nn.Module):                     # parameters that scale an activation: no MACs
    def __init__(self, C=4):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(C))                  # channels-first LayerNorm affine
        self.gate = nn.Parameter(torch.ones(C, 1, 1))
        self.layer_scale = nn.Parameter(torch.full((C, 1, 1), 1e-6))
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        x = self.norm_weight[:, None, None] * x
        return x + self.layer_scale * self.conv(x * self.gate)


def test_a_weight_multiplied_element_wise_into_a_broadcast_activation_costs_its_products():
    E, O, T, B = 8, 6, 5, 3
    model, x = _ElementwiseLinear(E, O), torch.randn(B, T, E)
    linear = nn.Linear(E, O, bias=False)
    with torch.no_grad():
        linear.weight.copy_(model.w)
    assert torch.allclose(model(x), linear(x), atol=1e-5)
    costs = CostModel(model, x)
    assert costs.layer("w").is_weight_layer and costs.layer("w").macs_per_weight == T
    assert costs.macs == CostModel(linear, x).macs == T * O * E          # the Linear's count
    with torch.no_grad():
        model.w[:2] = 0
    assert costs.count(model).macs == T * 4 * E

    class Outer(nn.Module):                   # (B, C, 1) * (C, K): each weight once per example
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 7))

        def forward(self, x):
            return x.unsqueeze(-1) * self.w

    assert CostModel(Outer(), torch.zeros(B, 4)).macs == 4 * 7

    C = 4
    model = _Scales(C)
    costs = CostModel(model, torch.zeros(B, C, 6, 6))
    assert costs.macs == C * C * 36                                     # the 1x1 conv only
    assert [layer.name for layer in costs.weight_layers()] == ["conv"]
    assert costs.params == sum(p.numel() for p in model.parameters())


class _DotProducts(nn.Module):                # a scale summed along its own dimension: dot products
    def __init__(self, T=5, E=8):
        super().__init__()
        self.v = nn.Parameter(torch.randn(E))                           # additive attention's vector
        self.per_token = nn.Parameter(torch.randn(T, E))                # a weight per token
        self.gamma = nn.Parameter(torch.randn(E))                       # a scale, then a pool over tokens

    def forward(self, x):                     # x (B, T, E)
        scores = (torch.tanh(x) * self.v).sum(-1)
        mixed = torch.mean(x * self.per_token, dim=(1, 2), keepdim=True)
        pooled = (self.gamma.expand_as(x) * x).mean(1)
        return scores.sum() + mixed.sum() + pooled.sum()


def test_a_scale_summed_along_the_weights_dimension_is_a_dot_product():
    T, E, B = 5, 8, 3
    model = _DotProducts(T, E)
    costs = CostModel(model, torch.randn(B, T, E))
    assert costs.layer("v").macs_per_weight == T                        # once per token
    assert costs.layer("per_token").macs_per_weight == 1
    assert not costs.has_layer("gamma") and costs.layer("").params == E     # stays a scale
    assert costs.macs == T * E + T * E
    with torch.no_grad():
        model.v[:3] = 0
    assert costs.count(model).macs == T * (E - 3) + T * E


# --- a weight made in forward from two parameters ------------------------------------------

class _LowRank(nn.Module):                    # W = U @ V (O, E), made in forward, then x W^T
    def __init__(self, E=6, O=5, r=3):
        super().__init__()
        self.U = nn.Parameter(torch.randn(O, r))
        self.V = nn.Parameter(torch.randn(r, E))

    def forward(self, x):
        return nn.functional.linear(x, self.U @ self.V)


class _MergedLora(nn.Module):                 # W0 + B A: a merged low-rank update
    def __init__(self, E=6, r=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, E))
        self.lora_b, self.lora_a = nn.Parameter(torch.randn(E, r)), nn.Parameter(torch.randn(r, E))

    def forward(self, x):
        return nn.functional.linear(x, self.weight + self.lora_b @ self.lora_a)


def _factor_costs_by_hand(U, V):
    """Each MAC U[i, l] V[l, j] of U @ V charged to U if i + j is even, else to V: per-element
    costs and the MACs a sparse product does (both factors nonzero)."""
    cost_u, cost_v, sparse = torch.zeros_like(U, dtype=torch.int64), torch.zeros_like(V, dtype=torch.int64), 0
    for i in range(U.shape[0]):
        for l in range(U.shape[1]):
            for j in range(V.shape[1]):
                if (i + j) % 2 == 0:
                    cost_u[i, l] += 1
                else:
                    cost_v[l, j] += 1
                sparse += int(U[i, l] != 0 and V[l, j] != 0)
    return cost_u, cost_v, sparse


def test_a_product_of_two_parameters_charges_each_mac_to_one_factor():
    E, O, r, T, B = 6, 5, 3, 4, 2
    model = _LowRank(E, O, r)
    costs = CostModel(model, torch.randn(B, T, E))              # was refused: "no cost rule"
    made, applied = O * r * E, T * O * E                        # W once per forward; x W^T per token
    assert costs.macs == made + applied and costs.activation_macs == applied
    cost_u, cost_v, _ = _factor_costs_by_hand(model.U, model.V)
    assert torch.equal(costs.layer("U").weight_costs(), cost_u.reshape(-1))
    assert torch.equal(costs.layer("V").weight_costs(), cost_v.reshape(-1))
    from prunekit.params import ParamSpace
    assert ParamSpace(model, costs=costs).names() == ["U", "V"]
    with torch.no_grad():                                        # prune a column of U, a row of V, one more
        model.U[:, 0] = 0
        model.V[1] = 0
        model.V[2, 3] = 0
    cost_u, cost_v, sparse = _factor_costs_by_hand(model.U, model.V)
    counted = costs.count(model).macs
    assert counted == applied + int(cost_u[model.U != 0].sum() + cost_v[model.V != 0].sum())
    assert applied + sparse <= counted < made + applied          # never below the sparse product
    assert sparse == O * (E - 1)                      # rank 2 alone survives, less one column of V

    lora = _MergedLora(E, 2)
    costs = CostModel(lora, torch.randn(B, T, E))
    assert costs.layer("lora_b").macs + costs.layer("lora_a").macs == E * 2 * E
    assert not costs.layer("").is_weight_layer and costs.layer("").params == E * E     # W0 only added
    assert costs.macs == E * 2 * E + T * E * E and costs.activation_macs == T * E * E


class _SummedParameterProducts(nn.Module):   # element-wise products of two parameters, summed
    def __init__(self, n=3, k=4, m=2, c=5):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(n, k)), nn.Parameter(torch.randn(n, k))    # row dots
        self.c, self.d = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))          # one dot
        self.p, self.q = nn.Parameter(torch.randn(n, k)), nn.Parameter(torch.randn(m, k))    # p q^T

    def forward(self, x):                     # x (B, n)
        rows = (self.a * self.b).sum(-1)                              # (n,)
        total = (self.c * self.d).sum()                               # ()
        table = (self.p.unsqueeze(1) * self.q).sum(-1)                # (n, m)
        return (x * rows) @ table + total


def _checkerboard_costs_by_hand(a, b, shape, index_a, index_b):
    """Each product at (i0, i1, ...) of ``shape`` (a's element index_a(i), b's index_b(i)) charged to
    a if i0 + i1 + ... is even, else to b: per-element costs and the MACs a sparse product does."""
    cost_a, cost_b, sparse = torch.zeros_like(a, dtype=torch.int64), torch.zeros_like(b, dtype=torch.int64), 0
    for i in itertools.product(*[range(n) for n in shape]):
        if sum(i) % 2 == 0:
            cost_a[index_a(i)] += 1
        else:
            cost_b[index_b(i)] += 1
        sparse += int(a[index_a(i)] != 0 and b[index_b(i)] != 0)
    return cost_a, cost_b, sparse


def _summed_products_by_hand(model, n=3, k=4, m=2, c=5):
    same = lambda i: i  # noqa: E731
    return [_checkerboard_costs_by_hand(model.a, model.b, (n, k), same, same),
            _checkerboard_costs_by_hand(model.c, model.d, (c,), same, same),
            _checkerboard_costs_by_hand(model.p, model.q, (n, m, k), lambda i: (i[0], i[2]),
                                        lambda i: (i[1], i[2]))]


def test_a_summed_element_wise_product_of_two_parameters_charges_each_mac_to_one_factor():
    n, k, m, c, B = 3, 4, 2, 5, 2
    model = _SummedParameterProducts(n, k, m, c)
    costs = CostModel(model, torch.randn(B, n))                   # was 0 MACs, no refusal
    applied = n * m                                               # (x * rows) @ table, per sample
    assert costs.activation_macs == applied
    assert costs.macs == n * k + c + n * m * k + applied          # 12 + 5 + 24 + 6 = 47
    for (cost_a, cost_b, _), (name_a, name_b) in zip(_summed_products_by_hand(model),
                                                      [("a", "b"), ("c", "d"), ("p", "q")]):
        assert torch.equal(costs.layer(name_a).weight_costs(), cost_a.reshape(-1)), name_a
        assert torch.equal(costs.layer(name_b).weight_costs(), cost_b.reshape(-1)), name_b
    with torch.no_grad():                                         # prune in both factors of each
        model.a[0] = 0
        model.b[:, 1] = 0
        model.c[1:3] = 0
        model.d[4] = 0
        model.p[2] = 0
        model.q[0, 0] = 0
    by_hand = _summed_products_by_hand(model)
    counted = costs.count(model).macs
    factors = [(model.a, model.b), (model.c, model.d), (model.p, model.q)]
    assert counted == applied + sum(int(ca[a != 0].sum() + cb[b != 0].sum())
                                    for (ca, cb, _), (a, b) in zip(by_hand, factors))
    sparse = sum(s for _, _, s in by_hand)
    assert sparse == (n - 1) * (k - 1) + (c - 3) + (n - 1) * (m * k - 1)         # 6 + 2 + 14 = 22
    assert applied + sparse <= counted < costs.macs               # never below the sparse product


class _OwnQueryOnChildVector(nn.Module):    # the module's own query dotted with a child's vector
    def __init__(self, k=4):
        super().__init__()
        self.child = nn.Module()
        self.child.w = nn.Parameter(torch.randn(k))
        self.q = nn.Parameter(torch.randn(k))

    def forward(self, x):                     # x (B, n)
        return x * (self.q * self.child.w).sum(-1)


def test_a_summed_product_of_parameters_of_different_standing_charges_the_running_modules_own():
    # As with q @ W: the running module's own parameter is the weight, the other its input.
    k = 4
    costs = CostModel(_OwnQueryOnChildVector(k), torch.randn(2, 3))    # was 0 MACs
    assert costs.macs == k and costs.layer("q").macs_per_weight == 1
    assert not costs.has_layer("child.w")


class _DotProductsThroughViews(nn.Module):    # scales summed along w through a view or copy of the product
    def __init__(self, E=8, heads=2):
        super().__init__()
        self.heads = heads
        self.v = nn.Parameter(torch.randn(E))                           # per-head scores, H x (E / H)
        self.u = nn.Parameter(torch.randn(E))                           # transposed, reshaped (a copy)
        self.q = nn.Parameter(torch.randn(1, E))                        # nansum of a viewed parameter
        self.gamma = nn.Parameter(torch.randn(E))                       # a scale, pooled over tokens

    def forward(self, x):                     # x (B, T, E)
        B, T, E = x.shape
        heads = (x * self.v).view(B, T, self.heads, E // self.heads).sum(-1)
        flat = (x * self.u).transpose(1, 2).reshape(B, -1).sum(-1)
        scores = torch.nansum(x * self.q.view(-1), -1)
        pooled = (x * self.gamma).view(B, T, self.heads, -1).sum(1)
        return heads.sum() + flat.sum() + scores.sum() + pooled.sum()


def test_a_scale_summed_through_a_view_of_the_product_is_a_dot_product():
    T, E, B = 5, 8, 3
    model = _DotProductsThroughViews(E)
    costs = CostModel(model, torch.randn(B, T, E))              # was 0 MACs: the views hid the sums
    for name in ("v", "u", "q"):
        assert costs.layer(name).macs_per_weight == T, name     # once per token
    assert not costs.has_layer("gamma")                        # stays a scale
    assert costs.macs == 3 * T * E
    with torch.no_grad():
        model.v[:3] = 0
        model.q[0, 5:] = 0
    assert costs.count(model).macs == T * (E - 3) + T * E + T * 5


def test_weight_normalization_is_told_to_be_folded_first():
    """register_cost(Linear, fn), which the generic refusal suggested, cannot see a weight made from
    g and v before the call: pruning it is refused naming the fold (or exclude=); since session 55
    the weight it makes is counted where the layer uses it (the parametrization's own ops, once per
    call, are not MACs), so the unfolded and folded models count as the same Linear layers."""
    import prunekit
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(10, 20))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(20, 3))
    assert CostModel(model, torch.randn(2, 10)).macs == 10 * 20 + 20 * 3
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    with pytest.raises(PrunekitError, match=r"^0\.weight is under a torch parametrization \(_WeightNorm\).*"
                                            r"remove_parametrizations\(module, 'weight'\), or exclude '0'$"):
        prunekit.prune(model, (x, y), method="magnitude", sparsity=0.5)
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    assert CostModel(model, torch.randn(2, 10)).macs == 10 * 20 + 20 * 3



def test_each_refusal_of_an_unpriced_parameter_is_reached():
    """The three refusals of a parameter used by an op without a cost rule, each by the input that
    reaches it now that a parametrization's own ops are not traced (session 55): the old-form weight
    norm (a forward pre-hook making the weight from g and v, outside any parametrization), a
    parametrization's original read by the model's own code, and any other parameter (the root's)."""
    import warnings
    from torch.nn.utils import parametrize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # torch.nn.utils.weight_norm is deprecated
        old_form = nn.utils.weight_norm(nn.Linear(8, 8))
    with pytest.raises(PrunekitError, match=r"^module '0' has weight normalization \(its weight is made from "
                                            r"0\.weight_g, 0\.weight_v before each call\).*remove_weight_norm"):
        CostModel(nn.Sequential(old_form, nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 8))

    class Abs(nn.Module):
        def forward(self, w):
            return w.abs()

    class ReadsOriginal(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 8)
            parametrize.register_parametrization(self.layer, "weight", Abs())

        def forward(self, x):
            return x @ torch.cumsum(self.layer.parametrizations.weight.original, 0).t()

    with pytest.raises(PrunekitError, match=r"^layer\.weight is under a torch parametrization, made anew before each "
                                            r"call from layer\.parametrizations\.weight\.original by aten\.cumsum"):
        CostModel(ReadsOriginal(), torch.randn(2, 8))

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ torch.cumsum(self.w, 0).t()

    with pytest.raises(PrunekitError, match=r"^cannot count the MACs of parameter 'w' \(module '\(root\)', Root\): "
                                            r"it is used by the operation aten\.cumsum"):
        CostModel(Root(), torch.randn(2, 8))


class Conv1D(nn.Module):
    """HuggingFace's GPT-2 Conv1D in small: a Linear whose weight is stored (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class _TiedLM(nn.Module):
    """GPT-2 in small: token embedding, Conv1D MLP, an lm_head whose weight is the embedding's."""

    def __init__(self, vocab=50, width=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.fc, self.proj = Conv1D(32, width), Conv1D(width, 32)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids)
        return self.lm_head(x + self.proj(torch.relu(self.fc(x))))


def test_conv1d_style_layers_are_counted_as_linear_and_a_tied_weight_names_its_other_use():
    costs = CostModel(_TiedLM(), torch.randint(50, (1, 6)))
    rows = {layer.name: layer for layer in costs.layers}
    assert rows["fc"].kind == "Conv1D" and rows["fc"].macs == 6 * 8 * 32       # tokens x in x out
    assert rows["proj"].kind == "Conv1D" and rows["proj"].macs == 6 * 32 * 8
    assert "unknown" not in rows["fc"].kind + rows["proj"].kind
    assert rows["wte"].kind == "Embedding (+ tied use in lm_head, its MACs counted here)"
    assert rows["wte"].macs == 6 * 8 * 50                                     # the vocabulary projection
    assert rows["lm_head"].kind == "Linear (weight tied to wte: its MACs on that row)"
    assert rows["lm_head"].macs == 0


# --- time-first sequence layers, TorchScript submodules, dict inputs ---------------------------

class _LastStep(nn.Module):                   # LSTM(F, H) then Linear(H, 3) on the last step's output
    def __init__(self, F=5, H=6, batch_first=False, transpose=False):
        super().__init__()
        self.rnn, self.fc, self.transpose = nn.LSTM(F, H, batch_first=batch_first), nn.Linear(H, 3), transpose

    def forward(self, x):                     # x: (T, B, F) time first, or (B, T, F) if batch_first/transpose
        out = self.rnn(x.transpose(0, 1) if self.transpose else x)[0]
        return self.fc(out[-1] if not self.rnn.batch_first else out[:, -1])


class _Series(nn.Module):                     # (B, N, T, F): N series per example, run as a (T, B*N, F) batch
    def __init__(self, N=3, F=5, H=6):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(F, H), nn.Linear(N * H, 2)

    def forward(self, x):
        B, N = x.shape[:2]
        return self.fc(self.rnn(x.flatten(0, 1).transpose(0, 1))[0][-1].reshape(B, -1))


def test_a_time_first_layer_fed_time_first_is_refused_and_batch_first_input_counted_by_hand():
    """CostModel cuts dim 0 to one example: on a time-first (T, B, F) input that is one time step
    (an LSTM of T=7 counted 1,128 MACs at B=4, 282 at B=1, by hand 1,866), silently."""
    T, F, H = 7, 5, 6
    lstm_by_hand = T * 4 * H * (F + H) + H * 3                                  # 1,866
    D = 8                                     # MHA: in-projections, QK^T and AV, out-projection
    mha_by_hand = T * 3 * D * D + 2 * T * T * D + T * D * D                     # 2,576 at T = 7
    layer_by_hand = mha_by_hand + T * (D * 16 + 16 * D)                         # + the feed-forward
    time_first = [(_LastStep(F, H), torch.randn(T, 4, F)), (_LastStep(F, H), torch.randn(T, 1, F)),
                  (nn.TransformerEncoderLayer(D, 2, 16), torch.randn(T, 3, D)),
                  (_LastStep(F, H, batch_first=True, transpose=True), torch.randn(T, 4, F))]
    for model, x in time_first:
        with pytest.raises(PrunekitError, match=r"module '(rnn|self_attn)' \((LSTM|MultiheadAttention), batch_first="
                                                r"(False|True)\) takes its input .*one time step.*batch_first=True"):
            CostModel(model, x)
    for B in (1, 4):
        assert CostModel(_LastStep(F, H, batch_first=True), torch.randn(B, T, F)).macs == lstm_by_hand
        assert CostModel(_LastStep(F, H, transpose=True), torch.randn(B, T, F)).macs == lstm_by_hand
        assert CostModel(nn.TransformerEncoderLayer(D, 2, 16, batch_first=True), torch.randn(B, T, D)).macs \
            == layer_by_hand
        N = 3                                 # a time-first layer whose batch is B*N per B examples: fine
        assert CostModel(_Series(N, F, H), torch.randn(B, N, T, F)).macs == N * T * 4 * H * (F + H) + N * H * 2


class _Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = torch.jit.script(nn.Sequential(nn.Linear(8, 16), nn.ReLU()))
        self.h = nn.Linear(16, 2)

    def forward(self, x):
        return self.h(self.s(x))


def test_a_torchscript_submodule_is_refused_by_name_in_counts_and_prune():
    """It raised torch's RuntimeError 'register_forward_pre_hook is not supported on ScriptModules'."""
    import prunekit
    with pytest.raises(PrunekitError, match=r"submodule 's' is a TorchScript module.*before scripting"):
        CostModel(_Scripted(), torch.randn(2, 8))
    with pytest.raises(PrunekitError, match=r"the model is a TorchScript module"):
        CostModel(torch.jit.script(nn.Linear(8, 2)), torch.randn(2, 8))
    data = (torch.randn(32, 8), torch.randint(0, 2, (32,)))
    with pytest.raises(PrunekitError, match=r"submodule 's' is a TorchScript module"):
        prunekit.prune(_Scripted(), data, sparsity=0.5)


class _TwoInputs(nn.Module):                  # forward takes a dict
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(5, 4)

    def forward(self, d):
        return torch.cat([self.a(d["img"]), self.b(d["txt"]).mean(1)], 1)     # (B, 8)


class _Positional(nn.Module):                 # the wrapper the refusal names
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, img, txt):
        return self.model({"img": img, "txt": txt})


def test_a_dict_input_is_named_with_the_wrapper_that_counts_it():
    """A dict was refused as if it were a bad tensor ('a batched tensor (B, ...) ... or a tuple')."""
    img, txt = torch.randn(3, 8), torch.randn(3, 7, 5)
    for example in ({"img": img, "txt": txt}, ({"img": img, "txt": txt},)):
        with pytest.raises(PrunekitError, match=r"is or holds a dict.*wrap the model.*as a tuple \(img, txt\)"):
            CostModel(_TwoInputs(), example)
    assert CostModel(_Positional(_TwoInputs()), (img, txt)).macs == 8 * 4 + 7 * 5 * 4


class _ByBatchSize(nn.Module):            # a 'single example' fast path
    def __init__(self):
        super().__init__()
        self.small, self.big1, self.big2 = nn.Linear(8, 3), nn.Linear(8, 256), nn.Linear(256, 3)

    def forward(self, x):
        return self.small(x) if x.shape[0] == 1 else self.big2(torch.relu(self.big1(x)))


def test_a_forward_that_branches_on_the_batch_size_is_warned_of_naming_the_path_counted():
    """On a batch of 4 the count is of the batch-1 path (24 MACs, where the model does 2816 per
    example) and prune reports 50% kept where the model as run keeps 100%: said in a warning (it
    was silent; the merged check refused it, and with it valid models whose paths differ on one side)."""
    import warnings
    import prunekit
    from prunekit.errors import PrunekitWarning
    x = torch.randn(4, 8)
    said = r"one example of {} than on two \(small only on one; big1, big2 only on two\).*counted on that path"
    with pytest.warns(PrunekitWarning, match=said.format("example_input") + ".*same path at every batch size"):
        assert CostModel(_ByBatchSize(), x).macs == 24
    with pytest.warns(PrunekitWarning, match=said.format("example_input")):
        prunekit.prune(_ByBatchSize(), None, method="magnitude", flops=0.5, example_input=x)
    with pytest.warns(PrunekitWarning, match=said.format("the first batch of data")):
        prunekit.prune(_ByBatchSize(), (x, torch.randint(0, 3, (4,))), method="magnitude", flops=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CostModel(_ByBatchSize(), x[:1]).macs == 24      # at batch 1 the model runs its batch-1 path


class _TimeFirstLoop(nn.Module):          # x (T, B, 5): a cell over x[t], no batch_first flag anywhere
    def __init__(self):
        super().__init__()
        self.c, self.h = nn.GRUCell(5, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.zeros(x.shape[1], 8)
        for t in range(x.shape[0]):
            h = self.c(x[t], h)
        return self.h(h)


class _BatchFirst(nn.Module):             # the wrapper the refusal names
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.transpose(0, 1))


def test_a_time_first_loop_is_counted_through_the_batch_first_wrapper():
    """A time-first loop over a cell, with no torch sequence layer to see, cannot be told from a
    model with a fixed-size output (README, Counting): the batch-first wrapper counts it."""
    per_example = 6 * 24 * (5 + 8) + 8 * 2          # six steps of the cell's two products, then the head
    assert CostModel(_BatchFirst(_TimeFirstLoop()), torch.randn(3, 6, 5)).macs == per_example


def _lazy():
    return nn.Sequential(nn.LazyConv2d(6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def test_a_lazy_module_not_made_yet_is_refused_naming_the_forward_that_makes_it(tmp_path):
    """CostModel and prune raised torch's ValueError 'Attempted to use an uninitialized parameter'."""
    import prunekit
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(PrunekitError, match=r"lazy modules '0' \(LazyConv2d\), '3' \(LazyLinear\) have no "
                                            r"parameters yet.*run the model once"):
        CostModel(_lazy(), x)
    with pytest.raises(PrunekitError, match=r"lazy modules '0' \(LazyConv2d\), '3' \(LazyLinear\)"):
        prunekit.prune(_lazy(), None, method="magnitude", flops=0.5, example_input=x)
    model = _lazy()
    model(x[:1])
    assert CostModel(model, x).macs == 6 * 2 * 9 * 16 + 96 * 3


def test_a_lazy_model_on_the_command_line_is_refused_in_one_line_or_counted_from_its_checkpoint(
        tmp_path, monkeypatch, capsys):
    """`prunekit info net.py:lazy` printed a traceback (rc 1); with --checkpoint the shape check
    raised torch's RuntimeError on the lazy parameters before load_state_dict could make them."""
    import json
    from prunekit.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text("from torch import nn\n"
                                     "def lazy(): return nn.Sequential(nn.LazyConv2d(6, 3), nn.ReLU(), nn.Flatten(), "
                                     "nn.LazyLinear(3))\n")
    model = _lazy()
    model(torch.zeros(1, 2, 6, 6))
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    info = ["info", "net.py:lazy", "--input-shape", "2,6,6"]
    assert main(info) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "make the builder run the model once" in err and out == ""
    assert main([*info, "--checkpoint", "ck.pt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == 6 * 2 * 9 * 16 + 96 * 3


# --- the cut check's false refusals (review of session 56): valid models counted ------------

def _quiet_count(model, x):
    """``CostModel(model, x).macs``, any warning an error (a valid model is counted, said nothing)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return CostModel(model, x).macs


def _quiet_prune(model, data=None, **kwargs):
    import warnings
    import prunekit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return prunekit.prune(model, data, method="magnitude", sparsity=0.5, **kwargs)


class _Packed(nn.Module):                 # a padded-sequence encoder: (B, T) ids, 0 pads
    def __init__(self):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(50, 16, padding_idx=0), nn.LSTM(16, 16, batch_first=True)
        self.att, self.head = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 3)

    def forward(self, tok):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        packed = pack_padded_sequence(self.emb(tok), (tok != 0).sum(1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)    # (B, the longest row, 16)
        return self.head(self.att(h, h, h)[0].mean(1))


class _Trimmed(nn.Module):                # padding trimmed to the batch's longest row
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(50, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, tok):
        tok = tok[:, :int((tok != 0).sum(1).max())]
        return self.head(self.rnn(self.emb(tok))[0][:, -1])


def test_a_sequence_padded_to_the_batchs_longest_row_is_counted():
    """The merged check refused these: the attention's time dimension was 3 on one example and 10
    on two ("the count would be of one time step"), though nothing was cut to one step."""
    tok = torch.randint(1, 50, (4, 10))
    tok[0, 3:] = 0                                # row 0: 3 tokens, row 1: 10
    assert _quiet_count(_Packed(), tok) == _quiet_count(_Packed(), tok[:1])     # row 0, as it runs alone
    _quiet_prune(_Packed(), (tok, torch.randint(0, 3, (4,))))
    assert _quiet_count(_Trimmed(), tok) == 3 * 4 * 8 * 16 + 8 * 3               # row 0's three steps
    _quiet_prune(_Trimmed(), example_input=tok)


class _CachedBias(nn.Module):             # a batch-independent result cached in eval mode
    def __init__(self):
        super().__init__()
        self.mlp, self.fc, self.cache = nn.Linear(2, 8), nn.Linear(8, 8), None

    def forward(self, x):
        if self.training or self.cache is None:
            bias = self.mlp(torch.ones(1, 2))
            if not self.training:
                self.cache = bias
        else:
            bias = self.cache
        return self.fc(x) + bias


class _NamedBatchFirst(nn.Module):        # a module of the user's with a bool batch_first, taking (B, T) ids
    def __init__(self):
        super().__init__()
        self.batch_first = True
        self.emb, self.rnn, self.head = nn.Embedding(50, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, tok):
        return self.head(self.rnn(self.emb(tok))[0][:, -1])


def test_a_cached_submodule_and_a_batch_first_attribute_of_the_users_are_counted():
    """Refused by the merged check: the cache (filled by the trace's forward) ran 'mlp only on one';
    the user's module with batch_first=True taking (B, T) ids was 'unbatched (T, ...)'."""
    x = torch.randn(4, 8)
    assert _quiet_count(_CachedBias(), x) == 2 * 8 + 8 * 8
    _quiet_prune(_CachedBias(), example_input=x)
    tok = torch.randint(1, 50, (4, 7))
    assert _quiet_count(_NamedBatchFirst(), tok) == 7 * 4 * 8 * 16 + 8 * 3
    _quiet_prune(_NamedBatchFirst(), example_input=tok)


class _Loss(nn.Module):                   # a (1,) loss, DataParallel style
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x).pow(2).mean().view(1)


class _LossAndHistogram(_Loss):
    def forward(self, x):
        y = self.fc(x)
        return y.pow(2).mean(), torch.bincount(y.argmax(1), minlength=3).float()


class _Detections(nn.Module):             # (N, 6): image index, score, box of each detection in the batch
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        out = self.head(x).permute(0, 2, 3, 1).flatten(1, 2)               # (B, H*W, 5)
        keep = out[..., 0] > 0
        index = torch.arange(x.shape[0])[:, None].expand(keep.shape)[keep].float()
        return torch.cat([index[:, None], out[keep]], 1)


def test_outputs_that_do_not_grow_with_the_batch_are_counted():
    """Refused by the merged check ('output has the same shape on one example as on two'): a (1,)
    loss, a scalar loss beside a (3,) histogram, detections of which the second image has none."""
    x = torch.randn(4, 8)
    assert _quiet_count(_Loss(), x) == 24
    assert _quiet_count(_LossAndHistogram(), x) == 24
    torch.manual_seed(0)
    model, images = _Detections(), torch.randn(4, 3, 4, 4)
    images[1] = -100 * torch.sign(model.head.weight[0, :, 0, 0]).detach()[:, None, None]   # image 1: no score > 0
    with torch.no_grad():
        found = (model.head(images)[:, 0] > 0).flatten(1).sum(1)
    assert found[1] == 0 and found[0] > 0
    assert _quiet_count(model, images) == 16 * 3 * 5


class _NoisyRouting(nn.Module):           # noisy top-1 gating kept on at inference
    def __init__(self):
        super().__init__()
        self.gate, self.experts = nn.Linear(8, 4), nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        route = (self.gate(x) + 3 * torch.randn(x.shape[0], 4)).argmax(1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if (route == e).any():
                y[route == e] = expert(x[route == e])
        return self.head(y)


def test_random_routing_is_counted_not_refused():
    """The merged check refused it on 11 of 20 seeds ('another path at batch 1'); now counted, on
    the path of the example counted (a warning says so when both sides differ)."""
    import warnings
    for seed in range(20):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert CostModel(_NoisyRouting(), torch.randn(4, 8)).macs == 8 * 4 + 8 * 8 + 8 * 3


class _Drawing(nn.Module):                # draws noise in eval, counts its forwards in a buffer
    def __init__(self):
        super().__init__()
        self.fc, self.rnn = nn.Linear(8, 8), nn.GRU(8, 8, batch_first=True)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):                 # x (B, T, 8)
        self.calls += 1
        return self.rnn(self.fc(x + 0.1 * torch.randn_like(x)))[0]


def test_the_checks_forwards_leave_the_rng_and_the_buffers_and_prune_traces_once():
    """The check's forwards drew from torch's global RNG (prune promises it back as it was) and
    counted in the model's buffers; prune made 3 forwards (check on one, check on two, trace)."""
    x = torch.randn(4, 5, 8)
    for count in (lambda m: CostModel(m, x), lambda m: _quiet_prune(m, example_input=x)):
        model = _Drawing()
        torch.manual_seed(0)
        count(model)
        after = torch.rand(1)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(1))
        assert int(model.calls) == 1                        # the trace's forward: the check's left no trace


def test_a_batch_path_warning_under_torchrun_is_rank_0s_on_every_rank(monkeypatch):
    """The path may be random (routing): each rank would say what it drew. A rank other than 0
    gives rank 0's warning, found or not on its own."""
    from prunekit import distributed
    from prunekit.errors import PrunekitWarning
    from prunekit.request import PruneRequest
    told = ("rank 0's path warning", "rank 0's path warning, for the command line")

    class Rank1:
        rank, distributed, world_size = 1, True, 2

        def broadcast_object(self, obj):
            assert obj is None                              # rank 1 sends nothing
            return told
    monkeypatch.setattr(distributed, "current", lambda: Rank1())
    with pytest.warns(PrunekitWarning, match="rank 0's path warning"):
        PruneRequest(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(1, 8), "magnitude",
                     {"sparsity": 0.5}).plan()
