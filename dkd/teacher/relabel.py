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
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from dkd.dist.functional import group_rank, group_size
from dkd.atomic import atomic_write_json, fsync_dir
from dkd.teacher.select import row_topk
from dkd.sampling.rng import draw_key, row_uniforms
from dkd.teacher.sparse_target import sampled_target
from dkd.teacher.store import StoreError
from dkd.teacher.store_plan import MANIFEST, StorePlan, _diff, choose_layout, file_sha256

_TMP_SUFFIX = ".tmp"
SAMPLED_STREAM = 0x5A3D   # the draw stream of sampled stores (apart from training draws)
HEAD_FILE = "teacher_head.npy"


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
    fsync_dir(path.parent)
    return w.h.hexdigest()


def encode_logits(logits: torch.Tensor, plan: StorePlan,
                  feats: torch.Tensor | None = None, row0: int = 0) -> dict[str, np.ndarray]:
    """Teacher logits (B, C), any device -> the stored rows of each file role (CPU numpy);
    feats (B, d_t): the teacher features, for a plan that stores them; row0: the index of
    the first row (seeds a sampled store's draws, so they do not depend on the world size)."""
    if logits.dim() != 2 or logits.shape[1] != plan.num_classes:
        raise ValueError(f"teacher logits must be (B, {plan.num_classes}), got "
                         f"{tuple(logits.shape)}")
    a = logits.detach().float()                                    # (B, C)
    tdtype = getattr(torch, plan.logits_dtype)
    if plan.layout == "full":
        return {"logits": a.to(tdtype).cpu().numpy()}
    if plan.layout == "sampled":
        rows = torch.arange(row0, row0 + a.shape[0], device=a.device)
        u = row_uniforms(draw_key(plan.seed, 0, SAMPLED_STREAM), rows, plan.k)
        ids, vals, lse, tail = sampled_target(a, plan.k, plan.temperature, u)
        return {"ids": ids.cpu().numpy().astype(plan.ids_dtype),
                "logits": vals.to(tdtype).cpu().numpy(), "lse": lse.cpu().numpy(),
                "tail_lse": tail.cpu().numpy()}
    vals, ids = row_topk(a, plan.k)                                # (B, K) descending
    # The tail's log-sum-exp directly (not exp(lse) - sum(exp(top-K)) later, which cancels
    # catastrophically when the top K hold all but 1e-7 of the mass); -inf when K == C.
    tail_lse = a.scatter(1, ids, float("-inf")).logsumexp(1)      # (B,)
    out = {"ids": ids.cpu().numpy().astype(plan.ids_dtype),
           "logits": vals.to(tdtype).cpu().numpy(),
           "lse": a.logsumexp(1).cpu().numpy(), "tail_lse": tail_lse.cpu().numpy()}
    if plan.features:
        if feats is None or feats.shape != (a.shape[0], plan.features):
            raise ValueError(f"the plan stores ({a.shape[0]}, {plan.features}) teacher "
                             f"features, got {None if feats is None else tuple(feats.shape)}")
        out["feats"] = feats.detach().float().to(tdtype).cpu().numpy()
    return out


