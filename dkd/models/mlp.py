"""Residual MLP with batch-norm (the teacher and student family of Tang et al. 2020, 5.1)."""
from __future__ import annotations

import torch
import torch.nn as nn


def make_norm(kind: str, width: int) -> nn.Module:
    """batch: the paper's choice; layer: per-sample, so data-parallel ranks match a single
    process exactly (batch-norm statistics depend on the local batch); none: identity."""
    return {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(kind, lambda w: nn.Identity())(width)


class Gate(nn.Module):
    """A scalar gate per channel (dim 1 of its input): ``x * g``. A gate at exactly 0
    closes its channel, which student search then removes (`dkd/search/`)."""

    def __init__(self, channels: int, channel_last: bool = False):
        super().__init__()
        self.g = nn.Parameter(torch.ones(channels))
        self.channel_last = channel_last   # (B, n, channels) token features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last:
            return x * self.g
        return x * self.g.view(-1, *([1] * (x.dim() - 2)))


class ResidualBlock(nn.Module):
    """x -> relu(x + norm(W2 gate(relu(norm(W1 x))))); the inner width may differ from the
    residual width (a searched student), and ``gated`` puts a Gate on the inner units."""

    def __init__(self, width: int, norm: str = "batch", inner: int | None = None,
                 gated: bool = False):
        super().__init__()
        inner = width if inner is None else inner
        self.body = nn.Sequential(nn.Linear(width, inner), make_norm(norm, inner), nn.ReLU(),
                                  nn.Linear(inner, width), make_norm(norm, width))
        self.gate = Gate(inner) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return torch.relu(x + self.body(x))
        return torch.relu(x + self.body[3:](self.gate(self.body[:3](x))))

    def gated_pair(self):
        """(producer, its norm, consumer) of the gated units (see dkd/search/space.py)."""
        return self.body[0], self.body[1], self.body[3]


class ResidualMLP(nn.Module):
    """in_dim -> hidden -> depth residual blocks -> feature_dim features (B, d). ``inner``:
    per-block inner widths (default hidden); ``gated``: gates on the inner units."""

    def __init__(self, in_dim: int, hidden: int, depth: int, feature_dim: int,
                 norm: str = "batch", inner: list[int] | None = None, gated: bool = False):
        super().__init__()
        inner = list(inner) if inner is not None else [hidden] * depth
        if len(inner) != depth:
            raise ValueError(f"inner widths: expected {depth} (model.depth), got {len(inner)}")
        self.stem = nn.Sequential(nn.Linear(in_dim, hidden), make_norm(norm, hidden), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(hidden, norm, w, gated) for w in inner])
        self.proj = nn.Sequential(nn.Linear(hidden, feature_dim), make_norm(norm, feature_dim),
                                  nn.ReLU())
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(self.stem(x)))
