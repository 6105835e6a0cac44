"""Proposal laws as fixed-shape tensors: rank bins for rank proposals, row entries for FTIS.

A top-K teacher only distinguishes the K ranks it stores; ranks beyond K are exchangeable
under the KD-topk completion. So a rank proposal (uniform, the DIS Laplace mixture) is
needed only as K + 1 *bins*: the masses of single ranks 0..K-1 and of the tail [K, n).
They come from the closed-form CDF of the proposal at the bin edges, computed with tensor
ops on the batch's device from host scalars (the DIS scale b2 changes every step, so the
table is rebuilt each step: ~10 element-wise kernels, no host→device copy).

Units: ranks are 0-based (0 = the teacher's top class); the DIS scales b1, b2 are percent
of the rank axis (see :class:`dkd.sampling.proposals.LaplaceMixtureProposal`).
"""
from __future__ import annotations

import math

import torch

from dkd.sampling.proposals import LaplaceMixtureProposal, Proposal, UniformProposal

_F64 = torch.float64


def _cached(ws: dict | None, key, fn):
    """fn() memoised in ws["cache"] (constant index tensors that depend on shapes only)."""
    if ws is None:
        return fn()
    cache = ws.setdefault("cache", {})
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = fn()
    return cache[key]


def arange(n: int, device, ws: dict | None = None, dtype=torch.int64) -> torch.Tensor:
    """A cached arange(n) on ``device`` (no kernel after the first call)."""
    return _cached(ws, ("arange", n, str(device), dtype),
                   lambda: torch.arange(n, device=device, dtype=dtype))


def rank_cdf(proposal: Proposal, x: torch.Tensor, n: int) -> torch.Tensor:
    """float64 CDF F(x) = mass of ranks [0, x) of a rank proposal on n ranks (x float64,
    0 <= x <= n). Closed form for uniform and DIS (exact bin integrals of the truncated
    Laplace densities, as ``rank_probs``)."""
    if type(proposal) is UniformProposal:
        return x / n
    if type(proposal) is LaplaceMixtureProposal:
        w, s1, s2 = proposal.w, proposal.b1 / 100.0, proposal.b2() / 100.0
        left = torch.expm1(x * (-1.0 / (n * s1))) * (1.0 / math.expm1(-1.0 / s1))
        e2 = math.exp(-1.0 / s2)
        right = (torch.exp((x - n) * (1.0 / (n * s2))) - e2) * (1.0 / (1.0 - e2))
        return left * w + right * (1.0 - w)
    raise ValueError(f"proposal {proposal.name!r} has no closed-form rank law; the sampler "
                     f"supports uniform, dis and ftis (teacher)")


def rank_bins(proposal: Proposal, n: int, K: int, device, ws: dict | None = None):
    """(K_b + 1,) float64 masses of ranks 0..K_b-1 and of the tail [K_b, n), K_b = min(K, n).
    They sum to 1 (a 0 tail when K_b = n).

    Uniform bins depend on (n, K) only, and DIS's left Laplace on (w, b1) only: both are
    cached, so a step rebuilds only the right density, whose scale b2 moves (4 kernels:
    its bin masses are differences of exp((x − n) / (n·s2)) at the edges)."""
    Kb, dev = min(K, n), torch.device(device)

    def edges():
        return torch.cat([torch.arange(Kb + 1, dtype=_F64), torch.tensor([float(n)])]).to(dev)
    if type(proposal) is UniformProposal:
        return _cached(ws, ("ubins", n, Kb, dev), lambda: edges().diff() / n)
    if type(proposal) is LaplaceMixtureProposal:
        w, s1, s2 = proposal.w, proposal.b1 / 100.0, proposal.b2() / 100.0
        x = _cached(ws, ("edges", n, Kb, dev), edges)
        left = _cached(ws, ("lbins", n, Kb, w, s1, dev), lambda: torch.expm1(
            x * (-1.0 / (n * s1))).diff().mul_(w / math.expm1(-1.0 / s1)))
        xn = _cached(ws, ("edges-n", n, Kb, dev), lambda: x - float(n))
        ex = torch.mul(xn, 1.0 / (n * s2)).exp_()
        return torch.add(left, ex.diff(), alpha=(1.0 - w) / (1.0 - math.exp(-1.0 / s2)))
    F = rank_cdf(proposal, _cached(ws, ("edges", n, Kb, dev), edges), n)
    return F[1:] - F[:-1]


def teacher_entries(teacher, proposal) -> torch.Tensor:
    """FTIS: (B, K + 1) float64 row entries [r_b at the row's top-K, r_b's tail mass], each
    row summing to 1: r_b = (1 − eps)·softmax(a_b / T) + eps / C over the completed teacher.
    The softmax runs in the teacher's precision, the rest in float64."""
    T, eps = proposal.temperature, getattr(proposal, "eps", 0.0)
    K, C = teacher.k, teacher.num_classes
    lt = teacher.logits / T
    rt = (teacher.rest_logit() / T + math.log(C - K)).to(lt.dtype) if K < C else \
        torch.full_like(lt[:, 0], float("-inf"))
    sm = torch.softmax(torch.cat([lt, rt.unsqueeze(1)], 1), 1).double()
    if eps:   # eps / C per class: each top-K entry gets eps / C, the tail (C - K) times it
        sm = sm.mul_(1.0 - eps)
        sm[:, :K].add_(eps / C)
        sm[:, K].add_(eps * (C - K) / C)
    return sm


def row_entries(teacher, proposal, ws: dict | None = None) -> torch.Tensor:
    """(1 or B, K + 1) float64 entries of every row's proposal over the completed teacher
    ranking: rank proposals give one row for the batch (their law does not depend on the
    logits), FTIS one row per sample."""
    if proposal.rank_based:
        return rank_bins(proposal, teacher.num_classes, teacher.k, teacher.ids.device,
                         ws).unsqueeze(0)
    if not hasattr(proposal, "temperature"):
        raise ValueError(f"proposal {proposal.name!r} is neither rank-based nor the teacher "
                         f"proposal; the sampler supports uniform, dis and ftis")
    return teacher_entries(teacher, proposal)


__all__ = ["rank_cdf", "rank_bins", "row_entries", "teacher_entries", "arange"]
