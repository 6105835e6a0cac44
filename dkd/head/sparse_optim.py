"""Row-sparse optimizer for the head shard: updates only the rows a step touched.

``SparseRowOptimizer(weight, kind)`` keeps its moments as (C_local, d) tensors allocated
once at construction, and ``step(rows, grad)`` reads, updates and writes back only those
rows: no (C_local, d) gradient is ever allocated or zeroed, so a step costs O(u·d), not
O(C·d).

Lazy semantics (as torch.optim.SparseAdam): a row that a step does not touch is left
bit-identical, weight and moments alike. Its momentum is not decayed, it does not keep
drifting under SGD momentum, and AdamW's decoupled decay is not applied to it. Adam keeps
a **per-row step count** t_i for its bias correction 1 − β^t_i, so the first time a row is
touched it gets Adam's first-step update, however late in training that is (SparseAdam's
global count would instead treat a fresh row's nearly-empty moments as fully warmed-up).
When every step touches the same rows, the result on those rows equals the dense
torch.optim (SGD with momentum / Adam / AdamW) run on those rows alone.

Catch-up (``catchup`` = cap > 0, Adam / AdamW): Adam's step has about the same size
whatever the gradient's scale, so a sampled row's larger importance weight does not make
up for its rarer updates: a row drawn with probability π moves π times as far per step as
under dense Adam. With catch-up, each row remembers the step (``clock``) it was last
updated and its step is scaled by min(steps since then, cap): the expected movement per
step is dense Adam's again (E[gap] = 1/π), the cap bounds one jump. SGD needs none (its
update is linear in the importance-weighted gradient, so it is already unbiased).

Duplicates in ``rows`` are allowed and their gradients are summed (the sampler keeps
repeated classes as columns). That is done in fixed shapes, without a sort or ``unique``:
a persistent (C_local,) slot map gives each entry the first entry naming its row
(scatter-amin), the gradients are index_add-ed there and read back by every repeat, so
all repeats compute the same new row and write back the same values. A ``touch`` mask
leaves placeholder entries' rows as they were. ``rows=None`` means a dense step.
"""
from __future__ import annotations

import torch

from dkd.head import native
from dkd.head.row_update import update_rows

KINDS = ("sgd", "adam", "adamw", "rmsprop")
_ROW_SCALARS = ("step", "last")     # (C_local,) state: bookkeeping, not (C_local, d) rows


