"""Statistics of which teacher ranks a method touches, per training phase (paper Figs. 3, 5).

The ranks (1-based teacher ranks of the classes PDBS selects, or any method's sampled
classes) are binned on the normalised rank axis x = (rank - 1) / C in [0, 1], num_bins
equal bins (100 by default, so a bin is 1 % of the class axis: the unit of the DIS scales),
one histogram per phase of training. ``fit_laplace_mixture`` fits the DIS proposal's shape
to a histogram, which is how the DIS defaults can be checked against a real run.
"""
from __future__ import annotations

import functools
import json
import os

import torch

from dkd.atomic import atomic_write_text, atomic_write_with
from dkd.sampling.proposals import laplace_mixture_bins


def rank_counts(ranks: torch.Tensor, num_classes: int, num_bins: int) -> torch.Tensor:
    """(num_bins,) float64 counts (on the host) of 1-based teacher ranks (any shape, values
    in [1, C]) in equal bins of the normalised rank axis."""
    r = ranks.detach().reshape(-1).long().cpu()
    if r.numel() and (r.min() < 1 or r.max() > num_classes):
        raise ValueError(f"ranks must be in [1, {num_classes}], got "
                         f"[{int(r.min())}, {int(r.max())}]")
    bins = ((r - 1) * num_bins) // num_classes
    return torch.bincount(bins, minlength=num_bins).double()


class RankHistogram:
    """Per-phase histograms of normalised teacher ranks.

    num_classes: C. num_phases: training is cut into this many equal spans of steps.
    total_steps: steps of the whole run (a step >= total_steps counts in the last phase).
    num_bins: bins on [0, 1].
    """

    def __init__(self, num_classes: int, num_phases: int, total_steps: int,
                 num_bins: int = 100) -> None:
        for name, v, lo in (("num_classes", num_classes, 2), ("num_phases", num_phases, 1),
                            ("total_steps", total_steps, 1), ("num_bins", num_bins, 1)):
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        self.num_classes, self.num_phases = int(num_classes), int(num_phases)
        self.total_steps, self.num_bins = int(total_steps), int(num_bins)
        self.counts = torch.zeros(num_phases, num_bins, dtype=torch.float64)

    def phase(self, step: int) -> int:
        return min(max(step, 0) * self.num_phases // self.total_steps, self.num_phases - 1)

    def update(self, ranks: torch.Tensor, step: int) -> None:
        """Add 1-based teacher ranks (any shape, values in [1, C]) seen at ``step``."""
        self.counts[self.phase(step)] += rank_counts(ranks, self.num_classes, self.num_bins)

    def histograms(self) -> torch.Tensor:
        """(num_phases, num_bins) masses, each non-empty row summing to 1."""
        return self.counts / self.counts.sum(1, keepdim=True).clamp_min(1.0)

    def fits(self) -> list[tuple[float, float, float] | None]:
        """fit_laplace_mixture of every non-empty phase (None for an empty one)."""
        return [fit_laplace_mixture(h) if c.sum() > 0 else None
                for h, c in zip(self.histograms(), self.counts)]

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "num_phases": self.num_phases,
                "total_steps": self.total_steps, "num_bins": self.num_bins,
                "counts": self.counts.tolist(), "histograms": self.histograms().tolist(),
                "fits": [None if f is None else dict(zip(("w", "b1", "b2"), f))
                         for f in self.fits()],
                "fit_units": "b1, b2 in percent of the class axis; w = left mass"}

    @classmethod
    def from_dict(cls, d: dict) -> "RankHistogram":
        h = cls(d["num_classes"], d["num_phases"], d["total_steps"], d["num_bins"])
        h.counts = torch.tensor(d["counts"], dtype=torch.float64)
        return h

    def save(self, path: str) -> None:
        """Write to_dict() as JSON atomically (tmp file, then os.replace)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def plot(self, path: str) -> None:
        """PNG: one panel per phase, histogram as density with the fitted mixture on top."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        P, nb = self.num_phases, self.num_bins
        fig, axes = plt.subplots(1, P, figsize=(3.2 * P, 2.8), squeeze=False, sharey=True)
        x = (torch.arange(nb, dtype=torch.float64) + 0.5) / nb * 100.0
        for p, (ax, h, fit) in enumerate(zip(axes[0], self.histograms(), self.fits())):
            ax.bar(x.numpy(), (h * nb).numpy(), width=100.0 / nb, color="0.7",
                   label="observed")
            if fit is not None:
                model = laplace_mixture_bins(*fit, nb) * nb
                ax.plot(x.numpy(), model.numpy(), "r-", lw=1.2,
                        label="w=%.2f b1=%.1f b2=%.1f" % fit)
            ax.set_title(f"phase {p + 1}/{P}")
            ax.set_xlabel("teacher rank (% of classes)")
            ax.set_yscale("log")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("density")
        fig.tight_layout()
        atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)


