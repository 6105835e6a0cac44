"""Evaluation metrics on tensors: top-1, re-ID retrieval (mAP, CMC), next-word top-1 and
perplexity. Pure functions: no I/O, no process-group state (the sharded cross-entropy takes
its group as an argument). Accuracies, mAP and CMC are in percent.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.distributed as dist


def top1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """(N, C) scores or (N,) predicted ids, and (N,) targets -> percent correct."""
    pred = logits.argmax(1) if logits.dim() == 2 else logits
    return 100.0 * float((pred == targets).float().mean()) if len(targets) else 0.0


def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor,
                      metric: Literal["euclidean", "cosine"] = "euclidean") -> torch.Tensor:
    """(Q, d), (G, d) -> (Q, G): squared Euclidean distance, or 1 - cosine similarity."""
    q, g = query.double(), gallery.double()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1 - q @ g.T
    if metric != "euclidean":
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return (q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1) - 2 * q @ g.T).clamp_min(0)


def average_precision(matches: torch.Tensor, mode: Literal["mean", "trapezoid"] = "mean") -> float:
    """AP of one ranked list of relevance flags (G,) bool (at least one True).

    mean: mean of the precision at each true match (torchreid, open-reid, sklearn).
    trapezoid: the official Market-1501 MATLAB code (compute_AP.m): sum over matches of
    the recall step times the mean of the precisions before and at the match.
    """
    hits = torch.nonzero(matches).flatten().double()  # 0-based ranks of the matches
    k = torch.arange(1, len(hits) + 1, dtype=torch.float64)
    precision = k / (hits + 1)
    if mode == "mean":
        return float(precision.mean())
    if mode != "trapezoid":
        raise ValueError(f"mode must be 'mean' or 'trapezoid', got {mode!r}")
    before = torch.where(hits > 0, (k - 1) / hits.clamp_min(1), torch.ones_like(hits))
    return float(((before + precision) / 2).mean())


def _ranked_ap(q_ids: torch.Tensor, q_cams: torch.Tensor, g_ids: torch.Tensor,
               g_cams: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery identities/cameras already sorted per query, (c, G) -> AP (c,) and the
    0-based rank of the first match among the kept images (c,), -1 without a match."""
    same = g_ids == q_ids[:, None]
    junk = (same & (g_cams == q_cams[:, None])) | (g_ids == -1)  # removed from the list
    match = same & ~junk
    pos = torch.cumsum(~junk, 1) - 1  # rank among the kept images (valid where kept)
    k = torch.cumsum(match, 1).double()  # matches up to and including this position
    n = match.sum(1)
    precision = k / (pos + 1).clamp_min(1)
    if mode == "trapezoid":
        before = torch.where(pos > 0, (k - 1) / pos.clamp_min(1), torch.ones_like(k))
        precision = (before + precision) / 2
    elif mode != "mean":
        raise ValueError(f"mode must be 'mean' or 'trapezoid', got {mode!r}")
    ap = (precision * match).sum(1) / n.clamp_min(1)
    big = torch.iinfo(torch.long).max
    first = torch.where(match, pos, torch.full_like(pos, big)).min(1).values
    return ap, torch.where(n > 0, first, torch.full_like(first, -1))


