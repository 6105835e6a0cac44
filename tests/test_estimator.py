"""The importance-sampled estimator against the full-KD gradient (DESIGN.md, "The estimator").

Setting: B = 4 rows, C = 50 classes, T = 4, a teacher that puts 25-40 % of its mass on the
target and is correlated with the student elsewhere. The DIS proposal is taken half-way
through its schedule: at step 0 on only 50 classes its middle ranks have probability
~1e-7, so its variance is far too large for any m a test can afford (it is consistent, but
not usefully so at C = 50); the other proposals are taken as built.
"""
import math

import pytest
import torch

from dkd.losses.sampled import sampled_kd_reference, sampled_kd_terms
from dkd.losses.softmax import full_kd_terms, mix
from dkd.losses.targets import kd_target
from dkd.sampling.proposals import LaplaceMixtureProposal, build_proposal, teacher_ranking
from oracle_sampler import SampleSet, sample_classes



B, C, D_, T = 4, 50, 16, 4.0


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B, D_, generator=g, dtype=torch.float64)
    W = torch.randn(C, D_, generator=g, dtype=torch.float64) / math.sqrt(D_) * T
    z = phi @ W.t()
    y = torch.randint(0, C, (B,), generator=g)
    a = 0.8 * z + 0.6 * T * torch.randn(B, C, generator=g, dtype=torch.float64)
    a[torch.arange(B), y] += 4 * T
    return phi, W, a, y


def _proposal(name):
    if name == "dis":
        p = LaplaceMixtureProposal(total_steps=2)
        p.advance(1)
        return p
    return build_proposal(name, **({"temperature": T} if name == "ftis" else {}))


def _full_grad(phi, W, a, y, lam=1.0):
    W = W.clone().requires_grad_(True)
    z = phi @ W.t()
    loss = mix(full_kd_terms(z, kd_target(a, T), y, T), lam, T)["loss"]
    return torch.autograd.grad(loss, W)[0]


def _sampled_grad(phi, W, a, y, ss, lam=1.0):
    W = W.clone().requires_grad_(True)
    out = sampled_kd_reference(phi, W, a, y, ss, T, lam)
    return torch.autograd.grad(out["loss"], W)[0]


def _cos(u, v):
    return float((u * v).sum() / (u.norm() * v.norm()))


# ---- the gradient on the sampled logits ----

@pytest.mark.parametrize("correction", ["expected", "paper"])
def test_gradient_is_q_hat_minus_p_hat_and_matches_algorithm_1(correction):
    phi, W, a, y = _problem(1)
    prop = _proposal("dis")
    m = 7
    ss = sample_classes(a, y, prop, m, correction=correction,
                        generator=torch.Generator().manual_seed(5))
    z = (phi @ W.t()).requires_grad_(True)
    zc, ac = ss.gather(z), ss.gather(a)
    kd = sampled_kd_terms(zc, ac, ss.log_correction, T)["kd"]
    g = torch.autograd.grad(kd.sum(), zc)[0]
    # (1) autograd == (q_hat - p_hat) / T on the used columns
    o = ss.log_correction.double()
    s_hat, t_hat = zc.detach() / T - o, ac / T - o
    ref = (torch.softmax(s_hat, -1) - torch.softmax(t_hat, -1)) / T
    torch.testing.assert_close(g, ref)
    # (2) literal Algorithm 1: weight 1 for the target, (m) r_k for a draw; h/U - g/V.
    # Draws are ranks of the C - 1 non-target classes, under the proposal on C - 1 ranks.
    R = prop.rank_probs(C - 1).tolist()
    order, _ = teacher_ranking(a)
    zd = z.detach()
    for b in range(B):
        rest = [c for c in order[b].tolist() if c != int(y[b])]
        k_draws = [rest.index(c) for c in ss.classes[b, 1:].tolist()]
        weights = [1.0] + [(m if correction == "expected" else 1) * R[k] for k in k_draws]
        cols = ss.classes[b].tolist()
        h = [math.exp(float(zd[b, c]) / T) / w for c, w in zip(cols, weights)]
        gt = [math.exp(float(a[b, c]) / T) / w for c, w in zip(cols, weights)]
        U, V = sum(h), sum(gt)
        alg1 = torch.tensor([(hi / U - gi / V) / T for hi, gi in zip(h, gt)], dtype=g.dtype)
        torch.testing.assert_close(g[b], alg1)


