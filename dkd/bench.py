"""`dkd bench softmax`: time the softmax head step of full KD and of each sampled method.

    records = run_softmax_bench(classes=[751, 10_000, 100_000], ks=[20, 120, 1000], ...)
    md_path = write_bench(records, "bench.json")          # bench.json + bench.md

The head step is everything the class count makes expensive (dkd/bench_cases.py):
sampling (draws, corrections, teacher look-ups; sampled methods only), the logits,
the loss, the backward, and the head's optimizer update. Every (class count, k, method,
mode, world size) is one record; the full-KD step of the same class count and world size
is its baseline, measured in the same run (two blocks of ``repeats`` steps, before and
after that class count's sampled cases; the median over both):
``speedup_vs_full = full_median_ms / median_ms``; ``bound = C / |S|`` with |S| the mean
number of logit columns per sample row (batch_shared: the shared set over all ranks;
per_sample: 1 + top_t + m); ``frac_of_bound = speedup_vs_full / bound``.

Head kernels (``kernels`` in the records): ``native`` when the head's C kernels
(dkd/head/native.py) are built, which full KD's dense Adam step uses as well as the
sampled paths; ``torch (<reason>)`` otherwise. ``DKD_NATIVE=0`` measures the torch paths.

Timing: ``warmup`` untimed steps, then ``repeats`` timed steps, each a wall-clock
interval (CPU ops are synchronous); median, p10 and p90. ``cpu_median_ms`` is the median
process CPU time of a step (all threads; less sensitive to other load on the machine,
but it also counts gloo's polling at P > 1). World size P > 1: P gloo processes on
localhost, each with its head shard and ``threads`` intra-op threads
(default cpu_count // P); a barrier before every step; rank 0's times are reported.
Every bench process first sets glibc's allocator to keep freed memory (:func:`tune_malloc`,
``malloc`` in the records): page faults on fresh memory would otherwise dominate the
full-KD step, so this makes the baseline faster and the speedups smaller.

Peak memory (``peak_mem_mb``): one extra step per case after the timed ones. The
process first returns freed heap memory to the OS (``malloc_trim``), then resets the
kernel's resident high-water mark (writing 5 to /proc/self/clear_refs), runs the step,
and reports VmHWM − VmRSS(before): the resident memory the step added at its peak, on
rank 0, beyond everything already resident (weights, moments, scratch kept across steps;
those are ``state_mb``). Where clear_refs cannot be written, the growth of
getrusage's max RSS is used instead (``peak_mem_method``), which reads 0 when the step
stays below an earlier peak.

Full KD is skipped for a class count when ``full_step_bytes(C, B, d)`` (weight, dense
gradient, two moments, Adam's buffer and ~8 B×C tensors, over all ranks) exceeds
``skip_full_above_bytes`` (None: half of MemAvailable); its sampled records then carry
``full_skipped`` (the reason) and null speedups.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from dkd.atomic import atomic_write_text
from dkd.bench_cases import HeadBench, bound_of, full_step_bytes
from dkd.profiling.ops import OpCounter
from dkd.head import native

DEFAULT_CLASSES = [751, 10_000, 100_000]
DEFAULT_KS = [20, 120, 1000]
SAMPLED = ("uniform", "ftis", "dis")
MODES = ("batch_shared", "per_sample", "hybrid")


# ---------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def peak_step_memory(step, device: str = "cpu") -> tuple[float, str]:
    """(MiB the step added to resident memory at its peak, method); see module doc."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - before, 0) / 2 ** 20, "cuda_peak"
    gc.collect()
    _malloc_trim()
    if _reset_hwm():
        before = _status_kb("VmRSS")
        step()
        return max(_status_kb("VmHWM") - before, 0) / 1024.0, "vmhwm"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(after - before, 0) / 1024.0, "ru_maxrss"


