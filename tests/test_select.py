"""Exact row top-k by block maxima against torch.topk."""
import pytest
import torch

from dkd.teacher.select import row_topk


@pytest.mark.parametrize("C,k", [(20001, 256), (1000, 10), (4096, 100), (257, 64), (50, 50),
                                 (10, 3)])
def test_row_topk_values_match_torch_topk(C, k):
    gen = torch.Generator().manual_seed(C)
    z = torch.randn(33, C, generator=gen)
    z[0] = 0.0                                   # all ties
    z[1, : C // 2] = z[1, C // 2:].max() + 1     # the top mass all in one stretch
    vals, ids = row_topk(z, k)
    ref = z.topk(k, dim=1).values
    assert torch.equal(vals, ref)
    assert torch.equal(z.gather(1, ids), vals)             # ids name those values
    assert (ids.sort(1).values.diff(dim=1) > 0).all()      # distinct ids per row



def _ranked(z: torch.Tensor, k: int):
    """Reference: values descending, equal values by the smaller id (a stable sort)."""
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]
    return z.gather(1, order), order


@pytest.mark.skipif(not __import__("dkd.head.native", fromlist=["x"]).available(),
                    reason="native kernels unavailable")
@pytest.mark.parametrize("C,k,block", [(20001, 256, 2048), (1000, 10, 7), (4096, 100, 333),
                                       (300, 64, 16), (50, 50, 13), (40, 1, 5)])
def test_running_topk_over_blocks_is_the_exact_ranked_top_k(C, k, block):
    """The native running top-k fed column blocks (odd sizes take the scalar tail, a
    strided view the row stride) gives torch's top-k values, the smaller id first among
    equal values, and the row log-sum-exp, also for rows of ties, ascending rows (every
    value enters: the most selections) and a spike at the end."""
    from dkd.head.native import RunningTopK

    gen = torch.Generator().manual_seed(C + k)
    wide = torch.randn(9, C + 3, generator=gen) * 4
    z = wide[:, 3:]                                   # row stride C + 3
    z[0] = 0.5                                        # all ties
    z[1] = torch.arange(C, dtype=torch.float32) / C   # ascending
    z[2, -1] = 80.0                                   # the max arrives last
    z[3] = torch.randint(0, 5, (C,), generator=gen).float()   # many ties
    run = RunningTopK(9, k)
    for c0 in range(0, C, block):
        run.update(z[:, c0:c0 + block], c0)
    vals, ids, lse = run.result()
    ref_v, ref_i = _ranked(z, k)
    assert torch.equal(vals, ref_v) and torch.equal(ids, ref_i)
    torch.testing.assert_close(lse, torch.logsumexp(z.double(), 1).float(), rtol=1e-6,
                               atol=1e-5)


def test_head_topk_streamed_matches_the_dense_logits():
    """head_topk (streamed over class blocks when native) = top-k and log-sum-exp of the
    dense f @ W.T, with the native kernels and without."""
    from dkd.head import native
    from dkd.teacher.select import head_topk

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(17, 48, generator=gen)[:, ::2]      # a strided view, as a backbone gives
    W = torch.randn(5003, 24, generator=gen)
    z = f @ W.T
    for ctx in (native.disabled(), __import__("contextlib").nullcontext()):
        with ctx:
            vals, ids, lse = head_topk(f, W, 40, block=512)
        torch.testing.assert_close(vals, z.topk(40, 1).values)
        torch.testing.assert_close(z.gather(1, ids), vals)
        torch.testing.assert_close(lse, torch.logsumexp(z, 1), rtol=1e-6, atol=1e-5)


def test_running_topk_refuses_a_bad_block():
    from dkd.head import native

    if not native.available():
        pytest.skip("native kernels unavailable")
    run = native.RunningTopK(4, 3)
    with pytest.raises(ValueError, match="block must be"):
        run.update(torch.zeros(5, 10), 0)
    with pytest.raises(ValueError, match="block must be"):
        run.update(torch.zeros(10, 4).T, 0)            # column stride 4
    with pytest.raises(ValueError, match="top-3 of only 0 columns"):
        run.result()
