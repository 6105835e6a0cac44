"""Held-out evaluation with a class-sharded head.

- classification: top-1; each rank scores its own classes and the global argmax is picked
  from the all-gathered per-rank maxima;
- re-ID (Market-1501): query-vs-gallery retrieval on backbone features (the head is not
  used), mean average precision and CMC rank-1, standard protocol;
- every classification run (text included): perplexity exp(mean cross-entropy) and the
  expected calibration error of the top-1 confidence (15 equal-width bins), both from the
  full softmax summed over the class shards.
Every rank runs the (replicated) backbone on every sample; results are identical on all
ranks.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dkd.metrics import (calibration_bins, expected_calibration_error, reid_retrieval,
                         sharded_softmax_rows)


def sharded_argmax(logits_local: torch.Tensor, start: int, group) -> torch.Tensor:
    """(N, C_local) local logits -> (N,) global argmax class ids over all shards."""
    if logits_local.shape[1] == 0:
        val = logits_local.new_full((logits_local.shape[0],), float("-inf"))
        idx = torch.zeros(logits_local.shape[0], dtype=torch.long, device=logits_local.device)
    else:
        val, idx = logits_local.max(dim=1)
    idx = idx + start
    if group is None or dist.get_world_size(group) == 1:
        return idx
    world = dist.get_world_size(group)
    vals = [torch.empty_like(val) for _ in range(world)]
    idxs = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(vals, val.contiguous(), group=group)
    dist.all_gather(idxs, idx.contiguous(), group=group)
    best = torch.stack(vals, 1).argmax(1, keepdim=True)  # first rank wins ties: lowest id
    return torch.stack(idxs, 1).gather(1, best).squeeze(1)


def _batches(split, batch_size: int):
    for lo in range(0, len(split), batch_size):
        idx = torch.arange(lo, min(lo + batch_size, len(split)))
        yield split.get(idx)


def _features(backbone, x: torch.Tensor, device, cast: bool) -> torch.Tensor:
    dtype = next(backbone.parameters()).dtype  # bf16 engines hold bf16 weights
    x = x.to(device, dtype=dtype) if cast else x.to(device)
    return backbone(x).float()


@torch.no_grad()
def _classify(backbone, weight, start, split, device, batch_size, group, cast):
    correct, total, ce, bins = 0, 0, 0.0, 0.0
    for x, y in _batches(split, batch_size):
        logits = _features(backbone, x, device, cast) @ weight.T.float()
        y = y.to(device)
        hit = sharded_argmax(logits, start, group) == y
        correct += int(hit.sum())
        total += len(y)
        row_ce, conf = sharded_softmax_rows(logits, y, start, group)
        ce += float(row_ce.sum())
        bins = bins + calibration_bins(conf, hit).cpu()
    return {"top1": 100.0 * correct / max(1, total),
            "perplexity": math.exp(min(ce / max(1, total), 700.0)),
            "ece": expected_calibration_error(bins) if total else float("nan")}


@torch.no_grad()
def _reid(backbone, data, device, batch_size, cast):
    feats = {name: torch.cat([_features(backbone, x, device, cast).cpu()
                              for x, _ in _batches(getattr(data, name), batch_size)])
             for name in ("query", "gallery")}
    res = reid_retrieval(feats["query"], feats["gallery"], data.query.ids, data.query.cams,
                         data.gallery.ids, data.gallery.cams)
    return {"map": res["map"], "rank1": res["rank1"], "top1": res["rank1"]}


def evaluate(backbone: torch.nn.Module, weight: torch.Tensor, start: int, data,
             device: torch.device, batch_size: int, group=None) -> dict:
    """Metrics of backbone + head shard on the held-out split(s), in percent (perplexity:
    per sample). Keys: top1 always; map, rank1 for re-ID; perplexity and ece (%) for every
    classification run."""
    was_training = backbone.training
    backbone.eval()
    cast = data.task != "text"  # token ids must stay exact (bf16 rounds ids above 256)
    try:
        if data.task == "reid":
            return _reid(backbone, data, device, batch_size, cast)
        return _classify(backbone, weight, start, data.test, device, batch_size, group, cast)
    finally:
        backbone.train(was_training)
