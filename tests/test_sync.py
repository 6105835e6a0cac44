"""The proposal fingerprint check catches a rank whose proposal state drifted."""
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dkd.engine.sync import check_proposal_sync, fingerprint
from dkd.sampling.proposals import build_proposal


def _worker(rank, port, perturb, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    prop = build_proposal("dis", total_steps=100)
    prop.advance(7)
    if perturb and rank == 1:
        prop.advance(1)  # this rank's schedule is one step ahead
    try:
        check_proposal_sync(prop, dist.group.WORLD)
        queue.put((rank, "ok"))
    except RuntimeError as err:
        queue.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def _run(perturb):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, perturb, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    return out


def test_in_sync_passes_and_perturbed_rank_fails_loudly():
    assert _run(False) == {0: "ok", 1: "ok"}
    out = _run(True)
    assert all("proposal state differs across ranks" in msg for msg in out.values())


def test_fingerprint_depends_on_state():
    a, b = build_proposal("dis", total_steps=10), build_proposal("dis", total_steps=10)
    assert fingerprint(a.state_dict()) == fingerprint(b.state_dict())
    b.advance()
    assert fingerprint(a.state_dict()) != fingerprint(b.state_dict())


def test_sample_hash_sees_a_changed_or_swapped_column():
    import torch
    from dkd.engine.sync import sample_hash
    from dkd.sampling.sample_set import SampleSet
    cls = torch.tensor([3, 5, 9, 2])
    o = torch.tensor([0.0, 0.5, 1.5, 2.0])
    det = torch.tensor([True, False, False, False])
    h = sample_hash(SampleSet(cls, o, det, mode="batch_shared"))
    assert torch.equal(h, sample_hash(SampleSet(cls.clone(), o.clone(), det)))
    assert not torch.equal(h, sample_hash(SampleSet(cls[[0, 2, 1, 3]], o, det)))
    assert not torch.equal(h, sample_hash(SampleSet(cls, o + 1e-3, det)))
