"""One draw for every mode and proposal: the step's sample set, on the device, fixed shapes.

    s, a = draw_sample_set(teacher, y, proposal, m, mode=..., key=draw_key(seed, step))

``teacher`` is the one teacher-batch type (:class:`TopKTeacher`, K = C for a dense teacher);
``a (B, n)`` are the completed teacher logits at the sampled columns. All randomness comes
from :func:`dkd.sampling.rng.uniforms` keyed by ``key``; nothing reads a value back to the
host and every shape follows from (B, m, K, top_t), so the draw runs on a GPU without
synchronising and gives bit-identical sets on every rank, CPU or CUDA.

The proposal family (DESIGN.md, "A proposal only needs an exact density at the classes
drawn"): row b's proposal has entries E[b, j] on its top-K classes and a tail mass E[b, K]
(:func:`dkd.sampling.laws.row_entries`: the rank bins of uniform / DIS, the softmax of
FTIS). The modes use it as follows.

* ``batch_shared``: columns [D | m draws], D = every target (and top-t non-target class)
  of the batch, B·(1 + t) columns with repeats. Draws are i.i.d. from the *unrestricted*
  batch mixture r̄ = mean_b r_b, where the tail mass is spread uniformly over all C
  classes (a row b, then an entry of row b; a tail entry is a uniform class). A repeated D
  column and a draw that lands in D are masked, not redrawn: E[#draws of c] = m r̄(c) for
  every c, so o = log(m r̄(c)) keeps Σ_{c ∉ D} e^{s_c} unbiased. A class drawn several
  times keeps its first column with o − log(count) (the same sum of exponentials) and
  its repeats are masked: a segment sum, not ``unique``.
* ``hybrid``: per-row D_b = [y_b, top-t of row b] plus m draws shared by the batch from the
  same r̄, each masked in the rows whose D_b holds it; o = log(m r̄(c) / count).
* ``per_sample`` (the paper): D_b as hybrid; rank proposals draw m ranks for the batch on
  the non-target ranking (C − 1 ranks, top-t excluded); a rank k < h_b (the row's top-K
  without its target) is that top-K class, a tail rank is a uniform class outside the
  row's top-K and target (exact, by rank inversion: no rejection). FTIS draws m entries per
  row from [r_b(top-K) without D_b, tail]. o = log(m · r_b(c) / r_b(C \\ D_b)).
* stratified ``batch_shared`` on P shards (``shard=(bounds, rank)``): the shard masses R_s
  of r̄ give counts n_s (Σ n_s = m, E[n_s] = m R_s, one uniform for the remainder); rank s
  draws m candidates from r̄ restricted to its shard and uses the first n_s (the rest are
  masked pad slots), with o = log(n_s r̄(c) / R_s).

Correction "paper" (Algorithm 1 as printed): o = log r(c), r normalised on C \\ D
(batch_shared: log(r̄(c) / (1 − r̄(D)))).
"""
from __future__ import annotations

import math

import torch

from dkd.sampling.laws import _cached, arange, rank_bins, row_entries, teacher_entries
from dkd.consts import scalar, values
from dkd.head import native
from dkd.sampling.lookup import shared_lookup
from dkd.sampling.proposals import Proposal
from dkd.sampling.rng import draw_key, uniforms
from dkd.sampling.sample_set import CORRECTIONS, MASKED, MODES, SampleSet
from dkd.sampling.teacher_batch import TopKTeacher

# Streams of one step's key (rank r's stratified draws use _S_SHARD + r).
_S_ROW, _S_ENTRY, _S_TAIL, _S_COUNT, _S_PRIOR, _S_SHARD = 1, 2, 3, 4, 5, 16


def _u(key: int, stream: int, shape, device) -> torch.Tensor:
    return uniforms(draw_key(key, 0, stream), shape, device)


# ---------------------------------------------------------------- D
def _row_deterministic(teacher: TopKTeacher, y, top_t: int, pos_y, ws):
    """D_b = [y_b, top-t non-target classes of row b] (B, 1 + t) and their teacher logits."""
    K, dev = teacher.k, y.device
    y_in = pos_y < K
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    y_a = torch.where(y_in, teacher.logits.gather(1, pos_y.clamp(max=K - 1).unsqueeze(1))
                      .squeeze(1), rest)
    det, det_a = y.long().unsqueeze(1), y_a.unsqueeze(1)
    if top_t:
        j = arange(top_t, dev, ws).unsqueeze(0)
        dcol = (j + (j >= pos_y.unsqueeze(1)).long()).clamp_(max=K - 1)      # (B, t)
        det = torch.cat([det, teacher.ids.gather(1, dcol)], 1)
        det_a = torch.cat([det_a, teacher.logits.gather(1, dcol)], 1)
    return det, det_a


