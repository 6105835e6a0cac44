"""The native (C) head kernels against their torch paths: same results to float rounding."""
import pytest
import torch

from dkd.head import native
from dkd.head.kernels import hybrid_logits
from dkd.head.sparse_optim import SparseRowOptimizer
from dkd.losses.sampled import sampled_kd_loss

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def test_status_and_disabled():
    assert native.status() == "native"
    with native.disabled():
        assert not native.available() and native.status() == "torch (disabled)"
    assert native.available()


@pytest.mark.parametrize("kind,wd,catchup", [("adam", 0.0, 0), ("adam", 0.01, 0),
                                             ("adamw", 0.05, 0), ("adam", 0.0, 5),
                                             ("adamw", 0.05, 3)])
def test_row_adam_matches_torch_path(kind, wd, catchup):
    """Sparse steps with repeated rows, then a dense step: weights, moments, per-row step
    counts (and catch-up clocks) agree with the torch path; the caller's gradient is left
    untouched."""
    gen = torch.Generator().manual_seed(0)
    C, d = 40, 24
    w_nat = torch.randn(C, d, generator=gen)
    w_ref = w_nat.clone()
    nat = SparseRowOptimizer(w_nat, kind, lr=1e-2, weight_decay=wd, catchup=catchup)
    ref = SparseRowOptimizer(w_ref, kind, lr=1e-2, weight_decay=wd, catchup=catchup)
    for step in range(12):
        rows = torch.randint(0, C, (30,), generator=gen)
        grad = torch.randn(30, d, generator=gen)
        kept = grad.clone()
        nat.step(rows, grad, clock=step + 1)
        with native.disabled():
            ref.step(rows, grad, clock=step + 1)
        assert torch.equal(grad, kept)
        assert nat.last_impl == "native" and ref.last_impl == "torch"
    dense = torch.randn(C, d, generator=gen)
    nat.step(None, dense, clock=13)
    with native.disabled():
        ref.step(None, dense, clock=13)
    if catchup:
        assert torch.equal(nat.state["last"], ref.state["last"])
        assert (nat.state["last"] == 13).all()
    torch.testing.assert_close(w_nat, w_ref, rtol=1e-5, atol=1e-6)
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(nat.state[name], ref.state[name], rtol=1e-5, atol=1e-7)
    assert torch.equal(nat.state["step"], ref.state["step"])


def test_row_adam_factored_rows():
    """Rows given as coef·x[src] (the hybrid's per-sample rows) step like the same
    gradients materialised, on both paths."""
    gen = torch.Generator().manual_seed(5)
    C, d = 12, 6
    x = torch.randn(4, d, generator=gen)
    rows_f, coef, src = torch.tensor([3, 7, 3, 0]), torch.randn(4, generator=gen), torch.arange(4)
    rows_d, g_d = torch.tensor([7, 9]), torch.randn(2, d, generator=gen)
    mat = torch.cat([x * coef.unsqueeze(1), g_d])
    results = []
    for off, factored in ((False, True), (True, True), (False, False)):
        w = torch.ones(C, d)
        opt = SparseRowOptimizer(w, "adamw", lr=0.1, weight_decay=0.01)
        with native.disabled() if off else torch.enable_grad():
            for _ in range(3):
                if factored:
                    opt.step(rows_d, g_d, factored=(rows_f, coef, src, x))
                else:
                    opt.step(torch.cat([rows_f, rows_d]), mat)
        results.append((w, opt.state["step"]))
    for w, st in results[1:]:
        torch.testing.assert_close(w, results[0][0])
        assert torch.equal(st, results[0][1])
    assert results[0][1].tolist() == [3, 0, 0, 3, 0, 0, 0, 3, 0, 3, 0, 0]


def test_row_adam_untouched_rows_and_version():
    w = torch.randn(10, 8)
    w0 = w.clone()
    opt = SparseRowOptimizer(w, "adam", lr=0.1)
    v = w._version
    opt.step(torch.tensor([2, 5, 2]), torch.randn(3, 8))
    assert w._version > v                         # autograd sees the in-place write
    others = torch.tensor([0, 1, 3, 4, 6, 7, 8, 9])
    assert torch.equal(w[others], w0[others]) and not torch.equal(w[2], w0[2])
    assert opt.state["step"].tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("nd", [0, 1, 3])
