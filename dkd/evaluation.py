"""`dkd eval`: score a finished run's exported model (model.pt) on its held-out split(s)."""
from __future__ import annotations

from pathlib import Path

import torch

from dkd.config import RunConfig
from dkd.data import build_data
from dkd.engine.evaluate import evaluate
from dkd.teacher.live import LiveTeacher


def evaluate_run(run_dir: Path, cfg: RunConfig) -> dict:
    data = build_data(cfg.data)
    model = LiveTeacher(run_dir, data.num_classes, data.input_dim, torch.device("cpu"),
                        **data.backbone_kwargs())
    metrics = evaluate(model.backbone, model.head_weight, 0, data, torch.device("cpu"),
                       cfg.train.eval_batch_size)
    return {"run": str(run_dir), "method": cfg.method.name, "classes": data.num_classes,
            **metrics}
