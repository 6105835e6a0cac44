"""`dkd train`: the training loop, read top to bottom.

One step: global batch ids (a function of the step) -> this rank's rows -> teacher logits
-> backbone features (DeepSpeed engine) -> all-gather -> softmax layer on this rank's head
shard -> backward of the head and loss (timed as the softmax layer) -> backward of the
backbone through the all-gather (engine) -> sparse head update -> engine step.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dkd.config import SAMPLED_METHODS, ConfigError, RunConfig
from dkd.data import global_batch_indices, local_slice
from dkd.dist.functional import gather_rows, gather_rows_nograd
from dkd.engine import checkpoint as ckpt
from dkd.engine.assemble import TrainParts, assemble, check_inputs
from dkd.engine.distributed import DistContext, init_distributed
from dkd.engine.evaluate import evaluate
from dkd.engine.rundir import atomic_write_json, atomic_write_text, default_name, prepare_run_dir
from dkd.engine.schedule import head_lr, lr_at, set_lr
from dkd.engine.stats import RunStats
from dkd.engine.sync import check_proposal_sync
from dkd.logging.progress import make_progress
from dkd.logging.sinks import make_sinks
from dkd.profiling.timers import RegionTimer
from dkd.sampling.teacher_batch import TopKTeacher, completion_logit
from dkd.profiling.trace import maybe_profile
from dkd.teacher.live import export_model


def _agree_run_dir(cfg: RunConfig, ctx: DistContext, resume: bool, overwrite: bool) -> Path:
    """Rank 0 creates the run directory (or reports why it cannot); all ranks agree on it."""
    msg = [None, None]
    if ctx.is_rank0:
        try:
            msg[0] = str(prepare_run_dir(cfg, cfg.name or default_name(), overwrite, resume))
        except ConfigError as err:
            msg[1] = str(err)
    if ctx.world > 1:
        dist.broadcast_object_list(msg, src=0)
    if msg[1] is not None:
        raise ConfigError(msg[1])
    return Path(msg[0])


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines(keepends=True)
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))


def maybe_inject_fault(step: int, rank: int) -> None:
    """Test aid: DKD_FAULT_INJECT="RANK:STEP" kills that rank abruptly at that step, to
    check that the others fail within dist.timeout_s instead of hanging."""
    spec = os.environ.get("DKD_FAULT_INJECT")
    if spec and tuple(map(int, spec.split(":"))) == (rank, step):
        os._exit(13)


def micro_step(p: TrainParts, cfg: RunConfig, micro: int, timer: RegionTimer) -> dict:
    """Forward and backward of one micro-batch (global micro-batch index ``micro``)."""
    ctx, group, gas = p.ctx, p.ctx.group, cfg.dist.grad_accum
    ids = global_batch_indices(micro, len(p.data.train), cfg.train.batch_size, cfg.seed)
    local_ids = ids[local_slice(len(ids), ctx.world, ctx.rank)]
    x, y = p.data.train.get(local_ids)
    x, y = x.to(ctx.device), y.to(ctx.device)
    K = p.layer.teacher_topk  # sampled methods at large C need only the teacher's top-K
    with timer.region("teacher"):
        if p.teacher is None:
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
    sizes = [len(range(len(ids))[local_slice(len(ids), ctx.world, r)]) for r in range(ctx.world)]
    with timer.region("comm"):
        feats = gather_rows(f_local, group, float(ctx.world), sizes)    # (B, d)
        y_g = gather_rows_nograd(y, group, sizes)
        t_g = t_local
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
            (out["loss"] / gas).backward()
    with timer.region("backbone_bwd"):
        p.engine.backward((feats * feats_d.grad.to(feats.dtype)).sum())
    with timer.region("optimizer"):
        p.engine.step()  # DeepSpeed applies the update only at the accumulation boundary
    return out


def train_step(p: TrainParts, cfg: RunConfig, step: int, timer: RegionTimer) -> dict:
    """One optimizer step = grad_accum micro-batches, then the sparse head update."""
    gas = cfg.dist.grad_accum
    outs = [micro_step(p, cfg, step * gas + i, timer) for i in range(gas)]
    with timer.region("softmax_layer"), timer.region("optimizer"):
        p.head.apply_grads(p.head_opt, lr=head_lr(p.lr, cfg.optim), clock=step + 1)
    if p.layer.proposal is not None:
        p.layer.proposal.advance()
    if gas == 1:
        return outs[0]
    return {k: (sum(o[k] for o in outs) / gas if k in ("loss", "kd", "ce") else outs[-1][k])
            for k in outs[-1]}


def _metrics(out: dict, step: int, lr: float, times: dict, iter_ms: float, p: TrainParts) -> dict:
    m = {"kind": "train", "step": step + 1, "loss": float(out["loss"].detach()), "lr": lr,
         "iter_ms": iter_ms, "loss/kd": float(out["kd"]), "loss/ce": float(out["ce"]),
         "n_sampled": int(out["n_sampled"])}
    for name in ("softmax", "softmax_fwd", "softmax_bwd", "sampling", "comm", "teacher",
                 "backbone_fwd", "backbone_bwd", "optimizer"):
        m[f"{name}_ms"] = times.get(f"{name}_ms", 0.0)
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


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run (or resume) one training job; every rank calls this. Returns the run dir."""
    ctx = init_distributed(cfg.dist.device, cfg.dist.timeout_s)
    data, teacher = check_inputs(cfg, ctx)
    run_dir = _agree_run_dir(cfg, ctx, resume, overwrite)
    p = assemble(cfg, ctx, data, teacher, run_dir)
    start_step = _resume(p, run_dir, cfg.dist.zero_stage) if resume else 0
    sinks = make_sinks(run_dir, cfg.model_dump(mode="json"), cfg.wandb, ctx.is_rank0)
    t_start = time.perf_counter()
    last_saved = _run_steps(p, cfg, run_dir, sinks, start_step, resume)
    metrics = _eval(p, cfg)
    sinks.log(_eval_line(metrics, cfg.train.steps), step=cfg.train.steps)
    if last_saved != cfg.train.steps:
        _save(p, run_dir, cfg.train.steps)
    _finish(p, cfg, run_dir, metrics, time.perf_counter() - t_start)
    sinks.finish()
    return run_dir


