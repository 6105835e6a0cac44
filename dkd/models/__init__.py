"""Backbones and a small registry. A backbone maps inputs to features (B, d); the classifier
head is a separate module (dkd.head), because it is sharded and sampled by class."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from dkd.config import ModelConfig
from dkd.models.mlp import ResidualMLP

_REGISTRY: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "mlp": lambda cfg, in_dim: ResidualMLP(in_dim, cfg.hidden, cfg.depth, cfg.feature_dim, cfg.norm),
}


def build_backbone(cfg: ModelConfig, input_dim: int) -> nn.Module:
    if cfg.arch not in _REGISTRY:
        raise ValueError(f"model.arch: unknown {cfg.arch!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[cfg.arch](cfg, input_dim)
