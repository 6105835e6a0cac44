"""The sampled step on a real CUDA device (skipped without one; run by make gpu-check).

The draws are a pure function of (seed, step) and the inputs, so the same step on CUDA and
on the CPU samples the same columns; loss, feature gradient and updated head rows agree to
float tolerance. The softmax layer runs under torch.cuda.set_sync_debug_mode("error"): any
host synchronisation inside it raises.
"""
import pytest
import torch

from dkd.config import MethodConfig
from dkd.engine.softmax_layer import SoftmaxLayer
from dkd.head.head import ShardedHead
from dkd.sampling.teacher_batch import TopKTeacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
B, D, K, C = 64, 32, 50, 5000


def _step(name, mode, device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g).to(device)
    val, idx = logits.topk(K, 1)
    t = TopKTeacher(idx.to(device), val.to(device), logits.logsumexp(1).to(device), C)
    feats = torch.randn(B, D, generator=g).to(device).requires_grad_(True)
    head = ShardedHead(C, D, None, init_std=0.1, seed=1, device=device)
    opt = head.make_optimizer("adam", lr=1e-2)
    layer = SoftmaxLayer(MethodConfig(name=name, k=200, mode=mode, lam=0.7, top_t=1), C, 0,
                         C, None, total_steps=100)
    for step in range(2):                 # the second step exercises warm state
        feats.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer(feats, head, y, t, None, step)
            out["loss"].backward()
            head.apply_grads(opt)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return out["loss"].detach().cpu(), feats.grad.cpu(), head.weight.cpu()


@pytest.mark.parametrize("mode", ["batch_shared", "per_sample", "hybrid"])
@pytest.mark.parametrize("name", ["uniform", "ftis", "dis"])
def test_cuda_step_matches_cpu_step_without_syncs(name, mode):
    cuda, cpu = _step(name, mode, "cuda"), _step(name, mode, "cpu")
    torch.testing.assert_close(cuda[0], cpu[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda[1], cpu[1], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(cuda[2], cpu[2], rtol=1e-3, atol=1e-5)
