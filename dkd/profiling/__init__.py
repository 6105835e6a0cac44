"""Runtime profiling: per-iteration region timers and a scheduled torch.profiler window."""
from dkd.profiling.timers import RegionTimer, measure_timer_overhead
from dkd.profiling.trace import NullProfiler, TraceProfiler, maybe_profile

__all__ = ["RegionTimer", "measure_timer_overhead", "maybe_profile", "NullProfiler",
           "TraceProfiler"]
