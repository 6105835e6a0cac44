"""Opening a run directory for a job: fresh (locked, config written) or resumed (locked,
config compared, newest *verified* checkpoint chosen, metrics cut back to it)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dkd.atomic import atomic_write_text
from dkd.config import ConfigError, RunConfig, dump_config
from dkd.engine import checkpoint as ckpt
from dkd.engine.rundir import default_name, prepare_run_dir
from dkd.logging.sinks import read_jsonl


@dataclass
class Opened:
    run_dir: Path
    lock: object            # RunLock on rank 0, None elsewhere
    changes: dict = field(default_factory=dict)   # safe config changes of a resume


def open_run_dir(cfg: RunConfig, ctx, resume: bool, overwrite: bool) -> Opened:
    """Rank 0 creates / reopens and locks the run directory (or reports why it cannot);
    all ranks agree on it. Collective: one broadcast."""
    msg, lock = [None, None, {}], None
    if ctx.is_rank0:
        try:
            run_dir, lock, changes = prepare_run_dir(cfg, cfg.name or default_name(),
                                                     overwrite, resume)
            msg = [str(run_dir), None, changes]
        except ConfigError as err:
            msg[1] = str(err)
    if ctx.world > 1:
        dist.broadcast_object_list(msg, src=0)
    if msg[1] is not None:
        raise ConfigError(msg[1])
    return Opened(Path(msg[0]), lock, msg[2])


def metric_lines(path: Path) -> list[dict]:
    """Lines of metrics.jsonl (nulls kept), without a torn last line."""
    if not path.is_file():
        return []
    try:
        return read_jsonl(path, nan=False)
    except ValueError as err:
        raise ConfigError(f"--resume: {err} (damaged metrics file)") from None


@dataclass
class ResumePoint:
    path: Path              # the checkpoint directory
    state: dict             # its state.pt
    skipped: list           # newer checkpoints that failed verification, with why
    logged_until: int       # last step already in metrics.jsonl (and sent to W&B)


def find_resume_point(run_dir: Path, ctx) -> ResumePoint:
    """The newest verified checkpoint; every rank calls this (it hashes in stripes)."""
    path, skipped = ckpt.newest_verified(run_dir, ctx)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    rows = metric_lines(run_dir / "metrics.jsonl") if ctx.is_rank0 else []
    if ctx.is_rank0:
        for line in skipped:
            print(f"dkd: resume: skipped checkpoint {line}", file=sys.stderr, flush=True)
        print(f"dkd: resume: from {path.name} (step {state['step']})", file=sys.stderr,
              flush=True)
    return ResumePoint(path, state, skipped,
                       max((r.get("step", 0) for r in rows), default=0))


def is_finished(run_dir: Path, point: ResumePoint, cfg: RunConfig) -> bool:
    """True when the run already reached train.steps and wrote its summary; a resume
    with fewer steps than the checkpoint is refused."""
    step = point.state["step"]
    if step > cfg.train.steps:
        raise ConfigError(f"--resume: train.steps = {cfg.train.steps} is below the step of "
                          f"the newest checkpoint ({step}); raise it or leave it")
    if not (run_dir / "summary.json").is_file():
        return False
    done = json.loads((run_dir / "summary.json").read_text())
    # a search stops early, at its FLOPs target: finished at its own last step
    return done.get("steps") == step and done.get("planned_steps", step) == cfg.train.steps


def continue_run_dir(run_dir: Path, point: ResumePoint, cfg: RunConfig, changes: dict) -> None:
    """Rank 0, once the resume goes ahead: cut metrics.jsonl back to the checkpoint (its
    torn last line included), record the safe config changes in config.yaml and a
    `resume` line."""
    step = point.state["step"]
    rows = [r for r in metric_lines(run_dir / "metrics.jsonl") if r.get("step", 0) <= step]
    rows.append({"step": step, "kind": "resume", "checkpoint": point.path.name,
                 "skipped": point.skipped, "changed": {k: list(v) for k, v in changes.items()}})
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if changes:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        print("dkd: resume: config changes recorded: " +
              ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items()),
              file=sys.stderr, flush=True)
