"""A small vision transformer (ViT) for 28x28 images: the zoo's ``vit-tiny``.

Patch embedding by a strided convolution, a class token and a learned positional embedding,
``depth`` pre-norm blocks (LayerNorm -> ``nn.MultiheadAttention`` -> residual add, LayerNorm ->
Linear-GELU-Linear -> residual add), a final LayerNorm and a linear head on the class token.
Plain ``torch.nn`` layers only, so the model is also a test of counting and pruning a network
that is not made of Conv/Linear leaves alone.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block on (B, T, dim) tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """(B, in_channels, image, image) -> (B, num_classes) logits.

    Tokens: (image / patch)² patches plus the class token; each block costs per example about
    T·(4·dim² + 2·dim·mlp_dim) weight MACs and 2·T²·dim attention-product MACs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image: int = 28, patch: int = 7,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128) -> None:
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)            # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
