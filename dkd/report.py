"""The speedup report: softmax-layer time and accuracy of a set of runs, side by side.

``write_report(run_dirs, out_dir)`` reads each run directory (``metrics.jsonl`` or, when
that is missing, the run's offline W&B file; ``summary.json``, falling back to
``config.yaml``) and writes ``report.md`` and ``report.html`` (same content) with PNG
plots next to them:

- softmax-layer ms per iteration, one line per run;
- a table per class count: mean / median softmax ms, speedup over the full-KD run
  (method ``kd``: median(full) / median(this), same class count), top-1, mAP, steps;
- top-1 against median softmax-layer ms, one point per run (the paper's Fig. 7);
- the DIS proposal over training, for runs that wrote ``proposal.jsonl``.

Runs are grouped by class count: a speedup across different C would mean nothing.
Also a script: ``python -m dkd.report RUN_DIR... -o OUT`` (and ``profiling/report.py``).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dkd.logging.sinks import read_jsonl, read_wandb_offline

__all__ = ["RunData", "load_run", "write_report", "main"]

FULL_KD = "kd"


@dataclass
class RunData:
    """What the report needs from one run directory."""

    dir: Path
    name: str
    method: str
    k: int | None
    classes: int | None
    steps: int | None
    top1: float = math.nan
    map: float = math.nan
    perplexity: float = math.nan
    ece: float = math.nan
    wall_s: float = math.nan
    softmax: list[tuple[int, float]] = field(default_factory=list)  # (step, ms)
    proposal: list[dict[str, Any]] = field(default_factory=list)
    source: str = "metrics.jsonl"
    mode: str | None = None          # method.mode; it matters for the sampled methods only
    arch: str | None = None          # model.arch (`searched`: a student dkd search exported)
    flops: float = math.nan          # backbone FLOPs per sample (summary.json)
    search: list[dict[str, Any]] = field(default_factory=list)   # `search` lines
    loss: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    step_split: dict[str, float] = field(default_factory=dict)   # median ms per part of a step

    @property
    def label(self) -> str:
        """``method(k)``, e.g. ``dis(50)``; just the method when it has no k."""
        return f"{self.method}({self.k})" if self.k is not None else self.method

    def softmax_ms(self, skip_steps: int = 0) -> list[float]:
        return [ms for step, ms in self.softmax if step >= skip_steps and math.isfinite(ms)]


# --------------------------------------------------------------------------- loading

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _metric_rows(run_dir: Path) -> tuple[list[dict], list[dict], str, dict]:
    """(train rows, eval rows, source, W&B config) from metrics.jsonl or W&B offline."""
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        rows, source, wb_config = read_jsonl(jsonl), "metrics.jsonl", {}
    elif list(run_dir.glob("wandb/offline-run-*/*.wandb")):
        wb_config, rows = read_wandb_offline(run_dir)
        source = "W&B offline"
    else:
        raise ValueError(f"{run_dir}: no metrics: neither metrics.jsonl nor a W&B offline "
                         "run (wandb/offline-run-*/*.wandb)")
    if not rows:
        raise ValueError(f"{run_dir}: {source} has no metric lines")
    train = [r for r in rows if r.get("kind") == "train"
             or ("kind" not in r and "softmax_ms" in r)]
    evals = [r for r in rows if r.get("kind") == "eval"
             or ("kind" not in r and "eval/top1" in r)]
    return train, evals, source, wb_config


def _config_facts(run_dir: Path, wb_config: dict) -> dict[str, Any]:
    """method / k / classes from config.yaml, else from the W&B config."""
    cfg = wb_config
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    return {"method": method.get("name"), "k": method.get("k"), "mode": method.get("mode"),
            "classes": data.get("num_classes")}


def _last(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else math.nan


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _step(row: dict, index: int) -> int:
    step = row.get("step")
    return int(step) if isinstance(step, (int, float)) and math.isfinite(step) else index


def load_run(run_dir: str | Path) -> RunData:
    """Read one run directory; raises ValueError/FileNotFoundError naming what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    train, evals, source, wb_config = _metric_rows(run_dir)
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() \
        else {}
    facts = _config_facts(run_dir, wb_config)
    pick = lambda key: summary[key] if summary.get(key) is not None else facts.get(key)
    steps = [_step(r, i) for i, r in enumerate(train)]
    softmax = [(s, _num(r.get("softmax_ms"))) for s, r in zip(steps, train) if "softmax_ms" in r]
    run = RunData(
        dir=run_dir, name=str(summary.get("name") or run_dir.name),
        method=str(pick("method") or "unknown"), k=pick("k"), classes=pick("classes"),
        steps=summary.get("steps", max(steps, default=None)),
        top1=_num(summary.get("top1", _last(evals, "eval/top1"))),
        map=_num(summary.get("map", summary.get("mAP", _last(evals, "eval/map")))),
        perplexity=_num(summary.get("perplexity", _last(evals, "eval/perplexity"))),
        ece=_num(summary.get("ece", _last(evals, "eval/ece"))),
        wall_s=_num(summary.get("wall_s")), softmax=softmax, source=source,
        mode=pick("mode"))
    if (run_dir / "proposal.jsonl").is_file():
        run.proposal = read_jsonl(run_dir / "proposal.jsonl")
    run.step_split = step_split(train)
    run.arch, run.flops = summary.get("arch"), _num(summary.get("backbone_flops"))
    run.loss = [(s, _num(r.get("loss"))) for s, r in zip(steps, train)]
    if source == "metrics.jsonl":
        run.search = [r for r in read_jsonl(run_dir / "metrics.jsonl")
                      if r.get("kind") == "search"]
    return run


