"""The estimator's sampling step: which class columns a step touches, and their corrections.

A sample set S = D + {c_1..c_m}: D (the target, optionally the teacher's top-t) is always
included with correction o = 0; c_1..c_m are m draws with replacement from the proposal r
restricted to C \\ D and renormalised, with o = log(m * r(c)), the log of the expected
count of c among the m draws ("expected", the default), or o = log r(c) (the paper's
Algorithm 1 as printed: "paper"). The loss then uses z/T - o and a/T - o on S only
(:mod:`dkd.losses.sampled`).

Two modes (DESIGN.md, "Two ways to apply a proposal to a batch"):

* ``per_sample`` (the paper): a rank-based proposal draws m *ranks* once for the batch;
  sample b maps them to its own classes through its teacher ranking of the C - 1
  non-target classes (the target is in D; were it left in the ranking, the draws landing
  on it, often rank 1 where DIS puts its most mass, would be wasted or need a per-row
  correction). D_b = {y_b} + the teacher's top-t non-target classes, so |D_b| = 1 + t for
  every row, the draws are exactly i.i.d. from r restricted to C \\ D_b, and o = log(m r)
  is the same for all rows. The teacher proposal (FTIS) is per sample, so it draws m
  classes per sample. Shapes (B, 1 + top_t + m).
* ``batch_shared``: one class set for the batch from the batch mixture
  r̄(c) = (1/B) sum_b r_b(c) (r_b on the full teacher ranking), D = every target and
  top-t non-target class of the batch. Duplicate draws are merged into one column with
  o - log(count) (the same sum of exponentials), so columns are unique and the head
  touches each row once. Shapes (n,).
* ``hybrid``: D_b per row, as in per_sample, plus ONE set of m draws shared by the batch
  from the batch mixture r̄ over all C classes (not restricted to any D). A draw that
  lands in row b's own D_b is masked out of row b only (its term is already exact), so
  each row's estimate of Σ_{c ∉ D_b} exp(s_c) stays unbiased: E[count_c] = m r̄(c) for
  every c. Duplicates are merged as in batch_shared, o = log(m r̄(c)) - log(count).
  Costs a per-row dot for D_b plus one (B, d) x (d, u) GEMM over the u <= m draws: the
  head touches |∪ D_b| + u rows, not every target of the batch twice over as columns of
  a GEMM (at C = 751, B = 256 batch_shared has ~215 target columns per row, hybrid 1).
  Shapes (B, n) with columns [D_b (1 + t) | shared draws (u)], ``shared_from`` = 1 + t.

All randomness comes from the torch.Generator passed in: the same generator state on
every rank gives the same sample set on every rank, without communication.
"""
from __future__ import annotations

import torch

from dkd.sampling.proposals import Proposal, teacher_ranking
from dkd.sampling.sample_set import SampleSet  # the oracle returns the layer's type

MODES = ("per_sample", "batch_shared", "hybrid")
CORRECTIONS = ("expected", "paper")


def _check_args(teacher_logits, y, m, top_t, mode, correction):
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (B, C), got {tuple(teacher_logits.shape)}")
    B, C = teacher_logits.shape
    if y.shape != (B,):
        raise ValueError(f"y must be (B,) = ({B},), got {tuple(y.shape)}")
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"m (number of draws) must be an int >= 1, got {m!r}")
    if not 0 <= top_t < C - 1:
        raise ValueError(f"top_t must satisfy 0 <= top_t < C - 1 = {C - 1}, got {top_t}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got '{correction}'")


def _draw(probs: torch.Tensor, m: int, generator) -> torch.Tensor:
    """m draws with replacement from each row of probs, on the generator's device."""
    dev = probs.device
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, m, replacement=True, generator=generator).to(dev)


def _log_o(r: torch.Tensor, n: torch.Tensor | int, correction: str) -> torch.Tensor:
    """o = log(n r) ("expected") or log r ("paper"); r, n broadcastable."""
    o = torch.log(r)
    if correction == "expected":
        n = torch.as_tensor(n, dtype=o.dtype, device=o.device)
        o = o + torch.log(n)
    return o


def _non_target_order(order: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor):
    """Teacher ranking of C \\ {y_b}: (B, C - 1), the row of ``order`` without y_b."""
    B, C = order.shape
    y_rank = ranks.gather(1, y.long().unsqueeze(1))                   # (B, 1)
    idx = torch.arange(C - 1, device=order.device).expand(B, C - 1)
    return order.gather(1, idx + (idx >= y_rank).long())


def _per_sample_ranked(r, rest, m, top_t, correction, generator):
    """Shared rank draws (m,) mapped through each row's ranking ``rest`` (B, C - 1)."""
    r = r.clone()
    r[:top_t] = 0.0                                           # top-t are in D already
    r = r / r.sum()
    k = _draw(r, m, generator).to(rest.device)                # (m,) 0-based ranks
    o = _log_o(r.to(rest.device)[k], m, correction)           # (m,), the same for all rows
    return rest[:, k], o.float().expand(rest.shape[0], m)


def _per_sample_classwise(probs, det, m, correction, generator):
    """Per-sample draws from probs (B, C) restricted to C \\ D_b: classes (B, m) and o."""
    probs = probs.double().scatter(1, det, 0.0)
    total = probs.sum(1, keepdim=True)
    # A row with all its mass on D (very peaked teacher, tiny C) falls back to uniform.
    empty = total <= 0
    probs = torch.where(empty, torch.ones_like(probs).scatter(1, det, 0.0), probs)
    probs = probs / probs.sum(1, keepdim=True)
    classes = _draw(probs, m, generator).to(det.device)       # (B, m)
    o = _log_o(probs.gather(1, classes), m, correction)
    return classes, o.float()


