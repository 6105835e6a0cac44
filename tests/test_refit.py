"""Adaptive DIS (method.dis_refit_every): the probe's selection, the fit it drives, its
state across checkpoints, the estimator's consistency under a refitted proposal, and the
config."""
import pytest
import torch

from dkd.sampling.proposals import build_proposal, laplace_mixture_bins
from dkd.sampling.refit import W_MIN, probe_ranks, refit


def test_probe_selects_the_largest_disagreements_without_the_target():
    g = torch.Generator().manual_seed(0)
    R, C, k, T = 5, 40, 6, 2.0
    z, a = torch.randn(R, C, generator=g), torch.randn(R, C, generator=g) * 3
    y = torch.randint(0, C, (R,), generator=g)
    ranks = probe_ranks(z, a, y, k, T, 0, None)
    score = (torch.softmax(a / T, 1) - torch.softmax(z / T, 1)).abs()
    score[torch.arange(R), y] = -1.0
    classes = score.topk(k, 1).indices
    order = torch.sort(a, dim=1, descending=True, stable=True).indices
    want = (order.unsqueeze(2) == classes.unsqueeze(1)).float().argmax(1) + 1
    assert torch.equal(ranks.sort(1).values, want.sort(1).values)
    target_rank = (order == y.unsqueeze(1)).float().argmax(1) + 1
    assert not (ranks == target_rank.unsqueeze(1)).any()
    with pytest.raises(ValueError, match="probe's k"):
        probe_ranks(z, a, y, C, T, 0, None)


def test_refit_recovers_the_mixture_the_ranks_came_from_and_replaces_the_schedule():
    C, w, b1, b2 = 2000, 0.7, 2.0, 30.0
    masses = laplace_mixture_bins(w, b1, b2, C)
    ranks = torch.multinomial(masses, 200_000, replacement=True,
                              generator=torch.Generator().manual_seed(1)) + 1
    prop = build_proposal("dis", total_steps=100)
    prop.advance(7)
    fw, fb1, fb2 = refit(prop, ranks, C, decay=0.5)
    assert fw == pytest.approx(w, abs=0.03)
    assert fb1 == pytest.approx(b1, rel=0.15) and fb2 == pytest.approx(b2, rel=0.25)
    # The schedule no longer moves b2; the proposal's law is the fit's.
    prop.advance(50)
    assert prop.b2() == fb2 and prop.refit_at == 7
    torch.testing.assert_close(prop.rank_probs(C), laplace_mixture_bins(fw, fb1, fb2, C))
    # A checkpoint round trip restores the same law and histogram.
    other = build_proposal("dis", total_steps=100)
    other.load_state_dict(prop.state_dict())
    torch.testing.assert_close(other.rank_probs(C), prop.rank_probs(C))
    assert torch.equal(other.probe_counts, prop.probe_counts) and other.refit_at == 7
    # A schedule-only state dict has the step alone (checkpoints of older runs load).
    assert set(build_proposal("dis").state_dict()) == {"name", "step"}


def test_refit_decays_older_probes_and_keeps_both_components():
    C = 1000
    prop = build_proposal("dis", total_steps=10)
    head = torch.ones(400, dtype=torch.long)                   # every rank = 1: all head
    refit(prop, head, C, decay=0.5)
    first = prop.probe_counts.clone()
    assert prop.w == 1.0 - W_MIN          # clipped: the right component never vanishes
    tail = torch.full((400,), C, dtype=torch.long)
    refit(prop, tail, C, decay=0.5)
    torch.testing.assert_close(prop.probe_counts[0], 0.5 * first[0])
    assert prop.probe_counts[-1] == 400 and W_MIN <= prop.w <= 1 - W_MIN


@pytest.mark.parametrize("mode", ["per_sample", "batch_shared"])
def test_a_refitting_layer_stays_consistent_with_full_kd(mode):
    """Through the training layer with refits every 2 steps: the mean feature gradient
    over many steps still converges to full KD's (every law the refit sets is a valid
    proposal, and the corrections follow it)."""
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
                       dis_refit_every=2, dis_refit_rows=3, dis_refit_k=5)
    layer = SoftmaxLayer(cfg, C, 0, C, None, total_steps=300)
    mean = 0
    fits = set()
    for s in range(300):
        mean = mean + grad(layer, s) / 300
        layer.proposal.advance()
        fits.add((layer.proposal.w, layer.proposal.b1, layer.proposal.b2()))
    assert layer.proposal.refit_at == 299 and len(fits) > 1
    cos = float((mean * full).sum() / (mean.norm() * full.norm()))
    assert cos > 0.995


def test_refit_is_refused_for_other_methods():
    from dkd.config import MethodConfig

    with pytest.raises(ValueError, match="dis_refit_every .* 'dis'"):
        MethodConfig(name="uniform", k=10, dis_refit_every=5)


def test_ranks_of_matches_the_full_ranking():
    from dkd.sampling.proposals import teacher_ranking
    from dkd.sampling.refit import ranks_of

    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 300, generator=g)
    classes = torch.stack([torch.randperm(300, generator=g)[:17] for _ in range(6)])
    want = teacher_ranking(a)[1].gather(1, classes) + 1
    assert torch.equal(ranks_of(a, classes), want)
    tied = torch.zeros(2, 10)                       # all tied: every class has rank 1
    assert torch.equal(ranks_of(tied, torch.tensor([[0, 9], [3, 4]])), torch.ones(2, 2).long())
