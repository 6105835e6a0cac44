"""The softmax layer of one step: method dispatch over the class-sharded head.

Inputs are the *global* batch on every rank (features all-gathered with autograd, labels
and teacher logits without); this rank holds the head rows [start, end). Every loss is
built from column blocks with the distributed log-sum-exp of dkd.losses.softmax, so the
same code is the single-process reference (group None) and the sharded run.

Full-softmax methods compute logits for all local classes. Sampled methods (uniform,
ftis, dis) draw one sample set from a generator seeded by (seed, step) — identical on all
ranks without communication — and each rank computes logits only for the sampled
classes it owns; the others are masked out of its block. PDBS selects its classes with a
global top-k of |p - q| gathered from the shards.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dkd.config import MethodConfig, SAMPLED_METHODS
from dkd.dist.functional import group_rank, group_size
from dkd.head.shard import shard_bounds
from dkd.losses import targets as tg
from dkd.losses.sampled import sampled_kd_loss
from dkd.losses.softmax import full_kd_terms, mix, softmax_probs
from dkd.sampling.proposals import Proposal, build_proposal, teacher_ranking
from dkd.sampling.sampler import SampleSet, sample_classes
from dkd.sampling.stratified import sample_stratified
from dkd.sampling.topk_sampler import TopKTeacher, sample_classes_topk, sample_stratified_topk


def build_method_proposal(cfg: MethodConfig, total_steps: int) -> Proposal | None:
    if cfg.name not in SAMPLED_METHODS:
        return None
    if cfg.name == "dis":
        return build_proposal("dis", w=cfg.dis_weight, b1=cfg.dis_b1, b2_start=cfg.dis_b2_start,
                              b2_end=cfg.dis_b2_end, total_steps=total_steps)
    if cfg.name == "ftis":  # the proposal matches the KD target softmax(a/T)
        return build_proposal("ftis", temperature=cfg.temperature)
    return build_proposal(cfg.name)


def teacher_target(cfg: MethodConfig, teacher_logits, teacher_weight, y, num_classes):
    """Full (B, C) target distribution of a full-softmax method (None for `hard`)."""
    T = cfg.temperature
    if cfg.name == "hard":
        return None
    if cfg.name == "ls":
        return tg.label_smoothing_target(y, num_classes, cfg.smoothing)
    if cfg.name == "kd":
        return tg.kd_target(teacher_logits, T)
    if cfg.name == "kd_pt":
        return tg.kd_pt_target(teacher_logits, y, T)
    if cfg.name == "kd_sim":
        return tg.kd_sim_target(teacher_weight, y, cfg.sim_temperature, cfg.sim_power)
    if cfg.name == "kd_pt_sim":
        return tg.kd_pt_sim_target(teacher_logits, teacher_weight, y, cfg.pt_sim_alpha, T,
                                   cfg.sim_temperature, cfg.sim_power)
    if cfg.name == "kd_topk":
        return tg.kd_topk_target(teacher_logits, cfg.k, T)
    raise ValueError(f"method.name {cfg.name!r} is not a full-softmax method")


def mixing(cfg: MethodConfig) -> tuple[float, float]:
    """(lam, T) of the mixed objective: hard labels only use CE; LS is a T = 1 target."""
    if cfg.name == "hard":
        return 0.0, 1.0
    if cfg.name == "ls":
        return 1.0, 1.0
    return cfg.lam, cfg.temperature


class SoftmaxLayer:
    """Computes the loss dict of one step; the head records the rows it touched."""

    def __init__(self, cfg: MethodConfig, num_classes: int, start: int, end: int, group,
                 total_steps: int, kernel_path: str = "auto"):
        self.cfg, self.C, self.start, self.end, self.group = cfg, num_classes, start, end, group
        self.proposal = build_method_proposal(cfg, total_steps)
        self.kernel_path = kernel_path
        self.workspace: dict = {}  # scratch the top-K sampler keeps across steps
        # > 0: the engine hands sampled methods the teacher's top-K, not (B, C) logits.
        self.teacher_topk = (cfg.sampling_topk if cfg.name in SAMPLED_METHODS
                             and cfg.sampling_topk < num_classes else 0)
        world = group_size(group)
        self.bounds = shard_bounds(num_classes, world)
        # Sharded batch-shared sampling draws per rank (stratified) unless told otherwise.
        self.stratified = (world > 1 and cfg.mode == "batch_shared" and cfg.stratified
                           and cfg.name in SAMPLED_METHODS)
        # Profiling hook: the engine sets this to its RegionTimer.region (null by default).
        self.region = lambda name: contextlib.nullcontext()

    def __call__(self, feats, head, y, teacher_logits, teacher_weight, generator) -> dict:
        """feats (B, d) global batch; head: this rank's ShardedHead (records touched rows);
        y (B,); teacher_logits (B, C) or None; teacher_weight (C, d_t) or None (KD-sim)."""
        lam, T = mixing(self.cfg)
        if self.cfg.name in SAMPLED_METHODS:
            out = self._sampled(feats, head, y, teacher_logits, generator, lam, T)
        elif self.cfg.name == "pdbs":
            out = self._pdbs(feats, head, y, teacher_logits, lam, T)
        else:
            z = head.logits_full(feats)                              # (B, C_local)
            p = teacher_target(self.cfg, teacher_logits, teacher_weight, y, self.C)
            p = None if p is None else p[:, self.start:self.end]
            terms = full_kd_terms(z, p, y if lam < 1 else None, T, self.group, self.start)
            out = mix(terms, lam, T)
            out["n_sampled"] = self.C
        return out

    # -- sampled methods -------------------------------------------------------------
    def _draw(self, teacher_logits, y, generator):
        """The step's sample set and the teacher logits at its columns, (B, n).

        With C > method.sampling_topk the engine passes the teacher as a TopKTeacher (its
        top-K per sample, computed where the teacher runs, and the log-sum-exp), with the
        KD-topk completion for the other classes: sampling then costs O(B K + B n), no
        B x C sort, and ranks beyond K are exchangeable, as in a top-K store.
        """
        cfg = self.cfg
        if isinstance(teacher_logits, TopKTeacher):
            t = teacher_logits
            if self.stratified:
                return sample_stratified_topk(t, y, self.proposal, cfg.k, self.bounds,
                                              group_rank(self.group), top_t=cfg.top_t,
                                              correction=cfg.correction, generator=generator,
                                              workspace=self.workspace)
            return sample_classes_topk(t, y, self.proposal, cfg.k, mode=cfg.mode,
                                       top_t=cfg.top_t, correction=cfg.correction,
                                       generator=generator, workspace=self.workspace,
                                       return_teacher=True)
        if self.stratified:
            s = sample_stratified(teacher_logits, y, self.proposal, cfg.k, self.bounds,
                                  group_rank(self.group), top_t=cfg.top_t,
                                  correction=cfg.correction, generator=generator)
        else:
            s = sample_classes(teacher_logits, y, self.proposal, cfg.k, mode=cfg.mode,
                               top_t=cfg.top_t, correction=cfg.correction, generator=generator)
        return s, s.gather(teacher_logits)

    def _sampled(self, feats, head, y, teacher_logits, generator, lam, T):
        with self.region("sampling"):
            s, a = self._draw(teacher_logits, y, generator)
            local, own = local_columns(s.classes, self.start, self.end)
            o = s.log_correction
        if s.mode == "hybrid":
            one = group_size(self.group) == 1
            out = hybrid_loss(feats, head, s, a, local, None if one else own, lam, T,
                              self.group)
            out["n_sampled"] = s.num_columns
            out["kernel_path"] = head.last_path
            return out
        if s.classes.dim() == 1:
            # batch_shared: keep only owned columns, so this rank's GEMM is (B, d)(d, n_s).
            keep = own.nonzero().squeeze(1)
            local, o, a = local[keep], o[keep], a[:, keep]
            classes = s.classes[keep].unsqueeze(0)
            mask = None
            o = o.unsqueeze(0).expand(len(y), -1)
        else:
            classes = s.classes
            mask = own if s.mask is None else (own & s.mask)
        # Only columns used by some row touch a row (placeholders of other ranks' classes
        # sit on local row 0, masked; see RowGrad.restrict).
        owned = None if s.mask is None and group_size(self.group) == 1 else mask
        z = head.logits_sampled(feats, local, self.kernel_path, owned=owned)
        tgt = (classes == y.unsqueeze(1)) if lam < 1 else None
        if tgt is not None and mask is not None:
            tgt = tgt & mask & s.deterministic
        out = sampled_kd_loss(z, a, o, T, lam, tgt, mask, self.group)
        out["n_sampled"] = s.num_columns
        out["kernel_path"] = head.last_path
        return out

    # -- PDBS ------------------------------------------------------------------------
    def _pdbs(self, feats, head, y, teacher_logits, lam, T):
        z = head.logits_full(feats)                                  # (B, C_local)
        a_local = teacher_logits[:, self.start:self.end]
        with torch.no_grad():
            p = softmax_probs(a_local / T, self.group)
            q = softmax_probs(z.detach() / T, self.group)
            score = (p - q).abs()
            own_y = (y >= self.start) & (y < self.end)
            rows = own_y.nonzero().squeeze(1)
            score[rows, y[rows] - self.start] = float("inf")        # target always kept
            classes = _global_topk(score, self.cfg.k, self.start, self.group)  # (B, k)
        local, own = local_columns(classes, self.start, self.end)
        zc, ac = z.gather(1, local), a_local.gather(1, local)
        o = torch.zeros_like(zc)
        tgt = ((classes == y.unsqueeze(1)) & own) if lam < 1 else None
        out = sampled_kd_loss(zc, ac, o, T, lam, tgt, own, self.group)
        ranks = teacher_ranking(teacher_logits)[1].gather(1, classes) + 1
        out["ranks"] = ranks
        out["n_sampled"] = self.cfg.k
        return out


def hybrid_loss(feats, head, s: SampleSet, a, local, own, lam: float, T: float, group) -> dict:
    """The mixed loss of a hybrid sample set [D_b | shared draws] on this rank's shard.

    local (B, n): local row ids of s.classes (placeholders on row 0, see local_columns);
    own (B, n) bool: which of them this rank holds, or None when it holds all (one shard). D_b columns are masked where
    another rank owns them; of the shared draws this rank keeps only those it owns, so
    its GEMM is (B, d)(d, u_local). a: teacher logits at s.classes (B, n).
    """
    nd, mask, o = s.shared_from, s.mask, s.log_correction
    if own is None:
        z = head.logits_hybrid(feats, local[:, :nd], local[0, nd:])
    else:
        keep = own[0, nd:].nonzero().squeeze(1) + nd
        cols = torch.cat([torch.arange(nd, device=keep.device), keep])
        mask = (own & mask).index_select(1, cols)
        z = head.logits_hybrid(feats, local[:, :nd], local[0, keep], row_owned=mask[:, :nd])
        o, a = o.index_select(1, cols), a.index_select(1, cols)
    tgt = None
    if lam < 1:   # column 0 of D_b is the target
        tgt = torch.zeros_like(mask)
        tgt[:, 0] = mask[:, 0]
    return sampled_kd_loss(z, a, o, T, lam, tgt, mask, group)


def local_columns(classes: torch.Tensor, start: int, end: int):
    """(local row ids, ownership mask) of global class ids on the shard [start, end).

    Columns of classes other ranks own become placeholders on local row 0 (masked out of
    the loss, never counted as touches): the per-row kernels then compute logits against
    this shard's own rows only (plus row 0), not against every sampled row."""
    own = (classes >= start) & (classes < end)
    return torch.where(own, classes - start, 0), own


def _global_topk(score: torch.Tensor, k: int, start: int, group) -> torch.Tensor:
    """Top-k columns per row over all shards: (B, C_local) local scores -> (B, k) global ids.

    Each rank proposes its local top-min(k, C_local); the candidates are all-gathered
    (B, P*k) and every rank selects the same global top-k.
    """
    kk = min(k, score.shape[1])
    val, idx = score.topk(kk, dim=1)
    idx = idx + start
    if group is not None and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        pad = k - kk
        if pad:
            val = torch.cat([val, val.new_full((val.shape[0], pad), -1.0)], 1)
            idx = torch.cat([idx, idx.new_zeros((idx.shape[0], pad))], 1)
        vals, idxs = [torch.empty_like(val) for _ in range(world)], [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(vals, val.contiguous(), group=group)
        dist.all_gather(idxs, idx.contiguous(), group=group)
        val, idx = torch.cat(vals, 1), torch.cat(idxs, 1)
    top = val.topk(k, dim=1).indices
    return idx.gather(1, top)
