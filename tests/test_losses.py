"""Softmax primitives, full KD, mix, PDBS: against torch references and a 2-rank gloo run."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dkd.losses.pdbs import pdbs_loss, pdbs_select
from dkd.losses.sampled import sampled_kd_loss, sampled_kd_terms
from dkd.losses.softmax import full_kd_terms, mix, softmax_ce, softmax_probs, target_onehot
from dkd.losses.targets import kd_target
from dkd.sampling.proposals import teacher_ranking



def _data(B=5, C=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    a = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return z, a, y


def test_softmax_ce_matches_cross_entropy_with_soft_targets():
    z, a, _ = _data()
    p = torch.softmax(a, -1)
    ours = softmax_ce(z, p)
    ref = F.cross_entropy(z, p, reduction="none")
    torch.testing.assert_close(ours, ref)


def test_softmax_ce_mask_drops_columns():
    z, a, _ = _data()
    keep = torch.ones(z.shape[1], dtype=torch.bool)
    keep[[2, 5]] = False
    p = torch.softmax(a[:, keep], -1)
    p_full = torch.zeros_like(z)
    p_full[:, keep] = p
    p_full[:, ~keep] = 0.3            # garbage on masked columns must be ignored
    ours = softmax_ce(z, p_full, mask=keep)
    torch.testing.assert_close(ours, F.cross_entropy(z[:, keep], p, reduction="none"))
    probs = softmax_probs(z, mask=keep)
    assert torch.all(probs[:, ~keep] == 0)
    torch.testing.assert_close(probs[:, keep], torch.softmax(z[:, keep], -1))


def test_softmax_probs_matches_softmax():
    z, _, _ = _data()
    torch.testing.assert_close(softmax_probs(z), torch.softmax(z, -1))


def test_full_kd_terms_match_kl_div_and_cross_entropy():
    z, a, y = _data()
    T = 3.0
    p = kd_target(a, T)
    terms = full_kd_terms(z, p, y, T)
    kl = F.kl_div(F.log_softmax(z / T, -1), p, reduction="none").sum(-1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(terms["kd"], kl + entropy)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(z, y, reduction="none"))


def test_kd_gradient_is_q_minus_p_over_T():
    z, a, y = _data()
    T = 2.5
    z.requires_grad_(True)
    p = kd_target(a, T)
    full_kd_terms(z, p, None, T)["kd"].sum().backward()
    torch.testing.assert_close(z.grad, (torch.softmax(z.detach() / T, -1) - p) / T)


def test_mix_is_lambda_T2_kd_plus_one_minus_lambda_ce():
    kd = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ce = torch.tensor([0.5, 0.25, 4.0], dtype=torch.float64)
    out = mix({"kd": kd, "ce": ce}, lam=0.7, T=4.0)
    torch.testing.assert_close(out["loss"], 0.7 * 16 * kd.mean() + 0.3 * ce.mean())
    valid = torch.tensor([True, False, True])
    out = mix({"kd": kd, "ce": ce}, lam=0.7, T=4.0, valid=valid)
    assert abs(float(out["loss"]) - (0.7 * 16 * 2.0 + 0.3 * 2.25)) < 1e-12
    assert set(out) == {"loss", "kd", "ce"}
    assert torch.isnan(mix({"kd": kd}, lam=1.0, T=2.0)["ce"])


def test_bad_arguments_raise():
    z, a, y = _data()
    with pytest.raises(ValueError, match="temperature"):
        full_kd_terms(z, torch.softmax(a, -1), y, T=0.0)
    with pytest.raises(ValueError, match="lam"):
        mix({"kd": z[:, 0], "ce": z[:, 0]}, lam=1.5, T=1.0)
    with pytest.raises(ValueError, match="ce"):
        mix({"kd": z[:, 0]}, lam=0.5, T=1.0)
    with pytest.raises(ValueError, match="k must"):
        pdbs_select(z, a, y, k=z.shape[1], T=1.0)
    with pytest.raises(ValueError, match="k must"):
        pdbs_select(z, a, y, k=0, T=1.0)
    with pytest.raises(ValueError, match="temperature"):
        pdbs_select(z, a, y, k=3, T=-1.0)


def test_target_onehot_outside_block_is_zero():
    y = torch.tensor([0, 4, 7])
    oh = target_onehot(y, num_cols=4, col_start=4)
    assert oh.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]


def test_pdbs_selects_largest_disagreement_with_target():
    z, a, y = _data(B=4, C=20)
    T, k = 2.0, 5
    ss, ranks = pdbs_select(z, a, y, k, T)
    assert ss.classes.shape == (4, k) and torch.equal(ss.classes[:, 0], y)
    diff = (torch.softmax(a / T, -1) - torch.softmax(z / T, -1)).abs()
    for b in range(4):
        rest = [c for c in diff[b].argsort(descending=True).tolist() if c != y[b]][: k - 1]
        assert set(ss.classes[b, 1:].tolist()) == set(rest)
    _, full_ranks = teacher_ranking(a)
    assert torch.equal(ranks, full_ranks.gather(1, ss.classes) + 1)
    assert torch.all(ss.log_correction == 0) and torch.all(ss.deterministic)


def test_pdbs_loss_is_kd_renormalised_over_the_set():
    z, a, y = _data(B=3, C=15)
    T, k = 3.0, 6
    out = pdbs_loss(z, a, y, k, T, lam=0.5)
    cls = out["classes"]
    zs, as_ = z.gather(1, cls), a.gather(1, cls)
    kd = F.cross_entropy(zs / T, torch.softmax(as_ / T, -1), reduction="none").mean()
    ce = F.cross_entropy(zs, torch.zeros(3, dtype=torch.long), reduction="none").mean()
    torch.testing.assert_close(out["loss"], 0.5 * T * T * kd + 0.5 * ce)
    assert out["ranks"].min() >= 1 and out["ranks"].max() <= 15


# ---- 2-process gloo: column shards must reproduce the single-process loss and grads ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        z, a, y = _data(B=6, C=13, seed=3)
        T = 2.0
        bounds = [0, 7, 13]                          # uneven split
        lo, hi = bounds[rank], bounds[rank + 1]
        zl = z[:, lo:hi].clone().requires_grad_(True)
        p = torch.softmax(a / T, -1)[:, lo:hi]
        terms = full_kd_terms(zl, p, y, T, group=dist.group.WORLD, col_start=lo)
        loss = mix(terms, 0.6, T)["loss"]
        ce_sm = softmax_ce(zl, torch.softmax(a, -1)[:, lo:hi], group=dist.group.WORLD)
        # the sampled estimator, with corrections, on the same column split
        o = torch.linspace(-0.5, 0.5, 13, dtype=torch.float64)[lo:hi]
        tgt = target_onehot(y, hi - lo, lo).bool()
        st = sampled_kd_terms(zl, a[:, lo:hi], o, T, tgt, group=dist.group.WORLD)
        fused = sampled_kd_loss(zl, a[:, lo:hi], o, T, 0.3, tgt, group=dist.group.WORLD)
        total = loss + ce_sm.sum() + st["kd"].sum() + st["ce"].sum() + fused["loss"]
        total.backward()
        torch.save({"loss": total.detach(), "grad": zl.grad, "lo": lo, "hi": hi},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_matches_single_process():
    z, a, y = _data(B=6, C=13, seed=3)
    T = 2.0
    z = z.clone().requires_grad_(True)
    loss = mix(full_kd_terms(z, torch.softmax(a / T, -1), y, T), 0.6, T)["loss"]
    ce_sm = softmax_ce(z, torch.softmax(a, -1))
    o = torch.linspace(-0.5, 0.5, 13, dtype=torch.float64)
    st = sampled_kd_terms(z, a, o, T, target_onehot(y, 13).bool())
    fused = sampled_kd_loss(z, a, o, T, 0.3, target_onehot(y, 13).bool())
    total = loss + ce_sm.sum() + st["kd"].sum() + st["ce"].sum() + fused["loss"]
    total.backward()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_shard_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        parts = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    for part in parts:
        torch.testing.assert_close(part["loss"], total.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part["grad"], z.grad[:, part["lo"]:part["hi"]],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 0.6, 0.0])
def test_fused_sampled_loss_equals_mix_of_terms(lam):
    """The closed-form autograd.Function gives mix(sampled_kd_terms) and its gradient,
    with per-row masks, corrections and a target column."""
    z, a, y = _data(B=5, C=9, seed=7)
    T = 3.0
    g = torch.Generator().manual_seed(1)
    o = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=g) > 0.3
    tgt = target_onehot(y, 9).bool()
    mask |= tgt                                   # the target column is always present
    o[~mask] = float("inf")                       # junk on masked columns must not leak
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ref = mix(sampled_kd_terms(z1, a, o, T, tgt, mask), lam, T)
    got = sampled_kd_loss(z2, a, o, T, lam, tgt, mask)
    torch.testing.assert_close(got["loss"], ref["loss"])
    for key in ("kd", "ce"):
        torch.testing.assert_close(got[key], ref[key], equal_nan=True)
    ref["loss"].backward()
    got["loss"].backward()
    torch.testing.assert_close(z2.grad, z1.grad)
    with pytest.raises(ValueError, match="target_cols"):
        sampled_kd_loss(z, a, o, T, 0.5, None, mask)
