"""The estimator's sampling step from a top-K teacher: no B×C teacher logits, no B×C sort.

A top-K teacher (DESIGN.md, "Soft-label store") holds per sample the K largest teacher
logits ``logits (B, K)`` of classes ``ids (B, K)`` (descending) and ``lse (B,)``, the
log-sum-exp of all C logits. Under the KD-topk completion every other class shares the
remaining mass evenly: its logit is ``rest = log((exp(lse) - Σ exp(top-K)) / (C - K))``
(:meth:`TopKTeacher.rest_logit`, computed with expm1). Ranks beyond K are then
exchangeable, so a proposal is applied to the *completed* teacher with its tail ranks
tied: a rank proposal gives every non-top-K class the average of r over the tail ranks
(the dense sampler breaks these ties by class id instead; averaging over the tie is the
exchangeable, Rao-Blackwellised form of the same proposal). With K = C there is no tail
and everything below equals :func:`dkd.sampling.sampler.sample_classes` in distribution.

Same SampleSet outputs, corrections ("expected" / "paper") and D as the dense sampler:

* ``batch_shared``: r̄ = mean_b r_b is a sparse part on the ≤ B·K top-K ids plus one
  constant per row on its tail. Draws come from r̄ as a mixture (row b uniformly, then a
  draw from r_b: one multinomial over the B·(K+1) entries [r_b(top-K), tail mass]); a
  tail entry is a uniform class outside the row's top-K (rejection: K ≪ C). Draws in D
  are rejected, which leaves i.i.d. draws from r̄ restricted to C \\ D. r̄ and the teacher
  logits at the chosen columns come from one (B, n) look-up. Cost O(B·K + B·n + m).
* ``per_sample``: rank proposals draw m ranks for the batch (closed-form inverse CDF for
  uniform and the DIS Laplace mixture: no C-sized vector); rank k of sample b maps
  through its top-K non-target classes for k < h_b (h_b = K or K - 1 when the target is
  in its top-K), else to a uniform class of its tail. FTIS draws per sample from the
  (K+1) entries [p_b(top-K), tail mass]. Tail draws of the same column share their first
  candidate class across samples (each sample's marginal stays uniform over its own
  tail), so the samples touch mostly the same head rows. Cost O(B·K + B·m).

``workspace`` (a dict the caller keeps across steps) holds one (C,) int32 scratch slot
map, allocated once: class id -> column. Without it the map is allocated per call
(uninitialised, so O(1) work, but a C-sized allocation). All randomness comes from
``generator`` (CPU or the device), like the dense sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dkd.head.shard import stratified_counts
from dkd.sampling.proposals import LaplaceMixtureProposal, Proposal, UniformProposal
from dkd.sampling.sampler import CORRECTIONS, MODES, SampleSet

_F64 = torch.float64


@dataclass
class TopKTeacher:
    """Top-K teacher data of one (global) batch.

    ids: (B, K) long class ids sorted by teacher logit, descending; logits: (B, K) their
    teacher logits (temperature-free); lse: (B,) log-sum-exp of all C teacher logits;
    num_classes: C (K <= C).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    num_classes: int

    def __post_init__(self):
        if self.ids.dim() != 2 or self.logits.shape != self.ids.shape:
            raise ValueError(f"ids and logits must both be (B, K), got {tuple(self.ids.shape)}"
                             f" and {tuple(self.logits.shape)}")
        if self.lse.shape != self.ids.shape[:1]:
            raise ValueError(f"lse must be (B,) = ({self.ids.shape[0]},), got {tuple(self.lse.shape)}")
        if not 1 <= self.ids.shape[1] <= self.num_classes:
            raise ValueError(f"K must satisfy 1 <= K <= num_classes = {self.num_classes}, "
                             f"got {self.ids.shape[1]}")
        self.ids = self.ids.long()

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @classmethod
    def from_dense(cls, logits: torch.Tensor, k: int) -> "TopKTeacher":
        """Top-k of dense (B, C) teacher logits (tests, small C)."""
        val, idx = logits.topk(k, dim=1)
        return cls(idx, val, torch.logsumexp(logits.double(), 1).to(logits.dtype), logits.shape[1])

    def rest_logit(self) -> torch.Tensor:
        """(B,) float64 completion logit of every non-top-K class (-inf when K = C)."""
        B, C, K = self.ids.shape[0], self.num_classes, self.k
        if K == C:
            return torch.full((B,), float("-inf"), dtype=_F64, device=self.ids.device)
        lse = self.lse.double()
        left = -torch.expm1(torch.logsumexp(self.logits.double(), 1) - lse)   # tail mass
        return lse + torch.log(left.clamp_min(torch.finfo(_F64).tiny)) - math.log(C - K)

    def log_partition(self, T: float) -> torch.Tensor:
        """(B,) float64 log Σ_c exp(a_c / T) over the completed teacher."""
        parts = self.logits.double() / T
        if self.k < self.num_classes:
            tail = self.rest_logit() / T + math.log(self.num_classes - self.k)
            parts = torch.cat([parts, tail.unsqueeze(1)], 1)
        return torch.logsumexp(parts, 1)

    def dense(self) -> torch.Tensor:
        """(B, C) completed teacher logits (for tests and the full-KD baseline)."""
        out = self.rest_logit().to(self.logits.dtype).unsqueeze(1)
        out = out.expand(-1, self.num_classes).clone()
        return out.scatter_(1, self.ids, self.logits)


