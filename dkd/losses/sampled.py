"""The importance-sampled KD estimator (DESIGN.md, "The estimator").

On the sampled columns only: ŝ = z/T - o, t̂ = a/T - o, p̂ = softmax(t̂), and
L̂ = -sum_i p̂_i log softmax(ŝ)_i, whose gradient is dL̂/dz_i = (q̂_i - p̂_i)/T: the paper's
Algorithm 1 (h/U - g/V). The hard-label CE at T = 1 uses the same columns and the same
corrections: CE = LSE(z - o) - z_y (the target column has o = 0). Nothing here ever sees
the B x C student logits; the column blocks may be shards of the sampled set on the ranks
of ``group``.
"""
from __future__ import annotations

import torch

import torch.distributed as dist

from dkd.consts import scalar, values
from dkd.dist.functional import group_size
from dkd.head import native
from dkd.losses.softmax import _check_temperature, fused_softmax_ce, mix
from dkd.sampling.sample_set import MASKED, SampleSet


def sampled_kd_terms(student_cols: torch.Tensor, teacher_cols: torch.Tensor,
                     log_correction: torch.Tensor, T: float,
                     target_cols: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, group=None) -> dict[str, torch.Tensor]:
    """Per-row sampled KD and CE terms.

    student_cols: (B, n) raw student logits z at the sampled columns (with grad).
    teacher_cols: (B, n) raw teacher logits a at the same columns (no grad needed).
    log_correction: (B, n) or (n,) o (0 on deterministic columns).
    target_cols: optional (B, n) bool, True on the column of each row's target (all False
        on a rank that does not hold it); gives the "ce" term.
    mask: optional (B, n) bool of columns used by each row.
    Returns {"kd": (B,), "ce": (B,)} in nats, no T^2 factor.
    """
    _check_temperature(T)
    o = log_correction.to(student_cols.dtype).expand_as(student_cols)
    if mask is not None:
        o = o.masked_fill(~mask, 0.0)       # masked o may be junk; keep arithmetic finite
    t_hat = teacher_cols.detach().to(student_cols.dtype) / T - o
    # p̂ = softmax(t̂) is formed inside the fused call: both terms cost two collectives.
    entries = {"kd": (student_cols / T - o, t_hat, True)}
    if target_cols is not None:
        onehot = target_cols.to(student_cols.dtype).expand_as(student_cols)
        entries["ce"] = (student_cols - o, onehot, False)
    return fused_softmax_ce(entries, group, mask)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _SampledMixedLoss(torch.autograd.Function):
    """loss = lam·T²·mean_b(kd_b) + (1 − lam)·mean_b(ce_b) on sampled column blocks, in
    closed form: the same value and gradient as ``mix(sampled_kd_terms(...))``, in about a
    third of the operations (the layer is op-count bound at small B·n on a host).

    forward:  z (B, n) raw student logits, a (B, n) teacher logits, o (B, n) corrections
              (MASKED on a column absent for that row), tgt (B, n) bool (the target
              column, never a masked one; None when lam = 1), T, lam, group ->
              (loss, kd, ce), kd and ce the detached batch means (no T² factor).
              With ŝ = z/T − o, t̂ = a/T − o, c = z − o (≈ −MASKED where masked):
              kd_b = LSE(ŝ_b) − Σ p̂ ŝ_b with p̂ = softmax(t̂_b); ce_b = LSE(c_b) − c_b[y].
    Collectives (forward only): one all-reduce MAX of the stacked row maxima (3, B), one
              all-reduce SUM of the stacked partial sums (5, B) ((2, B) and (4, B) without
              the CE); both over the column shards of ``group``, none when it is None.
    backward: grad (scalar) -> dL/dz = grad · [lam·T·(q̂ − p̂) + (1 − lam)·(q_c − onehot)] / B,
              q̂ = softmax(ŝ), q_c = softmax(c), from the forward's global normalisers: no
              collective (every rank holds the replicated loss, see dkd.dist.functional).
    """

    @staticmethod
    def forward(ctx, z, a, o, tgt, T, lam, group):
        B, n, has_ce = z.shape[0], z.shape[1], tgt is not None
        ctx.set_materialize_grads(False)                 # kd / ce outputs take no gradient
        # Rows of R: ŝ, t̂ and (with the CE) c, so max, exp and sum are one op each. o may
        # broadcast ((n,) or (1, n)): it is never materialised at (B, n). Masked columns
        # carry o = MASKED (finite): their exponentials are 0 and no mask pass is needed.
        r = 3 if has_ce else 2
        R = torch.stack([z, a.to(z.dtype), z] if has_ce else [z, a.to(z.dtype)])
        R.mul_(_scales(T, r, z.dtype, z.device)).sub_(o)
        maxima = R.amax(2) if n else z.new_full((r, B), float("-inf"))
        shift = _all_reduce(maxima, dist.ReduceOp.MAX, group)
        # Shifted in place: kd_b = log Σ e_ŝ − Σ p̂ (ŝ − m_ŝ) and ce_b = log Σ e_c −
        # (c_y − m_c), the row maxima cancel out of both.
        R.sub_(shift.unsqueeze(2))
        E = R.exp()
        parts = [E.sum(2), torch.bmm(E[1].unsqueeze(1), R[0].unsqueeze(2)).view(1, B)]
        if has_ce:
            parts.append(torch.where(tgt, R[2], _zero(z.dtype, z.device)).sum(1).unsqueeze(0))
        sums = _all_reduce(torch.cat(parts), dist.ReduceOp.SUM, group)
        ratio = sums[r] / sums[1]                                        # Σ p̂ (ŝ − m_ŝ)
        if has_ce:
            terms = torch.log(sums[0:3:2]).sub_(torch.stack([ratio, sums[r + 1]])).mean(1)
            loss = torch.dot(terms, _scales(None, (lam * T * T, 1.0 - lam), z.dtype, z.device))
            kd, ce = terms[0], terms[1]
        else:
            kd = torch.log(sums[0]).sub_(ratio).mean()
            loss, ce = kd * (lam * T * T), z.new_tensor(float("nan"))
        P = E.div_(sums[:r].unsqueeze(2))                                 # q̂, p̂ (, q_c)
        if has_ce:
            P[2].add_(tgt, alpha=-1)                                      # q_c − onehot
        ctx.save_for_backward(P)
        ctx.coef = (lam * T / B, -lam * T / B) + (((1.0 - lam) / B,) if has_ce else ())
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad, _gkd, _gce):
        # dL/dz = Σ_r coef_r · P_r: one matrix product over the stacked rows.
        (P,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        r, B, n = P.shape
        coef = _scales(None, ctx.coef, P.dtype, P.device).view(1, r)
        g = torch.mm(coef * grad, P.view(r, B * n)).view(B, n)
        return g, None, None, None, None, None, None


def _scales(T, vals, dtype, device) -> torch.Tensor:
    """Cached small constants: T given, the (r, 1, 1) row scales [1/T, 1/T(, 1)] of R
    (vals = r); else the 1-d tensor of ``vals``."""
    if T is None:
        return values(vals, dtype, device)
    return values((1.0 / T, 1.0 / T, 1.0)[:vals], dtype, device).view(-1, 1, 1)


def _zero(dtype, device) -> torch.Tensor:
    return scalar(0.0, dtype, device)


class _NativeSampledMixedLoss(torch.autograd.Function):
    """_SampledMixedLoss on one process with the native kernel: value and gradient in one C
    pass over the (B, n) columns (dkd/head/native.py), instead of ~30 small torch ops.

    Collectives: none (one process only; sharded runs use _SampledMixedLoss).
    forward:  z (B, n) contiguous float32, a, o, keep, tgt broadcastable to it, T, lam ->
              (loss, kd, ce) as _SampledMixedLoss; dL/dz is computed here and saved.
    backward: grad (scalar) -> grad · dL/dz.
    """

    @staticmethod
    def forward(ctx, z, a, o, keep, tgt, T, lam):
        g, kd, ce = native.sampled_loss(z, a, o, keep, tgt, T, lam)
        ctx.save_for_backward(g)
        loss = lam * T * T * kd + ((1.0 - lam) * ce if tgt is not None else 0.0)
        return z.new_tensor(loss), z.new_tensor(kd), z.new_tensor(ce)

    @staticmethod
    def backward(ctx, grad, _gkd, _gce):
        (g,) = ctx.saved_tensors
        return g * grad, None, None, None, None, None, None


def sampled_kd_loss(student_cols: torch.Tensor, teacher_cols: torch.Tensor,
                    log_correction: torch.Tensor, T: float, lam: float,
                    target_cols: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, group=None,
                    masked_o: bool = False) -> dict[str, torch.Tensor]:
    """``mix(sampled_kd_terms(...), lam, T)`` fused: {"loss", "kd", "ce"} (kd/ce detached
    batch means; ce is NaN without target_cols). Same arguments as :func:`sampled_kd_terms`;
    target_cols is required when lam < 1. masked_o: the caller promises that o is already
    MASKED where ``mask`` is False and that target_cols lies inside the mask (a
    batch-shared SampleSet): the torch path then skips its mask pass, and the host kernel
    still uses the mask to skip those columns."""
    _check_temperature(T)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if lam < 1.0 and target_cols is None:
        raise ValueError("target_cols is required for the hard-label term when lam < 1")
    z = student_cols
    others = [t for t in (teacher_cols, log_correction, mask, target_cols) if t is not None]
    if (group_size(group) <= 1 and z.dim() == 2 and native.supports(z)
            and all(t.device.type == "cpu" for t in others) and native.available()):
        loss, kd, ce = _NativeSampledMixedLoss.apply(
            z, teacher_cols.detach(), log_correction.detach(), mask, target_cols, float(T),
            float(lam))
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}
    o = log_correction.to(z.dtype)                  # broadcast as given: never copied to (B, n)
    if masked_o:
        mask = None
    if mask is not None:                            # masked o may be junk (inf): MASKED
        o = torch.where(mask, o, scalar(MASKED, z.dtype, z.device))
    tgt = None if target_cols is None else target_cols.expand_as(z)
    if tgt is not None and mask is not None:
        tgt = tgt & mask
    loss, kd, ce = _SampledMixedLoss.apply(z, teacher_cols.detach(), o, tgt, float(T),
                                           float(lam), group)
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}