def tune_malloc() -> bool:
    """glibc: no mmap'd chunks (M_MMAP_MAX = 0) and no automatic heap trimming below
    2 GiB of free top (M_TRIM_THRESHOLD; mallopt takes a C int), so freed memory is
    reused instead of being returned to the OS and faulted in again on the next step.
    On this class of VM a fresh page costs ~2.4 µs (~0.6 ms per MiB): without this the
    full-KD step, which allocates ~1 GiB of fresh B×C and C×d tensors per step at
    C = 1e5, spends a large part of its time in page faults, so the tuning makes the
    baseline faster and the reported speedups smaller. False where mallopt is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def memory_budget() -> int:
    """Half of MemAvailable, bytes (8 GiB if /proc/meminfo is unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * 2 ** 30


# ---------------------------------------------------------------- timing
def _pct(xs: list[float], q: float) -> float:
    """q-quantile with linear interpolation (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _time(step, warmup: int, repeats: int, group, device: str = "cpu") -> dict:
    """Run warm-up, timed repeats and one memory step; returns raw per-step data. On CUDA
    each timed step ends with a device synchronisation (the step's own launches are
    asynchronous: its time is until the device has finished it)."""
    barrier = (lambda: dist.barrier(group)) if group is not None else (lambda: None)
    if device == "cuda":
        inner, barrier0 = step, barrier

        def step():
            info = inner()
            torch.cuda.synchronize()
            return info

        def barrier():
            torch.cuda.synchronize()
            barrier0()
    for _ in range(warmup):
        barrier()
        step()
    times, cpu, infos = [], [], []
    for _ in range(repeats):
        barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        info = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        infos.append(info)
    barrier()
    peak, how = peak_step_memory(step, device)
    return {"times": times, "cpu": cpu, "infos": infos, "peak_mb": peak, "peak_how": how}


def _summary(raw: dict) -> dict:
    ms = [t * 1e3 for t in raw["times"]]
    out = {"median_ms": _pct(ms, 0.5), "p10_ms": _pct(ms, 0.1), "p90_ms": _pct(ms, 0.9),
           "samples_ms": [round(x, 4) for x in ms],
           "cpu_median_ms": _pct([t * 1e3 for t in raw["cpu"]], 0.5),
           "peak_mem_mb": raw["peak_mb"],
           "peak_mem_method": raw["peak_how"],
           "rows_touched": sum(i["rows"] for i in raw["infos"]) / len(raw["infos"]),
           "kernel_path": raw["infos"][-1]["path"]}
    samp = [i.get("sampling_s", 0.0) * 1e3 for i in raw["infos"]]
    out.update(sampling_ms=_pct(samp, 0.5), sampling_p10_ms=_pct(samp, 0.1),
               sampling_p90_ms=_pct(samp, 0.9))
    out["sampling_frac"] = out["sampling_ms"] / out["median_ms"]
    return out


# ---------------------------------------------------------------- one world
def _cols_per_row(raw: dict, mode: str, world: int, group) -> float:
    # Columns every rank computes (fixed shapes: D and m draw slots on each rank, the
    # classes of other shards as masked placeholders; stratified draws are its own share).
    return sum(i["cols"] for i in raw["infos"]) / len(raw["infos"])


def _merge(a: dict, b: dict) -> dict:
    return {"times": a["times"] + b["times"], "cpu": a["cpu"] + b["cpu"],
            "infos": a["infos"] + b["infos"], "peak_mb": max(a["peak_mb"], b["peak_mb"]),
            "peak_how": a["peak_how"]}


def _full_cases(hb, C, cfg, group, base, before: dict | None) -> tuple[list[dict], dict]:
    """Full-KD records. Called twice per class count: before the sampled cases (returns
    the raw timings) and after them with ``before``: the baseline is the median over both
    blocks, so a slow drift of the machine's speed during the sampled cases biases no
    ratio. full_torch runs in the first block only."""
    raw = _time(hb.full_step, cfg["warmup"] if before is None else 1, cfg["repeats"], group,
                cfg["device"])
    if before is None:
        return [], raw
    raw = _merge(before, raw)
    s = _summary(raw)
    full_ms = s["median_ms"]
    recs = [dict(s, method="full")]
    if "full_torch" in cfg["methods"]:
        recs.append(dict(_summary(_time(hb.full_torch_step, cfg["warmup"], cfg["repeats"],
                                        group, cfg["device"])), method="full_torch"))
    return [{**base, "classes": C, "k": None, "mode": "dense", **r, "cols_per_row": float(C),
             "full_median_ms": full_ms, "speedup_vs_full": full_ms / r["median_ms"],
             "bound": 1.0, "frac_of_bound": full_ms / r["median_ms"],
             "state_mb": hb.state_bytes() / 2 ** 20, "full_skipped": None} for r in recs], raw


def _sampled_cases(hb, C, cfg, group, base, world, case0) -> list[dict]:
    """One record per (k, method, mode) of this class count, speedups not yet filled."""
    recs, case = [], case0
    for k in [k for k in cfg["ks"] if k < C]:
        for method in [m for m in cfg["methods"] if m in SAMPLED]:
            for mode in cfg["modes"]:
                case += 1
                layer = hb.layer(method, mode, k)
                steps = iter(range(case * 1_000_003, (case + 1) * 1_000_003))
                raw = _time(lambda: hb.sampled_step(layer, next(steps)), cfg["warmup"],
                            cfg["repeats"], group, cfg["device"])
                cols = _cols_per_row(raw, mode, world, group)
                rec = {**base, "classes": C, "k": k, "method": method, "mode": mode,
                       **_summary(raw), "cols_per_row": cols,
                       "bound": bound_of(C, cols), "state_mb": hb.state_bytes() / 2 ** 20}
                if cfg.get("trace_ops"):
                    rec.update(trace_ops(hb, layer, next(steps) + 1_000_000))
                recs.append(rec)
    return recs


def trace_ops(hb, layer, step: int) -> dict:
    """aten_ops / aten_views / host_syncs of one whole head step (sampling, logits, loss,
    backward, row update) on the torch path: the native host kernels are switched off,
    so what is counted is what a GPU would run (dkd/profiling/ops.py)."""
    counter = OpCounter()
    with native.disabled():
        hb.sampled_step(layer, step)      # warm: one-off tables (Adam's bias table) built
        with counter:
            hb.sampled_step(layer, step + 1)
    rec = counter.record()
    return {"aten_ops": rec["aten_ops"], "aten_views": rec["aten_views"],
            "host_syncs": rec["host_syncs"], "sync_ops": rec["sync_ops"]}


def _run_world(cfg: dict, group, world: int, rank: int) -> list[dict]:
    """All cases of one world size on this rank; records on rank 0 (others: [])."""
    records = []
    B, d = cfg["batch"], cfg["dim"]
    malloc = "no-trim" if tune_malloc() else "default"
    base = {"world_size": world, "batch": B, "dim": d, "teacher_topk": cfg["teacher_topk"],
            "malloc": malloc, "threads": torch.get_num_threads(), "warmup": cfg["warmup"],
            "repeats": cfg["repeats"], "torch": torch.__version__, "kernels": native.status()}
    for i, C in enumerate(cfg["classes"]):
        hb = HeadBench(C, B, d, cfg["teacher_topk"], cfg["seed"], group, world, rank,
                       device=cfg["device"])
        need = full_step_bytes(C, B, d)
        skipped, full_ms, first = None, None, None
        if need > cfg["budget"]:
            skipped = (f"full KD needs ~{need / 2 ** 30:.1f} GiB (C*d*4*5 + B*C*4*8) > "
                       f"budget {cfg['budget'] / 2 ** 30:.1f} GiB")
        else:
            first = _full_cases(hb, C, cfg, group, base, None)[1]
        sampled = _sampled_cases(hb, C, cfg, group, base, world, 1000 * i)
        if first is not None:
            fulls, _ = _full_cases(hb, C, cfg, group, base, first)
            full_ms = fulls[0]["median_ms"]
            records += fulls
            hb.release_full()
        for r in sampled:
            speed = None if full_ms is None else full_ms / r["median_ms"]
            r.update(full_median_ms=full_ms, speedup_vs_full=speed, full_skipped=skipped,
                     frac_of_bound=None if speed is None else speed / r["bound"])
        records += sampled
        del hb
        gc.collect()
        _malloc_trim()          # hand this class count's memory back before the next one
    return records if rank == 0 else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main() -> None:
    """Entry point of one spawned rank: argv = rank, world, config json, records json."""
    rank, world, cfg_path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with open(cfg_path) as f:
        cfg = json.load(f)
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        records = _run_world(cfg, dist.group.WORLD, world, rank)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(records, f)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cfg: dict) -> list[dict]:
    """Run the cases on ``world`` fresh gloo processes (plain subprocesses: nothing depends
    on the caller's __main__); a rank that fails takes the others down with it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS=str(cfg["threads"]),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "records.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        code = "from dkd.bench import _worker_main; _worker_main()"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), cfg_path, out],
                                  env=env) for r in range(world)]
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        if any(codes):
            raise RuntimeError(f"bench ranks of world size {world} exited with codes {codes}")
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------- reporting
def _find(records, C, k, method, mode, world=1):
    return next((r for r in records if (r["classes"], r["k"], r["method"], r["mode"],
                                        r["world_size"]) == (C, k, method, mode, world)), None)


