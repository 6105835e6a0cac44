"""Collectives with autograd, and the distributed log-sum-exp every softmax in dkd uses.

All functions take the process group explicitly. ``group=None`` means "no class sharding":
the collective is the identity and nothing is communicated, so the same math runs in one
process and on P class shards.

Convention for the class-sharded softmax: every rank holds a block of *columns* (classes,
or sampled classes) of the same rows (the global batch). A loss built from these blocks is
*replicated*: every rank computes the identical scalar. Backpropagating that replicated
scalar on every rank must give each rank the gradient of its own columns, so reductions
over columns are "all-reduce forward, identity backward" (Megatron's
``reduce_from_model_parallel_region``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum a tensor over the ranks of ``group``.

    forward:  all-reduce SUM, shape preserved, e.g. (B,) partial sums -> (B,) global sums.
    backward: identity. The output feeds a loss that every rank computes identically, so
              d loss / d local_part = d loss / d global_sum on every rank; summing the
              incoming gradients again would scale them by P.
    """

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-reduce SUM over columns held by different ranks (see module doc)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumIdentityBackward.apply(x, group)


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce MAX, no gradient (used only as a numerical shift inside log-sum-exp)."""
    x = x.detach()
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def logsumexp(x: torch.Tensor, group=None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise log-sum-exp over the columns of ``x`` on all ranks of ``group``.

    x: (B, n_local) column block; returns (B,). Two collectives: MAX of the row maxima
    (no grad), then a differentiable SUM of exp(x - max). Columns set to -inf contribute 0.
    A rank with no columns (n_local = 0) still joins both collectives.
    """
    if x.shape[-1] == 0:
        local_max = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    else:
        local_max = x.detach().amax(dim=-1)
    shift = all_reduce_max(local_max, group)
    # A row that is -inf everywhere would give nan; it cannot occur for a valid softmax.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    sumexp = torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1)
    return shift + torch.log(all_reduce_sum(sumexp, group))


class _GatherRows(torch.autograd.Function):
    """All-gather row blocks (e.g. features) from every rank of ``group`` with autograd.

    forward:  all-gather; (B_local, d) on each rank -> (sum_r B_r, d), rank order. Ranks may
              hold different B_local: sizes are exchanged first, blocks padded to the max.
    backward: every rank's gathered gradient holds the contribution of *its own columns*
              only, so the gradient of rank r's rows is the SUM over ranks of their slice r
              (a reduce-scatter; done as all-reduce + slice so uneven B works on gloo).
              It is then multiplied by ``scale``: the data-parallel engine *averages*
              backbone gradients over P ranks, so the caller passes scale = P to turn that
              average back into the gradient of the replicated loss.
    """

    @staticmethod
    def forward(ctx, x, group, scale, sizes=None):
        if sizes is None:  # one extra collective when the caller does not know them
            mine = torch.tensor([x.shape[0]], device=x.device)
            all_sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(all_sizes, mine, group=group)
            sizes = [int(s.item()) for s in all_sizes]
        # gloo's all_gather needs equal shapes: pad every block to the largest, then trim.
        top = max(sizes)
        padded = x.new_zeros((top,) + tuple(x.shape[1:]))
        padded[:x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded, group=group)
        ctx.group, ctx.scale, ctx.sizes = group, scale, sizes
        return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start:start + ctx.sizes[rank]] * ctx.scale, None, None, None


def gather_rows(x: torch.Tensor, group=None, scale: float = 1.0,
                sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather rows with autograd (see ``_GatherRows``); identity without a group.
    ``sizes``: every rank's row count, when known, saves the size exchange."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherRows.apply(x, group, scale, sizes)


def gather_rows_nograd(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather rows of a tensor that needs no gradient (labels, teacher data, ids)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    with torch.no_grad():
        return _GatherRows.apply(x.detach(), group, 1.0, sizes)


def global_topk(score: torch.Tensor, k: int, start: int, group) -> torch.Tensor:
    """Top-k columns per row over all shards: (B, C_local) local scores -> (B, k) global ids.

    Each rank proposes its local top-min(k, C_local); the candidates are all-gathered
    (B, P*k) and every rank selects the same global top-k.
    Collectives: two all-gathers of (B, k) (values, ids), no gradient.
    """
    kk = min(k, score.shape[1])
    val, idx = score.topk(kk, dim=1)
    return merge_topk(val, idx + start, k, group)[1]


def merge_topk(val: torch.Tensor, idx: torch.Tensor, k: int, group
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, k) descending, global ids (B, k)) of the best of every rank's candidates
    (val, idx (B, k_r), k_r <= k, global ids). Collectives: two all-gathers of (B, k)."""
    if group is not None and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        pad = k - val.shape[1]
        if pad:
            val = torch.cat([val, val.new_full((val.shape[0], pad), float("-inf"))], 1)
            idx = torch.cat([idx, idx.new_zeros((idx.shape[0], pad))], 1)
        vals, idxs = [torch.empty_like(val) for _ in range(world)], [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(vals, val.contiguous(), group=group)
        dist.all_gather(idxs, idx.contiguous(), group=group)
        val, idx = torch.cat(vals, 1), torch.cat(idxs, 1)
    top_val, top = val.topk(k, dim=1)
    return top_val, idx.gather(1, top)


def gather_rows_to_host(x: torch.Tensor, group=None, chunk_rows: int = 65536
                        ) -> torch.Tensor | None:
    """Concatenate every rank's rows of ``x`` (a class shard) on rank 0's *host*; other
    ranks get None. No rank ever holds the whole tensor on its device, and rank 0 holds it
    once, in host memory: chunks of ``chunk_rows`` rows go point to point to rank 0.
    Collectives: one all-gather of the row counts, then send / recv of each chunk."""
    x = x.detach()
    if group is None or dist.get_world_size(group) == 1:
        return x.to("cpu", copy=True)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device), group=group)
    counts = [int(c) for c in counts]
    out = torch.empty(sum(counts), *x.shape[1:], dtype=x.dtype) if rank == 0 else None
    lo = 0
    for src, n in enumerate(counts):
        for c0 in range(0, n, chunk_rows):
            m = min(chunk_rows, n - c0)
            if src == 0 and rank == 0:
                out[lo + c0:lo + c0 + m].copy_(x[c0:c0 + m])
            elif rank == src:
                dist.send(x[c0:c0 + m].contiguous(), dst=dist.get_global_rank(group, 0),
                          group=group)
            elif rank == 0:
                buf = torch.empty(m, *x.shape[1:], dtype=x.dtype, device=x.device)
                dist.recv(buf, src=dist.get_global_rank(group, src), group=group)
                out[lo + c0:lo + c0 + m].copy_(buf)
        lo += n
    return out