# ---------------------------------------------------------------- r̄ draws
def _draw_rbar(teacher: TopKTeacher, E: torch.Tensor, m: int, key: int, ws) -> torch.Tensor:
    """(m,) i.i.d. classes from the unrestricted r̄: a uniform row b, then an entry j of row
    b by inverse CDF (E (1, K + 1): one CDF for the batch; (B, K + 1): the rows' CDFs offset
    by row index form one sorted array); j = K is the tail, a uniform class of [0, C).
    Uniforms are < 1, so floor(u·B) and floor(u·C) need no clamp."""
    B, K, C, dev = teacher.batch, teacher.k, teacher.num_classes, teacher.ids.device
    u = _u(key, _S_ENTRY, (3, m), dev)
    if E.shape[0] == 1:
        scale = values((float(B), float(C)), torch.float64, dev).view(2, 1)
        b, tail = (u[0::2] * scale).long()         # rows and tail classes in one product
        j = torch.searchsorted(E[0].cumsum(0), u[1])   # K + 1 only by rounding: the tail
    else:
        b, tail = (u[0] * B).long(), (u[2] * C).long()
        cdf = E.cumsum(1)
        keys = (cdf / cdf[:, -1:]).clamp_(max=1.0) + arange(B, dev, ws, torch.float64).unsqueeze(1)
        j = torch.searchsorted(keys.view(-1), u[1] + b, right=True) - b * (K + 1)
    if K == C:
        j = j.clamp_(max=K - 1)                    # no tail: rounding past the end is rank C-1
    c = teacher.ids.view(-1).index_select(0, torch.add(j, b, alpha=K).clamp_(max=B * K - 1))
    return c if K == C else torch.where(j >= K, tail, c)


def _mix_prior(draws: torch.Tensor, prior, key: int) -> torch.Tensor:
    """Each of the m draws of r̄ replaced, with probability β, by a class of the prior π:
    draws of (1 − β)·r̄ + β·π. prior = (π (C,), its cumulative sum (C,), β), float64
    (None: the draws as they are)."""
    if prior is None:
        return draws
    _, cum, beta = prior
    u = _u(key, _S_PRIOR, (2, draws.numel()), draws.device)
    c = torch.searchsorted(cum, u[1] * cum[-1]).clamp_(max=cum.numel() - 1)
    return torch.where(u[0] < beta, c, draws)


def _mixed_density(rbar: torch.Tensor, classes: torch.Tensor, prior) -> torch.Tensor:
    """(1 − β)·r̄(c) + β·π(c) at the columns (the identity without a prior)."""
    if prior is None:
        return rbar
    pi, _, beta = prior
    return torch.add(rbar * (1.0 - beta), pi.index_select(0, classes), alpha=beta)


def _batch_shared(teacher, y, proposal, m, top_t, correction, key, ws, shard=None, want_a=True,
                  prior=None):
    dev = y.device
    E = row_entries(teacher, proposal, ws)
    if top_t:
        det = _row_deterministic(teacher, y, top_t, teacher.target_position(y), ws)[0]
        D = det.t().reshape(-1)                     # targets first, then each top-t rank
    else:
        D = y.long()
    nD = D.numel()
    n = nD + m
    if shard is None:
        draws, valid = _mix_prior(_draw_rbar(teacher, E, m, key, ws), prior, key), None
    else:
        draws, valid, log_n_over_R = _draw_shard(teacher, E, m, key, shard, ws)
    classes = torch.cat([D, draws])
    rep, a, rbar = shared_lookup(teacher, classes, E, ws, want_logits=want_a)
    rbar = _mixed_density(rbar, classes, prior)
    is_d = _cached(ws, ("is_d", nD, m, str(dev)), lambda: arange(n, dev, ws) < nD)
    first = rep == arange(n, dev, ws)
    # A class drawn several times is one column carrying its count (o − log count, the
    # same sum of exponentials, and the sampled cross-entropy of merged columns); its
    # repeats are masked. Counts by a segment sum onto each class's first column, of
    # weights 1/m (a draw; D columns weigh 1, any positive value: their o is 0), so that
    # r̄ / count' = m r̄ / count.
    w = _cached(ws, ("w_count", nD, m, str(dev)), lambda: torch.where(
        is_d, 1.0, 1.0 / m).double())
    keep = first
    if valid is not None:              # stratified: pad slots count nothing, are masked
        used = torch.cat([is_d[:nD], valid])
        w, keep = w * used, first & used
    count = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, rep, w)
    o = torch.div(rbar, count.index_select(0, rep)).log_()          # log(m r̄ / count)
    if correction == "paper":
        r_d = torch.where(keep & is_d, rbar, 0.0).sum()
        o = o - (math.log(m) + torch.log1p(-r_d.clamp(max=1.0 - 1e-12)))
    elif valid is not None:
        o = o + (log_n_over_R - math.log(m))
    o = torch.where(is_d, scalar(0.0, torch.float64, dev), o)
    o = torch.where(keep, o, scalar(MASKED, torch.float64, dev)).float()
    return SampleSet(classes=classes, log_correction=o, deterministic=is_d, mask=keep,
                     mode="batch_shared", first=rep, target_col=rep[:y.numel()]), a