def test_full_set_without_corrections_is_exactly_full_kd():
    phi, W, a, y = _problem(2)
    ss = SampleSet(classes=torch.arange(C), log_correction=torch.zeros(C),
                   deterministic=torch.ones(C, dtype=torch.bool), mode="batch_shared")
    Wf = W.clone().requires_grad_(True)
    out = sampled_kd_reference(phi, Wf, a, y, ss, T, lam=0.3)
    full = mix(full_kd_terms(phi @ Wf.t(), kd_target(a, T), y, T), 0.3, T)
    torch.testing.assert_close(out["loss"], full["loss"])
    torch.testing.assert_close(torch.autograd.grad(out["loss"], Wf)[0], _full_grad(phi, W, a, y,
                                                                                0.3))


# ---- consistency: the expected-count form converges, the paper form does not ----

@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
@pytest.mark.parametrize("mode", ["per_sample", "batch_shared", "hybrid"])
def test_expected_gradient_at_m_4C_matches_full(name, mode):
    phi, W, a, y = _problem()
    g_full = _full_grad(phi, W, a, y)
    gen = torch.Generator().manual_seed(11)
    mean = {}
    for correction, seeds in (("expected", 128), ("paper", 16)):
        acc = torch.zeros_like(W)
        for _ in range(seeds):
            ss = sample_classes(a, y, _proposal(name), 4 * C, mode=mode,
                                correction=correction, generator=gen)
            acc += _sampled_grad(phi, W, a, y, ss)
        mean[correction] = acc / seeds
    assert _cos(mean["expected"], g_full) > 0.999
    # Algorithm 1 as printed counts the sampled tail m times against the target's once
    assert _cos(mean["paper"], g_full) < 0.9


@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
@pytest.mark.parametrize("mode", ["per_sample", "batch_shared", "hybrid"])
def test_single_draw_gradient_converges_as_m_grows(name, mode):
    phi, W, a, y = _problem()
    g_full = _full_grad(phi, W, a, y)
    gen = torch.Generator().manual_seed(3)
    cos = {}
    for correction in ("expected", "paper"):
        cos[correction] = [
            _cos(_sampled_grad(phi, W, a, y, sample_classes(
                a, y, _proposal(name), m, mode=mode, correction=correction, generator=gen)),
                g_full) for m in (C, 1024 * C)]
    assert cos["expected"][1] > 0.999 and cos["expected"][1] > cos["expected"][0]
    assert cos["paper"][1] < 0.9


@pytest.mark.parametrize("mode", ["per_sample", "batch_shared", "hybrid"])
def test_mixed_loss_with_sampled_ce_converges(mode):
    phi, W, a, y = _problem()
    g_full = _full_grad(phi, W, a, y, lam=0.5)
    ss = sample_classes(a, y, _proposal("uniform"), 1024 * C, mode=mode,
                        generator=torch.Generator().manual_seed(4))
    assert _cos(_sampled_grad(phi, W, a, y, ss, lam=0.5), g_full) > 0.999


# ---- the two modes estimate the same thing ----

def _z_hat(z, ss):
    """Per-row estimate of sum_c exp(z_c / T) from the sample set: (B,)."""
    e = torch.exp(ss.gather(z) / T - ss.log_correction.double())
    return (e if ss.mask is None else e * ss.mask).sum(-1)


