"""The run directory: `<out_dir>/<name>/` with config.yaml, metrics.jsonl, summary.json,
checkpoints/ and model.pt. Files are written atomically (temporary file, then rename); the
live job holds `.lock` (see `guard.py`)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from dkd.atomic import atomic_write_text, remove_stale_tmp
from dkd.config import ConfigError, RunConfig, dump_config, load_config
from dkd.engine.checkpoint import checkpoint_steps
from dkd.engine.guard import RunLock

# Keys a resume may change: how long, how often and where it reports, not what it trains.
SAFE_ON_RESUME = ("name", "out_dir", "train.steps", "train.log_every", "train.eval_every",
                  "train.ckpt_every", "train.eval_batch_size", "train.on_nonfinite",
                  "dist.timeout_s", "dist.check_proposal_sync", "dist.check_sample_sync",
                  "dist.device", "wandb.", "profiling.")


def default_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: RunConfig, new: RunConfig) -> tuple[dict, dict]:
    """({key: (old, new)} that change the run's meaning, {key: (old, new)} that do not)."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    diff = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    safe = {k: v for k, v in diff.items()
            if any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_ON_RESUME)}
    return {k: v for k, v in diff.items() if k not in safe}, safe


def check_resume_config(run_dir: Path, cfg: RunConfig) -> dict:
    """Refuse a resume whose config changes the run's meaning (listing the keys); return the
    safe changes {key: (old, new)}."""
    saved = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if saved is None:
        raise ConfigError(f"--resume: {run_dir}/config.yaml not found: is {run_dir} a dkd run?")
    unsafe, safe = config_changes(saved, cfg)
    if unsafe:
        lines = "\n  ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in unsafe.items())
        raise ConfigError(f"--resume: the config differs from {run_dir}/config.yaml in keys that "
                          f"change what the run trains:\n  {lines}\n(only cadence, length, W&B "
                          "and profiling keys may change on resume; start a new run instead)")
    return safe


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what killed writes left (tmp files, `.tmp-step*` directories); the caller holds
    the run lock, so nothing else is writing here."""
    gone = remove_stale_tmp(run_dir)
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        gone += remove_stale_tmp(ckpts)
        for d in ckpts.glob(".tmp-step*"):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def prepare_run_dir(cfg: RunConfig, name: str, overwrite: bool, resume: bool
                    ) -> tuple[Path, RunLock, dict]:
    """Create (or reopen, for --resume) the run directory and lock it; rank 0 only.
    Returns (run_dir, lock, safe config changes of a resume).

    Refuses a directory a live job holds, an existing non-empty directory unless
    --overwrite (which deletes it) or --resume (which continues it, if its config allows),
    and reports an unwritable parent by path.
    """
    run_dir = Path(cfg.out_dir) / name
    exists = run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir())
    if resume:
        if not exists:
            raise ConfigError(f"--resume: run directory {run_dir} does not exist or is empty")
        if not checkpoint_steps(run_dir):  # refuse before anything in the directory is touched
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        lock = RunLock.acquire(run_dir)
        if lock.took_over:
            print(f"dkd: took over the lock of {run_dir} from a job that is gone "
                  f"({lock.took_over})", file=sys.stderr, flush=True)
        try:
            safe = check_resume_config(run_dir, cfg)
        except ConfigError:
            lock.release()
            raise
        clean_stale(run_dir)
        return run_dir, lock, safe
    if exists and not overwrite:
        raise ConfigError(f"run directory {run_dir} already exists and is not empty; "
                          "pass --overwrite to replace it or --resume to continue it")
    if exists:
        RunLock.check_free(run_dir)
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(run_dir)
    except OSError as err:
        raise ConfigError(f"output directory {run_dir} is not writable: {err.strerror}") from None
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    return run_dir, lock, {}


def discard_fresh_run_dir(run_dir: Path) -> bool:
    """After a fresh run failed on bad input (a ConfigError, e.g. a store shard that fails
    its sha256 when first read): remove its directory if it has no checkpoint and no
    model, so the name can be reused without --overwrite once the input is fixed; such a
    run cannot be resumed, and its metrics are of training on bad input."""
    ckpts = run_dir / "checkpoints"
    if (ckpts.is_dir() and any(ckpts.iterdir())) or (run_dir / "model.pt").exists():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True
