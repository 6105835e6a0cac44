"""The sampled step as a GPU runs it, checked on this CPU machine.

Under PyTorch's ``FakeTensorMode`` tensors on ``device="cuda"`` carry shapes and devices but
no data: an operation that needs a value on the host (``.item()``, ``nonzero``, ``unique``,
boolean indexing) raises, and so does mixing CPU and CUDA tensors. A whole sampled head
step — draw, logits, loss, backward, row update — that completes here with every input on
fake CUDA has no host synchronisation and no device mixing (DESIGN.md, "The step on a GPU").
The op counts of the same step on the torch path are checked too (dkd/profiling/ops.py).
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dkd.config import MethodConfig
from dkd.engine.softmax_layer import SoftmaxLayer
from dkd.head import native
from dkd.head.head import ShardedHead
from dkd.head.shard import shard_bounds
from dkd.profiling.ops import OpCounter
from dkd.sampling.draw import draw_sample_set
from dkd.sampling.proposals import build_proposal
from dkd.sampling.rng import draw_key
from dkd.sampling.teacher_batch import TopKTeacher

B, D, K = 16, 8, 12
MODES = ["batch_shared", "per_sample", "hybrid"]
METHODS = ["uniform", "ftis", "dis"]


def _inputs(C, device, dense=False, exact=False):
    """exact: a live teacher's features and head ride along (exact logits at the sampled
    columns, ``column_logits``)."""
    g = torch.Generator().manual_seed(0)
    t_feats, t_head = torch.randn(B, 5, generator=g), torch.randn(C, 5, generator=g)
    logits = t_feats @ t_head.T
    y = torch.randint(0, C, (B,), generator=g)
    feats = torch.randn(B, D, generator=g)
    if dense:
        t = TopKTeacher.from_dense(logits.to(device), rank=False)
    else:
        val, idx = logits.topk(K, 1)
        t = TopKTeacher(idx.to(device), val.to(device), logits.logsumexp(1).to(device), C,
                        feats=t_feats.to(device) if exact else None,
                        head=t_head.to(device) if exact else None)
    return t, y.to(device), feats.to(device).requires_grad_(True)


def _step(name, mode, C, device, dense=False, lam=0.7, top_t=1, step=3, head_kind="adam",
          backward=True, exact=False, prior=False):
    t, y, feats = _inputs(C, device, dense, exact)
    head = ShardedHead(C, D, None, init_std=0.1, seed=1, device=device)
    opt = head.make_optimizer(head_kind, lr=1e-2)
    extra = {"prior": prior, "prior_weight": 0.3} if prior else {}
    pi = (torch.full((C,), 1.0 / C, dtype=torch.float64).to(device) if prior == "unigram"
          else None)
    layer = SoftmaxLayer(MethodConfig(name=name, k=6, mode=mode, lam=lam, top_t=top_t,
                                      **extra), C, 0, C, None, total_steps=10, prior=pi)
    out = layer(feats, head, y, t, None, step)
    if backward:
        out["loss"].backward()
        head.apply_grads(opt)
    return out, head, feats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dense,exact", [(False, False), (True, False), (False, True)],
                         ids=["topk", "dense", "topk_exact_columns"])
def test_sampled_step_runs_on_fake_devices_without_host_syncs(name, mode, dense, exact):
    """Draw, logits and loss on fake CUDA; the whole step (with backward and the row
    update) on fake ``meta``, another non-host device: the autograd engine's stream
    bookkeeping asks a CUDA driver for a context, which this machine does not have."""
    C = 200 if not dense else 40
    with FakeTensorMode(allow_non_fake_inputs=False):
        out, _, _ = _step(name, mode, C, "cuda", dense, backward=False, exact=exact)
        assert out["loss"].device.type == "cuda"
    with FakeTensorMode(allow_non_fake_inputs=False):
        out, head, feats = _step(name, mode, C, "meta", dense, exact=exact)
        assert feats.grad is not None and feats.grad.device.type == "meta"


@pytest.mark.parametrize("prior", ["unigram", "student"])
@pytest.mark.parametrize("mode", ["batch_shared", "hybrid"])
def test_prior_mixture_step_runs_on_fake_devices_without_host_syncs(mode, prior):
    """method.prior: the prior's draws and density (and the student prior's update from
    the step's columns) stay on the device, fixed shapes."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        out, _, _ = _step("dis", mode, 200, "cuda", backward=False, prior=prior)
        assert out["loss"].device.type == "cuda"
    with FakeTensorMode(allow_non_fake_inputs=False):
        out, head, feats = _step("dis", mode, 200, "meta", prior=prior)
        assert feats.grad is not None and feats.grad.device.type == "meta"


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "rmsprop"])
def test_row_update_of_every_head_optimizer_on_fake_cuda(kind):
    """Repeated rows, a touch mask and factored rows, as the sampled step hands them over."""
    with FakeTensorMode():
        head = ShardedHead(50, D, None, seed=1, device="cuda")
        opt = head.make_optimizer(kind, lr=1e-2)
        rows = torch.tensor([3, 7, 3, 0, 9], device="cuda")
        touch = torch.tensor([True, True, True, False, True, False, True], device="cuda")
        x = torch.randn(4, D, device="cuda")
        factored = (torch.tensor([1, 3], device="cuda"), torch.randn(2, device="cuda"),
                    torch.tensor([0, 2], device="cuda"), x)
        opt.step(rows, torch.randn(5, D, device="cuda"), touch=touch, factored=factored)
        assert head.weight.device.type == "cuda"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_stratified_per_rank_draw_on_fake_cuda(name, world):
    C = 101
    params = {"temperature": 2.0} if name == "ftis" else {}
    with FakeTensorMode():
        t, y, _ = _inputs(C, "cuda")
        for rank in range(world):
            s, a = draw_sample_set(t, y, build_proposal(name, **params), 9,
                                   mode="batch_shared", key=draw_key(0, 5),
                                   shard=(shard_bounds(C, world), rank), workspace={})
            assert s.classes.shape == (B + 9,) and a.shape == (B, B + 9)
            assert s.classes.device.type == "cuda"


