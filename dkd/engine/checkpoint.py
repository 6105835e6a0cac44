"""Checkpoints: backbone through DeepSpeed, head shards by global class range.

Layout of `checkpoints/step0000100/`:
  backbone/            DeepSpeed's own checkpoint (model, optimizer, engine state)
  head-<start>-<end>.pt  one file per rank: weight rows and optimizer moments of classes
                       [start, end), so a run can resume on another world size
  state.pt             step, proposal state, RNG states, world size (rank 0)

A checkpoint is written into `.tmp-stepN/` and renamed to `stepN/` only when every rank
has finished, then `latest` is replaced atomically: a crash mid-write leaves the previous
checkpoint intact and never a half-written one that resume would pick up.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dkd.config import ConfigError
from dkd.engine.rundir import atomic_torch_save, atomic_write_text


def _barrier(ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: Path, step: int, engine, head, head_opt, train_state: dict, ctx) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step{step:07d}", root / f".tmp-step{step:07d}"
    if ctx.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ctx)
    engine.save_checkpoint(str(tmp / "backbone"), tag="ds", save_latest=False)
    piece = head.state_for_range(head.start, head.end, head_opt) if head.num_local else None
    atomic_torch_save(piece, tmp / f"head-{head.start}-{head.end}.pt")
    if ctx.is_rank0:
        atomic_torch_save({**train_state, "rng": rng_state(), "world_size": ctx.world},
                          tmp / "state.pt")
    _barrier(ctx)
    if ctx.is_rank0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / "latest", final.name + "\n")
    _barrier(ctx)
    return final


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """{step: directory} of the run's complete checkpoints (those with state.pt)."""
    root = Path(run_dir) / "checkpoints"
    found = {}
    for d in sorted(root.glob("step*")) if root.is_dir() else []:
        if d.name[4:].isdigit() and (d / "state.pt").is_file():
            found[int(d.name[4:])] = d
    return found


def backbone_state(path: Path) -> dict:
    """The backbone's state dict saved in checkpoint ``path`` (DeepSpeed's model file of
    tag "ds", as :func:`save_checkpoint` writes it), read without an engine."""
    model_file = Path(path) / "backbone" / "ds" / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConfigError(f"{model_file} not found: checkpoint {path} has no backbone")
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def latest_checkpoint(run_dir: Path) -> Path:
    root = Path(run_dir) / "checkpoints"
    marker = root / "latest"
    if not marker.is_file():
        raise ConfigError(f"--resume: no checkpoint in {root} (no 'latest' marker)")
    path = root / marker.read_text().strip()
    if not (path / "state.pt").is_file():
        raise ConfigError(f"--resume: checkpoint {path} is incomplete (no state.pt)")
    return path


def load_head_pieces(path: Path, head, head_opt, num_classes: int) -> None:
    """Copy the rows of every saved piece that overlap this rank's range (resharding)."""
    filled = 0
    for f in sorted(Path(path).glob("head-*-*.pt")):
        piece = torch.load(f, map_location="cpu", weights_only=False)
        if piece is None:
            continue
        if piece["num_classes"] != num_classes:
            raise ConfigError(f"checkpoint {f}: head has {piece['num_classes']} classes, "
                              f"this run has {num_classes}")
        lo, hi = max(piece["start"], head.start), min(piece["end"], head.end)
        if lo >= hi:
            continue
        src = slice(lo - piece["start"], hi - piece["start"])
        with torch.no_grad():
            head.weight[lo - head.start:hi - head.start].copy_(piece["weight"][src])
        if head_opt is not None and "optim" in piece:
            head_opt.load_rows_state(lo - head.start,
                                     {k: v[src].to(head.weight.device) for k, v in piece["optim"].items()})
        filled += hi - lo
    if filled != head.num_local:
        raise ConfigError(f"checkpoint {path}: head pieces cover {filled} of this rank's "
                          f"{head.num_local} classes [{head.start}, {head.end})")


def load_checkpoint(path: Path, engine, head, head_opt, num_classes: int,
                    world: int = 1, zero_stage: int = 0) -> dict:
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    saved = state.get("world_size", world)
    if saved != world and zero_stage > 0:
        # ZeRO 1/2 partition the backbone's optimizer state by data-parallel rank.
        raise ConfigError(f"checkpoint {path} was written by {saved} ranks; resuming on {world} "
                          f"ranks needs dist.zero_stage = 0 (got {zero_stage}): ZeRO stages "
                          "1 and 2 partition the optimizer state by rank")
    engine.load_checkpoint(str(Path(path) / "backbone"), tag="ds",
                           load_optimizer_states=True, load_lr_scheduler_states=False)
    load_head_pieces(path, head, head_opt, num_classes)
    set_rng_state(state["rng"])
    return state
