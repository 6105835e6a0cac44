"""Where a run's teacher logits come from: a live teacher (a run's model.pt) or a
precomputed soft-label store, behind one interface: ``logits(x, ids) -> (B, C)``."""
from __future__ import annotations

import torch

from dkd.config import SAMPLED_METHODS, TEACHER_FREE_METHODS, ConfigError, RunConfig
from dkd.teacher.live import LiveTeacher
from dkd.teacher.relabel import dataset_fingerprint
from dkd.teacher.store import SoftLabelStore, require_full


class StoreTeacher:
    """Teacher logits read from a soft-label store by sample id.

    A top-K store gives the KD-topk teacher: classes outside a sample's top K share the
    remaining mass evenly. Sampled methods use it as is (their proposals over ranks treat
    ranks beyond K as exchangeable); full-softmax methods need `allow_topk_completion`.
    """

    def __init__(self, store: SoftLabelStore, head_weight: torch.Tensor | None,
                 device: torch.device | None = None):
        # a store with features carries the teacher head its features belong to
        self.store = store
        head = store.head if store.head is not None else head_weight
        self.head_weight = head.to(device) if head is not None and device is not None else head

    def logits(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.store.dense_logits(ids, allow_topk_completion=True).to(x.device)

    def topk(self, x: torch.Tensor, ids: torch.Tensor, k: int):
        """(ids (B, k'), logits (B, k'), lse (B,), features (B, d_t) or None), k' = min(k,
        the store's K): no B x C. Without stored features, classes outside the top-K take
        the completion logit."""
        batch = self.store.get(ids)
        k = min(k, batch.topk_ids.shape[1]) if batch.topk_ids is not None else k
        feats = None if batch.feats is None else batch.feats.to(x.device)
        return (*(t.to(x.device) for t in batch.topk(k)), feats)


def _open_store(cfg: RunConfig, num_samples: int, num_classes: int) -> SoftLabelStore:
    store = SoftLabelStore(cfg.teacher.store, expect_dataset=dataset_fingerprint(cfg.data),
                           expect_num_samples=num_samples, expect_num_classes=num_classes,
                           verify=True)   # every shard hashed at open, not in the step
    if cfg.method.name not in SAMPLED_METHODS:
        require_full(store, cfg.method.name, cfg.teacher.allow_topk_completion,
                     how_to_allow="--set teacher.allow_topk_completion=true")
    if store.layout == "sampled" and cfg.method.temperature != store.temperature:
        raise ConfigError(f"the soft-label store {store.path} is sampled at temperature "
                          f"{store.temperature}: its target is unbiased only at that "
                          f"temperature; set method.temperature={store.temperature} (got "
                          f"{cfg.method.temperature})")
    return store


def build_teacher(cfg: RunConfig, data, device: torch.device, ctx=None):
    """The run's teacher, or None for teacher-free methods; refuses what cannot work.
    ``ctx`` (the DistContext): where a class-sharded teacher (teacher.sharded) splits."""
    t = cfg.teacher
    if cfg.method.name in TEACHER_FREE_METHODS:
        return None
    if t.checkpoint is None and t.store is None:
        raise ConfigError(f"method {cfg.method.name!r} needs a teacher: set teacher.checkpoint "
                          "to a teacher run directory (or teacher.store to a soft-label store)")
    if t.sharded:
        return _sharded(cfg, data, device, ctx)
    live = LiveTeacher(t.checkpoint, data.num_classes, data.input_dim, device,
                       **data.backbone_kwargs()) if t.checkpoint is not None else None
    if t.store is None:
        return live
    if cfg.method.name in ("kd_sim", "kd_pt_sim") and live is None:
        raise ConfigError(f"method {cfg.method.name!r} needs the teacher's head weights: set "
                          "teacher.checkpoint as well as teacher.store")
    return StoreTeacher(_open_store(cfg, len(data.train), data.num_classes),
                        live.head_weight if live else None, device)


def _sharded(cfg: RunConfig, data, device, ctx):
    from dkd.head.shard import shard_range
    from dkd.teacher.sharded import SHARDED_TEACHER_METHODS, ShardedTeacher
    if cfg.teacher.store is not None or cfg.teacher.checkpoint is None:
        raise ConfigError("teacher.sharded: shards a live teacher; set teacher.checkpoint and "
                          "not teacher.store (a store is already read by sample, not by class)")
    if cfg.method.name not in SHARDED_TEACHER_METHODS:
        raise ConfigError(f"teacher.sharded: method {cfg.method.name!r} needs the whole teacher "
                          f"on every rank; the class-sharded teacher serves "
                          f"{', '.join(SHARDED_TEACHER_METHODS)}")
    if cfg.method.dis_refit_every:
        raise ConfigError("teacher.sharded: method.dis_refit_every probes dense teacher rows; "
                          "set it to 0")
    world, rank = (ctx.world, ctx.rank) if ctx is not None else (1, 0)
    start, end = shard_range(data.num_classes, world, rank)
    return ShardedTeacher(cfg.teacher.checkpoint, data.num_classes, data.input_dim, device,
                          start, end, ctx.group if ctx is not None else None,
                          **data.backbone_kwargs())
