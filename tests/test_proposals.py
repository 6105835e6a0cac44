"""Proposals over teacher ranks and the sampler's sets and corrections."""
import math

import pytest
import torch

from dkd.sampling.proposals import (LaplaceMixtureProposal, TeacherProposal, UniformProposal,
                                    build_proposal, teacher_ranking)
from oracle_sampler import sample_classes




def _teacher(B=6, C=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 3, torch.randint(0, C, (B,), generator=g)


# ---- proposals ----

def test_uniform_sums_to_one():
    r = UniformProposal().rank_probs(37)
    assert r.shape == (37,) and torch.allclose(r, torch.full((37,), 1 / 37, dtype=r.dtype))


@pytest.mark.parametrize("C", [100, 1000, 10000])
def test_dis_sums_to_one_and_left_tip_is_twice_right_tip(C):
    r = LaplaceMixtureProposal().rank_probs(C)
    assert r.shape == (C,) and abs(float(r.sum()) - 1) < 1e-9
    assert 1.5 <= float(r[0] / r[-1]) <= 2.5
    low = int(r.argmin())     # a valley: falls from the head, rises to the right tip
    assert torch.all(r[: low + 1].diff() <= 0) and torch.all(r[low:].diff() >= 0)


def test_dis_schedule_is_monotone_and_right_component_flattens():
    p = LaplaceMixtureProposal(total_steps=50)
    b2 = [p.b2(s) for s in range(0, 80, 5)]
    assert b2[0] == p.b2_start and b2[-1] == p.b2_end
    assert all(x <= y for x, y in zip(b2, b2[1:]))
    C = 1000
    start = p.rank_probs(C)
    p.advance(50)
    end = p.rank_probs(C)
    # right tip over the middle: steep at the start, near flat at the end
    assert float(start[-1] / start[C // 2]) > 100
    assert float(end[-1] / end[C // 2]) < 2
    # the left component does not move
    assert abs(float(start[0] - end[0])) / float(start[0]) < 0.05


def test_teacher_proposal_follows_teacher_softmax():
    a, _ = _teacher()
    r = TeacherProposal(temperature=2.0).class_probs(a)
    torch.testing.assert_close(r, torch.softmax(a / 2.0, -1))
    r = TeacherProposal(temperature=2.0, eps=0.5).class_probs(a)
    assert float(r.min()) >= 0.5 / a.shape[1] - 1e-7


def test_rank_based_class_probs_follow_teacher_ranking():
    a, _ = _teacher(B=3, C=20)
    order, ranks = teacher_ranking(a)
    assert torch.equal(order.gather(1, ranks), torch.arange(20).expand(3, 20))
    assert torch.equal(a.gather(1, order), a.sort(-1, descending=True).values)
    p = LaplaceMixtureProposal()
    r = p.class_probs(a)
    torch.testing.assert_close(r.gather(1, order), p.rank_probs(20).float().expand(3, 20))


def test_state_dict_round_trip():
    p = build_proposal("dis", total_steps=10)
    p.advance(3)
    p.advance()
    q = build_proposal("laplace", total_steps=10)
    q.load_state_dict(p.state_dict())
    assert q.step == 4 and torch.equal(q.rank_probs(50), p.rank_probs(50))
    with pytest.raises(ValueError, match="proposal"):
        UniformProposal().load_state_dict(p.state_dict())


def test_build_proposal_names_and_errors():
    assert isinstance(build_proposal("uniform"), UniformProposal)
    assert isinstance(build_proposal("FTIS", temperature=4.0), TeacherProposal)
    assert isinstance(build_proposal("teacher"), TeacherProposal)
    assert isinstance(build_proposal("dis"), LaplaceMixtureProposal)
    with pytest.raises(ValueError, match="uniform"):
        build_proposal("gaussian")
    with pytest.raises(ValueError, match="b1"):
        build_proposal("dis", b1=0.0)
    with pytest.raises(ValueError, match="w must"):
        build_proposal("dis", w=1.5)
    with pytest.raises(ValueError, match="temperature"):
        build_proposal("teacher", temperature=0.0)


# ---- sampler ----

@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
@pytest.mark.parametrize("mode", ["per_sample", "batch_shared"])
def test_sampling_is_reproducible_from_generator(name, mode):
    a, y = _teacher()
    sets = [sample_classes(a, y, build_proposal(name), 25, mode=mode, top_t=2,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    sets.append(sample_classes(a, y, build_proposal(name), 25, mode=mode, top_t=2,
                               generator=torch.Generator().manual_seed(7),
                               ranking=teacher_ranking(a)))
    for other in sets[1:]:
        assert torch.equal(sets[0].classes, other.classes)
        assert torch.equal(sets[0].log_correction, other.log_correction)


def _non_target_ranking(a, y):
    """Per row, the teacher's classes in rank order with the target removed: (B, C - 1)."""
    order, _ = teacher_ranking(a)
    return torch.stack([row[row != t] for row, t in zip(order, y)])


@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
def test_per_sample_layout(name):
    a, y = _teacher()
    B, C = a.shape
    m, t = 30, 3
    y[0] = int(a[0].argmax())          # a target that is also the teacher's top class
    ss = sample_classes(a, y, build_proposal(name), m, top_t=t,
                        generator=torch.Generator().manual_seed(0))
    rest = _non_target_ranking(a, y)
    assert ss.mask is None
    assert ss.classes.shape == ss.log_correction.shape == (B, 1 + t + m)
    assert torch.equal(ss.classes[:, 0], y)
    assert torch.equal(ss.classes[:, 1:1 + t], rest[:, :t])
    assert torch.all(ss.log_correction[:, :1 + t] == 0)
    assert torch.all(ss.deterministic[:, :1 + t]) and not ss.deterministic[:, 1 + t:].any()
    # no draw is in D_b
    draws = ss.classes[:, 1 + t:]
    assert not (draws.unsqueeze(-1) == ss.classes[:, :1 + t].unsqueeze(1)).any()
    assert torch.all(ss.target_mask(y).sum(1) == 1)


def test_per_sample_rank_draws_are_shared_by_the_batch():
    a, y = _teacher()
    ss = sample_classes(a, y, UniformProposal(), 50, generator=torch.Generator().manual_seed(1))
    rest = _non_target_ranking(a, y)
    draw_ranks = torch.stack([(rest[b].unsqueeze(0) == ss.classes[b, 1:].unsqueeze(1))
                              .float().argmax(1) for b in range(len(y))])
    assert torch.all(draw_ranks == draw_ranks[0])


def test_expected_and_paper_corrections_uniform_per_sample():
    a, y = _teacher(C=40)
    m, C, t = 50, 40, 2
    ex = sample_classes(a, y, UniformProposal(), m, top_t=t,
                        generator=torch.Generator().manual_seed(2))
    pa = sample_classes(a, y, UniformProposal(), m, top_t=t, correction="paper",
                        generator=torch.Generator().manual_seed(2))
    # restricted to C \ D_b, |D_b| = 1 + t: r = 1 / (C - 1 - t); expected count m r
    torch.testing.assert_close(ex.log_correction[:, 1 + t:],
                               torch.full((len(y), m), math.log(m / (C - 1 - t))))
    torch.testing.assert_close(pa.log_correction[:, 1 + t:],
                               torch.full((len(y), m), -math.log(C - 1 - t)))
    assert torch.equal(ex.classes, pa.classes)


def test_batch_shared_set_and_corrections():
    a, y = _teacher(B=8, C=60)
    m, t = 40, 2
    ss = sample_classes(a, y, UniformProposal(), m, mode="batch_shared", top_t=t,
                        generator=torch.Generator().manual_seed(3))
    det = set(y.tolist()) | set(_non_target_ranking(a, y)[:, :t].reshape(-1).tolist())
    assert ss.classes.dim() == 1 and len(set(ss.classes.tolist())) == ss.num_columns
    assert set(ss.classes[ss.deterministic].tolist()) == det
    assert torch.all(ss.log_correction[ss.deterministic] == 0)
    drawn = ss.classes[~ss.deterministic]
    assert not set(drawn.tolist()) & det
    # o = log(m / (C - |D|)) - log(count): the exp(-o) of all draws add up to C - |D|
    total = torch.exp(-ss.log_correction[~ss.deterministic]).sum()
    assert abs(float(total) - (60 - len(det))) < 1e-3
    assert torch.all(ss.target_mask(y).sum(1) == 1)


def test_sampler_bad_arguments_raise():
    a, y = _teacher(C=10)
    p = UniformProposal()
    with pytest.raises(ValueError, match="m "):
        sample_classes(a, y, p, 0)
    with pytest.raises(ValueError, match="top_t"):
        sample_classes(a, y, p, 5, top_t=9)
    with pytest.raises(ValueError, match="mode"):
        sample_classes(a, y, p, 5, mode="shared")
    with pytest.raises(ValueError, match="correction"):
        sample_classes(a, y, p, 5, correction="exact")
    with pytest.raises(ValueError, match="y must"):
        sample_classes(a, y[:2], p, 5)
