"""`dkd fidelity --run DIR`: the sampled gradient against the full gradient on real batches
of a trained run, through the training path.

A problem is one training batch of the run's own data: features from the run's exported
student (``model.pt``, its backbone in eval mode), the student's head weight, the run's
teacher (``teacher.checkpoint``) on the same inputs, and the labels. Every sampled method
then draws with the training ``SoftmaxLayer`` (dkd/fidelity.py), and the records say how
close its gradient is to full KD's and where the error sits (target, teacher top ranks,
the student's top classes, the tail). ``at`` picks the points of training: the exported
model (the end) and/or the run's checkpoints (the student's backbone from DeepSpeed's
model file, its head from the per-range head pieces), so the error can be followed over
training.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dkd.config import ConfigError, RunConfig
from dkd.data import build_data
from dkd.engine.checkpoint import backbone_state, checkpoint_steps, load_head_pieces
from dkd.fidelity import run_problems
from dkd.head.head import ShardedHead
from dkd.models import build_backbone
from dkd.sampling.teacher_batch import TopKTeacher
from dkd.teacher.live import LiveTeacher


def resolve_points(run_dir: Path, at: str, end_step: int) -> list[tuple[int, Path | None]]:
    """``at`` -> [(step, checkpoint dir or None for the exported model)]: "end" (model.pt),
    "all" (every checkpoint, then the end) or comma-separated steps ("end" allowed)."""
    ckpts = checkpoint_steps(run_dir)
    if at.strip() == "all":
        # The last checkpoint is the exported model when it is at the last step.
        return [(s, d) for s, d in ckpts.items() if s != end_step] + [(end_step, None)]
    points = []
    for item in (x.strip() for x in at.split(",") if x.strip()):
        if item == "end":
            points.append((end_step, None))
        elif item.isdigit() and int(item) in ckpts:
            points.append((int(item), ckpts[int(item)]))
        else:
            raise ConfigError(f"--at: {item!r} is not 'end', 'all' or a checkpoint step of "
                              f"{run_dir} (it has {sorted(ckpts) or 'none'})")
    if not points:
        raise ConfigError("--at: expected 'end', 'all' or comma-separated checkpoint steps")
    return points


def student_at(run_dir: Path, cfg: RunConfig, data, dev, ckpt: Path | None):
    """(backbone in eval mode, head weight (C, d)) of the run's student: the exported model
    (ckpt None) or the state saved in checkpoint directory ``ckpt``."""
    if ckpt is None:
        if not (Path(run_dir) / "model.pt").is_file():
            raise ConfigError(f"{run_dir}/model.pt not found: fidelity --run needs a finished "
                              f"run (its exported model), or --at with checkpoint steps")
        s = LiveTeacher(run_dir, data.num_classes, data.input_dim, dev, **data.backbone_kwargs())
        return s.backbone, s.head_weight
    backbone = build_backbone(cfg.model, data.input_dim, **data.backbone_kwargs())
    backbone.load_state_dict(backbone_state(ckpt))
    head = ShardedHead(data.num_classes, cfg.model.feature_dim, None)
    load_head_pieces(ckpt, head, None, data.num_classes)   # checks the pieces cover C
    return backbone.to(dev).eval(), head.weight.detach().float().to(dev)


@torch.no_grad()
def run_batches(run_dir: Path, cfg: RunConfig, batches: int = 2, batch_size: int | None = None,
                seed: int = 0, ckpt: Path | None = None) -> list[dict]:
    """``batches`` problems from random training batches of the run (one process, CPU),
    with the student of checkpoint ``ckpt`` (None: the exported model)."""
    if cfg.teacher.checkpoint is None:
        raise ConfigError(f"{run_dir}: the run has no teacher.checkpoint, which fidelity "
                          f"--run needs for the full-KD target")
    data = build_data(cfg.data)
    if data.task == "reid":
        raise ConfigError("fidelity --run: re-ID runs have no classification head on the test "
                          "split; use a classification or text run")
    dev = torch.device("cpu")
    backbone, head_weight = student_at(run_dir, cfg, data, dev, ckpt)
    teacher = LiveTeacher(cfg.teacher.checkpoint, data.num_classes, data.input_dim, dev,
                          **data.backbone_kwargs())
    B = batch_size or cfg.train.batch_size
    g = torch.Generator().manual_seed(seed)   # the same batches at every point of training
    problems = []
    for _ in range(batches):
        x, y = data.train.get(torch.randint(0, len(data.train), (B,), generator=g))
        feats = backbone(_cast(x, backbone, data.task)).float()
        problems.append({"features": feats, "weight": head_weight.clone(),
                         "teacher": teacher.logits(_cast(x, teacher.backbone, data.task)).float(),
                         "y": y.long()})
    return problems


def training_view(prob: dict, K: int, completion: bool) -> None:
    """Add to a problem the teacher as training's sampler gets it: ``topk`` (its top-K with
    the completion logit, when C > K) and ``seen`` (the dense logits whose columns the
    estimator reads: the true ones, or the completed ones with ``completion``)."""
    a = prob["teacher"]
    if a.shape[1] <= K:
        return
    prob["topk"] = TopKTeacher.from_dense(a, K)     # completion logit computed on first use
    prob["seen"] = prob["topk"].dense() if completion else a


def _cast(x: torch.Tensor, backbone, task: str) -> torch.Tensor:
    # Token ids stay exact (float32), as in evaluation; images take the backbone's dtype.
    return x if task == "text" else x.to(next(backbone.parameters()).dtype)


def run_fidelity_of_run(run_dir: Path, cfg: RunConfig, ks, batches: int = 2,
                        methods=("uniform", "ftis", "dis", "pdbs"),
                        modes=("per_sample", "batch_shared", "hybrid"),
                        corrections=("expected",), top_t: int | None = None,
                        seed: int = 0, temperature: float | None = None,
                        completion: bool = False, at: str = "end") -> list[dict]:
    """Fidelity records of a trained run at the points ``at`` (:func:`resolve_points`;
    each record's ``step``): the KD term alone (lam = 1), DIS at
    the end of its schedule, the run's temperature and top_t unless given. The sampler
    sees the teacher as training does: its top-``sampling_topk`` ranks when C is larger,
    and at the sampled columns the exact teacher logits (completion=True: the even top-K
    completion, as a store without features); the full gradient is always against the
    true teacher, so the records include the bias of what the sampler sees."""
    t = cfg.method.top_t if top_t is None else top_t
    T = cfg.method.temperature if temperature is None else temperature
    records = []
    for step, ckpt in resolve_points(run_dir, at, cfg.train.steps):
        problems = run_batches(run_dir, cfg, batches, seed=seed, ckpt=ckpt)
        for prob in problems:
            training_view(prob, cfg.method.sampling_topk, completion)
        C = problems[0]["teacher"].shape[1]
        ks_run = [k for k in ks if k < C]
        if not ks_run:
            raise ConfigError(f"fidelity --run: every k must be < the run's class count {C}")
        saved = torch.get_num_threads()
        torch.set_num_threads(1)    # many small ops: extra threads only add contention
        try:
            recs = run_problems(problems, ks_run, methods, modes, corrections, T, 1.0, 1.0, t)
        finally:
            torch.set_num_threads(saved)
        for r in recs:
            r["run"], r["temperature"], r["step"] = str(run_dir), T, step
        records += recs
    return records


__all__ = ["resolve_points", "run_batches", "run_fidelity_of_run", "student_at"]
