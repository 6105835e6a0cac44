"""End-to-end `dkd train` / `dkd eval` in real subprocesses (real DeepSpeed on CPU)."""
import json
import shutil

import pytest

from conftest import read_metrics, run_cli, summary, train_run


def test_run_directory_format(tmp_path):
    train_run(tmp_path, "r", "method.name=hard", "train.ckpt_every=10")
    run = tmp_path / "r"
    assert (run / "config.yaml").is_file() and (run / "model.pt").is_file()
    lines = read_metrics(run)
    train_lines = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(1, 21))
    for m in train_lines:
        assert {"step", "loss", "lr", "iter_ms", "softmax_ms"} <= m.keys()
        assert m["softmax_ms"] > 0 and m["iter_ms"] >= m["softmax_ms"]
    s = summary(run)
    assert s["method"] == "hard" and s["classes"] == 20 and s["steps"] == 20
    assert 0 <= s["top1"] <= 100 and s["wall_s"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["latest", "step0000010", "step0000020"]
    out = run_cli(["eval", "--run", str(run)])
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(s["top1"])


# dis: the proposal's schedule step is checkpointed (its right scale b2 sets the draws);
# rmsprop: the head's row-sparse RMSProp moments are checkpointed.
@pytest.mark.parametrize("method", [["method.name=kd"],
                                    ["method.name=dis", "method.k=5", "method.mode=per_sample",
                                     "optim.name=rmsprop", "optim.lr=0.001"]],
                         ids=["kd", "dis-rmsprop"])
def test_resume_continues_the_same_trajectory(tmp_path, teacher_dir, method):
    sets = [*method, f"teacher.checkpoint={teacher_dir}", "train.ckpt_every=10"]
    train_run(tmp_path, "a", *sets)
    full = [m["loss"] for m in read_metrics(tmp_path / "a") if m["kind"] == "train"]
    # Pretend the run died after step 10: roll it back to its step-10 checkpoint.
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step0000020")
    (b / "checkpoints" / "latest").write_text("step0000010\n")
    (b / "summary.json").unlink()
    train_run(tmp_path, "b", *sets, extra=["--resume"])
    resumed = [m["loss"] for m in read_metrics(b) if m["kind"] == "train"]
    assert len(resumed) == 20
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-6)


def _fails(proc, needle):
    assert proc.returncode != 0, proc.stdout
    assert needle in proc.stderr, proc.stderr[-2000:]


def test_bad_input_stops_before_training(tmp_path, teacher_dir):
    _fails(run_cli(["train", "--config", str(tmp_path / "none.yaml")], check=False),
           "config file not found")
    _fails(train_run(tmp_path, "x", "method.name=nope", check=False), "unknown method 'nope'")
    _fails(train_run(tmp_path, "x", "data.num_classes=1", check=False), "data.num_classes")
    _fails(train_run(tmp_path, "x", "method.name=kd", check=False), "needs a teacher")
    _fails(train_run(tmp_path, "x", "method.name=kd", f"teacher.checkpoint={teacher_dir}",
                     "data.num_classes=30", check=False), "teacher has 20 classes")
    _fails(train_run(tmp_path, "x", "method.name=kd", f"teacher.checkpoint={teacher_dir}",
                     "data.input_dim=8", check=False), "input size 16")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _fails(run_cli(["train"], ["out_dir=" + str(blocker), "name=x", "method.name=hard"],
                   check=False), "not writable")
    _fails(train_run(tmp_path, "fresh", "method.name=hard", extra=["--resume"], check=False),
           "does not exist")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("data")
    _fails(train_run(tmp_path, "keep", "method.name=hard", check=False), "--overwrite")
    assert (tmp_path / "keep" / "precious.txt").read_text() == "data"
    # --resume of a directory that holds no checkpoint: refused, and nothing is rewritten
    _fails(train_run(tmp_path, "keep", "method.name=hard", extra=["--resume"], check=False),
           "no checkpoint")
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["precious.txt"]
