"""Held-out top-1 with a class-sharded head: each rank scores its own classes, and the
global argmax is picked from the all-gathered per-rank maxima."""
from __future__ import annotations

import torch
import torch.distributed as dist


def sharded_argmax(logits_local: torch.Tensor, start: int, group) -> torch.Tensor:
    """(N, C_local) local logits -> (N,) global argmax class ids over all shards."""
    if logits_local.shape[1] == 0:
        val = logits_local.new_full((logits_local.shape[0],), float("-inf"))
        idx = torch.zeros(logits_local.shape[0], dtype=torch.long, device=logits_local.device)
    else:
        val, idx = logits_local.max(dim=1)
    idx = idx + start
    if group is None or dist.get_world_size(group) == 1:
        return idx
    world = dist.get_world_size(group)
    vals = [torch.empty_like(val) for _ in range(world)]
    idxs = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(vals, val.contiguous(), group=group)
    dist.all_gather(idxs, idx.contiguous(), group=group)
    best = torch.stack(vals, 1).argmax(1, keepdim=True)  # first rank wins ties: lowest id
    return torch.stack(idxs, 1).gather(1, best).squeeze(1)


@torch.no_grad()
def evaluate_top1(backbone: torch.nn.Module, weight: torch.Tensor, start: int, split,
                  device: torch.device, batch_size: int, group=None) -> float:
    """Top-1 accuracy (percent) of backbone + head shard on a whole split (every rank
    scores every sample: the backbone is replicated, the head is not)."""
    was_training = backbone.training
    dtype = next(backbone.parameters()).dtype  # bf16 engines hold bf16 weights
    backbone.eval()
    correct, total = 0, 0
    for lo in range(0, len(split), batch_size):
        idx = torch.arange(lo, min(lo + batch_size, len(split)))
        x, y = split.get(idx)
        feats = backbone(x.to(device, dtype=dtype)).float()
        pred = sharded_argmax(feats @ weight.T, start, group)
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    backbone.train(was_training)
    return 100.0 * correct / max(1, total)
