"""Session 27: CostModel's count against a hand count on three tiny models (a shared input as long
as the batch, a weight made from two parameters, a dot product summed through a view of the
product), and the time to build the CostModel of two zoo models.

    PYTHONPATH=src python benchmarks/bench_cost_edges.py

Runs on code before the session too (then ``batched=`` does not exist: that row says so).
"""

import argparse
import time

import torch
from torch import nn

from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.loading import load_model

E, T, B, O, R = 8, 5, 4, 5, 3


class SharedTable(nn.Module):                 # x (B, T, E) per example; table (B, E) shared
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(E, E, bias=False)

    def forward(self, x, table):
        return self.fc(x).sum(1) + self.fc(table).sum(0)


class LowRank(nn.Module):                     # F.linear(x, U @ V), U (O, R), V (R, E)
    def __init__(self):
        super().__init__()
        self.U, self.V = nn.Parameter(torch.randn(O, R)), nn.Parameter(torch.randn(R, E))

    def forward(self, x):
        return nn.functional.linear(x, self.U @ self.V)


class HeadScores(nn.Module):                  # (x * v).view(B, T, 2, E / 2).sum(-1)
    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(E))

    def forward(self, x):
        return (x * self.v).view(x.shape[0], T, 2, E // 2).sum(-1)


def count(model, inputs, **kwargs) -> str:
    try:
        return str(CostModel(model, inputs, **kwargs).macs)
    except TypeError as err:
        return f"({str(err).splitlines()[0][:60]})"
    except PrunekitError as err:
        return "refused: " + str(err)[:110] + "..."


def pruned_low_rank() -> tuple[str, int, int]:
    """U @ V with U[:, 0], V[1] and V[2, 3] zeroed: (count, by hand under the rule that charges
    U[i, l] V[l, j] to U if i + j is even else to V, MACs of the sparse product), each with x W^T."""
    model, x = LowRank(), torch.randn(B, T, E)
    try:
        costs = CostModel(model, x)
    except PrunekitError:
        return "refused", 0, 0
    with torch.no_grad():
        model.U[:, 0] = 0
        model.V[1] = 0
        model.V[2, 3] = 0
    U, V = model.U, model.V
    rule = sum(int(U[i, l] != 0 if (i + j) % 2 == 0 else V[l, j] != 0)
               for i in range(O) for l in range(R) for j in range(E))
    sparse = sum(int(U[i, l] != 0 and V[l, j] != 0) for i in range(O) for l in range(R) for j in range(E))
    return str(costs.count(model).macs), rule + T * O * E, sparse + T * O * E


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(B, T, E)
    rows = [
        ("shared table (B, E) beside x (B, T, E), default", count(SharedTable(), (x, torch.randn(B, E))),
         (T + B) * E * E),
        ("shared table, batched=(0,)", count(SharedTable(), (x, torch.randn(B, E)), batched=(0,)), (T + B) * E * E),
        ("F.linear(x, U @ V)", count(LowRank(), x), O * R * E + T * O * E),
        ("(x * v).view(...).sum(-1)", count(HeadScores(), x), T * E),
    ]
    got, rule, sparse = pruned_low_rank()
    rows.append(("F.linear(x, U @ V), U[:, 0], V[1], V[2, 3] zeroed", got, rule))
    rows.append(("  (the sparse product's MACs, a lower bound)", "", sparse))
    for name, got, hand in rows:
        print(f"{name:50s} counted {got:>12s}   by hand {hand}")
    for name in ("resnet20", "vit-tiny"):
        loaded = load_model(name)
        model, example = loaded.model, loaded.example_input()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            macs = CostModel(model, example).macs
            times.append(time.perf_counter() - start)
        print(f"CostModel({name}): {macs} MACs, best of 10 on one thread {min(times):.3f} s")


if __name__ == "__main__":
    main()
