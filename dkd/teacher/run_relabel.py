"""`dkd relabel`: run the teacher of a config once over its training set and write the
soft-label store at `teacher.store` (distributed over ranks under torchrun)."""
from __future__ import annotations

from pathlib import Path

from dkd.config import ConfigError, RunConfig
from dkd.data import build_data
from dkd.engine.distributed import init_distributed
from dkd.teacher.live import LiveTeacher
from dkd.teacher.relabel import dataset_fingerprint, relabel, teacher_fingerprint


def run_relabel(cfg: RunConfig, overwrite: bool = False, batch_size: int = 1024) -> Path:
    t = cfg.teacher
    if t.checkpoint is None or t.store is None:
        raise ConfigError("dkd relabel needs teacher.checkpoint (the teacher to run) and "
                          "teacher.store (where to write the store)")
    ctx = init_distributed(cfg.dist.device, cfg.dist.timeout_s)
    data = build_data(cfg.data)
    if t.sharded and (t.store_features or t.store_kind != "topk"
                      or data.num_classes <= t.store_full_threshold):
        raise ConfigError("teacher.sharded: dkd relabel writes a top-K store without features "
                          "(teacher.store_kind = topk, store_features = false, and more classes "
                          f"than store_full_threshold = {t.store_full_threshold})")
    if t.sharded:   # each rank holds its classes' teacher rows (dkd/teacher/sharded.py)
        from dkd.head.shard import shard_range
        from dkd.teacher.sharded import ShardedTeacher
        teacher = ShardedTeacher(t.checkpoint, data.num_classes, data.input_dim, ctx.device,
                                 *shard_range(data.num_classes, ctx.world, ctx.rank),
                                 ctx.group, **data.backbone_kwargs())
    else:
        teacher = LiveTeacher(t.checkpoint, data.num_classes, data.input_dim, ctx.device)
    log = (lambda line: print(line, flush=True)) if ctx.is_rank0 else None
    return relabel(teacher, data.train, t.store, num_classes=data.num_classes,
                   topk=t.store_topk, full_threshold=t.store_full_threshold,
                   batch_size=batch_size, dataset_fingerprint=dataset_fingerprint(cfg.data),
                   teacher_fingerprint=teacher_fingerprint(teacher), group=ctx.group,
                   dtype=t.store_dtype, device=ctx.device, overwrite=overwrite, log=log,
                   features=t.store_features, kind=t.store_kind,
                   temperature=t.store_temperature, seed=cfg.seed)