def _cpu_ratio(records, r) -> str:
    full = _find(records, r["classes"], None, "full", "dense", r["world_size"])
    if full is None or not r.get("cpu_median_ms"):
        return ""
    return f" (CPU-time ratio {full['cpu_median_ms'] / r['cpu_median_ms']:.1f}x)"


def bench_targets(records: list[dict]) -> list[dict]:
    """Issue 5's targets (world size 1) from the records: {target, measured, met}; met is
    None when the run lacks the cases."""
    out = []

    def add(name, value, ok, text):
        out.append({"target": name, "measured": value, "met": ok, "detail": text})

    def detail(r):
        return (f"bound {r['bound']:.1f}x, {r['median_ms']:.2f} ms vs full "
                f"{r['full_median_ms']:.1f} ms{_cpu_ratio(records, r)}")

    for C, k, mode, need in ((100_000, 1000, "batch_shared", 50.0),
                             (100_000, 120, "per_sample", 10.0)):
        r = _find(records, C, k, "dis", mode)
        v = None if r is None else r["speedup_vs_full"]
        add(f"dis {mode} C={C} k={k}: speedup >= {need:g}x", v,
            None if v is None else v >= need, "" if r is None else detail(r))
    # The paper's Market-1501 setting names no mode: the fastest one counts, all are shown.
    got = [r for r in (_find(records, 751, 20, "dis", m) for m in MODES)
           if r is not None and r["speedup_vs_full"] is not None]
    best = max(got, key=lambda r: r["speedup_vs_full"], default=None)
    v = None if best is None else best["speedup_vs_full"]
    add("dis C=751 k=20 (fastest mode): speedup >= 4x", v, None if v is None else v >= 4.0,
        "" if best is None else f"{best['mode']}: {detail(best)}; " + ", ".join(
            f"{r['mode']} {r['speedup_vs_full']:.1f}x" for r in got if r is not best))
    big, ref = _find(records, 10 ** 6, 1000, "dis", "batch_shared"), \
        _find(records, 10_000, 1000, "dis", "batch_shared")
    v = None if big is None or ref is None else big["median_ms"] / ref["median_ms"]
    add("dis batch_shared k=1000: step(C=1e6) <= 2 x step(C=1e4)", v,
        None if v is None else v <= 2.0,
        "" if v is None else f"{big['median_ms']:.2f} ms vs {ref['median_ms']:.2f} ms")
    v = None if big is None else big["peak_mem_mb"]
    add("dis batch_shared C=1e6 k=1000: peak step memory < 1024 MiB", v,
        None if v is None else v < 1024.0, "" if big is None else
        f"beyond {big['state_mb']:.0f} MiB of weights, moments and scratch")
    for modes, name in ((("batch_shared", "per_sample"), "batch_shared/per_sample"),
                        (("hybrid",), "hybrid")):
        samp = [r for r in records if r["classes"] == 100_000 and r["k"] is not None
                and r["world_size"] == 1 and r["mode"] in modes]
        worst = max(samp, key=lambda r: r["sampling_frac"], default=None)
        v = None if worst is None else worst["sampling_frac"]
        add(f"C=1e5, {name}: sampling < 25% of the sampled step (worst case)", v,
            None if v is None else v < 0.25, "" if worst is None else
            f"worst: {worst['method']} {worst['mode']} k={worst['k']}, "
            f"{worst['sampling_ms']:.2f} of {worst['median_ms']:.2f} ms")
    return out


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def bench_markdown(records: list[dict]) -> str:
    """The records as a markdown table (sorted by P, C, k, method, mode) plus the targets."""
    head = ("| P | C | k | method | mode | cols/row | rows | path | median ms [p10, p90] | "
            "sampling ms (share) | full ms | speedup | bound | of bound | peak MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    key = lambda r: (r["world_size"], r["classes"], -1 if r["k"] is None else r["k"],
                     r["method"], r["mode"])
    rows = []
    for r in sorted(records, key=key):
        full = _f(r["full_median_ms"], ".1f") if not r.get("full_skipped") else "skipped"
        rows.append(
            f"| {r['world_size']} | {r['classes']} | {_f(r['k'], 'd')} | {r['method']} | "
            f"{r['mode']} | {r['cols_per_row']:.0f} | {r['rows_touched']:.0f} | "
            f"{r['kernel_path']} | {r['median_ms']:.2f} [{r['p10_ms']:.2f}, {r['p90_ms']:.2f}]"
            f" | {r['sampling_ms']:.2f} ({100 * r['sampling_frac']:.0f}%) | {full} | "
            f"{_f(r['speedup_vs_full'], '.1f')} | {r['bound']:.1f} | "
            f"{_f(r['frac_of_bound'], '.2f')} | {r['peak_mem_mb']:.1f} |")
    lines = [head + "\n".join(rows), "", "| target | measured | met | detail |",
             "|---|---|---|---|"]
    for t in bench_targets(records):
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['measured'], '.3g')} | {met} | {t['detail']} |")
    skipped = sorted({(r["classes"], r["full_skipped"]) for r in records if r.get("full_skipped")})
    lines += [f"\nC={c}: {why}" for c, why in skipped]
    kernels = sorted({r.get("kernels", "?") for r in records})
    lines.append(f"\nhead kernels: {', '.join(kernels)}")
    return "\n".join(lines) + "\n"


