"""JSONL and W&B (offline) sinks, reading W&B back, progress output."""
import io
import math

import pytest

from dkd.logging import (JsonlSink, LineProgress, NullSink, WandbSink, make_sinks,
                         make_progress, read_jsonl, read_wandb_offline)
from dkd.logging.sinks import resolve_wandb_mode


def test_jsonl_round_trip(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"kind": "train", "loss": 0.5, "lr": 1e-3, "softmax_ms": 1.25, "n_sampled": 7,
              "loss/kd": float("nan")}, step=3)
    sink.log({"kind": "eval", "eval/top1": 0.75}, step=3)
    sink.finish()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 3 and rows[0]["kind"] == "train"
    assert rows[0]["softmax_ms"] == 1.25 and rows[0]["n_sampled"] == 7
    assert math.isnan(rows[0]["loss/kd"])                # written as null, read as NaN
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()  # strict JSON
    assert rows[1] == {"step": 3, "kind": "eval", "eval/top1": 0.75}


def test_jsonl_rejects_non_numbers_naming_the_key(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    with pytest.raises(TypeError, match="'bad'"):
        sink.log({"bad": object()}, step=0)


def test_read_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_jsonl(tmp_path / "m.jsonl")


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 0}\n{"step": 1, "loss": nu')  # killed mid-write
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 0}]


def test_wandb_offline_round_trip(tmp_path):
    config = {"method": {"name": "dis", "k": 5}, "data": {"num_classes": 100}}
    sink = make_sinks(tmp_path, config, {"mode": "offline"}, is_rank0=True)
    for step in range(6):
        sink.log({"kind": "train", "loss": 1.0 / (step + 1), "softmax_ms": 0.5 + step},
                 step=step)
    sink.log({"kind": "eval", "eval/top1": 0.4}, step=5)
    sink.finish()
    got_config, history = read_wandb_offline(tmp_path)
    assert got_config == config
    assert [h["step"] for h in history] == list(range(6))
    assert [h["softmax_ms"] for h in history] == [0.5 + s for s in range(6)]
    assert history[-1]["eval/top1"] == 0.4
    assert (tmp_path / "metrics.jsonl").is_file()


def test_online_without_login_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="offline"):
        assert resolve_wandb_mode("online", "proj") == "offline"
    with pytest.warns(UserWarning, match="project"):
        assert resolve_wandb_mode("online", None) == "offline"
    with pytest.raises(ValueError, match="wandb.mode"):
        resolve_wandb_mode("sometimes", None)


def test_disabled_and_non_rank0(tmp_path):
    assert isinstance(make_sinks(tmp_path / "r1", {}, None, is_rank0=False), NullSink)
    assert not (tmp_path / "r1").exists()
    sink = make_sinks(tmp_path / "r2", {}, {"mode": "disabled"})
    sink.log({"loss": 1.0}, step=0)
    sink.finish()
    assert not (tmp_path / "r2" / "wandb").exists()
    assert WandbSink(tmp_path / "r3", {}, mode="disabled").run is None


def test_read_wandb_offline_missing_names_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_wandb_offline(tmp_path)


def test_line_progress_prints_every_n_steps():
    out = io.StringIO()
    p = LineProgress(total_steps=7, every=3, stream=out)
    for step in range(7):
        p.update(step, loss=0.25, softmax_ms=1.5)
    p.close()
    lines = out.getvalue().splitlines()
    assert [l.split(" | ")[0] for l in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    assert "softmax 1.50 ms" in lines[0] and "eta" in lines[0]
    make_progress(5, is_rank0=False).update(0, loss=1.0)  # null on other ranks


def test_online_init_failure_falls_back_to_offline(monkeypatch, tmp_path):
    import dkd.logging.sinks as sinks

    real_init, tried = WandbSink._init, []

    def flaky_init(self, *args):  # the network is down: online init fails
        tried.append(self.mode)
        if self.mode == "online":
            raise RuntimeError("no network")
        return real_init(self, *args)

    monkeypatch.setattr(WandbSink, "_init", flaky_init)
    monkeypatch.setattr(sinks, "wandb_logged_in", lambda base_url=None: True)
    with pytest.warns(UserWarning, match="trying offline"):
        sink = WandbSink(tmp_path, {"a": 1}, project="p", mode="online")
    assert tried == ["online", "offline"] and sink.mode == "offline"
    assert sink.offline_dir is not None and sink.offline_dir.parent == tmp_path / "wandb"
    with pytest.warns(UserWarning, match="not logged"):
        sink.log_artifact(tmp_path / "missing.json", "trace", "trace")
    sink.finish()
