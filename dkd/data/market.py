"""Market-1501 person re-identification (Zheng et al. 2015), standard layout:

    <root>/bounding_box_train/*.jpg   training images (751 identities in the release)
    <root>/bounding_box_test/*.jpg    the gallery
    <root>/query/*.jpg                the queries

File names are ``PPPP_cCsS_FFFFFF_BB.jpg``: identity PPPP, camera C. The standard protocol
(as in torchreid / open-reid):
- identity -1 ("junk": bad detections) is skipped in every split;
- identity 0000 (distractors) is kept in the gallery, where it never matches a query, and
  skipped in the training split (it is not a person class);
- training identities are relabelled to 0..N_id-1 in increasing identity order;
- query and gallery samples carry (identity, camera); their ``y`` is the identity itself,
  not a class, and retrieval (dkd.metrics.reid_retrieval) excludes, per query, gallery
  images of the same identity seen by the same camera.
Cameras are kept as in the file name (c1 -> 1). Files not named this way are skipped and
counted in a warning; images that fail to decode likewise.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from dkd.data.checks import DatasetError, require_paths
from dkd.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageSplit, decode_images

SUBDIRS = ["bounding_box_train", "bounding_box_test", "query"]
_NAME = re.compile(r"^(-?\d+)_c(\d+)")
DEFAULT_SIZE = (128, 64)  # (height, width)


def parse_name(name: str) -> Optional[tuple[int, int]]:
    """'0002_c1s1_000451_03.jpg' -> (2, 1); '-1_c3s2_...' -> (-1, 3); None if not matching."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_root(root: Path) -> Path:
    """``root`` itself, or its single release subfolder (e.g. Market-1501-v15.09.15)."""
    if not all((root / d).is_dir() for d in SUBDIRS) and root.is_dir():
        inner = [p for p in root.iterdir() if p.is_dir() and all((p / d).is_dir() for d in SUBDIRS)]
        if len(inner) == 1:
            return inner[0]
    require_paths(root, SUBDIRS, "market1501")
    return root


def scan(folder: Path, keep_distractors: bool) -> tuple[list[Path], list[int], list[int]]:
    """jpg files of one split -> (paths, identities, cameras), junk (-1) removed."""
    paths, ids, cams, unnamed = [], [], [], 0
    for p in sorted(folder.glob("*.jpg")):
        parsed = parse_name(p.name)
        if parsed is None:
            unnamed += 1
            continue
        pid, cam = parsed
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue
        paths.append(p), ids.append(pid), cams.append(cam)
    if unnamed:
        warnings.warn(f"market1501: skipped {unnamed} files in {folder} not named "
                      "'<identity>_c<camera>...jpg'", stacklevel=2)
    if not paths:
        raise DatasetError(f"market1501: no usable '<identity>_c<camera>*.jpg' images in {folder}")
    return paths, ids, cams


def _split(folder: Path, size: tuple[int, int], keep_distractors: bool, relabel: bool,
           augment: bool, seed: int) -> ImageSplit:
    paths, ids, cams = scan(folder, keep_distractors)
    images, kept = decode_images(paths, size, f"market1501 {folder.name}")
    ids_t = torch.tensor(ids, dtype=torch.long)[kept]
    cams_t = torch.tensor(cams, dtype=torch.long)[kept]
    if relabel:
        # searchsorted over the sorted identities: identity -> 0..N_id-1
        labels = torch.searchsorted(torch.unique(ids_t), ids_t)
    else:
        labels = ids_t.clone()
    return ImageSplit(images, labels, IMAGENET_MEAN, IMAGENET_STD, augment=augment, seed=seed,
                      ids=ids_t, cams=cams_t, paths=[p for p, k in zip(paths, kept.tolist()) if k])


def load_market1501(root: str | Path, image_size: Optional[tuple[int, int]] = None,
                    augment: bool = False, seed: int = 0
                    ) -> tuple[ImageSplit, ImageSplit, ImageSplit, int]:
    """-> (train, query, gallery, number of training identities)."""
    base = find_root(Path(root))
    size = tuple(image_size or DEFAULT_SIZE)
    train = _split(base / "bounding_box_train", size, False, True, augment, seed)
    query = _split(base / "query", size, False, False, False, seed)
    gallery = _split(base / "bounding_box_test", size, True, False, False, seed)
    return train, query, gallery, int(train.labels.max()) + 1