@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
def test_per_sample_and_batch_shared_agree_in_expectation(name):
    phi, W, a, y = _problem()
    z = phi @ W.t()
    Z = torch.exp(z / T).sum(-1)
    gen = torch.Generator().manual_seed(21)
    z_hat, grads = {}, {}
    for mode in ("per_sample", "batch_shared", "hybrid"):
        zs, gs = torch.zeros(B, dtype=torch.float64), torch.zeros_like(W)
        for _ in range(200):
            ss = sample_classes(a, y, _proposal(name), 2 * C, mode=mode, top_t=2,
                                generator=gen)
            zs += _z_hat(z, ss)
            gs += _sampled_grad(phi, W, a, y, ss)
        z_hat[mode], grads[mode] = zs / 200, gs / 200
        # each mode's normaliser estimate is unbiased: E[Z_hat] = Z
        torch.testing.assert_close(z_hat[mode], Z, rtol=0.04, atol=0)
    assert _cos(grads["per_sample"], grads["batch_shared"]) > 0.998
    assert _cos(grads["per_sample"], grads["hybrid"]) > 0.998


def test_masked_column_is_the_same_as_a_dropped_column():
    g = torch.Generator().manual_seed(9)
    z, a = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g,
                                                                            dtype=torch.float64)
    o = torch.randn(6, generator=g, dtype=torch.float64)     # (n,), broadcast over rows
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4] = False
    tgt = torch.zeros(3, 6, dtype=torch.bool)
    tgt[:, 0] = True
    out = sampled_kd_terms(z, a, o, T, tgt, mask=mask)
    keep = [0, 1, 2, 3, 5]
    ref = sampled_kd_terms(z[1:2, keep], a[1:2, keep], o[keep], T, tgt[1:2, keep])
    torch.testing.assert_close(out["kd"][1:2], ref["kd"])
    torch.testing.assert_close(out["ce"][1:2], ref["ce"])


# ---- a top-K teacher: exact logits at the sampled columns vs the even completion ----

@pytest.mark.parametrize("mode", ["batch_shared", "per_sample", "hybrid"])
def test_exact_teacher_columns_converge_to_kd_with_the_true_teacher(mode):
    """Through the training layer, with the teacher given as its top-5 of 50 classes: with
    the teacher's features and head (exact logits at every sampled column) the mean
    feature gradient converges to full KD against the true teacher; with the even
    completion of the tail it converges to KD against the completed teacher instead."""
    from dkd.config import MethodConfig
    from dkd.engine.softmax_layer import SoftmaxLayer
    from dkd.head.head import ShardedHead
    from dkd.sampling.teacher_batch import TopKTeacher, completion_logit

    g = torch.Generator().manual_seed(2)
    f_t, W_t = torch.randn(B, 8, generator=g), torch.randn(C, 8, generator=g) / 2
    a = f_t @ W_t.T              # a spread-out tail, unlike the even completion
    y = a.argmax(1)
    feats = torch.randn(B, D_, generator=g)
    vals, ids = a.topk(5, 1)
    lse = a.logsumexp(1)

    def grad(teacher, name="dis", step=0):
        head = ShardedHead(C, D_, None, init_std=0.5, seed=3)
        cfg = MethodConfig(name=name, k=4 * C, mode=mode, temperature=1.0, lam=1.0,
                           sampling_topk=5)
        layer = SoftmaxLayer(cfg, C, 0, C, None, total_steps=2)
        x = feats.clone().requires_grad_(True)
        layer(x, head, y, teacher, None, step)["loss"].backward()
        return x.grad

    exact = TopKTeacher(ids, vals, lse, C, feats=f_t, head=W_t)
    even = TopKTeacher(ids, vals, lse, C, rest=completion_logit(vals, lse, C))
    full_true = grad(TopKTeacher.from_dense(a, rank=False), "kd")
    full_even = grad(TopKTeacher.from_dense(even.dense(), rank=False), "kd")
    mean = {name: sum(grad(t, step=s) for s in range(300)) / 300
            for name, t in (("exact", exact), ("even", even))}
    assert _cos(mean["exact"], full_true) > 0.995
    assert _cos(mean["even"], full_even) > 0.995
    # the completion's bias is several times the exact path's sampling noise
    assert 1 - _cos(mean["even"], full_true) > 3 * (1 - _cos(mean["exact"], full_true))
