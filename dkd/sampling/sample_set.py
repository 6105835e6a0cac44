"""The sample set of one step: which class columns the softmax layer computes, and how.

Every tensor has a shape fixed by the run's settings (B, m, K, top_t): columns that a row
must not use are masked, never removed, so the step has no data-dependent shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("per_sample", "batch_shared", "hybrid")
CORRECTIONS = ("expected", "paper")
# The correction of a masked batch_shared column: finite, so logits/T − o stays finite
# (0 · (−MASKED) is 0 where −inf would give NaN), and large enough that its exponential
# is exactly 0 in float32. The loss then needs no mask pass.
MASKED = 1e30


@dataclass
class SampleSet:
    """Sampled columns of one step.

    classes:        (n,) batch_shared, or (B, n) per_sample / hybrid, int64 global ids.
    log_correction: (n,) or (B, n) float32 o (0 on deterministic columns); the loss uses
                    logits/T − o. Broadcasts against (B, n). batch_shared: MASKED where
                    ``mask`` is False, so the loss needs no separate mask.
    deterministic:  (n,) or (B, n) bool: True for the columns of D (o = 0).
    mask:           None, (n,) or (B, n) bool: False = the column is unused by that row
                    (a repeated D class, a draw that landed in D, a stratified pad slot).
    mode:           "per_sample", "batch_shared" or "hybrid".
    shared_from:    per_sample / hybrid: columns [shared_from:] are the draws (hybrid: the
                    same classes in every row; per_sample: the row's own draws).
    first:          batch_shared: (n,) int64, the first column holding each column's class
                    (masked repeats point to the kept column); None otherwise.
    target_col:     (B,) int64 column of row b's target (None: column 0, per_sample and
                    hybrid, whose D_b starts with y_b).
    """

    classes: torch.Tensor
    log_correction: torch.Tensor
    deterministic: torch.Tensor
    mask: torch.Tensor | None = None
    mode: str = "per_sample"
    shared_from: int | None = None
    first: torch.Tensor | None = None
    target_col: torch.Tensor | None = None

    @property
    def num_columns(self) -> int:
        return int(self.classes.shape[-1])

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick the sampled columns of full (B, C) logits: -> (B, n)."""
        if self.classes.dim() == 1:
            return logits.index_select(1, self.classes)
        return logits.gather(1, self.classes)

    def row_mask(self, batch: int) -> torch.Tensor:
        """(B, n) bool mask (all True without one)."""
        shape = (batch, self.num_columns)
        if self.mask is None:
            return torch.ones(shape, dtype=torch.bool, device=self.classes.device)
        return self.mask.expand(shape)

    def target_mask(self, y: torch.Tensor) -> torch.Tensor:
        """(B, n) bool: the column holding row b's target y_b (exactly one per row)."""
        cls = self.classes if self.classes.dim() == 2 else self.classes.unsqueeze(0)
        hit = (cls == y.long().unsqueeze(1)) & self.deterministic
        return hit if self.mask is None else hit & self.mask


__all__ = ["SampleSet", "MODES", "CORRECTIONS", "MASKED"]