# The parts of a step, from the timer's regions. The head update runs inside both the
# softmax-layer and the optimizer regions, so it is counted once, in the softmax layer.
STEP_PARTS = ("teacher", "backbone forward", "communication", "softmax layer",
              "backbone backward", "backbone optimizer", "other")


def step_split(train: list[dict]) -> dict[str, float]:
    """Median ms per part of a step over the training lines (empty without timings)."""
    parts: dict[str, list[float]] = {k: [] for k in STEP_PARTS}
    for r in train:
        g = lambda k: _num(r.get(k))
        if not all(math.isfinite(g(k)) for k in ("iter_ms", "softmax_ms", "optimizer_ms")):
            continue
        head_update = max(0.0, g("softmax_ms") - _nz(g("softmax_fwd_ms")) - _nz(g("softmax_bwd_ms")))
        row = {"teacher": _nz(g("teacher_ms")), "backbone forward": _nz(g("backbone_fwd_ms")),
               "communication": _nz(g("comm_ms")), "softmax layer": g("softmax_ms"),
               "backbone backward": _nz(g("backbone_bwd_ms")),
               "backbone optimizer": max(0.0, g("optimizer_ms") - head_update)}
        row["other"] = max(0.0, g("iter_ms") - sum(row.values()))
        for k, v in row.items():
            parts[k].append(v)
    return {k: statistics.median(v) for k, v in parts.items() if v}


def _nz(x: float) -> float:
    return x if math.isfinite(x) else 0.0


# --------------------------------------------------------------------------- numbers

