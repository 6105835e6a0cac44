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

from dkd.sampling.laws import _cached, arange


def slot_map(ws: dict | None, C: int, device) -> torch.Tensor:
    """The (C,) int64 slot map of ``ws`` (allocated once, zero; never cleared)."""
    slot = {} if ws is None else ws.get("slot")
    slot = None if isinstance(slot, dict) else slot
    if slot is None or slot.numel() < C or slot.device != torch.device(device):
        slot = torch.zeros(C, dtype=torch.long, device=device)
        if ws is not None:
            ws["slot"] = slot
    return slot


def first_occurrence(classes: torch.Tensor, C: int, ws: dict | None) -> torch.Tensor:
    """(n,) index of the first column holding the same class as each column."""
    n = classes.numel()
    slot = slot_map(ws, C, classes.device)
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
    col = slot_map(ws, C, dev).index_select(0, flat).clamp_(0, max(n - 1, 0))
    hit = classes.index_select(0, col) == flat
    dest = torch.where(hit, col, n)                                       # n: the dummy column
    a = rbar = None
    if want_logits:
        off = _cached(ws, ("rowoff", B, K, n, str(dev)),
                      lambda: (torch.arange(B, device=dev) * (n + 1)).repeat_interleave(K))
        block = teacher.rest_logit().to(teacher.logits.dtype).unsqueeze(1).repeat(1, n + 1)
        block.view(-1).scatter_(0, dest + off, teacher.logits.reshape(-1))
        a = block.index_select(1, rep)                                    # (B, n)
    if entries is not None:
        w = entries[:, :K].expand(B, K).reshape(-1)
        sums = torch.zeros(n + 1, dtype=entries.dtype, device=dev).index_add_(0, dest, w)
        tail = entries[:, K].mean() * (1.0 / C)
        rbar = sums[:n].index_select(0, rep).mul_(1.0 / B).add_(tail)
    return rep, a, rbar


__all__ = ["shared_lookup", "first_occurrence", "slot_map"]
