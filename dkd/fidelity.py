"""Gradient fidelity: how close each sampled method's gradient is to the full-KD gradient.

On a random but teacher-like problem (features, a student head, a peaked teacher whose
ranking is correlated with the student's), every method's KD gradient with respect to the
student logits (the sampled-column gradient scattered back to (B, C)) and to the head
weight (C, d) is compared with the full-KD gradient: cosine similarities and the relative
error ||g - g_full|| / ||g_full|| of the weight gradient. The KD term alone is compared
(lam = 1 by default) so the numbers describe the estimator, not the CE mixing.

k is the per-row budget: the target, the teacher's top_t classes (0 by default) and
k - 1 - top_t draws. In batch_shared mode the deterministic set is every target of the
batch, so a row sees up to B - 1 more exact columns than k; ``columns`` records the mean
number of columns each row actually uses.
"""
from __future__ import annotations

import json
import math
import os

import torch

from dkd.atomic import atomic_write_text
from dkd.losses.pdbs import pdbs_loss
from dkd.losses.sampled import sampled_kd_reference
from dkd.losses.softmax import full_kd_terms, mix
from dkd.losses.targets import kd_target
from dkd.config import MethodConfig
from dkd.engine.softmax_layer import SoftmaxLayer
from dkd.sampling.proposals import teacher_ranking
from dkd.sampling.teacher_batch import TopKTeacher

SAMPLED = ("uniform", "ftis", "teacher", "dis", "laplace")


