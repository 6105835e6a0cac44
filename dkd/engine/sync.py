"""Proposal-state synchronisation check (debug option `dist.check_proposal_sync`).

Every rank must hold the same proposal at every step: the sampled sets are drawn from it
without communication, so one drifted rank would silently bias the estimator. The check
all-reduces a fingerprint of the state with MIN and MAX; they differ iff some rank differs.
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist


def fingerprint(state: dict) -> int:
    """A 52-bit hash of a JSON-able state dict (exact in float64)."""
    blob = json.dumps(state, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 12


def _agree(values: torch.Tensor, group) -> bool:
    """Whether every rank holds the same (n,) float64 values: one all-reduce MAX of
    [v, -v] (on the device the backend needs: NCCL reduces CUDA tensors only)."""
    t = torch.cat([values, -values])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return bool((t[:n] == -t[n:]).all())


def check_proposal_sync(proposal, group, device=None) -> None:
    if group is None or dist.get_world_size(group) == 1:
        return
    fp = float(fingerprint(proposal.state_dict()))
    if not _agree(torch.tensor([fp], dtype=torch.float64, device=device), group):
        raise RuntimeError(f"proposal state differs across ranks (rank {dist.get_rank(group)} "
                           f"has {proposal.state_dict()}): sampled sets would not agree")


def sample_hash(sample_set) -> torch.Tensor:
    """(2,) float64 fingerprint of a sample set, computed on its device: sums of the class
    ids and of the corrections, each weighted by a fixed pseudo-random weight per column
    (so a swapped or changed column changes it)."""
    cls = sample_set.classes.reshape(-1).double()
    o = sample_set.log_correction.expand(sample_set.classes.shape).reshape(-1).double()
    o = torch.nan_to_num(o, nan=0.0, posinf=1e300, neginf=-1e300)
    w = torch.arange(1, cls.numel() + 1, device=cls.device, dtype=torch.float64).mul_(0.6180339887).frac_()
    return torch.stack([(cls * w).sum(), (o * w).sum()])


def check_sample_sync(sample_set, group, rank: int) -> None:
    """Debug option ``dist.check_sample_sync``: every rank drew the same sample set (a
    stratified draw is per rank by design; the check is then skipped)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    if not _agree(sample_hash(sample_set), group):
        raise RuntimeError(f"the sample set differs across ranks (rank {rank}): the draws "
                           f"of one step must be identical on every rank")
