"""Teacher logits and the batch mixture r̄ at a step's shared columns, in fixed shapes.

Given columns ``classes (n,)`` (repeats allowed), :func:`shared_lookup` returns

* ``rep (n,)``: the first column holding the same class (a repeated class points to its
  first occurrence), which is how masks find repeated D classes and draws that landed in
  D without ``unique``;
* ``a (B, n)``: the completed teacher logit of every row at every column;
* ``rbar (n,)``: r̄(c) = (1/B) Σ_b r_b(c) of the uniform-tail proposal family
  (:mod:`dkd.sampling.draw`): r_b(c) = E[b, j] if c = ids[b, j], plus E[b, K] / C for every
  class (the row's tail mass spread over all C classes).

How, in O(B·K + n) and a dozen kernels: a persistent (C,) slot map receives, for each
class among the columns, its smallest column index (``scatter_reduce`` amin, so the result
is deterministic on every backend); the top-K ids of every row read the slot map, and a
read is valid iff the column it names holds that id (stale entries of earlier steps fail
that check, so the map is never cleared). Valid hits are scattered into a (B, n + 1) block
whose last column absorbs the misses.
"""
from __future__ import annotations

import torch

from dkd.consts import scalar
from dkd.sampling.laws import _cached, arange


def slot_map(ws: dict | None, C: int, device, n: int = 0) -> torch.Tensor:
    """The (C,) int64 slot map of ``ws`` for column lists of length n (allocated once,
    zero, never cleared). One map per n, so every value it ever holds is < n: a read
    needs no clamp."""
    key = ("slot", n)
    slot = None if ws is None else ws.get(key)
    if slot is None or slot.numel() < C or slot.device != torch.device(device):
        slot = torch.zeros(C, dtype=torch.long, device=device)
        if ws is not None:
            ws[key] = slot
    return slot


def first_occurrence(classes: torch.Tensor, C: int, ws: dict | None) -> torch.Tensor:
    """(n,) index of the first column holding the same class as each column."""
    n = classes.numel()
    slot = slot_map(ws, C, classes.device, n)
    slot.scatter_reduce_(0, classes, arange(n, classes.device, ws), "amin", include_self=False)
    return slot.index_select(0, classes)


def shared_lookup(teacher, classes: torch.Tensor, entries: torch.Tensor | None,
                  ws: dict | None = None, want_logits: bool = True):
    """(rep (n,), a (B, n) or None, rbar (n,) float64 or None) at ``classes (n,)``; see the
    module doc. entries: (1 or B, K + 1) float64 row entries of the proposal (None: no r̄)."""
    B, K, C = teacher.batch, teacher.k, teacher.num_classes
    n, dev = classes.numel(), classes.device
    ws = {} if ws is None else ws          # one slot map for both passes below
    rep = first_occurrence(classes, C, ws)
    flat = teacher.ids.reshape(-1)                                        # (B·K,)
    col = slot_map(ws, C, dev, n).index_select(0, flat)
    dest = torch.where(classes.index_select(0, col) == flat, col,
                       scalar(n, torch.long, dev))                    # n: the dummy column
    a = rbar = None
    if want_logits:
        rest = teacher.rest_logit_as(teacher.logits.dtype)
        block = rest.unsqueeze(1).expand(B, n + 1).clone()
        block.scatter_(1, dest.view(B, K), teacher.logits)
        a = block.index_select(1, rep)                                    # (B, n)
    if entries is not None:
        w = entries[:, :K].expand(B, K).reshape(-1)
        sums = torch.zeros(n + 1, dtype=entries.dtype, device=dev).index_add_(0, dest, w)
        tail = entries[0, K] if entries.shape[0] == 1 else entries[:, K].mean()
        # r̄ = (Σ_b E[b, rank_b(c)] + B · tail / C) / B
        rbar = torch.add(sums[:n].index_select(0, rep), tail, alpha=B / C).mul_(1.0 / B)
    return rep, a, rbar


__all__ = ["shared_lookup", "first_occurrence", "slot_map"]
