"""Training progress on rank 0: a rich bar on a terminal, a plain line every N steps otherwise.

``make_progress(total_steps, is_rank0)`` returns a :class:`RichProgress` (TTY), a
:class:`LineProgress` (not a TTY: CI logs, SLURM output files, where a redrawn bar
turns into megabytes of escape codes) or a :class:`NullProgress` (other ranks).
All three take ``update(step, loss=..., softmax_ms=...)`` and ``close()``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["NullProgress", "LineProgress", "RichProgress", "make_progress"]


def _fmt(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class NullProgress:
    """Shows nothing (ranks other than 0)."""

    def update(self, step: int, loss: float | None = None, softmax_ms: float | None = None,
               **extra: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(NullProgress):
    """One line every ``every`` steps (and at the last step) to ``stream``."""

    def __init__(self, total_steps: int, every: int = 50, stream: TextIO | None = None,
                 start_step: int = 0) -> None:
        if every < 1:
            raise ValueError(f"progress every: expected >= 1 step, got {every}")
        self.total, self.every, self.start = total_steps, every, start_step
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()

    def eta_s(self, step: int) -> float:
        done = step + 1 - self.start
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self._t0) / done * (self.total - step - 1)

    def update(self, step: int, loss: float | None = None, softmax_ms: float | None = None,
               **extra: Any) -> None:
        last = step + 1 >= self.total
        if (step + 1) % self.every and not last:
            return
        parts = [f"step {step + 1}/{self.total}", f"loss {_fmt(loss, '.4f')}",
                 f"softmax {_fmt(softmax_ms, '.2f')} ms"]
        parts += [f"{k} {_fmt(v, '.4g') if isinstance(v, (int, float)) else v}"
                  for k, v in extra.items()]
        parts.append(f"eta {_fmt_eta(self.eta_s(step))}")
        print(" | ".join(parts), file=self.stream, flush=True)


class RichProgress(NullProgress):
    """A rich bar: steps, loss, softmax-layer ms, elapsed and ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Any = None) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("softmax {task.fields[softmax_ms]} ms"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False)
        self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                        loss="-", softmax_ms="-")
        self._bar.start()

    def update(self, step: int, loss: float | None = None, softmax_ms: float | None = None,
               **extra: Any) -> None:
        fields = {}
        if loss is not None:
            fields["loss"] = _fmt(loss, ".4f")
        if softmax_ms is not None:
            fields["softmax_ms"] = _fmt(softmax_ms, ".2f")
        self._bar.update(self._task, completed=step + 1, **fields)

    def close(self) -> None:
        self._bar.stop()


def make_progress(total_steps: int, is_rank0: bool = True, every: int = 50,
                  start_step: int = 0, force_tty: bool | None = None) -> NullProgress:
    """Rank 0 on a terminal: a rich bar; rank 0 elsewhere: a line every ``every`` steps."""
    if not is_rank0:
        return NullProgress()
    tty = sys.stdout.isatty() if force_tty is None else force_tty
    if tty:
        return RichProgress(total_steps, start_step=start_step)
    return LineProgress(total_steps, every=every, start_step=start_step)