# ---------------------------------------------------------------- rank proposals
def _rank_components(proposal: Proposal):
    """[(log weight, kind, scale)] of a closed-form rank proposal, or None.

    kind: "uniform", "left" (truncated Laplace at x = 0) or "right" (at x = 1); scale in
    units of the normalised rank axis x in [0, 1] (rank k covers [k/n, (k+1)/n)).
    """
    if type(proposal) is UniformProposal:
        return [(0.0, "uniform", 1.0)]
    if type(proposal) is LaplaceMixtureProposal:
        comps = []
        if proposal.w > 0:
            comps.append((math.log(proposal.w), "left", proposal.b1 / 100.0))
        if proposal.w < 1:
            comps.append((math.log1p(-proposal.w), "right", proposal.b2() / 100.0))
        return comps
    return None


def _comp_log_mass(kind: str, s: float, n: int, lo: torch.Tensor, hi: torch.Tensor):
    """log mass of ranks [lo, hi) under one component (exact bin integrals, stable)."""
    if kind == "uniform":
        return torch.log((hi - lo) / n)
    a, b = lo / n, hi / n
    y1 = a if kind == "left" else 1.0 - b            # distance of the near edge from the centre
    return (-y1 / s + torch.log(-torch.expm1(-(b - a) / s))
            - math.log(-math.expm1(-1.0 / s)))


def rank_interval_mass(proposal: Proposal, n: int, lo, hi) -> torch.Tensor:
    """float64 mass of ranks [lo, hi) (0-based, broadcast tensors or ints) of a rank
    proposal on n ranks. Closed form for uniform and DIS; otherwise from rank_probs (O(n))."""
    lo = torch.as_tensor(lo, dtype=_F64)
    hi = torch.as_tensor(hi, dtype=_F64, device=lo.device)
    comps = _rank_components(proposal)
    if comps is None:
        cs = torch.cat([torch.zeros(1, dtype=_F64),
                        proposal.rank_probs(n).double().cpu().cumsum(0)]).to(lo.device)
        return (cs[hi.long()] - cs[lo.long()]).clamp_min(0.0)
    total = torch.zeros(torch.broadcast_shapes(lo.shape, hi.shape), dtype=_F64, device=lo.device)
    for lw, kind, s in comps:
        total = total + torch.exp(lw + _comp_log_mass(kind, s, n, lo, hi))
    return torch.where(hi > lo, total, torch.zeros_like(total))


