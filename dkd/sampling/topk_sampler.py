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
* ``hybrid``: D_b per row as per_sample; m draws from the unrestricted r̄ (a row by its
  mass, then an inverse-CDF draw within that row: O(B + m·K)) shared by the batch, with
  r̄ and the teacher logits at them from the same (B, u) look-up as batch_shared. When
  B·C <= DENSE_HYBRID_ENTRIES it builds the completed (B, C) teacher and r̄ instead.

``workspace`` (a dict the caller keeps across steps) holds one (C,) int64 slot map,
zero-initialised once: class id -> (call epoch << 32) + column, so stale entries fail one
comparison and the map is never cleared. Without a workspace it is allocated and zeroed
per call (O(C): pass one in training). All randomness comes from ``generator`` (CPU or
the device), like the dense sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dkd.head import native
from dkd.head.shard import owner_of, stratified_counts
from dkd.sampling.proposals import LaplaceMixtureProposal, Proposal, UniformProposal
from dkd.sampling.sampler import CORRECTIONS, MODES, SampleSet, _draw, hybrid_set

_F64 = torch.float64


@dataclass(eq=False)
class TopKTeacher:
    """Top-K teacher data of one (global) batch.

    ids: (B, K) long class ids sorted by teacher logit, descending; logits: (B, K) their
    teacher logits (temperature-free); lse: (B,) log-sum-exp of all C teacher logits;
    num_classes: C (K <= C); rest: optional (B,) completion logit
    (:func:`completion_logit`), when it was computed with the top-K where the teacher ran
    (per rank, on its own rows); otherwise it is computed here on first use.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    num_classes: int
    rest: torch.Tensor | None = None
    _rest: torch.Tensor | None = field(default=None, init=False, repr=False)
    _gap_keys: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.ids.dim() != 2 or self.logits.shape != self.ids.shape:
            raise ValueError(f"ids and logits must both be (B, K), got {tuple(self.ids.shape)}"
                             f" and {tuple(self.logits.shape)}")
        if self.lse.shape != self.ids.shape[:1]:
            raise ValueError(f"lse must be (B,) = ({self.ids.shape[0]},), "
                             f"got {tuple(self.lse.shape)}")
        if not 1 <= self.ids.shape[1] <= self.num_classes:
            raise ValueError(f"K must satisfy 1 <= K <= num_classes = {self.num_classes}, "
                             f"got {self.ids.shape[1]}")
        self.ids = self.ids.long()
        if self.rest is not None:
            if self.rest.shape != self.lse.shape:
                raise ValueError(f"rest must be (B,) = ({self.ids.shape[0]},), "
                                 f"got {tuple(self.rest.shape)}")
            self._rest = self.rest.double()

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @classmethod
    def from_dense(cls, logits: torch.Tensor, k: int) -> "TopKTeacher":
        """Top-k of dense (B, C) teacher logits (tests, small C)."""
        val, idx = logits.topk(k, dim=1)
        return cls(idx, val, torch.logsumexp(logits.double(), 1).to(logits.dtype), logits.shape[1])

    def rest_logit(self) -> torch.Tensor:
        """(B,) float64 completion logit of every non-top-K class (-inf when K = C).
        Computed once per object (the tensors are not expected to change)."""
        if self._rest is None:
            self._rest = completion_logit(self.logits, self.lse, self.num_classes)
        return self._rest

    def gap_keys(self) -> torch.Tensor:
        """(B·K,) sorted keys b·C + (s_q − q) of each row's sorted top-K ids s: the number
        of classes outside the row's top-K below s_q, offset by row. The i-th class outside
        row b's top-K is then i + #{keys of row b <= b·C + i} (one searchsorted for many
        draws; see :func:`_nth_outside`). Computed once per object."""
        if self._gap_keys is None:
            B, K = self.ids.shape
            s = self.ids.sort(1).values - torch.arange(K, device=self.ids.device)
            rows = torch.arange(B, device=self.ids.device).unsqueeze(1) * self.num_classes
            self._gap_keys = (s + rows).reshape(-1)
        return self._gap_keys

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


def completion_logit(logits: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) float64 logit of every non-top-K class under the KD-topk completion: the mass
    left outside the top-K logits (B, K), spread evenly over the C − K other classes;
    -inf when K = C. The engine computes it with the top-K, on each rank's own rows."""
    B, K, C = logits.shape[0], logits.shape[1], num_classes
    if K == C:
        return torch.full((B,), float("-inf"), dtype=_F64, device=logits.device)
    lse = lse.double()
    # In the logits' own precision (lse comes in it too), then float64 for expm1.
    left = -torch.expm1(torch.logsumexp(logits, 1).double() - lse)          # tail mass
    return lse + torch.log(left.clamp_min(torch.finfo(_F64).tiny)) - math.log(C - K)


# ---------------------------------------------------------------- rank proposals
def _rank_components(proposal: Proposal):
    """((log weight, kind, scale), ...) of a closed-form rank proposal, or None.

    kind: "uniform", "left" (truncated Laplace at x = 0) or "right" (at x = 1); scale in
    units of the normalised rank axis x in [0, 1] (rank k covers [k/n, (k+1)/n)).
    """
    if type(proposal) is UniformProposal:
        return ((0.0, "uniform", 1.0),)
    if type(proposal) is LaplaceMixtureProposal:
        comps = []
        if proposal.w > 0:
            comps.append((math.log(proposal.w), "left", proposal.b1 / 100.0))
        if proposal.w < 1:
            comps.append((math.log1p(-proposal.w), "right", proposal.b2() / 100.0))
        return tuple(comps)
    return None


