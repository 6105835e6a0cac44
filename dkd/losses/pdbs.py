"""PDBS: KD over the k classes where teacher and student disagree most.

Per sample, the k classes with the largest |p_c - q_c| (p = softmax(a/T), q = softmax(z/T))
are kept, the target always among them, with no correction (o = 0): a deterministic,
biased baseline. It needs the full (B, C) student softmax to choose, so it saves nothing
in the forward pass; its value is as a baseline and as the source of the rank statistics
(:mod:`dkd.sampling.rank_stats`) that an adaptive proposal fits. Selection is
single-process (the top-k over sharded columns is not implemented).
"""
from __future__ import annotations

import torch

from dkd.losses.sampled import sampled_kd_terms
from dkd.losses.softmax import _check_temperature, mix
from dkd.sampling.proposals import teacher_ranking
from dkd.sampling.sample_set import SampleSet


def pdbs_select(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                y: torch.Tensor, k: int, T: float,
                ranks: torch.Tensor | None = None) -> tuple[SampleSet, torch.Tensor]:
    """Choose the PDBS set. (B, C), (B, C), (B,) -> (SampleSet with (B, k) classes,
    (B, k) 1-based teacher ranks of the chosen classes). Column 0 is the target.
    ranks: optional precomputed 0-based ranks, ``teacher_ranking(teacher_logits)[1]``."""
    _check_temperature(T)
    B, C = student_logits.shape
    if not (isinstance(k, int) and 1 <= k < C):
        raise ValueError(f"k must be an int with 1 <= k < C = {C}, got {k!r}")
    with torch.no_grad():
        p = torch.softmax(teacher_logits / T, dim=-1).float()
        q = torch.softmax(student_logits / T, dim=-1).float()
        score = (p - q).abs()
        # +inf pins the target into the set (and to column 0, topk sorts descending).
        score.scatter_(1, y.long().unsqueeze(1), float("inf"))
        classes = score.topk(k, dim=-1).indices                   # (B, k)
        if ranks is None:
            ranks = teacher_ranking(teacher_logits)[1]
        ranks = ranks.gather(1, classes) + 1
    sample_set = SampleSet(
        classes=classes,
        log_correction=torch.zeros(classes.shape, device=classes.device),
        deterministic=torch.ones_like(classes, dtype=torch.bool),
        mask=None, mode="per_sample")
    return sample_set, ranks


def pdbs_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
              k: int, T: float, lam: float = 1.0, ranks: torch.Tensor | None = None) -> dict:
    """PDBS loss from full student logits (B, C) (with grad).

    Returns mix()'s {"loss", "kd", "ce"} plus "classes" (B, k) and "ranks" (B, k), the
    1-based teacher ranks of the chosen classes (feed them to RankHistogram.update).
    """
    sample_set, ranks = pdbs_select(student_logits, teacher_logits, y, k, T, ranks)
    z = student_logits.gather(1, sample_set.classes)
    a = teacher_logits.gather(1, sample_set.classes)
    tgt = sample_set.target_mask(y) if lam < 1.0 else None
    terms = sampled_kd_terms(z, a, sample_set.log_correction, T, tgt)
    out = mix(terms, lam, T)
    out["classes"], out["ranks"] = sample_set.classes, ranks
    return out