def _resume(p: TrainParts, run_dir: Path, zero_stage: int) -> int:
    """Load the latest checkpoint (any world size); returns the step to continue from."""
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), p.engine, p.head,
                                 p.head_opt, p.data.num_classes, p.ctx.world,
                                 zero_stage)
    if p.layer.proposal is not None:
        p.layer.proposal.load_state_dict(state["proposal"])
    if p.layer.student_prior is not None and state.get("student_prior") is not None:
        p.layer.student_prior.load_state_dict(state["student_prior"])
    if p.ctx.is_rank0:
        truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    return state["step"]


def _run_steps(p: TrainParts, cfg: RunConfig, run_dir: Path, sinks, start_step: int,
               resumed: bool) -> int:
    """The step loop with timing, logging, evaluation and checkpoints; returns the last
    checkpointed step."""
    ctx, last_saved = p.ctx, start_step
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
            out = train_step(p, cfg, step, timer)
            stats.update(out, step, p.layer.proposal)
            prof.step()
            times, iter_ms = timer.collect(), (time.perf_counter() - t0) * 1e3
            done = step + 1
            # Every step is logged (the softmax-layer time of every iteration); the timer
            # has already waited for this step's events, so reading the loss costs no
            # extra synchronisation. log_every only paces the progress bar.
            m = _metrics(out, step, p.lr, times, iter_ms, p)
            sinks.log(m, step=done)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                bar.update(step, loss=m["loss"], softmax_ms=m["softmax_ms"])
            if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                sinks.log(_eval_line(_eval(p, cfg), done), step=done)
            if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0:
                _save(p, run_dir, done)
                last_saved = done
    for path in getattr(prof, "trace_paths", []):
        sinks.log_artifact(path, name=f"trace-{Path(path).stem}", type="trace")
    stats.finish()
    return last_saved


def _eval(p: TrainParts, cfg: RunConfig) -> dict:
    return evaluate(p.engine.module, p.head.weight, p.head.start, p.data, p.ctx.device,
                    cfg.train.eval_batch_size, p.ctx.group)


def _eval_line(metrics: dict, step: int) -> dict:
    return {"kind": "eval", "step": step, **{f"eval/{k}": v for k, v in metrics.items()}}


def _save(p: TrainParts, run_dir: Path, step: int) -> None:
    prop = p.layer.proposal
    sp = p.layer.student_prior
    state = {"step": step, "proposal": prop.state_dict() if prop is not None else None,
             "student_prior": sp.state_dict() if sp is not None else None}
    ckpt.save_checkpoint(run_dir, step, p.engine, p.head, p.head_opt, state, p.ctx)


def _finish(p: TrainParts, cfg: RunConfig, run_dir: Path, metrics: dict, wall_s: float) -> None:
    """Export model.pt (full head gathered from the shards) and write summary.json."""
    full_head = gather_rows_nograd(p.head.weight, p.ctx.group)
    if not p.ctx.is_rank0:
        return
    export_model(run_dir / "model.pt", cfg.model, p.data, p.engine.module, full_head)
    summary = {"name": run_dir.name, "method": cfg.method.name, "classes": p.data.num_classes,
               "k": cfg.method.k, "mode": cfg.method.mode if cfg.method.name in SAMPLED_METHODS else None,
               "steps": cfg.train.steps, **metrics, "wall_s": round(wall_s, 3),
               "world_size": p.ctx.world, "teacher": cfg.teacher.checkpoint,
               "teacher_store": cfg.teacher.store}
    atomic_write_json(run_dir / "summary.json", summary)
    print(json.dumps(summary), flush=True)
