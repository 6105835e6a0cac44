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


def check_proposal_sync(proposal, group) -> None:
    if group is None or dist.get_world_size(group) == 1:
        return
    fp = float(fingerprint(proposal.state_dict()))
    t = torch.tensor([fp, -fp], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if t[0] != -t[1]:
        raise RuntimeError(f"proposal state differs across ranks (rank {dist.get_rank(group)} "
                           f"has {proposal.state_dict()}): sampled sets would not agree")
