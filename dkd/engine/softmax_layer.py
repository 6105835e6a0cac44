"""The softmax layer of one step: method dispatch over the class-sharded head.

Inputs are the *global* batch on every rank (features all-gathered with autograd, labels
and the teacher batch without); this rank holds the head rows [start, end). Every loss is
built from column blocks with the distributed log-sum-exp of dkd.losses.softmax, so the
same code is the single-process reference (group None) and the sharded run.

Full-softmax methods compute logits for all local classes. Sampled methods (uniform,
ftis, dis) take one sample set from :func:`dkd.sampling.draw.draw_sample_set`, keyed by
(seed, step): identical on all ranks without communication, on the device, in shapes
fixed by the settings. Each rank computes the columns of every sampled class, with the
classes it does not own as masked placeholders on its local row 0 (stratified draws are
already its own). So the sampled step — draw, logits, loss, backward, row update — has no
host synchronisation and no data-dependent shape. PDBS selects its classes with a global
top-k of |p - q| gathered from the shards.
"""
from __future__ import annotations

import contextlib

import torch

from dkd.config import MethodConfig, SAMPLED_METHODS
from dkd.dist.functional import all_reduce_sum, global_topk, group_rank, group_size, logsumexp
from dkd.engine.sync import check_sample_sync
from dkd.head.shard import shard_bounds
from dkd.losses import targets as tg
from dkd.losses.sampled import sampled_kd_loss
from dkd.losses.softmax import full_kd_terms, mix, softmax_probs
from dkd.sampling.draw import draw_sample_set
from dkd.sampling.laws import arange
from dkd.sampling.prior import StudentPrior
from dkd.sampling.proposals import Proposal, build_proposal, teacher_ranking
from dkd.sampling.refit import probe_ranks, refit
from dkd.sampling.rng import draw_key
from dkd.sampling.sample_set import SampleSet
from dkd.sampling.teacher_batch import BlockTeacher, TopKTeacher


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
                 total_steps: int, seed: int = 0, check_sync: bool = False,
                 prior: torch.Tensor | None = None):
        self.cfg, self.C, self.start, self.end, self.group = cfg, num_classes, start, end, group
        self.seed, self.check_sync = seed, check_sync
        self.proposal = build_method_proposal(cfg, total_steps)
        # The full-softmax target; a sampled method's occasional full step is its KD step.
        self.full_cfg = (cfg.model_copy(update={"name": "kd"}) if cfg.name in SAMPLED_METHODS
                         else cfg)
        self.workspace: dict = {}  # the sampler's slot map and cached index tensors
        # > 0: the engine hands sampled methods the teacher's top-K, not (B, C) logits.
        self.teacher_topk = (cfg.sampling_topk if cfg.name in SAMPLED_METHODS
                             and cfg.sampling_topk < num_classes else 0)
        self.world = group_size(group)
        self.bounds = shard_bounds(num_classes, self.world)
        # Sharded batch-shared sampling draws per rank (stratified) unless told otherwise.
        self.stratified = (self.world > 1 and cfg.mode == "batch_shared" and cfg.stratified
                           and cfg.name in SAMPLED_METHODS)
        # method.prior: the class prior π (C,) of the shared draws, with its CDF and weight.
        self.prior = None
        self.student_prior = None     # method.prior=student: a law the steps update
        if cfg.prior != "none" and self.stratified:
            raise ValueError("method.prior mixes into one global set of draws: on several "
                             "ranks set method.stratified=false")
        if cfg.prior == "student":
            self.student_prior = StudentPrior(num_classes, cfg.prior_decay)
        elif cfg.prior != "none":
            if prior is None or prior.shape != (num_classes,):
                raise ValueError(f"method.prior={cfg.prior!r} needs the class prior "
                                 f"({num_classes},), got {None if prior is None else tuple(prior.shape)}")
            pi = prior.double()
            self.prior = (pi, pi.cumsum(0), float(cfg.prior_weight))
        # Profiling hook: the engine sets this to its RegionTimer.region (null by default).
        self.region = lambda name: contextlib.nullcontext()

    def __call__(self, feats, head, y, teacher: TopKTeacher | None, teacher_weight,
                 step: int) -> dict:
        """feats (B, d) global batch; head: this rank's ShardedHead (records touched rows);
        y (B,); teacher: the batch's TopKTeacher or None (hard labels); teacher_weight
        (C, d_t) or None (KD-sim); step: the (micro-)step, which keys the draws."""
        lam, T = mixing(self.cfg)
        every = self.cfg.full_every
        if self.refit_due():
            with self.region("sampling"):
                self.refit(feats, head, y, teacher, T)
        if self.cfg.name in SAMPLED_METHODS and not (every and step % every == every - 1):
            out = self.sampled(feats, head, y, teacher, step, lam, T)
        elif self.cfg.name == "pdbs":
            out = self._pdbs(feats, head, y, teacher.dense(), lam, T)
        else:
            z = head.logits_full(feats)                              # (B, C_local)
            if isinstance(teacher, BlockTeacher):    # kd from a class-sharded teacher
                p = softmax_probs(teacher.block.double() / T, self.group).to(z.dtype)
            else:
                dense = None if teacher is None else teacher.dense()
                p = teacher_target(self.full_cfg, dense, teacher_weight, y, self.C)
                p = None if p is None else p[:, self.start:self.end]
            terms = full_kd_terms(z, p, y if lam < 1 else None, T, self.group, self.start)
            out = mix(terms, lam, T)
            out["n_sampled"] = self.C
        return out

    # -- adaptive DIS ----------------------------------------------------------------
    def refit_due(self) -> bool:
        """Whether this optimiser step probes (once, on its first micro-step)."""
        every, prop = self.cfg.dis_refit_every, self.proposal
        return bool(every) and (prop.step + 1) % every == 0 and prop.refit_at != prop.step

    def refit(self, feats, head, y, teacher: TopKTeacher, T: float):
        """Refit the DIS proposal from a PDBS probe of the batch's first rows; returns the
        fit (w, b1, b2). The probe's logits bypass the head's gradient bookkeeping."""
        R = min(self.cfg.dis_refit_rows, feats.shape[0])
        with torch.no_grad():
            z = feats[:R].detach() @ head.weight.t()                       # (R, C_local)
            ranks = probe_ranks(z, teacher.dense_rows(R), y[:R],
                                self.cfg.dis_refit_k or self.cfg.k, T, self.start, self.group)
        return refit(self.proposal, ranks, self.C, self.cfg.dis_refit_decay)

    # -- sampled methods -------------------------------------------------------------
    def draw(self, teacher: TopKTeacher, y: torch.Tensor, step: int):
        """The step's (SampleSet, teacher logits at its columns (B, n)): the one draw that
        training, the benchmark and the fidelity check share."""
        cfg = self.cfg
        shard = (self.bounds, group_rank(self.group)) if self.stratified else None
        s, a = draw_sample_set(teacher, y, self.proposal, cfg.k, mode=cfg.mode,
                               top_t=cfg.top_t, correction=cfg.correction,
                               key=draw_key(self.seed, step), shard=shard,
                               workspace=self.workspace, teacher_logits=not teacher.exact,
                               prior=self._prior_on(y.device))
        if teacher.exact:   # the teacher's own logits, not the top-K completion
            a = teacher.column_logits(s.classes)
        return s, a

    def _prior_on(self, device):
        """The prior tuple on the step's device (moved once; the student prior's law is
        rebuilt every step from its state: O(C) on the device, no host read)."""
        if self.student_prior is not None:
            return self.student_prior.law(self.cfg.prior_weight, device)
        if self.prior is not None and self.prior[0].device != device:
            pi, cum, beta = self.prior
            self.prior = (pi.to(device), cum.to(device), beta)
        return self.prior

    def sampled(self, feats, head, y, teacher, step: int, lam: float, T: float) -> dict:
        with self.region("sampling"):
            s, a = self.draw(teacher, y, step)
            if self.check_sync and not self.stratified:
                check_sample_sync(s, self.group, group_rank(self.group))
            sharded = self.world > 1
            local, own = (local_columns(s.classes, self.start, self.end) if sharded
                          else (s.classes, None))
        # batch_shared: o already carries MASKED where s.mask is False (masked_o below), so
        # the torch loss needs a mask only for the columns this shard does not own.
        shared = s.mode == "batch_shared"
        mask = s.mask
        if sharded:
            mask = own if shared or mask is None else own & mask
        tgt = None
        if s.mode == "batch_shared":
            z = head.logits_sampled(feats, local, touch=own & s.mask if sharded else None,
                                    first=None if sharded else s.first)
            if lam < 1:   # the kept column of row b's target, from the draw
                tgt = arange(s.num_columns, y.device, self.workspace) == s.target_col.unsqueeze(1)
                tgt = tgt & own if sharded else tgt
        else:
            nd = s.shared_from if s.mode == "hybrid" else s.num_columns
            touch = None
            if sharded:
                touch = torch.cat([own[:, :nd].reshape(-1), own[0, nd:]])
            z = head.logits_hybrid(feats, local[:, :nd], local[0, nd:], touch)
            if lam < 1:   # column 0 of D_b is the row's target
                tgt = arange(s.num_columns, y.device, self.workspace) == 0
                tgt = tgt.unsqueeze(0) if not sharded else tgt & own
        out = sampled_kd_loss(z, a, s.log_correction, T, lam, tgt, mask, self.group,
                              masked_o=shared and not sharded)
        if self.student_prior is not None:
            with self.region("sampling"):
                self._observe_student(s, z, mask, own)
        out["n_sampled"] = s.num_columns
        out["kernel_path"] = head.last_path
        return out

    def _observe_student(self, s: SampleSet, z, mask, own) -> None:
        """Feed the student prior the batch-mean student softmax q̄ at the shared columns.
        Collectives on a sharded head: the log-partition's all-reduces (max, sum of (B,))
        and one all-reduce SUM of q̄ (n_shared,), each rank contributing its own columns."""
        with torch.no_grad():
            zd = z.detach().double()
            x = zd - s.log_correction.double()        # terms of the sampled partition
            if mask is not None:
                x = torch.where(mask, x, float("-inf"))
            lse = logsumexp(x, self.group)                             # (B,)
            nd = s.shared_from if s.mode == "hybrid" else 0
            qbar = torch.exp(zd[:, nd:] - lse.unsqueeze(1)).mean(0)    # (n_shared,)
            if s.mode == "hybrid":
                classes = s.classes[0, nd:]
                valid = s.mask[:, nd:].any(0) if s.mask is not None else None
                own = None if own is None else own[0, nd:]
            else:
                classes, valid = s.classes, s.mask
            if own is not None:
                qbar = all_reduce_sum(torch.where(own, qbar, 0.0), self.group)
            if valid is None:
                valid = torch.ones_like(classes, dtype=torch.bool)
            self.student_prior.observe(classes, qbar, valid)

    # -- PDBS ------------------------------------------------------------------------
    def _pdbs(self, feats, head, y, teacher_logits, lam, T):
        z = head.logits_full(feats)                                  # (B, C_local)
        a_local = teacher_logits[:, self.start:self.end]
        with torch.no_grad():
            p = softmax_probs(a_local / T, self.group)
            q = softmax_probs(z.detach() / T, self.group)
            score = (p - q).abs()
            own_y = ((y >= self.start) & (y < self.end)).unsqueeze(1)
            at_y = torch.zeros_like(score, dtype=torch.bool).scatter_(
                1, (y - self.start).clamp(0, score.shape[1] - 1).unsqueeze(1), own_y)
            score = score.masked_fill(at_y, float("inf"))           # target always kept
            classes = global_topk(score, self.cfg.k, self.start, self.group)  # (B, k)
        local, own = local_columns(classes, self.start, self.end)
        zc, ac = z.gather(1, local), a_local.gather(1, local)
        o = torch.zeros_like(zc)
        tgt = ((classes == y.unsqueeze(1)) & own) if lam < 1 else None
        out = sampled_kd_loss(zc, ac, o, T, lam, tgt, own, self.group)
        ranks = teacher_ranking(teacher_logits)[1].gather(1, classes) + 1
        out["ranks"] = ranks
        out["n_sampled"] = self.cfg.k
        return out


def local_columns(classes: torch.Tensor, start: int, end: int):
    """(local row ids, ownership mask) of global class ids on the shard [start, end).

    Columns of classes other ranks own become placeholders on local row 0 (masked out of
    the loss, never counted as touches): the per-row kernels then compute logits against
    this shard's own rows only (plus row 0), not against every sampled row."""
    own = (classes >= start) & (classes < end)
    return torch.where(own, classes - start, 0), own
