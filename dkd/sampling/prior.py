"""Class priors π (C,) mixed into a sampled method's shared draws (``method.prior``).

The candidate samplers of sampled-softmax language models draw classes by frequency: the
unigram law (count + 1)^α (α < 1 flattens it; the +1 keeps every class drawable) and the
log-uniform (Zipf) law over frequency ranks, P(f) = log((f + 2) / (f + 1)) / log(C + 1) for
the f-th most frequent class. Mixed into the teacher-rank proposal of batch_shared /
hybrid draws, r = (1 − β)·r̄ + β·π (:func:`dkd.sampling.draw.draw_sample_set`), they cover
frequent classes where a student puts mass that the batch's teacher ranks reach thinly.
The prior is a fixed function of the training labels, computed once, identical on every
rank.
"""
from __future__ import annotations

import math

import torch

PRIORS = ("unigram", "log_uniform")


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


__all__ = ["PRIORS", "label_counts", "class_prior"]
