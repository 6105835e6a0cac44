"""The soft-label store: the teacher's logits for every training sample, written once by
`dkd relabel` (the writer is ``dkd.teacher.relabel``) and memory-mapped by training.

A store is a directory::

    manifest.json                   written last: its presence means "complete"
    shard-00000.json                per-shard record (row range, sha256 of its files)
    shard-00000.logits.npy          full layout: (rows, C) raw logits
    shard-00000.ids.npy             topk layout: (rows, K) class ids, sorted by logit desc.
    shard-00000.logits.npy                       (rows, K) their logits
    shard-00000.lse.npy                          (rows,) float32 log-sum-exp of all C logits
    shard-00000.tail_lse.npy                     (rows,) float32 log-sum-exp of the C - K
                                                 logits outside the top K (-inf if K = C)
    shard-00000.feats.npy           topk layout with features: (rows, d_t) the teacher's
    teacher_head.npy                features, and its (C, d_t) float32 head: the exact
                                    teacher logit of any class (sampled methods use it at
                                    their sampled columns instead of the completion)

Logits are raw (temperature-free, T = 1): the temperature is applied at training time.
The KD-topk teacher (Tang et al. 2020) spreads the tail mass exp(lse) - sum exp(top-K)
evenly over the C - K other classes. That difference cancels catastrophically when the top
K hold nearly all the mass (a top logit of 42 and a tail share of 1e-14 is lost even in
float64, worse still with float16 top-K logits), so the store keeps the tail's own
log-sum-exp too (4 bytes a sample) and the completion uses it. A store with K >= C holds
every logit and behaves exactly like a ``full`` store.

Every write is atomic (temporary file, fsync, rename) and every shard file carries a
sha256, so an interrupted relabel resumes shard by shard and a corrupted file is named.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dkd.config import ConfigError
from dkd.teacher.store_plan import FORMAT, MANIFEST, VERSION, _diff, canonical, file_sha256

_REQUIRED = ("num_samples", "num_classes", "layout", "k", "dtypes", "teacher_fingerprint",
             "dataset_fingerprint", "shards")


class StoreError(ConfigError):
    """A soft-label store that cannot be used; the message says which check failed."""


# ----------------------------------------------------------------------------- reading

def tail_logit(topk_logits: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """KD-topk completion from (top-K, lse) alone: the logit of every class outside the top
    K, log((exp(lse) - sum_k exp(topk_k)) / (C - K)), (B,) float64; -inf if K >= C.

    Computed as lse + log(-expm1(lse_topk - lse)) - log(C - K), so nothing overflows; a
    tail that rounds to <= 0 is floored at the smallest float64 (finite, negligible). It
    still cancels when the tail share is below lse's rounding (~1e-7 for float32 lse): a
    store batch carries the exact ``tail_logit`` instead, prefer it.
    """
    k = topk_logits.shape[-1]
    lse = lse.double()
    if k >= num_classes:
        return torch.full_like(lse, float("-inf"))
    head = topk_logits.double().logsumexp(-1)                          # (B,)
    rest = (-torch.expm1(head - lse)).clamp_min(torch.finfo(torch.float64).tiny)
    return lse + torch.log(rest) - math.log(num_classes - k)


def complete_topk(topk_ids: torch.Tensor, topk_logits: torch.Tensor, tail: torch.Tensor,
                  num_classes: int) -> torch.Tensor:
    """Dense (B, C) float32 logits of the KD-topk teacher: the top K as given, every other
    class the per-sample tail logit ``tail`` (B,) (exact when K >= C: nothing is filled).
    softmax of the result at T = 1 is ``kd_topk_target`` of the original logits; at T != 1
    it is a flat-tail teacher, not softmax(a / T) truncated (that would need lse(a / T)).
    """
    out = tail.float().unsqueeze(1).expand(-1, num_classes).clone()    # (B, C)
    return out.scatter_(1, topk_ids.long(), topk_logits.float())


@dataclass
class TeacherBatch:
    """Teacher data of a batch of samples, float32 / int64 CPU tensors.

    ``logits`` is set when the store holds every logit (full layout, or top-K with K >= C);
    the top-K fields when the store is top-K (``tail_logit`` = the KD-topk logit of every
    class outside the top K, log(tail mass / (C - K)); -inf when K >= C).
    """

    num_classes: int
    logits: torch.Tensor | None = None        # (B, C)
    topk_ids: torch.Tensor | None = None      # (B, K) sorted by teacher logit, descending
    topk_logits: torch.Tensor | None = None   # (B, K)
    lse: torch.Tensor | None = None           # (B,) log-sum-exp of all C logits
    tail_logit: torch.Tensor | None = None    # (B,)
    feats: torch.Tensor | None = None         # (B, d_t) teacher features (if stored)

    @property
    def exact(self) -> bool:
        """True when every teacher logit is known (no completion needed)."""
        return self.logits is not None

    def dense(self, allow_topk_completion: bool = False) -> torch.Tensor:
        """(B, C) logits: exact, or the KD-topk completion when explicitly allowed."""
        if self.logits is not None:
            return self.logits
        if not allow_topk_completion:
            raise StoreError(f"the store holds only the teacher's top-{self.topk_ids.shape[1]} "
                             f"of {self.num_classes} logits; dense logits need "
                             "allow_topk_completion=True (the KD-topk teacher)")
        return complete_topk(self.topk_ids, self.topk_logits, self.tail_logit, self.num_classes)

    def topk(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, k), logits (B, k), lse (B,)) from either layout; k <= the stored K."""
        if self.topk_ids is not None:
            if k is not None and k > self.topk_ids.shape[1]:
                raise StoreError(f"asked for the teacher's top-{k} but the store holds only "
                                 f"K = {self.topk_ids.shape[1]}; relabel with topk >= {k}")
            return (self.topk_ids[:, :k].contiguous(), self.topk_logits[:, :k].contiguous(),
                    self.lse)
        vals, ids = self.logits.topk(min(k or self.num_classes, self.num_classes), dim=1)
        return ids, vals, self.logits.logsumexp(1)

    def to(self, device) -> "TeacherBatch":
        move = {f: (getattr(self, f).to(device) if getattr(self, f) is not None else None)
                for f in ("logits", "topk_ids", "topk_logits", "lse", "tail_logit", "feats")}
        return TeacherBatch(self.num_classes, **move)


