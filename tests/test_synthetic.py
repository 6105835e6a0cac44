import torch

from dkd.data import global_batch_indices, local_slice
from dkd.data.synthetic import SyntheticSplit, SyntheticTask


def test_deterministic_and_order_independent():
    a = SyntheticTask(50, 16, 5, 0.6, 2, seed=3)
    b = SyntheticTask(50, 16, 5, 0.6, 2, seed=3)
    idx = torch.tensor([5, 9000, 1, 4097])
    xa, ya = a.sample(idx)
    xb, yb = b.sample(idx.flip(0))
    assert torch.equal(xa, xb.flip(0)) and torch.equal(ya, yb.flip(0))
    xc, _ = SyntheticTask(50, 16, 5, 0.6, 2, seed=4).sample(idx)
    assert not torch.equal(xa, xc)


def test_similarity_knob_sets_cosine_to_super_class():
    for tau in (0.0, 0.5, 0.9):
        t = SyntheticTask(40, 16, 4, tau, 1, seed=0)
        basis_cos = []
        for c in range(40):
            same = t.class_vectors[t.super_of == t.super_of[c]]
            basis_cos.append((same @ t.class_vectors[c]).mean())
        # pairwise cosine within a super-class is tau^2 on average (plus noise)
        within = torch.stack(basis_cos).mean().item()
        assert abs(torch.linalg.norm(t.class_vectors, dim=1).mean().item() - 1) < 1e-5
        if tau == 0.9:
            assert within > 0.75
        if tau == 0.0:
            assert within < 0.2


def test_difficulty_zero_is_linear_and_difficulty_makes_it_harder():
    idx = torch.arange(4000)
    accs = []
    for m in (0, 2):
        t = SyntheticTask(30, 16, 3, 0.5, m, seed=1)
        x, y = t.sample(idx)
        accs.append(((x @ t.class_vectors.T).argmax(1) == y).float().mean().item())
    assert accs[0] == 1.0 and accs[1] < 0.9


def test_split_cache_matches_generation():
    t = SyntheticTask(10, 8, 2, 0.5, 1, seed=0)
    cached = SyntheticSplit(t, 100, 50)
    lazy = SyntheticSplit(t, 100, 50, cache_limit=0)
    idx = torch.tensor([0, 7, 49])
    assert torch.equal(cached.get(idx)[0], lazy.get(idx)[0])
    assert torch.equal(cached.get(idx)[1], lazy.get(idx)[1])


def test_batches_are_a_function_of_the_step_and_split_evenly():
    a = global_batch_indices(37, 1000, 64, seed=1)
    assert torch.equal(a, global_batch_indices(37, 1000, 64, seed=1))
    epoch = torch.cat([global_batch_indices(s, 1000, 64, 1) for s in range(15)])
    assert epoch.unique().numel() == 960  # one epoch visits distinct samples
    sizes = [len(range(100)[local_slice(10, 3, r)]) for r in range(3)]
    assert sizes == [4, 3, 3]
