"""What keeps a run from training on garbage: non-finite checks of every micro-step, and
batch-norm running statistics averaged over ranks where the model is evaluated or saved."""
from __future__ import annotations

import torch
import torch.distributed as dist

QUANTITIES = ("loss", "feature gradient", "backbone gradient")


class RunStopped(RuntimeError):
    """The run stopped on purpose (divergence); the message names the step and why."""


def nonfinite_flags(loss: torch.Tensor, feat_grad: torch.Tensor, module: torch.nn.Module,
                    group) -> list[bool]:
    """[loss, feature gradient, backbone gradient] is non-finite on *some* rank.

    Collective: one all-reduce MAX of three flags over ``group``, so every rank takes the
    same decision (the feature gradient is each rank's partial sum over its classes, and
    one rank's NaN must stop or skip the step everywhere). Backbone gradients are those the
    module holds now (with ZeRO 1/2 some live in the optimizer's partitions instead).
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    bb = (torch.stack(torch._foreach_norm(grads)).isfinite().all() if grads
          else torch.ones((), dtype=torch.bool, device=loss.device))
    flags = torch.stack([~loss.detach().isfinite().all(), ~feat_grad.isfinite().all(),
                         ~bb.to(loss.device)]).to(torch.int32)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [bool(f) for f in flags.tolist()]


def drop_backbone_grads(module: torch.nn.Module) -> None:
    """Make the engine's next optimizer step a no-op: torch optimizers skip parameters
    whose gradient is None (momentum and weight decay included)."""
    for p in module.parameters():
        p.grad = None


@torch.no_grad()
def average_bn_stats(module: torch.nn.Module, group) -> None:
    """Average floating-point buffers (batch-norm running mean / variance) over ranks, in
    place. Training-mode batch norm normalises each rank's rows, so the running statistics
    drift apart per rank; the checkpoint and the export carry the average, and every rank
    evaluates with it. Collective: one all-reduce SUM per buffer."""
    if group is None or dist.get_world_size(group) == 1:
        return
    world = dist.get_world_size(group)
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM, group=group)
            b.div_(world)


def check_finite_state(named: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when a tensor in it is not finite."""
    bad = [k for k, v in named.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise RunStopped(f"{what}: not written, non-finite values in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
