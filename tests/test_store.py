"""Soft-label store: write with `relabel` from a fake teacher, read back, refuse bad stores,
resume an interrupted relabel, and write the same bytes from 2 gloo ranks as from 1."""
import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkd.losses.targets import kd_topk_target
from dkd.teacher.relabel import (default_shard_rows, rank_shards, relabel, teacher_fingerprint,
                                 write_store)
from dkd.teacher.store import (StoreError, SoftLabelStore, complete_topk, require_full,
                               tail_logit)

N, C, D = 40, 12, 8
FP = {"kind": "tiny", "size": N, "num_classes": C, "seed": 1}
IDS = [39, 0, 17, 17, 5, 33, 8]  # unsorted, repeated, across every shard


class LinearTeacher:
    """Fixed random linear model on a dyadic grid, so every logit is exact in float32
    whatever the batching (integers x in [-4, 4], weights k/256)."""

    def __init__(self, seed=0, fail_after=None):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randint(-1024, 1025, (C, D), generator=g).float() / 256
        self.calls, self.fail_after = 0, fail_after

    def logits(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("teacher crashed")
        self.calls += 1
        return x @ self.weight.T

    def state_dict(self):
        return {"weight": self.weight}


class TinySplit:
    def __init__(self, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(-4, 5, (N, D), generator=g).float()
        self.y = torch.zeros(N, dtype=torch.long)

    def __len__(self):
        return N

    def get(self, idx):
        return self.x[idx], self.y[idx]


def ref_logits():
    return LinearTeacher().logits(TinySplit().x)  # (N, C)


def run_relabel(out, teacher=None, group=None, **kw):
    teacher = teacher or LinearTeacher()
    args = dict(num_classes=C, topk=5, full_threshold=0, batch_size=8, dataset_fingerprint=FP,
                teacher_fingerprint=teacher_fingerprint(LinearTeacher()), dtype="float32",
                shard_rows=16, group=group)
    args.update(kw)
    return relabel(teacher, TinySplit(), out, **args)


def open_store(path, **kw):
    return SoftLabelStore(path, expect_dataset=FP, expect_num_samples=N, expect_num_classes=C,
                          **kw)


def store_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


# --------------------------------------------------------------------------- reading back

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_full_store_returns_teacher_logits(tmp_path, dtype):
    path = run_relabel(tmp_path / "s", full_threshold=C, dtype=dtype)
    store = open_store(path)
    want = ref_logits()[IDS].to(getattr(torch, dtype)).float()
    batch = store.get(torch.tensor(IDS))
    assert store.layout == "full" and store.exact and batch.logits.dtype == torch.float32
    assert torch.equal(batch.logits, want)
    assert torch.equal(store.dense_logits(np.array(IDS)), want)
    m = store.manifest
    assert (m["version"], m["num_samples"], m["num_classes"], m["k"]) == (1, N, C, None)
    assert m["dtypes"] == {"logits": dtype} and "temperature-free" in m["logits_note"]
    assert m["dataset_fingerprint"] == FP and m["teacher_fingerprint"].startswith("state-sha256:")
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 16), (16, 32), (32, 40)]
    assert all(len(f["sha256"]) == 64 for s in m["shards"] for f in s["files"].values())
    clone = pickle.loads(pickle.dumps(store))  # small: memory maps are reopened, not copied
    assert len(pickle.dumps(store)) < 8000 and torch.equal(clone.get(IDS).logits, want)
    ids, vals, lse = batch.topk(3)  # a full store serves the sampler's top-K view too
    assert torch.equal(vals, want.topk(3).values) and torch.allclose(lse, want.logsumexp(1))


def test_topk_store_ids_logits_lse_and_completion(tmp_path):
    store = open_store(run_relabel(tmp_path / "s", topk=5))
    ref = ref_logits()[IDS]
    b = store.get(IDS)
    assert store.layout == "topk" and store.k == 5 and not store.exact and b.logits is None
    assert b.topk_ids.dtype == torch.int64 and b.topk_ids.shape == (len(IDS), 5)
    assert torch.equal(b.topk_logits, ref.topk(5).values)              # sorted descending
    assert torch.equal(ref.gather(1, b.topk_ids), b.topk_logits)       # ids point at them
    assert all(len(set(r)) == 5 for r in b.topk_ids.tolist())
    assert torch.allclose(b.lse, ref.logsumexp(1), atol=1e-5)
    with pytest.raises(StoreError, match="allow_topk_completion"):
        store.dense_logits(IDS)
    dense = store.dense_logits(IDS, allow_topk_completion=True)
    assert torch.equal(dense.gather(1, b.topk_ids), b.topk_logits)
    assert torch.allclose(dense.softmax(1), kd_topk_target(ref, 5), atol=1e-6)
    ids3, vals3, _ = b.topk(3)
    assert torch.equal(ids3, b.topk_ids[:, :3]) and torch.equal(vals3, b.topk_logits[:, :3])
    with pytest.raises(StoreError, match="holds only K = 5"):
        b.topk(6)


