"""Per-iteration region timers: how many milliseconds each named region took this step.

A region is both a ``torch.profiler.record_function("dkd/<name>")`` range (so it shows up
by name in a Chrome/TensorBoard trace when the profiler is on) and a timed interval:

- on CPU: wall clock (``time.perf_counter``); CPU kernels run synchronously, so that is
  the region's cost;
- on CUDA: a pair of CUDA events recorded on the current stream. Nothing waits for them
  when the region closes: they are resolved in :meth:`RegionTimer.collect`, which waits on
  each recorded *event* (not the whole device), by which time the training step has
  usually synchronised anyway (``loss.item()``). ``sync=True`` instead synchronises the
  device around every region and uses the wall clock: the CPU-side view, including launch
  overhead, for when you want it and accept the stall.

Repeated regions of one name accumulate within a step: the softmax layer's forward,
backward and head update can all be ``region("softmax_layer")`` and add up to one value.
``collect()`` names it ``<metric name>_ms``, where the metric name is the region name
unless ``metric_names`` maps it: by default ``softmax_layer`` -> ``softmax_ms`` (the
metrics.jsonl key), while the trace label stays ``dkd/softmax_layer``.

A region nested inside a region *of the same name* is not counted twice (only the
outermost interval is timed). Regions of different names may nest; each is timed on its
own, so an inner ``comm`` region also counts toward an outer ``softmax_layer``. CUDA
events time the *current stream*: work a region launches on other streams is not seen.

Disabled timers hand out ``contextlib.nullcontext()``: no record_function, no events.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch

__all__ = ["RegionTimer", "measure_timer_overhead", "DEFAULT_METRIC_NAMES"]

DEFAULT_METRIC_NAMES = {"softmax_layer": "softmax", "softmax_layer/forward": "softmax_fwd",
                        "softmax_layer/backward": "softmax_bwd"}
"""Region name -> metric name, where the metrics contract names it differently."""


class RegionTimer:
    """Accumulates milliseconds per named region until :meth:`collect`.

    Args:
        device: where the timed work runs (``torch.device`` or string); CUDA devices are
            timed with events, everything else with the wall clock.
        enabled: when False, :meth:`region` is a null context and :meth:`collect` returns {}.
        sync: CUDA only: synchronise the device at region entry and exit and use the wall
            clock. Off by default: it stalls the pipeline every region.
        metric_names: region name -> metric name in :meth:`collect`'s keys
            (default :data:`DEFAULT_METRIC_NAMES`).
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True,
                 sync: bool = False, metric_names: dict[str, str] | None = None) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.sync = sync
        self.metric_names = DEFAULT_METRIC_NAMES if metric_names is None else metric_names
        self._cuda = self.device.type == "cuda"
        self._ms: dict[str, float] = defaultdict(float)        # resolved milliseconds
        self._pending: list[tuple[str, object, object]] = []  # (name, start, end) events
        self._depth: dict[str, int] = defaultdict(int)         # same-name nesting depth
        self._free_events: list[object] = []                   # reused after collect()

    def region(self, name: str) -> contextlib.AbstractContextManager:
        """Time the enclosed block as ``name`` (and label it ``dkd/<name>`` in traces)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return self._region(name)

    @contextlib.contextmanager
    def _region(self, name: str) -> Iterator[None]:
        outermost = self._depth[name] == 0
        self._depth[name] += 1
        try:
            with torch.profiler.record_function(f"dkd/{name}"):
                if not outermost:
                    yield
                elif self._cuda and not self.sync:
                    yield from self._time_with_events(name)
                else:
                    yield from self._time_with_clock(name)
        finally:
            self._depth[name] -= 1

    def _time_with_clock(self, name: str) -> Iterator[None]:
        if self.sync and self._cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync and self._cuda:
                torch.cuda.synchronize(self.device)
            self._ms[name] += (time.perf_counter() - t0) * 1e3

    def _time_with_events(self, name: str) -> Iterator[None]:
        stream = torch.cuda.current_stream(self.device)
        start, end = self._event(), self._event()
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._pending.append((name, start, end))

    def _event(self):
        if self._free_events:
            return self._free_events.pop()
        return torch.cuda.Event(enable_timing=True)

    def collect(self) -> dict[str, float]:
        """``{"<metric name>_ms": total ms}`` of every region since the last call; reset.

        On CUDA this waits for each pending end event (event-level, not device-wide).
        Call it once per step, after the step's last region, to get per-iteration times.
        """
        if not self.enabled:
            return {}
        for name, start, end in self._pending:
            end.synchronize()  # why: elapsed_time needs both events to have completed
            self._ms[name] += start.elapsed_time(end)
            self._free_events += [start, end]
        self._pending.clear()
        out = {f"{self.metric_names.get(name, name)}_ms": float(ms)
               for name, ms in self._ms.items()}
        self._ms.clear()
        return out

    def reset(self) -> None:
        """Drop everything measured since the last :meth:`collect`."""
        for _, start, end in self._pending:
            self._free_events += [start, end]
        self._pending.clear()
        self._ms.clear()


def measure_timer_overhead(device: torch.device | str = "cpu", steps: int = 200,
                           regions_per_step: int = 3, sync: bool = False) -> dict[str, float]:
    """Per-step cost of the timer itself, in ms: empty regions + ``collect()`` per step.

    For benchmarks and the README, not for tests (timings are noisy on shared CPUs).
    Returns ``{"enabled_ms", "disabled_ms", "overhead_ms"}``, each per step.
    """
    def per_step_ms(enabled: bool) -> float:
        timer = RegionTimer(device, enabled=enabled, sync=sync)
        for _ in range(3):  # warm-up: event pool, record_function op registration
            _one_step(timer, regions_per_step)
        t0 = time.perf_counter()
        for _ in range(steps):
            _one_step(timer, regions_per_step)
        return (time.perf_counter() - t0) * 1e3 / steps

    on, off = per_step_ms(True), per_step_ms(False)
    return {"enabled_ms": on, "disabled_ms": off, "overhead_ms": on - off}


def _one_step(timer: RegionTimer, regions: int) -> None:
    for i in range(regions):
        with timer.region("softmax_layer" if i % 2 == 0 else "sampling"):
            pass
    timer.collect()