class _RankLaw:
    """A rank proposal on n ranks: masses of rank intervals, log masses of single ranks,
    inverse-CDF draws. Closed form (O(1) per rank or draw, exact bin integrals of the
    truncated Laplace densities) for uniform and DIS; any other rank proposal goes
    through its (n,) ``rank_probs`` (O(n))."""

    def __init__(self, proposal: Proposal, n: int):
        self.n, self.comps = n, _rank_components(proposal)
        self._first_weight: dict = {}
        if self.comps is None:
            self.r = proposal.rank_probs(n).double().cpu()
            self.cum = torch.cat([torch.zeros(1, dtype=_F64), self.r.cumsum(0)])

    def _comp_log_interval(self, kind, s, lo, hi):
        n = self.n
        if kind == "uniform":
            return torch.log((hi - lo) / n)
        near = lo / n if kind == "left" else 1.0 - hi / n   # near edge's distance from centre
        return (-near / s + torch.log(-torch.expm1(-(hi - lo) / (n * s)))
                - math.log(-math.expm1(-1.0 / s)))

    def interval(self, lo, hi) -> torch.Tensor:
        """float64 mass of ranks [lo, hi) (broadcast tensors or numbers)."""
        lo = torch.as_tensor(lo, dtype=_F64)
        hi = torch.as_tensor(hi, dtype=_F64, device=lo.device)
        if self.comps is None:
            cs = self.cum.to(lo.device)
            return (cs[hi.long()] - cs[lo.long()]).clamp_min(0.0)
        total = sum(torch.exp(lw + self._comp_log_interval(kind, s, lo, hi))
                    for lw, kind, s in self.comps)
        return torch.where(hi > lo, total, torch.zeros_like(total))

    def log_mass(self, k: torch.Tensor) -> torch.Tensor:
        """float64 log mass of single ranks k (float64 tensor)."""
        if self.comps is None:
            return torch.log(self.r.to(k.device)[k.long()])
        n, terms = self.n, []
        for lw, kind, s in self.comps:
            if kind == "uniform":
                terms.append(torch.full_like(k, lw - math.log(n)))
                continue
            a = 1.0 / (n * s)
            c = lw + math.log(-math.expm1(-a)) - math.log(-math.expm1(-1.0 / s))
            terms.append(c - a * (k if kind == "left" else (n - 1) - k))
        return terms[0] if len(terms) == 1 else torch.logaddexp(terms[0], terms[1])

    def draw(self, lo: int, hi: int, m: int, generator=None) -> torch.Tensor:
        """m i.i.d. ranks restricted to [lo, hi) (long, on the generator's device)."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        if self.comps is None:
            return lo + torch.multinomial(self.r[lo:hi].to(gdev), m, replacement=True,
                                          generator=generator)
        n = self.n
        w0 = self._first_weight.get((lo, hi))
        if w0 is None:   # probability of the first component within [lo, hi)
            lo_t, hi_t = torch.tensor(float(lo), dtype=_F64), torch.tensor(float(hi), dtype=_F64)
            logw = torch.stack([lw + self._comp_log_interval(kind, s, lo_t, hi_t)
                                for lw, kind, s in self.comps])
            w0 = self._first_weight[(lo, hi)] = float(torch.softmax(logw, 0)[0])
        u = torch.rand(2, m, generator=generator, dtype=_F64, device=gdev)
        xs = []
        for _, kind, s in self.comps:
            if kind == "uniform":
                xs.append((lo + u[1] * (hi - lo)) / n)
                continue
            near = lo / n if kind == "left" else 1.0 - hi / n
            y = near - s * torch.log1p(-u[1] * (-math.expm1(-(hi - lo) / (n * s))))
            xs.append(y if kind == "left" else 1.0 - y)
        x = xs[0] if len(xs) == 1 else torch.where(u[0] < w0, xs[0], xs[1])
        return torch.floor(x * n).clamp_(lo, hi - 1).long()


def _law(proposal: Proposal, n: int, workspace=None) -> _RankLaw:
    comps = _rank_components(proposal)
    if comps is None:
        return _RankLaw(proposal, n)
    return _cached(workspace, ("law", comps, n), lambda: _RankLaw(proposal, n))


def rank_interval_mass(proposal: Proposal, n: int, lo, hi) -> torch.Tensor:
    """float64 mass of ranks [lo, hi) (0-based, broadcast tensors or ints) of a rank
    proposal on n ranks. Closed form for uniform and DIS; otherwise from rank_probs (O(n))."""
    return _RankLaw(proposal, n).interval(lo, hi)


def rank_draw(proposal: Proposal, n: int, lo: int, hi: int, m: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """m i.i.d. ranks (long, generator's device) from a rank proposal on n ranks restricted
    to [lo, hi), by inverse CDF (O(m) for uniform / DIS)."""
    return _RankLaw(proposal, n).draw(lo, hi, m, generator)


def _cached(workspace, key, fn):
    """fn() memoised in workspace["cache"] under key (no caching without a workspace/key)."""
    if workspace is None or key is None:
        return fn()
    cache = workspace.setdefault("cache", {})
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = fn()
    return cache[key]


def _rank_key(proposal, *args):
    comps = _rank_components(proposal)
    return None if comps is None else (comps,) + args


# ---------------------------------------------------------------- per-row proposal
def _row_probs(teacher: TopKTeacher, proposal: Proposal, workspace=None):
    """r_b over the full ranking of C classes, float64: (pk on the top-K, (1, K) for rank
    proposals (the same for every row) or (B, K); tail (B,) per non-top-K class).
    Rank proposals: pk = r(rank), tail = mean of r over ranks >= K."""
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    dev = teacher.ids.device
    if proposal.rank_based:
        def masses():
            ks = torch.arange(K + 1, dtype=_F64)
            law = _law(proposal, C, workspace)
            return (law.interval(ks[:-1], ks[1:]).to(dev).unsqueeze(0),
                    law.interval(K, C).item() / max(C - K, 1))
        pk, tail = _cached(workspace, _rank_key(proposal, "row", C, K, str(dev)), masses)
        return pk, torch.full((B,), tail, dtype=_F64, device=dev)
    if not hasattr(proposal, "temperature"):
        raise ValueError(f"proposal {proposal.name!r} is neither rank-based nor the teacher "
                         f"proposal; the top-K sampler supports uniform, dis and ftis")
    T, eps = proposal.temperature, getattr(proposal, "eps", 0.0)
    # The softmax runs in the teacher's precision (a proposal only has to be the one the
    # corrections use: both come from these numbers), the rest of the sampler in float64.
    lt = teacher.logits / T                                            # (B, K)
    if K < C:   # one softmax over [top-K logits, the tail's total]: (B, K + 1)
        rt = (teacher.rest_logit() / T + math.log(C - K)).to(lt.dtype)   # (B,)
        sm = torch.softmax(torch.cat([lt, rt.unsqueeze(1)], 1), 1).double()
        pk, tail = sm[:, :K], sm[:, K] / (C - K)
    else:
        pk = torch.softmax(lt, 1).double()
        tail = torch.zeros_like(pk[:, 0])
    if eps:
        pk, tail = (1.0 - eps) * pk + eps / C, (1.0 - eps) * tail + eps / C
    return pk, tail


def _slot_map(workspace: dict | None, C: int, device):
    """(C,) int64 map class -> (epoch << 32) + column, zero-initialised once, and this
    call's epoch: an entry written in an earlier call is smaller than epoch << 32, so a
    look-up is validated by one comparison, without re-reading the class ids."""
    ws = {} if workspace is None else workspace
    slot = ws.get("slot")
    if slot is None or slot.numel() < C or slot.device != torch.device(device):
        slot = torch.zeros(C, dtype=torch.long, device=device)
        ws["slot"], ws["epoch"] = slot, 0
    ws["epoch"] += 1
    return slot, ws["epoch"]


def _stamp(workspace: dict | None, C: int, device) -> tuple[torch.Tensor, int]:
    """(slot map, base = epoch << 32) of one call: its entries are base + column, any
    entry below base is stale. The native look-ups take this pair too."""
    slot, epoch = _slot_map(workspace, C, device)
    return slot, epoch << 32


def _topk_hits(ids: torch.Tensor, cls: torch.Tensor, workspace, C: int):
    """Entries of ids (B, K) that are among the unique classes cls (n,) (all < C):
    (flat entry index (h,), column in cls (h,)). O(B·K + n), no sort: one gather from
    the epoch-stamped slot map and one comparison (a searchsorted of the B·K ids into
    sorted cls is ~4x slower on a host)."""
    n = cls.numel()
    flat = ids.reshape(-1)
    if n == 0:
        e = flat.new_zeros(0)
        return e, e
    slot, base = _stamp(workspace, C, ids.device)
    slot.index_copy_(0, cls, torch.arange(base, base + n, device=ids.device))
    val = slot.index_select(0, flat)
    hit = (val >= base).nonzero().squeeze(1)
    return hit, val.index_select(0, hit) - base


def _shared_lookup(teacher, cls, pk, tail, workspace, logits: bool = True):
    """At unique classes cls (n,): the completed teacher logits (B, n) (None unless
    ``logits``) and r̄ = mean_b r_b (n,) float64 (None when pk is None), from the hits of
    cls in the top-K only: r̄(c) = mean_b tail_b + Σ_{b: c in top-K_b} (r_b(c) - tail_b) / B."""
    B, K = teacher.ids.shape
    n = cls.numel()
    if _native_ok(teacher, cls, logits=True):
        C = teacher.num_classes
        return native.shared_lookup(teacher.ids, teacher.logits,
                                    teacher.rest_logit().contiguous(), pk, tail,
                                    cls.long().contiguous(), _stamp(workspace, C, "cpu"), C,
                                    want_logits=logits)
    hit, col = _topk_hits(teacher.ids, cls, workspace, teacher.num_classes)
    rows = torch.div(hit, K, rounding_mode="floor")
    a = rbar = None
    if pk is not None:
        p_hit = (pk.reshape(-1).index_select(0, hit - rows * K) if pk.shape[0] == 1
                 else pk.reshape(-1).index_select(0, hit))
        diff = p_hit - tail.index_select(0, rows)
        rbar = (tail.mean() + torch.zeros(n, dtype=_F64, device=cls.device)
                .index_add_(0, col, diff) / B).clamp_min_(1e-300)
    if logits:
        a = teacher.rest_logit().to(teacher.logits.dtype).unsqueeze(1).expand(B, n).contiguous()
        a.view(-1).index_copy_(0, rows * n + col, teacher.logits.reshape(-1).index_select(0, hit))
    return a, rbar


def teacher_logits_at(teacher: TopKTeacher, classes: torch.Tensor,
                      workspace: dict | None = None) -> torch.Tensor:
    """Completed teacher logits at classes (n,) (shared) or (B, n) (per sample) -> (B, n)."""
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    if classes.dim() == 1:
        u, inv = torch.unique(classes.long(), return_inverse=True)
        return _shared_lookup(teacher, u, None, None, workspace)[0].index_select(1, inv)
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


def _target_pos(teacher: TopKTeacher, y: torch.Tensor):
    """(pos_y (B,) column of the target in the top-K, K if absent; y_in (B,) bool)."""
    if _native_ok(teacher, y):
        pos = native.target_pos(teacher.ids, y.long().contiguous())
        return pos, pos < teacher.k
    rows, cols = (teacher.ids == y.long().unsqueeze(1)).nonzero(as_tuple=True)  # distinct ids
    pos = torch.full_like(y, teacher.k, dtype=torch.long).index_put_((rows,), cols)
    return pos, pos < teacher.k


def _rest_columns(pos_y: torch.Tensor, ranks: torch.Tensor, K: int) -> torch.Tensor:
    """Top-K column of non-target rank ``ranks`` ((t,) or (B, m)) of each row: rank j is
    column j, or j + 1 past the target's column. Clamped to K - 1 (callers mask ranks
    beyond the row's top-K)."""
    r = ranks if ranks.dim() == 2 else ranks.unsqueeze(0)
    return (r + (r >= pos_y.unsqueeze(1)).long()).clamp_(max=K - 1)


def _non_target(teacher: TopKTeacher, y: torch.Tensor, t: int | None = None):
    """The first t (default K) top-K classes without the target: (ids (B, t), logits
    (B, t), pos_y, y_in). Rows whose target is in the top-K have K - 1 valid entries."""
    pos_y, y_in = _target_pos(teacher, y)
    t = teacher.k if t is None else t
    col = _rest_columns(pos_y, torch.arange(t, device=y.device), teacher.k)
    col = col.expand(y.shape[0], t)
    return teacher.ids.gather(1, col), teacher.logits.gather(1, col), pos_y, y_in


def _in_rows(c, rows, teacher, workspace, y=None):
    """(r,) bool: c_i ∈ top-K of row rows_i (or == y[rows_i]). Many queries: through the
    slot map, O(B·K + r log r); few: a direct (r, K) comparison."""
    if c.numel() > 64:
        u = torch.unique(c)
        hit, col = _topk_hits(teacher.ids, u, workspace, teacher.num_classes)
        C, K = teacher.num_classes, teacher.k
        keys = torch.sort(torch.div(hit, K, rounding_mode="floor") * C
                          + u.index_select(0, col)).values          # (row, class) clashes
        q = rows * C + c
        if keys.numel():
            pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
            bad = keys.index_select(0, pos) == q
        else:
            bad = torch.zeros_like(c, dtype=torch.bool)
    else:
        bad = teacher.ids.index_select(0, rows).eq(c.unsqueeze(1)).any(1)
    if y is not None:
        bad |= y.index_select(0, rows) == c
    return bad


def _outside_rows(c, rows, teacher, lo, hi, generator, y=None, workspace=None):
    """Re-draw c (r,) uniformly in [lo, hi) until c ∉ top-K of rows (and != y[rows]):
    c becomes uniform over [lo, hi) minus that row's excluded set."""
    gdev = _gen_device(generator)
    sel = torch.arange(c.numel(), device=c.device)
    for _ in range(100_000):
        bad = _in_rows(c.index_select(0, sel), rows.index_select(0, sel), teacher, workspace, y)
        sel = sel[bad]
        if not sel.numel():
            return c
        c[sel] = torch.randint(lo, hi, (sel.numel(),), generator=generator,
                               device=gdev).to(c.device)
    raise RuntimeError("no class left outside the excluded set (empty tail?)")


# ---------------------------------------------------------------- batch-shared
def _deterministic(teacher, y, top_t):
    if top_t == 0:
        return torch.unique(y.long())
    rest_ids = _non_target(teacher, y, top_t)[0]
    return torch.unique(torch.cat([y.long(), rest_ids.reshape(-1)]))


def _range_mass(teacher, pk, tail, lo, hi):
    """r̄ mass of classes [lo, hi) (before removing D)."""
    inside = (teacher.ids >= lo) & (teacher.ids < hi)
    n_tail = (hi - lo) - inside.sum(1)
    return ((pk * inside).sum(1) + tail * n_tail).mean()


def _draw_mixture(teacher, pk, tail, det, lo, hi, m, accept, generator, exact_accept=None,
                  workspace=None):
    """m i.i.d. draws from r̄ restricted to [lo, hi) \\ D; accept = that mass / r̄([lo, hi))
    sizes the candidate batches (None: start at 1 and learn it from the rejections; if a
    round keeps nothing, ``exact_accept()`` is asked, and 0 there means no draws at all).
    Candidates: entry (b, j) of [r_b(top-K), r_b(tail in range)] by one multinomial; a tail
    entry is a uniform class of [lo, hi) outside top-K_b; candidates in D are rejected."""
    B, K = teacher.ids.shape
    C = teacher.num_classes
    dev, gdev = teacher.ids.device, _gen_device(generator)
    if lo == 0 and hi == C:
        P = torch.cat([pk.expand(B, K), (tail * (C - K)).unsqueeze(1)], 1)
    else:
        inside = (teacher.ids >= lo) & (teacher.ids < hi)
        P = torch.cat([pk * inside, (tail * ((hi - lo) - inside.sum(1))).unsqueeze(1)], 1)
    P = P.reshape(-1).to(gdev)
    flat_ids = teacher.ids.reshape(-1)
    got, need, guess = [], m, accept is None
    accept = 1.0 if accept is None else accept
    for _ in range(10_000):
        n_c = int(min(need / max(accept, 1e-3) * 1.1 + 16, 64 * m + 4096))
        idx = torch.multinomial(P, n_c, replacement=True, generator=generator).to(dev)
        b = torch.div(idx, K + 1, rounding_mode="floor")
        j = idx - b * (K + 1)
        tl = j == K
        c = flat_ids.index_select(0, (b * K + j).clamp_(max=B * K - 1))
        if bool(tl.any()):
            sel = tl.nonzero().squeeze(1)
            u = torch.randint(lo, hi, (sel.numel(),), generator=generator, device=gdev).to(dev)
            c[sel] = _outside_rows(u, b.index_select(0, sel), teacher, lo, hi, generator,
                                   workspace=workspace)
        if det.numel():
            pos = torch.searchsorted(det, c).clamp_(max=det.numel() - 1)
            c = c[det.index_select(0, pos) != c]
        got.append(c[:need])
        need -= got[-1].numel()
        if need <= 0:
            return torch.cat(got)
        if guess:                                # deterministic: depends on the draws only
            if c.numel() == 0 and exact_accept is not None:
                accept, exact_accept = exact_accept(), None
                if not accept > 0:
                    return det.new_zeros(0)
            else:
                accept = max(c.numel() / n_c, 1e-3)
    raise RuntimeError("could not draw outside D: the proposal has (almost) no mass there")


def _finish_shared(teacher, det, det_a, draws_raw, pk, tail, n_draws, log_norm, paper_norm,
                   correction, workspace):
    """SampleSet (n,) and teacher logits (B, n) from D and the raw draws."""
    dev = teacher.ids.device
    draws, counts = torch.unique(draws_raw, return_counts=True)
    a_d, rbar = _shared_lookup(teacher, draws, pk, tail, workspace)
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
    pk, tail = _row_probs(teacher, proposal, workspace)
    det = _deterministic(teacher, y, top_t)
    det_a, r_det = _shared_lookup(teacher, det, pk, tail, workspace)
    total = (pk.sum(1) + tail * (teacher.num_classes - teacher.k)).mean()
    return pk, tail, det, det_a, r_det, total


def _batch_shared(teacher, y, proposal, m, top_t, correction, generator, workspace):
    """One look-up, after drawing: the acceptance of D's rejection is learnt while drawing
    (an exact look-up of D happens only if a whole round lands in D)."""
    C = teacher.num_classes
    pk, tail = _row_probs(teacher, proposal, workspace)
    det = _deterministic(teacher, y, top_t)
    nd = det.numel()
    total = (pk.sum(1) + tail * (C - teacher.k)).mean()

    def exact_accept():
        r_det = _shared_lookup(teacher, det, pk, tail, workspace, logits=False)[1]
        return float((total - r_det.sum()) / total)
    draws_raw = det.new_zeros(0)
    if nd < C:
        draws_raw = _draw_mixture(teacher, pk, tail, det, 0, C, m, None, generator,
                                  exact_accept, workspace)
    draws, counts = torch.unique(draws_raw, return_counts=True)
    cls = torch.cat([det, draws])
    a, rbar = _shared_lookup(teacher, cls, pk, tail, workspace)
    log_z = torch.log((total - rbar[:nd].sum()).clamp_min(1e-300))   # r̄ mass of C \ D
    o = torch.log(rbar[nd:]) - log_z - torch.log(counts.double())
    if correction == "expected":
        o = o + math.log(m)
    dev = teacher.ids.device
    s = SampleSet(
        classes=cls,
        log_correction=torch.cat([torch.zeros(nd, device=dev), o.float()]),
        deterministic=torch.cat([torch.ones(nd, dtype=torch.bool, device=dev),
                                 torch.zeros(draws.numel(), dtype=torch.bool, device=dev)]),
        mask=None, mode="batch_shared")
    return s, a


# ---------------------------------------------------------------- hybrid
def _draw_rbar(teacher, pk, tail, m, generator, workspace):
    """m i.i.d. draws from r̄ over all C classes (nothing excluded), O(B·K + m log(B·K)):
    a row b with probability ∝ its mass, then an inverse-CDF draw from r_b's
    [top-K, tail] entries by one searchsorted over every row's normalised CDF offset by
    its row index (so the rows form one sorted array); a tail entry becomes the i-th class
    outside the row's top-K, i uniform (:func:`_nth_outside`: no rejection, no sort)."""
    B, K = teacher.ids.shape
    C, dev, gdev = teacher.num_classes, teacher.ids.device, _gen_device(generator)
    P = torch.cat([pk.expand(B, K), (tail * (C - K)).unsqueeze(1)], 1)      # (B, K + 1)
    mass = P.sum(1, keepdim=True)
    b = torch.multinomial(mass.squeeze(1).to(gdev), m, replacement=True,
                          generator=generator).to(dev)
    keys = P.cumsum_(1).div_(mass.clamp_min(1e-300)).clamp_(max=1.0)
    keys += torch.arange(B, device=dev, dtype=keys.dtype).unsqueeze(1)   # row b: (b, b+1]
    u = torch.rand(m, dtype=keys.dtype, generator=generator, device=gdev).to(dev)
    j = (torch.searchsorted(keys.view(-1), b + u, right=True) - b * (K + 1)).clamp_(max=K)
    c = teacher.ids.view(-1).index_select(0, b * K + j.clamp(max=K - 1))
    if K < C:   # tail entries: a uniform class outside the row's top-K
        c = torch.where(j == K, _uniform_outside(teacher, b, generator), c)
    return c


def _draw_ranked(teacher, proposal, m, generator, workspace):
    """m i.i.d. draws from r̄ for a rank proposal, O(m): every row's r_b is the same rank
    law over C ranks (mass 1), so a draw is a uniform row b and a rank k from the law
    (closed-form inverse CDF); rank k < K is the row's k-th top-K class, a tail rank a
    uniform class outside its top-K (the tie the completion implies)."""
    B, K = teacher.ids.shape
    C, dev, gdev = teacher.num_classes, teacher.ids.device, _gen_device(generator)
    k = _law(proposal, C, workspace).draw(0, C, m, generator).to(dev)
    b = torch.randint(0, B, (m,), generator=generator, device=gdev).to(dev)
    c = teacher.ids.view(-1).index_select(0, b * K + k.clamp(max=K - 1))
    if K < C:
        c = torch.where(k >= K, _uniform_outside(teacher, b, generator), c)
    return c


def _uniform_outside(teacher: TopKTeacher, b: torch.Tensor, generator) -> torch.Tensor:
    """(m,) a uniform class outside row b's top-K for each entry of b. With K <= C/2: a
    uniform class, re-drawn where it hits the row's top-K (an (m, K) comparison a round,
    accepted with probability >= 1/2, nearly always 1 - K/C); whatever is still rejected
    after a few rounds, or every entry when K > C/2, takes the exact rank-inversion
    :func:`_nth_outside` (which sorts the top-K once per batch)."""
    C, K, m = teacher.num_classes, teacher.k, b.numel()
    dev, gdev = teacher.ids.device, _gen_device(generator)

    def draw(high):
        return torch.randint(0, high, (m,), generator=generator, device=gdev).to(dev)
    if 2 * K <= C:
        rows = teacher.ids.index_select(0, b)                               # (m, K)
        c = draw(C)
        for _ in range(4):
            bad = (rows == c.unsqueeze(1)).any(1)
            if not bool(bad.any()):
                return c
            c = torch.where(bad, draw(C), c)
        bad = (rows == c.unsqueeze(1)).any(1)
        return torch.where(bad, _nth_outside(teacher, b, draw(C - K)), c)
    return _nth_outside(teacher, b, draw(C - K))


def _nth_outside(teacher: TopKTeacher, b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The i-th (0-based) class id outside row b's top-K, elementwise: with s the row's
    sorted ids, s_q − q counts the classes outside it below s_q, so the answer is
    i + #{q : s_q − q <= i} (:meth:`TopKTeacher.gap_keys`, one searchsorted)."""
    keys = teacher.gap_keys()
    C, K = teacher.num_classes, teacher.k
    return i + torch.searchsorted(keys, b * C + i, right=True) - b * K


# Up to this many B·C entries the hybrid sampler works on the dense completed teacher: a
# few O(B·C) passes cost less than the O(B·K) look-ups' dozens of small operations.
DENSE_HYBRID_ENTRIES = 2 ** 20


def _hybrid(teacher, y, proposal, m, top_t, correction, generator, workspace):
    """D_b per row (as per_sample) + m draws from the unrestricted r̄ shared by the batch."""
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    pk, tail = _row_probs(teacher, proposal, workspace)
    if (top_t == 0 and B * C <= DENSE_HYBRID_ENTRIES and _gen_device(generator).type == "cpu"
            and _native_ok(teacher, y, logits=True)):
        return _hybrid_native(teacher, y, pk, tail, m, correction, generator, workspace)
    if B * C <= DENSE_HYBRID_ENTRIES:
        dense = teacher.dense()                                          # (B, C)
        # r̄ = mean_b tail_b + Σ_b (r_b - tail_b) / B on each row's top-K: (C,) float64
        rbar_all = tail.mean().expand(C).clone().index_add_(
            0, teacher.ids.reshape(-1), (pk - tail.unsqueeze(1)).reshape(-1), alpha=1.0 / B)
        total = rbar_all.sum()                                           # r̄'s mass
        draws, counts = torch.unique(_draw(rbar_all, m, generator), return_counts=True)
        rbar, a_s = rbar_all.index_select(0, draws), dense.index_select(1, draws)
    else:
        dense = None
        total = (pk.sum(1) + tail * (C - K)).mean()
        raw = (_draw_ranked(teacher, proposal, m, generator, workspace)
               if proposal.rank_based else _draw_rbar(teacher, pk, tail, m, generator, workspace))
        draws, counts = torch.unique(raw, return_counts=True)
        a_s, rbar = _shared_lookup(teacher, draws, pk, tail, workspace)
    o = torch.log(rbar / (counts * total))          # log(r̄(c) / R) - log(count)
    if correction == "expected":
        o = o + math.log(m)
    if dense is not None and top_t == 0:
        det = y.long().unsqueeze(1)
        det_a = dense.gather(1, det)
    else:
        det, det_a, _, _ = _row_deterministic(teacher, y, top_t)
    return hybrid_set(det, draws, o.float()), torch.cat([det_a, a_s], 1)


def _native_ok(teacher, other: torch.Tensor, logits: bool = False) -> bool:
    """The native top-K helpers apply: host int64 contiguous ids, ``other`` (labels or
    classes) on the host, and with ``logits`` float32 contiguous top-K logits."""
    t = teacher
    return (native.supports(t.ids) and t.ids.dtype == torch.int64
            and other.device.type == "cpu"
            and (not logits or (native.supports(t.logits) and t.logits.dtype == torch.float32))
            and native.available())


def _hybrid_native(teacher, y, pk, tail, m, correction, generator, workspace):
    """_hybrid with top_t = 0 through two native kernels: r̄ over the C classes from the
    top-K (no (B, K) temporaries) and the teacher logits at [y_b, draws] plus the target
    mask in one O(B·K) pass (no dense (B, C) teacher). Same draws and numbers as the
    dense branch to float rounding."""
    C = teacher.num_classes
    rbar_all = native.rbar_topk(teacher.ids, pk, tail, C)
    total = rbar_all.sum()
    draws, counts = torch.unique(_draw(rbar_all, m, generator), return_counts=True)
    o = torch.log(rbar_all.index_select(0, draws) / (counts * total))
    if correction == "expected":
        o = o + math.log(m)
    y = y.long().contiguous()
    a, in_d = native.topk_lookup(teacher.ids, teacher.logits, teacher.rest_logit().contiguous(),
                                 y, draws, _stamp(workspace, C, "cpu"), C)
    return hybrid_set(y.unsqueeze(1), draws, o.float(), in_d), a


def batch_mixture_topk(teacher: TopKTeacher, y: torch.Tensor, proposal: Proposal,
                       top_t: int = 0, classes: torch.Tensor | None = None,
                       workspace: dict | None = None):
    """(r̄ at ``classes`` (n,) float64, normalised on C \\ D and 0 on D; D (n_D,) sorted).

    classes None: all C classes (O(C); for tests)."""
    pk, tail, det, _, r_det, total = _shared_setup(teacher, y, proposal, top_t, workspace)
    if classes is None:
        classes = torch.arange(teacher.num_classes, device=teacher.ids.device)
    u, inv = torch.unique(classes.long(), return_inverse=True)
    rbar = _shared_lookup(teacher, u, pk, tail, workspace, logits=False)[1][inv]
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
    own_d = owner_of(det, teacher.num_classes, len(bounds))
    R_all = torch.stack([_range_mass(teacher, pk, tail, s, e) for s, e in bounds])
    R = (R_all - torch.zeros_like(R_all).index_add_(0, own_d, r_det)).clamp_min(0.0)  # r̄(shard \ D)
    # When D covers (almost) a whole shard the subtraction leaves rounding dust, not mass:
    # drawing from it would reject forever.
    R = torch.where(R > 1e-9 * R_all.sum(), R, torch.zeros_like(R))
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
                              float(R[rank]) / max(mass_in, 1e-300), gen, workspace=workspace)
    return _finish_shared(teacher, det, det_a, draws, pk, tail, n_s,
                          math.log(max(float(R[rank]), 1e-300)), math.log(max(Z, 1e-300)),
                          correction, workspace)


# ---------------------------------------------------------------- per-sample
def _rank_columns(teacher, proposal, m, top_t, generator, pos_y, y_in, correction, workspace):
    """Rank proposals: m shared ranks. Returns (is_tail (B, m), top-K column (B, m),
    o (B, m) float32): rank k < h_b is top-K column k (+1 past the target), k >= h_b a tail
    class with the tail's average probability."""
    K, C, dev = teacher.k, teacher.num_classes, teacher.ids.device
    n = C - 1
    law = _law(proposal, n, workspace)
    lm = math.log(m) if correction == "expected" else 0.0

    def consts():   # log norm; per h in (K - 1, K): log(tail mass / tail count / norm)
        log_norm = math.log(law.interval(top_t, n).item())
        h = torch.tensor([K - 1.0, float(K)])
        o_t = torch.log(law.interval(h, float(n)) / (n - h).clamp_min(1)) - log_norm + lm
        return log_norm, o_t.to(dev)
    log_norm, o_tail = _cached(workspace, _rank_key(proposal, "ps", n, top_t, K, lm, str(dev)),
                               consts)
    k = law.draw(top_t, n, m, generator).to(dev)                                # (m,)
    o_k = law.log_mass(k.double()) - (log_norm - lm)
    h = K - y_in.long()                                   # top-K non-target ranks per row
    is_tail = k.unsqueeze(0) >= h.unsqueeze(1)
    o = torch.where(is_tail, o_tail.index_select(0, 1 - y_in.long()).float().unsqueeze(1),
                    o_k.float().unsqueeze(0))
    return is_tail, _rest_columns(pos_y, k.clamp(max=K - 1), K), o


def _teacher_columns(teacher, proposal, m, top_t, generator, pos_y, y_in, correction):
    """FTIS: per-row draws from [p_b(top-K) without D_b, tail mass]; same returns."""
    B, K, C = teacher.ids.shape[0], teacher.k, teacher.num_classes
    dev = teacher.ids.device
    n_tail = C - K - (~y_in).long()
    pk, tail = _row_probs(teacher, proposal)
    P = torch.cat([pk, (tail * n_tail).unsqueeze(1)], 1)
    dcols = pos_y.unsqueeze(1)                            # D_b: the target and the top-t
    if top_t:
        j = _rest_columns(pos_y, torch.arange(top_t, device=dev), K).expand(B, top_t)
        dcols = torch.cat([j, dcols], 1)
    P.scatter_(1, dcols, 0.0)                 # (a target outside the top-K points at the
    P[:, K] = tail * n_tail                   # tail column: restore it)
    total = P.sum(1, keepdim=True)
    if bool((total <= 0).any()):        # all mass on D: uniform over C \ D_b (dense does too)
        U = torch.ones_like(P).scatter(1, dcols, 0.0)
        U[:, K] = n_tail.double()
        P = torch.where(total <= 0, U, P)
        total = P.sum(1, keepdim=True)
    draw = torch.multinomial(P.to(_gen_device(generator)), m, replacement=True,
                             generator=generator).to(dev)            # (unnormalised P)
    is_tail = draw == K
    log_den = torch.log(total)                                        # (B, 1)
    if correction == "expected":
        log_den = log_den - math.log(m)
    o = torch.log(P.gather(1, draw)) - log_den                        # log(m p) per entry
    o = o - is_tail * torch.log(n_tail.clamp_min(1).double()).unsqueeze(1)  # per tail class
    return is_tail, draw.clamp(max=K - 1), o.float()


def _tail_fill(teacher, y, is_tail, cls, generator, workspace):
    """Put uniform tail classes (outside top-K_b and != y_b) where is_tail (B, m): column
    j's candidate is shared by all rows; a row holding it re-draws on its own."""
    B, m = is_tail.shape
    dev, C, K = teacher.ids.device, teacher.num_classes, teacher.k
    cand = torch.randint(0, C, (m,), generator=generator, device=_gen_device(generator)).to(dev)
    cls = torch.where(is_tail, cand.unsqueeze(0), cls)
    if _native_ok(teacher, y):      # the clash test below in one O(B·K + B·m) pass
        bad = native.tail_clash(teacher.ids, y.long().contiguous(), cand.contiguous(),
                                is_tail.contiguous(), _stamp(workspace, C, "cpu"), C)
    else:
        u, inv = torch.unique(cand, return_inverse=True)
        hit, col = _topk_hits(teacher.ids, u, workspace, C)     # few: about B·K·m / C
        rows = torch.div(hit, K, rounding_mode="floor")
        pair = (col.unsqueeze(1) == inv.unsqueeze(0)).nonzero()  # (hit, column) clashes
        bad = torch.zeros_like(is_tail)
        bad[rows.index_select(0, pair[:, 0]), pair[:, 1]] = True
        bad |= y.unsqueeze(1) == cand.unsqueeze(0)
        bad &= is_tail
    if bool(bad.any()):
        rows, slots = bad.nonzero(as_tuple=True)
        new = torch.randint(0, C, (rows.numel(),), generator=generator,
                            device=_gen_device(generator)).to(dev)
        cls[rows, slots] = _outside_rows(new, rows, teacher, 0, C, generator, y, workspace)
    return cls


def _row_deterministic(teacher, y, top_t):
    """Per-row D_b = [y_b, top-t non-target] (B, 1 + t), their teacher logits, pos_y, y_in."""
    pos_y, y_in = _target_pos(teacher, y)
    K = teacher.k
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    if top_t == 0:                      # the common case, in a third of the operations
        y_a = teacher.logits.gather(1, pos_y.clamp(max=K - 1).unsqueeze(1))
        return (y.long().unsqueeze(1), torch.where(y_in.unsqueeze(1), y_a, rest.unsqueeze(1)),
                pos_y, y_in)
    dcol = _rest_columns(pos_y, torch.arange(top_t, device=y.device), K).expand(-1, top_t)
    y_a = torch.where(y_in, teacher.logits.gather(1, pos_y.clamp(max=K - 1).unsqueeze(1))
                      .squeeze(1), rest)
    det = torch.cat([y.long().unsqueeze(1), teacher.ids.gather(1, dcol)], 1)
    det_a = torch.cat([y_a.unsqueeze(1), teacher.logits.gather(1, dcol)], 1)
    return det, det_a, pos_y, y_in


def _per_sample(teacher, y, proposal, m, top_t, correction, generator, workspace):
    det, det_a, pos_y, y_in = _row_deterministic(teacher, y, top_t)
    rest = teacher.rest_logit().to(teacher.logits.dtype)
    if proposal.rank_based:
        is_tail, col, o = _rank_columns(teacher, proposal, m, top_t, generator, pos_y, y_in,
                                        correction, workspace)
    else:
        is_tail, col, o = _teacher_columns(teacher, proposal, m, top_t, generator, pos_y, y_in,
                                           correction)
    cls = teacher.ids.gather(1, col)
    a = teacher.logits.gather(1, col)
    if bool(is_tail.any()):
        cls = _tail_fill(teacher, y.long(), is_tail, cls, generator, workspace)
        a = torch.where(is_tail, rest.unsqueeze(1), a)
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
    fn = {"per_sample": _per_sample, "batch_shared": _batch_shared, "hybrid": _hybrid}[mode]
    s, a = fn(teacher, y, proposal, m, top_t, correction, generator, workspace)
    return (s, a) if return_teacher else s


__all__ = ["TopKTeacher", "completion_logit", "sample_classes_topk", "sample_stratified_topk", "teacher_logits_at",
           "batch_mixture_topk", "per_sample_probs_topk", "rank_interval_mass", "rank_draw"]