def test_float16_topk_store_is_self_consistent(tmp_path):
    store = open_store(run_relabel(tmp_path / "s", topk=4, dtype="float16"))
    ref, b = ref_logits()[IDS], store.get(IDS)
    assert torch.equal(b.topk_logits, ref.topk(4).values.half().float())
    assert torch.allclose(b.lse, ref.logsumexp(1), atol=1e-5)   # lse of the raw logits
    # The tail logit carries the exact tail mass, exp(tail) * (C - K) = sum of the rest,
    # even where the tail share is ~1e-14 (row 5), beyond what exp(lse) - sum could give.
    rest = ref.scatter(1, b.topk_ids, float("-inf")).logsumexp(1)
    assert (rest - ref.logsumexp(1)).min() < -30
    assert torch.allclose(b.tail_logit + np.log(C - 4), rest, atol=1e-5)
    p = store.dense_logits(IDS, allow_topk_completion=True).double().softmax(1)
    assert torch.allclose(p.sum(1), torch.ones(len(IDS), dtype=torch.float64))


def test_topk_with_k_at_least_c_equals_full_store(tmp_path):
    full = open_store(run_relabel(tmp_path / "full", full_threshold=C, dtype="float16"))
    topk = open_store(run_relabel(tmp_path / "topk", topk=C + 3, dtype="float16"))
    assert topk.layout == "topk" and topk.k == C and topk.exact
    assert torch.equal(topk.dense_logits(IDS), full.dense_logits(IDS))
    assert torch.equal(topk.get(IDS).logits, full.get(IDS).logits)
    require_full(topk, "kd", allow_completion=False)


def test_require_full_refuses_topk_unless_allowed(tmp_path):
    store = open_store(run_relabel(tmp_path / "s", topk=5))
    with pytest.raises(StoreError, match=r"method 'pdbs' needs all 12 teacher logits.*top-5"
                                         r".*teacher\.allow_topk_completion=true"):
        require_full(store, "pdbs", False, how_to_allow="teacher.allow_topk_completion=true")
    require_full(store, "pdbs", True)
    require_full(open_store(run_relabel(tmp_path / "f", full_threshold=C)), "kd", False)


def test_tail_logit_is_stable_for_huge_logits():
    a = torch.tensor([[1e4, 1e4 - 1, 1e4 - 2, 1e4 - 30, -1e4]], dtype=torch.float64)
    vals, ids = a.topk(2)
    lse = a.logsumexp(1)
    dense = complete_topk(ids, vals, tail_logit(vals, lse, 5), 5)
    assert torch.isfinite(dense).all()
    assert torch.allclose(dense.double().softmax(1), kd_topk_target(a, 2).double(), atol=1e-6)
    # top-K holding all the mass (to rounding): the tail is floored, finite and negligible.
    t = tail_logit(vals, vals.logsumexp(1), 5)
    assert torch.isfinite(t).all() and (t < vals[:, -1] - 600).all()


# --------------------------------------------------------------------------- refusals

def _flip_last_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_named_and_relabel_repairs_it(tmp_path):
    path = run_relabel(tmp_path / "s", full_threshold=C)
    good = store_bytes(path)
    _flip_last_byte(path / "shard-00001.logits.npy")
    with pytest.raises(StoreError, match=r"shard file shard-00001\.logits\.npy fails its sha256"):
        open_store(path)
    lazy = open_store(path, verify="lazy")
    lazy.get([0, 5, 33])                                  # shards 0 and 2 are intact
    with pytest.raises(StoreError, match=r"shard-00001\.logits\.npy fails its sha256"):
        lazy.get([20])
    teacher = LinearTeacher()
    run_relabel(path, teacher=teacher, full_threshold=C)  # rewrites only the bad shard
    assert teacher.calls == 2 and store_bytes(path) == good
    (path / "shard-00002.logits.npy").write_bytes(good["shard-00002.logits.npy"][:100])
    with pytest.raises(StoreError, match=r"shard file shard-00002\.logits\.npy cannot be read"):
        open_store(path, verify=False)


