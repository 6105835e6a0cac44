"""CIFAR-100 from torchvision's `cifar-100-python` pickles (the files of
https://www.cs.toronto.edu/~kriz/cifar.html, extracted; nothing is downloaded).

Layout: ``<root>/cifar-100-python/{train,test,meta}`` (``root`` may also be the
``cifar-100-python`` directory itself). Each split pickle is a dict with ``data`` (N, 3072)
uint8, rows holding the R, G and B 32x32 planes in turn, ``fine_labels`` (N,) in 0..99 and
``coarse_labels``; ``meta`` holds ``fine_label_names``. The original files are Python 2
pickles (str keys read as bytes); both bytes and str keys are accepted.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dkd.data.checks import DatasetError, require_paths
from dkd.data.images import CIFAR100_MEAN, CIFAR100_STD, ImageSplit, resize_uint8

FILES = ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"]


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DatasetError(f"cifar100: {path} is not a readable CIFAR-100 pickle ({err})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"cifar100: {path} should hold a dict, got {type(raw).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def find_root(root: Path) -> Path:
    """The directory that contains ``cifar-100-python/``."""
    if root.name == "cifar-100-python" and (root / "train").exists():
        return root.parent
    hint = ""
    if (root / "cifar-100-python.tar.gz").exists():
        hint = f"extract {root / 'cifar-100-python.tar.gz'} first (tar xzf)"
    require_paths(root, FILES, "cifar100", hint)
    return root


def read_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One split pickle -> images uint8 (N, 3, 32, 32), fine labels long (N,)."""
    d = _load_pickle(path)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise DatasetError(f"cifar100: {path} has no '{key}' entry (keys: {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"cifar100: {path}: 'data' should be (N, 3072) uint8, got {data.shape}")
    if len(labels) != len(data):
        raise DatasetError(f"cifar100: {path}: {len(data)} images but {len(labels)} fine_labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        raise DatasetError(f"cifar100: {path}: fine_labels outside 0..99")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar100(root: str | Path, image_size: Optional[tuple[int, int]] = None,
                  augment: bool = False, seed: int = 0) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """-> (train, test, fine class names). Images are resized when image_size != (32, 32)."""
    base = find_root(Path(root)) / "cifar-100-python"
    size = tuple(image_size or (32, 32))
    meta = _load_pickle(base / "meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("fine_label_names", [])]
    if names and len(names) != 100:
        raise DatasetError(f"cifar100: {base / 'meta'} lists {len(names)} fine labels, expected 100")
    splits = []
    for name, aug in (("train", augment), ("test", False)):
        images, labels = read_split(base / name)
        splits.append(ImageSplit(resize_uint8(images, size), labels, CIFAR100_MEAN, CIFAR100_STD,
                                 augment=aug, seed=seed))
    return splits[0], splits[1], names or [str(i) for i in range(100)]