def _draw_shard(teacher, E, m, key, shard, ws):
    """Stratified draws of this rank: (m candidates (m,), valid (m,) bool: the first n_s,
    log(n_s / R_s) (0-d)). Counts come from the shard masses R (P,) of r̄ and one shared
    uniform (systematic rounding of the fractional parts: Σ n_s = m, E[n_s] = m R_s)."""
    bounds, rank = shard
    B, K, C, dev = teacher.batch, teacher.k, teacher.num_classes, teacher.ids.device
    P = len(bounds)
    lo, hi = bounds[rank]
    ids = teacher.ids.reshape(-1)
    w = (E[:, :K].expand(B, K) * (1.0 / B)).reshape(-1)                # (B·K,) entry masses
    tail = E[:, K].mean()
    base_n, extra = divmod(C, P)                 # shard arithmetic, closed form
    split = extra * (base_n + 1)
    owner = torch.where(ids < split, ids.div(base_n + 1, rounding_mode="floor"),
                        extra + (ids - split).div(max(base_n, 1), rounding_mode="floor"))
    sizes = torch.where(arange(P, dev, ws) < extra, base_n + 1.0, float(base_n))
    R = torch.zeros(P, dtype=torch.float64, device=dev).index_add_(0, owner, w)
    R = R + tail * sizes * (1.0 / C)
    exp_n = R * (m / R.sum())
    base = exp_n.floor()
    frac_cum = torch.cumsum(exp_n - base, 0)
    u0 = _u(key, _S_COUNT, (1,), dev)
    hit = torch.ceil(frac_cum - u0).clamp_(min=0.0)         # points u0 + j below frac_cum
    counts = base + hit - torch.cat([hit.new_zeros(1), hit[:-1]])
    n_s = counts[rank]
    # This shard's law: its top-K entries and its slice of the uniform tail.
    inside = (ids >= lo) & (ids < hi)
    mass = torch.cat([torch.where(inside, w, 0.0), (tail * ((hi - lo) / C)).unsqueeze(0)])
    cdf = mass.cumsum(0)
    u = _u(key, _S_SHARD + rank, (2, m), dev)
    e = torch.searchsorted(cdf, u[0] * cdf[-1]).clamp_(max=B * K)
    tail_c = lo + (u[1] * (hi - lo)).long().clamp_(max=hi - lo - 1)
    c = torch.where(e == B * K, tail_c, ids.index_select(0, e.clamp(max=B * K - 1)))
    valid = arange(m, dev, ws) < n_s
    log_n_over_R = torch.log(n_s.clamp(min=1.0)) - torch.log(R[rank].clamp(min=1e-300))
    return c, valid, log_n_over_R


def _hybrid(teacher, y, proposal, m, top_t, correction, key, ws, want_a=True, prior=None):
    B, dev = teacher.batch, y.device
    E = row_entries(teacher, proposal, ws)
    det, det_a = _row_deterministic(teacher, y, top_t, teacher.target_position(y), ws)
    draws = _mix_prior(_draw_rbar(teacher, E, m, key, ws), prior, key)
    rep, a_s, rbar = shared_lookup(teacher, draws, E, ws, want_logits=want_a)
    rbar = _mixed_density(rbar, draws, prior)
    first = rep == arange(m, dev, ws)              # repeats: one column with its count
    count = torch.zeros(m, dtype=torch.float64, device=dev).index_add_(
        0, rep, torch.ones_like(rbar)).index_select(0, rep)
    o = torch.log(rbar / count) + (math.log(m) if correction == "expected" else 0.0)
    nd = det.shape[1]
    in_d = (det.unsqueeze(2) == draws.view(1, 1, m)).any(1)                  # (B, m)
    first_nd = arange(nd + m, dev, ws) < nd
    return SampleSet(classes=torch.cat([det, draws.expand(B, m)], 1),
                     log_correction=torch.cat([o.new_zeros(nd), o]).float(),
                     deterministic=first_nd,
                     mask=torch.cat([torch.ones_like(det, dtype=torch.bool), ~in_d & first], 1),
                     mode="hybrid", shared_from=nd), torch.cat([det_a, a_s], 1) if want_a else None


