"""Pieces shared by the backbones: the projection to ``model.feature_dim`` and input shapes."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from dkd.models.mlp import make_norm


class Backbone(nn.Module):
    """``body`` (natural width ``natural_dim``) followed, when ``feature_dim`` differs, by a
    Linear-norm-ReLU projection, so the output is always (B, feature_dim): the classifier
    head is built for ``model.feature_dim``. For image bodies (``image``), ``flat_shape``
    (C, H, W) reshapes flat (B, C*H*W) inputs."""

    def __init__(self, body: nn.Module, natural_dim: int, feature_dim: int, norm: str,
                 flat_shape: Optional[Sequence[int]] = None, image: bool = False):
        super().__init__()
        self.body = body
        self.natural_dim, self.feature_dim = natural_dim, feature_dim
        self.proj = nn.Identity() if natural_dim == feature_dim else nn.Sequential(
            nn.Linear(natural_dim, feature_dim), make_norm(norm, feature_dim), nn.ReLU())
        self.flat_shape = tuple(flat_shape) if flat_shape else None
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image and x.dim() == 2:
            if self.flat_shape is None:
                raise ValueError("flat image input: build the backbone with input_shape="
                                 "(3, H, W) to accept (B, 3*H*W) inputs, or pass (B, 3, H, W)")
            x = x.view(x.shape[0], *self.flat_shape)
        return self.proj(self.body(x))


def image_shape(input_dim: int, input_shape: Optional[Sequence[int]],
                arch: str) -> Optional[tuple[int, int, int]]:
    """(C, H, W) of the inputs, used only to reshape flat (B, C*H*W) inputs: ``input_shape``
    when given, else a square RGB image of ``input_dim`` elements, else None (then only
    (B, 3, H, W) inputs are accepted). The image backbones need no H, W: they pool
    adaptively, so a checkpoint loaded with ``input_dim`` alone builds the same network."""
    if input_shape is not None and len(input_shape) == 3:
        c, h, w = (int(v) for v in input_shape)
        if c != 3:
            raise ValueError(f"model.arch {arch!r}: expects 3-channel images, got input shape "
                             f"{tuple(input_shape)}")
        return c, h, w
    if input_shape is not None and len(input_shape) != 1:
        raise ValueError(f"model.arch {arch!r}: needs (3, H, W) images, got input shape "
                         f"{tuple(input_shape)}")
    side = math.isqrt(max(0, input_dim // 3))
    return (3, side, side) if 3 * side * side == input_dim else None
