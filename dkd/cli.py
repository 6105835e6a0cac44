"""The `dkd` command: train | search | relabel | eval | fidelity | bench | report.

Heavy imports (torch, deepspeed) happen inside the commands, so `dkd --help` is instant.
Configuration problems exit with status 2 and one message naming the key or file; a run
stopped on a non-finite loss or gradient exits with status 3.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="dkd: knowledge distillation with a class-sharded, sampled softmax layer.")


def _hard_exit() -> None:
    """Exit 0 without C++ static destructors. Everything is written (atomically) and the
    process group is destroyed by now, but gloo / DeepSpeed's shared-memory comm threads
    can still abort the interpreter's teardown on some ranks ("terminate called without
    an active exception"), which the launcher would report as a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fail(msg: str) -> None:
    typer.echo(f"dkd: error: {msg}", err=True)
    raise typer.Exit(2)


_CONFIG_HELP = "YAML run config (default: the embedded synthetic run)."
_RESUME_HELP = ("Continue the run from its newest verified checkpoint (no --config: with the "
                "run's own config.yaml; --set may change only cadence, length, W&B and "
                "profiling keys).")


@app.command()
def train(config: Optional[Path] = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
          set_: List[str] = typer.Option([], "--set", "-s", help="Override: section.key=value (repeatable)."),
          resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory.")):
    """Train a model (a teacher with method=hard, or a student distilled from teacher.checkpoint)."""
    _train(config, list(set_), resume, overwrite)


@app.command()
def search(config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config of the teacher-sized search space (configs/search_synthetic.yaml)."),
           set_: List[str] = typer.Option([], "--set", "-s", help="Override: section.key=value (repeatable)."),
           resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory.")):
    """Search a student: gate every inner unit of `model`, train with the distillation loss
    and a FLOPs-weighted L1 on the gates, stop at search.target_flops and export the smaller
    network (<run>/student.yaml, for `dkd train --set model.arch=searched --set model.spec=...`)."""
    _train(config, ["search.enabled=true", *set_], resume, overwrite)


def _train(config: Optional[Path], set_: list[str], resume: bool, overwrite: bool) -> None:
    from dkd.config import ConfigError, load_config
    from dkd.engine.guard import exit_with_launcher

    exit_with_launcher()
    try:
        cfg = load_config(config, set_)  # no file: the embedded default (configs/synthetic.yaml)
        saved = Path(cfg.out_dir) / (cfg.name or "") / "config.yaml"
        if resume and config is None and cfg.name and saved.is_file():
            cfg = load_config(saved, set_)   # --resume continues the run's own config
        if cfg.search.enabled and cfg.search.loss == "ce":
            cfg.method.name = "hard"         # plain pruning: hard labels, no teacher
        from dkd.engine.distributed import shutdown
        from dkd.engine.health import RunStopped
        from dkd.engine.loop import train as run_train

        try:
            run_dir = run_train(cfg, resume=resume, overwrite=overwrite)
        except RunStopped as err:
            typer.echo(f"dkd: stopped: {err}", err=True)
            sys.stderr.flush()
            os._exit(3)   # as _hard_exit: no teardown of the comm threads
        shutdown()
    except ConfigError as err:
        _fail(str(err))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"run directory: {run_dir}")
    _hard_exit()


@app.command()
def relabel(config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config."),
            set_: List[str] = typer.Option([], "--set", "-s", help="Override: section.key=value."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store of other settings."),
            batch_size: int = typer.Option(1024, help="Teacher batch size.")):
    """Run teacher.checkpoint over the training set once; write the soft-label store to teacher.store."""
    from dkd.config import ConfigError, load_config
    from dkd.engine.guard import exit_with_launcher

    exit_with_launcher()
    try:
        from dkd.engine.distributed import shutdown
        from dkd.teacher.run_relabel import run_relabel

        path = run_relabel(load_config(config, set_), overwrite=overwrite, batch_size=batch_size)
        shutdown()
    except ConfigError as err:
        _fail(str(err))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"soft-label store: {path}")
    _hard_exit()


@app.command("eval")
def eval_(run: Path = typer.Option(..., "--run", help="Run directory (uses its model.pt)."),
          set_: List[str] = typer.Option([], "--set", "-s", help="Override, e.g. data.test_size=500.")):
    """Evaluate a finished run's exported model on its held-out set (one process)."""
    from dkd.config import ConfigError, load_config
    from dkd.evaluation import evaluate_run

    try:
        cfg = load_config(run / "config.yaml", set_) if (run / "config.yaml").is_file() else \
            _fail(f"{run}/config.yaml not found: is {run} a dkd run directory?")
        result = evaluate_run(run, cfg)
    except ConfigError as err:
        _fail(str(err))
    typer.echo(json.dumps(result))


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


@app.command()
def fidelity(classes: int = typer.Option(1000, help="Class count C."),
             batch: int = typer.Option(64, help="Batch size B."),
             k: str = typer.Option("10,100,1000", help="Comma-separated per-row budgets k (target + k - 1 draws; k >= C is skipped)."),
             dim: int = typer.Option(64, help="Feature dimension d."),
             seeds: int = typer.Option(3, help="Random problems averaged."),
             methods: str = typer.Option("uniform,ftis,dis,pdbs", help="Methods to compare."),
             temperature: Optional[float] = typer.Option(None, help="KD temperature T (default 4; with --run, the run's)."),
             run: Optional[Path] = typer.Option(None, "--run", help="A finished run directory: real training batches, its student, its teacher and its T instead of a synthetic problem (--classes, --dim, --seeds are then ignored)."),
             batches: int = typer.Option(2, help="With --run: training batches averaged."),
             completion: bool = typer.Option(False, "--completion", help="With --run: give the sampler the even top-K completion instead of the exact teacher columns (what a top-K store without features gives)."),
             at: str = typer.Option("end", "--at", help="With --run: points of training: end (the exported model), all (every checkpoint, then the end), or comma-separated checkpoint steps."),
             out: Path = typer.Option(Path("fidelity.json"), "--out", help="JSON output; a .md table is written next to it.")):
    """Compare each sampled method's gradient with the full-KD gradient (cosine, rel. error,
    where the error sits)."""
    from dkd.fidelity import fidelity_markdown, run_fidelity, write_fidelity

    if run is not None:
        from dkd.config import ConfigError, load_config
        from dkd.fidelity_run import run_fidelity_of_run
        if not (run / "config.yaml").is_file():
            _fail(f"{run}/config.yaml not found: is {run} a dkd run directory?")
        try:
            records = run_fidelity_of_run(run, load_config(run / "config.yaml"), _csv(k, int),
                                          batches=batches, methods=tuple(_csv(methods)),
                                          temperature=temperature, completion=completion,
                                          at=at)
        except (ConfigError, ValueError) as err:
            _fail(str(err))
        md = write_fidelity(records, str(out))
        typer.echo(fidelity_markdown(records))
        typer.echo(f"wrote {out} and {md}")
        return

    ks = [x for x in _csv(k, int) if x < classes]
    skipped = [x for x in _csv(k, int) if x not in ks]
    if skipped:
        typer.echo(f"skipping k = {skipped}: k must be < --classes ({classes})", err=True)
    if not ks:
        _fail(f"--k: every k must be < --classes ({classes}); got {k}")
    try:
        records = run_fidelity(classes, batch, ks, dim=dim, seeds=seeds,
                               methods=tuple(_csv(methods)),
                               temperature=4.0 if temperature is None else temperature)
    except ValueError as err:
        _fail(str(err))
    md = write_fidelity(records, str(out))
    typer.echo(fidelity_markdown(records))
    typer.echo(f"wrote {out} and {md}")


@app.command()
def report(runs: List[Path] = typer.Argument(..., help="Run directories (runs/<name>)."),
           out: Path = typer.Option(Path("report"), "--out", "-o", help="Output directory."),
           skip_steps: int = typer.Option(0, help="Leave the first steps (warm-up) out of the timing statistics.")):
    """Write report.md / report.html with softmax-layer timing, speedup and accuracy plots."""
    from dkd.report import write_report

    try:
        path = write_report(runs, out, skip_steps=skip_steps)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"report: {path}")


bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Benchmarks that print ratios measured in one run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("softmax")
def bench_softmax(classes: str = typer.Option("751,10000,100000", help="Class counts C."),
                  k: str = typer.Option("20,120,1000", help="Draws m (k >= C is skipped)."),
                  batch: str = typer.Option("256", help="Global batch sizes B."),
                  dim: str = typer.Option("512", help="Feature dimensions d."),
                  world_sizes: str = typer.Option("1,2", help="Ranks P (gloo processes)."),
                  methods: str = typer.Option("uniform,ftis,dis", help="Sampled methods."),
                  modes: str = typer.Option("batch_shared,per_sample,hybrid", help="Application modes."),
                  warmup: int = typer.Option(2, help="Untimed steps per case."),
                  repeats: int = typer.Option(7, help="Timed steps per case."),
                  teacher_topk: int = typer.Option(100, help="K of the top-K teacher data."),
                  threads: Optional[int] = typer.Option(None, help="Intra-op threads per rank."),
                  trace_ops: bool = typer.Option(False, "--trace-ops", help="Add aten_ops / host_syncs of one head step (torch path) to each sampled record."),
                  device: str = typer.Option("cpu", help="Device of the head step: cpu or cuda (one process)."),
                  out: Path = typer.Option(Path("bench.json"), "--out", help="JSON output; a .md table is written next to it.")):
    """Time the head step (sampling, logits, loss, backward, head update) of full KD and of
    every sampled method and mode, and its speedup over full KD in the same run."""
    from dkd.bench import bench_markdown, run_softmax_bench, write_bench

    try:
        lists = (_csv(classes, int), _csv(k, int))
        rest = (_csv(world_sizes, int), _csv(methods), _csv(modes), warmup, repeats,
                teacher_topk)
        records = []
        for b in _csv(batch, int):      # every (B, d) pair has its own full-KD baseline
            for d in _csv(dim, int):
                records += run_softmax_bench(*lists, b, d, *rest, threads=threads,
                                             trace_ops=trace_ops, device=device)
    except ValueError as err:
        _fail(str(err))
    md = write_bench(records, str(out))
    typer.echo(bench_markdown(records))
    typer.echo(f"wrote {out} and {md}")


@bench_app.command("timer")
def bench_timer(steps: int = typer.Option(500, help="Steps measured."),
                regions: int = typer.Option(11, help="Timed region entries per step (the trainer opens 11 for a sampled method).")):
    """Per-step cost of the per-iteration region timer: enabled minus disabled."""
    from dkd.profiling.timers import measure_timer_overhead

    res = measure_timer_overhead("cpu", steps=steps, regions_per_step=regions)
    typer.echo(json.dumps({k: round(v, 4) for k, v in res.items()}))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
