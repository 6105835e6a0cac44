"""Student search: the proximal math, measured FLOPs, exact export, and the search end to end
through the real CLI (DeepSpeed, torchrun), the exported student trained by `dkd train`."""
import json

import pytest
import torch
import torch.nn as nn
import yaml

from conftest import read_metrics, run_cli, summary, train_run
from dkd.config import ModelConfig
from dkd.models import build_backbone
from dkd.search.flops import count_flops, flops_saved_per_unit
from dkd.search.prox import ProxGates, soft_threshold
from dkd.search.space import copy_pruned, gated_blocks, keep_indices


def test_soft_threshold_is_its_closed_form():
    z = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.2, 0.5, 2.5])
    want = torch.tensor([-2.5, -0.5, 0.0, 0.0, 0.0, 0.0, 2.0])
    torch.testing.assert_close(soft_threshold(z, 0.5), want, rtol=0, atol=0)
    # it is the proximal operator: argmin_x 0.5 (x - z)^2 + t |x|, checked on a grid
    grid = torch.linspace(-4, 4, 80001)
    for zi in z:
        x = grid[torch.argmin(0.5 * (grid - zi) ** 2 + 0.5 * grid.abs())]
        assert abs(float(x) - float(soft_threshold(zi, 0.5))) < 1e-3


@pytest.mark.parametrize("kind", ["apg", "prox_sgd"])
def test_proximal_steps_solve_a_lasso(kind):
    """min_w 0.5 ||X w - y||^2 + lam ||w||_1 with orthonormal X: w* = S_lam(X^T y)."""
    torch.manual_seed(0)
    X, _ = torch.linalg.qr(torch.randn(40, 12, dtype=torch.float64))
    y = torch.randn(40, dtype=torch.float64) * 2
    lam = 0.7
    w = torch.zeros(12, dtype=torch.float64)
    opt = ProxGates([w], kind)
    for _ in range(300):
        grad = X.T @ (X @ w - y)
        opt.step([grad], 0.5, [lam * 0.5])
    want = soft_threshold(X.T @ y, lam)
    torch.testing.assert_close(opt.sparse[0], want, atol=1e-9, rtol=0)
    assert int((want == 0).sum()) > 0 and opt.open_counts() == [int((want != 0).sum())]


def test_flops_of_a_tiny_conv_net_match_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2),
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
    x = torch.zeros(1, 3, 8, 8)
    conv1 = 2 * (3 * 3 * 3) * 8 * 8 * 8          # 2 * (C_in k^2) * C_out * H_out * W_out
    conv2 = 2 * (8 * 3 * 3) * 4 * 3 * 3
    fc = 2 * 36 * 10
    assert count_flops(net, x) == conv1 + conv2 + fc


def test_flops_saved_per_unit_of_the_mlp_is_measured():
    cfg = ModelConfig(arch="mlp", hidden=16, depth=2, feature_dim=8)
    build = lambda w: build_backbone(cfg, 5, inner=w)
    total, saved = flops_saved_per_unit(build, [16, 10], torch.zeros(1, 5))
    assert total == 2 * (5 * 16 + 16 * 16 + 16 * 16 + 16 * 10 + 10 * 16 + 16 * 8)
    assert saved == [2 * 2 * 16, 2 * 2 * 16]     # one inner unit: a row in, a column out


