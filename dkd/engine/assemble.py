"""Assemble the parts of a run from the config: data, teacher, DeepSpeed engine for the
backbone, the class-sharded head (a sibling of the engine, never inside it) with its
row-sparse optimizer, and the softmax layer of the chosen method."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkd.config import ConfigError, RunConfig
from dkd.data import DataBundle, build_data
from dkd.engine.distributed import DistContext
from dkd.atomic import atomic_write_json
from dkd.engine.schedule import build_optimizer, head_lr
from dkd.engine.softmax_layer import SoftmaxLayer
from dkd.head.head import ShardedHead
from dkd.head.sparse_optim import SparseRowOptimizer
from dkd.models import build_backbone
from dkd.sampling.prior import class_prior, label_counts
from dkd.teacher.source import build_teacher


@dataclass
class TrainParts:
    ctx: DistContext
    data: DataBundle
    teacher: Any  # LiveTeacher, StoreTeacher or None
    teacher_weight: torch.Tensor | None
    engine: Any
    head: ShardedHead
    head_opt: SparseRowOptimizer
    layer: SoftmaxLayer
    dtype: torch.dtype = torch.float32
    lr: float = 0.0
    search: Any = None   # GateSearch of a `dkd search` run (dkd/search/searcher.py)


def use_bf16(cfg: RunConfig, ctx: DistContext) -> bool:
    if cfg.dist.precision == "bf16":
        return True
    return (cfg.dist.precision == "auto" and ctx.device.type == "cuda"
            and torch.cuda.is_bf16_supported())


def deepspeed_config(cfg: RunConfig, ctx: DistContext) -> dict:
    """The DeepSpeed config, derived from RunConfig (the one source of truth)."""
    micro = -(-cfg.train.batch_size // ctx.world)  # ranks may hold uneven rows
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.dist.grad_accum,
        "train_batch_size": micro * cfg.dist.grad_accum * ctx.world,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "gradient_clipping": cfg.dist.grad_clip,
        "bf16": {"enabled": use_bf16(cfg, ctx)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def head_optimizer(head: ShardedHead, cfg: RunConfig) -> SparseRowOptimizer:
    o = cfg.optim
    kind = o.head_name or o.name
    return head.make_optimizer(kind, lr=head_lr(o.lr, o), momentum=o.momentum,
                               weight_decay=o.weight_decay, catchup=o.head_catchup)


def check_inputs(cfg: RunConfig, ctx: DistContext) -> tuple[DataBundle, Any]:
    """Everything that can be refused before the run directory is touched; returns the
    data and the teacher (live, store, or None)."""
    if cfg.dist.precision == "bf16" and ctx.device.type != "cuda":
        raise ConfigError("dist.precision = bf16 needs a CUDA device; on CPU use fp32 "
                          "(or auto, which picks bf16 only where the device supports it)")
    try:
        data = build_data(cfg.data)
    except ValueError as err:  # wrong layout, empty text, undecodable images, ...
        raise ConfigError(f"data: {err}") from None
    if ctx.world > data.num_classes:
        raise ConfigError(f"world size {ctx.world} exceeds the {data.num_classes} classes "
                          f"(data.num_classes): every rank must own at least one class")
    if cfg.search.enabled:
        from dkd.search.space import check_searchable
        check_searchable(cfg.model)
    if cfg.model.arch == "searched":   # a bad spec is refused here, by file name
        from dkd.search.space import build_searched
        build_searched(cfg.model, data.input_dim, **data.backbone_kwargs())
    k = cfg.method.k
    if k is not None and k >= data.num_classes:
        raise ConfigError(f"method.k = {k} must be < the dataset's {data.num_classes} classes")
    return data, build_teacher(cfg, data, ctx.device, ctx)


def assemble(cfg: RunConfig, ctx: DistContext, data: DataBundle, teacher,
             run_dir: Path) -> TrainParts:
    import deepspeed

    if cfg.dist.precision == "auto" and ctx.device.type == "cuda":
        # TF32 tensor-core matmuls for the backbone (and the head's GEMMs); the head's loss
        # and its corrections stay fp32 / fp64 arithmetic.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # same backbone init on every rank and every world size
    backbone = build_backbone(cfg.model, data.input_dim, **data.backbone_kwargs(),
                              gated=cfg.search.enabled).to(ctx.device)
    # Gates (student search) take their own proximal step, not the run's optimizer.
    weights = [p for n, p in backbone.named_parameters() if not n.endswith("gate.g")]
    optimizer = build_optimizer(weights, cfg.optim)
    ds_config = deepspeed_config(cfg, ctx)
    if ctx.is_rank0:  # the DeepSpeed config is derived, never edited: kept for the record
        atomic_write_json(run_dir / "deepspeed_config.json", ds_config)
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer,
                                           config=ds_config)
    head = ShardedHead(data.num_classes, cfg.model.feature_dim, ctx.group,
                       init_std=(3 * cfg.model.feature_dim) ** -0.5, seed=cfg.seed, device=ctx.device)
    prior = None
    if cfg.method.prior in ("unigram", "log_uniform"):   # from the training labels
        prior = class_prior(cfg.method.prior, label_counts(data.train, data.num_classes),
                            cfg.method.prior_alpha)
    layer = SoftmaxLayer(cfg.method, data.num_classes, head.start, head.end, ctx.group,
                         cfg.train.steps, seed=cfg.seed,
                         check_sync=cfg.dist.check_sample_sync, prior=prior)
    search = None
    if cfg.search.enabled:
        from dkd.search.searcher import GateSearch
        search = GateSearch(cfg.search, cfg.model, engine.module, data, ctx.group)
    return TrainParts(ctx, data, teacher, getattr(teacher, "head_weight", None),
                      engine, head, head_optimizer(head, cfg), layer,
                      torch.bfloat16 if use_bf16(cfg, ctx) else torch.float32, search=search)
