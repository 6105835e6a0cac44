"""The one teacher-batch type the softmax layer sees, whatever the teacher source.

A live teacher, a full store and a top-K store all hand the layer a :class:`TopKTeacher`:
per sample the K largest teacher logits ``logits (B, K)`` of classes ``ids (B, K)``
(descending), ``lse (B,)`` the log-sum-exp of all C logits, and the completion logit
``rest (B,)`` that every class outside the top K takes under the KD-topk completion
(DESIGN.md, "Soft-label store"). A dense teacher is the case K = C (``from_dense``), which
keeps its (B, C) logits for the full-softmax methods.

Every derived quantity is a fixed-shape tensor op on the batch's device (no host reads),
so the sampler that consumes this runs without host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_F64 = torch.float64


def completion_logit(logits: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) float64 logit of every non-top-K class under the KD-topk completion: the mass
    left outside the top-K logits (B, K), spread evenly over the C − K other classes;
    -inf when K = C. The engine computes it with the top-K, on each rank's own rows."""
    B, K, C = logits.shape[0], logits.shape[1], num_classes
    if K == C:
        return torch.full((B,), float("-inf"), dtype=_F64, device=logits.device)
    lse = lse.double()
    left = -torch.expm1(torch.logsumexp(logits, 1).double() - lse)          # tail mass
    return lse + torch.log(left.clamp_min(torch.finfo(_F64).tiny)) - math.log(C - K)


