"""Top-K teacher sampler against the dense sampler on the KD-topk-completed teacher.

K = C: the same r̄ / per-sample probabilities as the dense sampler, exactly (to float
rounding). K < C: the same as the dense sampler on the completed dense logits with the
tied tail ranks averaged (the completion makes ranks beyond K exchangeable). Corrections
o are log(m · prob) of those verified probabilities, and the estimator is unbiased.
"""
import math

import pytest
import torch

from dkd.sampling.proposals import (LaplaceMixtureProposal, TeacherProposal, UniformProposal,
                                    teacher_ranking)
from dkd.sampling.sampler import _non_target_order
from dkd.sampling.topk_sampler import (TopKTeacher, batch_mixture_topk, completion_logit, per_sample_probs_topk,
                                       rank_draw, rank_interval_mass, sample_classes_topk,
                                       sample_stratified_topk, teacher_logits_at)

B, C = 4, 13
PROPOSALS = {
    "uniform": lambda: UniformProposal(),
    "dis": lambda: LaplaceMixtureProposal(w=0.6, b1=20.0, b2_start=30.0),
    "ftis": lambda: TeacherProposal(temperature=2.0, eps=0.1),
}


def _teacher(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(B, C, generator=g, dtype=torch.float64) * 2.0
    t = TopKTeacher.from_dense(dense, K)
    y = t.ids[:, 0].clone()
    y[2:] = t.ids[2:, K - 1] if K == C else torch.tensor(
        [next(c for c in range(C) if c not in t.ids[b].tolist()) for b in range(2, B)])
    return t, y


def _tie_average(r, t):
    """Average r (B, C) over each row's non-top-K classes (the completion's tie)."""
    if t.k == C:
        return r
    tail = torch.ones(B, C, dtype=torch.bool).scatter_(1, t.ids, False)
    mean = (r * tail).sum(1, keepdim=True) / tail.sum(1, keepdim=True)
    return torch.where(tail, mean, r)


def _dense_rbar(t, y, prop, top_t):
    dense = t.dense()
    order, ranks = teacher_ranking(dense)
    r = prop.class_probs(dense, ranks).double()
    r = _tie_average(r, t) if prop.rank_based else r
    rbar = r.mean(0)
    det = torch.unique(torch.cat([y, _non_target_order(order, ranks, y)[:, :top_t].reshape(-1)]))
    rbar[det] = 0.0
    return rbar / rbar.sum(), det


def _dense_per_sample(t, y, prop, top_t):
    dense = t.dense()
    order, ranks = teacher_ranking(dense)
    rest = _non_target_order(order, ranks, y)
    if prop.rank_based:
        r = prop.rank_probs(C - 1).double()
        r[:top_t] = 0.0
        P = torch.zeros(B, C, dtype=torch.float64).scatter_(1, rest, (r / r.sum()).expand(B, -1))
        tail = torch.ones(B, C, dtype=torch.bool).scatter_(1, t.ids, False)
        tail[torch.arange(B), y] = False                  # the tie: non-top-K, not the target
        mean = (P * tail).sum(1, keepdim=True) / tail.sum(1, keepdim=True).clamp_min(1)
        P = torch.where(tail, mean, P)
    else:
        P = prop.class_probs(dense).double()
    D = torch.cat([y.unsqueeze(1), rest[:, :top_t]], 1)
    P = P.scatter(1, D, 0.0)
    return P / P.sum(1, keepdim=True), D


@pytest.mark.parametrize("name", ["uniform", "dis"])
def test_rank_closed_form_matches_rank_probs(name):
    prop = PROPOSALS[name]()
    prop.advance(3000)
    for n in (7, 100, 751):
        k = torch.arange(n, dtype=torch.float64)
        got = rank_interval_mass(prop, n, k, k + 1)
        torch.testing.assert_close(got, prop.rank_probs(n), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(rank_interval_mass(prop, n, 5, n),
                                   prop.rank_probs(n)[5:].sum(), rtol=1e-9, atol=0)


def test_rank_draw_frequencies():
    prop, n, lo = PROPOSALS["dis"](), 20, 3
    g = torch.Generator().manual_seed(1)
    k = rank_draw(prop, n, lo, n, 200_000, g)
    assert int(k.min()) >= lo and int(k.max()) < n
    p = prop.rank_probs(n)[lo:] / prop.rank_probs(n)[lo:].sum()
    freq = torch.bincount(k - lo, minlength=n - lo).double() / k.numel()
    assert float(((freq - p).abs() / (p * (1 - p) / k.numel()).sqrt()).max()) < 5.0


def test_completion_and_lookup():
    t, _ = _teacher(5)
    dense = t.dense()
    torch.testing.assert_close(torch.logsumexp(dense, 1), t.lse)
    full = TopKTeacher.from_dense(dense, C)
    torch.testing.assert_close(full.dense(), dense)
    cls = torch.tensor([3, 0, 12, 3])
    torch.testing.assert_close(teacher_logits_at(t, cls), dense[:, cls])
    per = torch.randint(0, C, (B, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(teacher_logits_at(t, per), dense.gather(1, per))
    # the completion logit handed over with the top-K (as the engine does) is the same
    rest = completion_logit(t.logits, t.lse, C)
    handed = TopKTeacher(t.ids, t.logits, t.lse, C, rest=rest)
    torch.testing.assert_close(handed.rest_logit(), t.rest_logit())
    torch.testing.assert_close(handed.dense(), dense)
    with pytest.raises(ValueError, match="rest must be"):
        TopKTeacher(t.ids, t.logits, t.lse, C, rest=rest[:2])


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
@pytest.mark.parametrize("top_t", [0, 2])
def test_batch_mixture_matches_dense(K, name, top_t):
    t, y = _teacher(K)
    prop = PROPOSALS[name]()
    rbar, det = batch_mixture_topk(t, y, prop, top_t)
    ref, ref_det = _dense_rbar(t, y, prop, top_t)
    assert torch.equal(det, ref_det)
    torch.testing.assert_close(rbar, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
@pytest.mark.parametrize("top_t", [0, 2])
def test_per_sample_probs_match_dense(K, name, top_t):
    t, y = _teacher(K)
    prop = PROPOSALS[name]()
    got = per_sample_probs_topk(t, y, prop, top_t, torch.arange(C).expand(B, C))
    ref, _ = _dense_per_sample(t, y, prop, top_t)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
@pytest.mark.parametrize("correction", ["expected", "paper"])
def test_per_sample_sets(K, name, correction):
    t, y = _teacher(K)
    prop, m, top_t = PROPOSALS[name](), 30_000, 1
    g = torch.Generator().manual_seed(3)
    s, a = sample_classes_topk(t, y, prop, m, mode="per_sample", top_t=top_t,
                               correction=correction, generator=g, return_teacher=True)
    P, D = _dense_per_sample(t, y, prop, top_t)
    assert s.classes.shape == (B, 1 + top_t + m) and torch.equal(s.classes[:, :1 + top_t], D)
    torch.testing.assert_close(a, s.gather(t.dense()).to(a.dtype))
    drawn = s.classes[:, 1 + top_t:]
    prob = P.gather(1, drawn)
    assert bool((prob > 0).all())                        # never draws D
    o_ref = torch.log(prob) + (math.log(m) if correction == "expected" else 0.0)
    torch.testing.assert_close(s.log_correction[:, 1 + top_t:].double(), o_ref,
                               rtol=1e-5, atol=1e-5)
    freq = torch.zeros(B, C, dtype=torch.float64).scatter_add_(1, drawn, torch.ones_like(prob)) / m
    assert float(((freq - P).abs() - 5 * (P / m).sqrt()).max()) < 1e-3
    if correction == "expected":                         # E[Σ exp(z - o)] = Σ_{c ∉ D} exp(z)
        z = torch.randn(B, C, generator=g, dtype=torch.float64)
        est = torch.exp(z.gather(1, drawn) - s.log_correction[:, 1 + top_t:].double()).sum(1)
        torch.testing.assert_close(est, torch.exp(z).scatter(1, D, 0.0).sum(1), rtol=0.03, atol=0)


def _shared_sets(K, name, mode, seed, m=40_000, top_t=1):
    """One large draw of a shared-draw mode: (t, y, prop, m, top_t, generator, s, a)."""
    t, y = _teacher(K)
    prop = PROPOSALS[name]()
    g = torch.Generator().manual_seed(seed)
    s, a = sample_classes_topk(t, y, prop, m, mode=mode, top_t=top_t, generator=g,
                               return_teacher=True)
    return t, y, prop, m, top_t, g, s, a


def _draw_counts(rbar, draws, o, m):
    """The draw counts the corrections o = log(m r̄) - log(count) encode: whole numbers
    that add up to m. Returns them."""
    count = torch.exp(torch.log(m * rbar[draws]) - o)
    torch.testing.assert_close(count, count.round(), rtol=0, atol=1e-3)
    assert int(count.round().sum()) == m
    return count.round()


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
def test_batch_shared_sets(K, name):
    t, y, prop, m, top_t, g, s, a = _shared_sets(K, name, "batch_shared", 4)
    rbar, det = _dense_rbar(t, y, prop, top_t)
    nd = det.numel()
    assert torch.equal(s.classes[:nd], det) and s.classes.unique().numel() == s.num_columns
    torch.testing.assert_close(a, s.gather(t.dense()).to(a.dtype))
    draws, o = s.classes[nd:], s.log_correction[nd:].double()
    _draw_counts(rbar, draws, o, m)
    z = torch.randn(C, generator=g, dtype=torch.float64)
    ref = torch.exp(z).sum() - torch.exp(z[det]).sum()
    torch.testing.assert_close(torch.exp(z[draws] - o).sum(), ref, rtol=0.03, atol=0)


@pytest.mark.parametrize("name", ["dis", "ftis"])
def test_stratified_matches_global_mixture(name):
    t, y = _teacher(5)
    prop, m, bounds = PROPOSALS[name](), 40_000, [(0, 7), (7, 13)]
    rbar, det = _dense_rbar(t, y, prop, 0)
    z = torch.randn(C, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    est, cols = 0.0, []
    for rank in range(2):
        s, a = sample_stratified_topk(t, y, prop, m, bounds, rank,
                                      generator=torch.Generator().manual_seed(5))
        lo, hi = bounds[rank]
        assert bool(((s.classes >= lo) & (s.classes < hi)).all())
        torch.testing.assert_close(a, s.gather(t.dense()).to(a.dtype))
        nd = int(s.deterministic.sum())
        draws, o = s.classes[nd:], s.log_correction[nd:].double()
        R = rbar[lo:hi].sum()
        n_s = torch.exp(torch.log(rbar[draws] / R) - o)             # = n_s / count
        est += float(torch.exp(z[draws] - o).sum())
        cols.append(s.classes[:nd])
        assert float(n_s.max()) <= m
    assert torch.equal(torch.cat(cols).sort().values, det)
    ref = float(torch.exp(z).sum() - torch.exp(z[det]).sum())
    assert abs(est - ref) / ref < 0.03


def test_per_sample_tail_is_shared_across_rows():
    Cbig, K, Bb = 100_000, 50, 16
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(Cbig, generator=g)[:K] for _ in range(Bb)])
    logits = torch.sort(torch.randn(Bb, K, generator=g), 1, descending=True).values
    t = TopKTeacher(ids, logits, torch.logsumexp(logits, 1) + 1.0, Cbig)
    y = ids[:, 0].clone()
    s = sample_classes_topk(t, y, UniformProposal(), 64, mode="per_sample", generator=g,
                            workspace={})
    cls = s.classes[:, 1:]
    assert (cls == cls[:1]).float().mean() > 0.95            # uniform: nearly all tail draws
    assert not bool((cls.unsqueeze(2) == ids.unsqueeze(1)).any())


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "lookup"])
def test_hybrid_sets(K, name, dense, monkeypatch):
    """Hybrid: per-row D_b, shared draws from the unrestricted r̄, masked where in D_b;
    the dense small-C path and the O(B·K) look-up path alike."""
    import dkd.sampling.topk_sampler as ts
    monkeypatch.setattr(ts, "DENSE_HYBRID_ENTRIES", B * C if dense else 0)
    t, y, prop, m, top_t, g, s, a = _shared_sets(K, name, "hybrid", 6)
    _, D = _dense_per_sample(t, y, prop, top_t)
    dense = t.dense()
    r = prop.class_probs(dense, teacher_ranking(dense)[1]).double()
    r = _tie_average(r, t) if prop.rank_based else r
    rbar = r.mean(0) / r.mean(0).sum()                   # over all C: nothing excluded
    nd = s.shared_from
    assert nd == 1 + top_t and torch.equal(s.classes[:, :nd], D)
    draws = s.classes[0, nd:]
    assert torch.equal(s.classes[:, nd:], draws.expand(B, -1)) and draws.unique().numel() == draws.numel()
    torch.testing.assert_close(a, s.gather(dense).to(a.dtype))
    assert torch.equal(s.mask[:, nd:], ~(D.unsqueeze(2) == draws.view(1, 1, -1)).any(1))
    assert bool(s.mask[:, :nd].all()) and bool(s.deterministic[:, :nd].all())
    o = s.log_correction[0, nd:].double()
    count = _draw_counts(rbar, draws, o, m)
    freq = torch.zeros(C, dtype=torch.float64).index_add_(0, draws, count) / m
    assert float(((freq - rbar).abs() - 5 * (rbar / m).sqrt()).max()) < 1e-3
    z = torch.randn(B, C, generator=g, dtype=torch.float64)
    est = (torch.exp(z[:, draws] - o) * s.mask[:, nd:]).sum(1)
    torch.testing.assert_close(est, torch.exp(z).scatter(1, D, 0.0).sum(1), rtol=0.03, atol=0)


def test_nth_outside_enumerates_the_complement():
    """_nth_outside(t, b, i) is the i-th class not in row b's top-K, for every i and row."""
    from dkd.sampling.topk_sampler import _nth_outside
    t, _ = _teacher(5)
    for r in range(B):
        rest = [c for c in range(C) if c not in t.ids[r].tolist()]
        i = torch.arange(C - 5)
        assert _nth_outside(t, torch.full_like(i, r), i).tolist() == rest
