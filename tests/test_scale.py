"""The class axis past one device: rank-0-only chunked export to host memory, checkpoint
pieces copied straight to the host, one data permutation per epoch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import train_run
from dkd.data import global_batch_indices
from dkd.dist.functional import gather_rows_to_host
from dkd.head.head import ShardedHead, host_rows

C, D = 23, 5   # uneven shards on 2 and 3 ranks


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = ShardedHead(C, D, dist.group.WORLD, seed=3)
        full = gather_rows_to_host(head.weight, dist.group.WORLD, chunk_rows=2)  # many chunks
        if rank == 0:
            queue.put(full.numpy())
        else:
            assert full is None
    finally:
        dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_chunked_gather_to_rank0_host_equals_the_unsharded_head(world):
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = torch.from_numpy(queue.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = ShardedHead(C, D, None, seed=3).weight.detach()   # one process: every row
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_host_rows_share_a_whole_host_shard_and_copy_a_part():
    w = torch.randn(8, 3)
    assert host_rows(w, 0, 8).data_ptr() == w.data_ptr()         # no second copy
    part = host_rows(w, 2, 5)
    assert part.data_ptr() != w.data_ptr() and torch.equal(part, w[2:5])


def test_export_of_a_two_rank_run_is_the_concatenation_of_its_shards(tmp_path):
    train_run(tmp_path, "r", "method.name=hard", "model.norm=layer", "train.steps=4", nproc=2)
    ckpt = tmp_path / "r" / "checkpoints" / "step0000004"
    pieces = [torch.load(f, weights_only=False) for f in sorted(ckpt.glob("head-*.pt"),
                                                                 key=lambda f: int(f.name.split("-")[1]))]
    assert [(p["start"], p["end"]) for p in pieces] == [(0, 10), (10, 20)]
    model = torch.load(tmp_path / "r" / "model.pt", weights_only=False)
    torch.testing.assert_close(model["head"], torch.cat([p["weight"] for p in pieces]),
                               rtol=0, atol=0)


def test_the_permutation_is_one_per_epoch_and_a_function_of_seed_and_step():
    n, b = 50, 8
    epoch0 = torch.cat([global_batch_indices(s, n, b, seed=1) for s in range(n // b)])
    assert len(set(epoch0.tolist())) == len(epoch0)              # no repeats in an epoch
    again = global_batch_indices(3, n, b, seed=1)
    assert torch.equal(again, epoch0[3 * b:4 * b])
    assert not torch.equal(global_batch_indices(n // b, n, b, seed=1), epoch0[:b])


def _losses(run):
    from conftest import read_metrics
    return [m["loss"] for m in read_metrics(run) if m["kind"] == "train"]


@pytest.mark.parametrize("method", [["method.name=kd"],
                                    ["method.name=dis", "method.k=5", "method.mode=per_sample",
                                     "method.sampling_topk=8"],
                                    ["method.name=dis", "method.k=5", "method.mode=hybrid",
                                     "method.sampling_topk=8",
                                     "method.exact_teacher_columns=false"]],
                         ids=["kd-blocks", "dis-topk-exact", "dis-topk-completion"])
def test_the_class_sharded_teacher_gives_the_one_process_trajectory(tmp_path, teacher_dir,
                                                                    method):
    """Its top-K, log-sum-exp, exact columns and KD blocks merge to the whole teacher's:
    2 and 3 ranks (classes 10/10 and 7/7/6) follow the unsharded single process."""
    sets = [*method, f"teacher.checkpoint={teacher_dir}", "model.norm=layer",
            "train.steps=8"]
    train_run(tmp_path, "one", *sets)
    want = _losses(tmp_path / "one")
    for world in (2, 3):
        train_run(tmp_path, f"s{world}", *sets, "teacher.sharded=true", nproc=world)
        assert _losses(tmp_path / f"s{world}") == pytest.approx(want, rel=1e-4), world


def test_the_sharded_teacher_refuses_what_it_cannot_serve(tmp_path, teacher_dir):
    proc = train_run(tmp_path, "x", "method.name=kd_pt", f"teacher.checkpoint={teacher_dir}",
                     "teacher.sharded=true", check=False)
    assert proc.returncode == 2 and "needs the whole teacher on every rank" in proc.stderr


def test_relabel_with_the_sharded_teacher_on_2_ranks_writes_the_1_rank_store(tmp_path,
                                                                              teacher_dir):
    import numpy as np
    from conftest import TINY, run_cli
    base = [*TINY, f"out_dir={tmp_path}", f"teacher.checkpoint={teacher_dir}",
            "teacher.store_topk=6", "teacher.store_full_threshold=10", "teacher.store_features=false"]
    run_cli(["relabel", "--batch-size", "100"], [*base, f"teacher.store={tmp_path / 'one'}"])
    run_cli(["relabel", "--batch-size", "100"], [*base, f"teacher.store={tmp_path / 'two'}",
                                                 "teacher.sharded=true"], nproc=2)
    one, two = sorted((tmp_path / "one").glob("shard-*.npy")), sorted((tmp_path / "two").glob("shard-*.npy"))
    assert [f.name for f in one] == [f.name for f in two] and one
    for a, b in zip(one, two):
        x, y = np.load(a), np.load(b)
        if a.name.endswith(".ids.npy"):
            assert (x == y).mean() > 0.99, a.name    # ties may order differently
        else:
            np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64),
                                       rtol=2e-3, atol=2e-3, err_msg=a.name)
    # training from the sharded store works as from the other
    train_run(tmp_path, "st", "method.name=dis", "method.k=4", f"teacher.store={tmp_path / 'two'}")


def _count_worker(rank, world, port, model_file, queue):
    """One kd step's teacher batch and one sampled one from the sharded teacher, with every
    all-gather / all-reduce counted (the largest number of elements any one moves)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dkd.head.shard import shard_range
        from dkd.teacher.sharded import ShardedTeacher, sharded_teacher_batch
        largest = [0]
        real_gather, real_reduce = dist.all_gather, dist.all_reduce

        def gather(out, t, *a, **k):
            largest[0] = max(largest[0], t.numel() * len(out))
            return real_gather(out, t, *a, **k)

        def reduce(t, *a, **k):
            largest[0] = max(largest[0], t.numel())
            return real_reduce(t, *a, **k)

        dist.all_gather, dist.all_reduce = gather, reduce
        teacher = ShardedTeacher(model_file, BIG_C, 8, torch.device("cpu"),
                                 *shard_range(BIG_C, world, rank), dist.group.WORLD)
        x = torch.randn(BATCH // world, 8)
        sizes = [BATCH // world] * world
        kd = sharded_teacher_batch(teacher, x, sizes, 0, False)
        sampled = sharded_teacher_batch(teacher, x, sizes, 16, True)
        sampled.column_logits(torch.randint(0, BIG_C, (BATCH, 5)))
        if rank == 0:
            queue.put((largest[0], tuple(kd.block.shape), tuple(sampled.ids.shape)))
    finally:
        dist.destroy_process_group()


BIG_C, BATCH = 3000, 32


def test_no_b_by_c_teacher_tensor_is_gathered(tmp_path):
    from dkd.config import ModelConfig
    from dkd.models import build_backbone
    cfg = ModelConfig(arch="mlp", hidden=16, depth=1, feature_dim=8, norm="layer")
    blob = {"model": cfg.model_dump(), "num_classes": BIG_C, "input_dim": 8,
            "input_shape": (8,), "vocab_size": None,
            "backbone": build_backbone(cfg, 8).state_dict(), "head": torch.randn(BIG_C, 8)}
    torch.save(blob, tmp_path / "model.pt")
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=_count_worker, args=(r, 2, port, tmp_path / "model.pt", queue))
             for r in range(2)]
    for p in procs:
        p.start()
    largest, kd_block, ids = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert kd_block == (BATCH, BIG_C // 2) and ids == (BATCH, 16)
    # features (B x d_t), top-K candidates (2 x B x 16), sampled columns (B x 5): all far
    # below one (B, C) tensor
    assert largest <= 2 * BATCH * 16 < BATCH * BIG_C
