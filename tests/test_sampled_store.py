"""The sampled soft-label store (teacher.store_kind=sampled): an unbiased sparse target in
the K slots of a top-K store, written the same way whatever the batching, read as a
top-K store of the sparse teacher, and refused at another temperature."""
import math

import pytest
import torch

from dkd.sampling.rng import draw_key, row_uniforms
from dkd.teacher.sparse_target import FLOOR_MASS, sampled_target
from test_store import FP, C, LinearTeacher, open_store, ref_logits, run_relabel, store_bytes


def test_the_sampled_target_is_unbiased_and_sparse():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 30, generator=g) * 2
    tau, k, reps = 2.0, 8, 4000
    p = torch.softmax(a.double() / tau, 1)
    mean = torch.zeros_like(p)
    for r in range(reps):
        u = row_uniforms(draw_key(7, r), torch.arange(3), k)
        ids, vals, lse, tail = sampled_target(a, k, tau, u)
        dense = torch.full((3, 30), float(tail[0]) - math.log(30 - k), dtype=torch.float64)
        dense.scatter_(1, ids, vals.double())
        q = torch.softmax(dense / tau, 1)               # the stored target at T = tau
        mean += q / reps
        if r == 0:
            assert (ids.sort(1).values.diff(1) > 0).all()           # distinct classes
            assert (vals.diff(1) <= 0).all()                        # by frequency
            n = (q * k).round()
            torch.testing.assert_close(q, n / k, atol=2 * FLOOR_MASS, rtol=0)
            torch.testing.assert_close(lse.double(), torch.logsumexp(dense, 1).float().double())
    # E[p_hat] = p: the average target over 4,000 independent stores (4.5 sigma)
    sigma = (p * (1 - p) / (k * reps)).sqrt()
    assert ((mean - p).abs() <= 4.5 * sigma + 1e-6).all()


def test_a_sampled_store_reads_as_the_top_k_of_its_sparse_teacher(tmp_path):
    path = run_relabel(tmp_path / "s", kind="sampled", topk=5, temperature=1.5, seed=3)
    store = open_store(path)
    assert store.layout == "sampled" and store.k == 5 and store.temperature == 1.5
    m = store.manifest
    assert m["temperature"] == 1.5 and m["seed"] == 3 and "train at T = tau" in m["logits_note"]
    batch = store.get(torch.arange(len(store)))
    dense = batch.dense(allow_topk_completion=True)
    q = torch.softmax(dense.double() / 1.5, 1)
    n = q * 5
    assert torch.allclose(n, n.round(), atol=1e-5) and (n.round().sum(1) == 5).all()
    # the drawn classes are the teacher's likely ones: each row's drawn set holds its top
    # class far more often than chance (5 / 12)
    top = ref_logits().argmax(1)
    assert (n.round().gather(1, top.unsqueeze(1)) > 0).float().mean() > 0.6


def test_sampled_store_bytes_do_not_depend_on_batches_or_shards(tmp_path):
    a = run_relabel(tmp_path / "a", kind="sampled", batch_size=8, shard_rows=16)
    b = run_relabel(tmp_path / "b", kind="sampled", batch_size=3, shard_rows=16)
    assert store_bytes(a) == store_bytes(b)
    c = run_relabel(tmp_path / "c", kind="sampled", batch_size=8, shard_rows=16, seed=1)
    assert store_bytes(c) != store_bytes(a)          # the seed is part of the plan


def test_training_refuses_a_sampled_store_at_another_temperature(tmp_path, teacher_dir):
    from conftest import run_cli, summary, train_run

    store = tmp_path / "store"
    run_cli(["relabel"], ["data.num_classes=20", "data.input_dim=16",
                          "data.num_super_classes=4", "data.train_size=2048",
                          f"teacher.checkpoint={teacher_dir}", f"teacher.store={store}",
                          "teacher.store_kind=sampled", "teacher.store_topk=6",
                          "teacher.store_temperature=2"])
    bad = train_run(tmp_path, "bad", "method.name=kd", "method.temperature=4",
                    f"teacher.store={store}", check=False)
    assert bad.returncode == 2
    assert "sampled at temperature 2.0" in bad.stderr + bad.stdout
    train_run(tmp_path, "ok", "method.name=kd", "method.temperature=2", f"teacher.store={store}")
    assert summary(tmp_path / "ok")["top1"] > 0
