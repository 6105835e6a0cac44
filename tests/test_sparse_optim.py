import pytest
import torch

from dkd.head.sparse_optim import SparseRowOptimizer

C, D = 12, 5
ROWS = torch.tensor([7, 2, 9])

CASES = [
    ("sgd", dict(lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    ("sgd", dict(lr=0.1, momentum=0.0), lambda p: torch.optim.SGD(p, lr=0.1)),
    ("adam", dict(lr=0.01, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=0.01,
                                                                         weight_decay=0.1)),
    ("adamw", dict(lr=0.01, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.01,
                                                                           weight_decay=0.1)),
    ("rmsprop", dict(lr=0.01, momentum=0.0), lambda p: torch.optim.RMSprop(p, lr=0.01)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, weight_decay=0.1),
     lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, weight_decay=0.1)),
]


def _grads(steps, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=gen, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("kind,kw,dense", CASES)
def test_matches_dense_on_touched_rows(kind, kw, dense):
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight = w0.clone()
    opt = SparseRowOptimizer(weight, kind, **kw)
    ref = w0[ROWS].clone().requires_grad_()
    ref_opt = dense([ref])
    for g in _grads(4, ROWS.numel()):
        opt.step(ROWS, g)
        ref.grad = g.clone()
        ref_opt.step()
    torch.testing.assert_close(weight[ROWS], ref.detach())
    untouched = torch.ones(C, dtype=torch.bool)
    untouched[ROWS] = False
    assert torch.equal(weight[untouched], w0[untouched])
    for name, st in opt.state.items():
        zero = torch.zeros_like(st[untouched])
        assert torch.equal(st[untouched], zero), name
    if kind == "rmsprop":
        torch.testing.assert_close(opt.state["square_avg"][ROWS],
                                   ref_opt.state[ref]["square_avg"])
    elif kind != "sgd":
        torch.testing.assert_close(opt.state["exp_avg"][ROWS], ref_opt.state[ref]["exp_avg"])
        torch.testing.assert_close(opt.state["exp_avg_sq"][ROWS],
                                   ref_opt.state[ref]["exp_avg_sq"])


@pytest.mark.parametrize("kind", ["sgd", "adamw", "rmsprop"])
def test_duplicates_are_summed(kind):
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = w0.clone(), w0.clone()
    opt_a, opt_b = SparseRowOptimizer(a, kind, lr=0.1), SparseRowOptimizer(b, kind, lr=0.1)
    dup_rows = torch.tensor([4, 1, 4, 4, 6])
    for g in _grads(3, dup_rows.numel(), seed=5):
        opt_a.step(dup_rows, g)
        summed = torch.zeros(C, D, dtype=torch.float64).index_add_(0, dup_rows, g)
        uniq = torch.tensor([1, 4, 6])
        opt_b.step(uniq, summed[uniq], unique=True)
    torch.testing.assert_close(a, b)
    for name in opt_a.state:
        torch.testing.assert_close(opt_a.state[name], opt_b.state[name])


def test_lazy_per_row_step_count():
    weight = torch.zeros(C, D, dtype=torch.float64)
    opt = SparseRowOptimizer(weight, "adam", lr=0.1)
    g = torch.ones(1, D, dtype=torch.float64)
    for _ in range(5):
        opt.step(torch.tensor([0]), g)
    opt.step(torch.tensor([3]), g)     # first touch of row 3, late in training
    assert opt.state["step"][0] == 5 and opt.state["step"][3] == 1
    # A fresh row gets Adam's first-step update, -lr * sign(g).
    torch.testing.assert_close(weight[3], torch.full((D,), -0.1, dtype=torch.float64))


def test_dense_step_equals_all_rows():
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = w0.clone(), w0.clone()
    opt_a, opt_b = SparseRowOptimizer(a, "adamw", lr=0.1), SparseRowOptimizer(b, "adamw", lr=0.1)
    for g in _grads(3, C):
        opt_a.step(None, g)
        opt_b.step(torch.arange(C), g, unique=True)
    torch.testing.assert_close(a, b)


def test_state_roundtrip_and_rows_state():
    weight = torch.randn(C, D)
    opt = SparseRowOptimizer(weight, "adam", lr=0.1)
    opt.step(ROWS, torch.randn(3, D))
    other = SparseRowOptimizer(torch.zeros(C, D), "adam", lr=0.5)
    other.load_state_dict(opt.state_dict())
    assert other.lr == 0.1
    for name in opt.state:
        assert torch.equal(other.state[name], opt.state[name])
    part = opt.rows_state(2, 8)
    assert part["exp_avg"].shape == (6, D) and part["step"].shape == (6,)
    fresh = SparseRowOptimizer(torch.zeros(C, D), "adam")
    fresh.load_rows_state(2, part)
    assert torch.equal(fresh.state["exp_avg_sq"][2:8], opt.state["exp_avg_sq"][2:8])
    with pytest.raises(ValueError, match="state must have keys"):
        SparseRowOptimizer(torch.zeros(C, D), "sgd").load_rows_state(0, part)


def test_bad_arguments():
    w = torch.zeros(C, D)
    with pytest.raises(ValueError, match="kind"):
        SparseRowOptimizer(w, "lamb")
    with pytest.raises(ValueError, match="momentum"):
        SparseRowOptimizer(w, "sgd", momentum=1.0)
    with pytest.raises(ValueError, match="weight"):
        SparseRowOptimizer(torch.zeros(C, D, requires_grad=True))
    opt = SparseRowOptimizer(w, "sgd")
    with pytest.raises(ValueError, match="grad"):
        opt.step(ROWS, torch.zeros(2, D))
    with pytest.raises(ValueError, match="rows"):
        opt.step(ROWS.float(), torch.zeros(3, D))


@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_chunked_step_equals_one_chunk(kind):
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a, b = w0.clone(), w0.clone()
    opt_a = SparseRowOptimizer(a, kind, lr=0.1, chunk_rows=2)
    opt_b = SparseRowOptimizer(b, kind, lr=0.1, chunk_rows=10_000)
    rows = torch.tensor([0, 3, 4, 8, 11])
    for g in _grads(3, rows.numel(), seed=6):
        opt_a.step(rows, g, unique=True)
        opt_b.step(rows, g, unique=True)
        opt_a.step(torch.tensor([3, 3, 5]), g[:3])  # duplicates: never split
        opt_b.step(torch.tensor([3, 3, 5]), g[:3])
    assert torch.equal(a, b)
    for name in opt_a.state:
        assert torch.equal(opt_a.state[name], opt_b.state[name])


def test_more_duplicate_rows_than_the_shard_has():
    """Gradient accumulation hands over rows of several micro-batches: u > C_local."""
    w = torch.randn(4, 3)
    dense_w = w.clone().requires_grad_(True)
    opt = SparseRowOptimizer(w, "adam", lr=0.1)
    ref = torch.optim.Adam([dense_w], lr=0.1)
    rows = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1])
    g = torch.randn(9, 3)
    opt.step(rows, g)
    dense_w.grad = torch.zeros(4, 3).index_add_(0, rows, g)
    ref.step()
    torch.testing.assert_close(w, dense_w.detach())


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_catchup_scales_a_row_step_by_its_gap(kind):
    """With catch-up, a row last updated g steps ago moves min(g, cap) times as far as the
    plain lazy step of the same state; rows updated every step are unchanged by it."""
    w0 = torch.randn(C, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a, b = w0.clone(), w0.clone()
    cu = SparseRowOptimizer(a, kind, lr=0.1, weight_decay=0.01, catchup=3)
    plain = SparseRowOptimizer(b, kind, lr=0.1, weight_decay=0.01)
    g = _grads(6, 2, seed=7)
    schedule = {1: [0, 5], 2: [0], 3: [0], 4: [0], 5: [0, 5], 6: [0, 8]}
    for step, rows in schedule.items():
        rows_t, grad = torch.tensor(rows), g[step - 1][:len(rows)]
        before = b.clone()
        cu.step(rows_t, grad, unique=True, clock=step)
        gap = {0: 1, 5: 1 if step == 1 else 3, 8: 3}   # row 5: gap 4 capped at 3; row 8: first
        lrs = [0.1 * gap[r] for r in rows]
        for r, lr in zip(rows, lrs):    # the plain optimizer, row by row at the gap's lr
            plain.step(torch.tensor([r]), grad[rows.index(r)].unsqueeze(0), lr=lr, unique=True)
        torch.testing.assert_close(a, b)
        assert not torch.equal(b, before)
    assert cu.state["last"].tolist() == [6, 0, 0, 0, 0, 5, 0, 0, 6, 0, 0, 0]


def test_catchup_needs_a_clock_and_an_adaptive_kind():
    with pytest.raises(ValueError, match="adam / adamw only"):
        SparseRowOptimizer(torch.zeros(C, D), "sgd", catchup=4)
    opt = SparseRowOptimizer(torch.zeros(C, D), "adam", catchup=4)
    with pytest.raises(ValueError, match="clock"):
        opt.step(ROWS, torch.ones(3, D))
    assert "last" in opt.rows_state(0, C) and opt.hparams()["catchup"] == 4
