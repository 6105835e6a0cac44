"""Small image CNNs and torchvision's ImageNet ResNets (random init, never downloaded).

Every network here pools adaptively, so it accepts any H x W; at 32 x 32 the adaptive pools
are identities and the networks are the textbook ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: conv5(6) - pool - conv5(16) -
    pool - [adaptive avg-pool to 5x5] - fc 120 - fc 84. (B, 3, H, W) -> (B, 84); H, W >= 16
    (two unpadded 5x5 convs)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(5))
        self.fc = nn.Sequential(nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.feature_dim = 84

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class ShallowCNN(nn.Module):
    """The distillation paper's shallow student: one 5x5 conv, 32 filters, stride 2 (padding
    2) + ReLU, 2x2 max-pool, [adaptive avg-pool to 8x8], a 1200-dim linear bottleneck (no
    activation), a 2048-dim FC with ReLU. (B, 3, H, W) -> (B, 2048). At 32x32 input the conv
    gives 16x16, the pool 8x8, so the bottleneck sees 32 * 8 * 8 = 2048 values."""

    def __init__(self, in_channels: int = 3, filters: int = 32, bottleneck: int = 1200,
                 width: int = 2048, grid: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, filters, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(grid))
        self.bottleneck = nn.Linear(filters * grid * grid, bottleneck)
        self.fc = nn.Sequential(nn.Linear(bottleneck, width), nn.ReLU())
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bottleneck(self.features(x).flatten(1)))


def torchvision_resnet(name: str) -> nn.Module:
    """torchvision ResNet-18/152 with weights=None and ``fc`` removed: the pooled features,
    (B, 3, H, W) -> (B, 512) for resnet18, (B, 2048) for resnet152."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net
