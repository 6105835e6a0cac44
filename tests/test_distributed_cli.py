"""Real torchrun launches with gloo on CPU: multi-rank equals single rank, resharding
resume, the multi-node path, and failures that must not hang."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, cli_env, read_metrics, summary, train_run

LAYER = ["model.norm=layer"]  # batch-norm statistics depend on the local batch


def _model(run):
    return torch.load(run / "model.pt", weights_only=False)


# Sampled per-row modes draw one global sample set on every rank (seeded by the step), so
# 2 ranks must follow the 1-rank trajectory exactly; the head's lazy optimizer must not
# step rows a rank only saw through columns it does not own.
@pytest.mark.parametrize("method", [["method.name=kd"],
                                    ["method.name=dis", "method.k=3", "method.top_t=0",
                                     "method.mode=per_sample", "train.batch_size=8"],
                                    ["method.name=dis", "method.k=6", "method.mode=hybrid"],
                                    ["method.name=dis", "method.k=6", "method.mode=batch_shared",
                                     "method.stratified=false", "method.prior=student",
                                     "method.prior_weight=0.5"]],
                         ids=["kd", "dis-per_sample", "dis-hybrid", "dis-shared-student-prior"])
def test_two_ranks_match_one_rank_after_20_steps(tmp_path, teacher_dir, method):
    sets = [*method, f"teacher.checkpoint={teacher_dir}", *LAYER]
    train_run(tmp_path, "one", *sets)
    train_run(tmp_path, "two", *sets, nproc=2)
    a, b = _model(tmp_path / "one"), _model(tmp_path / "two")
    torch.testing.assert_close(b["head"], a["head"], atol=1e-4, rtol=1e-3)
    for k in a["backbone"]:
        torch.testing.assert_close(b["backbone"][k], a["backbone"][k], atol=1e-4, rtol=1e-3)
    la = [m["loss"] for m in read_metrics(tmp_path / "one") if m["kind"] == "train"]
    lb = [m["loss"] for m in read_metrics(tmp_path / "two") if m["kind"] == "train"]
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-5)


def _rollback(src, dst, step):
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").glob("step*"):
        if p.name != f"step{step:07d}":
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"step{step:07d}\n")


def test_resume_reshards_the_head_2_to_1_and_3(tmp_path, teacher_dir):
    sets = ["method.name=kd", f"teacher.checkpoint={teacher_dir}", *LAYER,
            "train.ckpt_every=10"]
    train_run(tmp_path, "base", *sets, nproc=2)
    want = [m["loss"] for m in read_metrics(tmp_path / "base") if m["step"] == 11][0]
    for world in (1, 3):
        _rollback(tmp_path / "base", tmp_path / f"w{world}", 10)
        train_run(tmp_path, f"w{world}", *sets, nproc=world, extra=["--resume"])
        got = [m["loss"] for m in read_metrics(tmp_path / f"w{world}") if m["step"] == 11][0]
        assert got == pytest.approx(want, rel=1e-4), world
        assert summary(tmp_path / f"w{world}")["world_size"] == world


@pytest.mark.parametrize("refit", [[], ["method.dis_refit_every=3", "dist.check_proposal_sync=true"],
                                   ["method.mode=hybrid", "method.prior=student"]],
                         ids=["schedule", "refit", "student-prior"])
def test_resume_reshards_the_head_1_to_2_with_the_proposal_state(tmp_path, teacher_dir, refit):
    sets = ["method.name=dis", "method.k=5", "method.mode=per_sample",
            f"teacher.checkpoint={teacher_dir}", *LAYER, "train.ckpt_every=10", *refit]
    train_run(tmp_path, "base", *sets)
    base = [m for m in read_metrics(tmp_path / "base") if m["kind"] == "train"]
    want = [m["loss"] for m in base if m["step"] > 10]
    _rollback(tmp_path / "base", tmp_path / "w2", 10)
    train_run(tmp_path, "w2", *sets, nproc=2, extra=["--resume"])
    w2 = [m for m in read_metrics(tmp_path / "w2") if m["kind"] == "train" and m["step"] > 10]
    assert [m["loss"] for m in w2] == pytest.approx(want, rel=1e-4)
    if "method.dis_refit_every=3" in refit:   # refits at steps 3, 6, ...: the fit (in the checkpoint) replaces the schedule
        fits = [(m["proposal/w"], m["proposal/b2"]) for m in base]
        assert fits[0][0] == 0.55 and fits[2] != fits[1]     # the first refit: step 3
        assert fits[3] == fits[2]           # b2 stays at the fit between refits
        assert [(m["proposal/w"], m["proposal/b2"]) for m in w2] == fits[10:]
    assert summary(tmp_path / "w2")["world_size"] == 2


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_with_c10d_rendezvous(tmp_path):
    port = _port()
    flags = [x for s in [*TINY, f"out_dir={tmp_path}", "name=mn", "method.name=hard"]
             for x in ("--set", s)]
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=dkdtest", "-m", "dkd", "train", *flags]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert summary(tmp_path / "mn")["world_size"] == 2


def test_a_dead_rank_fails_the_job_instead_of_hanging(tmp_path):
    env = dict(cli_env(), DKD_FAULT_INJECT="1:5")  # rank 1 exits abruptly at step 5
    flags = [x for s in [*TINY, f"out_dir={tmp_path}", "name=dead", "method.name=hard",
                         "dist.timeout_s=20"] for x in ("--set", s)]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "dkd", "train", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert time.time() - t0 < 240
    assert not (tmp_path / "dead" / "summary.json").exists()


def test_world_larger_than_class_count_is_refused(tmp_path):
    proc = train_run(tmp_path, "big", "method.name=hard", "data.num_classes=2",
                     "data.num_super_classes=2", nproc=3, check=False)
    assert proc.returncode != 0
    assert "world size 3 exceeds the 2 classes" in proc.stderr + proc.stdout


def test_deepspeed_launcher_runs_two_ranks(tmp_path):
    env = dict(cli_env(), NPROC="2", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    flags = [x for s in [*TINY, f"out_dir={tmp_path}", "name=ds", "method.name=hard"]
             for x in ("--set", s)]
    proc = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary(tmp_path / "ds")["world_size"] == 2


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_with_accumulation_and_clipping_match_stage_0(tmp_path, teacher_dir, stage):
    """ZeRO 1/2 partition the backbone's optimizer state; the trajectory must not change."""
    sets = ["method.name=dis", "method.k=5", f"teacher.checkpoint={teacher_dir}", *LAYER,
            "dist.grad_accum=2", "dist.grad_clip=0.5", "train.steps=6", "train.ckpt_every=3"]
    train_run(tmp_path, "z0", *sets, nproc=2)
    train_run(tmp_path, "zs", *sets, f"dist.zero_stage={stage}", nproc=2)
    ds = json.loads((tmp_path / "zs" / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    a, b = _model(tmp_path / "z0"), _model(tmp_path / "zs")
    torch.testing.assert_close(b["head"], a["head"], atol=1e-5, rtol=1e-4)
    for k in a["backbone"]:
        torch.testing.assert_close(b["backbone"][k], a["backbone"][k], atol=1e-5, rtol=1e-4)
    if stage == 2:  # resharding a ZeRO checkpoint is refused with the reason
        _rollback(tmp_path / "zs", tmp_path / "z1", 3)
        proc = train_run(tmp_path, "z1", *sets, "dist.zero_stage=2", extra=["--resume"],
                         check=False)
        assert proc.returncode != 0 and "needs dist.zero_stage = 0" in proc.stderr


def test_resume_with_a_different_class_count_is_refused(tmp_path):
    train_run(tmp_path, "c", "method.name=hard", "train.steps=4", "train.ckpt_every=2")
    proc = train_run(tmp_path, "c", "method.name=hard", "train.steps=4",
                     "data.num_classes=30", extra=["--resume"], check=False)
    assert proc.returncode == 2 and "data.num_classes: 20 -> 30" in proc.stderr
