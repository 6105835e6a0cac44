"""The importance-sampled KD estimator (DESIGN.md, "The estimator").

On the sampled columns only: ŝ = z/T - o, t̂ = a/T - o, p̂ = softmax(t̂), and
L̂ = -sum_i p̂_i log softmax(ŝ)_i, whose gradient is dL̂/dz_i = (q̂_i - p̂_i)/T: the paper's
Algorithm 1 (h/U - g/V). The hard-label CE at T = 1 uses the same columns and the same
corrections: CE = LSE(z - o) - z_y (the target column has o = 0). Nothing here ever sees
the B x C student logits; the column blocks may be shards of the sampled set on the ranks
of ``group``.
"""
from __future__ import annotations

import torch

from dkd.losses.softmax import _check_temperature, fused_softmax_ce, mix
from dkd.sampling.sampler import SampleSet


def sampled_kd_terms(student_cols: torch.Tensor, teacher_cols: torch.Tensor,
                     log_correction: torch.Tensor, T: float,
                     target_cols: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, group=None) -> dict[str, torch.Tensor]:
    """Per-row sampled KD and CE terms.

    student_cols: (B, n) raw student logits z at the sampled columns (with grad).
    teacher_cols: (B, n) raw teacher logits a at the same columns (no grad needed).
    log_correction: (B, n) or (n,) o (0 on deterministic columns).
    target_cols: optional (B, n) bool, True on the column of each row's target (all False
        on a rank that does not hold it); gives the "ce" term.
    mask: optional (B, n) bool of columns used by each row.
    Returns {"kd": (B,), "ce": (B,)} in nats, no T^2 factor.
    """
    _check_temperature(T)
    o = log_correction.to(student_cols.dtype).expand_as(student_cols)
    if mask is not None:
        o = o.masked_fill(~mask, 0.0)       # masked o may be junk; keep arithmetic finite
    t_hat = teacher_cols.detach().to(student_cols.dtype) / T - o
    # p̂ = softmax(t̂) is formed inside the fused call: both terms cost two collectives.
    entries = {"kd": (student_cols / T - o, t_hat, True)}
    if target_cols is not None:
        onehot = target_cols.to(student_cols.dtype).expand_as(student_cols)
        entries["ce"] = (student_cols - o, onehot, False)
    return fused_softmax_ce(entries, group, mask)


def sampled_student_logits(features: torch.Tensor, weight: torch.Tensor,
                           sample_set: SampleSet) -> torch.Tensor:
    """Student logits on the sampled columns only: features (B, d), weight (C, d) -> (B, n).

    batch_shared: one (B, d) x (d, n) product over the gathered rows. per_sample: every row
    has its own columns, so the rows are gathered per sample, (B, n, d), and contracted.
    """
    cls = sample_set.classes
    if cls.dim() == 1:
        return features @ weight.index_select(0, cls).t()
    w = weight[cls]                                               # (B, n, d)
    return torch.einsum("bd,bnd->bn", features, w)


def sampled_kd_reference(features: torch.Tensor, weight: torch.Tensor,
                         teacher_logits: torch.Tensor, y: torch.Tensor,
                         sample_set: SampleSet, T: float, lam: float) -> dict:
    """Single-process reference of the whole sampled loss (plain autograd).

    features (B, d), weight (C, d), teacher_logits (B, C), y (B,). Returns mix()'s dict
    ({"loss", "kd", "ce"}) plus "student_cols" (B, n), the sampled logits, so callers can
    take gradients with respect to them.
    """
    z = sampled_student_logits(features, weight, sample_set)
    a = sample_set.gather(teacher_logits)
    o = sample_set.log_correction
    tgt = sample_set.target_mask(y) if lam < 1.0 else None
    terms = sampled_kd_terms(z, a, o, T, tgt, sample_set.mask)
    out = mix(terms, lam, T)
    out["student_cols"] = z
    return out