def make_problem(classes: int, batch: int, dim: int, T: float, seed: int) -> dict:
    """A synthetic distillation step.

    Student logits z = features @ weight.T with z/T of std 2 per row. Teacher logits
    a/T = 3 * (0.6 * standardised(z) + 0.8 * noise), then the target is raised to 1 above
    the row maximum: a peaked teacher (top mass in a handful of classes) that agrees with
    the student only in part, as mid-way through a distillation run.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=g)
    weight = torch.randn(classes, dim, generator=g) / math.sqrt(dim)
    z = features @ weight.t()
    scale = 2.0 * T / z.std(dim=1).mean()
    weight = weight * scale
    zs = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    a = 3.0 * (0.6 * zs + 0.8 * torch.randn(batch, classes, generator=g))
    y = torch.randint(0, classes, (batch,), generator=g)
    a[torch.arange(batch), y] = a.max(1).values + 1.0
    return {"features": features, "weight": weight, "teacher": a * T, "y": y}


def _full_grads(prob: dict, T: float, lam: float):
    w = prob["weight"].clone().requires_grad_(True)
    z = prob["features"] @ w.t()
    loss = mix(full_kd_terms(z, kd_target(prob["teacher"], T), prob["y"], T), lam, T)["loss"]
    gz, gw = torch.autograd.grad(loss, [z, w])
    return gz, gw


def _scatter_cols(g_cols: torch.Tensor, sample_set, C: int) -> torch.Tensor:
    """(B, n) gradient on sampled columns -> (B, C); duplicate columns add up."""
    full = g_cols.new_zeros(g_cols.shape[0], C)
    cls = sample_set.classes
    if cls.dim() == 1:
        return full.index_add_(1, cls, g_cols)
    if sample_set.mask is not None:
        g_cols = g_cols * sample_set.mask
    return full.scatter_add_(1, cls, g_cols)


_ALIASES = {"teacher": "ftis", "laplace": "dis"}


def training_layer(method, mode, correction, k, T, lam, top_t, C, dis_progress=0.0):
    """The SoftmaxLayer that `dkd train` builds for this method (one process): the
    fidelity check draws with the training path itself."""
    cfg = MethodConfig(name=_ALIASES.get(method, method), k=k, mode=mode, top_t=top_t,
                       correction=correction, temperature=T, lam=lam)
    layer = SoftmaxLayer(cfg, C, 0, C, None, total_steps=10_000)
    if layer.proposal is not None and hasattr(layer.proposal, "b2"):
        layer.proposal.advance(round(dis_progress * layer.proposal.total_steps))
    return layer


def _sampled_grads(prob, method, mode, correction, k, T, lam, seed, dis_progress, top_t):
    C = prob["weight"].shape[0]
    layer = training_layer(method, mode, correction, k - 1 - top_t, T, lam, top_t, C,
                           dis_progress)
    ss, _ = layer.draw(prob["topk"], prob["y"], seed)
    w = prob["weight"].clone().requires_grad_(True)
    # the teacher logits the sampler's columns carry (a run's training view), vs the true
    # teacher of the full gradient
    seen = prob.get("seen", prob["teacher"])
    out = sampled_kd_reference(prob["features"], w, seen, prob["y"], ss, T, lam)
    g_cols, gw = torch.autograd.grad(out["loss"], [out["student_cols"], w])
    B = prob["y"].shape[0]
    cols = float(ss.row_mask(B).sum(1).double().mean())
    return _scatter_cols(g_cols, ss, C), gw, cols


def _pdbs_grads(prob, k, T, lam):
    w = prob["weight"].clone().requires_grad_(True)
    z = prob["features"] @ w.t()
    out = pdbs_loss(z, prob["teacher"], prob["y"], k, T, lam, prob["ranking"][1])
    gz, gw = torch.autograd.grad(out["loss"], [z, w])
    return gz, gw, float(k)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _configs(methods, modes, corrections, k, C):
    for method in methods:
        if method == "pdbs":
            if k < C:     # PDBS with k >= C would be the full loss itself
                yield method, "per_sample", "none"
        else:
            for mode in modes:
                for correction in corrections:
                    yield method, mode, correction


def run_fidelity(classes: int, batch: int, ks, dim: int = 64, seeds: int = 3,
                 methods=("uniform", "ftis", "dis", "pdbs"),
                 modes=("per_sample", "batch_shared", "hybrid"), corrections=("expected", "paper"),
                 temperature: float = 4.0, lam: float = 1.0,
                 dis_progress: float = 0.0, top_t: int = 0,
                 num_threads: int | None = 1) -> list[dict]:
    """Fidelity records, means over ``seeds`` problems.

    Each record: method, mode, correction ("none" for PDBS), classes, k, batch, columns
    (mean columns per row), cosine_logits, cosine_weight, rel_err (weight gradient).
    dis_progress in [0, 1]: where in its b2 schedule the DIS proposal is evaluated.
    top_t: teacher top classes added to the deterministic set of the sampled methods.
    num_threads: torch intra-op threads while it runs (restored after; None = leave as
    is). The work is many small ops, where extra threads mostly add contention: on a
    loaded 2-core machine C = 1000 took 36 s with 2 threads and 3.3 s with 1.
    """
    if any(k < 2 + top_t for k in ks):
        raise ValueError(f"every k must be >= top_t + 2 = {top_t + 2} (target, top_t, and "
                         f"at least one draw), got {list(ks)}")
    if not 0.0 <= dis_progress <= 1.0:
        raise ValueError(f"dis_progress must be in [0, 1], got {dis_progress}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    for method in methods:
        if method != "pdbs" and method not in SAMPLED:
            raise ValueError(f"unknown method '{method}'; expected pdbs or one of {SAMPLED}")
    saved = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(classes, batch, ks, dim, seeds, methods, modes, corrections,
                    temperature, lam, dis_progress, top_t)
    finally:
        torch.set_num_threads(saved)


def _run(classes, batch, ks, dim, seeds, methods, modes, corrections, temperature, lam,
         dis_progress, top_t) -> list[dict]:
    problems = (make_problem(classes, batch, dim, temperature, seed=s) for s in range(seeds))
    return run_problems(problems, ks, methods, modes, corrections, temperature, lam,
                        dis_progress, top_t)


def error_groups(prob: dict, top: int = 10) -> torch.Tensor:
    """(B, C) int8 column groups of a problem, for where the gradient error sits: 0 the
    target, 1 the teacher's top-``top`` other classes, 2 the student's top-``top`` classes
    outside those, 3 the rest (the tail)."""
    B, C = prob["teacher"].shape
    top = min(top, C)
    groups = torch.full((B, C), 3, dtype=torch.int8)
    z = prob["features"] @ prob["weight"].t()
    groups.scatter_(1, z.topk(top, 1).indices, 2)
    groups.scatter_(1, prob["teacher"].topk(top, 1).indices, 1)
    groups.scatter_(1, prob["y"].long().unsqueeze(1), 0)
    return groups


GROUPS = ("target", "teacher_top", "student_top", "tail")


def run_problems(problems, ks, methods, modes, corrections, temperature, lam, dis_progress,
                 top_t) -> list[dict]:
    """Fidelity records averaged over ``problems`` (dicts of features (B, d), weight (C, d),
    teacher logits (B, C), y (B,)): synthetic ones (:func:`make_problem`) or real batches
    of a trained run (:mod:`dkd.fidelity_run`). Each record also has err_share_<group>:
    the share of ||g − g_full||² of the logits gradient in each of :data:`GROUPS`."""
    acc: dict[tuple, list[list[float]]] = {}
    classes = batch = None
    for s, prob in enumerate(problems):
        batch, classes = prob["teacher"].shape
        prob["ranking"] = teacher_ranking(prob["teacher"])      # sort once per problem
        if "topk" not in prob:    # the layer's teacher type (a run's: its training view)
            prob["topk"] = TopKTeacher.from_dense(prob["teacher"])
        groups = error_groups(prob)
        gz_full, gw_full = _full_grads(prob, temperature, lam)
        for k in ks:
            for i, (method, mode, corr) in enumerate(
                    _configs(methods, modes, corrections, k, classes)):
                if method == "pdbs":
                    gz, gw, cols = _pdbs_grads(prob, k, temperature, lam)
                else:
                    gz, gw, cols = _sampled_grads(prob, method, mode, corr, k, temperature,
                                                  lam, 1_000_003 * s + 1009 * k + i,
                                                  dis_progress, top_t)
                rel = float((gw - gw_full).norm() / gw_full.norm())
                err2 = (gz - gz_full).double().pow(2)
                shares = [float(err2[groups == g].sum()) for g in range(len(GROUPS))]
                total = max(sum(shares), 1e-300)
                acc.setdefault((method, mode, corr, k), []).append(
                    [cols, _cos(gz, gz_full), _cos(gw, gw_full), rel]
                    + [x / total for x in shares])
    records = []
    for (method, mode, corr, k), rows in acc.items():
        mean = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
        records.append({"method": method, "mode": mode, "correction": corr,
                        "classes": classes, "k": k, "batch": batch, "columns": mean[0],
                        "cosine_logits": mean[1], "cosine_weight": mean[2],
                        "rel_err": mean[3],
                        **{f"err_share_{g}": mean[4 + j] for j, g in enumerate(GROUPS)}})
    return records


def fidelity_markdown(records: list[dict]) -> str:
    """Records as a markdown table, sorted by classes, k, method, mode, correction (and by
    step first, with a step column, when the records come from several points of training)."""
    steps = {r.get("step") for r in records}
    if len(steps) > 1:
        by_step = sorted(steps)
        return "".join(f"**step {s}**\n\n" + fidelity_markdown([r for r in records
                                                              if r.get("step") == s]) + "\n"
                       for s in by_step)
    head = ("| C | k | method | mode | correction | cols/row | cos logits | cos weight "
            "| rel err | error in target / teacher top-10 / student top-10 / tail |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    key = lambda r: (r["classes"], r["k"], r["method"], r["mode"], r["correction"])
    share = lambda r: " / ".join(f"{100 * r.get(f'err_share_{g}', math.nan):.0f}%"
                                 for g in GROUPS)
    rows = [f"| {r['classes']} | {r['k']} | {r['method']} | {r['mode']} | "
            f"{r['correction']} | {r['columns']:.0f} | {r['cosine_logits']:.4f} | "
            f"{r['cosine_weight']:.4f} | {r['rel_err']:.3f} | {share(r)} |"
            for r in sorted(records, key=key)]
    return head + "\n".join(rows) + "\n"


def write_fidelity(records: list[dict], out_json: str) -> str:
    """Write records to out_json and the markdown table next to it (.md), atomically.

    Returns the markdown path.
    """
    md_path = os.path.splitext(out_json)[0] + ".md"
    for path, text in ((out_json, json.dumps(records, indent=1)),
                       (md_path, fidelity_markdown(records))):
        atomic_write_text(path, text)
    return md_path
