"""The head steps that `dkd bench softmax` times (see dkd/bench.py for the harness).

One :class:`HeadBench` per (world size, class count) holds this rank's head shard, its
row-sparse Adam, the global batch's labels and top-K teacher, and this rank's slice of
the features. Each step function runs one complete head step and returns what it did:

* :meth:`HeadBench.full_step` — the project's full-KD path: features all-gathered,
  ``ShardedHead.logits_full`` (B, C_local), the teacher target softmax(a/T) over the
  dense (B, C) teacher (as ``SoftmaxLayer`` does), ``full_kd_terms`` + ``mix`` with the
  distributed log-sum-exp, backward, and ``apply_grads`` (SparseRowOptimizer's dense
  Adam over all C_local × d rows).
* :meth:`HeadBench.full_torch_step` — the same loss with the head as an ``nn.Parameter``
  and ``torch.optim.Adam`` (foreach), for reference.
* :meth:`HeadBench.sampled_step` — the training path itself: features all-gathered, then
  ``SoftmaxLayer.sampled`` (the one draw, ``draw_sample_set``, from the top-K teacher,
  the head's sampled logits, the fused sampled loss), backward, ``apply_grads`` (lazy
  Adam on the touched rows). The layer's "sampling" region is timed separately.
  :meth:`HeadBench.layer` builds the layer from the same ``MethodConfig`` as training.

Labels and teacher data are replicated on every rank (they are all-gathered upstream,
outside the head step); the features are all-gathered inside it, with autograd.
"""
from __future__ import annotations

import time

import torch

from dkd.dist.functional import gather_rows
from dkd.config import MethodConfig
from dkd.engine.softmax_layer import SoftmaxLayer
from dkd.head.head import ShardedHead
from dkd.head.shard import shard_bounds
from dkd.losses.sampled import sampled_kd_loss
from dkd.losses.softmax import full_kd_terms, mix
from dkd.losses.targets import kd_target
from dkd.sampling.proposals import build_proposal
from dkd.sampling.teacher_batch import TopKTeacher

TEMPERATURE, LAM = 4.0, 0.9      # the config defaults (method.temperature, method.lam)


def synthetic_topk_teacher(batch: int, num_classes: int, k: int, seed: int):
    """A replicated (TopKTeacher, y): K distinct ids per row (no C-sized work for large C),
    descending logits, 5-30 % of the teacher mass outside the top K, and the target at
    teacher rank 1 for ~80 % of the rows (a uniformly random class otherwise)."""
    g = torch.Generator().manual_seed(seed)
    C, K = num_classes, min(k, num_classes)
    if C <= 50_000:
        ids = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(batch)])
    else:
        ids = torch.randint(0, C, (batch, K), generator=g)
        while True:  # re-draw duplicates within a row (rare when K << C)
            srt, order = ids.sort(1)
            dup = torch.zeros_like(ids, dtype=torch.bool)
            dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
            if not bool(dup.any()):
                break
            pos = order[dup]
            rows = dup.nonzero()[:, 0]
            ids[rows, pos] = torch.randint(0, C, (rows.numel(),), generator=g)
    logits = torch.sort(torch.randn(batch, K, generator=g) * 2.0, 1, descending=True).values + 5.0
    if K < C:
        frac = 0.05 + 0.25 * torch.rand(batch, generator=g)
        lse = torch.logsumexp(logits, 1) - torch.log1p(-frac)
    else:
        lse = torch.logsumexp(logits, 1)
    y = torch.where(torch.rand(batch, generator=g) < 0.8, ids[:, 0],
                    torch.randint(0, C, (batch,), generator=g))
    return TopKTeacher(ids, logits, lse, C), y


def full_step_bytes(num_classes: int, batch: int, dim: int) -> int:
    """Estimated memory of full KD over all ranks, bytes (fp32): the C×d weight, its
    dense gradient, two Adam moments and Adam's denominator buffer (5·C·d), and about
    eight B×C tensors (dense teacher, target, logits, logits/T, exp, their gradients)."""
    return 4 * (5 * num_classes * dim + 8 * batch * num_classes)


