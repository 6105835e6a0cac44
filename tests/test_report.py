"""The speedup report on small fake run directories."""
import json
import statistics

import pytest

from dkd.logging import JsonlSink, make_sinks
from dkd.report import load_run, write_report


def _fake_run(root, name, method, k, softmax_ms, classes=100, top1=0.5, proposal=False,
              mode="batch_shared"):
    run = root / name
    run.mkdir(parents=True)
    with JsonlSink(run / "metrics.jsonl") as sink:
        for step, ms in enumerate(softmax_ms):
            sink.log({"kind": "train", "loss": 1.0, "lr": 1e-3, "iter_ms": 10.0,
                      "softmax_ms": ms, "sampling_ms": 0.1, "comm_ms": 0.0}, step=step)
        sink.log({"kind": "eval", "eval/top1": top1}, step=len(softmax_ms))
    summary = {"method": method, "classes": classes, "k": k, "steps": len(softmax_ms),
               "top1": top1, "wall_s": 1.0, "name": name, "mode": mode}
    (run / "summary.json").write_text(json.dumps(summary))
    if proposal:
        with JsonlSink(run / "proposal.jsonl") as sink:
            for step in (0, 5):
                sink.log({"rank_probs": [0.5, 0.3, 0.2], "x": [0.0, 0.5, 1.0]}, step=step)
    return run


def test_report_table_speedup_and_plots(tmp_path):
    kd_ms = [9.0, 10.0, 11.0, 12.0, 100.0]
    dis_ms = [1.0, 2.0, 2.5, 3.0, 40.0]
    kd = _fake_run(tmp_path, "kd_run", "kd", None, kd_ms, top1=0.61)
    dis = _fake_run(tmp_path, "dis_run", "dis", 5, dis_ms, top1=0.6, proposal=True,
                    mode="hybrid")
    md = write_report([kd, dis], tmp_path / "out")
    text = md.read_text()
    assert md == tmp_path / "out" / "report.md"
    assert (tmp_path / "out" / "report.html").is_file()
    pngs = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {"softmax_ms_C100.png", "top1_vs_ms_C100.png", "proposal_dis_run.png"} <= pngs
    header = next(l for l in text.splitlines() if l.startswith("| run"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(l for l in text.splitlines() if l.startswith("| dis_run"))
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    expected = statistics.median(kd_ms) / statistics.median(dis_ms)
    assert cells["speedup vs KD"] == f"{expected:.2f}x"
    assert cells["softmax ms (median)"] == f"{statistics.median(dis_ms):.3f}"
    assert cells["method"] == "dis" and cells["k"] == "5" and cells["top-1"] == "0.6000"
    assert cells["mode"] == "hybrid"                      # the sampled method's mode
    kd_row = next(l for l in text.splitlines() if l.startswith("| kd_run"))
    assert dict(zip(cols, (c.strip() for c in kd_row.strip("|").split("|"))))["mode"] == "-"
    assert "softmax_ms_C100.png" in (tmp_path / "out" / "report.html").read_text()


def test_report_groups_by_class_count_and_no_kd_is_na(tmp_path):
    a = _fake_run(tmp_path, "kd100", "kd", None, [4.0, 4.0], classes=100)
    b = _fake_run(tmp_path, "dis1000", "dis", 8, [2.0, 2.0], classes=1000)
    text = write_report([a, b], tmp_path / "out").read_text()
    assert "## 100 classes" in text and "## 1000 classes" in text
    row = next(l for l in text.splitlines() if l.startswith("| dis1000"))
    assert "n/a" in row  # no full-KD run with 1000 classes


def test_run_without_metrics_raises_naming_dir(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="empty_run.*no metrics"):
        write_report([empty], tmp_path / "out")


def test_report_falls_back_to_wandb_offline_and_config(tmp_path):
    run = tmp_path / "wb_only"
    config = {"method": {"name": "kd", "k": None}, "data": {"num_classes": 50}}
    sink = make_sinks(run, config, {"mode": "offline"})
    for step in range(3):
        sink.log({"kind": "train", "softmax_ms": 2.0 + step}, step=step)
    sink.finish()
    (run / "metrics.jsonl").unlink()  # only the W&B copy is left
    data = load_run(run)
    assert (data.method, data.classes, data.source) == ("kd", 50, "W&B offline")
    assert data.softmax_ms() == [2.0, 3.0, 4.0]


def test_report_draws_top1_against_k_and_shows_perplexity_and_ece(tmp_path):
    """The paper's Figure 6: top-1 against k per sampled method, hard and KD as lines;
    perplexity and ECE columns appear when the runs have them."""
    runs = [_fake_run(tmp_path, "hard", "hard", None, [5.0], top1=0.40),
            _fake_run(tmp_path, "kd", "kd", None, [9.0], top1=0.61)]
    for k, top in ((5, 0.50), (20, 0.58)):
        runs.append(_fake_run(tmp_path, f"dis{k}", "dis", k, [1.0], top1=top))
    summary = json.loads((runs[1] / "summary.json").read_text())
    (runs[1] / "summary.json").write_text(json.dumps({**summary, "perplexity": 12.5,
                                                      "ece": 3.25}))
    text = write_report(runs, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "top1_vs_k_C100.png").stat().st_size > 1000
    header = next(l for l in text.splitlines() if l.startswith("| run"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert "perplexity" in cols and "ECE %" in cols
    row = next(l for l in text.splitlines() if l.startswith("| kd "))
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["perplexity"] == "12.5" and cells["ECE %"] == "3.25"
    # One k per method: no curve to draw.
    only = write_report(runs[:3], tmp_path / "out1").read_text()
    assert not (tmp_path / "out1" / "top1_vs_k_C100.png").exists() and "top1_vs_k" not in only


def test_step_split_counts_the_head_update_once():
    from dkd.report import step_split
    row = {"kind": "train", "iter_ms": 10.0, "teacher_ms": 1.0, "backbone_fwd_ms": 2.0,
           "comm_ms": 0.5, "softmax_ms": 3.0, "softmax_fwd_ms": 1.0, "softmax_bwd_ms": 1.5,
           "backbone_bwd_ms": 1.5, "optimizer_ms": 1.25}   # head update 0.5 inside both
    split = step_split([row, {**row, "iter_ms": 12.0}, {**row, "iter_ms": 11.0}])
    assert split["softmax layer"] == 3.0 and split["backbone optimizer"] == 0.75
    assert split["other"] == pytest.approx(11.0 - (1 + 2 + 0.5 + 3 + 1.5 + 0.75))
