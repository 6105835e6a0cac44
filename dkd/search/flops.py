"""FLOPs of a backbone, counted by torch's FlopCounterMode on one sample (matmuls and
convolutions, 2 FLOPs per multiply-add; norms and activations are not counted)."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(module: torch.nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of ``module`` on ``example`` (one sample, batch dim included)."""
    was, fused = module.training, torch.backends.mha.get_fastpath_enabled()
    module.eval()
    # why: torch's fused transformer inference kernel is one opaque op the counter misses
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            module(example)
    finally:
        module.train(was)
        torch.backends.mha.set_fastpath_enabled(fused)
    return int(counter.get_total_flops())


def flops_saved_per_unit(build: Callable[[list[int]], torch.nn.Module], widths: list[int],
                         example: torch.Tensor) -> tuple[int, list[int]]:
    """(FLOPs at ``widths``, [F_l]): F_l = the FLOPs saved when one more unit of block l
    closes, measured on the network with that block one unit narrower (a block at width 0
    saves nothing more). ``build(widths)`` makes the plain network."""
    total = count_flops(build(widths), example)
    saved = []
    for i, w in enumerate(widths):
        if w <= 1:
            saved.append(0)
            continue
        narrower = list(widths)
        narrower[i] = w - 1
        saved.append(total - count_flops(build(narrower), example))
    return total, saved
