"""Checkpoints: backbone through DeepSpeed, head shards by global class range.

Layout of `checkpoints/step0000100/`:
  backbone/            DeepSpeed's own checkpoint (model, optimizer, engine state)
  head-<start>-<end>.pt  one file per rank: weight rows and optimizer moments of classes
                       [start, end), so a run can resume on another world size
  state.pt             step, proposal state, RNG states, world size (rank 0)
  manifest.json        sha256 and size of every file above, written last

A checkpoint is written into `.tmp-stepN/` and renamed to `stepN/` only when every rank
has finished, then `latest` is replaced atomically: a crash mid-write leaves the previous
checkpoint intact and never a half-written one that resume would pick up. Resume checks
the manifest (the ranks hash the files between them), so flipped bytes anywhere in a
checkpoint refuse it by file name, and the newest checkpoint that verifies is used.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dkd.config import ConfigError
from dkd.atomic import atomic_torch_save, atomic_write_json, atomic_write_text


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
    files = _hash_files(tmp, _files_of(tmp) if ctx.is_rank0 else None, ctx)
    if ctx.is_rank0:
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / "latest", final.name + "\n")
    _barrier(ctx)
    return final


MANIFEST = "manifest.json"


def _files_of(root: Path) -> list[str]:
    return sorted(str(f.relative_to(root)) for f in root.rglob("*")
                  if f.is_file() and f.name != MANIFEST)


def _sha256(path: Path) -> dict | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def _hash_files(root: Path, names: list[str] | None, ctx) -> dict[str, dict | None]:
    """{name: {sha256, bytes} or None if missing} of rank 0's ``names`` under ``root``;
    every rank hashes a stripe of the list (collectives: one broadcast, one all-gather)."""
    box = [names]
    if ctx.world > 1:
        dist.broadcast_object_list(box, src=0)
    mine = {n: _sha256(root / n) for n in box[0][ctx.rank::ctx.world]}
    parts = [mine]
    if ctx.world > 1:
        parts = [None] * ctx.world
        dist.all_gather_object(parts, mine)
    return {n: h for part in parts for n, h in part.items()}


def verify_checkpoint(path: Path, ctx) -> str | None:
    """None if every file of checkpoint ``path`` matches its manifest, else what is wrong
    (the first damaged or missing file, by name). Every rank must call it."""
    manifest = path / MANIFEST
    want, problem = None, None
    if ctx.is_rank0:
        try:
            want = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            problem = f"no readable {MANIFEST} (written by an older dkd, or damaged)"
    got = _hash_files(path, sorted(want) if want else [], ctx)
    if ctx.is_rank0 and problem is None:
        for name in sorted(want):
            if got[name] is None:
                problem = f"{name} is missing"
            elif got[name] != want[name]:
                problem = f"{name} does not match its sha256 in {MANIFEST} (damaged)"
            if problem:
                break
    box = [problem]
    if ctx.world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def newest_verified(run_dir: Path, ctx) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and a line per newer one that did not."""
    steps = checkpoint_steps(run_dir) if ctx.is_rank0 else None
    box = [steps]
    if ctx.world > 1:
        dist.broadcast_object_list(box, src=0)
    skipped = []
    for step, path in sorted(box[0].items(), reverse=True):
        problem = verify_checkpoint(path, ctx)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    raise ConfigError(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'} verifies: "
                      + ("; ".join(skipped) or "there is none"))


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