def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def group_by_classes(runs: Sequence[RunData]) -> dict[int | None, list[RunData]]:
    """Runs per class count (unknown last); full KD first in each, then by method and k."""
    groups: dict[int | None, list[RunData]] = {}
    order = sorted(runs, key=lambda r: (r.method != FULL_KD, r.method,
                                        r.k if isinstance(r.k, int) else -1, r.name))
    for run in order:
        groups.setdefault(run.classes, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def speedups(runs: Sequence[RunData], skip_steps: int = 0) -> tuple[list[float], RunData | None]:
    """median(full KD) / median(run) per run (one class count), and the KD run used."""
    ref = next((r for r in runs if r.method == FULL_KD and r.softmax_ms(skip_steps)), None)
    if ref is None:
        return [math.nan] * len(runs), None
    full = _median(ref.softmax_ms(skip_steps))
    return [full / m if (m := _median(r.softmax_ms(skip_steps))) > 0 else math.nan
            for r in runs], ref


def _f(value: float, spec: str = ".3f", suffix: str = "") -> str:
    return format(value, spec) + suffix if math.isfinite(value) else "n/a"


_SAMPLED = ("uniform", "ftis", "dis")   # the methods whose method.mode changes the estimator


def table_rows(runs: Sequence[RunData], skip_steps: int = 0) -> tuple[list[str], list[list[str]]]:
    speed, _ = speedups(runs, skip_steps)
    has = {key: any(math.isfinite(getattr(r, key)) for r in runs)
           for key in ("map", "perplexity", "ece")}
    names = {"map": "mAP", "perplexity": "perplexity", "ece": "ECE %"}
    header = ["run", "method", "mode", "k", "classes", "steps", "softmax ms (mean)",
              "softmax ms (median)", "speedup vs KD", "top-1"]
    header += [names[key] for key in names if has[key]] + ["wall s"]
    rows = []
    for run, s in zip(runs, speed):
        ms = run.softmax_ms(skip_steps)
        mode = run.mode if run.mode and run.method in _SAMPLED else "-"
        row = [run.name, run.method, mode, "-" if run.k is None else str(run.k),
               "?" if run.classes is None else str(run.classes),
               "?" if run.steps is None else str(run.steps),
               _f(_mean(ms)), _f(_median(ms)), _f(s, ".2f", "x"), _f(run.top1, ".4f")]
        row += [_f(getattr(run, key), spec) for key, spec in
                (("map", ".4f"), ("perplexity", ".1f"), ("ece", ".2f")) if has[key]]
        rows.append(row + [_f(run.wall_s, ".1f")])
    return header, rows


# --------------------------------------------------------------------------- rendering

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _blocks(runs: list[RunData], out_dir: Path, skip_steps: int) -> list[tuple]:
    """The report as ("h1"|"h2"|"p", text), ("table", header, rows), ("img", file, alt)."""
    from dkd import report_plots as plots

    blocks: list[tuple] = [("h1", "dkd speedup report"), ("p", (
        "Softmax-layer time is the per-iteration `softmax_ms` the trainer measured (head "
        "forward, backward and update). Speedup = median softmax ms of the full-KD run "
        "(method `kd`, same class count) / median softmax ms of the run."
        + (f" The first {skip_steps} steps are left out as warm-up." if skip_steps else "")))]
    for classes, group in group_by_classes(runs).items():
        tag = f"C{classes}" if classes is not None else "Cunknown"
        blocks.append(("h2", f"{classes if classes is not None else 'unknown'} classes"))
        header, rows = table_rows(group, skip_steps)
        _, ref = speedups(group, skip_steps)
        blocks.append(("p", f"Speedup reference: run `{ref.name}`." if ref else
                       "No full-KD run (method `kd`) with this class count: speedup n/a."))
        blocks.append(("table", header, rows))
        for kind, fn, alt in (
                ("softmax_ms", plots.plot_softmax_ms, "softmax-layer ms per iteration"),
                ("top1_vs_ms", plots.plot_top1_vs_ms, "top-1 vs median softmax-layer ms"),
                ("top1_vs_k", plots.plot_top1_vs_k, "top-1 vs sampled classes k")):
            name = f"{kind}_{tag}.png"
            if fn(group, out_dir / name, title=f"{alt} ({classes} classes)",
                  skip_steps=skip_steps):
                blocks.append(("img", name, f"{alt}, {classes} classes"))
    if plots.plot_step_split(runs, out_dir / "step_split.png"):
        blocks += [("h2", "Where the time goes"), ("p", (
            "Median ms of each part of a training step, per run (the timer's regions; the "
            "head update is part of the softmax layer; other = iteration minus the parts). "
            "When the softmax layer is a small part, it is no longer the bottleneck.")),
            ("img", "step_split.png", "median step split into its parts, per run")]
    used: set[str] = set()
    for run in runs:
        if not run.proposal:
            continue
        name = f"proposal_{_slug(run.name)}.png"
        name = name if name not in used else f"proposal_{_slug(run.name)}_{len(used)}.png"
        used.add(name)
        plots.plot_proposal(run, out_dir / name)
        blocks += [("h2", f"Proposal over training: {run.name} ({run.label})"),
                   ("img", name, f"proposal over normalised rank, {run.name}")]
    from dkd.report_search import search_blocks
    blocks += search_blocks(runs, out_dir, _slug)
    blocks.append(("p", "Sources: " + "; ".join(f"`{r.dir}` ({r.source})" for r in runs)))
    return blocks


def _to_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            out.append(("# " if b[0] == "h1" else "## ") + b[1])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            cell = lambda s: str(s).replace("|", "\\|")
            out.append("\n".join(["| " + " | ".join(map(cell, b[1])) + " |",
                                  "|" + "---|" * len(b[1])]
                                 + ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]]))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _inline_code(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _to_html(blocks: list[tuple]) -> str:
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2", "p"):
            body.append(f"<{b[0]}>{_inline_code(b[1])}</{b[0]}>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                           for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            body.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dkd report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path,
                 skip_steps: int = 0) -> Path:
    """Write ``out_dir/report.md``, ``report.html`` and the PNG plots; return report.md.

    ``skip_steps``: training steps below this are left out of the softmax statistics.
    """
    if not run_dirs:
        raise ValueError("write_report: no run directories given")
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(runs, out_dir, skip_steps)
    (out_dir / "report.html").write_text(_to_html(blocks), encoding="utf-8")
    md = out_dir / "report.md"
    md.write_text(_to_markdown(blocks), encoding="utf-8")
    return md


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dkd-report", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (runs/<name>)")
    p.add_argument("-o", "--out", type=Path, default=Path("report"),
                   help="output directory (default: ./report)")
    p.add_argument("--skip-steps", type=int, default=0,
                   help="leave steps below this out of the softmax statistics (warm-up)")
    args = p.parse_args(argv)
    print(write_report(args.run_dirs, args.out, skip_steps=args.skip_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
