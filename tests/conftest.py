"""Shared test helpers: run the real CLI in a subprocess (real DeepSpeed, real torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: every CLI test run uses these unless it overrides them.
TINY = ["data.num_classes=20", "data.input_dim=16", "data.num_super_classes=4",
        "data.train_size=2048", "data.test_size=512", "model.hidden=32", "model.depth=1",
        "model.feature_dim=16", "train.batch_size=64", "train.steps=20", "train.log_every=1",
        "wandb.mode=disabled"]


def cli_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def run_cli(args: list[str], sets: list[str] = (), nproc: int = 1, check: bool = True,
            cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`dkd <args> --set ...` in a fresh process; nproc > 1 goes through torchrun."""
    flags = [x for s in sets for x in ("--set", s)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "dkd", *args, *flags]
    else:
        cmd = [sys.executable, "-m", "dkd", *args, *flags]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-5000:]}")
    return proc


def train_run(tmp: Path, name: str, *sets: str, nproc: int = 1, extra: list[str] = (),
              check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(["train", *extra], [*TINY, f"out_dir={tmp}", f"name={name}", *sets],
                   nproc=nproc, check=check)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """One tiny teacher shared by every test that distills."""
    tmp = tmp_path_factory.mktemp("teacher")
    train_run(tmp, "teacher", "method.name=hard", "model.hidden=64", "train.steps=150",
              "train.log_every=50")
    return tmp / "teacher"
