import math

import pytest
import torch

from dkd.head.shard import (owner_of, shard_bounds, shard_range, shard_sizes,
                            stratified_counts, stratified_log_correction, to_local)


@pytest.mark.parametrize("C,P,expected", [
    (10, 3, [(0, 4), (4, 7), (7, 10)]),
    (7, 4, [(0, 2), (2, 4), (4, 6), (6, 7)]),
    (5, 1, [(0, 5)]),
    (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_shard_ranges_uneven(C, P, expected):
    assert shard_bounds(C, P) == expected
    assert shard_sizes(C, P) == [e - s for s, e in expected]
    assert sum(shard_sizes(C, P)) == C


@pytest.mark.parametrize("C,P", [(10, 3), (7, 4), (5, 1), (4, 4), (101, 7)])
def test_owner_of_matches_ranges(C, P):
    classes = torch.arange(C)
    owner = owner_of(classes, C, P)
    expected = torch.empty(C, dtype=torch.long)
    for s, (start, end) in enumerate(shard_bounds(C, P)):
        expected[start:end] = s
    assert torch.equal(owner, expected)
    # Any shape works.
    assert owner_of(classes.view(1, C), C, P).shape == (1, C)


def test_to_local():
    start, end = shard_range(10, 3, 1)  # [4, 7)
    classes = torch.tensor([[0, 4, 6], [7, 5, 9]])
    local, mask = to_local(classes, start, end)
    assert torch.equal(mask, torch.tensor([[False, True, True], [False, True, False]]))
    assert torch.equal(local[mask], torch.tensor([0, 2, 1]))
    assert int(local.min()) >= 0 and int(local.max()) < end - start


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        shard_range(3, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="classes"):
        owner_of(torch.tensor([10]), 10, 3)
    with pytest.raises(ValueError, match="shard_mass"):
        stratified_counts(torch.zeros(3), 5)
    with pytest.raises(ValueError, match="m must"):
        stratified_counts(torch.ones(3), -1)


def test_stratified_counts_sum_and_determinism():
    mass = torch.tensor([0.5, 0.3, 0.2, 0.0])
    for m in (0, 1, 7, 100):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        n1, n2 = stratified_counts(mass, m, g1), stratified_counts(mass, m, g2)
        assert torch.equal(n1, n2) and n1.dtype == torch.long
        assert int(n1.sum()) == m and int(n1[3]) == 0
        # Each shard gets floor(m R_s) or more; never more than ceil + remainder.
        assert bool((n1 >= torch.floor(mass * m).long()).all())


def test_stratified_counts_unbiased():
    mass = torch.tensor([0.41, 0.33, 0.26])
    gen = torch.Generator().manual_seed(0)
    m, trials = 5, 4000
    total = torch.zeros(3)
    for _ in range(trials):
        total += stratified_counts(mass, m, gen).float()
    assert torch.allclose(total / trials, mass * m, atol=0.03)


def test_stratified_log_correction():
    r = torch.tensor([1e-30, 0.2])
    o = stratified_log_correction(torch.tensor([3, 3]), r, 0.25)
    expected = torch.tensor([math.log(3) + math.log(1e-30) - math.log(0.25),
                             math.log(3 * 0.2 / 0.25)])
    assert torch.allclose(o, expected.to(o.dtype))
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match="n_s"):
        stratified_log_correction(0, r, 0.25)
