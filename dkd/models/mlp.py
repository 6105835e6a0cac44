"""Residual MLP with batch-norm (the teacher and student family of Tang et al. 2020, 5.1)."""
from __future__ import annotations

import torch
import torch.nn as nn


def make_norm(kind: str, width: int) -> nn.Module:
    """batch: the paper's choice; layer: per-sample, so data-parallel ranks match a single
    process exactly (batch-norm statistics depend on the local batch); none: identity."""
    return {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(kind, lambda w: nn.Identity())(width)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), make_norm(norm, width), nn.ReLU(),
                                  nn.Linear(width, width), make_norm(norm, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResidualMLP(nn.Module):
    """in_dim -> hidden -> depth residual blocks -> feature_dim features (B, d)."""

    def __init__(self, in_dim: int, hidden: int, depth: int, feature_dim: int,
                 norm: str = "batch"):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_dim, hidden), make_norm(norm, hidden), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(hidden, norm) for _ in range(depth)])
        self.proj = nn.Sequential(nn.Linear(hidden, feature_dim), make_norm(norm, feature_dim),
                                  nn.ReLU())
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(self.stem(x)))