def rank_draw(proposal: Proposal, n: int, lo: int, hi: int, m: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """m i.i.d. ranks (long, generator's device) from a rank proposal on n ranks restricted
    to [lo, hi), by inverse CDF (O(m) for uniform / DIS)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    comps = _rank_components(proposal)
    if comps is None:
        r = proposal.rank_probs(n).double().to(gdev)[lo:hi]
        return lo + torch.multinomial(r, m, replacement=True, generator=generator)
    lo_t, hi_t = torch.tensor(float(lo), dtype=_F64), torch.tensor(float(hi), dtype=_F64)
    logw = torch.stack([lw + _comp_log_mass(kind, s, n, lo_t, hi_t) for lw, kind, s in comps])
    cum = torch.softmax(logw, 0).cumsum(0).to(gdev)
    u = torch.rand(2, m, generator=generator, dtype=_F64, device=gdev)
    which = torch.searchsorted(cum[:-1].contiguous(), u[0], right=True)
    out = torch.empty(m, dtype=_F64, device=gdev)
    for i, (_, kind, s) in enumerate(comps):
        sel = which == i
        v = u[1][sel]
        if kind == "uniform":
            out[sel] = lo + torch.floor(v * (hi - lo))
            continue
        width = (hi - lo) / n
        near = lo / n if kind == "left" else 1.0 - hi / n
        y = near - s * torch.log1p(-v * (-math.expm1(-width / s)))   # distance from centre
        out[sel] = torch.floor((y if kind == "left" else 1.0 - y) * n)
    return out.clamp_(lo, hi - 1).long()


# ---------------------------------------------------------------- per-row proposal
def _row_probs(teacher: TopKTeacher, proposal: Proposal):
    """r_b over the full ranking of C classes: (pk (B, K) on the top-K, tail (B,) per tail
    class), float64. Rank proposals: pk = r(rank), tail = mean of r over ranks >= K."""
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    dev = teacher.ids.device
    if proposal.rank_based:
        ks = torch.arange(K, dtype=_F64)
        pk = rank_interval_mass(proposal, C, ks, ks + 1).to(dev).expand(B, K)
        tail = rank_interval_mass(proposal, C, K, C).item() / max(C - K, 1)
        return pk, torch.full((B,), tail, dtype=_F64, device=dev)
    if not hasattr(proposal, "temperature"):
        raise ValueError(f"proposal {proposal.name!r} is neither rank-based nor the teacher "
                         f"proposal; the top-K sampler supports uniform, dis and ftis")
    T, eps = proposal.temperature, getattr(proposal, "eps", 0.0)
    lz = teacher.log_partition(T).unsqueeze(1)
    pk = (1.0 - eps) * torch.exp(teacher.logits.double() / T - lz) + eps / C
    tail = (1.0 - eps) * torch.exp(teacher.rest_logit().unsqueeze(1) / T - lz) + eps / C
    return pk, tail.squeeze(1)


def _slot_map(workspace: dict | None, C: int, device) -> torch.Tensor:
    """(C,) int32 scratch, content arbitrary (every read is validated)."""
    ws = {} if workspace is None else workspace
    slot = ws.get("slot")
    if slot is None or slot.numel() < C or slot.device != torch.device(device):
        slot = torch.empty(C, dtype=torch.int32, device=device)
        ws["slot"] = slot
    return slot


def _topk_hits(ids: torch.Tensor, cls: torch.Tensor, workspace, C: int):
    """Entries of ids (B, K) that are among the unique classes cls (n,) (ids < C):
    (flat entry index (h,), column in cls (h,))."""
    n = cls.numel()
    flat = ids.reshape(-1)
    if n == 0:
        e = flat.new_zeros(0)
        return e, e
    slot = _slot_map(workspace, C, ids.device)
    slot[cls] = torch.arange(n, dtype=torch.int32, device=ids.device)
    col = slot[flat].long().clamp_(0, n - 1)
    hit = (cls[col] == flat).nonzero().squeeze(1)
    return hit, col[hit]


def _lookup(teacher, cls, workspace, *pairs):
    """(B, n) matrices at unique classes cls for each (top-K values (B, K), tail value (B,))."""
    ids = teacher.ids
    B, K = ids.shape
    hit, col = _topk_hits(ids, cls, workspace, teacher.num_classes)
    rows = torch.div(hit, K, rounding_mode="floor")
    out = []
    for top, rest in pairs:
        mat = rest.unsqueeze(1).expand(B, cls.numel()).clone()
        mat[rows, col] = top.reshape(-1)[hit].to(mat.dtype)
        out.append(mat)
    return out


def teacher_logits_at(teacher: TopKTeacher, classes: torch.Tensor,
                      workspace: dict | None = None) -> torch.Tensor:
    """Completed teacher logits at classes (n,) (shared) or (B, n) (per sample) -> (B, n)."""
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    if classes.dim() == 1:
        u, inv = torch.unique(classes.long(), return_inverse=True)
        return _lookup(teacher, u, workspace, (teacher.logits, rest))[0][:, inv]
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    base = torch.arange(B, device=classes.device).unsqueeze(1) * C
    keys, order = torch.sort((teacher.ids + base).reshape(-1))
    q = (classes.long() + base).reshape(-1)
    pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
    hit = keys[pos] == q
    vals = teacher.logits.reshape(-1)[order[pos]]
    return torch.where(hit, vals, rest.repeat_interleave(classes.shape[1])).view(classes.shape)


# ---------------------------------------------------------------- helpers
def _gen_device(generator):
    return generator.device if generator is not None else torch.device("cpu")


def _non_target(teacher: TopKTeacher, y: torch.Tensor):
    """Top-K without the target: (ids (B, K), logits (B, K), pos_y (B,), y_in (B,)).
    Rows whose target is in the top-K have K - 1 valid entries (the last is filler)."""
    B, K = teacher.ids.shape
    eq = teacher.ids == y.long().unsqueeze(1)
    y_in = eq.any(1)
    pos_y = torch.where(y_in, eq.int().argmax(1), torch.full_like(y_in, K, dtype=torch.long))
    idx = torch.arange(K, device=y.device).expand(B, K)
    idx = (idx + (idx >= pos_y.unsqueeze(1)).long()).clamp_(max=K - 1)
    return teacher.ids.gather(1, idx), teacher.logits.gather(1, idx), pos_y, y_in


def _outside_rows(c, rows, ids, lo, hi, generator, y=None):
    """Re-draw c (r,) uniformly in [lo, hi) until c ∉ ids[rows] (and != y[rows]):
    c becomes uniform over [lo, hi) minus that row's excluded set."""
    gdev = _gen_device(generator)
    sel = torch.arange(c.numel(), device=c.device)
    while sel.numel():
        cs, rs = c[sel], rows[sel]
        bad = (ids[rs] == cs.unsqueeze(1)).any(1)
        if y is not None:
            bad |= y[rs] == cs
        sel = sel[bad]
        if sel.numel():
            c[sel] = torch.randint(lo, hi, (sel.numel(),), generator=generator,
                                   device=gdev).to(c.device)
    return c


def _log_o(prob: torch.Tensor, m, correction: str) -> torch.Tensor:
    o = torch.log(prob)
    return o + math.log(m) if correction == "expected" else o


# ---------------------------------------------------------------- batch-shared
def _deterministic(teacher, y, top_t):
    rest_ids = _non_target(teacher, y)[0]
    return torch.unique(torch.cat([y.long(), rest_ids[:, :top_t].reshape(-1)]))


def _range_mass(teacher, pk, tail, lo, hi):
    """r̄ mass of classes [lo, hi) (before removing D)."""
    inside = (teacher.ids >= lo) & (teacher.ids < hi)
    n_tail = (hi - lo) - inside.sum(1)
    return ((pk * inside).sum(1) + tail * n_tail).mean()


def _draw_mixture(teacher, pk, tail, det, lo, hi, m, accept, generator):
    """m i.i.d. draws from r̄ restricted to [lo, hi) \\ D; accept = that mass / r̄([lo, hi))."""
    B, K = teacher.ids.shape
    dev, gdev = teacher.ids.device, _gen_device(generator)
    inside = (teacher.ids >= lo) & (teacher.ids < hi)
    P = torch.cat([pk * inside, (tail * ((hi - lo) - inside.sum(1))).unsqueeze(1)], 1)
    P = P.reshape(-1).to(gdev)
    got, need = [], m
    while need > 0:
        n_c = int(min(need / max(accept, 1e-3) * 1.1 + 16, 64 * m + 4096))
        idx = torch.multinomial(P, n_c, replacement=True, generator=generator).to(dev)
        b, j = torch.div(idx, K + 1, rounding_mode="floor"), idx % (K + 1)
        c = teacher.ids[b, j.clamp(max=K - 1)]
        tl = (j == K).nonzero().squeeze(1)
        if tl.numel():
            u = torch.randint(lo, hi, (tl.numel(),), generator=generator, device=gdev).to(dev)
            c[tl] = _outside_rows(u, b[tl], teacher.ids, lo, hi, generator)
        if det.numel():
            pos = torch.searchsorted(det, c).clamp_(max=det.numel() - 1)
            c = c[det[pos] != c]
        c = c[:need]
        got.append(c)
        need -= c.numel()
    return torch.cat(got)


def _finish_shared(teacher, det, det_a, draws_raw, pk, tail, n_draws, log_norm, paper_norm,
                   correction, workspace):
    """SampleSet (n,) and teacher logits (B, n) from D and the raw draws."""
    dev = teacher.ids.device
    draws, counts = torch.unique(draws_raw, return_counts=True)
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    a_d, p_d = _lookup(teacher, draws, workspace, (teacher.logits, rest), (pk, tail))
    rbar = p_d.mean(0)
    if correction == "expected":   # log(n r̄(c) / R): R the mass of what was sampled from
        o = math.log(max(n_draws, 1)) + torch.log(rbar) - log_norm
    else:                          # Algorithm 1 as printed: log r̄(c), r̄ normalised on C \ D
        o = torch.log(rbar) - paper_norm
    o = (o - torch.log(counts.double())).float()
    s = SampleSet(
        classes=torch.cat([det, draws]),
        log_correction=torch.cat([torch.zeros(det.numel(), device=dev), o]),
        deterministic=torch.cat([torch.ones_like(det, dtype=torch.bool),
                                 torch.zeros_like(draws, dtype=torch.bool)]),
        mask=None, mode="batch_shared")
    return s, torch.cat([det_a, a_d], 1)


def _shared_setup(teacher, y, proposal, top_t, workspace):
    pk, tail = _row_probs(teacher, proposal)
    det = _deterministic(teacher, y, top_t)
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    det_a, det_p = _lookup(teacher, det, workspace, (teacher.logits, rest), (pk, tail))
    total = (pk.sum(1) + tail * (teacher.num_classes - teacher.k)).mean()
    return pk, tail, det, det_a, det_p.mean(0), total


def _batch_shared(teacher, y, proposal, m, top_t, correction, generator, workspace):
    C = teacher.num_classes
    pk, tail, det, det_a, r_det, total = _shared_setup(teacher, y, proposal, top_t, workspace)
    Z = float(total - r_det.sum())                     # r̄ mass of C \ D
    draws = det.new_zeros(0)
    if det.numel() < C and Z > 0:
        draws = _draw_mixture(teacher, pk, tail, det, 0, C, m, Z / float(total), generator)
    return _finish_shared(teacher, det, det_a, draws, pk, tail, m, math.log(max(Z, 1e-300)),
                          math.log(max(Z, 1e-300)), correction, workspace)


def batch_mixture_topk(teacher: TopKTeacher, y: torch.Tensor, proposal: Proposal,
                       top_t: int = 0, classes: torch.Tensor | None = None,
                       workspace: dict | None = None):
    """(r̄ at ``classes`` (n,) float64, normalised on C \\ D and 0 on D; D (n_D,) sorted).

    classes None: all C classes (O(C); for tests)."""
    pk, tail, det, _, r_det, total = _shared_setup(teacher, y, proposal, top_t, workspace)
    if classes is None:
        classes = torch.arange(teacher.num_classes, device=teacher.ids.device)
    u, inv = torch.unique(classes.long(), return_inverse=True)
    rbar = _lookup(teacher, u, workspace, (pk, tail))[0].mean(0)[inv]
    pos = torch.searchsorted(det, classes.long()).clamp_(max=det.numel() - 1)
    rbar = torch.where(det[pos] == classes, torch.zeros_like(rbar), rbar)
    return rbar / (total - r_det.sum()).clamp_min(1e-300), det


def sample_stratified_topk(teacher: TopKTeacher, y: torch.Tensor, proposal: Proposal, m: int,
                           bounds: list[tuple[int, int]], rank: int, *, top_t: int = 0,
                           correction: str = "expected",
                           generator: torch.Generator | None = None,
                           workspace: dict | None = None):
    """This rank's batch-shared columns, as :func:`dkd.sampling.stratified.sample_stratified`
    (same generator protocol: counts n_s from the shared stream, then a per-rank stream).
    Returns (SampleSet with global ids (n_local,), teacher logits (B, n_local))."""
    _check(teacher, y, m, top_t, "batch_shared", correction)
    pk, tail, det, det_a, r_det, total = _shared_setup(teacher, y, proposal, top_t, workspace)
    from dkd.head.shard import owner_of
    own_d = owner_of(det, teacher.num_classes, len(bounds))
    R = torch.stack([_range_mass(teacher, pk, tail, s, e) for s, e in bounds])
    R = R - torch.zeros_like(R).index_add_(0, own_d, r_det)          # (P,) r̄(shard \ D)
    R = R.clamp_min(0.0)
    Z = float(R.sum())
    counts = (stratified_counts(R, m, generator) if Z > 0
              else torch.zeros(len(bounds), dtype=torch.long))
    base = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    start, end = bounds[rank]
    n_s = int(counts[rank])
    keep = (own_d == rank).nonzero().squeeze(1)
    det, det_a = det[keep], det_a[:, keep]
    draws = det.new_zeros(0)
    if n_s > 0:
        gen = torch.Generator(device=_gen_device(generator)).manual_seed(base + 7919 * rank)
        mass_in = float(_range_mass(teacher, pk, tail, start, end))
        draws = _draw_mixture(teacher, pk, tail, det, start, end, n_s,
                              float(R[rank]) / max(mass_in, 1e-300), gen)
    return _finish_shared(teacher, det, det_a, draws, pk, tail, n_s,
                          math.log(max(float(R[rank]), 1e-300)), math.log(max(Z, 1e-300)),
                          correction, workspace)


# ---------------------------------------------------------------- per-sample
def _per_sample_draws(teacher, y, proposal, m, top_t, generator, nt):
    """(is_tail (B, m), topk column (B, m), prob of one draw (B, m) f64, tail count (B,))."""
    rest_ids, _, pos_y, y_in = nt
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    dev = teacher.ids.device
    h = K - y_in.long()                                   # top-K non-target ranks per row
    n_tail = (C - 1 - h)
    if proposal.rank_based:
        n = C - 1
        norm = rank_interval_mass(proposal, n, top_t, n).item()
        k = rank_draw(proposal, n, top_t, n, m, generator).to(dev)          # (m,)
        pr = rank_interval_mass(proposal, n, k.double().cpu(), k.double().cpu() + 1).to(dev)
        t_pc = rank_interval_mass(proposal, n, h.double().cpu(), float(n)).to(dev)
        t_pc = t_pc / n_tail.clamp_min(1)
        is_tail = k.unsqueeze(0) >= h.unsqueeze(1)
        prob = torch.where(is_tail, t_pc.unsqueeze(1), pr.unsqueeze(0)) / norm
        kk = k.clamp(max=K - 1)
        col = kk + (kk >= pos_y.unsqueeze(1)).long()      # rest rank -> top-K column
        return is_tail, col.clamp_(max=K - 1), prob, n_tail
    pk, tail = _row_probs(teacher, proposal)
    P = torch.cat([pk, (tail * n_tail).unsqueeze(1)], 1)
    j = torch.arange(top_t, device=dev).expand(B, top_t)
    P = P.scatter(1, j + (j >= pos_y.unsqueeze(1)).long(), 0.0)          # top-t in D
    P = P.scatter(1, pos_y.clamp(max=K).unsqueeze(1), 0.0)               # the target (or
    P[:, K] = torch.where(y_in, P[:, K], tail * n_tail)                  # restore the tail)
    total = P.sum(1, keepdim=True)
    if bool((total <= 0).any()):        # all mass on D: uniform over C \ D_b (dense does too)
        U = torch.ones_like(P).scatter(1, j + (j >= pos_y.unsqueeze(1)).long(), 0.0)
        U = U.scatter(1, pos_y.clamp(max=K).unsqueeze(1), 0.0)
        U[:, K] = n_tail.double()
        P = torch.where(total <= 0, U, P)
        total = P.sum(1, keepdim=True)
    P = P / total
    draw = torch.multinomial(P.to(_gen_device(generator)), m, replacement=True,
                             generator=generator).to(dev)
    prob = P.gather(1, draw)
    is_tail = draw == K
    prob = torch.where(is_tail, prob / n_tail.clamp_min(1).unsqueeze(1), prob)
    return is_tail, draw.clamp(max=K - 1), prob, n_tail


def _shared_tail(teacher, y, is_tail, generator, workspace):
    """Uniform tail classes for the True entries of is_tail (B, m): column j's first
    candidate is shared by all rows; a row that has it in its top-K (or as its target)
    re-draws on its own."""
    B, m = is_tail.shape
    dev, C = teacher.ids.device, teacher.num_classes
    rows, slots = is_tail.nonzero(as_tuple=True)
    cand = torch.randint(0, C, (m,), generator=generator, device=_gen_device(generator)).to(dev)
    u, inv = torch.unique(cand, return_inverse=True)
    hit, col = _topk_hits(teacher.ids, u, workspace, C)
    clash = torch.zeros(B, u.numel(), dtype=torch.bool, device=dev)
    clash[torch.div(hit, teacher.k, rounding_mode="floor"), col] = True
    c = cand[slots]
    bad = clash[rows, inv[slots]] | (y[rows] == c)
    sel = bad.nonzero().squeeze(1)
    if sel.numel():
        c[sel] = _outside_rows(torch.randint(0, C, (sel.numel(),), generator=generator,
                                             device=_gen_device(generator)).to(dev),
                               rows[sel], teacher.ids, 0, C, generator, y)
    return rows, slots, c


def _per_sample(teacher, y, proposal, m, top_t, correction, generator, workspace):
    nt = _non_target(teacher, y)
    rest_ids, rest_lg, pos_y, y_in = nt
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    y_a = torch.where(y_in, teacher.logits.gather(1, pos_y.clamp(max=teacher.k - 1)
                                                  .unsqueeze(1)).squeeze(1), rest)
    det = torch.cat([y.long().unsqueeze(1), rest_ids[:, :top_t]], 1)
    det_a = torch.cat([y_a.unsqueeze(1), rest_lg[:, :top_t]], 1)
    is_tail, col, prob, _ = _per_sample_draws(teacher, y, proposal, m, top_t, generator, nt)
    cls = teacher.ids.gather(1, col)
    a = teacher.logits.gather(1, col)
    if bool(is_tail.any()):
        rows, slots, c = _shared_tail(teacher, y.long(), is_tail, generator, workspace)
        cls[rows, slots] = c
        a[rows, slots] = rest[rows]
    o = _log_o(prob, m, correction).float()
    s = SampleSet(
        classes=torch.cat([det, cls], 1),
        log_correction=torch.cat([torch.zeros(det.shape, device=o.device), o], 1),
        deterministic=torch.cat([torch.ones_like(det, dtype=torch.bool),
                                 torch.zeros_like(cls, dtype=torch.bool)], 1),
        mask=None, mode="per_sample")
    return s, torch.cat([det_a, a], 1)


def per_sample_probs_topk(teacher: TopKTeacher, y: torch.Tensor, proposal: Proposal,
                          top_t: int, classes: torch.Tensor) -> torch.Tensor:
    """(B, n) float64 probability that one per-sample draw of row b is classes[b, j]
    (0 on D_b). For tests and diagnostics (uses a per-row search, O(B·n·log K))."""
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    rest_ids, _, pos_y, y_in = _non_target(teacher, y)
    base = torch.arange(B).unsqueeze(1) * C
    keys, order = torch.sort((teacher.ids + base).reshape(-1))
    q = (classes.long() + base).reshape(-1)
    pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
    col = (order[pos] % K).view(classes.shape)
    in_top = (keys[pos] == q).view(classes.shape)
    h = K - y_in.long()
    n_tail = (C - 1 - h).clamp_min(1)
    if proposal.rank_based:
        n = C - 1
        rk = (col - (col > pos_y.unsqueeze(1)).long()).double()          # rank among rest
        pr = rank_interval_mass(proposal, n, rk, rk + 1)
        pr = torch.where(rk < top_t, torch.zeros_like(pr), pr)
        t_pc = rank_interval_mass(proposal, n, h.double(), float(n)) / n_tail
        out = torch.where(in_top, pr, t_pc.unsqueeze(1))
        out = out / rank_interval_mass(proposal, n, top_t, n)
    else:
        pk, tail = _row_probs(teacher, proposal)
        j = torch.arange(top_t).expand(B, top_t)
        det_cols = j + (j >= pos_y.unsqueeze(1)).long()
        pk = pk.scatter(1, det_cols, 0.0).clone()
        pk[y_in, pos_y[y_in]] = 0.0
        total = pk.sum(1) + tail * (C - K - (~y_in).long())
        out = torch.where(in_top, pk.gather(1, col), tail.unsqueeze(1)) / total.unsqueeze(1)
    return torch.where(classes == y.unsqueeze(1), torch.zeros_like(out), out)


# ---------------------------------------------------------------- entry point
def _check(teacher, y, m, top_t, mode, correction):
    B, K = teacher.ids.shape
    if y.shape != (B,):
        raise ValueError(f"y must be (B,) = ({B},), got {tuple(y.shape)}")
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"m (number of draws) must be an int >= 1, got {m!r}")
    if not 0 <= top_t < K:
        raise ValueError(f"top_t must satisfy 0 <= top_t < K = {K} (D's top-t come from "
                         f"the stored top-K), got {top_t}")
    if top_t >= teacher.num_classes - 1:
        raise ValueError(f"top_t must be < C - 1 = {teacher.num_classes - 1}, got {top_t}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got '{correction}'")


def sample_classes_topk(teacher: TopKTeacher, y: torch.Tensor, proposal: Proposal, m: int, *,
                        mode: str = "per_sample", top_t: int = 0, correction: str = "expected",
                        generator: torch.Generator | None = None,
                        workspace: dict | None = None, return_teacher: bool = False):
    """One step's sample set from a top-K teacher; see the module doc.

    Same arguments and SampleSet as :func:`dkd.sampling.sampler.sample_classes`, with the
    teacher given as a :class:`TopKTeacher`; top_t must be < K. return_teacher=True also
    returns the completed teacher logits at the sampled columns, (B, n), for free.
    """
    _check(teacher, y, m, top_t, mode, correction)
    fn = _per_sample if mode == "per_sample" else _batch_shared
    s, a = fn(teacher, y, proposal, m, top_t, correction, generator, workspace)
    return (s, a) if return_teacher else s


__all__ = ["TopKTeacher", "sample_classes_topk", "sample_stratified_topk", "teacher_logits_at",
           "batch_mixture_topk", "per_sample_probs_topk", "rank_interval_mass", "rank_draw"]