def test_mismatches_are_refused_with_the_failed_check(tmp_path):
    path = run_relabel(tmp_path / "s", topk=5)
    with pytest.raises(StoreError, match=r"N mismatch: the store holds N = 40 .* has 41"):
        SoftLabelStore(path, expect_num_samples=N + 1)
    with pytest.raises(StoreError, match=r"C mismatch: the store holds C = 12 .* has 13"):
        SoftLabelStore(path, expect_num_classes=C + 1)
    with pytest.raises(StoreError, match=r"dataset fingerprint differs .*seed: 1 vs 2"):
        SoftLabelStore(path, expect_dataset={**FP, "seed": 2})
    with pytest.raises(StoreError, match="teacher fingerprint differs"):
        SoftLabelStore(path, expect_teacher=teacher_fingerprint(LinearTeacher(seed=5)))
    SoftLabelStore(path, expect_teacher=teacher_fingerprint(LinearTeacher()))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StoreError, match="manifest version 99 is unknown"):
        SoftLabelStore(path)
    (path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="missing manifest.json"):
        SoftLabelStore(path)
    with pytest.raises(StoreError, match="does not exist"):
        SoftLabelStore(tmp_path / "nowhere")


def test_relabel_refuses_a_store_of_other_settings(tmp_path):
    path = run_relabel(tmp_path / "s", topk=5)
    with pytest.raises(StoreError, match=r"other settings .*k: 5 vs 3"):
        run_relabel(path, topk=3)
    run_relabel(path, topk=3, overwrite=True)
    assert open_store(path).k == 3


# --------------------------------------------------------------------------- resume

def test_interrupted_relabel_resumes_to_the_same_store(tmp_path):
    clean = run_relabel(tmp_path / "clean", topk=5, dtype="float16")
    path = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        # batch 8, shard 16: shard 0 completes, the crash comes half-way through shard 1
        run_relabel(path, teacher=LinearTeacher(fail_after=3), topk=5, dtype="float16")
    assert not (path / "manifest.json").exists()
    assert sorted(p.name for p in path.iterdir()) == [  # shard 1 left no file behind
        "shard-00000.ids.npy", "shard-00000.json", "shard-00000.logits.npy",
        "shard-00000.lse.npy", "shard-00000.tail_lse.npy"]
    with pytest.raises(StoreError, match="did not finish"):
        open_store(path)
    teacher = LinearTeacher()
    run_relabel(path, teacher=teacher, topk=5, dtype="float16")
    assert teacher.calls == 5 - 2                        # shard 0's two batches are skipped
    assert store_bytes(path) == store_bytes(clean)       # no leftovers, identical bytes


def test_write_store_matches_relabel(tmp_path):
    a = run_relabel(tmp_path / "a", topk=5, dtype="float16")
    b = write_store(tmp_path / "b", ref_logits(), topk=5, dtype="float16", shard_rows=16,
                    dataset_fingerprint=FP, teacher_fingerprint=teacher_fingerprint(LinearTeacher()))
    assert store_bytes(a) == store_bytes(b)


def test_shard_arithmetic():
    assert [list(rank_shards(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(rank_shards(2, 3, r)) for r in range(3)] == [1, 1, 0]
    assert default_shard_rows(1000) == 1 << 18 and default_shard_rows(1 << 40) == 1


# --------------------------------------------------------------------------- 2 gloo ranks

def _worker(rank, port, out, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    kw = dict(group=dist.group.WORLD, topk=5, dtype="float16", shard_rows=8)
    results = []
    try:
        for teacher in (LinearTeacher(fail_after=1 if rank == 1 else None), LinearTeacher()):
            try:  # first a relabel whose rank 1 crashes on its 2nd shard, then the resume
                run_relabel(out, teacher=teacher, **kw)
                results.append(("ok", teacher.calls))
            except Exception as err:  # noqa: BLE001 (reported to the parent)
                results.append((str(err), teacher.calls))
    finally:
        queue.put((rank, results))
        dist.destroy_process_group()


def test_two_gloo_ranks_write_the_same_store_as_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path / "two"), q))
             for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    # 5 shards of one batch: rank 0 owns 3, rank 1 owns 2 and crashes on its second. The
    # crash stops rank 0 too (no hang at a barrier); the resume redoes only that shard.
    assert out[1] == [("teacher crashed", 1), ("ok", 1)]
    assert out[0][0][0].startswith("relabel: another rank failed while writing shards")
    assert out[0][1] == ("ok", 0)
    one = run_relabel(tmp_path / "one", topk=5, dtype="float16", shard_rows=8)
    assert len(open_store(one).manifest["shards"]) == 5
    assert store_bytes(tmp_path / "two") == store_bytes(one)
