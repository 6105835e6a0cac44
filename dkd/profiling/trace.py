"""``maybe_profile``: a scheduled ``torch.profiler`` window, or nothing.

Enabled, it profiles ``active`` steps after ``wait`` + ``warmup`` steps (``repeat``
times; 0 = until the loop ends) and, at the end of each window, writes

- a Chrome trace ``<out_dir>/traces/rank<r>_step<n>.json`` (open in chrome://tracing or
  https://ui.perfetto.dev), and
- a TensorBoard profiler trace under ``<out_dir>/tb/`` (``tensorboard --logdir <out_dir>/tb``).

The loop calls ``prof.step()`` once per iteration. The regions of
:class:`dkd.profiling.timers.RegionTimer` appear in both traces as ``dkd/<name>``.
Disabled, it yields a null object whose ``step()`` does nothing and writes no files.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

__all__ = ["maybe_profile", "NullProfiler", "TraceProfiler"]

log = logging.getLogger(__name__)


class NullProfiler:
    """What ``maybe_profile(False, ...)`` yields: every call is a no-op."""

    trace_paths: list[Path] = []

    def step(self) -> None:
        pass


class TraceProfiler:
    """Wraps ``torch.profiler.profile``; ``trace_paths`` lists the Chrome traces written."""

    def __init__(self, prof: profile) -> None:
        self._prof = prof
        self.trace_paths: list[Path] = []

    def step(self) -> None:
        self._prof.step()

    @property
    def profiler(self) -> profile:
        """The underlying ``torch.profiler.profile`` (e.g. for ``key_averages()``)."""
        return self._prof


def _check_schedule(wait: int, warmup: int, active: int, repeat: int) -> None:
    for field, value, low in (("wait", wait, 0), ("warmup", warmup, 0),
                              ("active", active, 1), ("repeat", repeat, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"maybe_profile: {field} must be an int >= {low} (got {value!r})")


def _activities(device: torch.device | str | None) -> list[ProfilerActivity]:
    acts = [ProfilerActivity.CPU]
    on_cuda = torch.device(device).type == "cuda" if device is not None \
        else torch.cuda.is_available()
    if on_cuda:
        acts.append(ProfilerActivity.CUDA)
    return acts


@contextlib.contextmanager
def maybe_profile(enabled: bool, out_dir: str | Path, wait: int = 1, warmup: int = 1,
                  active: int = 3, repeat: int = 1, *, rank: int = 0,
                  device: torch.device | str | None = None, record_shapes: bool = False,
                  profile_memory: bool = False, with_stack: bool = False
                  ) -> Iterator[TraceProfiler | NullProfiler]:
    """Profile a window of training steps when ``enabled``; otherwise a null object.

    Args:
        enabled: off -> no profiler, no files, ``step()`` is free.
        out_dir: run directory; traces go to ``out_dir/traces`` and ``out_dir/tb``.
        wait, warmup, active, repeat: ``torch.profiler.schedule`` arguments, in steps.
        rank: used in file names so ranks do not overwrite each other.
        device: selects CUDA activity tracing; default: CUDA when available.
    """
    if not enabled:
        yield NullProfiler()
        return
    _check_schedule(wait, warmup, active, repeat)
    out_dir = Path(out_dir)
    traces, tb = out_dir / "traces", out_dir / "tb"
    traces.mkdir(parents=True, exist_ok=True)
    tb.mkdir(parents=True, exist_ok=True)
    tb_handler = tensorboard_trace_handler(str(tb), worker_name=f"rank{rank}")
    holder: list[TraceProfiler] = []

    def on_trace_ready(prof: profile) -> None:
        # why copy: kineto can save a trace only once, and the TensorBoard handler
        # picks its own file name; we find that file and copy it to a stable name.
        before = set(tb.iterdir())
        tb_handler(prof)
        written = sorted(set(tb.iterdir()) - before)
        if not written:
            log.warning("profiler: the TensorBoard handler wrote no trace in %s", tb)
            return
        path = traces / f"rank{rank}_step{prof.step_num}.json"
        shutil.copyfile(written[0], path)
        holder[0].trace_paths.append(path)
        log.info("profiler trace written to %s", path)

    with profile(activities=_activities(device),
                 schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
                 on_trace_ready=on_trace_ready, record_shapes=record_shapes,
                 profile_memory=profile_memory, with_stack=with_stack) as prof:
        holder.append(TraceProfiler(prof))
        yield holder[0]
