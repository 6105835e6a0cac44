"""Nothing silently wrong: damaged checkpoints, divergence, resume guards, one job per run
directory, finished runs, W&B across resumes, YAML errors, batch-norm statistics, and the
small things (file modes, stray tmp files, failed fresh runs). Real CLI subprocesses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, cli_env, read_metrics, run_cli, summary, train_run

HARD = ["method.name=hard", "train.ckpt_every=10"]


def _flip_bytes(path: Path, at: float = 0.6, n: int = 8) -> None:
    """Flip n bytes inside the file (tensor data, not the zip directory at its end)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


def _train_lines(run):
    return [m for m in read_metrics(run) if m["kind"] == "train"]


@pytest.mark.parametrize("victim", ["head-0-20.pt", "backbone/ds/mp_rank_00_model_states.pt"],
                         ids=["head-shard", "deepspeed-model"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path, victim):
    train_run(tmp_path, "r", *HARD)
    want = [m["loss"] for m in _train_lines(tmp_path / "r")]
    _flip_bytes(tmp_path / "r" / "checkpoints" / "step0000020" / victim)
    # the newest checkpoint is step 20 = train.steps: without the check this would be a
    # finished run; damaged, it is skipped and steps 11..20 are redone from step 10
    proc = train_run(tmp_path, "r", *HARD, extra=["--resume"])
    assert f"skipped checkpoint step0000020: {victim} does not match its sha256" in proc.stderr
    assert "from step0000010 (step 10)" in proc.stderr
    got = _train_lines(tmp_path / "r")
    assert [m["step"] for m in got] == list(range(1, 21))
    assert [m["loss"] for m in got] == pytest.approx(want, rel=1e-5)   # redone alike


def test_divergence_stops_the_run_and_exports_nothing(tmp_path):
    proc = train_run(tmp_path, "d", "method.name=hard", "optim.name=sgd", "optim.lr=1e6",
                     "train.steps=30", "train.ckpt_every=1", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("dkd: stopped")]
    assert len(err) == 1 and "not finite" in err[0] and "exported nothing" in err[0], proc.stderr
    step = int(err[0].split("step ")[1].split(":")[0])
    run = tmp_path / "d"
    assert not (run / "model.pt").exists() and not (run / "summary.json").exists()
    assert read_metrics(run)[-1]["kind"] == "stopped"
    assert all(m["loss"] is not None for m in _train_lines(run))    # no NaN step was logged
    # every checkpoint that exists is of a finite model, and the last one is named
    ckpts = sorted((run / "checkpoints").glob("step*"))
    assert len(ckpts) == step - 1 and f"step{step - 1:07d}" in err[0]
    for c in ckpts:
        head = torch.load(c / "head-0-20.pt", weights_only=False)["weight"]
        assert head.isfinite().all()


def test_skip_step_drops_a_non_finite_step_and_goes_on(tmp_path):
    sets = ["method.name=hard", "train.steps=8"]
    train_run(tmp_path, "clean", *sets)
    env_run = subprocess.run(
        [sys.executable, "-m", "dkd", "train", *[x for s in [*TINY, f"out_dir={tmp_path}",
                                                          "name=skip", *sets,
                                                          "train.on_nonfinite=skip_step"]
                                                 for x in ("--set", s)]],
        cwd=ROOT, env={**cli_env(), "DKD_NAN_INJECT": "3"}, capture_output=True, text=True)
    assert env_run.returncode == 0, env_run.stderr[-2000:]
    lines = _train_lines(tmp_path / "skip")
    assert [m.get("skipped", 0) for m in lines] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert lines[3]["loss"] is None and "loss" in lines[3]["nonfinite"]
    clean = _train_lines(tmp_path / "clean")
    assert [m["loss"] for m in lines[:3]] == pytest.approx([m["loss"] for m in clean[:3]])
    model = torch.load(tmp_path / "skip" / "model.pt", weights_only=False)
    assert model["head"].isfinite().all()
    assert all(v.isfinite().all() for v in model["backbone"].values() if v.is_floating_point())


def test_resume_refuses_changes_of_meaning_and_records_safe_ones(tmp_path):
    train_run(tmp_path, "c", "method.name=hard", "train.steps=4", "train.ckpt_every=2")
    proc = train_run(tmp_path, "c", "method.name=kd", "train.steps=4", "data.seed=3",
                     "model.hidden=64", "optim.lr=0.5", extra=["--resume"], check=False)
    assert proc.returncode == 2
    for key in ("method.name: 'hard' -> 'kd'", "data.seed: 0 -> 3", "model.hidden: 32 -> 64",
                "optim.lr"):
        assert key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # without --config, --resume continues the run's own config.yaml; more steps are safe
    proc = run_cli(["train", "--resume"], [f"out_dir={tmp_path}", "name=c", "train.steps=6",
                                           "train.log_every=3"])
    assert "train.steps 4 -> 6" in proc.stderr
    resume_line = [m for m in read_metrics(tmp_path / "c") if m["kind"] == "resume"][0]
    assert resume_line["changed"]["train.steps"] == [4, 6]
    assert "steps: 6" in (tmp_path / "c" / "config.yaml").read_text()
    assert [m["step"] for m in _train_lines(tmp_path / "c")] == list(range(1, 7))


def _rollback(src: Path, dst: Path, step: int, keep_metrics_until: int | None = None) -> None:
    """A copy of run ``src`` as if it had been killed after checkpoint ``step``."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").glob("step*"):
        if p.name != f"step{step:07d}":
            shutil.rmtree(p)
    (dst / "summary.json").unlink()
    (dst / "model.pt").unlink()
    if keep_metrics_until is not None:
        m = dst / "metrics.jsonl"
        m.write_text("".join(ln + "\n" for ln in m.read_text().splitlines()
                             if json.loads(ln)["step"] <= keep_metrics_until))


def test_resume_after_a_torn_metrics_line_with_one_wandb_run(tmp_path):
    sets = [*HARD, "wandb.mode=offline"]
    train_run(tmp_path, "a", *sets)
    _rollback(tmp_path / "a", tmp_path / "b", 10, keep_metrics_until=15)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "kind": "train", "lo')         # the kill cut this line
    (tmp_path / "b" / "checkpoints" / ".latest.x1y2.tmp").write_text("step")  # a killed write
    (tmp_path / "b" / "checkpoints" / ".tmp-step0000015").mkdir()
    train_run(tmp_path, "b", *sets, extra=["--resume"])
    b = tmp_path / "b"
    assert [m["step"] for m in _train_lines(b)] == list(range(1, 21))
    assert not list((b / "checkpoints").glob(".*"))          # stray tmp files cleared
    # wall time accumulates: the checkpoint's share plus this segment
    state = torch.load(b / "checkpoints" / "step0000010" / "state.pt", weights_only=False)
    assert 0 < state["wall_s"] < summary(b)["wall_s"]
    # one W&B run id for both segments; the resumed one logs only the steps after 15
    runs = sorted((b / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    assert runs[0].name.rsplit("-", 1)[1] == (b / "wandb-run-id").read_text().strip()
    from dkd.logging.sinks import _parse_wandb_file
    _, history, _ = _parse_wandb_file(next(runs[1].glob("*.wandb")))
    assert sorted({h["step"] for h in history}) == list(range(16, 21))


def test_resume_of_a_finished_run_touches_nothing(tmp_path):
    # eval_every divides steps: still one final evaluation line
    train_run(tmp_path, "f", "method.name=hard", "train.steps=4", "wandb.mode=offline",
              "train.eval_every=2")
    run = tmp_path / "f"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = train_run(tmp_path, "f", "method.name=hard", "train.steps=4", "wandb.mode=offline",
                     "train.eval_every=2", extra=["--resume"])
    assert "is finished (step 4 of 4); nothing to do" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    evals = [m for m in read_metrics(run) if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_one_job_per_run_directory_and_none_outliving_its_launcher(tmp_path):
    run = tmp_path / "live"
    flags = [x for s in [*TINY, f"out_dir={tmp_path}", "name=live", "method.name=hard",
                         "train.steps=100000", "train.ckpt_every=5"] for x in ("--set", s)]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", "-m", "dkd", "train", *flags],
                                cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 240)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        proc = train_run(tmp_path, "live", "method.name=hard", "train.steps=100000",
                         "train.ckpt_every=5", extra=["--resume"], check=False)
        assert proc.returncode == 2 and "is in use by a live job (host" in proc.stderr
        os.killpg(launcher.pid, signal.SIGKILL)        # the launcher's group only
        t0 = time.monotonic()
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 10)
        assert time.monotonic() - t0 < 5
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    # the run finishes from its newest checkpoint; a lock the dead job left (rank 0 may
    # instead have released it on its way out, when rank 1 went first) is taken over
    stale = (run / ".lock").exists()
    step = int((run / "checkpoints" / "latest").read_text().strip()[4:])
    proc = train_run(tmp_path, "live", "method.name=hard", f"train.steps={step + 3}",
                     "train.ckpt_every=5", extra=["--resume"])
    assert ("took over the lock" in proc.stderr) == stale
    assert summary(run)["steps"] == step + 3 and not (run / ".lock").exists()


def test_a_dead_jobs_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    from dkd.config import ConfigError
    from dkd.engine.guard import RunLock
    (tmp_path / ".lock").write_text(json.dumps({"host": "h", "pid": 4242,
                                                "started": "2026-01-01T00:00:00"}))
    lock = RunLock.acquire(tmp_path)          # nobody holds the flock: the holder is gone
    assert lock.took_over == "host h, pid 4242, started 2026-01-01T00:00:00"
    with pytest.raises(ConfigError, match=f"in use by a live job \\(host .*, pid {os.getpid()}"):
        RunLock.acquire(tmp_path)             # flock is per open file: a second open conflicts
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_yaml_syntax_errors_exit_2_with_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   batch_size: 4\n")
    proc = run_cli(["train", "--config", str(bad)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"dkd: error: {bad}: invalid YAML: mapping values are not "
                                   "allowed here at line 3, column 14")
    proc = run_cli(["train"], ["train.steps=[3"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--set 'train.steps=[3': the value is not valid YAML" in proc.stderr


def test_two_rank_batch_norm_export_equals_dkd_eval(tmp_path):
    train_run(tmp_path, "bn", "method.name=hard", "model.norm=batch", nproc=2)
    out = run_cli(["eval", "--run", str(tmp_path / "bn")])
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == summary(tmp_path / "bn")["top1"]


def test_files_follow_the_umask_and_a_failed_fresh_run_leaves_no_directory(tmp_path):
    old = os.umask(0o022)
    try:
        train_run(tmp_path, "m", "method.name=hard", "train.steps=2")
    finally:
        os.umask(old)
    for name in ("config.yaml", "summary.json", "model.pt"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644, name
    # a store shard that fails its sha256 when first read, during a fresh run
    teacher = tmp_path / "m"
    run_cli(["relabel"], [*TINY, f"out_dir={tmp_path}", f"teacher.checkpoint={teacher}",
                          f"teacher.store={tmp_path / 'store'}"])
    shard = sorted((tmp_path / "store").glob("shard-*.logits.npy"))[0]
    _flip_bytes(shard, at=0.9, n=4)
    proc = train_run(tmp_path, "s", "method.name=kd", f"teacher.store={tmp_path / 'store'}",
                     check=False)
    assert proc.returncode == 2 and "sha256" in proc.stderr
    assert not (tmp_path / "s").exists()
