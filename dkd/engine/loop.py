"""`dkd train`: the training loop, read top to bottom.

One step: global batch ids (a function of the step) -> this rank's rows -> teacher logits
-> backbone features (DeepSpeed engine) -> all-gather -> softmax layer on this rank's head
shard -> backward of the head and loss (timed as the softmax layer) -> backward of the
backbone through the all-gather (engine) -> sparse head update -> engine step.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dkd.config import SAMPLED_METHODS, ConfigError, ModelConfig, RunConfig
from dkd.data import global_batch_indices, local_slice
from dkd.dist.functional import gather_rows, gather_rows_nograd, gather_rows_to_host
from dkd.engine import checkpoint as ckpt
from dkd.engine.assemble import TrainParts, assemble, check_inputs
from dkd.engine.distributed import DistContext, init_distributed
from dkd.engine.evaluate import evaluate
from dkd.engine.health import (QUANTITIES, RunStopped, average_bn_stats, check_finite_state,
                               drop_backbone_grads, nonfinite_flags)
from dkd.engine.resume import continue_run_dir, find_resume_point, is_finished, open_run_dir
from dkd.atomic import atomic_write_json
from dkd.engine.rundir import discard_fresh_run_dir
from dkd.engine.schedule import head_lr, lr_at, set_lr
from dkd.engine.stats import RunStats
from dkd.engine.sync import check_proposal_sync
from dkd.logging.progress import make_progress
from dkd.logging.sinks import make_sinks
from dkd.profiling.timers import RegionTimer
from dkd.search.flops import count_flops
from dkd.sampling.teacher_batch import TopKTeacher, completion_logit
from dkd.profiling.trace import maybe_profile
from dkd.teacher.live import export_model
from dkd.teacher.sharded import ShardedTeacher, sharded_teacher_batch


def maybe_inject_fault(step: int, rank: int) -> None:
    """Test aid: DKD_FAULT_INJECT="RANK:STEP" kills that rank abruptly at that step, to
    check that the others fail within dist.timeout_s instead of hanging."""
    spec = os.environ.get("DKD_FAULT_INJECT")
    if spec and tuple(map(int, spec.split(":"))) == (rank, step):
        os._exit(13)


def maybe_inject_nan(x: torch.Tensor, step: int) -> torch.Tensor:
    """Test aid: DKD_NAN_INJECT="STEP" makes the float inputs of that (0-based) step NaN,
    to check train.on_nonfinite."""
    spec = os.environ.get("DKD_NAN_INJECT")
    if spec and int(spec) == step and x.is_floating_point():
        return torch.full_like(x, float("nan"))
    return x


def micro_step(p: TrainParts, cfg: RunConfig, micro: int, timer: RegionTimer,
               skip: bool = False) -> dict:
    """Forward and backward of one micro-batch (global micro-batch index ``micro``);
    ``skip``: an earlier micro-batch of this step was non-finite (skip_step)."""
    ctx, group, gas = p.ctx, p.ctx.group, cfg.dist.grad_accum
    ids = global_batch_indices(micro, len(p.data.train), cfg.train.batch_size, cfg.seed)
    local_ids = ids[local_slice(len(ids), ctx.world, ctx.rank)]
    x, y = p.data.train.get(local_ids)
    x, y = maybe_inject_nan(x.to(ctx.device), micro // gas), y.to(ctx.device)
    K = p.layer.teacher_topk  # sampled methods at large C need only the teacher's top-K
    sizes = [len(range(len(ids))[local_slice(len(ids), ctx.world, r)]) for r in range(ctx.world)]
    sharded = isinstance(p.teacher, ShardedTeacher)
    with timer.region("teacher"):
        if sharded:   # already the global batch: no gather of teacher data below
            t_g = sharded_teacher_batch(p.teacher, x, sizes, K or (
                p.data.num_classes if cfg.method.name in SAMPLED_METHODS else 0),
                cfg.method.exact_teacher_columns)
            t_local = None
        elif p.teacher is None:
            t_local = None
        elif K:
            ids_k, val_k, lse_k, f_k = p.teacher.topk(x, local_ids, K)
            # The completion logit is per sample: each rank computes its own rows'.
            t_local = (ids_k, val_k, lse_k, completion_logit(val_k, lse_k, p.data.num_classes))
            if f_k is not None and cfg.method.exact_teacher_columns:
                t_local += (f_k,)    # a live teacher's features: exact logits at any column
        else:
            t_local = p.teacher.logits(x, local_ids)
    with timer.region("backbone_fwd"):
        f_local = p.engine(x if p.data.task == "text" else x.to(p.dtype))
    with timer.region("comm"):
        feats = gather_rows(f_local, group, float(ctx.world), sizes)    # (B, d)
        y_g = gather_rows_nograd(y, group, sizes)
        t_g = t_g if sharded else t_local
        if isinstance(t_local, tuple):
            ids_g, val_g, lse_g, rest_g, *f_g = (gather_rows_nograd(t, group, sizes)
                                                 for t in t_local)
            t_g = TopKTeacher(ids_g, val_g, lse_g, p.data.num_classes, rest=rest_g,
                              feats=f_g[0] if f_g else None,
                              head=p.teacher.head_weight if f_g else None)
        elif t_local is not None:   # a dense teacher is the K = C case of the same type
            t_g = TopKTeacher.from_dense(gather_rows_nograd(t_local, group, sizes), rank=False)
    # The head and loss run on a detached fp32 copy of the features, so their forward and
    # backward are timed apart from the backbone; the backbone then receives the feature
    # gradient through the surrogate loss <feats, dL/dfeats> (the engine divides it by
    # grad_accum itself; the head loss is divided here to match).
    feats_d = feats.detach().float().requires_grad_(True)
    with timer.region("softmax_layer"):
        with timer.region("softmax_layer/forward"):
            out = p.layer(feats_d, p.head, y_g, t_g, p.teacher_weight, micro)
        with timer.region("softmax_layer/backward"):
            loss = out["loss"] if p.search is None else p.search.objective(out["loss"])
            (loss / gas).backward()
    with timer.region("backbone_bwd"):
        p.engine.backward((feats * feats_d.grad.to(feats.dtype)).sum())
    # Before the engine's step: a non-finite loss or gradient stops the run, or (skip_step)
    # drops the whole optimizer step once its last micro-batch is in.
    bad = nonfinite_flags(out["loss"], feats_d.grad, p.engine.module, group)
    out = {**out, "nonfinite": [q for q, f in zip(QUANTITIES, bad) if f]}
    if out["nonfinite"] and cfg.train.on_nonfinite == "stop":
        raise Diverged(out["nonfinite"])
    with timer.region("optimizer"):
        boundary = p.engine.is_gradient_accumulation_boundary()
        if (skip or out["nonfinite"]) and boundary:
            drop_backbone_grads(p.engine.module)
        elif p.search is not None and boundary:
            p.search.step()    # the gates' proximal step (they are not in the optimizer)
        p.engine.step()  # DeepSpeed applies the update only at the accumulation boundary
    return out


class Diverged(Exception):
    def __init__(self, quantities: list[str]) -> None:
        super().__init__(", ".join(quantities))
        self.quantities = quantities


def train_step(p: TrainParts, cfg: RunConfig, step: int, timer: RegionTimer) -> dict:
    """One optimizer step = grad_accum micro-batches, then the sparse head update."""
    gas, outs = cfg.dist.grad_accum, []
    # skip_step: the forward of a dropped step also moved the batch-norm running statistics
    # (and a student prior its statistics): keep them to put back
    keep = cfg.train.on_nonfinite == "skip_step"
    buffers = list(p.engine.module.buffers()) if keep else []
    saved = [b.clone() for b in buffers]
    prior = p.layer.student_prior if keep else None
    prior_state = copy.deepcopy(prior.state_dict()) if prior is not None else None
    for i in range(gas):   # the last micro-batch's flags decide for the step (skip_step)
        skip = any(o["nonfinite"] for o in outs)
        outs.append(micro_step(p, cfg, step * gas + i, timer, skip=skip))
    skipped = any(o["nonfinite"] for o in outs)
    with timer.region("softmax_layer"), timer.region("optimizer"):
        if skipped:
            p.head.discard_grads()
            for b, v in zip(buffers, saved):
                b.copy_(v)
            if prior is not None:
                prior.load_state_dict(prior_state)
        else:
            p.head.apply_grads(p.head_opt, lr=head_lr(p.lr, cfg.optim), clock=step + 1)
    if p.layer.proposal is not None:
        p.layer.proposal.advance()
    merged = outs[0] if gas == 1 else \
        {k: (sum(o[k] for o in outs) / gas if k in ("loss", "kd", "ce") else outs[-1][k])
         for k in outs[-1]}
    return {**merged, "skipped": skipped,
            "nonfinite": sorted({q for o in outs for q in o["nonfinite"]})}


def _metrics(out: dict, step: int, lr: float, times: dict, iter_ms: float, p: TrainParts) -> dict:
    m = {"kind": "train", "step": step + 1, "loss": float(out["loss"].detach()), "lr": lr,
         "iter_ms": iter_ms, "loss/kd": float(out["kd"]), "loss/ce": float(out["ce"]),
         "n_sampled": int(out["n_sampled"])}
    for name in ("softmax", "softmax_fwd", "softmax_bwd", "sampling", "comm", "teacher",
                 "backbone_fwd", "backbone_bwd", "optimizer"):
        m[f"{name}_ms"] = times.get(f"{name}_ms", 0.0)
    if out["skipped"]:   # train.on_nonfinite = skip_step dropped this step's update
        m.update(skipped=1, nonfinite=",".join(out["nonfinite"]))
    if out.get("kernel_path"):
        m["kernel_path"] = out["kernel_path"]  # which sampled-logit kernel ran (auto picks)
    if p.head_opt.last_impl:
        m["head_update"] = p.head_opt.last_impl  # native (C) or torch row-sparse update
    prop = p.layer.proposal
    if prop is not None:
        m["proposal/step"] = prop.step
        if hasattr(prop, "b2"):
            m.update({"proposal/w": prop.w, "proposal/b1": prop.b1, "proposal/b2": prop.b2()})
    return m


class WallClock:
    """Training wall time over every segment of a run (resumes add to the checkpoint's)."""

    def __init__(self, before: float = 0.0) -> None:
        self.before, self.t0 = before, time.perf_counter()

    def total(self) -> float:
        return self.before + time.perf_counter() - self.t0


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run (or resume) one training job; every rank calls this. Returns the run dir."""
    ctx = init_distributed(cfg.dist.device, cfg.dist.timeout_s)
    if not resume:   # a fresh run refuses bad input before its directory exists
        data, teacher = check_inputs(cfg, ctx)
    opened = open_run_dir(cfg, ctx, resume, overwrite)   # a resume compares configs first
    run_dir = opened.run_dir
    try:
        if resume:
            data, teacher = check_inputs(cfg, ctx)
        point = find_resume_point(run_dir, ctx) if resume else None
        if point is not None and is_finished(run_dir, point, cfg):
            if ctx.is_rank0:
                print(f"dkd: {run_dir} is finished (step {cfg.train.steps} of "
                      f"{cfg.train.steps}); nothing to do (raise train.steps to go on)",
                      file=sys.stderr, flush=True)
            return run_dir
        p = assemble(cfg, ctx, data, teacher, run_dir)
        if point is not None:
            _resume(p, point, cfg.dist.zero_stage)
            if ctx.is_rank0:
                continue_run_dir(run_dir, point, cfg, opened.changes)
        _train_from(p, cfg, run_dir, point)
        return run_dir
    except ConfigError:
        if ctx.is_rank0 and not resume and discard_fresh_run_dir(run_dir):
            opened.lock = None        # its directory (lock file included) is gone
        raise
    finally:
        if opened.lock is not None:
            opened.lock.release()


def _train_from(p: TrainParts, cfg: RunConfig, run_dir: Path, point) -> None:
    start = point.state["step"] if point else 0
    clock = WallClock(point.state.get("wall_s", 0.0) if point else 0.0)
    sinks = make_sinks(run_dir, cfg.model_dump(mode="json"), cfg.wandb, p.ctx.is_rank0,
                       skip_until=point.logged_until if point else -1)
    try:
        last_saved, end = _run_steps(p, cfg, run_dir, sinks, start, clock)
        if p.search is not None:
            p.search.opt.settle()   # closed gates exactly 0: evaluate what is exported
        metrics = _eval(p, cfg)
        sinks.log(_eval_line(metrics, end), step=end)
        if last_saved != end:
            _save(p, run_dir, end, clock)
        _finish(p, cfg, run_dir, metrics, clock.total(), end)
    finally:
        sinks.finish()   # a crash must not leave the W&B run open


def _resume(p: TrainParts, point, zero_stage: int) -> None:
    """Load the checkpoint (any world size) and the proposal's and prior's state."""
    state = ckpt.load_checkpoint(point.path, p.engine, p.head, p.head_opt,
                                 p.data.num_classes, p.ctx.world, zero_stage)
    if p.layer.proposal is not None:
        p.layer.proposal.load_state_dict(state["proposal"])
    if p.layer.student_prior is not None and state.get("student_prior") is not None:
        p.layer.student_prior.load_state_dict(state["student_prior"])
    if p.search is not None:
        p.search.load_state_dict(state["search"])


def _run_steps(p: TrainParts, cfg: RunConfig, run_dir: Path, sinks, start_step: int,
               clock: WallClock) -> int:
    """The step loop with timing, logging, evaluation and checkpoints; returns the last
    checkpointed step."""
    ctx, last_saved, skipped_in_row, resumed = p.ctx, start_step, 0, start_step > 0
    shown = {}   # search: FLOPs and open fraction of the last count, on the progress bar
    timer = RegionTimer(ctx.device, enabled=True, sync=cfg.profiling.sync)
    p.layer.region = timer.region
    stats = RunStats(run_dir, cfg.method.name, p.data.num_classes, cfg.train.steps,
                     cfg.method.rank_phases, enabled=ctx.is_rank0 and not resumed)
    with maybe_profile(cfg.profiling.enabled and ctx.is_rank0, run_dir, cfg.profiling.wait,
                       cfg.profiling.warmup, cfg.profiling.active, device=ctx.device) as prof, \
            make_progress(cfg.train.steps, ctx.is_rank0, start_step=start_step) as bar:
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            maybe_inject_fault(step, ctx.rank)
            p.lr = lr_at(step, cfg.train.steps, cfg.optim)
            set_lr(p.engine.optimizer, p.lr)
            if cfg.dist.check_proposal_sync and p.layer.proposal is not None:
                check_proposal_sync(p.layer.proposal, ctx.group, ctx.device)
            try:
                out = train_step(p, cfg, step, timer)
            except Diverged as err:
                _stop(sinks, step + 1, f"{err} not finite", last_saved, run_dir)
            skipped_in_row = skipped_in_row + 1 if out["skipped"] else 0
            if skipped_in_row >= MAX_SKIPPED_IN_ROW:
                _stop(sinks, step + 1, f"{skipped_in_row} steps in a row skipped ("
                      f"{', '.join(out['nonfinite'])} not finite)", last_saved, run_dir)
            stats.update(out, step, p.layer.proposal)
            prof.step()
            times, iter_ms = timer.collect(), (time.perf_counter() - t0) * 1e3
            done = step + 1
            # Every step is logged (the softmax-layer time of every iteration); the timer
            # has already waited for this step's events, so reading the loss costs no
            # extra synchronisation. log_every only paces the progress bar.
            m = _metrics(out, step, p.lr, times, iter_ms, p)
            sinks.log(m, step=done)
            found = p.search.check(done) if p.search is not None else None
            if found is not None:
                sinks.log(found, step=done)
                shown = {"flops": f"{found['search/flops_frac']:.1%}",
                         "open": f"{found['search/open_frac']:.1%}"}
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                bar.update(step, loss=m["loss"], softmax_ms=m["softmax_ms"], **shown)
            # (the last step's evaluation is the final one, after the loop: not twice)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                    and done < cfg.train.steps:
                sinks.log(_eval_line(_eval(p, cfg), done), step=done)
            if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0:
                _save(p, run_dir, done, clock)
                last_saved = done
            if p.search is not None and p.search.reached:
                break   # the open sub-network is at the target: export it
    for path in getattr(prof, "trace_paths", []):
        sinks.log_artifact(path, name=f"trace-{Path(path).stem}", type="trace")
    stats.finish()
    return last_saved, done if start_step < cfg.train.steps else start_step


MAX_SKIPPED_IN_ROW = 10   # train.on_nonfinite = skip_step gives up after this many


def _stop(sinks, step: int, why: str, last_saved: int, run_dir: Path) -> None:
    """End a diverged run: a `stopped` line, no export; the last checkpoint stays."""
    sinks.log({"kind": "stopped", "reason": why}, step=step)
    kept = (f"the last good checkpoint is {run_dir}/checkpoints/step{last_saved:07d}"
            if last_saved else "no checkpoint was written")
    raise RunStopped(f"step {step}: {why}; the run stopped (train.on_nonfinite) and exported "
                     f"nothing; {kept}")


def _eval(p: TrainParts, cfg: RunConfig) -> dict:
    average_bn_stats(p.engine.module, p.ctx.group)
    return evaluate(p.engine.module, p.head.weight, p.head.start, p.data, p.ctx.device,
                    cfg.train.eval_batch_size, p.ctx.group)


def _eval_line(metrics: dict, step: int) -> dict:
    return {"kind": "eval", "step": step, **{f"eval/{k}": v for k, v in metrics.items()}}


def _save(p: TrainParts, run_dir: Path, step: int, clock: WallClock) -> None:
    prop = p.layer.proposal
    sp = p.layer.student_prior
    average_bn_stats(p.engine.module, p.ctx.group)
    state = {"step": step, "proposal": prop.state_dict() if prop is not None else None,
             "student_prior": sp.state_dict() if sp is not None else None,
             "wall_s": clock.total(),
             "search": p.search.state_dict() if p.search is not None else None}
    ckpt.save_checkpoint(run_dir, step, p.engine, p.head, p.head_opt, state, p.ctx)


def _finish(p: TrainParts, cfg: RunConfig, run_dir: Path, metrics: dict, wall_s: float,
            end: int) -> None:
    """Export model.pt (full head gathered from the shards; for a search, the exported
    student) and write summary.json."""
    average_bn_stats(p.engine.module, p.ctx.group)
    full_head = gather_rows_to_host(p.head.weight, p.ctx.group)   # rank 0's host only
    rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]   # MiB (Linux: KiB)
    if p.ctx.world > 1:
        rss = [None] * p.ctx.world
        dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               group=p.ctx.group)
    if not p.ctx.is_rank0:
        return
    check_finite_state({"head": full_head, **p.engine.module.state_dict()}, "model.pt")
    model_cfg, net, extra = cfg.model, p.engine.module, {}
    if p.search is not None:   # the real smaller network replaces the gated one
        spec, net, extra["search"] = p.search.export(run_dir, full_head)
        model_cfg = ModelConfig(arch="searched", spec=str(spec.resolve()),
                                feature_dim=cfg.model.feature_dim)
    export_model(run_dir / "model.pt", model_cfg, p.data, net, full_head)
    w = next(net.parameters())
    example = p.data.train.get(torch.tensor([0]))[0].to(w.device)
    example = example.to(w.dtype) if example.is_floating_point() else example
    summary = {"name": run_dir.name, "method": cfg.method.name, "classes": p.data.num_classes,
               "k": cfg.method.k, "mode": cfg.method.mode if cfg.method.name in SAMPLED_METHODS else None,
               "steps": end, "planned_steps": cfg.train.steps, **metrics,
               "wall_s": round(wall_s, 3), "world_size": p.ctx.world,
               "teacher": cfg.teacher.checkpoint, "teacher_store": cfg.teacher.store,
               "arch": cfg.model.arch, "backbone_flops": count_flops(net, example),
               "peak_rss_mib": [round(r, 1) for r in rss], **extra}
    atomic_write_json(run_dir / "summary.json", summary)
    print(json.dumps(summary), flush=True)
