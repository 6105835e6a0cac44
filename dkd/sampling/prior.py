"""Class priors π (C,) mixed into a sampled method's shared draws (``method.prior``).

The candidate samplers of sampled-softmax language models draw classes by frequency: the
unigram law (count + 1)^α (α < 1 flattens it; the +1 keeps every class drawable) and the
log-uniform (Zipf) law over frequency ranks, P(f) = log((f + 2) / (f + 1)) / log(C + 1) for
the f-th most frequent class. Mixed into the teacher-rank proposal of batch_shared /
hybrid draws, r = (1 − β)·r̄ + β·π (:func:`dkd.sampling.draw.draw_sample_set`), they cover
frequent classes where a student puts mass that the batch's teacher ranks reach thinly.
The frequency priors are fixed functions of the training labels, computed once, identical
on every rank. The *student* prior (:class:`StudentPrior`) follows where the student puts
mass instead, from statistics the step already has.
"""
from __future__ import annotations

import math

import torch

PRIORS = ("unigram", "log_uniform", "student")


def label_counts(split, num_classes: int, chunk: int = 65536) -> torch.Tensor:
    """(C,) int64 count of each class among a training split's labels (its ``labels()``
    when it has one, else its samples read in chunks)."""
    if hasattr(split, "labels"):
        y = split.labels()
    else:
        y = torch.cat([split.get(torch.arange(i, min(i + chunk, len(split))))[1]
                       for i in range(0, len(split), chunk)])
    y = y.long().reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, "
                         f"{int(y.max())}]")
    return torch.bincount(y, minlength=num_classes)


def class_prior(kind: str, counts: torch.Tensor, alpha: float = 0.75) -> torch.Tensor:
    """(C,) float64 prior π of ``kind`` (unigram | log_uniform) from class counts (C,)."""
    counts = counts.double()
    if kind == "unigram":
        if not alpha > 0:
            raise ValueError(f"prior_alpha must be > 0, got {alpha}")
        w = (counts + 1.0) ** alpha
    elif kind == "log_uniform":
        C = counts.numel()
        # frequency rank f of each class (ties by class id: a stable sort)
        order = torch.sort(counts, descending=True, stable=True).indices
        f = torch.empty(C, dtype=torch.float64).scatter_(
            0, order, torch.arange(C, dtype=torch.float64))
        w = torch.log((f + 2.0) / (f + 1.0)) / math.log(C + 1.0)
    else:
        raise ValueError(f"unknown prior {kind!r}; expected one of {PRIORS}")
    return w / w.sum()


class StudentPrior:
    """π_s (C,): where the student has recently put its mass, as a class law.

    State s (C,) float64, starting at 1/C: per class an average of q̄(c), the batch mean of
    the student's softmax at T = 1, over the steps whose shared columns held c. A step
    computes q̄ at its shared columns from logits it already has, with the sampled
    estimate of each row's log-partition (log Σ_j exp(z_bj − o_bj)), and moves each
    observed class by s_c ← decay·s_c + (1 − decay)·q̄(c). The law mixes a uniform floor
    in, π_s = (1 − FLOOR)·s / Σs + FLOOR / C, so every class stays drawable and a class
    the student starts to favour is found. On a sharded head every rank sums the q̄ of its
    own columns (one all-reduce of (n,)), so every rank holds the same s.
    """

    FLOOR = 0.1

    def __init__(self, num_classes: int, decay: float, device=None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"prior_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.s = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64,
                            device=device)

    def law(self, beta: float, device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(π_s, cumsum(π_s), β) on ``device``: the prior tuple of the step's draws."""
        if self.s.device != torch.device(device):
            self.s = self.s.to(device)
        C = self.s.numel()
        pi = self.s * ((1.0 - self.FLOOR) / self.s.sum()) + self.FLOOR / C
        return pi, pi.cumsum(0), float(beta)

    def observe(self, classes: torch.Tensor, qbar: torch.Tensor, valid: torch.Tensor) -> None:
        """Move the observed classes (n,) toward their q̄ (n,); ``valid`` (n,) marks one
        column per class (repeats False), so the update is one index_add of deltas."""
        old = self.s.index_select(0, classes)
        delta = torch.where(valid, (1.0 - self.decay) * (qbar.double() - old), 0.0)
        self.s.index_add_(0, classes, delta)

    def state_dict(self) -> dict:
        return {"s": self.s.detach().cpu().clone(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state["s"].shape != self.s.shape:
            raise ValueError(f"student prior state has {state['s'].shape[0]} classes, "
                             f"expected {self.s.shape[0]}")
        self.s = state["s"].to(self.s.device, torch.float64).clone()


__all__ = ["PRIORS", "label_counts", "class_prior", "StudentPrior"]
