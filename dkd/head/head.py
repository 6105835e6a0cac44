"""The class-sharded student head: this rank's (C_local, d) block of the C×d weight.

Every rank sees the global batch (features are all-gathered upstream), so the gradient
each rank computes for its own rows is already the full gradient of the replicated loss
w.r.t. those rows. The head's gradients are therefore **never averaged across ranks**, and
the head stays outside the data-parallel engine (a sibling of the backbone, not a child).

The weight is a buffer, not a Parameter: it never receives a dense ``.grad``. Each logits
call records a ``RowGrad`` handle (see kernels.py); ``apply_grads`` merges the handles
recorded since the last call and hands the touched rows to a ``SparseRowOptimizer``.

Checkpoints are keyed by global class range, so a run can resume on another world size:
each rank saves ``shard_state()``; a rank of the new world loads every saved piece with
``load_global`` and copies the rows it owns.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dkd.dist.functional import group_rank, group_size
from dkd.head.kernels import RowGrad, full_logits, hybrid_logits, sampled_logits
from dkd.head.shard import shard_range
from dkd.head.sparse_optim import SparseRowOptimizer

# Rows are initialised in fixed global blocks, each from its own seed, so class c gets the
# same initial row whatever the world size (sharded runs match the 1-process reference).
_INIT_BLOCK = 4096


def init_rows(start: int, end: int, dim: int, std: float, seed: int,
              dtype=torch.float32, device=None) -> torch.Tensor:
    """(end − start, dim) N(0, std²) rows of global classes [start, end), P-independent."""
    out = torch.empty(end - start, dim, dtype=dtype, device=device)
    for blk in range(start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + blk)
        rows = torch.randn(_INIT_BLOCK, dim, generator=gen).mul_(std)  # CPU, deterministic
        lo, hi = max(start, blk * _INIT_BLOCK), min(end, (blk + 1) * _INIT_BLOCK)
        out[lo - start:hi - start] = rows[lo - blk * _INIT_BLOCK:hi - blk * _INIT_BLOCK]
    return out


def host_rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of ``t`` on the host with no second copy of the shard: a device tensor
    is copied straight to host memory; a host tensor is used as is when the rows are all
    of it (torch.save writes a view's whole storage, so a part is cloned)."""
    rows = t[lo:hi]
    if t.device.type != "cpu":
        return rows.to("cpu")
    whole = lo == 0 and hi == t.shape[0] and t.is_contiguous() and t.storage_offset() == 0
    return rows if whole else rows.clone()


