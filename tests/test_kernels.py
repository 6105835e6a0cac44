import pytest
import torch

from dkd.head.kernels import full_logits, hybrid_logits, path_costs, sampled_logits, unique_rows

B, C, D = 6, 17, 8


def _setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64)
    return features, weight, gen


def _reference(features, weight, cols, upstream):
    """Plain autograd: full logits with weight as a leaf, then gather/index."""
    f = features.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    full = f @ w.t()
    logits = full[:, cols] if cols.dim() == 1 else full.gather(1, cols)
    (logits * upstream).sum().backward()
    return logits.detach(), f.grad, w.grad


def _run(features, weight, cols, upstream, path):
    f = features.clone().requires_grad_()
    logits, handle = sampled_logits(f, weight, cols, path)
    (logits * upstream).sum().backward()
    rows, grad = handle.collect()
    dense = torch.zeros_like(weight).index_add_(0, rows, grad)
    return logits.detach(), f.grad, dense, handle


@pytest.mark.parametrize("path", ["batch_shared", "auto"])
def test_batch_shared_matches_reference(path):
    features, weight, gen = _setup()
    cols = torch.tensor([3, 0, 16, 3, 7, 3])  # duplicates on purpose
    up = torch.randn(B, cols.numel(), generator=gen, dtype=torch.float64)
    ref = _reference(features, weight, cols, up)
    logits, gf, gw, handle = _run(features, weight, cols, up, path)
    assert handle.path == "batch_shared" and handle.rows.numel() == cols.numel()
    torch.testing.assert_close(logits, ref[0])
    torch.testing.assert_close(gf, ref[1])
    torch.testing.assert_close(gw, ref[2])
    assert weight.grad is None


@pytest.mark.parametrize("nd", [1, 2])
def test_hybrid_matches_reference(nd):
    """[per-row columns | shared columns] equals plain autograd on the same (B, n) columns;
    the handle holds one gradient row per entry of [row columns, shared columns], repeats
    included (targets shared by samples, a draw that is also a row column), and they sum to
    the reference's weight gradient."""
    features, weight, gen = _setup(2)
    row = torch.randint(0, C, (B, nd), generator=gen)
    row[3, 0] = row[1, 0]                       # a target shared by two samples
    shared = torch.tensor([5, 11, 0])
    shared[1] = row[0, 0]                       # a shared draw that is also a row column
    cols = torch.cat([row, shared.expand(B, -1)], 1)
    up = torch.randn(B, cols.shape[1], generator=gen, dtype=torch.float64)
    ref = _reference(features, weight, cols, up)
    f = features.clone().requires_grad_()
    logits, handle = hybrid_logits(f, weight, row, shared)
    (logits * up).sum().backward()
    rows, grad = handle.collect()
    assert handle.path == "hybrid" and not handle.unique
    assert torch.equal(rows, torch.cat([row.reshape(-1), shared]))
    torch.testing.assert_close(logits.detach(), ref[0])
    torch.testing.assert_close(f.grad, ref[1])
    torch.testing.assert_close(torch.zeros_like(weight).index_add_(0, rows, grad), ref[2])
    with pytest.raises(ValueError, match="row_cols"):
        hybrid_logits(f, weight, shared, shared)


@pytest.mark.parametrize("path", ["union", "gather_dot", "auto"])
def test_per_sample_matches_reference(path):
    features, weight, gen = _setup(1)
    cols = torch.randint(0, C, (B, 5), generator=gen)
    cols[0, 1] = cols[0, 3]          # duplicate within a sample
    cols[2, 0] = cols[4, 4]          # shared across samples
    up = torch.randn(B, 5, generator=gen, dtype=torch.float64)
    ref = _reference(features, weight, cols, up)
    logits, gf, gw, handle = _run(features, weight, cols, up, path)
    assert handle.unique and torch.equal(handle.rows, torch.unique(cols))
    torch.testing.assert_close(logits, ref[0])
    torch.testing.assert_close(gf, ref[1])
    torch.testing.assert_close(gw, ref[2])


def test_gather_dot_chunks(monkeypatch):
    import dkd.head.kernels as K
    monkeypatch.setattr(K, "_CHUNK_BYTES", 1)  # one sample per chunk
    features, weight, gen = _setup(2)
    cols = torch.randint(0, C, (B, 4), generator=gen)
    up = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    ref = _reference(features, weight, cols, up)
    logits, gf, gw, _ = _run(features, weight, cols, up, "gather_dot")
    torch.testing.assert_close(logits, ref[0])
    torch.testing.assert_close(gf, ref[1])
    torch.testing.assert_close(gw, ref[2])


