"""The sampled soft-label store's target: K draws from the teacher, not its top K.

A top-K store keeps the K largest teacher logits and spreads the rest of the mass evenly
(the KD-topk completion): a biased target, most of all where the teacher's tail is heavy.
The sampled layout instead draws, per sample, K classes with replacement from the teacher
at the store's temperature tau, p = softmax(a / tau), and keeps the distinct classes with
their draw frequencies p_hat_c = n_c / K. E[p_hat_c] = p_c for every class, so the stored
target is unbiased, and the KD gradient (linear in the target) is unbiased too; it takes
the same K (id, value) slots a top-K store takes.

The frequencies are stored as *logits* l_c = tau * log(p_hat_c), with every other class
(undrawn, including the unused slots) at one floor logit that holds FLOOR_MASS of the mass
in all: softmax(l / tau) is p_hat up to 1e-9, and the store reads as a top-K store of this
sparse teacher — every training path (KD, sampled methods, the completion) uses it as is.
At a distillation temperature T other than tau the target would be p_hat^(tau / T), no
longer unbiased: training refuses that (dkd.teacher.source).
"""
from __future__ import annotations

import math

import torch

FLOOR_MASS = 1e-9   # total mass of the undrawn classes at T = tau


def floor_logit(num_classes: int, tau: float) -> float:
    """The logit of every undrawn class: (C classes at most) hold FLOOR_MASS in all."""
    return tau * (math.log(FLOOR_MASS) - math.log(num_classes))


def sampled_target(logits: torch.Tensor, k: int, tau: float, u: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits (B, C), uniforms u (B, k) -> (ids (B, k) int64, values (B, k) float32,
    lse (B,), tail_lse (B,)): the drawn classes by frequency, descending (ties and unused
    slots: by teacher logit), values tau * log(n_c / k) and the floor for unused slots;
    lse / tail_lse the log-sum-exp (T = 1) of all C stored logits and of the C - k outside
    the slots. Draws invert each row's CDF at u (:func:`dkd.sampling.rng.row_uniforms`
    keys them by sample, so the store's bytes do not depend on batches or processes)."""
    B, C = logits.shape
    a = logits.float()
    cdf = torch.softmax(a.double() / tau, 1).cumsum(1)
    draws = torch.searchsorted(cdf, u.double() * cdf[:, -1:]).clamp_(max=C - 1)  # (B, k)
    counts = torch.zeros(B, C, dtype=torch.float64, device=a.device)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    # Counts are integers, so adding a share of the teacher's probability below 1/2 orders
    # equal counts (and the undrawn fill of unused slots) by the teacher without reordering
    # different counts.
    score = counts + 0.5 * torch.softmax(a.double(), 1)
    ids = score.topk(k, dim=1).indices                                          # (B, k)
    n = counts.gather(1, ids)
    floor = floor_logit(C, tau)
    values = torch.where(n > 0, tau * torch.log(n.clamp_min(1) / k), floor).float()
    tail_lse = torch.full((B,), floor + math.log(C - k) if C > k else float("-inf"),
                          dtype=torch.float64, device=a.device)
    lse = torch.logsumexp(torch.cat([values.double(), tail_lse.unsqueeze(1)], 1), 1)
    return ids, values, lse.float(), tail_lse.float()


__all__ = ["FLOOR_MASS", "floor_logit", "sampled_target"]
