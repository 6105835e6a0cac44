"""Atomic file writes: a temporary file in the target's directory, fsync, then rename.

A reader (or a resume after a kill) sees either the old file or the complete new one,
never a torn one. Temporary names are `.<name>.<random>.tmp`, so :func:`remove_stale_tmp`
can clear what a killed write left behind. Files get the mode a plain ``open`` would give
(0666 minus the umask), not ``mkstemp``'s 0600.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)  # why: the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_with(path: str | Path, write: Callable[[object], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    atomic_write_with(path, lambda f: torch.save(obj, f))


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Delete the temporary files of writes that were killed (`.<name>.*.tmp`) directly in
    ``directory``; call it only while no other process writes there (the run lock).
    Returns what was removed."""
    directory = Path(directory)
    gone = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