class HeadBench:
    """This rank's head shard, optimizer and replicated batch for one class count."""

    def __init__(self, num_classes: int, batch: int, dim: int, teacher_topk: int, seed: int,
                 group=None, world: int = 1, rank: int = 0, device: str = "cpu"):
        self.C, self.B, self.d, self.group = num_classes, batch, dim, group
        self.world, self.rank = world, rank
        self.head = ShardedHead(num_classes, dim, group, init_std=0.01, seed=seed,
                                world_size=world, rank=rank, device=device)
        self.opt = self.head.make_optimizer("adam", lr=1e-3)
        self.start, self.end = self.head.start, self.head.end
        self.bounds = shard_bounds(num_classes, world)
        t, y = synthetic_topk_teacher(batch, num_classes, teacher_topk, seed + 1)
        self.teacher = TopKTeacher(t.ids.to(device), t.logits.to(device), t.lse.to(device),
                                   num_classes)
        self.y = y.to(device)
        self.teacher_rest = self.teacher.rest_logit()
        g = torch.Generator().manual_seed(seed + 2)
        feats = torch.randn(batch, dim, generator=g)
        rows = torch.arange(batch).tensor_split(world)[rank]
        self.local_feats = feats[rows].clone().to(device).requires_grad_(True)
        self.workspace: dict = {}
        self._dense_teacher = None
        self._torch_head = None

    def state_bytes(self) -> int:
        """Persistent bytes of this rank's head: weight, optimizer state, sampler scratch."""
        n = self.head.weight.numel() * self.head.weight.element_size()
        n += sum(t.numel() * t.element_size() for t in self.opt.state.values())
        n += self.opt._slot.numel() * self.opt._slot.element_size()
        return n + sum(t.numel() * t.element_size() for k, t in self.workspace.items()
                       if isinstance(k, tuple) and k[0] == "slot")

    def _features(self):
        self.local_feats.grad = None
        return gather_rows(self.local_feats, self.group, scale=float(self.world))

    # ------------------------------------------------------------ full KD
    def dense_teacher(self):
        if self._dense_teacher is None:   # built once, outside the timed step (the store)
            self._dense_teacher = self.teacher.dense()
        return self._dense_teacher

    def full_step(self) -> dict:
        feats = self._features()
        z = self.head.logits_full(feats)                                # (B, C_local)
        p = kd_target(self.dense_teacher(), TEMPERATURE)[:, self.start:self.end]
        terms = full_kd_terms(z, p, self.y, TEMPERATURE, self.group, self.start)
        mix(terms, LAM, TEMPERATURE)["loss"].backward()
        self.head.apply_grads(self.opt)
        return {"cols": self.C, "rows": self.end - self.start, "path": "full"}

    def full_torch_step(self) -> dict:
        if self._torch_head is None:
            w = torch.nn.Parameter(self.head.weight.clone())
            self._torch_head = (w, torch.optim.Adam([w], lr=1e-3))
        w, opt = self._torch_head
        feats = self._features()
        z = feats @ w.t()
        p = kd_target(self.dense_teacher(), TEMPERATURE)[:, self.start:self.end]
        terms = full_kd_terms(z, p, self.y, TEMPERATURE, self.group, self.start)
        mix(terms, LAM, TEMPERATURE)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"cols": self.C, "rows": self.end - self.start, "path": "full_torch"}

    def release_full(self) -> None:
        self._dense_teacher = None
        self._torch_head = None

    # ------------------------------------------------------------ sampled
    def _fresh_teacher(self) -> TopKTeacher:
        """The batch's teacher as a new object, as the engine hands it over: top-K ids,
        logits, lse and the per-sample completion logit (computed where the teacher runs,
        outside the head step)."""
        t = self.teacher
        return TopKTeacher(t.ids, t.logits, t.lse, t.num_classes, rest=self.teacher_rest)

    def layer(self, method: str, mode: str, k: int, total_steps: int = 10_000) -> SoftmaxLayer:
        """The training layer of a sampled method (config defaults, T = 4, lam = 0.9)."""
        cfg = MethodConfig(name=method, k=k, mode=mode, temperature=TEMPERATURE, lam=LAM)
        layer = SoftmaxLayer(cfg, self.C, self.start, self.end, self.group, total_steps,
                             seed=0)
        layer.workspace = self.workspace      # one slot map per rank, as in training
        return layer

    def sampled_step(self, layer: SoftmaxLayer, step: int) -> dict:
        """One training-path head step; returns what it did (sampling time, columns, rows,
        kernel)."""
        spent = []

        class _Clock:                          # the layer's "sampling" region, timed
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                spent.append(time.perf_counter() - self.t0)
        layer.region = lambda name: _Clock()
        feats = self._features()
        out = layer.sampled(feats, self.head, self.y, self._fresh_teacher(), step, LAM,
                            TEMPERATURE)
        out["loss"].backward()
        rows = self.head._pending[-1].rows.numel() if self.head._pending else 0
        self.head.apply_grads(self.opt)
        return {"sampling_s": sum(spent), "cols": out["n_sampled"], "rows": rows,
                "path": self.head.last_path}


def make_proposal(method: str, total_steps: int = 10_000):
    """The bench's proposal for a sampled method name (config defaults)."""
    if method not in ("uniform", "ftis", "dis"):
        raise ValueError(f"methods must be among uniform, ftis, dis (sampled) or full_torch, "
                         f"got {method!r}")
    if method == "dis":
        return build_proposal("dis", total_steps=total_steps)
    if method == "ftis":   # as SoftmaxLayer: the proposal matches the target softmax(a/T)
        return build_proposal("ftis", temperature=TEMPERATURE)
    return build_proposal(method)


def bound_of(num_classes: int, cols_per_row: float) -> float:
    """C/|S|: the flop ratio of full logits to sampled logits per sample row."""
    return num_classes / max(cols_per_row, 1.0)


__all__ = ["HeadBench", "synthetic_topk_teacher", "full_step_bytes", "make_proposal",
           "bound_of", "TEMPERATURE", "LAM"]