class SparseRowOptimizer:
    """Lazy row-sparse SGD (momentum) / Adam / AdamW / RMSProp over a (C_local, d) weight.

    lr: learning rate (weight units per gradient unit); momentum: SGD momentum in [0, 1);
    betas: Adam decay rates in [0, 1); alpha: RMSProp's decay of the squared gradient;
    eps: Adam / RMSProp denominator floor; weight_decay: L2 for sgd/adam/rmsprop (added to
    the gradient), decoupled decay for adamw, applied to touched rows only. RMSProp follows
    torch.optim.RMSprop (centered=False), momentum included.
    chunk_rows: rows updated per pass when ``rows`` are unique (None: ~1 MiB per buffer on
    a host, all rows at once on an accelerator). catchup: cap of the catch-up factor (0:
    off; Adam / AdamW only; see the module docstring); ``step`` then needs ``clock``.
    """

    def __init__(self, weight: torch.Tensor, kind: str = "adamw", lr: float = 1e-3,
                 momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, nesterov: bool = False,
                 chunk_rows: int | None = None, alpha: float = 0.99, catchup: int = 0):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a (C_local, d) tensor")
        if weight.requires_grad:
            raise ValueError("weight must not require grad: the head updates it in place")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        if catchup and kind not in ("adam", "adamw"):
            raise ValueError(f"catchup applies to adam / adamw only (got kind {kind!r}): SGD's "
                             "update is already linear in the importance-weighted gradient")
        if not isinstance(catchup, int) or catchup < 0:
            raise ValueError(f"catchup must be an int >= 0, got {catchup!r}")
        self.weight, self.kind, self.lr = weight, kind, float(lr)
        self.momentum, self.betas, self.eps = float(momentum), tuple(map(float, betas)), float(eps)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)
        self.alpha = float(alpha)
        self.state: dict[str, torch.Tensor] = {}
        if kind == "rmsprop":
            self.state["square_avg"] = torch.zeros_like(weight)
        if kind in ("sgd", "rmsprop") and momentum > 0:
            self.state["momentum_buffer"] = torch.zeros_like(weight)
        if kind in ("adam", "adamw"):
            self.state["exp_avg"] = torch.zeros_like(weight)
            self.state["exp_avg_sq"] = torch.zeros_like(weight)
            # Per-row step counts, float32 like torch.optim's ``step`` (exact to 2^24).
            self.state["step"] = torch.zeros(weight.shape[0], dtype=torch.float32,
                                             device=weight.device)
        self.catchup = catchup
        if catchup:     # the clock of each row's last update (float32: exact to 2^24)
            self.state["last"] = torch.zeros(weight.shape[0], dtype=torch.float32,
                                             device=weight.device)
        self._clock = 0.0
        self._max_t, self._table = 0, None      # Adam's bias-correction table (by step t)
        # Slot map for coalescing duplicate rows without a sort; content is scratch.
        self._slot = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)
        self._pos: torch.Tensor | None = None   # cached arange for _first_entry
        self._scratch: torch.Tensor | None = None
        if chunk_rows is None and weight.device.type == "cpu":
            # ~1 MiB per buffer: stays in cache on a host. Accelerators: one chunk (every
            # extra chunk costs ~10 kernel launches, and there is no cache to keep).
            chunk_rows = max(1, 2 ** 20 // (weight.shape[1] * weight.element_size()))
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self._chunk = chunk_rows
        # Adam / AdamW on float32 host tensors step in one C pass (native.py) when it
        # builds. last_impl says which ran ("native"/"torch").
        self.last_impl: str | None = None

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, rows: torch.Tensor | None, grad: torch.Tensor, lr: float | None = None,
             unique: bool = False, factored=None, touch: torch.Tensor | None = None,
             first: torch.Tensor | None = None, clock: int | None = None) -> None:
        """Update ``rows`` (u,) of the weight with ``grad`` (u, d); rows=None: all rows.

        unique=True promises that ``rows`` has no duplicates and skips coalescing.
        first: optional (u,) long, entry i names the same row as entry first[i], and only
        the entries with first[i] == i carry gradient (a batch-shared sample set's masked
        repeats): a row's summed gradient is then grad[first], one gather instead of a
        segment sum (ignored with touch or factored rows).
        factored: optional (rows_f (n,), coef (n,), src (n,), x (·, d)), more gradient rows
        given as coef[i] · x[src[i]] for row rows_f[i] (the hybrid kernel's per-sample
        rows); summed with the others. touch: optional bool mask over [rows_f, rows]
        (factored first): a row is stepped iff some entry of it is touched (sharded runs
        compute placeholder columns on rows they must not step). Neither ``grad`` nor
        ``factored`` is modified. Every shape is fixed by the inputs' (no host reads).
        clock: the optimizer step (1, 2, ...), required with catch-up: the train loop's, so
        that a resumed run computes the same gaps.
        """
        lr = self.lr if lr is None else float(lr)
        if self.catchup:
            if clock is None:
                raise ValueError("an optimizer with catchup needs step(..., clock=STEP)")
            self._clock = float(clock)
        if rows is None:
            if factored is not None:
                raise ValueError("a dense step (rows=None) takes no factored rows")
            return self._dense_step(grad, lr)
        if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rows must be a 1-D integer tensor, got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        if grad.shape != (rows.shape[0], self.weight.shape[1]):
            raise ValueError(f"grad must have shape ({rows.shape[0]}, {self.weight.shape[1]}),"
                             f" got {tuple(grad.shape)}")
        n_f = 0
        if factored is not None:
            factored = self._check_factored(factored)
            unique, n_f = False, factored[0].numel()
        if touch is not None and touch.shape != (n_f + rows.numel(),):
            raise ValueError(f"touch must have shape ({n_f + rows.numel()},), got "
                             f"{tuple(touch.shape)}")
        if rows.numel() == 0 and n_f == 0:
            return
        rows, grad = rows.long(), grad.to(self.weight.dtype)
        if self._native_step(rows, grad, lr, unique, factored, touch):
            return
        if factored is not None:                # the torch path: materialise them
            rows = torch.cat([factored[0], rows])
            grad = torch.cat([factored_rows(factored), grad])
        self._sparse_step(rows, grad, lr, unique, touch,
                          first if factored is None and touch is None else None)

    def _sparse_step(self, rows, grad, lr, unique, touch, first=None) -> None:
        """Fixed-shape row step: repeats of a row share their summed gradient (a segment
        sum onto each row's first entry), every entry computes the same new row from the
        same old state, and all entries are written back (identical values, so the result
        does not depend on which write lands last). Untouched rows keep their old values."""
        if first is not None:
            grad, unique = grad.index_select(0, first), False
        elif not unique:
            rep = self._first_entry(rows)
            grad = torch.zeros_like(grad).index_add_(0, rep, grad).index_select(0, rep)
            if touch is not None:
                hits = torch.zeros(rows.shape, dtype=grad.dtype, device=rows.device)
                touch = hits.index_add_(0, rep, touch.to(grad.dtype)).index_select(0, rep) > 0
        coef = self._row_coefficients(rows, lr, touch)
        # Chunks keep the gathered rows cache-resident through the update's passes; rows
        # with repeats are stepped in one piece (a later chunk must not read a row an
        # earlier chunk already wrote).
        u = rows.numel()
        n = min(self._chunk or u, u) if unique else u
        for i in range(0, u, n):
            r, g, c, tm = rows, grad, coef, touch
            if n < u:                   # slicing costs ops; a single chunk needs none
                r, g = rows[i:i + n], grad[i:i + n]
                c = coef and tuple(x if x is None else x[i:i + n] for x in coef)
                tm = None if touch is None else touch[i:i + n]
            # Repeated rows take the gather/write-back form: an index_add of the step
            # would apply it once per repeat.
            work = self._gather(r, with_param=self._needs_param() or tm is not None
                                or not unique)
            old = None if tm is None else {k: v.clone() for k, v in work.items() if k != "denom"}
            update_rows(self, work, g, lr, c)
            if old is not None:
                keep = tm.unsqueeze(1)
                for k, v in old.items():
                    torch.where(keep, work[k], v, out=work[k])
            if "param" in work:
                self.weight.index_copy_(0, r, work["param"])
            elif c is not None:         # Adam without decay: add -lr·m/den to the rows
                self.weight.index_add_(0, r, work["denom"], alpha=-lr)
            for k, buf in work.items():
                if k in self.state:
                    self.state[k].index_copy_(0, r, buf)

    def _first_entry(self, rows: torch.Tensor) -> torch.Tensor:
        """(u,) index of the first entry of ``rows`` naming the same row (a scatter-amin
        into the persistent slot map: deterministic, no sort, never cleared)."""
        n = rows.numel()
        if self._pos is None or self._pos.numel() < n or self._pos.device != rows.device:
            self._pos = torch.arange(max(n, 1024), device=rows.device)
        self._slot.scatter_reduce_(0, rows, self._pos[:n], "amin", include_self=False)
        return self._slot.index_select(0, rows)

    def _dense_step(self, grad: torch.Tensor, lr: float) -> None:
        if grad.shape != self.weight.shape:
            raise ValueError(f"grad must have shape {tuple(self.weight.shape)} for a dense "
                             f"step, got {tuple(grad.shape)}")
        grad = grad.to(self.weight.dtype)
        if self._native_step(None, grad, lr):
            return
        coef = self._row_coefficients(None, lr)
        # The state tensors themselves are the working buffers, updated in row chunks
        # (slices are views): each chunk's passes stay in cache, and Adam's denominator
        # needs only a chunk-sized scratch instead of a fresh (C_local, d) tensor per step.
        n = self._chunk or self.weight.shape[0]
        denom = None
        if "exp_avg_sq" in self.state:
            denom = self.weight.new_empty((min(n, self.weight.shape[0]), self.weight.shape[1]))
        for i in range(0, self.weight.shape[0], n):
            work = {k: v[i:i + n] for k, v in self.state.items() if k not in _ROW_SCALARS}
            work["param"] = self.weight[i:i + n]
            if denom is not None:
                work["denom"] = denom[:work["param"].shape[0]]
            update_rows(self, work, grad[i:i + n], lr,
                         coef and tuple(c if c is None else c[i:i + n] for c in coef))

    def _check_factored(self, factored):
        rows_f, coef, src, x = factored
        n = rows_f.numel()
        if (rows_f.dim() != 1 or coef.shape != (n,) or src.shape != (n,) or x.dim() != 2
                or x.shape[1] != self.weight.shape[1]):
            shapes = [tuple(t.shape) for t in factored]
            raise ValueError(f"factored must be (rows (n,), coef (n,), src (n,), x (m, "
                             f"{self.weight.shape[1]})), got shapes {shapes}")
        return (rows_f.long(), coef.to(self.weight.dtype), src.long(), x.to(self.weight.dtype))

    def _native_step(self, rows: torch.Tensor | None, grad: torch.Tensor, lr: float,
                     unique: bool = True, factored=None, touch=None) -> bool:
        """Adam / AdamW on float32 host tensors: the whole step, duplicates summed, in one
        C pass over the rows (dkd/head/native.py), in place, no gathers. False where it
        does not apply (other kinds, dtypes or devices, lr = 0, kernels unavailable): the
        caller then runs the torch path, which gives the same result to float rounding."""
        if self.kind not in ("adam", "adamw") or lr == 0.0:
            return False
        st = self.state
        rows = None if rows is None else rows.contiguous()
        grad = grad.contiguous()
        if factored is not None:
            factored = tuple(t.contiguous() for t in factored)
        tensors = [self.weight, grad, st["exp_avg"], st["exp_avg_sq"], st["step"],
                   *([st["last"]] if self.catchup else [])]
        tensors += [t for t in (rows, *(factored or ())) if t is not None]
        if not native.supports(*tensors) or not native.available():
            return False
        if touch is not None:   # host tensors: compacting the touched entries costs no sync
            n_f = 0 if factored is None else factored[0].numel()
            keep_d = touch[n_f:]
            rows, grad = rows[keep_d].contiguous(), grad[keep_d].contiguous()
            if factored is not None:
                keep_f = touch[:n_f]
                factored = (factored[0][keep_f].contiguous(), factored[1][keep_f].contiguous(),
                            factored[2][keep_f].contiguous(), factored[3])
            unique = False
        native.row_adam(self.weight, st["exp_avg"], st["exp_avg_sq"], st["step"], rows, grad,
                        lr, self.betas, self.eps, self.weight_decay,
                        decoupled=self.kind == "adamw",
                        slot=None if unique else self._slot, factored=factored,
                        catchup=(st["last"], self._clock, float(self.catchup))
                        if self.catchup else None)
        self._max_t += 1                  # as _row_coefficients: an upper bound of every t
        self.last_impl = "native"
        return True

    def _row_coefficients(self, rows: torch.Tensor | None, lr: float, touch=None):
        """Adam only: bump the per-row step counts t of ``rows`` (None: all) and return the
        (u, 1) factors (a_t, e_t, gap) of ``update_rows`` (gap: catch-up, else None); None
        for SGD or lr = 0.

        torch.optim computes p -= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps) with
        bc = 1 − β^t, i.e. p -= lr · m / (sqrt(v) · a_t + e_t) with a_t = bc1 / sqrt(bc2)
        and e_t = bc1 · eps. Both depend on t only, so they come from a table indexed by t
        (computed in float64, as torch.optim does its bias math): two look-ups per step
        instead of a dozen small ops, which is what a step over a few hundred rows costs.
        """
        self.last_impl = "torch"
        if self.kind not in ("adam", "adamw"):
            return None
        step = self.state["step"]
        if rows is None:
            t = step.add_(1.0)
        else:  # repeats read the same count and write the same new one
            t = step.index_select(0, rows)
            t = t.add_(1.0) if touch is None else t.add_(touch.to(t.dtype))
            step.index_copy_(0, rows, t)
        self._max_t += 1                  # an upper bound of every t, without a sync
        if lr == 0.0:
            return None
        ab = self._bias_table().index_select(0, t.long())               # (u, 2)
        if not self.catchup:
            return ab[:, 0:1], ab[:, 1:2], None
        # Catch-up: lr · gap as den / gap (a_t, e_t divided), gap = steps since the last update.
        last = self.state["last"]
        old = last if rows is None else last.index_select(0, rows)
        gap = (self._clock - old).clamp_max_(float(self.catchup)).unsqueeze(1)
        new = torch.full_like(old, self._clock)
        if touch is not None:
            new = torch.where(touch, new, old)
        last.copy_(new) if rows is None else last.index_copy_(0, rows, new)
        ab = ab.to(gap.dtype) / gap
        return ab[:, 0:1], ab[:, 1:2], gap

    def _bias_table(self) -> torch.Tensor:
        """(n, 2) [a_t, e_t] for t < n (n >= the largest step count), grown by doubling."""
        if self._table is None or self._table.shape[0] <= self._max_t:
            n = max(1024, 2 * (self._max_t + 1))
            t = torch.arange(n, dtype=torch.float64)
            bc1, bc2 = 1.0 - self.betas[0] ** t, 1.0 - self.betas[1] ** t
            bc2[0] = 1.0                                   # t = 0 is never looked up
            self._table = torch.stack([bc1 / bc2.sqrt(), bc1 * self.eps], 1).to(
                dtype=self.weight.dtype, device=self.weight.device)
        return self._table

    def _needs_param(self) -> bool:
        """Whether the update reads the weight rows. Adam without weight decay does not:
        its step is added with index_add_ (cheaper than gathering and writing them back)."""
        return self.kind in ("sgd", "rmsprop") or self.weight_decay != 0.0

    def _gather(self, rows: torch.Tensor, with_param: bool = True) -> dict[str, torch.Tensor]:
        """Rows of the weight and of each (·, d) state tensor, copied into reused scratch.

        The scratch (n_buffers, cap, d) grows to the largest chunk seen (25% headroom) and is
        reused: a fresh (u, d) tensor per step costs its page faults on a host, where there
        is no caching allocator, and those cost more than the update itself.
        """
        u, d = rows.numel(), self.weight.shape[1]
        names = ["param"] + [k for k in self.state if k not in _ROW_SCALARS]
        if "exp_avg_sq" in self.state:
            names.append("denom")
        if self._scratch is None or self._scratch.shape[1] < u:
            # u may exceed C_local when rows repeat (e.g. summed micro-batches)
            cap = max(u, min(self.weight.shape[0], u + u // 4))
            self._scratch = None  # free the old one first
            self._scratch = self.weight.new_empty((len(names), cap, d))
        work = {n: self._scratch[i, :u] for i, n in enumerate(names)
                if with_param or n != "param"}
        for k in work:
            if k != "denom":
                torch.index_select(self.weight if k == "param" else self.state[k], 0, rows,
                                   out=work[k])
        return work

    def release_scratch(self) -> None:
        """Free the per-step scratch buffers (they are re-made on the next step)."""
        self._scratch = None

    # ---------------------------------------------------------------- state
    def hparams(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum,
                "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov, "alpha": self.alpha, "catchup": self.catchup}

    def state_dict(self) -> dict:
        """Hyperparameters and the (C_local, ...) state tensors (references, like torch)."""
        return {"hparams": self.hparams(), "state": dict(self.state)}

    def load_state_dict(self, sd: dict) -> None:
        h = sd["hparams"]
        if h["kind"] != self.kind:
            raise ValueError(f"state_dict kind {h['kind']!r} does not match {self.kind!r}")
        self.lr, self.momentum, self.betas = float(h["lr"]), float(h["momentum"]), tuple(h["betas"])
        self.eps, self.weight_decay = float(h["eps"]), float(h["weight_decay"])
        self.nesterov = bool(h.get("nesterov", False))
        self.alpha = float(h.get("alpha", 0.99))
        self._table = None                              # betas / eps may have changed
        self.load_rows_state(0, sd["state"])

    def rows_state(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Copies of the state of local rows [lo, hi) (for checkpoints keyed by class range)."""
        if not 0 <= lo <= hi <= self.weight.shape[0]:
            raise ValueError(f"lo, hi must satisfy 0 <= lo <= hi <= {self.weight.shape[0]}, "
                             f"got {lo}, {hi}")
        return {k: v[lo:hi].clone() for k, v in self.state.items()}

    @torch.no_grad()
    def load_rows_state(self, lo: int, state: dict[str, torch.Tensor]) -> None:
        """Write per-row state (as from ``rows_state``) into local rows [lo, lo + n)."""
        if set(state) != set(self.state):
            raise ValueError(f"state must have keys {sorted(self.state)} for kind "
                             f"{self.kind!r}, got {sorted(state)}")
        for k, v in state.items():
            n = v.shape[0]
            if lo < 0 or lo + n > self.state[k].shape[0] or v.shape[1:] != self.state[k].shape[1:]:
                raise ValueError(f"state[{k!r}] of shape {tuple(v.shape)} does not fit at row "
                                 f"{lo} of {tuple(self.state[k].shape)}")
            self.state[k][lo:lo + n].copy_(v)
        if "step" in state and state["step"].numel():
            self._max_t = max(self._max_t, int(state["step"].max()))


def factored_rows(factored) -> torch.Tensor:
    """The (n, d) gradient rows coef[i] · x[src[i]] of factored = (rows, coef, src, x)."""
    _, coef, src, x = factored
    return x.index_select(0, src).mul_(coef.unsqueeze(1))


__all__ = ["KINDS", "SparseRowOptimizer", "factored_rows"]
