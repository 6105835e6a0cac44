"""The soft-label store's format: its constants, the plan (everything that determines a
store's bytes) and the helpers the writer (``dkd.teacher.relabel``) and the reader
(``dkd.teacher.store``) share."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "dkd-soft-label-store"
VERSION = 1
MANIFEST = "manifest.json"
LOGITS_NOTE = ("raw teacher logits, temperature-free (T = 1); apply the temperature at "
               "training time")
SAMPLED_NOTE = ("tau * log(n / K) of the classes drawn n of K times from softmax(a / tau); "
                "undrawn classes share 1e-9 of the mass: train at T = tau")



def canonical(obj) -> str:
    """Canonical JSON text of a fingerprint, so dict key order never matters."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class StorePlan:
    """Everything that determines a store's bytes; identical on every writer rank."""

    num_samples: int                       # N
    num_classes: int                       # C
    layout: str                            # "full" | "topk"
    k: int | None                          # stored classes per sample (topk), else None
    logits_dtype: str                      # "float16" | "float32"
    shard_rows: int                        # samples per shard (the last may be shorter)
    teacher_fingerprint: str
    dataset_fingerprint: object            # caller's str / dict (JSON-serialisable)
    features: int = 0                      # d_t of the stored teacher features (0: none)
    temperature: float = 1.0               # sampled layout: the draws' temperature tau
    seed: int = 0                          # sampled layout: the draws' seed
    ids_dtype: str = field(init=False)

    def __post_init__(self):
        if self.layout not in ("full", "topk", "sampled"):
            raise ValueError(f"layout must be 'full', 'topk' or 'sampled', got {self.layout!r}")
        if self.logits_dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {self.logits_dtype!r}")
        if self.num_samples < 1 or self.num_classes < 1 or self.shard_rows < 1:
            raise ValueError("num_samples, num_classes and shard_rows must be >= 1")
        if self.layout != "full" and not (self.k and 1 <= self.k <= self.num_classes):
            raise ValueError(f"{self.layout} layout needs 1 <= K <= C = {self.num_classes}, "
                             f"got {self.k}")
        if self.layout == "sampled" and not self.temperature > 0:
            raise ValueError(f"sampled layout needs a temperature > 0, got {self.temperature}")
        if self.features and self.layout != "topk":
            raise ValueError("teacher features are stored with the topk layout only (a full "
                             "store already holds every logit)")
        ids = "int32" if self.num_classes <= np.iinfo(np.int32).max else "int64"
        object.__setattr__(self, "ids_dtype", ids)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_rows)

    def shard_range(self, i: int) -> tuple[int, int]:
        start = i * self.shard_rows
        return start, min(start + self.shard_rows, self.num_samples)

    def roles(self) -> dict[str, tuple[str, tuple]]:
        """File role -> (dtype, per-row shape)."""
        if self.layout == "full":
            return {"logits": (self.logits_dtype, (self.num_classes,))}
        roles = {"ids": (self.ids_dtype, (self.k,)), "logits": (self.logits_dtype, (self.k,)),
                 "lse": ("float32", ()), "tail_lse": ("float32", ())}
        if self.features:
            roles["feats"] = (self.logits_dtype, (self.features,))
        return roles

    def header(self) -> dict:
        """The manifest without its shard list."""
        extra = {"features": self.features} if self.features else {}
        note = LOGITS_NOTE
        if self.layout == "sampled":
            extra.update(temperature=self.temperature, seed=self.seed)
            note = SAMPLED_NOTE
        return {**extra, "format": FORMAT, "version": VERSION, "num_samples": self.num_samples,
                "num_classes": self.num_classes, "layout": self.layout, "k": self.k,
                "dtypes": {r: d for r, (d, _) in self.roles().items()},
                "logits_note": note, "shard_rows": self.shard_rows,
                "teacher_fingerprint": self.teacher_fingerprint,
                "dataset_fingerprint": self.dataset_fingerprint}

    @property
    def plan_id(self) -> str:
        return hashlib.sha256(canonical(self.header()).encode()).hexdigest()


def choose_layout(num_classes: int, topk: int | None, full_threshold: int,
                  kind: str = "topk") -> tuple[str, int | None]:
    """kind "topk": ``full`` when C <= full_threshold, else ``topk`` with K = min(topk, C);
    kind "sampled": ``sampled`` with K = min(topk, C) draws, whatever C."""
    if kind == "sampled":
        if topk is None or topk < 1:
            raise ValueError(f"a sampled store needs topk >= 1 draws per sample, got {topk}")
        return "sampled", min(topk, num_classes)
    if num_classes <= full_threshold:
        return "full", None
    if topk is None or topk < 1:
        raise ValueError(f"C = {num_classes} > full_threshold = {full_threshold}: the store "
                         f"is top-K and needs topk >= 1, got {topk}")
    return "topk", min(topk, num_classes)


def _diff(a, b) -> str:
    """Human-readable differences between two fingerprints / headers."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        parts = [f"{k}: {a.get(k, '<absent>')!r} vs {b.get(k, '<absent>')!r}"
                 for k in keys if canonical(a.get(k)) != canonical(b.get(k))]
        return "; ".join(parts) or "identical"
    return f"{a!r} vs {b!r}"
