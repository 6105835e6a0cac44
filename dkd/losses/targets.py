"""Teacher target distributions over all C classes: (B, C) in, (B, C) out, rows sum to 1.

The variants are those of Tang et al. 2020, "Understanding and Improving Knowledge
Distillation", which separate what a teacher transfers: a uniform prior (label smoothing),
an instance-specific confidence on the true class (KD-pt), class relationships (KD-sim),
and the teacher's head with a flat tail (KD-topk). All are pure functions of their inputs;
the caller passes the student-side temperature separately to the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _fp(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted to float32; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_T(T: float, name: str = "T") -> None:
    if not T > 0:
        raise ValueError(f"{name} (temperature) must be > 0, got {T}")


def _check_logits_labels(logits: torch.Tensor, y: torch.Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (B, C), got shape {tuple(logits.shape)}")
    if y is not None and y.shape != logits.shape[:1]:
        raise ValueError(f"y must be (B,) = ({logits.shape[0]},), got {tuple(y.shape)}")


def kd_target(teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Hinton's soft target softmax(a / T): (B, C) -> (B, C)."""
    _check_T(T)
    _check_logits_labels(teacher_logits, None)
    return torch.softmax(_fp(teacher_logits) / T, dim=-1)


def label_smoothing_target(y: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """(1 - eps) * onehot(y) + eps / C: (B,) -> (B, C). eps in [0, 1]."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    onehot = F.one_hot(y.long(), num_classes).to(torch.get_default_dtype())
    return (1.0 - eps) * onehot + eps / num_classes


def kd_pt_target(teacher_logits: torch.Tensor, y: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KD-pt ("partial teacher"): keep only the teacher's probability on the true class.

    p_y = softmax(a/T)_y stays on y; the other 1 - p_y is spread uniformly over the C - 1
    other classes. This is label smoothing with an instance-specific eps, so it transfers
    the teacher's confidence but no class relationships. (B, C), (B,) -> (B, C).
    """
    p = kd_target(teacher_logits, T)
    _check_logits_labels(teacher_logits, y)
    C = p.shape[-1]
    p_y = p.gather(1, y.long().unsqueeze(1))                      # (B, 1)
    out = ((1.0 - p_y) / (C - 1)).expand(-1, C).clone()
    out.scatter_(1, y.long().unsqueeze(1), p_y)
    return out


def kd_sim_target(teacher_weight: torch.Tensor, y: torch.Tensor, tau: float = 0.1,
                  power: float = 1.0) -> torch.Tensor:
    """KD-sim: a target built only from class relationships in the teacher's last layer.

    Exact formula used here (Tang et al. give the idea; the mapping to [0, 1] and the
    power are this implementation's choice):
        s_c   = cos(w_y, w_c)                     cosine of teacher head rows, in [-1, 1]
        p_c   = softmax_c( ((1 + s_c) / 2) ** power / tau )
    tau > 0 is a temperature (smaller = sharper), power > 0 sharpens the similarity before
    the softmax (larger = only the nearest classes get mass). The true class has s = 1,
    so it is always the mode.
    teacher_weight: (C, d); y: (B,) -> (B, C).
    """
    _check_T(tau, "tau")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    w = F.normalize(_fp(teacher_weight), dim=-1)               # (C, d)
    sim = w[y.long()] @ w.t()                                     # (B, C)
    sim01 = ((1.0 + sim) / 2.0).clamp(0.0, 1.0)
    return torch.softmax(sim01.pow(power) / tau, dim=-1)


def kd_pt_sim_target(teacher_logits: torch.Tensor, teacher_weight: torch.Tensor,
                     y: torch.Tensor, alpha: float = 0.5, T: float = 1.0, tau: float = 0.1,
                     power: float = 1.0) -> torch.Tensor:
    """KD-pt+sim: alpha * KD-pt + (1 - alpha) * KD-sim, alpha in [0, 1]. -> (B, C)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (alpha * kd_pt_target(teacher_logits, y, T)
            + (1.0 - alpha) * kd_sim_target(teacher_weight, y, tau, power))


def kd_topk_target(teacher_logits: torch.Tensor, k: int, T: float = 1.0) -> torch.Tensor:
    """KD-topk: the teacher's k largest probabilities kept, the rest spread uniformly.

    The remaining mass 1 - sum(top-k) is divided evenly over the other C - k classes, so
    the teacher's head is exact and its tail carries no ranking. 1 <= k < C. -> (B, C).
    """
    p = kd_target(teacher_logits, T)
    C = p.shape[-1]
    if not 1 <= k < C:
        raise ValueError(f"k must satisfy 1 <= k < C = {C}, got {k}")
    top_p, top_i = p.topk(k, dim=-1)                              # (B, k)
    rest = (1.0 - top_p.sum(-1, keepdim=True)).clamp_min(0.0) / (C - k)
    out = rest.expand(-1, C).clone()
    out.scatter_(1, top_i, top_p)
    return out


TARGETS = ("kd", "ls", "kd_pt", "kd_sim", "kd_pt_sim", "kd_topk")
