"""The one draw (dkd.sampling.draw): laws, randomness, look-ups, and unbiasedness.

Every mode × proposal, for a dense teacher (K = C) and a top-K one, must estimate each
row's Σ_{c ∉ D_b} exp(s_c) without bias: the mean over many keys of
Σ_j mask · exp(s_j − o_j) over the drawn columns equals the exact sum.
"""
import math

import pytest
import torch

from dkd.head.shard import shard_bounds
from dkd.sampling.draw import draw_sample_set
from dkd.sampling.laws import rank_bins, row_entries
from dkd.sampling.lookup import shared_lookup
from dkd.sampling.proposals import LaplaceMixtureProposal, TeacherProposal, UniformProposal
from dkd.sampling.rng import draw_key, uniforms
from dkd.sampling.teacher_batch import TopKTeacher

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
    y[1] = t.ids[1, 2]
    y[2:] = torch.tensor([next(c for c in range(C) if c not in t.ids[b].tolist())
                          for b in range(2, B)]) if K < C else t.ids[2:, K - 1]
    return t, y


def test_uniforms_are_a_pure_function_of_the_key():
    a = uniforms(draw_key(3, 7, 1), (2, 500), "cpu")
    b = uniforms(draw_key(3, 7, 1), (2, 500), "cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, uniforms(draw_key(3, 8, 1), (2, 500), "cpu"))
    assert not torch.equal(a, uniforms(draw_key(3, 7, 2), (2, 500), "cpu"))
    u = uniforms(draw_key(0, 0), 200_000, "cpu")
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    hist = torch.histc(u.float(), bins=20, min=0.0, max=1.0) / u.numel()
    assert float((hist - 0.05).abs().max()) < 0.003
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


@pytest.mark.parametrize("name", ["uniform", "dis"])
def test_rank_bins_are_the_binned_rank_law(name):
    prop = PROPOSALS[name]()
    prop.advance(3000)
    for n, K in ((100, 100), (751, 20), (751, 751)):
        bins = rank_bins(prop, n, K, "cpu")
        r = prop.rank_probs(n)
        torch.testing.assert_close(bins[:min(K, n)], r[:min(K, n)], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(bins.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
def test_lookup_teacher_logits_and_rbar(K, name):
    t, _ = _teacher(K)
    prop = PROPOSALS[name]()
    E = row_entries(t, prop)
    cls = torch.tensor([3, 0, 12, 3, 7, 0])
    rep, a, rbar = shared_lookup(t, cls, E, {})
    torch.testing.assert_close(a, t.dense()[:, cls])
    assert rep.tolist() == [0, 1, 2, 0, 4, 1]
    # brute force r̄ of the uniform-tail family: E[b, j] at ids[b, j] plus E[b, K] / C
    r = torch.zeros(B, C, dtype=torch.float64)
    r.scatter_(1, t.ids, E[:, :K].expand(B, K).clone())
    r += E[:, K:].expand(B, 1) / C
    torch.testing.assert_close(rbar, r.mean(0)[cls])


CASES = [("batch_shared", None), ("hybrid", None), ("per_sample", None), ("batch_shared", 2),
         ("batch_shared", 3)]


@pytest.mark.parametrize("K", [C, 5])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
@pytest.mark.parametrize("mode,world", CASES, ids=[f"{m}-{w}" for m, w in CASES])
def test_estimate_of_the_tail_sum_is_unbiased(K, name, mode, world):
    t, y = _teacher(K)
    prop = PROPOSALS[name]()
    z = torch.randn(B, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bounds = shard_bounds(C, world or 1)
    top_t = 0 if world else 1
    acc, N, ws = torch.zeros(B, dtype=torch.float64), 3000, {}
    for step in range(N):
        for rank in range(world or 1):
            s, a = draw_sample_set(t, y, prop, 5, mode=mode, top_t=top_t,
                                   key=draw_key(0, step), workspace=ws,
                                   shard=(bounds, rank) if world else None)
            cls = s.classes if s.classes.dim() == 2 else s.classes.expand(B, -1)
            keep = s.row_mask(B) & ~s.deterministic.expand(B, -1)
            acc += (torch.exp(z.gather(1, cls) - s.log_correction.double()) * keep).sum(1)
            torch.testing.assert_close(a, t.dense().gather(1, cls))
    det = s.classes[s.deterministic] if s.classes.dim() == 1 else None
    exact = []
    for b in range(B):
        D = set(det.tolist()) if det is not None else set(s.classes[b, :s.shared_from].tolist())
        exact.append(sum(math.exp(z[b, c]) for c in range(C) if c not in D))
    ratio = acc / N / torch.tensor(exact, dtype=torch.float64)
    assert float((ratio - 1).abs().max()) < 0.05, ratio


def test_masks_and_corrections_batch_shared():
    t, y = _teacher(5)
    y = torch.tensor([1, 1, 4, 1])                    # repeated targets
    s, _ = draw_sample_set(t, y, PROPOSALS["uniform"](), 200, mode="batch_shared",
                           key=draw_key(1, 2), workspace={})
    assert s.classes.shape == (B + 200,)
    assert s.mask[:B].tolist() == [True, False, True, False]        # first occurrences
    draws = s.classes[B:]
    in_d = (draws == 1) | (draws == 4)
    assert not bool((s.mask[B:] & in_d).any())
    kept = draws[s.mask[B:]]
    assert kept.numel() == torch.unique(kept).numel()               # one column per class
    assert bool(torch.isfinite(s.log_correction).all())


def test_draws_are_identical_on_every_call_and_differ_by_step():
    t, y = _teacher(5)
    prop = PROPOSALS["dis"]()
    for mode in ("batch_shared", "hybrid", "per_sample"):
        a, _ = draw_sample_set(t, y, prop, 9, mode=mode, key=draw_key(0, 4), workspace={})
        b, _ = draw_sample_set(t, y, prop, 9, mode=mode, key=draw_key(0, 4))
        c, _ = draw_sample_set(t, y, prop, 9, mode=mode, key=draw_key(0, 5))
        assert torch.equal(a.classes, b.classes)
        assert torch.equal(a.log_correction, b.log_correction)
        assert not torch.equal(a.classes, c.classes)


def test_per_sample_tail_classes_are_outside_the_row_top_k_and_target():
    t, y = _teacher(5)
    s, _ = draw_sample_set(t, y, PROPOSALS["uniform"](), 400, mode="per_sample",
                           key=draw_key(0, 0))
    for b in range(B):
        drawn = set(s.classes[b, 1:].tolist())
        assert int(y[b]) not in drawn
        assert drawn - set(t.ids[b].tolist())            # some tail classes were drawn
        assert drawn <= set(range(C))


def test_bad_arguments_raise():
    t, y = _teacher(5)
    prop = PROPOSALS["uniform"]()
    with pytest.raises(ValueError, match="mode must be"):
        draw_sample_set(t, y, prop, 3, mode="nope")
    with pytest.raises(ValueError, match="top_t"):
        draw_sample_set(t, y, prop, 3, top_t=5)
    with pytest.raises(ValueError, match="m \\(number of draws\\)"):
        draw_sample_set(t, y, prop, 0)
    with pytest.raises(ValueError, match="stratified"):
        draw_sample_set(t, y, prop, 3, mode="hybrid", shard=([(0, 7), (7, 13)], 0))


@pytest.mark.parametrize("mode", ["batch_shared", "hybrid", "per_sample"])
@pytest.mark.parametrize("name", ["uniform", "dis", "ftis"])
def test_mean_sampled_gradient_converges_to_full_kd_at_m_4C(name, mode):
    """Masked-not-redrawn draws keep the estimator consistent: the mean sampled KD
    gradient w.r.t. the student logits at m = 4C has cosine >= 0.999 with full KD's."""
    from test_estimator import C as Cb, _full_grad, _problem, _proposal, _sampled_grad
    phi, W, a, y = _problem()                   # the oracle tests' problem and proposals
    full = _full_grad(phi, W, a, y)
    t, prop = TopKTeacher.from_dense(a), _proposal(name)
    acc, ws = torch.zeros_like(W), {}
    for step in range(128):
        s, _ = draw_sample_set(t, y, prop, 4 * Cb, mode=mode, key=draw_key(0, step), workspace=ws)
        acc += _sampled_grad(phi, W, a, y, s)
    cos = torch.nn.functional.cosine_similarity((acc / 128).flatten(), full.flatten(), dim=0)
    assert cos >= 0.999, float(cos)


def test_native_outside_matches_the_torch_rank_inversion():
    """The native tail-class kernel = the torch path (sort + searchsorted) of _outside,
    with per-row and shared draws; every class it returns is outside the row's excluded
    ids, and out-of-range ids are refused."""
    from dkd.head import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(3)
    B, K, C, m = 7, 30, 500, 64
    ids = torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(B)])
    y = torch.randint(0, C, (B,), generator=gen)
    y[:3] = ids[:3, 5]                                 # rows whose target is in the top-K
    y_in = (ids == y.unsqueeze(1)).any(1)
    ext = torch.cat([ids, torch.where(y_in, C, y).unsqueeze(1)], 1)
    n_out = C - K - (~y_in).long()
    for i in ((torch.rand(B, m, generator=gen) * n_out.unsqueeze(1)).long(),
              torch.randint(0, int(n_out.min()), (m,), generator=gen)):
        got = native.outside(ids, ext[:, -1], C, i)
        ref = i.expand(B, -1) + torch.searchsorted(
            torch.sort(ext, 1).values - torch.arange(K + 1), i.expand(B, -1).contiguous(),
            right=True)
        assert torch.equal(got, ref)
        assert not (got.unsqueeze(2) == ext.unsqueeze(1)).any()
        assert ((got >= 0) & (got < C)).all()
    with pytest.raises(IndexError, match="outside"):
        native.outside(torch.full((1, 3), C + 1), torch.zeros(1, dtype=torch.long), C,
                       torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("top_t,correction", [(0, "expected"), (3, "expected"), (2, "paper")])
def test_native_rank_draw_is_the_torch_draw(top_t, correction):
    """On a host the rank proposals' per-sample draw runs as one C pass: the same classes
    and teacher logits as the torch path, corrections to float rounding (DIS and uniform,
    targets inside and outside the top-K)."""
    from dkd.head import native
    from dkd.sampling.proposals import build_proposal
    from dkd.sampling.teacher_batch import TopKTeacher

    if not native.available():
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(11)
    B, C, K, m = 24, 3000, 40, 64
    logits = torch.randn(B, C, generator=gen) * 3
    teacher = TopKTeacher.from_dense(logits, K)
    y = torch.randint(0, C, (B,), generator=gen)
    y[:8] = teacher.ids[torch.arange(8), torch.arange(8) * 3]   # targets in the top-K
    for prop in (build_proposal("dis", total_steps=100), build_proposal("uniform")):
        got = draw_sample_set(teacher, y, prop, m, mode="per_sample", top_t=top_t,
                              correction=correction, key=5)
        with native.disabled():
            ref = draw_sample_set(teacher, y, prop, m, mode="per_sample", top_t=top_t,
                                  correction=correction, key=5)
        assert torch.equal(got[0].classes, ref[0].classes)
        assert torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[0].log_correction, ref[0].log_correction,
                                   rtol=0, atol=1e-6)
