"""PNG plots of the speedup report (matplotlib's object API: no pyplot, no GUI backend).

Each function returns True when it wrote its file (False: nothing to plot).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from dkd.report import RunData

__all__ = ["plot_softmax_ms", "plot_top1_vs_ms", "plot_top1_vs_k", "plot_proposal",
           "plot_step_split"]

MAX_POINTS = 4000  # per curve; longer series are strided (a PNG cannot show more anyway)


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # why: Agg canvas without touching the global pyplot backend
    return fig


def _save(fig: Figure, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path)
    return True


def _stride(xs: list, ys: list) -> tuple[list, list]:
    step = max(1, math.ceil(len(xs) / MAX_POINTS))
    return xs[::step], ys[::step]


def _rolling_median(ys: list[float], min_points: int = 200) -> list[float] | None:
    """Centred rolling median over ~2 % of the series (None for short series)."""
    if len(ys) < min_points:
        return None
    half = max(2, len(ys) // 100)
    return [statistics.median(ys[max(0, i - half):i + half + 1]) for i in range(len(ys))]


def _wide_range(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 20


def plot_softmax_ms(runs: Sequence["RunData"], path: Path, title: str,
                    skip_steps: int = 0) -> bool:
    """Softmax-layer ms against training step, one line per run."""
    series = [(r, [(s, ms) for s, ms in r.softmax if s >= skip_steps and math.isfinite(ms)])
              for r in runs]
    series = [(r, pts) for r, pts in series if pts]
    if not series:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    for run, pts in series:
        xs, ys = _stride([p[0] for p in pts], [p[1] for p in pts])
        smooth = _rolling_median(ys)
        if smooth is None:
            ax.plot(xs, ys, lw=0.8, label=f"{run.name}: {run.label}")
            continue
        # Per-iteration times are noisy on a shared host: the raw series faint, a rolling
        # median on top so runs can be told apart.
        line, = ax.plot(xs, ys, lw=0.5, alpha=0.25)
        ax.plot(xs, smooth, lw=1.6, color=line.get_color(), label=f"{run.name}: {run.label}")
    if _wide_range([ms for _, pts in series for _, ms in pts]):
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="softmax layer (ms / iteration)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_top1_vs_ms(runs: Sequence["RunData"], path: Path, title: str,
                    skip_steps: int = 0) -> bool:
    """Top-1 against median softmax-layer ms, one labelled point per run (paper Fig. 7)."""
    points = []
    for run in runs:
        ms = run.softmax_ms(skip_steps)
        if ms and math.isfinite(run.top1):
            points.append((statistics.median(ms), run.top1, run.label))
    if not points:
        return False
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], zorder=3)
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    if _wide_range([p[0] for p in points]):
        ax.set_xscale("log")
    ax.margins(0.15)  # why: room for the labels of the extreme points
    ax.set(xlabel="softmax layer, median ms / iteration", ylabel="top-1", title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


_FLAT = ("hard", "kd")   # methods without k: drawn as horizontal reference lines


def plot_top1_vs_k(runs: Sequence["RunData"], path: Path, title: str,
                   skip_steps: int = 0) -> bool:
    """Top-1 against k, one line per sampled method (and mode), hard labels and full KD as
    horizontal lines (the paper's Figure 6). Needs a sampled method at two k or more."""
    del skip_steps  # accuracy does not depend on the timing window
    curves: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, list[float]] = {}
    for run in runs:
        if not math.isfinite(run.top1):
            continue
        if run.method in _FLAT:
            flat.setdefault(run.method, []).append(run.top1)
        elif isinstance(run.k, (int, float)):
            name = run.method + (f" {run.mode}" if run.mode else "")
            curves.setdefault(name, []).append((float(run.k), run.top1))
    if not any(len({k for k, _ in pts}) >= 2 for pts in curves.values()):
        return False
    fig = _figure()
    ax = fig.add_subplot()
    for name, pts in sorted(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for method, tops in sorted(flat.items()):
        ax.axhline(statistics.fmean(tops), ls="--", lw=1.2,
                   color="black" if method == "kd" else "grey",
                   label="full KD" if method == "kd" else "hard labels")
    if _wide_range([k for pts in curves.values() for k, _ in pts]):
        ax.set_xscale("log")
    ax.set(xlabel="k (sampled classes per step)", ylabel="top-1", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_proposal(run: "RunData", path: Path, max_curves: int = 12) -> bool:
    """The proposal over normalised rank at logged steps, coloured by step."""
    rows = [r for r in run.proposal if r.get("rank_probs")]
    if not rows:
        return False
    n = min(max_curves, len(rows))  # evenly spaced snapshots, first and last included
    idx = sorted({round(i * (len(rows) - 1) / max(1, n - 1)) for i in range(n)})
    rows = [rows[i] for i in idx]
    steps = [float(r.get("step", i)) for i, r in enumerate(rows)]
    lo, hi = min(steps), max(steps)
    fig = _figure()
    ax = fig.add_subplot()
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm, cmap = Normalize(lo, hi if hi > lo else lo + 1), colormaps["viridis"]
    for row, step in zip(rows, steps):
        probs = [float(p) for p in row["rank_probs"]]
        xs = row.get("x") or [i / max(1, len(probs) - 1) for i in range(len(probs))]
        if len(xs) != len(probs):
            raise ValueError(f"{run.dir}/proposal.jsonl: step {step:g}: x has {len(xs)} "
                             f"values but rank_probs has {len(probs)}")
        xs, probs = _stride(list(xs), probs)
        ax.plot(xs, probs, color=cmap(norm(step)), lw=1.0)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step")
    ax.set(xlabel="normalised teacher rank", ylabel="proposal probability",
           title=f"proposal over training: {run.name} ({run.label})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_step_split(runs: Sequence["RunData"], path: Path) -> bool:
    """One horizontal stacked bar per run: its median step split into its parts."""
    from dkd.report import STEP_PARTS

    timed = [r for r in runs if r.step_split]
    if not timed:
        return False
    fig = _figure(9.0, max(2.6, 1.2 + 0.35 * len(timed)))
    ax = fig.add_subplot()
    left = [0.0] * len(timed)
    for i, part in enumerate(STEP_PARTS):
        widths = [r.step_split.get(part, 0.0) for r in timed]
        ax.barh(range(len(timed)), widths, left=left, color=f"C{i}", label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(timed)), [r.name for r in timed], fontsize="small")
    ax.invert_yaxis()
    ax.set(xlabel="median ms per step", title="where the time of a step goes")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