class SoftLabelStore:
    """Memory-mapped reader of a store, checked against what the caller expects.

    verify: True hashes every shard now (reads the whole store); "lazy" hashes a shard the
    first time a sample of it is read; False never (shapes and dtypes are always checked).
    expect_*: None skips that check. Every refusal is a ``StoreError`` naming the check.
    """

    def __init__(self, path: str | Path, *, expect_dataset=None,
                 expect_num_samples: int | None = None, expect_num_classes: int | None = None,
                 expect_teacher: str | None = None, verify: bool | str = True):
        if verify not in (True, False, "lazy"):
            raise ValueError(f"verify must be True, False or 'lazy', got {verify!r}")
        self.path = Path(path)
        self.manifest = m = self._load_manifest()
        self.num_samples, self.num_classes = m["num_samples"], m["num_classes"]
        self.layout, self.k = m["layout"], m["k"]
        self.temperature = m.get("temperature")   # sampled layout: its draws' tau
        self._check(expect_num_samples, expect_num_classes, expect_dataset, expect_teacher)
        self._shards = m["shards"]
        self._check_shard_ranges()
        self._starts = np.array([s["start"] for s in self._shards], dtype=np.int64)
        self._arrays = [self._open_shard(s) for s in self._shards]
        self.head = self._open_head(verify) if m.get("features") else None
        self._verify_mode, self._verified = verify, set()
        if verify is True:
            for i in range(len(self._shards)):
                self._verify(i)

    def __getstate__(self) -> dict:
        """Pickle without the memory maps (pickling a memmap copies its data); a worker
        process reopens them."""
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arrays = [self._open_shard(s) for s in self._shards]

    # -- checks (each message says which check failed) --
    def _fail(self, what: str) -> StoreError:
        return StoreError(f"soft-label store {self.path}: {what}")

    def _load_manifest(self) -> dict:
        if not self.path.is_dir():
            raise self._fail("directory does not exist")
        p = self.path / MANIFEST
        if not p.exists():
            raise self._fail(f"missing {MANIFEST}: not a soft-label store, or its `dkd relabel` "
                             "did not finish (re-run it on this directory to resume)")
        try:
            m = json.loads(p.read_text())
        except ValueError as err:
            raise self._fail(f"{MANIFEST} is not valid JSON ({err})") from None
        if m.get("format") != FORMAT:
            raise self._fail(f"{MANIFEST} format is {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("version") != VERSION:
            raise self._fail(f"manifest version {m.get('version')!r} is unknown (this dkd "
                             f"reads version {VERSION}); relabel with this dkd")
        missing = sorted(set(_REQUIRED) - set(m))
        if missing or m["layout"] not in ("full", "topk", "sampled"):
            raise self._fail(f"{MANIFEST} is malformed (missing {missing}, layout "
                             f"{m.get('layout')!r}); relabel with overwrite")
        return m

    def _check(self, n, c, dataset, teacher) -> None:
        if n is not None and n != self.num_samples:
            raise self._fail(f"N mismatch: the store holds N = {self.num_samples} samples, the "
                             f"dataset split has {n}; relabel for this dataset")
        if c is not None and c != self.num_classes:
            raise self._fail(f"C mismatch: the store holds C = {self.num_classes} classes, the "
                             f"dataset has {c}; relabel for this dataset")
        got = self.manifest["dataset_fingerprint"]
        if dataset is not None and canonical(got) != canonical(dataset):
            raise self._fail(f"dataset fingerprint differs (store vs expected: "
                             f"{_diff(got, dataset)}); relabel for this dataset")
        got = self.manifest["teacher_fingerprint"]
        if teacher is not None and got != teacher:
            raise self._fail(f"teacher fingerprint differs (store {got!r}, expected "
                             f"{teacher!r}); relabel with this teacher")

    def _check_shard_ranges(self) -> None:
        pos = 0
        for s in self._shards:
            if s["start"] != pos or s["stop"] <= s["start"]:
                raise self._fail(f"manifest shards do not tile [0, {self.num_samples}) "
                                 f"(shard {s['index']} covers [{s['start']}, {s['stop']}))")
            pos = s["stop"]
        if pos != self.num_samples:
            raise self._fail(f"manifest shards cover {pos} of N = {self.num_samples} samples")

    def _open_shard(self, s: dict) -> dict[str, np.ndarray]:
        roles = ("logits",) if self.layout == "full" else ("ids", "logits", "lse", "tail_lse")
        roles += ("feats",) if self.manifest.get("features") else ()
        arrays = {}
        for role in roles:
            f = s["files"][role]
            name = f["name"]
            if Path(name).name != name:
                raise self._fail(f"shard file name {name!r} is not a plain file name")
            if not (self.path / name).exists():
                raise self._fail(f"shard file {name} is missing")
            try:
                arr = np.load(self.path / name, mmap_mode="r")
            except (ValueError, OSError) as err:
                raise self._fail(f"shard file {name} cannot be read ({err}): truncated or "
                                 "corrupt; re-run `dkd relabel` on this directory") from None
            want = (s["stop"] - s["start"], *f["shape"][1:])
            if arr.shape != want or arr.dtype != np.dtype(self.manifest["dtypes"][role]):
                raise self._fail(f"shard file {name} has shape {arr.shape} {arr.dtype}, the "
                                 f"manifest says {want} {self.manifest['dtypes'][role]}")
            arrays[role] = arr
        return arrays

    def _open_head(self, verify) -> torch.Tensor:
        """The (C, d_t) float32 teacher head of a store with features (checked now unless
        verify is False: it is small)."""
        rec = self.manifest.get("head") or {}
        path = self.path / str(rec.get("name", ""))
        if not rec or Path(rec["name"]).name != rec["name"] or not path.is_file():
            raise self._fail("the manifest lists teacher features but its teacher_head.npy "
                             "is missing; re-run `dkd relabel` with overwrite")
        if verify is not False and file_sha256(path) != rec["sha256"]:
            raise self._fail(f"{rec['name']} fails its sha256 check: corruption detected; "
                             "re-run `dkd relabel` with overwrite")
        head = np.load(path)
        want = (self.num_classes, self.manifest["features"])
        if head.shape != want or head.dtype != np.float32:
            raise self._fail(f"{rec['name']} has shape {head.shape} {head.dtype}, expected "
                             f"{want} float32")
        return torch.from_numpy(head)

    def _verify(self, i: int) -> None:
        for f in self._shards[i]["files"].values():
            got = file_sha256(self.path / f["name"])
            if got != f["sha256"]:
                raise self._fail(f"shard file {f['name']} fails its sha256 check (expected "
                                 f"{f['sha256'][:16]}…, got {got[:16]}…): corruption detected; "
                                 "re-run `dkd relabel` on this directory to rewrite it")
        self._verified.add(i)

    # -- reading --
    @property
    def exact(self) -> bool:
        """True when the store holds every teacher logit (full, or top-K with K >= C)."""
        return self.layout == "full" or self.k >= self.num_classes

    def __len__(self) -> int:
        return self.num_samples

    def _gather(self, ids) -> dict[str, np.ndarray]:
        ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"sample ids must lie in [0, {self.num_samples}), got "
                             f"[{ids.min()}, {ids.max()}]")
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        out = {r: np.empty((len(ids), *a.shape[1:]), a.dtype) for r, a in self._arrays[0].items()}
        for s in np.unique(shard_of).tolist():
            if self._verify_mode == "lazy" and s not in self._verified:
                self._verify(s)
            sel = np.nonzero(shard_of == s)[0]
            local = ids[sel] - self._starts[s]
            for role, arr in self._arrays[s].items():
                out[role][sel] = arr[local]
        return out

    def get(self, sample_ids) -> TeacherBatch:
        """Teacher data of split-local sample ids (B,) -> ``TeacherBatch`` (CPU tensors)."""
        raw = self._gather(sample_ids)
        logits = torch.from_numpy(raw["logits"].astype(np.float32))
        if self.layout == "full":
            return TeacherBatch(self.num_classes, logits=logits)
        ids = torch.from_numpy(raw["ids"].astype(np.int64))
        rest = math.log(max(1, self.num_classes - self.k))           # C - K tail classes
        tail = (torch.from_numpy(raw["tail_lse"]).double() - rest).float()  # -inf if K >= C
        dense = complete_topk(ids, logits, tail, self.num_classes) if self.exact else None
        feats = torch.from_numpy(raw["feats"].astype(np.float32)) if "feats" in raw else None
        return TeacherBatch(self.num_classes, logits=dense, topk_ids=ids, topk_logits=logits,
                            lse=torch.from_numpy(raw["lse"]), tail_logit=tail, feats=feats)

    def dense_logits(self, sample_ids, allow_topk_completion: bool = False) -> torch.Tensor:
        """(B, C) float32 teacher logits; a top-K store (K < C) gives the KD-topk completion
        only with allow_topk_completion=True. Memory: B x C x 4 bytes."""
        return self.get(sample_ids).dense(allow_topk_completion)


def require_full(store: SoftLabelStore, method_name: str, allow_completion: bool,
                 how_to_allow: str = "allow_topk_completion=True") -> None:
    """Refuse a top-K store (K < C) for a method that needs all C teacher logits, unless the
    KD-topk completion was explicitly allowed."""
    if store.exact or allow_completion or store.layout == "sampled":
        return   # a sampled store's sparse target is complete: undrawn classes hold ~0
    raise StoreError(
        f"method {method_name!r} needs all {store.num_classes} teacher logits per sample, but "
        f"the soft-label store {store.path} holds only the top-{store.k} (layout topk, chosen "
        f"because C > full_threshold at relabel time). Either relabel with full_threshold >= "
        f"{store.num_classes} to store every logit, or set {how_to_allow} to train against "
        f"the KD-topk teacher (top-{store.k} exact, the remaining mass spread evenly over the "
        f"other {store.num_classes - store.k} classes), which is not the original teacher.")