def _read_json(path: Path) -> dict | None:
    """A JSON record, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
        for pattern in (f".shard-*{_TMP_SUFFIX}", f".{MANIFEST}.*{_TMP_SUFFIX}"):
            for tmp in self.path.glob(pattern):
                tmp.unlink(missing_ok=True)  # left by a writer that was killed mid-file
        old = [p for p in [self.path / MANIFEST, *self.path.glob("shard-*.json")] if p.exists()]
        if overwrite:
            (self.path / MANIFEST).unlink(missing_ok=True)  # the store is incomplete from now
            for p in self.path.glob("shard-*"):
                p.unlink()
            return
        for p in old:
            rec = _read_json(p)
            if rec is None:
                if p.name == MANIFEST:
                    raise StoreError(f"{p} is unreadable; pass overwrite=True to rewrite the store")
                continue  # an unreadable shard record: that shard is simply rewritten
            if rec.get("plan_id") != self.plan.plan_id:
                other = _diff(rec if p.name == MANIFEST else rec.get("plan", {}),
                              self.plan.header())
                raise StoreError(f"{self.path} already holds a soft-label store (or part of one) "
                                 f"written with other settings (existing vs requested: {other}); "
                                 "pass overwrite=True or choose another directory")

    def empty_shard(self, i: int) -> dict[str, np.ndarray]:
        start, stop = self.plan.shard_range(i)
        return {r: np.empty((stop - start, *shape), dtype=d)
                for r, (d, shape) in self.plan.roles().items()}

    def shard_done(self, i: int) -> bool:
        """True when shard ``i`` is complete, of this plan, and its files match their sha256."""
        meta = self.path / f"{_shard_name(i)}.json"
        if not meta.exists():
            return False
        rec = _read_json(meta)
        if rec is None or rec.get("plan_id") != self.plan.plan_id:
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

    def write_head(self, head: torch.Tensor) -> dict:
        """Write the (C, d_t) teacher head of a store with features; returns its record
        for :meth:`finalize`."""
        arr = head.detach().float().cpu().contiguous().numpy()
        if arr.shape != (self.plan.num_classes, self.plan.features):
            raise ValueError(f"teacher head must be ({self.plan.num_classes}, "
                             f"{self.plan.features}), got {arr.shape}")
        return {"name": HEAD_FILE, "sha256": atomic_save_npy(self.path / HEAD_FILE, arr),
                "shape": list(arr.shape)}

    def finalize(self, head: dict | None = None) -> dict:
        """Gather the shard records into manifest.json (written last, atomically); head:
        the :meth:`write_head` record of a store with features."""
        shards = []
        for i in range(self.plan.num_shards):
            meta = self.path / f"{_shard_name(i)}.json"
            rec = _read_json(meta)
            if rec is None or rec.get("plan_id") != self.plan.plan_id:
                raise StoreError(f"{self.path}: shard {meta.name} is missing or from another "
                                 "relabel; cannot write the manifest")
            shards.append({k: rec[k] for k in ("index", "start", "stop", "files")})
        manifest = {**self.plan.header(), "plan_id": self.plan.plan_id, "shards": shards}
        if self.plan.features:
            if head is None:
                raise StoreError(f"{self.path}: a store with features needs its teacher head")
            manifest["head"] = head
        atomic_write_json(self.path / MANIFEST, manifest)
        fsync_dir(self.path)
        return manifest


def write_store(path: str | Path, logits: torch.Tensor, *, dataset_fingerprint,
                teacher_fingerprint: str, topk: int | None = None, full_threshold: int = 0,
                dtype: str = "float32", shard_rows: int = 65536,
                overwrite: bool = False, kind: str = "topk", temperature: float = 1.0,
                seed: int = 0) -> Path:
    """Write a store from in-memory teacher logits (N, C) (one process; tests, conversion)."""
    layout, k = choose_layout(logits.shape[1], topk, full_threshold, kind)
    plan = StorePlan(logits.shape[0], logits.shape[1], layout, k, dtype, shard_rows,
                     teacher_fingerprint, dataset_fingerprint, temperature=temperature,
                     seed=seed)
    writer = StoreWriter(path, plan)
    writer.prepare(overwrite)
    for i in range(plan.num_shards):
        if not writer.shard_done(i):
            lo, hi = plan.shard_range(i)
            writer.write_shard(i, encode_logits(logits[lo:hi], plan, row0=lo))
    writer.finalize()
    return Path(path)


# ----------------------------------------------------------------------------- relabel

def default_shard_rows(row_bytes: int, target_bytes: int = 256 << 20) -> int:
    """Samples per shard: the largest power of two whose shard stays under ~256 MiB."""
    return 1 << max(0, (target_bytes // max(1, row_bytes)).bit_length() - 1)


def rank_shards(num_shards: int, world: int, rank: int) -> range:
    """Rank ``rank``'s contiguous block of shard indices (uneven splits allowed)."""
    base, extra = divmod(num_shards, world)
    start = base * rank + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _teacher_device(teacher) -> torch.device:
    weight = getattr(teacher, "head_weight", None)
    if torch.is_tensor(weight):
        return weight.device
    params = getattr(teacher, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def _all_ranks(group, what: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` on this rank, then agree with every rank on success (one all-reduce MIN),
    so one rank's error stops all of them instead of leaving them waiting at a barrier."""
    err = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
        err = e
    if group is not None and dist.get_world_size(group) > 1:
        dev = (torch.device("cuda", torch.cuda.current_device())
               if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        ok = torch.tensor([0 if err else 1], device=dev)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        if err is None and int(ok.item()) == 0:
            raise RuntimeError(f"relabel: another rank failed while {what}; the shards that were "
                               "completed are kept, re-run the same command to resume")
    if err is not None:
        raise err


@torch.no_grad()
def _write_shards(teacher, split, writer: StoreWriter, shards: range, batch_size: int,
                  device: torch.device, log: Callable[[str], None] | None) -> None:
    plan = writer.plan
    sharded = getattr(teacher, "encode_rows", None) is not None   # a class-sharded teacher
    for i in shards:
        if writer.shard_done(i):
            if log:
                log(f"relabel: shard {i + 1}/{plan.num_shards} already complete, skipped")
            continue
        start, stop = plan.shard_range(i)
        bufs = writer.empty_shard(i)
        for b0 in range(start, stop, batch_size):
            b1 = min(b0 + batch_size, stop)
            if sharded:   # every rank runs its rows of every batch; rank 0 writes
                rows = teacher.encode_rows(split, b0, b1, plan, device)
                for role, arr in (rows or {}).items():
                    bufs[role][b0 - start:b1 - start] = arr
                continue
            x, _ = split.get(torch.arange(b0, b1))
            if plan.features:     # logits from the features, as the training path does
                f = teacher.features(x.to(device))
                rows = encode_logits(f @ teacher.head_weight.T, plan, f)
            else:
                rows = encode_logits(teacher.logits(x.to(device)), plan, row0=b0)
            if len(rows["logits"]) != b1 - b0:
                raise ValueError(f"teacher returned {len(rows['logits'])} rows for a batch of "
                                 f"{b1 - b0} samples")
            for role, arr in rows.items():
                bufs[role][b0 - start:b1 - start] = arr
        if not sharded or group_rank(teacher.group) == 0:
            writer.write_shard(i, bufs)
        if log:
            log(f"relabel: shard {i + 1}/{plan.num_shards} written (samples [{start}, {stop}))")


def relabel(teacher, split, out_dir: str | Path, *, num_classes: int, topk: int | None,
            full_threshold: int, batch_size: int, dataset_fingerprint, teacher_fingerprint: str,
            group=None, dtype: str = "float16", shard_rows: int | None = None,
            device: torch.device | None = None, overwrite: bool = False,
            log: Callable[[str], None] | None = None, features: bool = False,
            kind: str = "topk", temperature: float = 1.0, seed: int = 0) -> Path:
    """Run ``teacher.logits(x) -> (B, C)`` over every sample of ``split`` and write the store.

    Layout: ``full`` (all C logits) when C <= full_threshold, else ``topk`` with
    K = min(topk, C). dtype: storage dtype of the logits. shard_rows: samples per shard
    (default: ~256 MiB shards). group: the process group of the writer ranks (None = one
    process); every rank must call this with the same arguments, and out_dir must be on a
    file system all of them see. device: where the teacher's inputs go (default: the
    teacher's own). overwrite: delete whatever store out_dir holds and start afresh
    (default: resume a store of the same settings, refuse one of other settings). log: an
    optional callback for one line per shard. features: also store the teacher's features
    and its head (top-K layout; the teacher must have ``features(x)`` and ``head_weight``),
    so that sampled methods get the exact teacher logit at every column. kind "sampled":
    the unbiased sampled layout instead (``dkd.teacher.sparse_target``: K = topk draws at
    ``temperature``, seeded by ``seed`` and the row; never with features). Returns out_dir.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layout, k = choose_layout(num_classes, topk, full_threshold, kind)
    if shard_rows is None:
        width, itemsize = (num_classes, 0) if layout == "full" else (k, 4)
        shard_rows = default_shard_rows(width * (np.dtype(dtype).itemsize + itemsize) + 8)
    d_t = int(teacher.head_weight.shape[1]) if features and layout == "topk" else 0
    plan = StorePlan(len(split), num_classes, layout, k, dtype, shard_rows,
                     teacher_fingerprint, dataset_fingerprint, features=d_t,
                     temperature=temperature, seed=seed)
    writer = StoreWriter(out_dir, plan)
    rank, world = group_rank(group), group_size(group)
    device = device if device is not None else _teacher_device(teacher)
    _all_ranks(group, "preparing the output directory",
               lambda: writer.prepare(overwrite) if rank == 0 else None)
    if getattr(teacher, "encode_rows", None) is not None:
        if layout != "topk" or d_t:
            raise ValueError("a class-sharded teacher writes top-K stores without features "
                             f"(got layout {layout!r}{', features' if d_t else ''})")
        mine = range(plan.num_shards)   # all ranks on every shard, each on its rows
    else:
        mine = rank_shards(plan.num_shards, world, rank)
    _all_ranks(group, "writing shards",
               lambda: _write_shards(teacher, split, writer, mine, batch_size, device, log))
    _all_ranks(group, "writing the manifest", lambda: writer.finalize(
        writer.write_head(teacher.head_weight) if d_t else None) if rank == 0 else None)
    return Path(out_dir)


# ----------------------------------------------------------------------------- fingerprints

def state_fingerprint(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if torch.is_tensor(t):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{name}|{t!r}|".encode())
    return h.hexdigest()


def teacher_fingerprint(teacher) -> str:
    """"file-sha256:<hex>" of the teacher's model file (LiveTeacher), else
    "state-sha256:<hex>" of its state dict; anything else must be fingerprinted by the caller."""
    path = getattr(teacher, "path", None)
    if path is not None and Path(path).is_file():
        return "file-sha256:" + file_sha256(Path(path))
    if callable(getattr(teacher, "state_dict", None)):
        return "state-sha256:" + state_fingerprint(teacher.state_dict())
    raise ValueError(f"cannot fingerprint a {type(teacher).__name__}: pass teacher_fingerprint "
                     "explicitly")


def dataset_fingerprint(data_cfg, split: str = "train") -> dict:
    """The data config fields that determine a split's samples, plus the split's name.

    ``data_cfg`` is a ``DataConfig`` (pydantic). Left out: ``augment`` (a training-time
    transform: relabel the un-augmented samples, train with or without it) and, for the
    train split, ``test_size`` (it only sizes the synthetic test split). A ``root`` enters
    as its path, not its contents: the store's N check is what catches a changed folder.
    """
    fp = data_cfg.model_dump()
    fp.pop("augment", None)
    if split == "train":
        fp.pop("test_size", None)
    return {"split": split, **fp}