def test_hybrid_kernel_matches_torch_path(nd):
    gen = torch.Generator().manual_seed(1)
    B, C, d = 6, 30, 20
    weight = torch.randn(C, d, generator=gen)
    row = torch.randint(0, C, (B, nd), generator=gen)
    shared = torch.tensor([4, 17, int(row[0, 0]) if nd else 9])
    up = torch.randn(B, nd + 3, generator=gen)
    out = []
    for off in (False, True):
        f = torch.randn(B, d, generator=torch.Generator().manual_seed(2)).requires_grad_()
        with native.disabled() if off else torch.enable_grad():
            z, h = hybrid_logits(f, weight, row, shared)
            (z * up).sum().backward()
        out.append((z.detach(), f.grad, *h.collect()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lam,masked", [(0.9, True), (1.0, False), (0.5, True)])
def test_sampled_loss_matches_torch_path(lam, masked):
    gen = torch.Generator().manual_seed(3)
    B, n, T = 7, 9, 4.0
    a = torch.randn(B, n, generator=gen) * 3
    o = torch.randn(n, generator=gen)             # broadcast corrections, as batch_shared
    keep = torch.rand(B, n, generator=gen) > 0.2 if masked else None
    tgt = torch.zeros(B, n, dtype=torch.bool)
    tgt[:, 0] = True
    if keep is not None:
        keep[:, 0] = True
    res = []
    for off in (False, True):
        z = torch.randn(B, n, generator=torch.Generator().manual_seed(4)).requires_grad_()
        with native.disabled() if off else torch.enable_grad():
            d = sampled_kd_loss(z, a, o, T, lam, tgt if lam < 1 else None, keep)
            d["loss"].backward()
        res.append((d["loss"].detach(), d["kd"], z.grad))
        if lam < 1:
            res[-1] += (d["ce"],)
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_out_of_range_ids_raise_and_write_nothing():
    """An id outside the weight / class range is an IndexError, as in torch, and the
    kernel writes nothing (checked before any update)."""
    w = torch.randn(6, 4)
    w0 = w.clone()
    opt = SparseRowOptimizer(w, "adam", lr=0.1)
    with pytest.raises(IndexError, match=r"rows: an id is outside \[0, 6\)"):
        opt.step(torch.tensor([1, 6]), torch.randn(2, 4))
    assert torch.equal(w, w0) and not opt.state["step"].any()
    with pytest.raises(IndexError, match="idx"):
        native.gather_dot(torch.randn(2, 4), w, torch.tensor([[0], [-1]]))


def test_threaded_dense_step_matches_torch_path():
    """A step large enough to split over threads (>= 2^18 elements) equals the torch path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(7)
        w_nat = torch.randn(600, 512, generator=gen)
        w_ref = w_nat.clone()
        nat, ref = (SparseRowOptimizer(w, "adamw", lr=1e-2, weight_decay=0.1)
                    for w in (w_nat, w_ref))
        for _ in range(2):
            g = torch.randn(600, 512, generator=gen)
            nat.step(None, g)
            with native.disabled():
                ref.step(None, g)
        assert nat.last_impl == "native"
        torch.testing.assert_close(w_nat, w_ref, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_sampled_loss_broadcast_teacher_row_and_shape_errors():
    """A teacher row broadcast over the batch is read as (B, n), never past its end; an
    argument that does not broadcast to the logits' shape is an error."""
    z = torch.randn(4, 5)
    a_row = torch.randn(5)
    o = torch.zeros(5)
    g1, kd1, _ = native.sampled_loss(z, a_row, o, None, None, 4.0, 1.0)
    g2, kd2, _ = native.sampled_loss(z, a_row.expand(4, 5).clone(), o, None, None, 4.0, 1.0)
    assert torch.equal(g1, g2) and kd1 == kd2
    with pytest.raises(RuntimeError):
        native.sampled_loss(z, torch.randn(3), o, None, None, 4.0, 1.0)


@pytest.mark.parametrize("env,reason", [({"CC": "/nonexistent/cc"}, "No such file"),
                                        ({"DKD_NATIVE": "0"}, "disabled by DKD_NATIVE=0")])
def test_without_native_kernels_everything_takes_the_torch_path(tmp_path, env, reason):
    """No compiler (or DKD_NATIVE=0): status says why, and a hybrid head step runs on the
    torch paths (a fresh process with an empty kernel cache)."""
    import os
    import subprocess
    import sys
    code = ("import torch; from dkd.head import native; "
            "from dkd.bench_cases import HeadBench; "
            "hb = HeadBench(751, 16, 8, 20, 0); "
            "hb.sampled_step(hb.layer('dis', 'hybrid', 5), 0); "
            "print(native.status(), hb.opt.last_impl)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DKD_CACHE_DIR": str(tmp_path), **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    status, impl = out.stdout.strip().rsplit(" ", 1)
    assert status.startswith("torch (") and reason in status and impl == "torch"
    assert not list(tmp_path.glob("*.so"))


def test_column_logits_native_and_torch_paths():
    """A live teacher's exact logits at sampled columns: shared (n,) and per-row (B, n)
    columns, the native gather-dot and the torch batched matmul, against the dense logits."""
    from dkd.head.kernels import column_logits
    gen = torch.Generator().manual_seed(9)
    f, w = torch.randn(6, 5, generator=gen), torch.randn(30, 5, generator=gen)
    dense = f @ w.T
    shared, per_row = torch.randint(0, 30, (7,), generator=gen), torch.randint(0, 30, (6, 4), generator=gen)
    torch.testing.assert_close(column_logits(f, w, shared), dense[:, shared])
    for off in (False, True):
        with native.disabled() if off else torch.no_grad():
            torch.testing.assert_close(column_logits(f, w, per_row), dense.gather(1, per_row))
