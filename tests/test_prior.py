"""Class priors mixed into the shared draws (method.prior): the laws, their counts, the
draws' density, the estimator's consistency through the training layer, and the config."""
import math

import pytest
import torch

from dkd.sampling.prior import class_prior, label_counts


def test_unigram_and_log_uniform_priors():
    counts = torch.tensor([0, 9, 3, 3, 99])
    uni = class_prior("unigram", counts, alpha=0.5)
    ref = (counts.double() + 1).sqrt()
    torch.testing.assert_close(uni, ref / ref.sum())
    lu = class_prior("log_uniform", counts)
    # frequency ranks: class 4 first, 1 second, 2 and 3 (tie: smaller id first), 0 last
    f = torch.tensor([4.0, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    ref = torch.log((f + 2) / (f + 1))
    torch.testing.assert_close(lu, ref / ref.sum())
    assert lu.sum() == pytest.approx(1.0) and (lu > 0).all()
    with pytest.raises(ValueError, match="unknown prior"):
        class_prior("zipf", counts)


def test_label_counts_of_a_text_split_and_of_any_split():
    from dkd.data.synthetic import SyntheticSplit, SyntheticTask
    from dkd.data.text import TextSplit

    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    split = TextSplit(ids, context=2)
    assert torch.equal(label_counts(split, 10), torch.bincount(ids[2:], minlength=10))
    syn = SyntheticSplit(SyntheticTask(7, 8, 2, 0.6, 2, seed=0), 0, 300)
    y = syn.get(torch.arange(300))[1]
    assert torch.equal(label_counts(syn, 7, chunk=64), torch.bincount(y, minlength=7))


def _draw_fraction(prior, mode, lo=30, seeds=400):
    """Fraction of the raw shared draws (repeats included) that land in classes >= lo."""
    from dkd.sampling.draw import draw_sample_set
    from dkd.sampling.proposals import build_proposal
    from dkd.sampling.teacher_batch import TopKTeacher

    g = torch.Generator().manual_seed(1)
    C, B, m = 40, 6, 32
    teacher = TopKTeacher.from_dense(torch.randn(B, C, generator=g) * 2, 8)
    y = torch.randint(0, C, (B,), generator=g)
    hits = 0
    for key in range(seeds):
        s = draw_sample_set(teacher, y, build_proposal("dis", total_steps=4), m, mode=mode,
                            key=key, prior=prior)[0]
        draws = s.classes[-m:] if mode == "batch_shared" else s.classes[0, s.shared_from:]
        hits += int((draws >= lo).sum())
    return hits / (seeds * m)


@pytest.mark.parametrize("mode", ["batch_shared", "hybrid"])
def test_a_prior_moves_the_shared_draws_by_its_weight(mode):
    """Draws of (1 − β) r̄ + β π: with π on classes 30..39 the share of draws there goes
    from f to (1 − β) f + β (12,800 draws; 4.5 standard deviations)."""
    pi = torch.zeros(40, dtype=torch.float64)
    pi[30:] = 0.1
    beta = 0.4
    f0 = _draw_fraction(None, mode)
    f = _draw_fraction((pi, pi.cumsum(0), beta), mode)
    assert f == pytest.approx((1 - beta) * f0 + beta, abs=0.02)


@pytest.mark.parametrize("mode", ["batch_shared", "hybrid"])
@pytest.mark.parametrize("kind", ["unigram", "log_uniform"])
def test_prior_mixture_keeps_the_estimator_consistent(mode, kind):
    """Through the training layer: with a class prior in the proposal, the mean feature
    gradient still converges to full KD's (the corrections name the mixed density)."""
    from dkd.config import MethodConfig
    from dkd.engine.softmax_layer import SoftmaxLayer
    from dkd.head.head import ShardedHead
    from dkd.sampling.teacher_batch import TopKTeacher

    B, C, D = 4, 50, 16
    g = torch.Generator().manual_seed(2)
    a = torch.randn(B, C, generator=g) * 2
    y = a.argmax(1)
    feats = torch.randn(B, D, generator=g)
    counts = torch.randint(0, 100, (C,), generator=g)
    prior = class_prior(kind, counts)

    def grad(name, step=0):
        head = ShardedHead(C, D, None, init_std=0.5, seed=3)
        cfg = MethodConfig(name=name, k=4 * C, mode=mode, temperature=1.0, lam=1.0,
                           **({"prior": kind, "prior_weight": 0.3} if name != "kd" else {}))
        layer = SoftmaxLayer(cfg, C, 0, C, None, total_steps=2,
                             prior=prior if name != "kd" else None)
        x = feats.clone().requires_grad_(True)
        layer(x, head, y, TopKTeacher.from_dense(a, rank=False), None, step)["loss"].backward()
        return x.grad

    full = grad("kd")
    mean = sum(grad("dis", s) for s in range(300)) / 300
    cos = float((mean * full).sum() / (mean.norm() * full.norm()))
    assert cos > 0.995


def test_prior_is_refused_where_it_does_not_apply():
    from dkd.config import MethodConfig
    from dkd.sampling.draw import draw_sample_set
    from dkd.sampling.proposals import build_proposal
    from dkd.sampling.teacher_batch import TopKTeacher

    with pytest.raises(ValueError, match="method.prior='unigram' .* batch_shared or hybrid"):
        MethodConfig(name="dis", k=10, mode="per_sample", prior="unigram")
    with pytest.raises(ValueError, match="method.prior"):
        MethodConfig(name="kd", prior="log_uniform")
    t = TopKTeacher.from_dense(torch.randn(2, 20), 5)
    pi = torch.full((20,), 0.05, dtype=torch.float64)
    with pytest.raises(ValueError, match="shared draws"):
        draw_sample_set(t, torch.tensor([1, 2]), build_proposal("uniform"), 4,
                        mode="per_sample", prior=(pi, pi.cumsum(0), 0.2))


def test_a_run_with_a_unigram_prior(tmp_path, teacher_dir):
    """dkd train with method.prior: the prior from the training labels, a finished run."""
    from conftest import summary, train_run

    train_run(tmp_path, "p", "method.name=dis", "method.k=8", "method.mode=batch_shared",
              "method.prior=unigram", "method.prior_weight=0.3",
              f"teacher.checkpoint={teacher_dir}")
    s = summary(tmp_path / "p")
    assert s["method"] == "dis" and 0 <= s["top1"] <= 100


def test_the_student_prior_follows_the_students_mass():
    from dkd.sampling.prior import StudentPrior

    sp = StudentPrior(10, decay=0.5)
    classes = torch.tensor([3, 7, 3, 1])
    valid = torch.tensor([True, True, False, True])      # the repeat of 3 is masked
    sp.observe(classes, torch.tensor([0.6, 0.2, 0.9, 0.0], dtype=torch.float64), valid)
    want = torch.full((10,), 0.1, dtype=torch.float64)
    want[3], want[7], want[1] = 0.35, 0.15, 0.05
    torch.testing.assert_close(sp.s, want)
    pi, cum, beta = sp.law(0.3, "cpu")
    torch.testing.assert_close(pi, 0.9 * want / want.sum() + 0.01)
    assert beta == 0.3 and cum[-1] == pytest.approx(1.0) and (pi >= 0.01).all()
    other = StudentPrior(10, decay=0.5)
    other.load_state_dict(sp.state_dict())
    assert torch.equal(other.s, sp.s)
    with pytest.raises(ValueError, match="11 classes"):
        other.load_state_dict(StudentPrior(11, 0.5).state_dict())


@pytest.mark.parametrize("mode", ["batch_shared", "hybrid"])
def test_a_student_prior_keeps_the_estimator_consistent(mode):
    """The student prior changes every step (it learns from the step's columns); each
    step's corrections name the law it drew from, so the mean gradient still converges."""
    from dkd.config import MethodConfig
    from dkd.engine.softmax_layer import SoftmaxLayer
    from dkd.head.head import ShardedHead
    from dkd.sampling.teacher_batch import TopKTeacher

    B, C, D = 4, 50, 16
    g = torch.Generator().manual_seed(2)
    a = torch.randn(B, C, generator=g) * 2
    y = a.argmax(1)
    feats = torch.randn(B, D, generator=g)
    head = ShardedHead(C, D, None, init_std=0.5, seed=3)
    teacher = TopKTeacher.from_dense(a, rank=False)

    def grad(layer, step):
        x = feats.clone().requires_grad_(True)
        layer(x, head, y, teacher, None, step)["loss"].backward()
        return x.grad

    full = grad(SoftmaxLayer(MethodConfig(name="kd", temperature=1.0, lam=1.0), C, 0, C,
                             None, total_steps=2), 0)
    cfg = MethodConfig(name="dis", k=4 * C, mode=mode, temperature=1.0, lam=1.0,
                       prior="student", prior_weight=0.4, prior_decay=0.5)
    layer = SoftmaxLayer(cfg, C, 0, C, None, total_steps=2)
    s0 = layer.student_prior.s.clone()
    mean = sum(grad(layer, s) for s in range(300)) / 300
    # it learned the student's softmax: s tracks q̄ at the observed classes
    q = torch.softmax(feats @ head.weight.t(), 1).mean(0).double()
    assert not torch.equal(layer.student_prior.s, s0)
    assert torch.corrcoef(torch.stack([layer.student_prior.s, q]))[0, 1] > 0.9
    cos = float((mean * full).sum() / (mean.norm() * full.norm()))
    assert cos > 0.995
