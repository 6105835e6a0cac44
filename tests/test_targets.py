"""Teacher target distributions against hand-computed values."""
import math

import pytest
import torch

from dkd.losses.targets import (kd_pt_sim_target, kd_pt_target, kd_sim_target, kd_target,
                                kd_topk_target, label_smoothing_target)

D = torch.float64




def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_target_uses_temperature():
    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    torch.testing.assert_close(kd_target(a, T=2.0)[0], torch.tensor(_softmax([0.5, 1, 1.5]),
                                                                     dtype=D))


def test_label_smoothing_by_hand():
    t = label_smoothing_target(torch.tensor([1]), num_classes=4, eps=0.2)
    torch.testing.assert_close(t[0].double(), torch.tensor([0.05, 0.85, 0.05, 0.05], dtype=D))


def test_kd_pt_keeps_true_class_prob_and_flattens_the_rest():
    a = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]], dtype=D)   # p = [1, 3, 1, 1] / 6
    t = kd_pt_target(a, torch.tensor([0]), T=1.0)
    torch.testing.assert_close(t[0], torch.tensor([1 / 6, 5 / 18, 5 / 18, 5 / 18], dtype=D))
    t = kd_pt_target(a, torch.tensor([1]), T=1.0)
    torch.testing.assert_close(t[0], torch.tensor([1 / 6, 1 / 2, 1 / 6, 1 / 6], dtype=D))


def test_kd_topk_keeps_top_probs_and_sums_to_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 10, generator=g, dtype=D) * 2
    p = kd_target(a, 2.0)
    t = kd_topk_target(a, k=3, T=2.0)
    torch.testing.assert_close(t.sum(-1), torch.ones(3, dtype=D))
    top = p.topk(3, -1).indices
    torch.testing.assert_close(t.gather(1, top), p.gather(1, top))
    rest = torch.ones_like(t, dtype=torch.bool).scatter(1, top, False)
    expected = (1 - p.gather(1, top).sum(-1)) / 7
    torch.testing.assert_close(t[rest].view(3, 7), expected[:, None].expand(3, 7))
    # by hand: p = [.5, .25, .125, .125], k = 1 -> [.5, 1/6, 1/6, 1/6]
    a = torch.tensor([[math.log(4), math.log(2), 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(kd_topk_target(a, 1)[0],
                               torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6], dtype=D))


def test_kd_sim_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=D)   # cos to row 0: 1, 0, .707
    s01 = [1.0, 0.5, (1 + 1 / math.sqrt(2)) / 2]
    t = kd_sim_target(w, torch.tensor([0]), tau=0.5, power=1.0)
    torch.testing.assert_close(t[0], torch.tensor(_softmax([v / 0.5 for v in s01]), dtype=D))
    t = kd_sim_target(w, torch.tensor([0]), tau=0.25, power=2.0)
    torch.testing.assert_close(t[0], torch.tensor(_softmax([v * v / 0.25 for v in s01]),
                                                  dtype=D))
    assert int(t.argmax()) == 0


def test_kd_pt_sim_is_convex_combination():
    g = torch.Generator().manual_seed(1)
    a, w = torch.randn(2, 6, generator=g, dtype=D), torch.randn(6, 4, generator=g, dtype=D)
    y = torch.tensor([2, 5])
    t = kd_pt_sim_target(a, w, y, alpha=0.3, T=2.0, tau=0.2, power=1.5)
    ref = 0.3 * kd_pt_target(a, y, 2.0) + 0.7 * kd_sim_target(w, y, 0.2, 1.5)
    torch.testing.assert_close(t, ref)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, dtype=D))


def test_bad_arguments_raise():
    a = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k must"):
        kd_topk_target(a, k=5)
    with pytest.raises(ValueError, match="k must"):
        kd_topk_target(a, k=0)
    with pytest.raises(ValueError, match="T"):
        kd_target(a, T=0.0)
    with pytest.raises(ValueError, match="eps"):
        label_smoothing_target(torch.tensor([0]), 5, eps=1.5)
    with pytest.raises(ValueError, match="alpha"):
        kd_pt_sim_target(a, torch.randn(5, 3), torch.tensor([0, 1]), alpha=2.0)
    with pytest.raises(ValueError, match="tau"):
        kd_sim_target(torch.randn(5, 3), torch.tensor([0]), tau=0.0)
