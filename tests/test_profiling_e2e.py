"""Profiling, W&B offline logging and the report, on real training runs."""
import json
import re
import statistics

from conftest import read_metrics, run_cli, train_run
from dkd.logging.sinks import read_wandb_artifacts, read_wandb_offline


def test_profiled_runs_wandb_readback_and_report(tmp_path, teacher_dir):
    # log_every only paces the progress bar: every step is still logged.
    common = [f"teacher.checkpoint={teacher_dir}", "train.steps=12", "wandb.mode=offline",
              "train.log_every=5"]
    train_run(tmp_path, "full", "method.name=kd", "profiling.enabled=true",
              "profiling.wait=1", "profiling.warmup=1", "profiling.active=2", *common)
    train_run(tmp_path, "dis", "method.name=dis", "method.k=5", *common)

    run = tmp_path / "full"
    traces = list((run / "traces").glob("*.json"))
    trace = traces[0].read_text() if traces else ""
    for region in ("dkd/softmax_layer", "dkd/softmax_layer/forward", "dkd/softmax_layer/backward",
                   "dkd/backbone_fwd", "dkd/comm", "dkd/optimizer", "dkd/teacher"):
        assert region in trace, region
    assert list((run / "tb").iterdir())
    assert not (tmp_path / "dis" / "traces").exists()  # profiling off: no trace files

    steps = [m for m in read_metrics(run) if m["kind"] == "train"]
    assert [m["step"] for m in steps] == list(range(1, 13))
    assert all(m["softmax_ms"] > 0 for m in steps)
    assert all(m["softmax_fwd_ms"] + m["softmax_bwd_ms"] <= m["softmax_ms"] for m in steps)

    config, history = read_wandb_offline(run)
    assert config["method"]["name"] == "kd" and config["train"]["steps"] == 12
    logged = {int(h["step"]) for h in history if "softmax_ms" in h}
    assert logged == set(range(1, 13))
    # The Chrome traces are attached to the W&B run as artifacts.
    arts = read_wandb_artifacts(run)
    assert {a["type"] for a in arts} == {"trace"}
    assert {f for a in arts for f in a["files"]} == {t.name for t in traces}

    out = tmp_path / "report"
    run_cli(["report", str(run), str(tmp_path / "dis"), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert (out / "report.html").is_file() and list(out.glob("*.png"))
    med = {n: statistics.median(m["softmax_ms"] for m in read_metrics(tmp_path / n)
                                if m["kind"] == "train") for n in ("full", "dis")}
    row = next(line for line in md.splitlines() if line.startswith("| dis | dis |"))
    speedup = float(re.search(r"\| ([0-9.]+)x \|", row).group(1))
    assert abs(speedup - med["full"] / med["dis"]) <= 0.006
