"""Per-rank stratified sampling for the class-sharded head (batch-shared mode).

DESIGN.md, "Sharded head": the batch-mixture proposal r̄ (restricted to C \\ D) has mass
R_s on shard s. All ranks split the m draws into counts n_s with E[n_s] = m R_s, using the
shared step generator, so they agree without talking; then rank s draws its n_s classes
from r̄ restricted to its own shard, with its own stream, and gives each the correction
o = log(n_s r̄(c) / R_s): the shard's draws estimate the shard's sum of exp(z) exactly as
the single-process estimator does for the whole class set. Only local classes are
returned, so the rank's GEMM is (B, d) x (d, n_s + |D_s|).
"""
from __future__ import annotations

import torch

from dkd.head.shard import stratified_counts, stratified_log_correction
from dkd.sampling.proposals import Proposal, teacher_ranking
from oracle_sampler import SampleSet, _non_target_order


def batch_mixture(teacher_logits: torch.Tensor, y: torch.Tensor, proposal: Proposal,
                  top_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r̄ (C,) float64 normalised on C \\ D, D (n_D,) sorted class ids)."""
    order, ranks = teacher_ranking(teacher_logits)
    top = _non_target_order(order, ranks, y)[:, :top_t]  # same D as the one-process sampler
    det = torch.unique(torch.cat([y.long(), top.reshape(-1)]))
    rbar = proposal.class_probs(teacher_logits, ranks).double().mean(0)
    rbar[det] = 0.0
    return rbar / rbar.sum().clamp_min(1e-300), det


def sample_stratified(teacher_logits: torch.Tensor, y: torch.Tensor, proposal: Proposal,
                      m: int, bounds: list[tuple[int, int]], rank: int, *, top_t: int = 0,
                      correction: str = "expected",
                      generator: torch.Generator | None = None) -> SampleSet:
    """This rank's columns: D ∩ shard (o = 0) and n_s unique draws (o as above, minus
    log(count) for a class drawn several times). classes (n_local,) global ids."""
    rbar, det = batch_mixture(teacher_logits.detach(), y, proposal, top_t)
    mass = torch.stack([rbar[s:e].sum() for s, e in bounds])           # (P,) R_s
    if not float(mass.sum()) > 0:  # D covers every class: nothing left to sample
        counts = torch.zeros(len(bounds), dtype=torch.long)
    else:
        counts = stratified_counts(mass, m, generator)                 # same on all ranks
    # One shared draw seeds every rank's own stream, so shards draw independently.
    base = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    start, end = bounds[rank]
    n_s = int(counts[rank])
    dev = teacher_logits.device
    draws, o = torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
    if n_s > 0:
        local = (rbar[start:end] / mass[rank]).cpu()
        gen = torch.Generator().manual_seed(base + 7919 * rank)
        drawn = torch.multinomial(local, n_s, replacement=True, generator=gen).to(dev) + start
        draws, cnt = torch.unique(drawn, return_counts=True)
        if correction == "expected":
            o = stratified_log_correction(n_s, rbar[draws], mass[rank])
        else:  # Algorithm 1 as printed divides by r alone
            o = torch.log(rbar[draws])
        o = (o - torch.log(cnt.double())).float()
    det_local = det[(det >= start) & (det < end)]
    return SampleSet(
        classes=torch.cat([det_local, draws]),
        log_correction=torch.cat([torch.zeros(det_local.numel(), device=dev), o]),
        deterministic=torch.cat([torch.ones_like(det_local, dtype=torch.bool),
                                 torch.zeros_like(draws, dtype=torch.bool)]),
        mask=None, mode="batch_shared")