@pytest.mark.parametrize("arch", ["mlp", "resnet32", "transformer"])
def test_exported_network_equals_the_gated_one(arch):
    """In eval mode under no_grad, as evaluation runs (torch's fused transformer path would
    skip a feed-forward gate: the gated layer must not take it)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, hidden=12, depth=3, feature_dim=8, embed_dim=16, layers=2,
                      heads=2)
    shape = (3, 8, 8) if arch == "resnet32" else None
    in_dim = 3 * 8 * 8 if arch == "resnet32" else 6
    kw = {"vocab_size": 30} if arch == "transformer" else {}
    gated = build_backbone(cfg, in_dim, shape, gated=True, **kw)
    build_plain = lambda widths=None: build_backbone(cfg, in_dim, shape, inner=widths, **kw)
    x = (torch.randint(0, 30, (16, in_dim)) if arch == "transformer"
         else torch.randn(16, *(shape or (in_dim,))))
    gated.train()
    for _ in range(3):                  # non-trivial batch-norm statistics
        gated(x)
    gated.eval()
    with torch.no_grad():
        for b in gated_blocks(gated):
            g = torch.randn_like(b.gate.g)
            g[torch.rand_like(g) < 0.5] = 0.0
            b.gate.g.copy_(g)
        gated_blocks(gated)[0].gate.g.zero_()      # a block with every gate closed
    keeps = keep_indices([b.gate.g for b in gated_blocks(gated)])
    plain = build_plain([len(k) for k in keeps]).eval()
    copy_pruned(gated, plain, keeps)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), gated(x), atol=1e-5, rtol=1e-5)
    assert count_flops(plain, x[:1]) < count_flops(build_plain(), x[:1])


SEARCH = ["model.hidden=32", "model.depth=2", "data.train_size=1024", "train.steps=200",
          "search.target_flops=0.5", "search.check_every=5", "search.gate_lr=0.1",
          "search.penalty=0.3"]


def test_search_reaches_the_target_exports_and_the_student_trains(tmp_path, teacher_dir):
    proc = run_cli(["search"], [*SEARCH_BASE(tmp_path), "name=s", "method.name=kd",
                                f"teacher.checkpoint={teacher_dir}", "train.ckpt_every=50"])
    s = summary(tmp_path / "s")
    info = s["search"]
    assert info["reached"] and info["flops"] <= info["target_flops"] < info["start_flops"]
    assert s["steps"] < 200 and s["backbone_flops"] == info["flops"]
    lines = [m for m in read_metrics(tmp_path / "s") if m["kind"] == "search"]
    assert lines and lines[-1]["search/flops"] == info["flops"]
    assert lines[0]["search/flops_frac"] >= lines[-1]["search/flops_frac"]
    spec = yaml.safe_load((tmp_path / "s" / "student.yaml").read_text())
    assert spec["inner"] == info["widths"] and spec["base"]["arch"] == "mlp"
    # the exported model.pt (the real smaller network) evaluates to the search's top-1
    out = run_cli(["eval", "--run", str(tmp_path / "s")])
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(s["top1"])
    # the searched student trains like any other, on 1 and on 2 ranks, from scratch or
    # from the searched weights
    student = ["model.arch=searched", f"model.spec={tmp_path / 's' / 'student.yaml'}",
               "model.hidden=32", "method.name=kd", f"teacher.checkpoint={teacher_dir}"]
    train_run(tmp_path, "st1", *student)
    train_run(tmp_path, "st2", *student, "model.spec_init=searched", nproc=2)
    assert summary(tmp_path / "st1")["backbone_flops"] == info["flops"]
    assert summary(tmp_path / "st2")["world_size"] == 2


def SEARCH_BASE(tmp_path):
    from conftest import TINY
    return [*TINY, f"out_dir={tmp_path}", *SEARCH]


def test_search_input_errors_are_clear(tmp_path, teacher_dir):
    base = [*SEARCH_BASE(tmp_path), "name=bad", "search.loss=ce"]
    proc = run_cli(["search"], [*base, "search.target_flops=5e9"], check=False)
    assert proc.returncode == 2 and "is not below the starting network's" in proc.stderr
    proc = run_cli(["search"], [*base, "search.target_flops=0"], check=False)
    assert proc.returncode == 2 and "search.target_flops" in proc.stderr
    proc = run_cli(["search"], [*base, "model.arch=lenet"], check=False)
    assert proc.returncode == 2 and "has no gateable layers" in proc.stderr
    # a spec whose weights do not match it
    run_cli(["search"], [*SEARCH_BASE(tmp_path), "name=ok", "search.loss=ce"])
    spec_path = tmp_path / "ok" / "student.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["inner"] = [w + 1 for w in spec["inner"]]
    spec_path.write_text(yaml.safe_dump(spec))
    proc = train_run(tmp_path, "st", "model.arch=searched", f"model.spec={spec_path}",
                     "model.spec_init=searched", "method.name=hard", check=False)
    assert proc.returncode == 2 and "does not match its weights" in proc.stderr


def test_a_two_rank_search_follows_the_one_rank_search(tmp_path):
    """Every rank takes the same gate step (the gate gradient averaged over ranks), so with
    per-sample norms (none) two ranks prune exactly what one process prunes."""
    sets = [*SEARCH_BASE(tmp_path), "search.loss=ce", "model.norm=none"]
    run_cli(["search"], [*sets, "name=one"])
    run_cli(["search"], [*sets, "name=two"], nproc=2)
    one, two = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert two["world_size"] == 2 and two["steps"] == one["steps"]
    assert two["search"]["widths"] == one["search"]["widths"]
    assert two["top1"] == pytest.approx(one["top1"], abs=0.5)


def test_a_search_resumes_with_its_gate_state_and_the_kl0_variant_runs(tmp_path):
    sets = [*SEARCH_BASE(tmp_path), "name=r", "search.loss=ce", "search.penalty=0.01",
            "train.steps=10", "train.ckpt_every=5"]
    run_cli(["search"], sets)
    state = torch.load(tmp_path / "r" / "checkpoints" / "step0000010" / "state.pt",
                       weights_only=False)["search"]
    assert state["opt"]["k"] == 10 and len(state["opt"]["sparse"]) == 2
    run_cli(["search", "--resume"], [f"out_dir={tmp_path}", "name=r", "train.steps=15"])
    lines = [m for m in read_metrics(tmp_path / "r") if m["kind"] == "search"]
    assert [m["step"] for m in lines] == [5, 10, 15]
    s = summary(tmp_path / "r")
    assert s["steps"] == 15 and (tmp_path / "r" / "student.yaml").is_file()
    run_cli(["search"], [*SEARCH_BASE(tmp_path), "name=kl0", "search.loss=ce",
                         "search.kl_target=0.5", "train.steps=10"])
    assert summary(tmp_path / "kl0")["search"]["widths"]
