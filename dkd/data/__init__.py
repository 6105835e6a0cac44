"""Datasets and the deterministic batch order."""
from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from dkd.config import DataConfig
from dkd.data.checks import DatasetError, check_world
from dkd.data.synthetic import SyntheticSplit, SyntheticTask

__all__ = ["DataBundle", "DatasetError", "build_data", "check_world", "global_batch_indices",
           "local_slice"]


@dataclass
class DataBundle:
    """The splits of a dataset and what a model needs to know about its inputs.

    Every split has ``__len__`` and ``get(idx (B,) long) -> (x float32, y long (B,))``.
    - classification (synthetic, cifar100, imagefolder): ``train`` and ``test`` labelled
      with classes 0..num_classes-1.
    - reid (market1501): ``train`` labelled with the relabelled training identities
      (num_classes of them); ``test`` is None; ``query`` and ``gallery`` are the retrieval
      splits: their ``y`` is the original identity, and they carry ``ids`` and ``cams``
      (long (N,)) for dkd.metrics.reid_retrieval. ``train`` carries them too.
    - text: ``train``/``test`` give (n previous token ids -> next token id); the classes are
      the vocabulary (``vocab``, index 0 = ``<unk>``), ``vocab_size == num_classes``.
    ``input_shape`` is the shape of one x: (input_dim,) for synthetic, (3, H, W) for images,
    (n,) for text; ``input_dim`` is its element count (the context length n for text).
    """
    train: Any
    test: Any
    num_classes: int
    input_dim: int
    task: Literal["classification", "reid", "text"] = "classification"
    input_shape: tuple[int, ...] = ()
    query: Any = None
    gallery: Any = None
    class_names: Optional[list[str]] = None
    vocab_size: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.input_shape:
            self.input_shape = (self.input_dim,)

    def backbone_kwargs(self) -> dict:
        """Extra keyword arguments of dkd.models.build_backbone for this data."""
        return {"input_shape": self.input_shape, "vocab_size": self.vocab_size}


def _image_bundle(train, test, num_classes: int, task: str = "classification",
                  **kw) -> DataBundle:
    c, h, w = train.image_shape
    return DataBundle(train, test, num_classes, c * h * w, task, (c, h, w), **kw)


def build_data(cfg: DataConfig) -> DataBundle:
    if cfg.kind == "synthetic":
        task = SyntheticTask(cfg.num_classes, cfg.input_dim, cfg.num_super_classes,
                             cfg.similarity, cfg.difficulty, cfg.seed)
        train = SyntheticSplit(task, 0, cfg.train_size)
        test = SyntheticSplit(task, cfg.train_size, cfg.test_size)
        return DataBundle(train, test, cfg.num_classes, cfg.input_dim)
    if cfg.kind == "cifar100":
        from dkd.data.cifar import load_cifar100
        train, test, names = load_cifar100(cfg.root, cfg.image_size, cfg.augment, cfg.seed)
        return _image_bundle(train, test, len(names), class_names=names)
    if cfg.kind == "imagefolder":
        from dkd.data.imagefolder import load_imagefolder
        train, test, names = load_imagefolder(cfg.root, cfg.image_size, cfg.train_fraction,
                                              cfg.augment, cfg.seed)
        return _image_bundle(train, test, len(names), class_names=names)
    if cfg.kind == "market1501":
        from dkd.data.market import load_market1501
        train, query, gallery, n_ids = load_market1501(cfg.root, cfg.image_size, cfg.augment,
                                                       cfg.seed)
        return _image_bundle(train, None, n_ids, "reid", query=query, gallery=gallery)
    if cfg.kind == "text":
        from dkd.data.text import TextCorpus
        corpus = TextCorpus(cfg.root, cfg.vocab_size, cfg.context, cfg.train_fraction)
        return DataBundle(corpus.train, corpus.test, corpus.vocab_size, cfg.context, "text",
                          (cfg.context,), class_names=corpus.itos, vocab_size=corpus.vocab_size,
                          extra={"corpus": corpus})
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
    return _epoch_permutation(num_samples, seed, epoch)[j * batch_size:(j + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``epoch``'s order, drawn once (an O(N) randperm per step costs more than the
    step at N = 10^6 samples); cached, so still a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def local_slice(batch_size: int, world: int, rank: int) -> slice:
    """This rank's contiguous rows of the global batch (uneven splits allowed)."""
    base, extra = divmod(batch_size, world)
    start = base * rank + min(rank, extra)
    return slice(start, start + base + (rank < extra))
