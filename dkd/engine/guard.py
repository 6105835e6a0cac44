"""Guards of a live job: one job per run directory, and no worker outliving its launcher.

The lock is an advisory ``flock`` on ``<run_dir>/.lock``, which records the holder (host,
pid, start time). The kernel drops a flock when its process dies, however it dies, so a
lock left by a killed job is simply taken over (with a message); a live holder is refused
by name. (flock works across hosts on local file systems and on NFS mounts whose client
maps it to fcntl locks, as Linux's does.)
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from dkd.config import ConfigError

LOCK_NAME = ".lock"


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    """Held by rank 0 of the job that owns a run directory, for the job's lifetime."""

    def __init__(self, path: Path, fd: int, took_over: str | None) -> None:
        self.path, self._fd, self.took_over = path, fd, took_over

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        path = Path(run_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise ConfigError(f"run directory {run_dir} is in use by a live job ({holder}); "
                              "wait for it to finish or stop it first") from None
        old = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return cls(path, fd, _holder_text(old) if old else None)

    @classmethod
    def check_free(cls, run_dir: Path) -> None:
        """Raise if a live job holds ``run_dir`` (before deleting it for --overwrite)."""
        if (Path(run_dir) / LOCK_NAME).is_file():
            cls.acquire(run_dir).release()

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)   # closing drops the flock
        self._fd = None


def launched_by_launcher() -> bool:
    """True under torchrun (TORCHELASTIC_RUN_ID) or DeepSpeed's launcher (LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def exit_with_launcher(poll_s: float = 0.5) -> threading.Thread | None:
    """Under a launcher, end this worker when the launcher dies.

    torchrun starts its workers in process groups of their own, so killing the launcher's
    group (or the launcher with SIGKILL) leaves them training. A daemon thread watches the
    parent pid; when the worker is re-parented, it exits at once (a checkpoint being
    written is left in its `.tmp-*` directory, which resume ignores). A plain `dkd train`
    is not watched: its parent is a shell that may go away on purpose (nohup).
    """
    if not launched_by_launcher():
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        sys.stderr.write(f"dkd: the launcher (pid {parent}) is gone; rank "
                         f"{os.environ.get('RANK', '?')} exits\n")
        sys.stderr.flush()
        os._exit(1)

    t = threading.Thread(target=watch, name="dkd-launcher-watch", daemon=True)
    t.start()
    return t
