"""Built-in examples: the digits data set (shipped with nmfx) and a small vision transformer.

``digits()``: the 1,797 8x8 handwritten digits of the UCI ML repository (as in scikit-learn's
``load_digits``), stored in ``nmfx/data/digits.u8.gz``: gzip of 1797*64 uint8 pixels (0..16, row-major
images) followed by 1797 uint8 labels. ``TinyViT``: a hand-written ViT whose blocks trace whole,
so its rewritten graphs are easy to read.
"""

from __future__ import annotations

import gzip
from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["digits", "TinyViT", "Block"]

_DIGITS = 1797


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): images as float ``[N, 1, 8, 8]`` in [0, 1], labels int64."""
    raw = gzip.decompress(resources.files("nmfx").joinpath("data/digits.u8.gz").read_bytes())
    pixels = torch.frombuffer(bytearray(raw[: _DIGITS * 64]), dtype=torch.uint8)
    images = pixels.reshape(_DIGITS, 1, 8, 8).float() / 16.0
    labels = torch.frombuffer(bytearray(raw[_DIGITS * 64:]), dtype=torch.uint8).long()
    order = torch.randperm(_DIGITS, generator=torch.Generator().manual_seed(seed))
    n_test = int(_DIGITS * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


class Block(nn.Module):
    """Pre-norm transformer block: q/k/v/o projections around SDPA (causal for a decoder), then a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mlp_ratio)
        self.down = nn.Linear(dim * mlp_ratio, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        q, k, v = (proj(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).flatten(-2)
        x = x + self.drop(self.o(attn))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


class TinyViT(nn.Module):
    """A small ViT for 8x8 single-channel images (patches of 2x2 -> 16 tokens)."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 10, patch: int = 2,
                 image: int = 8, channels: int = 1, dropout: float = 0.0):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))