def write_bench(records: list[dict], out_json: str) -> str:
    """Write the records to out_json and the markdown next to it (.md), each atomically
    (temp file + rename). Returns the markdown path."""
    md_path = os.path.splitext(str(out_json))[0] + ".md"
    for path, text in ((str(out_json), json.dumps(records, indent=1)),
                       (md_path, bench_markdown(records))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, text)
    return md_path


# ---------------------------------------------------------------- entry point
def _check(classes, ks, batch, dim, world_sizes, methods, modes, warmup, repeats, teacher_topk):
    for name, xs, lo in (("classes", classes, 2), ("ks", ks, 1), ("world_sizes", world_sizes, 1)):
        if not xs or not all(isinstance(x, int) and x >= lo for x in xs):
            raise ValueError(f"{name} must be a non-empty list of ints >= {lo}, got {xs!r}")
    for name, v, lo in (("batch", batch, 1), ("dim", dim, 1), ("warmup", warmup, 0),
                        ("repeats", repeats, 1), ("teacher_topk", teacher_topk, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if max(world_sizes) > min(classes) or max(world_sizes) > batch:
        raise ValueError(f"world_sizes must be <= min(classes) and <= batch, got {world_sizes}")
    bad = [m for m in methods if m not in SAMPLED + ("full_torch",)]
    if bad or not methods:
        raise ValueError(f"methods must be among {SAMPLED + ('full_torch',)}, got {methods!r}")
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be among {MODES}, got {modes!r}")


def run_softmax_bench(classes: list[int] = DEFAULT_CLASSES, ks: list[int] = DEFAULT_KS,
                      batch: int = 256, dim: int = 512, world_sizes: list[int] = (1, 2),
                      methods: list[str] = SAMPLED, modes: list[str] = MODES,
                      warmup: int = 2, repeats: int = 7, teacher_topk: int = 100,
                      seed: int = 0, skip_full_above_bytes: int | None = None,
                      threads: int | None = None, trace_ops: bool = False,
                      device: str = "cpu") -> list[dict]:
    """Benchmark the head step; one record per case (see the module doc for the fields).

    classes: class counts C; ks: draws m (cases with k >= C are skipped); batch: global
    batch B; dim: feature size d; world_sizes: 1 runs in this process, P > 1 spawns P gloo
    processes; methods: sampled methods (uniform, ftis, dis) plus optionally "full_torch"
    (full KD with torch.optim.Adam; full KD with the project's head always runs); modes:
    batch_shared / per_sample; warmup / repeats: untimed / timed steps per case;
    teacher_topk: K of the synthetic top-K teacher (K = C when C <= K); seed: data,
    weights and sampling; skip_full_above_bytes: memory budget of full KD (None: half of
    MemAvailable); threads: intra-op threads per process (None: the current setting for
    P = 1, cpu_count // P for P > 1); trace_ops: add aten_ops / host_syncs of one step to
    every sampled record (:func:`trace_ops`); device: "cpu" or "cuda" (CUDA: one process).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and (not torch.cuda.is_available() or list(world_sizes) != [1]):
        raise ValueError("device cuda needs a CUDA device and world_sizes 1")
    classes, ks, world_sizes = list(classes), list(ks), list(world_sizes)
    methods, modes = list(methods), list(modes)
    _check(classes, ks, batch, dim, world_sizes, methods, modes, warmup, repeats, teacher_topk)
    cfg = {"classes": classes, "ks": ks, "batch": batch, "dim": dim, "methods": methods,
           "modes": modes, "warmup": warmup, "repeats": repeats, "teacher_topk": teacher_topk,
           "seed": seed, "trace_ops": trace_ops, "device": device, "budget": memory_budget() if skip_full_above_bytes is None
           else int(skip_full_above_bytes)}
    records = []
    for world in world_sizes:
        if world == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(threads or before)
            try:
                records += _run_world(cfg, None, 1, 0)
            finally:
                torch.set_num_threads(before)
        else:
            cfg["threads"] = threads or max(1, (os.cpu_count() or 1) // world)
            records += _spawn(world, cfg)
    return records


__all__ = ["run_softmax_bench", "bench_markdown", "bench_targets", "write_bench",
           "peak_step_memory", "memory_budget", "DEFAULT_CLASSES", "DEFAULT_KS"]
