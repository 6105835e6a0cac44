"""A live teacher sharded by class, like the student's head (`teacher.sharded: true`).

Each rank keeps only the teacher head rows of its own classes [start, end) (read from a
memory-mapped model.pt, so the full C x d_t head is never resident). Per step: the backbone
runs on this rank's rows, the features are all-gathered once (B, d_t), and each rank forms
teacher logits for its own classes only. What the methods need is merged across shards:

- the top-K and log-sum-exp (sampled methods): local top-K, one all-gather of the (B, K)
  candidates and a select; the log-sum-exp from the shards' (B,) partial ones;
- the exact teacher logit at sampled columns: each owner fills its columns, one all-reduce;
- the dense teacher (kd): only this rank's (B, C_local) block, whose softmax uses the
  distributed log-sum-exp. No (B, C) teacher tensor is formed or gathered anywhere.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from dkd.config import ModelConfig
from dkd.dist.functional import gather_rows_nograd, merge_topk
from dkd.head.kernels import column_logits
from dkd.models import build_backbone
from dkd.teacher.live import load_model_file
from dkd.teacher.select import head_topk

# Methods whose targets the class-sharded teacher can serve from its blocks.
SHARDED_TEACHER_METHODS = ("kd", "uniform", "ftis", "dis")


class ShardedTeacher:
    def __init__(self, path: str | Path, num_classes: int, input_dim: int, device,
                 start: int, end: int, group, input_shape=None, vocab_size=None):
        path, blob = load_model_file(path, num_classes, input_dim, mmap=True)
        self.backbone = build_backbone(ModelConfig.model_validate(blob["model"]), input_dim,
                                       blob.get("input_shape", input_shape),
                                       blob.get("vocab_size", vocab_size))
        self.backbone.load_state_dict(blob["backbone"])
        self.backbone.to(device).eval()
        # only this rank's rows become resident (a copy out of the memory map)
        self.head_local = blob["head"][start:end].float().to(device, copy=True)
        self.start, self.end, self.group, self.C = start, end, group, num_classes
        self.head_weight = None   # no rank holds the full head (kd_sim needs it: refused)
        self.path = path

    @torch.no_grad()
    def features(self, x_local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, d_t) teacher features of the global batch: one all-gather."""
        return gather_rows_nograd(self.backbone(x_local).float(), self.group, sizes)

    @torch.no_grad()
    def block(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C_local) teacher logits of this rank's classes."""
        return f @ self.head_local.T

    @torch.no_grad()
    def topk(self, f: torch.Tensor, k: int):
        """(ids (B, k), logits (B, k), lse (B,)) over all C classes, from every shard.
        Collectives: two all-gathers of (B, k), one all-gather of (B,)."""
        kk = min(k, self.head_local.shape[0])
        vals, ids, lse = head_topk(f, self.head_local, kk)
        vals, ids = merge_topk(vals, ids + self.start, k, self.group)
        return ids, vals, shard_lse(lse, self.group)

    @torch.no_grad()
    def column_logits(self, f: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Exact teacher logits at global columns ``cols`` ((n,) or (B, n)): each rank fills
        the columns it owns. Collective: one all-reduce SUM of the result."""
        own = (cols >= self.start) & (cols < self.end)
        local = torch.where(own, cols - self.start, 0)
        out = torch.where(own, column_logits(f, self.head_local, local), 0.0)
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(out, group=self.group)
        return out

    @torch.no_grad()
    def encode_rows(self, split, b0: int, b1: int, plan, device) -> dict | None:
        """`dkd relabel` with the class-sharded teacher: the top-K store rows of samples
        [b0, b1) (ids, logits, lse, tail_lse), on rank 0 (None elsewhere). This rank feeds its
        rows of the batch; the top-K, the log-sum-exp and the tail's log-sum-exp are merged
        across shards (collectives: as :meth:`topk`, plus one all-gather of (B,))."""
        from dkd.data import local_slice
        from dkd.dist.functional import group_rank, group_size
        from dkd.teacher.select import row_topk

        n, world = b1 - b0, group_size(self.group)
        mine = torch.arange(b0, b1)[local_slice(n, world, group_rank(self.group))]
        sizes = [len(range(n)[local_slice(n, world, r)]) for r in range(world)]
        x, _ = split.get(mine)
        f = self.features(x.to(device), sizes)
        z = self.block(f)                                                  # (B, C_local)
        kk = min(plan.k, z.shape[1])
        vals, ids = row_topk(z, kk)
        vals, ids = merge_topk(vals, ids + self.start, plan.k, self.group)
        lse = shard_lse(z.logsumexp(1), self.group)
        own = (ids >= self.start) & (ids < self.end)
        hits = torch.zeros(z.shape, dtype=torch.int32, device=z.device)
        hits.scatter_add_(1, torch.where(own, ids - self.start, 0), own.int())  # this shard's top-K
        tail = shard_lse(z.masked_fill(hits > 0, float("-inf")).logsumexp(1), self.group)
        if group_rank(self.group) != 0:
            return None
        return {"ids": ids.cpu().numpy().astype(plan.ids_dtype),
                "logits": vals.to(getattr(torch, plan.logits_dtype)).cpu().numpy(),
                "lse": lse.cpu().numpy(), "tail_lse": tail.cpu().numpy()}


def shard_lse(lse: torch.Tensor, group) -> torch.Tensor:
    """(B,) log-sum-exp over all classes from each shard's (B,) log-sum-exp."""
    if group is None or dist.get_world_size(group) == 1:
        return lse
    parts = [torch.empty_like(lse) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, lse.contiguous(), group=group)
    return torch.logsumexp(torch.stack(parts), 0)


def sharded_teacher_batch(teacher: ShardedTeacher, x_local: torch.Tensor, sizes: list[int],
                          k: int, exact: bool):
    """The layer's teacher of the global batch from a class-sharded teacher: a TopKTeacher
    (k > 0: the merged top-k, exact columns through the owners when ``exact``) or, for kd,
    this rank's BlockTeacher."""
    from dkd.sampling.teacher_batch import BlockTeacher, TopKTeacher, completion_logit

    f = teacher.features(x_local, sizes)
    if not k:
        return BlockTeacher(teacher.block(f), teacher.start)
    ids, vals, lse = teacher.topk(f, k)
    return TopKTeacher(ids, vals, lse, teacher.C, rest=completion_logit(vals, lse, teacher.C),
                       columns=(lambda cols: teacher.column_logits(f, cols)) if exact else None)
