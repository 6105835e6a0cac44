"""Proposals over teacher *ranks* (rank 1 = the teacher's most likely class for a sample).

A proposal says how likely each class is to be drawn for a sample. Rank-based proposals
(uniform, the Laplace mixture of DIS) give one distribution over ranks, shared by the whole
batch, that each sample maps to its own classes through its teacher ranking; the teacher
proposal (FTIS) is per sample. Proposals hold only a step counter as state, so every rank
that advances them in lockstep holds the same proposal without communicating.
"""
from __future__ import annotations

import torch


def teacher_ranking(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of the teacher logits (B, C).

    Returns (order, ranks), both (B, C) int64: order[b, k] is the class at 0-based rank k
    (k = 0 is the teacher's top class), ranks[b, c] the 0-based rank of class c. A stable
    sort breaks ties by class id, so every rank of a job gets the same ranking.
    """
    order = torch.sort(teacher_logits, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    pos = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    ranks.scatter_(1, order, pos)
    return order, ranks


class Proposal:
    """Base class: a step counter and the per-sample class distribution r_b(c)."""

    name = "proposal"
    rank_based = True   # False: r_b depends on more than the teacher's ranking

    def __init__(self) -> None:
        self.step = 0

    def advance(self, n: int = 1) -> None:
        """Move the schedule forward by n optimiser steps (n >= 0)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.step += int(n)

    def state_dict(self) -> dict:
        return {"name": self.name, "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state is for proposal '{state.get('name')}', not '{self.name}'")
        self.step = int(state["step"])

    def rank_probs(self, num_classes: int, device=None) -> torch.Tensor:
        """(C,) float64 distribution over 0-based ranks (index 0 = teacher's top class)."""
        raise NotImplementedError(f"proposal '{self.name}' is not rank-based")

    def class_probs(self, teacher_logits: torch.Tensor,
                    ranks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) per-sample distribution over classes; ranks from :func:`teacher_ranking`."""
        if ranks is None:
            ranks = teacher_ranking(teacher_logits)[1]
        r = self.rank_probs(teacher_logits.shape[-1], teacher_logits.device)
        return r.to(torch.float32)[ranks]


class UniformProposal(Proposal):
    """r(rank) = 1 / C."""

    name = "uniform"

    def rank_probs(self, num_classes: int, device=None) -> torch.Tensor:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64,
                          device=device)


class TeacherProposal(Proposal):
    """FTIS: r_b(c) = (1 - eps) * softmax(a_b / temperature)_c + eps / C, per sample.

    temperature: the teacher temperature of the proposal (> 0); set it to the distillation
    T so that r follows the target p. eps in [0, 1): a uniform floor ("defensive" importance
    sampling) that bounds the correction exp(-o) <= C / (m * eps) in the teacher's tail.
    """

    name = "teacher"
    rank_based = False

    def __init__(self, temperature: float = 1.0, eps: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.temperature, self.eps = float(temperature), float(eps)

    def class_probs(self, teacher_logits, ranks=None) -> torch.Tensor:
        p = torch.softmax(teacher_logits.float() / self.temperature, dim=-1)
        return (1.0 - self.eps) * p + self.eps / p.shape[-1]


def _truncated_laplace_bins(center: float, scale: float, num_bins: int) -> torch.Tensor:
    """Mass of a Laplace(center, scale) truncated to [0, 1] in num_bins equal bins.

    center is 0 or 1 (the density is monotone on [0, 1]); scale is in units of the axis.
    Integrating the CDF over each bin (instead of sampling the density at bin centres)
    keeps the tip right when a bin is wider than the scale.
    """
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    dist = (edges - center).abs()                 # distance of each edge from the centre
    # CDF of |x - center| is 1 - exp(-d/scale); bin mass = difference at its two edges.
    tail = torch.exp(-dist / scale)
    mass = (tail[:-1] - tail[1:]).abs()
    return mass / mass.sum()


class LaplaceMixtureProposal(Proposal):
    """DIS: w * Laplace(0, b1) + (1 - w) * Laplace(1, b2(step)) on normalised rank x.

    x = (rank - 1) / C in [0, 1]: x = 0 is the teacher's top class, x = 1 its last. Each
    component is truncated to [0, 1] and normalised, so w is exactly the mass of the left
    (head) component. Scales b1, b2 are in PERCENT of the class axis (b = 3 means 3 % of
    C classes), the units of the paper's (mu1, b1) = (0, 3), (mu2, b2) = (1, 5) on 100
    classes. b2 grows linearly from b2_start to b2_end over total_steps steps, then stays.

    Defaults: b1 = 3, b2_start = 5 (the paper), w = 0.55 so that the left tip is about
    twice the right tip at the start (continuous tips w/b1 : (1-w)/b2_start = 2.04), and
    b2_end = 100: by the end the right component's scale is the whole axis, so its
    density varies only by a factor e from x = 1 to x = 0 (flat toward uniform).
    """

    name = "dis"

    def __init__(self, w: float = 0.55, b1: float = 3.0, b2_start: float = 5.0,
                 b2_end: float = 100.0, total_steps: int = 10_000) -> None:
        super().__init__()
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"w must be in [0, 1], got {w}")
        for name, v in (("b1", b1), ("b2_start", b2_start), ("b2_end", b2_end)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0 (percent of the class axis), got {v}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.w, self.b1 = float(w), float(b1)
        self.b2_start, self.b2_end = float(b2_start), float(b2_end)
        self.total_steps = int(total_steps)
        # Adaptive DIS (dkd.sampling.refit): after a refit, (w, b1) are the fit's and b2 is
        # fixed at its value; probe_counts is the decayed rank histogram it was fitted to.
        self.b2_fit: float | None = None
        self.probe_counts: torch.Tensor | None = None
        self.refit_at = -1            # the step of the last refit (-1: none yet)
        self.refit_bins = 100         # histogram bins: 1 % of the rank axis each

    def set_fit(self, w: float, b1: float, b2: float, counts: torch.Tensor) -> None:
        """Use the mixture (w, b1, b2) (scales in percent) from now on, in place of the
        schedule; counts: the (refit_bins,) histogram it was fitted to."""
        self.w, self.b1, self.b2_fit = float(w), float(b1), float(b2)
        self.probe_counts = counts.double().cpu()
        self.refit_at = self.step

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.b2_fit is not None:   # the schedule's state is the step alone
            state.update(w=self.w, b1=self.b1, b2_fit=self.b2_fit, refit_at=self.refit_at,
                         probe_counts=self.probe_counts.tolist())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("b2_fit") is not None:
            self.set_fit(state["w"], state["b1"], state["b2_fit"],
                         torch.tensor(state["probe_counts"], dtype=torch.float64))
            self.refit_at = int(state["refit_at"])

    def b2(self, step: int | None = None) -> float:
        """Right scale at ``step`` (default: the current step), percent of the axis."""
        if self.b2_fit is not None:
            return self.b2_fit
        step = self.step if step is None else step
        frac = min(max(step / self.total_steps, 0.0), 1.0)
        return self.b2_start + (self.b2_end - self.b2_start) * frac

    def rank_probs(self, num_classes: int, device=None, step: int | None = None):
        left = _truncated_laplace_bins(0.0, self.b1 / 100.0, num_classes)
        right = _truncated_laplace_bins(1.0, self.b2(step) / 100.0, num_classes)
        return (self.w * left + (1.0 - self.w) * right).to(device)


def laplace_mixture_bins(w: float, b1: float, b2: float, num_bins: int) -> torch.Tensor:
    """The DIS mixture (scales in percent of the axis) as (num_bins,) float64 masses."""
    return (w * _truncated_laplace_bins(0.0, b1 / 100.0, num_bins)
            + (1.0 - w) * _truncated_laplace_bins(1.0, b2 / 100.0, num_bins))


_PROPOSALS = {
    "uniform": UniformProposal,
    "teacher": TeacherProposal,
    "ftis": TeacherProposal,
    "dis": LaplaceMixtureProposal,
    "laplace": LaplaceMixtureProposal,
}


def build_proposal(name: str, **params) -> Proposal:
    """Build a proposal by name: uniform | teacher (= ftis) | dis (= laplace)."""
    key = str(name).lower()
    if key not in _PROPOSALS:
        raise ValueError(f"unknown proposal name '{name}'; expected one of "
                         f"{sorted(_PROPOSALS)}")
    return _PROPOSALS[key](**params)


__all__ = ["Proposal", "UniformProposal", "TeacherProposal", "LaplaceMixtureProposal",
           "build_proposal", "teacher_ranking", "laplace_mixture_bins"]
