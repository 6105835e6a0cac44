"""`dkd bench softmax` end to end on tiny sizes (numbers are not asserted, only sane)."""
import json
import math

import pytest

from dkd.bench import bench_markdown, bench_targets, run_softmax_bench, write_bench

REQUIRED = ("classes", "k", "method", "mode", "world_size", "batch", "dim", "median_ms",
            "full_median_ms", "speedup_vs_full", "bound", "frac_of_bound", "peak_mem_mb",
            "sampling_ms", "sampling_frac", "p10_ms", "p90_ms", "cols_per_row", "full_skipped")


@pytest.fixture(scope="module")
def records():
    return run_softmax_bench(classes=[50, 200], ks=[5], batch=8, dim=16, world_sizes=[1, 2],
                             methods=["uniform", "ftis", "dis"],
                             modes=["batch_shared", "per_sample", "hybrid"], warmup=1, repeats=2,
                             teacher_topk=20, seed=0, skip_full_above_bytes=None, threads=1)


def test_records_complete_and_sane(records):
    # per (world, C): 1 full + 3 methods x 3 modes
    assert len(records) == 2 * 2 * (1 + 9)
    for r in records:
        assert all(key in r for key in REQUIRED), sorted(set(REQUIRED) - set(r))
        for key in ("median_ms", "p10_ms", "p90_ms", "full_median_ms", "bound", "cols_per_row"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["peak_mem_mb"] >= 0 and math.isfinite(r["peak_mem_mb"])
        assert r["speedup_vs_full"] == pytest.approx(r["full_median_ms"] / r["median_ms"],
                                                     rel=1e-12)
        assert r["frac_of_bound"] == pytest.approx(r["speedup_vs_full"] / r["bound"], rel=1e-12)
        assert r["full_skipped"] is None
        if r["method"] == "full":
            assert r["k"] is None and r["full_median_ms"] == r["median_ms"]
        else:
            assert 0 < r["sampling_ms"] < r["median_ms"]
            assert r["sampling_frac"] == pytest.approx(r["sampling_ms"] / r["median_ms"])
            assert r["bound"] == pytest.approx(r["classes"] / r["cols_per_row"])
    assert {r["world_size"] for r in records} == {1, 2}
    assert {(r["method"], r["mode"]) for r in records if r["k"]} == {
        (m, d) for m in ("uniform", "ftis", "dis") for d in ("batch_shared", "per_sample", "hybrid")}


def test_records_name_the_head_kernels(records):
    from dkd.head import native
    assert {r["kernels"] for r in records} == {native.status()}
    assert f"head kernels: {native.status()}" in bench_markdown(records)


def test_c751_target_takes_the_fastest_mode():
    """The C = 751 target names no mode: it is met by the fastest, and the detail lists
    the others (records shaped like the bench's, speedups given)."""
    def rec(mode, speedup):
        return {"classes": 751, "k": 20, "method": "dis", "mode": mode, "world_size": 1,
                "speedup_vs_full": speedup, "bound": 30.0, "median_ms": 8.0 / speedup,
                "full_median_ms": 8.0}
    recs = [rec("batch_shared", 1.7), rec("per_sample", 1.2), rec("hybrid", 4.5)]
    (t,) = [t for t in bench_targets(recs) if "C=751" in t["target"]]
    assert t["measured"] == 4.5 and t["met"] is True
    assert t["detail"].startswith("hybrid:") and "batch_shared 1.7x, per_sample 1.2x" in t["detail"]
    recs[2]["speedup_vs_full"] = 3.0
    (t,) = [t for t in bench_targets(recs) if "C=751" in t["target"]]
    assert t["met"] is False and t["measured"] == 3.0


def test_write_bench(records, tmp_path):
    md = write_bench(records, str(tmp_path / "bench.json"))
    assert md == str(tmp_path / "bench.md")
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(records))
    text = (tmp_path / "bench.md").read_text()
    assert text == bench_markdown(records) and text.count("\n| 2 | 200 |") == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]


def test_full_kd_skipped_over_budget():
    recs = run_softmax_bench(classes=[300], ks=[5, 400], batch=4, dim=8, world_sizes=[1],
                             methods=["dis"], modes=["batch_shared"], warmup=0, repeats=1,
                             teacher_topk=16, seed=1, skip_full_above_bytes=1, threads=1)
    assert [r["k"] for r in recs] == [5]                 # k >= C skipped, no full record
    r = recs[0]
    assert r["full_skipped"] and r["speedup_vs_full"] is None and r["frac_of_bound"] is None
    assert r["full_median_ms"] is None and r["median_ms"] > 0
    assert "skipped" in bench_markdown(recs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="methods"):
        run_softmax_bench(classes=[50], ks=[5], methods=["pdbs"], world_sizes=[1])
    with pytest.raises(ValueError, match="world_sizes"):
        run_softmax_bench(classes=[50], ks=[5], batch=4, world_sizes=[8])


def test_bench_softmax_command_over_batch_and_dim_lists(tmp_path):
    """The `dkd bench softmax` command itself, with lists of batch and feature sizes."""
    from conftest import run_cli
    out = tmp_path / "bench.json"
    run_cli(["bench", "softmax", "--classes", "60", "--k", "5", "--batch", "8,16", "--dim",
             "8,12", "--world-sizes", "1", "--methods", "dis", "--modes", "batch_shared",
             "--warmup", "1", "--repeats", "2", "--teacher-topk", "10", "--threads", "1",
             "--out", str(out)])
    recs = json.loads(out.read_text())
    assert {(r["batch"], r["dim"]) for r in recs} == {(8, 8), (8, 12), (16, 8), (16, 12)}
    assert sorted(r["method"] for r in recs) == ["dis"] * 4 + ["full"] * 4
    assert out.with_suffix(".md").is_file()
