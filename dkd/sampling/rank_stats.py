"""Statistics of which teacher ranks a method touches, per training phase (paper Figs. 3, 5).

The ranks (1-based teacher ranks of the classes PDBS selects, or any method's sampled
classes) are binned on the normalised rank axis x = (rank - 1) / C in [0, 1], num_bins
equal bins (100 by default, so a bin is 1 % of the class axis: the unit of the DIS scales),
one histogram per phase of training. ``fit_laplace_mixture`` fits the DIS proposal's shape
to a histogram, which is how the DIS defaults can be checked against a real run.
"""
from __future__ import annotations

import json
import os

import torch

from dkd.sampling.proposals import laplace_mixture_bins


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
        r = ranks.detach().reshape(-1).long().cpu()
        if r.numel() and (r.min() < 1 or r.max() > self.num_classes):
            raise ValueError(f"ranks must be in [1, {self.num_classes}], got "
                             f"[{int(r.min())}, {int(r.max())}]")
        bins = ((r - 1) * self.num_bins) // self.num_classes
        self.counts[self.phase(step)] += torch.bincount(bins, minlength=self.num_bins).double()

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
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

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
        tmp = f"{path}.tmp.{os.getpid()}.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


def _grid_fit(hist, ws, b1s, b2s):
    nb = hist.shape[0]
    left = torch.stack([laplace_mixture_bins(1.0, b, 1.0, nb) for b in b1s])    # (n1, nb)
    right = torch.stack([laplace_mixture_bins(0.0, 1.0, b, nb) for b in b2s])   # (n2, nb)
    w = ws.view(-1, 1, 1, 1)
    model = w * left.view(1, -1, 1, nb) + (1 - w) * right.view(1, 1, -1, nb)
    # Hellinger distance: the right component holds a few percent of the mass, so a
    # linear-space fit would ignore it (it is exactly the tail the paper's Figs. 3 and 5
    # show); square roots weigh the tail without letting empty bins dominate as logs do.
    err = ((model.sqrt() - hist.sqrt()) ** 2).sum(-1)                           # (nw, n1, n2)
    i, j, k = torch.unravel_index(err.argmin(), err.shape)
    return float(ws[i]), float(b1s[j]), float(b2s[k])


def fit_laplace_mixture(hist: torch.Tensor) -> tuple[float, float, float]:
    """Least-squares fit (Hellinger distance) of the DIS mixture to a (num_bins,) rank histogram on [0, 1].

    Returns (w, b1, b2): w the mass of the left component, b1 / b2 the scales in percent
    of the class axis (LaplaceMixtureProposal's units). A coarse grid over w in [0, 1] and
    log-spaced scales 0.1 .. 1000 %, then a finer grid around the best point.
    """
    h = torch.as_tensor(hist, dtype=torch.float64).reshape(-1)
    if h.numel() < 2 or not h.sum() > 0:
        raise ValueError("hist must have >= 2 bins and positive mass")
    h = h / h.sum()
    w, b1, b2 = _grid_fit(h, torch.linspace(0, 1, 21, dtype=torch.float64),
                          torch.logspace(-1, 3, 33, dtype=torch.float64),
                          torch.logspace(-1, 3, 33, dtype=torch.float64))
    step = 10 ** (4 / 32)                 # one coarse grid step in scale
    fine = torch.linspace(-1, 1, 11, dtype=torch.float64)
    return _grid_fit(h, (w + 0.05 * fine).clamp(0, 1),
                     b1 * step ** fine, b2 * step ** fine)
