"""Datasets and the deterministic batch order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dkd.config import DataConfig
from dkd.data.synthetic import SyntheticSplit, SyntheticTask


@dataclass
class DataBundle:
    train: SyntheticSplit
    test: SyntheticSplit
    num_classes: int
    input_dim: int


def build_data(cfg: DataConfig) -> DataBundle:
    if cfg.kind == "synthetic":
        task = SyntheticTask(cfg.num_classes, cfg.input_dim, cfg.num_super_classes,
                             cfg.similarity, cfg.difficulty, cfg.seed)
        train = SyntheticSplit(task, 0, cfg.train_size)
        test = SyntheticSplit(task, cfg.train_size, cfg.test_size)
        return DataBundle(train, test, cfg.num_classes, cfg.input_dim)
    raise ValueError(f"data.kind: unknown dataset {cfg.kind!r}")


def global_batch_indices(step: int, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    """Sample ids of the global batch at ``step``: a function of the step alone.

    Epoch e visits a permutation seeded by (seed, e), dropping the last partial batch, so a
    resumed run sees exactly the data an uninterrupted run would, with no sampler state.
    """
    if batch_size > num_samples:
        raise ValueError(f"train.batch_size = {batch_size} exceeds the {num_samples} training samples")
    per_epoch = num_samples // batch_size
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return perm[j * batch_size:(j + 1) * batch_size]


def local_slice(batch_size: int, world: int, rank: int) -> slice:
    """This rank's contiguous rows of the global batch (uneven splits allowed)."""
    base, extra = divmod(batch_size, world)
    start = base * rank + min(rank, extra)
    return slice(start, start + base + (rank < extra))
