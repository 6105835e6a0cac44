"""A live teacher: the exported model of an earlier run (backbone + full head weight).

Every run exports `model.pt` = {model config, class count, input dim, backbone state,
head weight (C, d)}; the `teacher.checkpoint` of a later run points at that run directory
or file. The teacher runs in eval mode under no_grad.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dkd.config import ConfigError, ModelConfig
from dkd.models import build_backbone
from dkd.teacher.select import head_topk


def resolve_model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ConfigError(f"teacher.checkpoint: {path} not found (expected a run directory "
                          "containing model.pt, or a model.pt file)")
    return path


def load_model_file(path: str | Path, num_classes: int, input_dim: int,
                    mmap: bool = False) -> tuple[Path, dict]:
    """(path, contents) of a run's model.pt, refused unless it fits the dataset. mmap: map
    the file instead of reading it (a class-sharded teacher copies out only its rows)."""
    path = resolve_model_file(path)
    blob = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    if blob["num_classes"] != num_classes:
        raise ConfigError(f"teacher.checkpoint {path}: teacher has {blob['num_classes']} "
                          f"classes but the dataset has {num_classes}")
    if blob["input_dim"] != input_dim:
        raise ConfigError(f"teacher.checkpoint {path}: teacher input size {blob['input_dim']} "
                          f"differs from the dataset's {input_dim}")
    return path, blob


class LiveTeacher:
    def __init__(self, path: str | Path, num_classes: int, input_dim: int, device: torch.device,
                 input_shape=None, vocab_size=None):
        path, blob = load_model_file(path, num_classes, input_dim)
        self.model_cfg = ModelConfig.model_validate(blob["model"])
        self.backbone = build_backbone(self.model_cfg, input_dim,
                                       blob.get("input_shape", input_shape),
                                       blob.get("vocab_size", vocab_size))
        self.backbone.load_state_dict(blob["backbone"])
        self.backbone.to(device).eval()
        self.head_weight = blob["head"].float().to(device)  # (C, d_teacher)
        self.path = path

    @torch.no_grad()
    def topk(self, x: torch.Tensor, ids: torch.Tensor | None, k: int):
        """The teacher's top-k per sample: (ids (B, k), logits (B, k), lse (B,), features
        (B, d_t)); with the head weight, the features give its exact logit at any class."""
        f = self.features(x)
        vals, idx, lse = head_topk(f, self.head_weight, k)
        return idx, vals, lse, f

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> teacher features (B, d_t), float32."""
        return self.backbone(x).float()

    @torch.no_grad()
    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, input_dim) -> teacher logits (B, C); ``ids`` (sample ids) are not needed."""
        return self.features(x) @ self.head_weight.T


def export_model(path: Path, model_cfg: ModelConfig, data, backbone: torch.nn.Module,
                 head_weight: torch.Tensor) -> None:
    """Write model.pt: what a later run needs to rebuild this model as its teacher."""
    from dkd.atomic import atomic_torch_save

    atomic_torch_save({"model": model_cfg.model_dump(), "num_classes": data.num_classes,
                       "input_dim": data.input_dim, "input_shape": tuple(data.input_shape),
                       "vocab_size": data.vocab_size,
                       "backbone": {k: v.cpu() for k, v in backbone.state_dict().items()},
                       "head": head_weight.cpu()}, path)