# ---------------------------------------------------------------- per-sample
def _outside(teacher, y, y_in, i: torch.Tensor) -> torch.Tensor:
    """The i-th (0-based) class outside row b's top-K and target, (B, m) for i (B, m) or
    (m,): with s the row's sorted excluded ids (the target replaced by C when it is in the
    top-K), s_q − q counts the allowed classes below s_q, so the answer is
    i + #{q : s_q − q <= i}, one batched searchsorted of each row's draws in its own keys."""
    K, dev = teacher.k, y.device
    extra = torch.where(y_in, teacher.num_classes, y.long())
    if native.available() and native.supports(teacher.ids, extra, i):   # one C pass, not ~9 ops
        return native.outside(teacher.ids, extra, teacher.num_classes, i)
    ext = torch.cat([teacher.ids, extra.unsqueeze(1)], 1)
    s = torch.sort(ext, 1).values - torch.arange(K + 1, device=dev)
    i = i.expand(teacher.batch, -1).contiguous()
    return i + torch.searchsorted(s, i, right=True)


def _per_sample(teacher, y, proposal, m, top_t, correction, key, ws, want_a=True):
    B, K, C, dev = teacher.batch, teacher.k, teacher.num_classes, y.device
    pos_y = teacher.target_position(y)
    y_in = pos_y < K
    det, det_a = _row_deterministic(teacher, y, top_t, pos_y, ws)
    n_out = (C - K) - (~y_in).long()                   # classes outside top-K and target
    if proposal.rank_based:
        n = C - 1                                      # ranks of the non-target classes
        bins = rank_bins(proposal, n, K, dev, ws)      # (Kb + 1,)
        Kb = bins.numel() - 1
        if top_t:
            bins = torch.where(arange(Kb + 1, dev, ws) < top_t, 0.0, bins)
        cum = bins.cumsum(0)
        Z = cum[-1]
        k = torch.searchsorted(cum, _u(key, _S_ENTRY, (m,), dev) * Z).clamp_(max=Kb)
        if K < C and native.available() and native.supports(teacher.ids, pos_y, bins):
            # A host: the rest of this branch (~40 small ops) as one C pass, same result.
            shift = math.log(float(Z)) - (math.log(m) if correction == "expected" else 0.0)
            cls, col, o, is_tail = native.rank_draw(teacher.ids, y, pos_y, C, bins, cum, k,
                                                    _u(key, _S_TAIL, (m,), dev), shift)
            a = None
            if want_a:
                a = torch.where(is_tail, teacher.rest_logit_as(teacher.logits.dtype)
                                .unsqueeze(1), teacher.logits.gather(1, col))
            return _per_sample_set(det, det_a, cls, o, a, ws)
        h = (K - y_in.long()).unsqueeze(1)             # top-K non-target ranks per row
        is_tail = k.unsqueeze(0) >= h                  # (B, m)
        col = (k.unsqueeze(0) + (k.unsqueeze(0) >= pos_y.unsqueeze(1)).long()).clamp_(max=K - 1)
        tail_mass = Z - torch.cat([cum.new_zeros(1), cum]).index_select(0, h.squeeze(1))
        p_tail = tail_mass / n_out.clamp(min=1)
        prob = torch.where(is_tail, p_tail.unsqueeze(1), bins.index_select(0, k).unsqueeze(0))
        log_den = torch.log(Z)
        i_tail = (_u(key, _S_TAIL, (m,), dev).unsqueeze(0) * n_out.unsqueeze(1)).long()
    else:
        P = teacher_entries(teacher, proposal)                         # (B, K + 1)
        P = torch.cat([P, P.new_zeros(B, 1)], 1)                       # K + 1: a dummy
        zero = torch.where(y_in, pos_y, K + 1).unsqueeze(1)
        if top_t:
            j = arange(top_t, dev, ws).unsqueeze(0)
            zero = torch.cat([zero, (j + (j >= pos_y.unsqueeze(1)).long()).clamp_(max=K - 1)], 1)
        P = P.scatter(1, zero, 0.0)[:, :K + 1]
        if K < C:            # the target's share of the tail entry, when it is in the tail
            P[:, K] *= torch.where(y_in, 1.0, n_out / (n_out + 1).double())
        total = P.sum(1, keepdim=True)
        P = torch.where(total > 0, P, torch.ones_like(P))              # all mass on D_b
        total = P.sum(1, keepdim=True)
        u = _u(key, _S_ENTRY, (2, B, m), dev)
        jj = torch.searchsorted(P.cumsum(1), u[0] * total).clamp_(max=K)
        is_tail = jj == K
        col = jj.clamp(max=K - 1)
        prob = P.gather(1, jj) / torch.where(is_tail, n_out.clamp(min=1).unsqueeze(1), 1)
        log_den = torch.log(total)
        i_tail = (u[1] * n_out.unsqueeze(1)).long()
    cls = teacher.ids.gather(1, col)
    a = teacher.logits.gather(1, col) if want_a else None
    if K < C:
        tail_cls = _outside(teacher, y, y_in, i_tail.clamp(min=0))
        cls = torch.where(is_tail, tail_cls, cls)
        if want_a:
            a = torch.where(is_tail, teacher.rest_logit().to(a.dtype).unsqueeze(1), a)
    o = (torch.log(prob) - log_den + (math.log(m) if correction == "expected" else 0.0)).float()
    return _per_sample_set(det, det_a, cls, o, a, ws)


