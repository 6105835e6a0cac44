"""The `dkd` command: train | eval | fidelity | bench | report.

Heavy imports (torch, deepspeed) happen inside the commands, so `dkd --help` is instant.
Configuration problems exit with status 2 and one message naming the key or file.
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


def _fail(msg: str) -> None:
    typer.echo(f"dkd: error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def train(config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                help="YAML run config (default: the embedded synthetic run)."),
          set_: List[str] = typer.Option([], "--set", "-s", help="Override: section.key=value (repeatable)."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory.")):
    """Train a model (a teacher with method=hard, or a student distilled from teacher.checkpoint)."""
    from dkd.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_)  # no file: the embedded default (configs/synthetic.yaml)
        from dkd.engine.loop import train as run_train

        run_dir = run_train(cfg, resume=resume, overwrite=overwrite)
    except ConfigError as err:
        _fail(str(err))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"run directory: {run_dir}")


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
