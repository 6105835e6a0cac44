"""Image decoding and the in-memory image split shared by CIFAR-100, Market-1501 and
ImageFolder.

Images are decoded once, converted to RGB, resized to a fixed (H, W) and kept as uint8
(N, 3, H, W): memory is N * 3 * H * W bytes (Market-1501 at 128x64: ~0.9 GB for all
three splits). ``get`` normalises with fixed per-channel mean/std, so a sample is a pure
function of its index unless augmentation is on.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dkd.data.checks import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


def _decode(path: Path, size: tuple[int, int]) -> Optional[np.ndarray]:
    """One file -> (H, W, 3) uint8, or None when it does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces the full decode: truncated files raise here
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError):  # PIL's decode failures (incl. Unidentified)
        return None


def decode_images(paths: Sequence[Path], size: tuple[int, int], what: str,
                  workers: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``paths`` -> (uint8 (N_ok, 3, H, W), kept (N,) bool).

    Files that fail to decode are skipped with one warning giving the count and the first
    failure; if every file fails (or there are none) this raises DatasetError.
    """
    if not paths:
        raise DatasetError(f"{what}: no image files found")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(lambda p: _decode(p, size), paths))
    kept = torch.tensor([a is not None for a in arrays], dtype=torch.bool)
    bad = [p for p, a in zip(paths, arrays) if a is None]
    if len(bad) == len(paths):
        raise DatasetError(f"{what}: none of the {len(paths)} images could be decoded "
                           f"(first: {bad[0]})")
    if bad:
        warnings.warn(f"{what}: skipped {len(bad)} of {len(paths)} images that failed to "
                      f"decode (first: {bad[0]})", stacklevel=2)
    good = np.stack([a for a in arrays if a is not None])  # (N, H, W, 3)
    return torch.from_numpy(good).permute(0, 3, 1, 2).contiguous(), kept


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, h, w) uint8 -> (N, 3, H, W) uint8, bilinear (used for in-memory sources)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                        antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


class ImageSplit:
    """Images held as uint8 (N, 3, H, W) with labels y (N,).

    ``get(idx)`` -> x float32 (B, 3, H, W) normalised by (mean, std), y long (B,).
    Optional attributes of re-ID splits: ``ids`` (original identity) and ``cams`` (camera),
    both long (N,), and ``paths`` (the source file of each kept sample).

    Augmentation (``augment=True``, training splits only): random crop after zero padding
    of 1/8 of each side, and a horizontal flip with probability 1/2. Its randomness comes
    from a generator seeded by ``seed`` and advanced by every call, so a run is
    reproducible from its start; ``set_epoch`` reseeds it per epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: bool = False, seed: int = 0,
                 ids: Optional[torch.Tensor] = None, cams: Optional[torch.Tensor] = None,
                 paths: Optional[list[Path]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.augment, self.seed = augment, seed
        self.ids, self.cams, self.paths = ids, cams, paths
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self._gen.manual_seed(self.seed * 1_000_003 + epoch)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at split-local indices (B,) -> x (B, 3, H, W) float32, y (B,) long."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = (self.images[idx].float() - self.mean) / self.std
        if self.augment:
            x = self._augment(x)
        return x, self.labels[idx]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ph, pw = max(1, h // 8), max(1, w // 8)
        padded = F.pad(x, (pw, pw, ph, ph))  # zero = the mean colour after normalisation
        dy = torch.randint(0, 2 * ph + 1, (b,), generator=self._gen).tolist()
        dx = torch.randint(0, 2 * pw + 1, (b,), generator=self._gen).tolist()
        flip = (torch.rand(b, generator=self._gen) < 0.5).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        if any(flip):
            sel = torch.tensor(flip)
            out[sel] = out[sel].flip(-1)
        return out


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (deterministic order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