def _per_sample_set(det, det_a, cls, o, a, ws):
    """The per-sample SampleSet [D_b | draws] and its teacher logits (None: not wanted)."""
    (B, nd), m = det.shape, cls.shape[1]
    return SampleSet(classes=torch.cat([det, cls], 1),
                     log_correction=torch.cat([o.new_zeros(B, nd), o], 1),
                     deterministic=arange(nd + m, det.device, ws) < nd, mask=None,
                     mode="per_sample", shared_from=nd), (torch.cat([det_a, a], 1)
                                                          if a is not None else None)


# ---------------------------------------------------------------- entry point
def check_args(teacher: TopKTeacher, y, m, top_t, mode, correction) -> None:
    B, K = teacher.ids.shape
    if y.shape != (B,):
        raise ValueError(f"y must be (B,) = ({B},), got {tuple(y.shape)}")
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"m (number of draws) must be an int >= 1, got {m!r}")
    if not 0 <= top_t < min(K, teacher.num_classes - 1):
        raise ValueError(f"top_t must satisfy 0 <= top_t < min(K, C - 1) = "
                         f"{min(K, teacher.num_classes - 1)}, got {top_t}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got '{correction}'")


def draw_sample_set(teacher: TopKTeacher, y: torch.Tensor, proposal: Proposal, m: int, *,
                    mode: str = "per_sample", top_t: int = 0, correction: str = "expected",
                    key: int = 0, shard: tuple[list, int] | None = None,
                    workspace: dict | None = None, teacher_logits: bool = True,
                    prior: tuple | None = None) -> tuple[SampleSet, torch.Tensor | None]:
    """The step's (SampleSet, teacher logits at its columns (B, n)); see the module doc.

    key: the step's host integer key (:func:`dkd.sampling.rng.draw_key`); shard:
    (bounds, rank) for stratified batch_shared draws on a class-sharded head (None: the
    global set). workspace: a dict kept across steps (the slot map, cached index tensors).
    teacher_logits=False: the caller computes the teacher logits at the columns itself (a
    live teacher's exact ones), so none are looked up and the second value is None.
    prior: (π (C,), cumsum(π) (C,), β) float64: batch_shared / hybrid draws come from
    (1 − β)·r̄ + β·π (``method.prior``; :mod:`dkd.sampling.prior`), corrections likewise.
    """
    teacher = teacher.sorted()
    check_args(teacher, y, m, top_t, mode, correction)
    if shard is not None and mode != "batch_shared":
        raise ValueError(f"stratified (per-shard) draws need mode batch_shared, got {mode!r}")
    if prior is not None and (mode == "per_sample" or shard is not None):
        raise ValueError("a class prior mixes into shared draws: mode batch_shared (one "
                         "global set, not stratified per shard) or hybrid, got "
                         f"{mode!r}{' stratified' if shard is not None else ''}")
    if mode == "batch_shared":
        return _batch_shared(teacher, y, proposal, m, top_t, correction, key, workspace, shard,
                             teacher_logits, prior)
    if mode == "hybrid":
        return _hybrid(teacher, y, proposal, m, top_t, correction, key, workspace,
                       teacher_logits, prior)
    return _per_sample(teacher, y, proposal, m, top_t, correction, key, workspace,
                       teacher_logits)


__all__ = ["draw_sample_set", "check_args"]