def test_fake_cuda_refuses_what_a_gpu_would_wait_for():
    """The instrument itself: the same mode raises for a host sync and for mixing."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException
    with FakeTensorMode():
        x = torch.empty(4, 3, device="cuda")
        with pytest.raises(DynamicOutputShapeException):
            torch.nonzero(x[:, 0] > 0)
        with pytest.raises(Exception):
            x + torch.ones(4, 3)


@pytest.mark.parametrize("exact", [False, True], ids=["completion", "exact_columns"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", METHODS)
def test_torch_path_step_has_no_host_syncs_and_few_ops(name, mode, exact):
    """Counted on the host with the native kernels off (the path a GPU takes); one warm
    step first (one-off tables)."""
    with native.disabled():
        _step(name, mode, 2000, "cpu", exact=exact)
        counter = OpCounter()
        with counter:
            _step(name, mode, 2000, "cpu", step=4, exact=exact)
    rec = counter.record()
    assert rec["host_syncs"] == 0, rec["sync_ops"]
    assert rec["aten_ops"] > 20


@pytest.mark.parametrize("mode", MODES)
def test_bench_trace_counts_one_head_step(mode):
    """`dkd bench softmax --trace-ops` counts the step the benchmark times: on the torch
    path, batch-shared DIS stays within 100 ATen operations and no sampled mode syncs.
    (The count depends on the step's structure, not on B, C or d.)"""
    from dkd.bench import trace_ops
    from dkd.bench_cases import HeadBench
    hb = HeadBench(3000, 16, 8, 40, 0)
    rec = trace_ops(hb, hb.layer("dis", mode, 60), 7)
    assert rec["host_syncs"] == 0, rec["sync_ops"]
    if mode == "batch_shared":
        assert 40 <= rec["aten_ops"] <= 100, rec