def sampled_student_logits(features: torch.Tensor, weight: torch.Tensor,
                           sample_set: SampleSet) -> torch.Tensor:
    """Student logits on the sampled columns only: features (B, d), weight (C, d) -> (B, n).

    batch_shared: one (B, d) x (d, n) product over the gathered rows. per_sample: every row
    has its own columns, so the rows are gathered per sample, (B, n, d), and contracted.
    """
    cls = sample_set.classes
    if cls.dim() == 1:
        return features @ weight.index_select(0, cls).t()
    w = weight[cls]                                               # (B, n, d)
    return torch.einsum("bd,bnd->bn", features, w)


def sampled_kd_reference(features: torch.Tensor, weight: torch.Tensor,
                         teacher_logits: torch.Tensor, y: torch.Tensor,
                         sample_set: SampleSet, T: float, lam: float) -> dict:
    """Single-process reference of the whole sampled loss (plain autograd).

    features (B, d), weight (C, d), teacher_logits (B, C), y (B,). Returns mix()'s dict
    ({"loss", "kd", "ce"}) plus "student_cols" (B, n), the sampled logits, so callers can
    take gradients with respect to them.
    """
    z = sampled_student_logits(features, weight, sample_set)
    a = sample_set.gather(teacher_logits)
    o = sample_set.log_correction
    tgt = sample_set.target_mask(y) if lam < 1.0 else None
    mask = None if sample_set.mask is None else sample_set.mask.expand(z.shape)
    terms = sampled_kd_terms(z, a, o, T, tgt, mask)
    out = mix(terms, lam, T)
    out["student_cols"] = z
    return out
