"""Any image classification tree, in one of two layouts:

    <root>/<class>/*.jpg|png|...                 split per class by data.train_fraction
    <root>/train/<class>/...  <root>/test/<class>/...   the given split

Classes are the sub-directory names in sorted order (class index = position), taken from
the whole tree (first layout) or from ``train/`` (second layout; a ``test/`` class missing
from ``train/`` is an error). The fraction split is per class: the class's files, sorted by
name, are permuted with ``seed`` and the first round(fraction * n) (at least one, and at
least one left for test when n >= 2) go to training. Images that fail to decode are skipped
and counted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dkd.data.checks import DatasetError
from dkd.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageSplit, decode_images, list_images

DEFAULT_SIZE = (32, 32)
_LAYOUT = ("expected <root>/<class>/<image files> or <root>/train/<class>/... and "
           "<root>/test/<class>/...")


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _tree(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = list_images(root / name) if (root / name).is_dir() else []
        paths += files
        labels += [c] * len(files)
    return paths, labels


def fraction_split(n: int, fraction: float, seed: int, salt: int) -> tuple[list[int], list[int]]:
    """Indices 0..n-1 -> (train, test), a seeded permutation cut at round(fraction * n)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    perm = torch.randperm(n, generator=g).tolist()
    cut = min(max(1, round(fraction * n)), n - 1) if n >= 2 else n
    return sorted(perm[:cut]), sorted(perm[cut:])


def _make(paths: list[Path], labels: list[int], size, what: str, augment: bool,
          seed: int) -> ImageSplit:
    images, kept = decode_images(paths, size, what)
    y = torch.tensor(labels, dtype=torch.long)[kept]
    return ImageSplit(images, y, IMAGENET_MEAN, IMAGENET_STD, augment=augment, seed=seed,
                      paths=[p for p, k in zip(paths, kept.tolist()) if k])


def load_imagefolder(root: str | Path, image_size: Optional[tuple[int, int]] = None,
                     train_fraction: float = 0.9, augment: bool = False, seed: int = 0
                     ) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """-> (train, test, class names)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"imagefolder: {root} is not a directory ({_LAYOUT})")
    size = tuple(image_size or DEFAULT_SIZE)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in class_dirs(root / "train")]
        extra = sorted({p.name for p in class_dirs(root / "test")} - set(classes))
        if extra:
            raise DatasetError(f"imagefolder: {root / 'test'} has classes not in "
                               f"{root / 'train'}: {extra[:10]}")
        tr_paths, tr_labels = _tree(root / "train", classes)
        te_paths, te_labels = _tree(root / "test", classes)
    else:
        classes = [p.name for p in class_dirs(root)]
        tr_paths, tr_labels, te_paths, te_labels = [], [], [], []
        for c, name in enumerate(classes):
            files = list_images(root / name)
            tr, te = fraction_split(len(files), train_fraction, seed, c)
            tr_paths += [files[i] for i in tr]
            te_paths += [files[i] for i in te]
            tr_labels += [c] * len(tr)
            te_labels += [c] * len(te)
    if len(classes) < 2 or not tr_paths:
        raise DatasetError(f"imagefolder: {root} holds {len(classes)} class folders and "
                           f"{len(tr_paths)} training images; {_LAYOUT}, with at least 2 "
                           "classes")
    if not te_paths:
        raise DatasetError(f"imagefolder: {root}: no test images ({_LAYOUT})")
    train = _make(tr_paths, tr_labels, size, f"imagefolder {root} train", augment, seed)
    test = _make(te_paths, te_labels, size, f"imagefolder {root} test", False, seed)
    return train, test, classes
