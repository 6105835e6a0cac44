"""The CIFAR ResNets of He et al. 2016 (section 4.2): a 3x3 conv with 16 filters, three
stages of n basic blocks with 16, 32, 64 filters (stride 2 at the start of stages 2 and 3),
global average pooling; depth = 6n + 2 (ResNet-32: n = 5, 0.46 M parameters). Shortcuts
that change shape are the paper's option A: subsample by 2 and zero-pad the new channels
(no parameters). Features: the pooled 64-dim vector, after the last block's ReLU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dkd.models.mlp import Gate


class BasicBlock(nn.Module):
    """conv1 (``inner`` filters, default c_out) -> BN -> ReLU [-> Gate] -> conv2 -> BN,
    plus the shortcut. Only the inner filters are searched: the residual widths stay."""

    def __init__(self, c_in: int, c_out: int, stride: int, inner: int | None = None,
                 gated: bool = False):
        super().__init__()
        inner = c_out if inner is None else inner
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in
        self.gate = Gate(inner) if gated else None

    def gated_pair(self):
        return self.conv1, self.bn1, self.conv2

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.gate is not None:
            out = self.gate(out)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """(B, 3, H, W) -> (B, 64)."""

    def __init__(self, depth: int = 32, in_channels: int = 3, inner: list[int] | None = None,
                 gated: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        inner = list(inner) if inner is not None else [None] * (3 * n)
        if len(inner) != 3 * n:
            raise ValueError(f"inner widths: expected {3 * n} (one per block), got {len(inner)}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        blocks, c_in = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1,
                                         inner[len(blocks)], gated))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)