class ShardedHead(nn.Module):
    """Rank ``s`` of ``P``'s rows [start, end) of a (num_classes, dim) linear head, no bias.

    group: process group of the class shards (None: one shard). ``world_size``/``rank``
    override the group's (tests and offline resharding build shards without a group).
    init_std: std of the N(0, init_std²) initial rows; seed: seed of that initialisation.
    """

    def __init__(self, num_classes: int, dim: int, group=None, init_std: float = 0.01,
                 dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
                 world_size: int | None = None, rank: int | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not init_std >= 0.0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.num_classes, self.dim, self.group = num_classes, dim, group
        self.world_size = group_size(group) if world_size is None else world_size
        self.rank = group_rank(group) if rank is None else rank
        self.start, self.end = shard_range(num_classes, self.world_size, self.rank)
        self.num_local = self.end - self.start
        self.register_buffer("weight", init_rows(self.start, self.end, dim, init_std, seed,
                                                 dtype, device))
        self._pending: list[RowGrad] = []
        self.last_path: str | None = None

    def extra_repr(self) -> str:
        return (f"classes [{self.start}, {self.end}) of {self.num_classes}, dim={self.dim}, "
                f"rank {self.rank}/{self.world_size}")

    def make_optimizer(self, kind: str = "adamw", **kwargs) -> SparseRowOptimizer:
        """A SparseRowOptimizer over this shard (build it after moving the head)."""
        return SparseRowOptimizer(self.weight, kind, **kwargs)

    # ---------------------------------------------------------------- logits
    def _record(self, handle: RowGrad) -> None:
        self.last_path = handle.path
        if handle.active:
            self._pending.append(handle)

    def logits_full(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, C_local) logits of every local class (dense gradient)."""
        logits, handle = full_logits(features, self.weight)
        self._record(handle)
        return logits

    def logits_sampled(self, features: torch.Tensor, local_cols: torch.Tensor,
                       path: str = "auto", unique: bool = False,
                       touch: torch.Tensor | None = None,
                       first: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) and local row ids (n,) or (B, k) -> (B, n) or (B, k) logits.

        unique: promise that 1-D ``local_cols`` has no duplicates (skips the optimizer's
        duplicate coalescing). touch: bool mask like 1-D ``local_cols`` of the columns whose
        rows this step may update (the others are placeholders of classes other ranks own,
        masked in the loss). first: (n,) first column of each column's row, when only
        first columns carry gradient (see ``SparseRowOptimizer.step``). The kernel that ran
        is in ``self.last_path``.
        """
        logits, handle = sampled_logits(features, self.weight, local_cols, path, unique=unique,
                                        touch=touch, first=first)
        self._record(handle)
        return logits

    def logits_hybrid(self, features: torch.Tensor, row_cols: torch.Tensor,
                      shared_cols: torch.Tensor,
                      touch: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d), per-row local ids (B, nd) and shared local ids (u,) -> (B, nd + u).

        touch: bool mask over [row_cols.flatten(), shared_cols] (as in
        :meth:`logits_sampled`). Per-sample mode is the case u = 0."""
        logits, handle = hybrid_logits(features, self.weight, row_cols, shared_cols, touch)
        self._record(handle)
        return logits

    # ---------------------------------------------------------------- update
    def discard_grads(self) -> None:
        """Forget the handles recorded since the last ``apply_grads`` (e.g. a skipped step)."""
        self._pending.clear()

    @torch.no_grad()
    def apply_grads(self, optimizer: SparseRowOptimizer, lr: float | None = None,
                    clock: int | None = None) -> int:
        """Step ``optimizer`` once with the row gradients of every logits call since the
        last call (several calls, e.g. micro-batches, are summed row-wise). Returns the
        number of gradient rows handed to the optimizer (duplicates counted). clock: the
        optimizer step, for an optimizer with catch-up."""
        if optimizer.weight is not self.weight:
            raise ValueError("optimizer must be built on this head's weight (build it after "
                             "moving the head to its device)")
        one = self._pending[0] if len(self._pending) == 1 else None
        split = one.split() if one is not None else None
        if split is not None:
            # one hybrid call: dense + factored rows, summed by the optimizer itself
            self._pending.clear()
            rows_d, g_d, factored = split
            optimizer.step(rows_d, g_d, lr, factored=factored, touch=one.touch, clock=clock)
            return rows_d.numel() + factored[0].numel()
        got = [(h, h.collect()) for h in self._pending]
        got = [(h, rg) for h, rg in got if rg is not None]
        self._pending.clear()
        if not got:
            return 0
        if len(got) == 1 and got[0][1][0] is None:
            # One full-softmax call: its (C_local, d) gradient is the step's (no copy).
            optimizer.step(None, got[0][1][1], lr, clock=clock)
            return self.num_local
        if any(rows is None for _, (rows, _g) in got):
            # A full-softmax call touched every row: the step is dense anyway.
            dense = torch.zeros_like(self.weight)
            for h, (rows, g) in got:
                if rows is None:
                    dense.add_(g)
                else:
                    if h.touch is not None:
                        g = g * h.touch.unsqueeze(1)
                    dense.index_add_(0, rows, g)
            optimizer.step(None, dense, lr, clock=clock)
            return self.num_local
        if len(got) == 1:
            h, (rows, g) = got[0]
            optimizer.step(rows, g, lr, unique=h.unique, touch=h.touch, first=h.first,
                           clock=clock)
            return rows.numel()
        rows = torch.cat([rg[0] for _, rg in got])
        touch = None
        if any(h.touch is not None for h, _ in got):
            touch = torch.cat([torch.ones_like(rg[0], dtype=torch.bool) if h.touch is None
                               else h.touch for h, rg in got])
        optimizer.step(rows, torch.cat([rg[1] for _, rg in got]), lr, unique=False, touch=touch,
                       clock=clock)
        return rows.numel()

    # ---------------------------------------------------------------- checkpoints
    def state_for_range(self, start: int, end: int,
                        optimizer: SparseRowOptimizer | None = None) -> dict:
        """Weights (and optimizer state) of global classes [start, end) ⊆ this shard."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"start, end must satisfy {self.start} <= start < end <= "
                             f"{self.end} (this shard), got {start}, {end}")
        lo, hi = start - self.start, end - self.start
        piece = {"start": start, "end": end, "num_classes": self.num_classes,
                 "weight": host_rows(self.weight.detach(), lo, hi)}
        if optimizer is not None:
            piece["optim"] = {k: host_rows(v, lo, hi) for k, v in optimizer.state.items()}
            piece["optim_kind"] = optimizer.kind
        return piece

    def shard_state(self, optimizer: SparseRowOptimizer | None = None) -> dict:
        """This whole shard as one piece keyed by its global class range (host tensors that
        may share memory with the shard: write them out before the next step)."""
        return self.state_for_range(self.start, self.end, optimizer)

    def _overlaps(self, pieces: list[dict]) -> list[tuple[dict, int, int]]:
        """(piece, lo, hi) global overlaps with this shard; raises unless they cover it."""
        found = []
        for piece in pieces:
            if piece.get("num_classes") != self.num_classes:
                raise ValueError(f"piece num_classes must be {self.num_classes}, got "
                                 f"{piece.get('num_classes')!r}")
            if piece["weight"].shape != (piece["end"] - piece["start"], self.dim):
                raise ValueError(f"piece weight must have shape ({piece['end'] - piece['start']}"
                                 f", {self.dim}), got {tuple(piece['weight'].shape)}")
            lo, hi = max(piece["start"], self.start), min(piece["end"], self.end)
            if lo < hi:
                found.append((piece, lo, hi))
        at = self.start
        for _, lo, hi in sorted(found, key=lambda x: x[1]):
            if lo > at:
                break
            at = max(at, hi)
        if at < self.end:
            raise ValueError(f"pieces must cover this shard's classes [{self.start}, "
                             f"{self.end}); classes from {at} are missing")
        return found

    @torch.no_grad()
    def load_global(self, pieces: Iterable[dict],
                    optimizer: SparseRowOptimizer | None = None) -> None:
        """Copy this shard's rows (and optimizer state) out of pieces saved by any world size."""
        found = self._overlaps(list(pieces))
        if optimizer is not None:
            for piece, _, _ in found:
                if piece.get("optim_kind") != optimizer.kind:
                    raise ValueError(f"piece optimizer kind must be {optimizer.kind!r}, got "
                                     f"{piece.get('optim_kind')!r}")
        for piece, lo, hi in found:
            src = slice(lo - piece["start"], hi - piece["start"])
            dst = lo - self.start
            self.weight[dst:dst + hi - lo].copy_(piece["weight"][src])
            if optimizer is not None:
                optimizer.load_rows_state(dst, {k: v[src] for k, v in piece["optim"].items()})


__all__ = ["ShardedHead", "init_rows"]
