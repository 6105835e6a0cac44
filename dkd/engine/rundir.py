"""The run directory: `<out_dir>/<name>/` with config.yaml, metrics.jsonl, summary.json,
checkpoints/ and model.pt. Files are written atomically (temporary file, then rename)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dkd.config import ConfigError, RunConfig, dump_config


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def default_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(cfg: RunConfig, name: str, overwrite: bool, resume: bool) -> Path:
    """Create (or reopen, for --resume) the run directory; called on rank 0 only.

    Refuses to touch an existing non-empty directory unless --overwrite (which deletes it)
    or --resume (which continues it), and reports an unwritable parent by path.
    """
    run_dir = Path(cfg.out_dir) / name
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not exists:
            raise ConfigError(f"--resume: run directory {run_dir} does not exist or is empty")
        from dkd.engine.checkpoint import latest_checkpoint  # why local: checkpoint imports us
        latest_checkpoint(run_dir)  # refuse now, before anything in the directory is touched
        return run_dir
    if exists and not overwrite:
        raise ConfigError(f"run directory {run_dir} already exists and is not empty; "
                          "pass --overwrite to replace it or --resume to continue it")
    if exists:
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {run_dir} is not writable: {err.strerror}") from None
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    return run_dir