def test_full_logits():
    features, weight, gen = _setup(3)
    up = torch.randn(B, C, generator=gen, dtype=torch.float64)
    f = features.clone().requires_grad_()
    logits, handle = full_logits(f, weight)
    (logits * up).sum().backward()
    rows, grad = handle.collect()
    assert rows is None and grad.shape == weight.shape
    ref = _reference(features, weight, torch.arange(C), up)
    torch.testing.assert_close(grad, ref[2])
    torch.testing.assert_close(f.grad, ref[1])


def test_no_grad_mode_and_empty_cols():
    features, weight, _ = _setup()
    with torch.no_grad():
        logits, handle = sampled_logits(features, weight, torch.tensor([1, 2]))
    assert logits.shape == (B, 2) and handle.collect() is None
    f = features.clone().requires_grad_()
    # A shard that drew no classes still joins the loss and its backward.
    for cols in (torch.zeros(0, dtype=torch.long), torch.zeros(B, 0, dtype=torch.long)):
        logits, handle = sampled_logits(f, weight, cols)
        assert logits.shape == (B, 0)
        (logits.sum() + f.sum()).backward()
        rows, grad = handle.collect()
        assert rows.numel() == 0 and grad.shape == (0, D)


def test_unique_rows():
    cols = torch.tensor([[5, 1, 5], [2, 1, 9]])
    U, inv, order, starts = unique_rows(cols)
    assert torch.equal(U, torch.tensor([1, 2, 5, 9]))
    assert torch.equal(U[inv], cols)
    assert torch.equal(cols.reshape(-1)[order][starts], U)


def test_bad_arguments():
    features, weight, _ = _setup()
    with pytest.raises(ValueError, match="path"):
        sampled_logits(features, weight, torch.tensor([1]), path="nope")
    with pytest.raises(ValueError, match="path"):
        sampled_logits(features, weight, torch.tensor([1]), path="union")
    with pytest.raises(ValueError, match="batch_shared"):
        sampled_logits(features, weight, torch.zeros(B, 2, dtype=torch.long), "batch_shared")
    with pytest.raises(ValueError, match="cols"):
        sampled_logits(features, weight, torch.zeros(B + 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cols"):
        sampled_logits(features, weight, torch.zeros(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="weight"):
        sampled_logits(features, weight[:, :3], torch.tensor([1]))


def test_cost_model_prefers_union_on_heavy_overlap():
    # All samples share the same k classes: union is one small GEMM.
    assert min(path_costs(256, 120, 512, 120), key=path_costs(256, 120, 512, 120).get) == "union"
    # Disjoint classes per sample: gather avoids a (B, B·k) GEMM.
    c = path_costs(256, 120, 512, 256 * 120)
    assert min(c, key=c.get) == "gather_dot"


@pytest.mark.parametrize("path", ["union", "gather_dot"])
def test_row_grad_without_feature_grad(path):
    """A frozen backbone: the rows still get their gradient (gather_dot via its anchor)."""
    features, weight, gen = _setup(4)
    cols = torch.randint(0, C, (B, 3), generator=gen)
    up = torch.randn(B, 3, generator=gen, dtype=torch.float64)
    logits, handle = sampled_logits(features, weight, cols, path)
    (logits * up).sum().backward()
    rows, grad = handle.collect()
    ref = _reference(features, weight, cols, up)[2]
    torch.testing.assert_close(torch.zeros_like(weight).index_add_(0, rows, grad), ref)


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("kind", ["per_sample", "batch_shared"])
def test_touch_mask_leaves_placeholder_rows_alone(kind, native_on):
    """Columns put on a shard as placeholders (masked in the loss) must not count as
    touches: the lazy optimizer would otherwise step those rows with stale moments."""
    import contextlib
    from dkd.head import native
    from dkd.head.head import ShardedHead
    head = ShardedHead(10, 4, seed=0)
    opt = head.make_optimizer("adam", lr=0.1)
    feats = torch.randn(3, 4)
    off = contextlib.nullcontext() if native_on else native.disabled()
    with off:
        for _ in range(2):  # the second step: rows 1-3 have moments, row 9 must still not move
            before = head.weight.clone()
            if kind == "per_sample":
                cols = torch.tensor([[1, 2], [1, 9], [3, 9]])
                owned = torch.tensor([[True, True], [True, False], [True, False]])
                z = head.logits_hybrid(feats, cols, cols.new_zeros(0), owned.reshape(-1))
                (z * owned).sum().backward()
            else:
                cols = torch.tensor([1, 2, 9, 3, 1])
                owned = torch.tensor([True, True, False, True, True])
                z = head.logits_sampled(feats, cols, touch=owned)
                (z * owned).sum().backward()
            head.apply_grads(opt)
            moved = (head.weight != before).any(1).nonzero().squeeze(1).tolist()
            assert moved == [1, 2, 3]
