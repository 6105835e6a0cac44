"""The student-search part of the report: a search run's FLOPs and loss over the search and
its kept-channel fraction per block (a heatmap over the search), and, over a set of trained
students, top-1 against backbone FLOPs (searched vs hand-configured, KD vs hard labels)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dkd.report_plots import _figure, _save

if TYPE_CHECKING:
    from dkd.report import RunData


def plot_search(run: "RunData", path: Path) -> bool:
    """Open sub-network FLOPs (% of the start) and the training loss over the search."""
    if not run.search:
        return False
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    steps = [r["step"] for r in run.search]
    ax.plot(steps, [100 * r["search/flops_frac"] for r in run.search], color="C0",
            label="backbone FLOPs")
    ax.plot(steps, [100 * r["search/open_frac"] for r in run.search], color="C0", ls="--",
            label="open gates")
    ax.set(xlabel="step", ylabel="% of the starting network", title=f"search: {run.name}")
    ax.set_ylim(0, 105)
    if run.loss:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in run.loss], [v for _, v in run.loss], color="C1", alpha=0.6,
                 lw=0.8, label="training loss")
        ax2.set_ylabel("training loss")
        ax2.legend(loc="upper center", fontsize="small")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_keep_heatmap(run: "RunData", path: Path) -> bool:
    """Kept-channel fraction per block (rows) at every FLOP count of the search (columns)."""
    if not run.search:
        return False
    layers = sorted({int(k.rsplit("/", 1)[1]) for r in run.search for k in r
                     if k.startswith("search/keep/")})
    grid = [[r.get(f"search/keep/{i}", math.nan) for r in run.search] for i in layers]
    fig = _figure(7.0, max(2.4, 0.9 + 0.28 * len(layers)))
    ax = fig.add_subplot()
    steps = [r["step"] for r in run.search]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=(steps[0], steps[-1], len(layers) - 0.5, -0.5))
    ax.set(xlabel="step", ylabel="block", title=f"kept channels per block: {run.name}")
    ax.set_yticks(range(len(layers)))
    fig.colorbar(im, ax=ax, label="fraction kept")
    return _save(fig, path)


def student_rows(runs: Sequence["RunData"]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "architecture", "method", "backbone FLOPs / sample", "top-1 %"]
    rows = [[r.name, r.arch or "?", r.method, f"{r.flops:,.0f}",
             f"{r.top1:.2f}" if math.isfinite(r.top1) else "n/a"]
            for r in sorted(runs, key=lambda r: r.flops)]
    return header, rows


def plot_top1_vs_flops(runs: Sequence["RunData"], path: Path) -> bool:
    """Top-1 against backbone FLOPs: marker = searched or hand-configured, colour = the
    training method; every point labelled by run name."""
    points = [r for r in runs if math.isfinite(r.flops) and math.isfinite(r.top1)]
    if len(points) < 2:
        return False
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    methods = sorted({r.method for r in points})
    span = max(r.flops for r in points) - min(r.flops for r in points) or 1.0
    placed: list[tuple[float, float]] = []
    for r in sorted(points, key=lambda r: (r.flops, -r.top1)):
        searched = r.arch == "searched"
        ax.scatter(r.flops, r.top1, marker="*" if searched else "o", s=90 if searched else 40,
                   color=f"C{methods.index(r.method)}", zorder=3)
        # why: students of one size sit on top of each other; stack their labels instead
        near = sum(abs(x - r.flops) < 0.08 * span and abs(y - r.top1) < 3 for x, y in placed)
        placed.append((r.flops, r.top1))
        ax.annotate(r.name, (r.flops, r.top1), textcoords="offset points",
                    xytext=(6, 4 - 9 * near), fontsize="x-small")
    for m in methods:
        ax.scatter([], [], color=f"C{methods.index(m)}", label=m)
    ax.scatter([], [], marker="*", color="0.4", label="searched")
    ax.scatter([], [], marker="o", color="0.4", label="hand-configured")
    ax.set(xlabel="backbone FLOPs per sample", ylabel="top-1 (%)",
           title="students: top-1 against FLOPs")
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def search_blocks(runs: Sequence["RunData"], out_dir: Path, slug) -> list[tuple]:
    blocks: list[tuple] = []
    for run in runs:
        if not run.search:
            continue
        blocks += [("h2", f"Student search: {run.name}"), ("p", (
            f"Open sub-network at the end: {run.search[-1]['search/flops']:,.0f} backbone FLOPs "
            f"per sample ({100 * run.search[-1]['search/flops_frac']:.1f} % of the start), "
            f"{100 * run.search[-1]['search/open_frac']:.1f} % of the gates open, after "
            f"{run.steps} steps."))]
        for fn, kind, alt in ((plot_search, "search", "FLOPs and loss over the search"),
                              (plot_keep_heatmap, "keep", "kept channels per block")):
            name = f"{kind}_{slug(run.name)}.png"
            if fn(run, out_dir / name):
                blocks.append(("img", name, f"{alt}, {run.name}"))
    students = [r for r in runs if not r.search and math.isfinite(r.flops)]
    if len(students) >= 2 and len({r.flops for r in students}) > 1:
        blocks.append(("h2", "Students: top-1 against FLOPs"))
        header, rows = student_rows(students)
        blocks.append(("table", header, rows))
        if plot_top1_vs_flops(students, out_dir / "top1_vs_flops.png"):
            blocks.append(("img", "top1_vs_flops.png", "top-1 against backbone FLOPs"))
    return blocks
