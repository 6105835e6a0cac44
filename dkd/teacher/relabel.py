"""`dkd relabel`: run the teacher once over a training split and write the soft-label store.

The store format is in ``dkd.teacher.store``; this module writes it. Rows are cut into
shards of ``shard_rows`` samples, a fixed function of the plan, never of the world size:
rank r of P writes a contiguous block of shards, and inside a shard the teacher sees the
same batches in every launch, so P processes write the same bytes as one.

Resume: each shard is written as files (atomic) and then a record with their sha256; a
re-run skips every shard whose record matches this plan and whose files still hash right,
and rewrites the others. The manifest is written last, by rank 0, after all ranks finished.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from dkd.dist.functional import group_rank, group_size
from dkd.engine.rundir import atomic_write_json
from dkd.teacher.store import (MANIFEST, StoreError, StorePlan, _diff, choose_layout,
                               file_sha256)

_TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


class _HashingWriter:
    """File wrapper that hashes what numpy writes, so no second read is needed."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


def atomic_save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy atomically (tmp, fsync, rename); returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            np.lib.format.write_array(w, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return w.h.hexdigest()


def encode_logits(logits: torch.Tensor, plan: StorePlan) -> dict[str, np.ndarray]:
    """Teacher logits (B, C), any device -> the stored rows of each file role (CPU numpy)."""
    if logits.dim() != 2 or logits.shape[1] != plan.num_classes:
        raise ValueError(f"teacher logits must be (B, {plan.num_classes}), got "
                         f"{tuple(logits.shape)}")
    a = logits.detach().float()                                    # (B, C)
    tdtype = getattr(torch, plan.logits_dtype)
    if plan.layout == "full":
        return {"logits": a.to(tdtype).cpu().numpy()}
    vals, ids = a.topk(plan.k, dim=1, sorted=True)                 # (B, K) descending
    vals_r = vals.to(tdtype)                                       # as stored
    m = vals[:, :1]                                                # (B, 1) row max
    tail = torch.exp(a - m).scatter(1, ids, 0.0).sum(1).double()   # (B,) exact tail mass
    head = torch.exp(vals_r.double() - m.double()).sum(1)          # (B,) stored top-K mass
    lse = m.squeeze(1).double() + torch.log(head + tail)           # (B,) float64
    return {"ids": ids.cpu().numpy().astype(plan.ids_dtype), "logits": vals_r.cpu().numpy(),
            "lse": lse.cpu().numpy()}


# ----------------------------------------------------------------------------- writing

def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


class StoreWriter:
    """Writes the shards of one plan into ``path``; any rank may write any shard.

    Use: ``prepare()`` once (rank 0, before anyone writes), ``shard_done(i)`` /
    ``write_shard(i, arrays)`` per shard, ``finalize()`` once all shards exist (rank 0).
    """

    def __init__(self, path: str | Path, plan: StorePlan):
        self.path, self.plan = Path(path), plan

    def prepare(self, overwrite: bool = False) -> None:
        """Create the directory; refuse one that holds a store of another plan."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob(f".shard-*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)  # left by a writer that was killed mid-file
        old = [p for p in [self.path / MANIFEST, *self.path.glob("shard-*.json")] if p.exists()]
        if overwrite:
            (self.path / MANIFEST).unlink(missing_ok=True)  # the store is incomplete from now
            for p in self.path.glob("shard-*"):
                p.unlink()
            return
        for p in old:
            rec = json.loads(p.read_text())
            other = rec if p.name == MANIFEST else rec.get("plan", {})
            if rec.get("plan_id") != self.plan.plan_id:
                raise StoreError(f"{self.path} already holds a soft-label store (or part of "
                                 f"one) written with other settings ({_diff(other, self.plan.header())});"
                                 " pass overwrite=True (`dkd relabel --overwrite`) or choose "
                                 "another directory")

    def empty_shard(self, i: int) -> dict[str, np.ndarray]:
        start, stop = self.plan.shard_range(i)
        return {r: np.empty((stop - start, *shape), dtype=d)
                for r, (d, shape) in self.plan.roles().items()}

    def shard_done(self, i: int) -> bool:
        """True when shard ``i`` is complete, of this plan, and its files match their sha256."""
        meta = self.path / f"{_shard_name(i)}.json"
        if not meta.exists():
            return False
        rec = json.loads(meta.read_text())
        if rec.get("plan_id") != self.plan.plan_id:
            return False
        return all((self.path / f["name"]).exists()
                   and file_sha256(self.path / f["name"]) == f["sha256"]
                   for f in rec["files"].values())

    def write_shard(self, i: int, arrays: dict[str, np.ndarray]) -> dict:
        """Write shard ``i``'s files, then its record (so a record means complete)."""
        start, stop = self.plan.shard_range(i)
        files = {}
        for role, (dtype, shape) in self.plan.roles().items():
            arr = arrays[role]
            if arr.shape != (stop - start, *shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"shard {i} {role}: expected {(stop - start, *shape)} {dtype}, "
                                 f"got {arr.shape} {arr.dtype}")
            name = f"{_shard_name(i)}.{role}.npy"
            files[role] = {"name": name, "sha256": atomic_save_npy(self.path / name, arr),
                           "shape": list(arr.shape), "dtype": dtype}
        rec = {"index": i, "start": start, "stop": stop, "files": files,
               "plan_id": self.plan.plan_id, "plan": self.plan.header()}
        atomic_write_json(self.path / f"{_shard_name(i)}.json", rec)
        return rec

    def finalize(self) -> dict:
        """Gather the shard records into manifest.json (written last, atomically)."""
        shards = []
        for i in range(self.plan.num_shards):
            meta = self.path / f"{_shard_name(i)}.json"
            rec = json.loads(meta.read_text()) if meta.exists() else None
            if rec is None or rec.get("plan_id") != self.plan.plan_id:
                raise StoreError(f"{self.path}: shard {meta.name} is missing or from another "
                                 "relabel; cannot write the manifest")
            shards.append({k: rec[k] for k in ("index", "start", "stop", "files")})
        manifest = {**self.plan.header(), "plan_id": self.plan.plan_id, "shards": shards}
        atomic_write_json(self.path / MANIFEST, manifest)
        _fsync_dir(self.path)
        return manifest


def write_store(path: str | Path, logits: torch.Tensor, *, dataset_fingerprint,
                teacher_fingerprint: str, topk: int | None = None, full_threshold: int = 0,
                dtype: str = "float32", shard_rows: int = 65536,
                overwrite: bool = False) -> Path:
    """Write a store from in-memory teacher logits (N, C) (one process; tests, conversion)."""
    layout, k = choose_layout(logits.shape[1], topk, full_threshold)
    plan = StorePlan(logits.shape[0], logits.shape[1], layout, k, dtype, shard_rows,
                     teacher_fingerprint, dataset_fingerprint)
    writer = StoreWriter(path, plan)
    writer.prepare(overwrite)
    for i in range(plan.num_shards):
        if not writer.shard_done(i):
            writer.write_shard(i, encode_logits(logits[slice(*plan.shard_range(i))], plan))
    writer.finalize()
    return Path(path)


