"""Exact per-row top-k of wide (B, C) teacher logits, cheaper than ``torch.topk`` on a host.

A host's ``torch.topk`` costs about as much as the teacher's whole head matmul at
C = 20,001, k = 256 (a partial sort of every row). The top-k elements of a row lie in the
k blocks with the largest maxima: an element outside those blocks is below at least k
block maxima, which are k distinct larger elements. So: split each row into blocks of
``bs`` columns, take each block's max (one vectorised pass), pick the k best blocks, and
run ``topk`` on their k·bs columns only (plus the < bs columns that do not fill a block).
bs ≈ sqrt(C / k) balances the two selections. Every shape is fixed by (B, C, k): no host
reads, so it stays valid on an accelerator (where plain ``torch.topk`` is used: it is
already fast there, and one kernel is cheaper than five).

:func:`head_topk` goes one step further for a live teacher on a host: it never forms the
(B, C) logits. The head GEMM runs a block of ``block`` classes at a time into one reused
buffer, which stays in cache, and each block feeds the native running top-k
and log-sum-exp (:class:`dkd.head.native.RunningTopK`: a running row max m and
Σ exp(z − m), rescaled when m grows). Timed alone at B = 256, C = 20,001, d = 128, k = 256
(one thread): the dense ``f @ W.T`` 26–29 ms, dense + :func:`row_topk` + ``logsumexp``
64–88 ms, the streamed top-k with its log-sum-exp 25–28 ms (see the README).
"""
from __future__ import annotations

import math

import torch

from dkd.head import native


def row_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, k), ids (B, k)) of the k largest entries of each row of ``z`` (B, C),
    values descending: the values of ``z.topk(k, 1)`` exactly (ties may pick other ids)."""
    B, C = z.shape
    bs = int(math.sqrt(C / max(k, 1)))
    if z.device.type != "cpu" or bs < 2 or k >= C:
        return z.topk(k, dim=1)
    nb = C // bs
    block_max = z[:, :nb * bs].reshape(B, nb, bs).amax(2)                   # (B, nb)
    best = block_max.topk(min(k, nb), dim=1, sorted=False).indices          # (B, k')
    cols = (best.unsqueeze(2) * bs + torch.arange(bs, device=z.device)).reshape(B, -1)
    if nb * bs < C:                     # the columns after the last whole block
        rest = torch.arange(nb * bs, C, device=z.device).expand(B, -1)
        cols = torch.cat([cols, rest], 1)
    vals, pos = z.gather(1, cols).topk(k, dim=1)
    return vals, cols.gather(1, pos)


# Columns per block of the streamed head: (B, block) float32 = 2 MiB at B = 256.
HEAD_BLOCK = 2048


def head_topk(f: torch.Tensor, weight: torch.Tensor, k: int, block: int = HEAD_BLOCK
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (B, k), ids (B, k), lse (B,)) of the logits ``f @ weight.T`` (f (B, d),
    weight (C, d)): the top-k values descending and the row log-sum-exp, streamed over
    column blocks when the native kernels can run (a host, float32), else from the dense
    logits with :func:`row_topk`."""
    B, C = f.shape[0], weight.shape[0]
    f = f.contiguous()     # a backbone's output may be a strided view (its last position)
    if not (native.available() and native.supports(f, weight) and C > block and k <= C):
        z = f @ weight.T
        vals, ids = row_topk(z, k)
        return vals, ids, torch.logsumexp(z, 1)
    run = native.RunningTopK(B, k)
    buf = torch.empty(B, block)
    for c0 in range(0, C, block):
        n = min(block, C - c0)
        run.update(torch.mm(f, weight[c0:c0 + n].T, out=buf if n == block else None), c0)
    return run.result()


__all__ = ["row_topk", "head_topk"]
