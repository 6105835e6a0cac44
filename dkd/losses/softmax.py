"""Softmax cross-entropy on column blocks: the two primitives every dkd loss is built from.

A "column block" is a (B, n) slice of the columns (classes, or sampled classes) of the
same B rows; with class sharding each rank of ``group`` holds a different block. Every
normaliser goes through :func:`dkd.dist.functional.logsumexp`, so the same code computes
the single-process loss (``group=None``) and the replicated loss of P column shards.

``mask`` (B, n) or (n,) bool, where given, marks the columns that exist for a row: a False
column is treated as a -inf logit with zero target mass (padding, a duplicate of a
deterministic class, a draw rejected for that row).
"""
from __future__ import annotations

import torch

from dkd.dist.functional import all_reduce_max, all_reduce_sum, logsumexp


def _check_temperature(T: float) -> None:
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def _masked(x: torch.Tensor, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    if mask is None:
        return x
    return x.masked_fill(~mask.expand_as(x), fill)


def softmax_ce(student_cols: torch.Tensor, target_probs: torch.Tensor, group=None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row cross-entropy -sum_c p_c log softmax(s)_c over the columns of all ranks.

    student_cols: (B, n) logits (already divided by T / corrected, as the caller wants).
    target_probs: (B, n) target mass on these columns; the rows sum to 1 over all ranks.
    Returns (B,) in nats. Written as LSE_g(s) - sum_g(p . s), which equals the CE because
    sum_c p_c = 1; it never materialises log-probabilities of masked columns.
    """
    if student_cols.shape != target_probs.shape:
        raise ValueError("target_probs must have the shape of student_cols "
                         f"{tuple(student_cols.shape)}, got {tuple(target_probs.shape)}")
    lse = logsumexp(_masked(student_cols, mask, float("-inf")), group)
    # Fill masked logits with 0 (not -inf) in the cross term: 0 * -inf would be nan.
    cross = (_masked(target_probs, mask, 0.0) * _masked(student_cols, mask, 0.0)).sum(-1)
    return lse - all_reduce_sum(cross, group)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 0:  # a rank may own none of the sampled columns
        return x.new_full(x.shape[:-1], float("-inf"))
    return x.detach().amax(-1)


def fused_softmax_ce(entries: dict, group=None,
                     mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Several per-row softmax cross-entropies over the same columns, in TWO collectives.

    entries: name -> (student_cols (B, n), target (B, n), target_is_logits). A target given
    as probabilities is used as is; one given as logits t is turned into softmax(t) over
    all ranks' columns (the sampled teacher). Returns name -> (B,) in nats, equal to
    ``softmax_ce(s, p)`` for each entry.

    Collectives: one all-reduce MAX of every row maximum (stacked (k, B), no grad), then one
    all-reduce SUM (identity backward) of every partial sum, stacked: sum exp(s - m_s),
    sum exp(t - m_t) and the cross term sum w * s, with w = p or exp(t - m_t). Packing
    matters on P ranks: per-collective latency, not bytes, dominates at these sizes.
    """
    cols, maxima = {}, []
    for name, (s_cols, target, is_logits) in entries.items():
        s_m = _masked(s_cols, mask, float("-inf"))
        t_m = _masked(target.detach(), mask, float("-inf")) if is_logits else None
        cols[name] = (s_m, t_m)
        maxima += [_row_max(s_m)] + ([_row_max(t_m)] if is_logits else [])
    shift = all_reduce_max(torch.stack(maxima), group)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    parts, i = [], 0
    for name, (s_cols, target, is_logits) in entries.items():
        s_m, t_m = cols[name]
        parts.append(torch.exp(s_m - shift[i].unsqueeze(-1)).sum(-1))
        if is_logits:
            w = torch.exp(t_m - shift[i + 1].unsqueeze(-1))
            parts.append(w.sum(-1))
        else:
            w = _masked(target.detach(), mask, 0.0)
        parts.append((w * _masked(s_cols, mask, 0.0)).sum(-1))
        i += 2 if is_logits else 1
    sums = all_reduce_sum(torch.stack(parts), group)
    out, i, j = {}, 0, 0
    for name, (_, _, is_logits) in entries.items():
        lse = shift[i] + torch.log(sums[j])
        cross = sums[j + 2] / sums[j + 1].detach() if is_logits else sums[j + 1]
        out[name] = lse - cross
        i, j = i + (2 if is_logits else 1), j + (3 if is_logits else 2)
    return out


def softmax_probs(logit_cols: torch.Tensor, group=None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the columns of all ranks, returned for the local block: (B, n) -> (B, n).

    Masked columns get probability exactly 0.
    """
    x = _masked(logit_cols, mask, float("-inf"))
    return torch.exp(x - logsumexp(x, group).unsqueeze(-1))


def target_onehot(y: torch.Tensor, num_cols: int, col_start: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot (B, num_cols) of labels y (B,) for the columns [col_start, col_start+num_cols).

    A label outside this block gives an all-zero row: another rank holds that column, and
    the all-reduce in :func:`softmax_ce` adds its term there.
    """
    local = y.long() - col_start
    inside = (local >= 0) & (local < num_cols)
    out = torch.zeros(y.shape[0], num_cols, dtype=dtype, device=y.device)
    rows = torch.nonzero(inside).squeeze(-1)
    out[rows, local[rows]] = 1.0
    return out


def full_kd_terms(student_cols: torch.Tensor, target_probs: torch.Tensor | None,
                  y: torch.Tensor | None, T: float, group=None, col_start: int = 0,
                  mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-row KD and hard-label CE terms on a block of (all or sharded) class columns.

    student_cols: (B, C_local) student logits z for classes [col_start, col_start+C_local).
    target_probs: (B, C_local) teacher target distribution on the same columns (for KD this
        is softmax(a/T) from :mod:`dkd.losses.targets`); None skips the KD term.
    y: (B,) global class ids; None skips the CE term.
    Returns {"kd": (B,) -sum p log softmax(z/T), "ce": (B,) CE(z, y) at T = 1} in nats,
    without the T^2 factor (that lives in :func:`mix`).
    """
    _check_temperature(T)
    entries = {}
    if target_probs is not None:
        entries["kd"] = (student_cols / T, target_probs, False)
    if y is not None:
        onehot = target_onehot(y, student_cols.shape[-1], col_start, student_cols.dtype)
        entries["ce"] = (student_cols, onehot, False)
    return fused_softmax_ce(entries, group, mask) if entries else {}


def mix(terms: dict[str, torch.Tensor], lam: float, T: float,
        valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Hinton's mixed objective: loss = lam * T^2 * mean(kd) + (1 - lam) * mean(ce).

    terms: {"kd": (B,), "ce": (B,)}; a term whose weight is 0 may be absent.
    valid: optional (B,) bool; only those rows enter the means (padding rows of a batch).
    Returns {"loss": scalar with grad, "kd": scalar, "ce": scalar} (the last two detached,
    for logging; NaN when absent).
    """
    _check_temperature(T)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")

    def mean(x: torch.Tensor) -> torch.Tensor:
        if valid is None:
            return x.mean()
        w = valid.to(x.dtype)
        return (x * w).sum() / w.sum().clamp_min(1.0)

    out: dict[str, torch.Tensor] = {}
    loss = None
    for name, weight in (("kd", lam * T * T), ("ce", 1.0 - lam)):
        if name not in terms:
            if weight != 0.0:
                raise ValueError(f"terms lacks '{name}' but its weight is {weight}")
            continue
        m = mean(terms[name])
        out[name] = m.detach()
        if weight != 0.0:
            loss = weight * m if loss is None else loss + weight * m
    out["loss"] = loss
    for name in ("kd", "ce"):
        out.setdefault(name, torch.tensor(float("nan")))
    return out
