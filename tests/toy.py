"""A tiny model and deterministic data shared by algorithm tests (no farsync imports)."""

from __future__ import annotations

import torch
from torch import nn

DIM = 8


class ToyNet(nn.Module):
    """Embedding-free MLP with its blocks in a ModuleList, an input and an output layer."""

    def __init__(self, n_blocks: int = 4, dim: int = DIM):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.head(self.norm(h)).squeeze(-1)


def make_model(seed: int = 0, n_blocks: int = 4) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(n_blocks)


def batch(worker: int, step: int, size: int = 4, dim: int = DIM):
    g = torch.Generator().manual_seed(10_000 * worker + step)
    x = torch.randn(size, dim, generator=g)
    y = x.sum(-1).sin()
    return x, y


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]