def reid_retrieval(query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                   query_ids: torch.Tensor, query_cams: torch.Tensor,
                   gallery_ids: torch.Tensor, gallery_cams: torch.Tensor, *,
                   metric: Literal["euclidean", "cosine"] = "euclidean", max_rank: int = 10,
                   ap_mode: Literal["mean", "trapezoid"] = "mean",
                   dist_matrix: Optional[torch.Tensor] = None, chunk: int = 256) -> dict:
    """Market-1501 protocol, query vs gallery.

    For each query the gallery is sorted by distance (ascending, stable: ties keep gallery
    order); gallery images of the query's identity taken by the query's camera, and junk
    (identity -1), are removed from its list; the remaining same-identity images are the
    matches (distractors, identity 0, never match). Queries without any match are skipped,
    as in the benchmark code; ``num_valid`` counts the rest.

    Returns {"map": mean AP (%), "rank1": CMC at rank 1 (%), "cmc": (max_rank,) tensor of
    CMC (%) at ranks 1..max_rank, "ap": (Q,) per-query AP (NaN when skipped), "num_valid"}.
    ``dist_matrix`` (Q, G) replaces the feature distances; queries are ranked ``chunk`` at
    a time, so memory is O(chunk * G), not O(Q * G).
    """
    aps = torch.empty(len(query_ids), dtype=torch.float64)
    cmc = torch.zeros(max_rank, dtype=torch.float64)
    valid = 0
    for lo in range(0, len(query_ids), chunk):  # (chunk, G) distances at a time
        rows = slice(lo, min(lo + chunk, len(query_ids)))
        dist_rows = dist_matrix[rows] if dist_matrix is not None else \
            pairwise_distance(query_feats[rows], gallery_feats, metric)
        order = torch.sort(dist_rows, dim=1, stable=True).indices
        dev = order.device  # rank on the features' device; collect on the CPU
        ap, first = _ranked_ap(query_ids[rows].to(dev), query_cams[rows].to(dev),
                               gallery_ids.to(dev)[order], gallery_cams.to(dev)[order], ap_mode)
        ap, first = ap.cpu(), first.cpu()
        ok = first >= 0
        aps[rows] = torch.where(ok, ap, torch.full_like(ap, float("nan")))
        valid += int(ok.sum())
        cmc += (first[ok, None] <= torch.arange(max_rank)).sum(0).double()
    if valid == 0:
        raise ValueError("reid_retrieval: no query has a valid match in the gallery (same "
                         "identity, other camera)")
    return {"map": 100.0 * float(aps.nan_to_num(0).sum()) / valid,
            "rank1": 100.0 * float(cmc[0]) / valid, "cmc": 100.0 * cmc / valid,
            "ap": aps, "num_valid": valid}


def perplexity(mean_ce: float) -> float:
    """Perplexity exp(mean cross-entropy in nats per token); inf when it overflows."""
    try:
        return math.exp(mean_ce)
    except OverflowError:
        return float("inf")


def next_word_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Full (N, V) logits, (N,) next-token ids -> {"top1" (%), "ce" (nats/token), "perplexity"}."""
    ce = float(torch.nn.functional.cross_entropy(logits.double(), targets, reduction="mean"))
    return {"top1": top1(logits, targets), "ce": ce, "perplexity": perplexity(ce)}


def sharded_softmax_rows(logits_local: torch.Tensor, targets: torch.Tensor, start: int,
                         group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (cross-entropy (N,), confidence (N,)) in float64 under logits split by
    class over ranks: CE = LSE − z_y, confidence = max softmax probability = exp(max − LSE).

    logits_local (N, C_local) holds classes [start, start + C_local). Collectives (when the
    group has > 1 rank): all-reduce MAX of the row maxima (N,), then one all-reduce SUM of
    the packed (sum exp, target logit) (2, N). Every rank returns the same tensors.
    """
    z = logits_local.double()
    n, c_local = z.shape
    row_max = z.max(1).values if c_local else z.new_full((n,), float("-inf"))
    multi = group is not None and dist.get_world_size(group) > 1
    if multi:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    local = targets - start
    mine = (local >= 0) & (local < c_local)
    target_logit = z.new_zeros(n)  # (N,) this rank's share: the logit where it owns y
    if c_local:
        picked = z.gather(1, local.clamp(0, c_local - 1)[:, None]).squeeze(1)
        target_logit = torch.where(mine, picked, target_logit)
    packed = torch.stack([(z - row_max[:, None]).exp().sum(1), target_logit])  # (2, N)
    if multi:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    log_sum = packed[0].log()
    return row_max + log_sum - packed[1], torch.exp(-log_sum)


def sharded_cross_entropy_sum(logits_local: torch.Tensor, targets: torch.Tensor, start: int,
                              group=None) -> torch.Tensor:
    """Summed CE (nats) of (N,) targets; see :func:`sharded_softmax_rows`."""
    return sharded_softmax_rows(logits_local, targets, start, group)[0].sum()


ECE_BINS = 15


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     n_bins: int = ECE_BINS) -> torch.Tensor:
    """(3, n_bins) float64 [count, Σ confidence, Σ correct] per equal-width confidence bin
    ((0, 1/n], ..., ((n−1)/n, 1]); bins of several batches add up."""
    conf = confidence.double().flatten()
    idx = (conf * n_bins).ceil().long().clamp_(1, n_bins) - 1
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=conf.device)
    for row, v in enumerate((torch.ones_like(conf), conf, correct.double().flatten())):
        out[row].index_add_(0, idx, v)
    return out


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE in percent: Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over
    :func:`calibration_bins`' bins (the usual 15 equal-width bins of the top-1
    confidence)."""
    count, conf, correct = bins.double().cpu()
    total = float(count.sum())
    if total == 0:
        return float("nan")
    return 100.0 * float((conf - correct).abs().sum()) / total
