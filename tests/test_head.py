import pytest
import torch

from dkd.head.head import ShardedHead
from dkd.head.shard import to_local

C, D, B = 11, 6, 4


def _heads(P, seed=0):
    return [ShardedHead(C, D, init_std=0.5, seed=seed, world_size=P, rank=s) for s in range(P)]


def test_init_is_independent_of_world_size():
    full = _heads(1)[0].weight
    for P in (2, 3):
        assert torch.equal(torch.cat([h.weight for h in _heads(P)]), full)
    big = ShardedHead(10_000, 4, world_size=3, rank=1)  # spans several init blocks
    ref = ShardedHead(10_000, 4).weight[big.start:big.end]
    assert torch.equal(big.weight, ref)


def test_weight_never_gets_a_dense_grad():
    head = _heads(1)[0]
    f = torch.randn(B, D, requires_grad=True)
    head.logits_sampled(f, torch.tensor([1, 3])).sum().backward()
    assert head.weight.grad is None and not head.weight.requires_grad
    assert head.last_path == "batch_shared"


def test_apply_grads_equals_dense_sgd_on_sharded_columns():
    """Two shards with per-shard sampled columns == one dense head with weight as a leaf."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(B, D, generator=gen)
    classes = torch.tensor([0, 4, 5, 9, 4, 10])
    up = torch.randn(B, classes.numel(), generator=gen)
    ref = _heads(1)[0].weight.clone().requires_grad_()
    ((feats @ ref.t())[:, classes] * up).sum().backward()
    ref_new = ref.detach() - 0.1 * ref.grad
    heads = _heads(2)
    for h in heads:
        opt = h.make_optimizer("sgd", lr=0.1, momentum=0.0)
        local, mask = to_local(classes, h.start, h.end)
        logits = h.logits_sampled(feats, local[mask])
        (logits * up[:, mask]).sum().backward()
        assert h.apply_grads(opt) == int(mask.sum())
    torch.testing.assert_close(torch.cat([h.weight for h in heads]), ref_new)


def test_apply_grads_merges_calls_and_full():
    head = _heads(1)[0]
    w0 = head.weight.clone()
    opt = head.make_optimizer("sgd", lr=1.0, momentum=0.0)
    f = torch.randn(B, D)
    head.logits_sampled(f, torch.tensor([2, 2])).sum().backward()
    head.logits_sampled(f, torch.tensor([[2, 5]] * B), path="gather_dot").sum().backward()
    head.apply_grads(opt)
    expected = w0.clone()
    expected[2] -= 3 * f.sum(0)
    expected[5] -= f.sum(0)
    torch.testing.assert_close(head.weight, expected)
    # A full call plus a sampled one: one dense step with both gradients.
    w1 = head.weight.clone()
    head.logits_full(f).sum().backward()
    head.logits_sampled(f, torch.tensor([0])).sum().backward()
    assert head.apply_grads(opt) == C
    expected = w1 - f.sum(0)
    expected[0] -= f.sum(0)
    torch.testing.assert_close(head.weight, expected)
    assert head.apply_grads(opt) == 0  # nothing pending


def test_apply_grads_rejects_stale_optimizer():
    head = _heads(1)[0]
    opt = head.make_optimizer("sgd")
    head.weight = head.weight.clone()
    with pytest.raises(ValueError, match="optimizer"):
        head.apply_grads(opt)


def _train_a_bit(heads, opts):
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        f = torch.randn(B, D, generator=gen)
        classes = torch.randint(0, C, (5,), generator=gen)
        for h, o in zip(heads, opts):
            local, mask = to_local(classes, h.start, h.end)
            h.logits_sampled(f, local[mask]).square().sum().backward()
            h.apply_grads(o)


@pytest.mark.parametrize("new_P", [1, 2, 3])
def test_reshard_round_trip(new_P):
    heads = _heads(2)
    opts = [h.make_optimizer("adamw", lr=0.1, weight_decay=0.01) for h in heads]
    _train_a_bit(heads, opts)
    pieces = [h.shard_state(o) for h, o in zip(heads, opts)]
    full_w = torch.cat([h.weight for h in heads])
    full_state = {k: torch.cat([o.state[k] for o in opts]) for k in opts[0].state}
    new = _heads(new_P, seed=99)
    new_opts = [h.make_optimizer("adamw") for h in new]
    for h, o in zip(new, new_opts):
        h.load_global(pieces, o)
    assert torch.equal(torch.cat([h.weight for h in new]), full_w)
    for k, v in full_state.items():
        assert torch.equal(torch.cat([o.state[k] for o in new_opts]), v)


def test_state_for_range_and_coverage_errors():
    heads = _heads(2)                       # [0, 6), [6, 11)
    piece = heads[0].state_for_range(2, 5)
    assert piece["weight"].shape == (3, D)
    with pytest.raises(ValueError, match="start, end"):
        heads[0].state_for_range(4, 8)
    target = _heads(1)[0]
    with pytest.raises(ValueError, match="cover"):
        target.load_global([heads[0].shard_state()])
    opt = target.make_optimizer("sgd")
    with pytest.raises(ValueError, match="kind"):
        target.load_global([h.shard_state(h.make_optimizer("adam")) for h in heads], opt)