def _per_sample(teacher_logits, ranking, y, proposal, m, top_t, correction, generator):
    order, ranks = ranking
    rest = _non_target_order(order, ranks, y)                 # (B, C - 1)
    det = torch.cat([y.long().unsqueeze(1), rest[:, :top_t]], dim=1)   # (B, 1 + t)
    if proposal.rank_based:
        r = proposal.rank_probs(rest.shape[1], teacher_logits.device)
        cls, o = _per_sample_ranked(r, rest, m, top_t, correction, generator)
    else:
        probs = proposal.class_probs(teacher_logits, ranks)
        cls, o = _per_sample_classwise(probs, det, m, correction, generator)
    return SampleSet(
        classes=torch.cat([det, cls], dim=1),
        log_correction=torch.cat([torch.zeros(det.shape, device=o.device), o], dim=1),
        deterministic=torch.cat([torch.ones_like(det, dtype=torch.bool),
                                 torch.zeros_like(cls, dtype=torch.bool)], dim=1),
        mask=None, mode="per_sample")


def _batch_shared(teacher_logits, ranking, y, proposal, m, top_t, correction, generator):
    order, ranks = ranking
    dev, C = teacher_logits.device, teacher_logits.shape[1]
    top = _non_target_order(order, ranks, y)[:, :top_t]
    det = torch.unique(torch.cat([y.long(), top.reshape(-1)]))
    rbar = proposal.class_probs(teacher_logits, ranks).double().mean(0)   # (C,)
    rbar[det] = 0.0
    if det.numel() == C or not rbar.sum() > 0:
        draws, o = det.new_zeros(0), torch.zeros(0, device=dev)
    else:
        rbar = rbar / rbar.sum()
        drawn = _draw(rbar, m, generator).to(dev)
        draws, counts = torch.unique(drawn, return_counts=True)
        # A class drawn `count` times is one column carrying count * exp(z - o_single).
        o = (_log_o(rbar[draws], m, correction) - torch.log(counts.double())).float()
    zeros = torch.zeros(det.numel(), device=dev)
    return SampleSet(
        classes=torch.cat([det, draws]),
        log_correction=torch.cat([zeros, o]),
        deterministic=torch.cat([torch.ones_like(det, dtype=torch.bool),
                                 torch.zeros_like(draws, dtype=torch.bool)]),
        mask=None, mode="batch_shared")


def _hybrid(teacher_logits, ranking, y, proposal, m, top_t, correction, generator):
    order, ranks = ranking
    dev = teacher_logits.device
    rest = _non_target_order(order, ranks, y)
    det = torch.cat([y.long().unsqueeze(1), rest[:, :top_t]], dim=1)      # (B, 1 + t)
    rbar = proposal.class_probs(teacher_logits, ranks).double().mean(0)   # (C,)
    rbar = rbar / rbar.sum()
    draws, counts = torch.unique(_draw(rbar, m, generator).to(dev), return_counts=True)
    o = (_log_o(rbar[draws], m, correction) - torch.log(counts.double())).float()
    return hybrid_set(det, draws, o)


def hybrid_set(det: torch.Tensor, draws: torch.Tensor, o: torch.Tensor,
               in_d: torch.Tensor | None = None) -> SampleSet:
    """SampleSet of the hybrid mode from D (B, 1 + t), unique shared draws (u,) and their
    corrections o (u,): draws that hit a row's D are masked out of that row (in_d (B, u),
    computed here unless given)."""
    B, nd = det.shape
    u = draws.numel()
    if in_d is None:
        in_d = (det == draws.unsqueeze(0) if nd == 1                       # (B, u)
                else (det.unsqueeze(2) == draws.view(1, 1, u)).any(1))
    first = torch.arange(nd + u, device=det.device) < nd                   # (n,) D columns
    return SampleSet(
        classes=torch.cat([det, draws.expand(B, u)], 1),
        log_correction=torch.cat([o.new_zeros(nd), o]).expand(B, nd + u),
        deterministic=first.expand(B, nd + u),
        mask=torch.cat([first[:nd].expand(B, nd), ~in_d], 1),
        mode="hybrid", shared_from=nd)


def sample_classes(teacher_logits: torch.Tensor, y: torch.Tensor, proposal: Proposal,
                   m: int, *, mode: str = "per_sample", top_t: int = 0,
                   correction: str = "expected",
                   generator: torch.Generator | None = None,
                   ranking: tuple[torch.Tensor, torch.Tensor] | None = None) -> SampleSet:
    """Draw one step's sample set.

    teacher_logits: (B, C) (only their ordering and, for FTIS, their softmax are used).
    y: (B,) targets. m >= 1 draws (with replacement; m may exceed C).
    top_t in [0, C - 1): the teacher's top-t non-target classes are added to D.
    mode: "per_sample" | "batch_shared" | "hybrid".
    correction: "expected" (o = log(m r), consistent) | "paper" (o = log r, Algorithm 1
    as printed, which over-weights the sampled tail m-fold against D).
    generator: source of all randomness (None: torch's default generator).
    ranking: optional precomputed ``teacher_ranking(teacher_logits)`` (the sort is the
    costliest part for large C; a caller sampling several sets per batch sorts once).
    """
    _check_args(teacher_logits, y, m, top_t, mode, correction)
    teacher_logits = teacher_logits.detach()
    if ranking is None:
        ranking = teacher_ranking(teacher_logits)
    fn = {"per_sample": _per_sample, "batch_shared": _batch_shared, "hybrid": _hybrid}[mode]
    return fn(teacher_logits, ranking, y, proposal, m, top_t, correction, generator)
