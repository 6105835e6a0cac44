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

