"""A gallery of model shapes for the counting tests, and an independent MAC counter.

The counter here shares no code with ``prunekit.costs``: forward hooks on the module types the
gallery uses, each with its textbook formula on the *nonzero* weights. Attention projections
are priced per token (queries for W_q and W_o, keys/values for W_k/W_v), attention products
at 2·Lq·Lk·E, recurrent weights once per time step.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.zoo.vit import VisionTransformer


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


class BranchyCNN(nn.Module):
    """Depthwise, grouped (groups=2), concatenation and residual-with-projection branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2, bias=False),
                                     nn.BatchNorm2d(32), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48),
                                 nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48))
        self.proj = nn.Sequential(nn.Conv2d(32, 48, 1, stride=2, bias=False), nn.BatchNorm2d(48))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.grouped(self.dw(self.stem(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.relu(self.res(x) + self.proj(x))
        return self.fc(self.pool(x).flatten(1))


class DenseBlockCNN(nn.Module):
    """DenseNet-style: each layer's features concatenated to its input, BatchNorm-ReLU-Conv on
    the concatenation (so BatchNorm sees a group at an offset), a transition, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, bias=False))
        self.layer2 = nn.Sequential(nn.BatchNorm2d(14), nn.ReLU(), nn.Conv2d(14, 6, 3, padding=1, bias=False))
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 12, 1, bias=False),
                                        nn.AvgPool2d(4))
        self.head = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.layer1(x)], 1)
        x = torch.cat([x, self.layer2(x)], 1)
        return self.head(self.transition(x).flatten(1))


class RowEncoder(nn.Module):
    """MNIST rows as 28 tokens, nn.TransformerEncoderLayer x2, mean over tokens."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(28, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(1))


class RowLSTM(nn.Module):
    """MNIST rows as 28 time steps of an LSTM; the last hidden state classifies."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(28, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        out, _ = self.rnn(x.flatten(1, 2))
        return self.head(out[:, -1])


def small_vit() -> nn.Module:
    return VisionTransformer(dim=32, depth=2, heads=4, mlp_dim=64)


GALLERY = {"mlp": MLP, "cnn": BranchyCNN, "densenet": DenseBlockCNN, "vit": small_vit, "encoder": RowEncoder,
           "lstm": RowLSTM}


def independent_count(model: nn.Module, x: torch.Tensor) -> dict:
    """Nonzero weights and MACs per example of ``model`` on ``x`` (B, ...), by module hooks.

    Returns {"macs", "nonzeros", "weights"} where ``weights`` is the number of weight elements
    of the multiplied tensors (the prunable set) and ``nonzeros`` how many are not zero.
    """
    total = {"macs": 0}
    seen: dict[int, torch.Tensor] = {}

    def nz(t):
        seen[id(t)] = t
        return int((t != 0).sum())

    def linear(m, inputs, out):
        total["macs"] += nz(m.weight) * (out.numel() // out.shape[-1])

    def conv(m, inputs, out):
        total["macs"] += nz(m.weight) * out.shape[0] * out[0, 0].numel()

    def attention(m, inputs, out):
        q, k = inputs[0], inputs[1]
        assert m.batch_first and m._qkv_same_embed_dim
        E, lq, lk, b = m.embed_dim, q.shape[1], k.shape[1], q.shape[0]
        w = m.in_proj_weight
        seen[id(w)] = w
        total["macs"] += b * (int((w[:E] != 0).sum()) * lq + int((w[E:] != 0).sum()) * lk
                              + nz(m.out_proj.weight) * lq + 2 * lq * lk * E)

    def slim_attention(m, inputs, out):      # prunekit's attention with heads removed
        q, k = inputs[0], inputs[1]
        inner, lq, lk, b = m.num_heads * m.head_dim, q.shape[1], k.shape[1], q.shape[0]
        w = m.in_proj_weight                 # its out_proj is an nn.Linear it calls: hooked as one
        seen[id(w)] = w
        total["macs"] += b * (int((w[:inner] != 0).sum()) * lq + int((w[inner:] != 0).sum()) * lk
                              + 2 * lq * lk * inner)

    def recurrent(m, inputs, out):
        x = inputs[0]
        tokens = x.shape[0] * x.shape[1]
        total["macs"] += tokens * sum(nz(p) for n, p in m.named_parameters() if n.startswith("weight"))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention))
        elif type(m).__name__ == "SlimAttention":
            assert m.batch_first
            handles.append(m.register_forward_hook(slim_attention))
        elif isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.LSTM):
            handles.append(m.register_forward_hook(recurrent))
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():        # the fused fast path of attention does not run with grad on
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    b = x.shape[0]
    assert total["macs"] % b == 0
    return {"macs": total["macs"] // b, "nonzeros": sum(int((t != 0).sum()) for t in seen.values()),
            "weights": sum(t.numel() for t in seen.values())}
