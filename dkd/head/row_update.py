"""The torch path of a row-sparse optimizer step: the per-kind update of gathered rows
(``SparseRowOptimizer`` gathers them, calls :func:`update_rows`, writes them back)."""
from __future__ import annotations

import torch


def update_rows(opt, w: dict[str, torch.Tensor], g: torch.Tensor, lr: float, coef) -> None:
    """One step of ``opt``'s kind (its hyperparameters) in place on the working rows ``w``
    (param and state, (u, d) each) given ``g``; coef: the (a_t, e_t, gap) of
    ``SparseRowOptimizer._row_coefficients`` (Adam), else None.
    Without "param" (Adam, no decay) it leaves m / den in w["denom"] for the caller to
    add with -lr."""
    p, wd = w.get("param"), opt.weight_decay
    if opt.kind == "sgd":
        if wd:
            g = g.add(p, alpha=wd)
        if opt.momentum == 0:
            p.add_(g, alpha=-lr)
            return
        buf = w["momentum_buffer"].mul_(opt.momentum).add_(g)
        if opt.nesterov:
            p.add_(g, alpha=-lr)
        p.add_(buf, alpha=-lr * opt.momentum if opt.nesterov else -lr)
        return
    if opt.kind == "rmsprop":
        if wd:
            g = g.add(p, alpha=wd)
        v = w["square_avg"].mul_(opt.alpha).addcmul_(g, g, value=1.0 - opt.alpha)
        den = v.sqrt().add_(opt.eps)
        if opt.momentum == 0:
            p.addcdiv_(g, den, value=-lr)
            return
        buf = w["momentum_buffer"].mul_(opt.momentum).addcdiv_(g, den)
        p.add_(buf, alpha=-lr)
        return
    if opt.kind == "adamw":
        if wd and (coef is None or coef[2] is None):
            p.mul_(1.0 - lr * wd)
        elif wd:                                # catch-up: the gap's decay too
            p.mul_(1.0 - lr * wd * coef[2])
    elif wd:
        g = g.add(p, alpha=wd)
    m, v, den = w["exp_avg"], w["exp_avg_sq"], w["denom"]
    m.lerp_(g, 1.0 - opt.betas[0])
    v.mul_(opt.betas[1]).addcmul_(g, g, value=1.0 - opt.betas[1])
    if coef is None:                            # lr = 0: moments move, weights do not
        return
    a_t, e_t, _ = coef
    # den = sqrt(v)·a_t + e_t in two kernels (the host's float32 Adam is the native one).
    torch.addcmul(e_t, torch.sqrt(v, out=den), a_t, out=den)
    if p is None:
        torch.div(m, den, out=den)
    else:
        p.addcdiv_(m, den, value=-lr)
