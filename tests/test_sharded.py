"""Class-sharded softmax layer on 2 and 3 gloo processes against one process.

Each rank holds the rows of its classes; features are all-gathered with autograd. The
loss must equal the single-process loss, the gathered head gradient the full head
gradient, and the backbone gradient (after the data-parallel average that DeepSpeed
does) the single-process backbone gradient.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkd.config import MethodConfig
from dkd.dist.functional import gather_rows, gather_rows_nograd
from dkd.engine.softmax_layer import SoftmaxLayer
from dkd.head.head import ShardedHead
from dkd.sampling.teacher_batch import TopKTeacher

C, D, B, IN = 11, 6, 12, 5   # 11 classes: uneven shards on 2 and 3 ranks


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, IN, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    teacher = torch.randn(B, C, generator=g) * 3
    backbone = torch.randn(D, IN, generator=g) * 0.5
    teacher_head = torch.randn(C, 4, generator=g)              # KD-sim's teacher rows
    return x, y, teacher, backbone, teacher_head


def _step(method: dict, group, rank: int, world: int):
    """One forward/backward; returns loss, gathered head grad (C, D), backbone grad."""
    x, y, teacher, w_bb, t_head = _problem()
    rows = torch.arange(B).tensor_split(world)[rank]
    w_bb = w_bb.clone().requires_grad_(True)
    f_local = x[rows] @ w_bb.T                                # (B_local, D) "backbone"
    feats = gather_rows(f_local, group, scale=float(world))
    y_g = gather_rows_nograd(y[rows], group)
    t_g = gather_rows_nograd(teacher[rows], group)
    head = ShardedHead(C, D, group, init_std=0.5, seed=3)
    cfg = MethodConfig(**method)
    layer = SoftmaxLayer(cfg, C, head.start, head.end, group, total_steps=10)
    out = layer(feats, head, y_g, TopKTeacher.from_dense(t_g, rank=False), t_head, 42)
    out["loss"].backward()
    grad_head = torch.zeros(head.num_local, D)
    for h in head._pending:
        r, g = h.collect()
        if r is None:
            grad_head += g
        else:
            grad_head.index_add_(0, r, g)
    grad_head = gather_rows_nograd(grad_head, group)          # (C, D) in class order
    g_bb = w_bb.grad.clone()
    if group is not None:                                     # DeepSpeed's DP average
        dist.all_reduce(g_bb, group=group)
        g_bb /= world
    return out["loss"].detach(), grad_head, g_bb


def _worker(rank, world, port, method, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _step(method, dist.group.WORLD, rank, world)
        if rank == 0:
            queue.put(tuple(t.numpy() for t in res))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(method, world):
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, method, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    res = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [torch.from_numpy(r) for r in res]


METHODS = [
    {"name": "kd", "temperature": 2.0, "lam": 0.7},
    {"name": "hard"},
    {"name": "ls", "smoothing": 0.2},
    {"name": "kd_topk", "k": 3},
    {"name": "kd_pt", "temperature": 2.0},
    {"name": "kd_sim", "sim_temperature": 0.5, "sim_power": 2.0},
    {"name": "kd_pt_sim", "pt_sim_alpha": 0.3},
    {"name": "uniform", "k": 4, "mode": "batch_shared", "lam": 0.5, "stratified": False},
    {"name": "dis", "k": 4, "mode": "per_sample", "lam": 0.5},
    # adaptive DIS: the probe's global top-k and the fit agree on every rank
    {"name": "dis", "k": 4, "mode": "per_sample", "lam": 0.5, "dis_refit_every": 1,
     "dis_refit_rows": 5, "dis_refit_k": 3},
    {"name": "ftis", "k": 3, "mode": "per_sample"},
    {"name": "dis", "k": 5, "mode": "hybrid", "lam": 0.6, "top_t": 1},
    {"name": "pdbs", "k": 4, "lam": 0.8},
]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join([m["name"]] + ([m["mode"]] if "mode" in m else [])
                                                   + (["refit"] if "dis_refit_every" in m else [])))
def test_sharded_matches_single_process(method, world):
    ref = _step(method, None, 0, 1)
    got = _sharded(method, world)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], ref[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["dis", "ftis"])
def test_stratified_per_rank_sampling_converges_to_full_kd(name):
    """Each rank draws its share of m from its own shard; with m = 2000 draws over 11
    classes the sampled gradient is the full-KD gradient up to sampling noise."""
    full = _step({"name": "kd", "temperature": 2.0, "lam": 1.0}, None, 0, 1)
    got = _sharded({"name": name, "k": 2000, "temperature": 2.0, "lam": 1.0,
                    "mode": "batch_shared"}, 2)
    cos = torch.nn.functional.cosine_similarity(got[1].flatten(), full[1].flatten(), dim=0)
    assert cos > 0.999
    torch.testing.assert_close(got[0], full[0], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("mode", ["batch_shared", "per_sample", "hybrid"])
@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
def test_sampled_methods_never_build_full_student_logits(name, mode, monkeypatch):
    """The sampled layer must not compute B x C student logits (PDBS is the exception)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a sampled method called logits_full")
    monkeypatch.setattr(ShardedHead, "logits_full", refuse)
    x, y, teacher, w_bb, _ = _problem()
    head = ShardedHead(C, D, None, init_std=0.5, seed=3)
    layer = SoftmaxLayer(MethodConfig(name=name, k=2, mode=mode), C, 0, C, None, total_steps=10)
    out = layer(x @ w_bb.T, head, y, TopKTeacher.from_dense(teacher, rank=False), None, 1)
    assert torch.isfinite(out["loss"])
    # fixed shapes: batch_shared computes all B targets + k draw slots (masked repeats),
    # the per-row modes 1 + k columns per row
    assert out["n_sampled"] == (B + 2 if mode == "batch_shared" else 1 + 2)


def test_full_every_takes_the_kd_step_on_its_steps():
    """method.full_every = 3: (micro-)steps 2, 5, ... are full-softmax KD steps (the KD
    layer's loss and head gradient exactly); the others stay sampled."""
    x, y, teacher, w_bb, _ = _problem()
    t = TopKTeacher.from_dense(teacher, rank=False)
    outs = {}
    for name, every in (("dis", 3), ("kd", 0)):
        head = ShardedHead(C, D, None, init_std=0.5, seed=3)
        layer = SoftmaxLayer(MethodConfig(name=name, k=2, full_every=every), C, 0, C, None,
                             total_steps=10)
        outs[name] = [layer(x @ w_bb.T, head, y, t, None, step) for step in (1, 2)]
    assert outs["dis"][0]["n_sampled"] == B + 2 and outs["dis"][1]["n_sampled"] == C
    torch.testing.assert_close(outs["dis"][1]["loss"], outs["kd"][1]["loss"])
    torch.testing.assert_close(outs["dis"][1]["kd"], outs["kd"][1]["kd"])