@functools.lru_cache(maxsize=32)
def _component_table(center: float, scales: tuple, num_bins: int) -> torch.Tensor:
    """(len(scales), num_bins) bin masses of one truncated Laplace per scale (memoised:
    the coarse grid is the same at every fit)."""
    w = 1.0 if center == 0.0 else 0.0
    return torch.stack([laplace_mixture_bins(w, b, b, num_bins) for b in scales])


def _grid_fit(root_hist, ws, b1s, b2s):
    nb = root_hist.shape[0]
    left = _component_table(0.0, tuple(b1s.tolist()), nb)                      # (n1, nb)
    right = _component_table(1.0, tuple(b2s.tolist()), nb)                     # (n2, nb)
    w = ws.view(-1, 1, 1, 1)
    model = w * left.view(1, -1, 1, nb) + (1 - w) * right.view(1, 1, -1, nb)
    # Hellinger distance: the right component holds a few percent of the mass, so a
    # linear-space fit would ignore it (it is exactly the tail the paper's Figs. 3 and 5
    # show); square roots weigh the tail without letting empty bins dominate as logs do.
    # Both sides sum to 1, so the squared distance is 2 - 2 * sum(sqrt(model * hist)).
    err = -(model.sqrt_() @ root_hist)                                         # (nw, n1, n2)
    i, j, k = torch.unravel_index(err.argmin(), err.shape)
    return float(ws[i]), float(b1s[j]), float(b2s[k])


def fit_laplace_mixture(hist: torch.Tensor) -> tuple[float, float, float]:
    """Least-squares fit (Hellinger distance) of the DIS mixture to a (num_bins,) rank histogram on [0, 1].

    Returns (w, b1, b2): w the mass of the left component, b1 / b2 the scales in percent
    of the class axis (LaplaceMixtureProposal's units). A coarse grid over w in [0, 1] and
    log-spaced scales 0.1 .. 1000 % (a factor 1.78 apart), then two finer grids around
    the best point (a factor 1.15, then 1.03 apart in scale; 0.01, then 0.002 in w).
    """
    h = torch.as_tensor(hist, dtype=torch.float64).reshape(-1)
    if h.numel() < 2 or not h.sum() > 0:
        raise ValueError("hist must have >= 2 bins and positive mass")
    root = (h / h.sum()).sqrt()
    scales = torch.logspace(-1, 3, 17, dtype=torch.float64)
    w, b1, b2 = _grid_fit(root, torch.linspace(0, 1, 21, dtype=torch.float64), scales, scales)
    step, dw = 10 ** (4 / 16), 0.05                # one coarse grid step in scale and in w
    for _ in range(2):
        fine = torch.linspace(-1, 1, 9, dtype=torch.float64)
        w, b1, b2 = _grid_fit(root, (w + dw * fine).clamp(0, 1), b1 * step ** fine,
                              b2 * step ** fine)
        step, dw = step ** 0.25, dw / 4
    return w, b1, b2
