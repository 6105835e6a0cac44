"""`dkd fidelity --run DIR`: the sampled gradient against the full gradient on real batches
of a trained run, through the training path.

A problem is one training batch of the run's own data: features from the run's exported
student (``model.pt``, its backbone in eval mode), the student's head weight, the run's
teacher (``teacher.checkpoint``) on the same inputs, and the labels. Every sampled method
then draws with the training ``SoftmaxLayer`` (dkd/fidelity.py), and the records say how
close its gradient is to full KD's and where the error sits (target, teacher top ranks,
the student's top classes, the tail).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dkd.config import ConfigError, RunConfig
from dkd.data import build_data
from dkd.fidelity import run_problems
from dkd.sampling.teacher_batch import TopKTeacher
from dkd.teacher.live import LiveTeacher


@torch.no_grad()
def run_batches(run_dir: Path, cfg: RunConfig, batches: int = 2, batch_size: int | None = None,
                seed: int = 0) -> list[dict]:
    """``batches`` problems from random training batches of the run (one process, CPU)."""
    if not (Path(run_dir) / "model.pt").is_file():
        raise ConfigError(f"{run_dir}/model.pt not found: fidelity --run needs a finished "
                          f"run (its exported model)")
    if cfg.teacher.checkpoint is None:
        raise ConfigError(f"{run_dir}: the run has no teacher.checkpoint, which fidelity "
                          f"--run needs for the full-KD target")
    data = build_data(cfg.data)
    if data.task == "reid":
        raise ConfigError("fidelity --run: re-ID runs have no classification head on the test "
                          "split; use a classification or text run")
    dev = torch.device("cpu")
    kw = data.backbone_kwargs()
    student = LiveTeacher(run_dir, data.num_classes, data.input_dim, dev, **kw)
    teacher = LiveTeacher(cfg.teacher.checkpoint, data.num_classes, data.input_dim, dev, **kw)
    B = batch_size or cfg.train.batch_size
    g = torch.Generator().manual_seed(seed)
    problems = []
    for _ in range(batches):
        x, y = data.train.get(torch.randint(0, len(data.train), (B,), generator=g))
        feats = student.backbone(_cast(x, student.backbone, data.task)).float()
        problems.append({"features": feats, "weight": student.head_weight.clone(),
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
                        completion: bool = False) -> list[dict]:
    """Fidelity records of a trained run at its end: the KD term alone (lam = 1), DIS at
    the end of its schedule, the run's temperature and top_t unless given. The sampler
    sees the teacher as training does: its top-``sampling_topk`` ranks when C is larger,
    and at the sampled columns the exact teacher logits (completion=True: the even top-K
    completion, as a store without features); the full gradient is always against the
    true teacher, so the records include the bias of what the sampler sees."""
    problems = run_batches(run_dir, cfg, batches, seed=seed)
    for prob in problems:
        training_view(prob, cfg.method.sampling_topk, completion)
    C = problems[0]["teacher"].shape[1]
    ks = [k for k in ks if k < C]
    if not ks:
        raise ConfigError(f"fidelity --run: every k must be < the run's class count {C}")
    t = cfg.method.top_t if top_t is None else top_t
    saved = torch.get_num_threads()
    torch.set_num_threads(1)    # many small ops: extra threads only add contention
    try:
        T = cfg.method.temperature if temperature is None else temperature
        records = run_problems(problems, ks, methods, modes, corrections, T, 1.0, 1.0, t)
    finally:
        torch.set_num_threads(saved)
    for r in records:
        r["run"], r["temperature"] = str(run_dir), T
    return records


__all__ = ["run_batches", "run_fidelity_of_run"]