@dataclass(eq=False)
class TopKTeacher:
    """Teacher data of one (global) batch.

    ids: (B, K) long class ids sorted by teacher logit, descending; logits: (B, K) their
    teacher logits (temperature-free); lse: (B,) log-sum-exp of all C teacher logits;
    num_classes: C (1 <= K <= C); rest: optional (B,) completion logit
    (:func:`completion_logit`), computed on first use when not given.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    num_classes: int
    rest: torch.Tensor | None = None
    full: torch.Tensor | None = field(default=None, repr=False)   # dense (B, C), if known
    # A live teacher's features (B, d_t) and head weight (C, d_t): its exact logit at any
    # column (``column_logits``), so a top-K teacher needs no completion at sampled columns.
    feats: torch.Tensor | None = field(default=None, repr=False)
    head: torch.Tensor | None = field(default=None, repr=False)
    # A class-sharded teacher's exact logits: cols -> (B, n) logits (one all-reduce).
    columns: object = field(default=None, repr=False)
    ranked: bool = True   # False: ids are not sorted by logit (a dense teacher as given)
    _sorted: "TopKTeacher | None" = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.ids.dim() != 2 or self.logits.shape != self.ids.shape:
            raise ValueError(f"ids and logits must both be (B, K), got {tuple(self.ids.shape)}"
                             f" and {tuple(self.logits.shape)}")
        if self.lse.shape != self.ids.shape[:1]:
            raise ValueError(f"lse must be (B,) = ({self.ids.shape[0]},), "
                             f"got {tuple(self.lse.shape)}")
        if not 1 <= self.ids.shape[1] <= self.num_classes:
            raise ValueError(f"K must satisfy 1 <= K <= num_classes = {self.num_classes}, "
                             f"got {self.ids.shape[1]}")
        self.ids = self.ids.long()
        if self.rest is not None and self.rest.shape != self.lse.shape:
            raise ValueError(f"rest must be (B,) = ({self.ids.shape[0]},), "
                             f"got {tuple(self.rest.shape)}")

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_dense(cls, logits: torch.Tensor, k: int | None = None,
                   rank: bool = True) -> "TopKTeacher":
        """The teacher of dense (B, C) logits: its top-k (k = C: the whole ranking, a stable
        sort so ties break by class id, like the dense oracle). rank=False (k = C only):
        no sort now; the ids are 0..C-1 in class order and :meth:`sorted` ranks them when
        a sampler first needs it (full-softmax methods only read the dense logits)."""
        C = logits.shape[1]
        k = C if k is None else k
        if not rank and k == C:
            ids = torch.arange(C, device=logits.device).expand(logits.shape[0], C)
            lse = torch.logsumexp(logits.double(), 1).to(logits.dtype)
            return cls(ids, logits, lse, C, full=logits, ranked=False)
        if k == C:
            idx = torch.sort(logits, dim=1, descending=True, stable=True).indices
            val = logits.gather(1, idx)
        else:
            val, idx = logits.topk(k, dim=1)
        lse = torch.logsumexp(logits.double(), 1).to(logits.dtype)
        return cls(idx, val, lse, C, full=logits if k == C else None)

    def sorted(self) -> "TopKTeacher":
        """This teacher with its ids ranked by logit (itself when they already are)."""
        if self.ranked:
            return self
        if self._sorted is None:
            self._sorted = TopKTeacher.from_dense(self.full)
        return self._sorted

    def rest_logit(self) -> torch.Tensor:
        """(B,) float64 completion logit (-inf when K = C), computed once per object."""
        if self.rest is None:
            self.rest = completion_logit(self.logits, self.lse, self.num_classes)
        return self.rest.double()

    def rest_logit_as(self, dtype) -> torch.Tensor:
        """:meth:`rest_logit` in ``dtype`` (the logits' own), converted once per object."""
        cache = self.__dict__.setdefault("_rest_as", {})
        if dtype not in cache:
            cache[dtype] = self.rest_logit().to(dtype)
        return cache[dtype]

    def log_partition(self, T: float) -> torch.Tensor:
        """(B,) float64 log Σ_c exp(a_c / T) over the completed teacher."""
        parts = self.logits.double() / T
        if self.k < self.num_classes:
            tail = self.rest_logit() / T + math.log(self.num_classes - self.k)
            parts = torch.cat([parts, tail.unsqueeze(1)], 1)
        return torch.logsumexp(parts, 1)

    def dense(self) -> torch.Tensor:
        """(B, C) completed teacher logits (the full-softmax methods and tests)."""
        if self.full is not None:
            return self.full
        out = self.rest_logit().to(self.logits.dtype).unsqueeze(1)
        out = out.expand(-1, self.num_classes).clone()
        return out.scatter_(1, self.ids, self.logits)

    def dense_rows(self, n: int) -> torch.Tensor:
        """(n, C) teacher logits of the first n rows: the dense logits when known, a live
        teacher's exact logits (features @ head), else the top-K completion."""
        if self.full is not None:
            return self.full[:n]
        if self.exact:
            return (self.feats[:n].float() @ self.head.float().t()).to(self.logits.dtype)
        rows = self.rest_logit_as(self.logits.dtype)[:n].unsqueeze(1)
        return rows.expand(-1, self.num_classes).clone().scatter_(1, self.ids[:n],
                                                                  self.logits[:n])

    @property
    def exact(self) -> bool:
        """Whether the teacher's own logit at any column can be computed (features and
        head: :func:`dkd.head.kernels.column_logits`, or a class-sharded teacher's)."""
        return self.columns is not None or (self.feats is not None and self.head is not None)

    def column_logits(self, cols: torch.Tensor) -> torch.Tensor:
        """The teacher's exact logits at ``cols`` ((n,) or (B, n)); needs :attr:`exact`."""
        if self.columns is not None:
            return self.columns(cols).to(self.logits.dtype)
        from dkd.head.kernels import column_logits
        return column_logits(self.feats, self.head, cols).to(self.logits.dtype)

    def target_position(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) long column of y_b in the row's top-K, K where absent (fixed shape: one
        (B, K) comparison and a max, no nonzero)."""
        hit = self.ids == y.long().unsqueeze(1)
        K = self.k
        col = torch.arange(K, 0, -1, device=hit.device)              # first hit wins
        best = torch.where(hit, col, 0).amax(1)            # no bool -> int64 copy first
        return torch.where(best > 0, K - best, K)


@dataclass(eq=False)
class BlockTeacher:
    """A class-sharded dense teacher: this rank's (B, C_local) block of the teacher logits
    (classes [start, start + C_local)); the KD target's softmax runs over the blocks of
    all ranks with the distributed log-sum-exp, so no (B, C) tensor exists."""

    block: torch.Tensor
    start: int


__all__ = ["TopKTeacher", "BlockTeacher", "completion_logit"]
