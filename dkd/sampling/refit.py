"""Adaptive DIS: refit the two-Laplace proposal online from PDBS probes.

The paper fitted the DIS mixture (w, b1, b2) once, offline, to the teacher ranks that PDBS
selects. Here a DIS run refits it while it trains (``method.dis_refit_every``): every N
optimiser steps a *probe* takes the first R rows of the step's batch, computes the full
student softmax q and the teacher's p (both at the distillation temperature) over all C
classes, keeps per row the k non-target classes with the largest |p - q| — where the
sampled estimate of the KD gradient most needs draws — and bins their teacher ranks on
x = (rank - 1) / C. Earlier probes decay by ``decay`` per probe; the mixture is fitted to
the decayed histogram by :func:`dkd.sampling.rank_stats.fit_laplace_mixture`.

Every rank holds the same global batch and teacher rows, selects the same global top-k
(:func:`dkd.dist.functional.global_topk`: two all-gathers of (R, k)) and runs the same
deterministic grid fit, so all ranks hold the same proposal without exchanging it. The fit
reads the (bins,) histogram on the host: one host read every N steps, none in between.
"""
from __future__ import annotations

import torch

from dkd.dist.functional import global_topk
from dkd.losses.softmax import softmax_probs
from dkd.sampling.proposals import LaplaceMixtureProposal
from dkd.sampling.rank_stats import fit_laplace_mixture, rank_counts

# The fitted head mass is kept inside [W_MIN, 1 - W_MIN]: neither component may vanish,
# so every rank keeps a proposal mass the corrections can divide by.
W_MIN = 0.05


def probe_ranks(student_local: torch.Tensor, teacher_full: torch.Tensor, y: torch.Tensor,
                k: int, T: float, start: int, group) -> torch.Tensor:
    """(R, k) 1-based teacher ranks of the PDBS selection of a probe, target excluded.

    student_local: (R, C_local) student logits of this rank's classes [start, start +
    C_local); teacher_full: (R, C) teacher logits (every rank the same); y: (R,) targets.
    """
    R, n = student_local.shape
    C = teacher_full.shape[1]
    if not 1 <= k < C:
        raise ValueError(f"the probe's k must satisfy 1 <= k < C = {C}, got {k}")
    with torch.no_grad():
        a_local = teacher_full[:, start:start + n].float()
        p = softmax_probs(a_local / T, group)
        q = softmax_probs(student_local.float() / T, group)
        score = (p - q).abs()
        mine = (y >= start) & (y < start + n)
        col = (y - start).clamp(0, n - 1).unsqueeze(1)
        # The target is always a column of the sampled set (never drawn): score it below
        # every |p - q| >= 0 so that it is not chosen.
        score.scatter_(1, col, torch.where(mine, -1.0, score.gather(1, col).squeeze(1))
                       .unsqueeze(1))
        classes = global_topk(score, k, start, group)                        # (R, k)
        return ranks_of(teacher_full, classes)


def ranks_of(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, k) 1-based ranks of ``classes`` in their rows of ``logits`` (R, C): one plus
    the number of larger logits (tied classes share the best rank). Sorting the k chosen
    values and bucketing the C logits among them is 2x cheaper than ranking all C on a
    host; the histogram's bins are 1 % of C wide, so ties are immaterial."""
    v = logits.gather(1, classes)
    vs, order = v.sort(1)
    pos = torch.searchsorted(vs, logits.contiguous())       # number of chosen values below
    cnt = torch.zeros(v.shape[0], v.shape[1] + 1, dtype=torch.long, device=v.device)
    cnt.scatter_add_(1, pos, torch.ones_like(pos))
    greater = cnt.flip(1).cumsum(1).flip(1)[:, 1:]          # logits above the i-th smallest
    return torch.empty_like(greater).scatter_(1, order, greater) + 1


def refit(proposal: LaplaceMixtureProposal, ranks: torch.Tensor, num_classes: int,
          decay: float) -> tuple[float, float, float]:
    """Add a probe's ranks to the proposal's decayed histogram and refit (w, b1, b2) to it;
    the proposal uses the fit from its next draw on. Returns the fit."""
    counts = rank_counts(ranks, num_classes, proposal.refit_bins)
    if proposal.probe_counts is not None:
        counts = counts + decay * proposal.probe_counts
    w, b1, b2 = fit_laplace_mixture(counts)
    w = min(max(w, W_MIN), 1.0 - W_MIN)
    proposal.set_fit(w, b1, b2, counts)
    return w, b1, b2


__all__ = ["probe_ranks", "ranks_of", "refit", "W_MIN"]
