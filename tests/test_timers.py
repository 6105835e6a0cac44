"""Region timers and the profiler window (CPU only: the CUDA-event path is checked on GPU)."""
import json

import pytest
import torch

from dkd.profiling import RegionTimer, maybe_profile


def _tiny_loop(timer, prof, steps=5):
    w = torch.randn(32, 64, requires_grad=True)
    per_step = []
    for _ in range(steps):
        x = torch.randn(16, 32)
        with timer.region("softmax_layer"):          # forward
            loss = torch.log_softmax(x @ w, dim=-1).mean()
        with timer.region("softmax_layer"):          # backward: accumulates
            loss.backward()
        with timer.region("sampling"):
            torch.multinomial(torch.ones(64), 8)
        per_step.append(timer.collect())
        prof.step()
    return per_step


def test_profiling_on_writes_chrome_trace_with_region(tmp_path):
    timer = RegionTimer("cpu")
    with maybe_profile(True, tmp_path, wait=1, warmup=1, active=2) as prof:
        per_step = _tiny_loop(timer, prof)
    traces = sorted((tmp_path / "traces").glob("*.json"))
    assert traces and prof.trace_paths == traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "dkd/softmax_layer" in names and "dkd/sampling" in names
    assert list((tmp_path / "tb").glob("*.pt.trace.json"))  # TensorBoard's copy
    # metric keys follow the metrics.jsonl contract: softmax_layer -> softmax_ms
    assert all(s.keys() == {"softmax_ms", "sampling_ms"} for s in per_step)
    assert all(s["softmax_ms"] > 0 for s in per_step)


def test_profiling_off_writes_nothing(tmp_path):
    with maybe_profile(False, tmp_path / "run", wait=0, warmup=0, active=1) as prof:
        _tiny_loop(RegionTimer("cpu"), prof, steps=3)
    assert prof.trace_paths == []
    assert not (tmp_path / "run").exists()


def test_bad_schedule_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="active"):
        with maybe_profile(True, tmp_path, active=0):
            pass


def test_regions_accumulate_and_reset():
    timer = RegionTimer("cpu")
    with timer.region("a"):
        with timer.region("a"):   # same name nested: counted once (outer interval)
            pass
    with timer.region("a"):
        pass
    first = timer.collect()
    assert set(first) == {"a_ms"} and first["a_ms"] >= 0
    assert timer.collect() == {}  # reset after collect


def test_disabled_timer_is_null():
    timer = RegionTimer("cpu", enabled=False)
    with timer.region("softmax_layer"):
        pass
    assert timer.collect() == {}


def test_region_propagates_exceptions_and_still_times():
    timer = RegionTimer("cpu")
    with pytest.raises(RuntimeError):
        with timer.region("x"):
            raise RuntimeError("boom")
    assert "x_ms" in timer.collect()
    with timer.region("x"):  # depth bookkeeping recovered
        pass
    assert "x_ms" in timer.collect()


class _FakeEvent:
    """Stands in for torch.cuda.Event on CPU: records a fake GPU clock."""
    clock = 0.0

    def __init__(self, enable_timing=False):
        self.t, self.synced = None, False

    def record(self, stream=None):
        _FakeEvent.clock += 1.5  # every record advances the fake GPU clock by 1.5 ms
        self.t = _FakeEvent.clock

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, end):
        return end.t - self.t


def test_cuda_path_defers_events_to_collect(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device sync"))
    timer = RegionTimer("cuda")
    for _ in range(2):  # forward + backward of one step: two intervals of 1.5 ms
        with timer.region("softmax_layer"):
            pass
    assert len(timer._pending) == 2 and not timer._ms  # nothing resolved yet
    assert timer.collect() == {"softmax_ms": 3.0}
    with timer.region("softmax_layer"):  # events are reused, not re-created
        pass
    assert len(timer._free_events) == 2
    assert timer.collect() == {"softmax_ms": 1.5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_time_a_region():
    timer = RegionTimer("cuda")
    a = torch.randn(1024, 1024, device="cuda")
    with timer.region("softmax_layer"):
        for _ in range(10):
            a = torch.softmax(a @ a, dim=-1)
    ms = timer.collect()["softmax_ms"]
    assert ms > 0
