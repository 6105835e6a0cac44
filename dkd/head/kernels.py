"""Sampled-logit kernels for the class-sharded head: one interface, three paths.

    logits, handle = sampled_logits(features, weight, cols, path="auto")
    loss(logits).backward()
    rows, grad = handle.collect()        # (u,) local row ids, (u, d) their gradient

The head weight (C_local, d) never enters autograd as a leaf: that would allocate and
fill a dense (C_local, d) gradient every step, which is exactly the cost sampling removes.
Instead the GEMM paths gather the rows they need into a small leaf ``W_U = weight[U]``
(u, d) (InsightFace Partial FC does the same) whose ``.grad`` autograd fills, and the
gather path's custom backward writes the (u, d) row gradient into the handle itself. The
sparse row optimizer then updates those u rows of the weight in place.

Paths (none runs a collective; the distributed softmax reduces over columns later):

* ``batch_shared`` — cols (n,): one class set for the whole batch. One GEMM
  (B, d) @ (d, n). Duplicate ids in cols are kept as separate columns (the estimator
  counts draws); their row gradients are summed by the optimizer.
* ``union`` — cols (B, k) per sample: U = unique(cols), one GEMM (B, d) @ (d, |U|), then
  a gather to (B, k). Wins when samples share most of their classes (|U| << B·k).
* ``gather_dot`` — cols (B, k): logits[b, j] = φ_b · W[cols[b, j]] by a custom autograd
  Function that never keeps a (B, k, d) tensor: the forward gathers rows chunk-wise
  straight from the weight, and both backward products are ``embedding_bag`` sums (no
  B×k×d materialisation at all). Wins when samples share few classes (|U| ≈ B·k).
* ``hybrid`` (:func:`hybrid_logits`) — per-row columns (B, nd) by a gathered dot plus
  batch-shared columns (u,) by one GEMM: the hybrid estimator's [D_b | shared draws].
* ``auto`` — batch_shared for 1-D cols; for 2-D cols the cheaper of union / gather_dot
  under ``path_costs`` (flops + balance · bytes, documented there). The chosen path is
  ``handle.path``, for the caller to log.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dkd.head import native
from dkd.head.sparse_optim import factored_rows

PATHS = ("batch_shared", "union", "gather_dot")

# Machine balance in flop per byte: how many GEMM flops cost as much time as moving one
# byte through memory. 12 fits fp32 on one host core (see path_costs). Higher values
# favour the union path (GEMMs are cheap relative to gathers).
DEFAULT_BALANCE = 12.0

# Bytes of (rows, k, d) gathered per forward chunk of gather_dot. On a host, ~1 MiB stays
# in cache for the multiply-sum; on an accelerator, larger chunks mean fewer launches.
_CHUNK_BYTES = 2 ** 20
_CHUNK_BYTES_DEVICE = 64 * 2 ** 20


class RowGrad:
    """Handle to the gradient of the weight rows one logits call touched.

    rows:   (u,) long local row ids into the weight, or None for "all rows" (full path).
    path:   which kernel produced the logits (for logging).
    unique: True when ``rows`` has no duplicates (the optimizer may then skip coalescing).
    leaf:   (u, d) gathered rows whose ``.grad`` autograd fills (batch_shared, union,
            full); None for gather_dot, whose backward writes ``_grad`` itself.
    first:  optional (u,) long: entry i's row is entry first[i]'s and only first entries
            carry gradient (see SparseRowOptimizer.step).
    """

    def __init__(self, rows, path: str, unique: bool, leaf: torch.Tensor | None = None,
                 active: bool | None = None, touch: torch.Tensor | None = None,
                 first: torch.Tensor | None = None):
        self.rows, self.path, self.unique, self.leaf = rows, path, unique, leaf
        self.first = first
        self.active = leaf.requires_grad if active is None else active  # grad can arrive
        self._grad: torch.Tensor | None = None
        # touch: bool mask like ``rows`` (None: all). A sharded rank computes placeholder
        # columns on rows it does not own (masked out of the loss); their zero gradient must
        # not count as a touch, or the lazy optimizer would step those rows with stale
        # moments. A mask, not a compaction: shapes stay fixed.
        if touch is not None and rows is not None and touch.shape != rows.shape:
            raise ValueError(f"touch must have the shape of rows {tuple(rows.shape)}, got "
                             f"{tuple(touch.shape)}")
        self.touch = touch
        # hybrid: (rows_d (u,), grad_d (u, d), (rows_f, coef, src, x)) with rows =
        # [rows_f, rows_d]: the per-sample rows' gradients coef[i]·x[src[i]] kept factored
        self._split = None
        self._x_version: int | None = None

    @property
    def grad(self) -> torch.Tensor | None:
        if self.leaf is not None:
            return self.leaf.grad if self.leaf.requires_grad else None
        if self._split is not None:
            self._check_source()
            _, g_d, factored = self._split
            return torch.cat([factored_rows(factored), g_d])
        return self._grad

    def set_split(self, rows_d, grad_d, factored) -> None:
        """Record a backward's gradient as dense rows plus factored ones (see ``_split``);
        a second backward on the same handle materialises the sum. The factored rows are
        read later, at the update: their source x must not change in place before then
        (checked by its version counter)."""
        old = None if self._split is None and self._grad is None else self.grad
        self._split, self._x_version = (rows_d, grad_d, factored), factored[3]._version
        if old is not None:
            self._grad, self._split = old + self.grad, None

    def split(self):
        """(rows_d, grad_d, factored) for the optimizer to sum itself (rows = [factored
        rows, rows_d], the order of ``touch``), or None (no split gradient)."""
        if self._split is not None:
            self._check_source()
        return self._split

    def _check_source(self) -> None:
        if self._split[2][3]._version != self._x_version:
            raise RuntimeError("the features of a hybrid logits call were modified in place "
                               "between its backward and the head update")

    def collect(self):
        """(rows, grad (u, d)) after backward; None if no gradient reached these rows."""
        g = self.grad
        return None if g is None else (self.rows, g)

    def __repr__(self) -> str:
        u = "all" if self.rows is None else self.rows.numel()
        return f"RowGrad(path={self.path!r}, rows={u}, unique={self.unique})"


def _leaf(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(u, d) copy of the given rows, a fresh autograd leaf when grad mode is on."""
    w = weight.detach().index_select(0, rows)
    return w.requires_grad_(torch.is_grad_enabled())


def unique_rows(cols: torch.Tensor, with_inverse: bool = True):
    """Unique ids of ``cols`` with everything the per-sample kernels need, from ONE sort.

    Returns (U (u,) sorted unique ids,
             inv (shape of cols) index of each entry in U, or None without ``with_inverse``,
             order (n,) the sort permutation of cols.flatten(),
             starts (u,) offset of each id's first entry in sorted order).
    ``order``/``starts`` group the entries by row (a CSR layout), which gather_dot's
    row-gradient ``embedding_bag`` uses. On an accelerator this synchronises once (u is
    data-dependent).
    """
    flat = cols.reshape(-1)
    sorted_ids, order = torch.sort(flat)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    starts = new.nonzero().squeeze(1)
    inv = None
    if with_inverse:
        group = new.cumsum(0) - 1  # (n,) position in U of each sorted entry
        inv = torch.empty_like(group).scatter_(0, order, group).view(cols.shape)
    return sorted_ids.index_select(0, starts), inv, order, starts


class _GatherDot(torch.autograd.Function):
    """logits[b, j] = features[b] · weight[cols[b, j]], never holding a (B, k, d) tensor.

    Collectives: none in forward or backward (purely column-local).
    forward:  features (B, d), anchor () leaf, weight (C_local, d) detached, cols (B, k),
              order (n,), starts (u,), handle -> logits (B, k). Rows are gathered straight
              from the weight and multiplied in chunks of at most _CHUNK_BYTES (host) /
              _CHUNK_BYTES_DEVICE (accelerator); nothing of size B·k·d is kept.
    backward: grad (B, k) ->
              grad_features (B, d) = Σ_j g[b, j] weight[cols[b, j]]
                  (one embedding_bag, bags = samples);
              row gradient (u, d) = Σ_{(b, j): cols = U_i} g[b, j] φ_b
                  (one embedding_bag over φ, bags = unique rows from ``order``/``starts``),
                  written into ``handle`` (accumulated over repeated backwards).
    ``anchor`` is a 0-d leaf that only makes autograd call this backward even when the
    features need no gradient; it gets None. No (u, d) copy of the rows is made.
    """

    @staticmethod
    def forward(ctx, features, anchor, weight, cols, order, starts, handle):
        B, k = cols.shape
        d = features.shape[1]
        out = features.new_empty((B, k))
        budget = _CHUNK_BYTES if features.device.type == "cpu" else _CHUNK_BYTES_DEVICE
        step = max(1, budget // max(1, k * d * features.element_size()))
        for b0 in range(0, B, step):
            idx = cols[b0:b0 + step]
            w = weight.index_select(0, idx.reshape(-1)).view(idx.shape[0], k, d)
            # multiply-sum, not bmm: a batched matrix-VECTOR bmm is ~3x slower on a host.
            out[b0:b0 + step] = (w * features[b0:b0 + step].unsqueeze(1)).sum(-1)
        ctx.save_for_backward(features, weight, cols, order, starts)
        ctx.handle = handle
        return out

    @staticmethod
    def backward(ctx, grad):
        features, weight, cols, order, starts = ctx.saved_tensors
        grad = grad.contiguous()
        g_feat = None
        if ctx.needs_input_grad[0]:
            g_feat = F.embedding_bag(cols, weight, mode="sum", per_sample_weights=grad)
        if ctx.needs_input_grad[1]:
            sample_of = torch.div(order, cols.shape[1], rounding_mode="floor")  # (n,)
            g_rows = F.embedding_bag(sample_of, features, starts, mode="sum",
                                     per_sample_weights=grad.reshape(-1).index_select(0, order))
            h = ctx.handle
            h._grad = g_rows if h._grad is None else h._grad + g_rows
        return g_feat, None, None, None, None, None, None


def path_costs(B: int, k: int, d: int, u: int, balance: float = DEFAULT_BALANCE,
               itemsize: int = 4) -> dict[str, float]:
    """Cost model for the per-sample paths, in "GEMM-flop equivalents" (lower is faster).

    cost = GEMM flops + balance · bytes moved, forward + backward, where ``balance`` is the
    machine's GEMM flop rate over its memory bandwidth (flop per byte):
      union:      flops 6·B·u·d (three (B, d) x (d, u) GEMMs);
                  bytes (3·u·d + 4·B·u + 2·B·d)·itemsize (gather W_U and write its
                  gradient; write the (B, u) logits, scatter and read their gradient);
      gather_dot: no GEMM (its dot products are memory-bound);
                  bytes (2·B·k·d + 3·u·d)·itemsize (the forward gather and the
                  grad-features embedding_bag each read B·k rows; the row gradient is
                  written once, u·d, plus its allocation).
    Union wins when samples share classes heavily. At B=256, d=512, k=120 the model puts
    the crossover at |U| ≈ 15·k for balance 12 (measured on a 1-thread host: union 23.7 ms
    vs gather_dot 25.1 ms at |U| = 16·k; 4.9 vs 15.5 ms at |U| = k; 383 vs 42 ms at
    |U| = 221·k, i.e. distinct classes per sample).
    """
    union = 6.0 * B * u * d + balance * itemsize * (3.0 * u * d + 4.0 * B * u + 2.0 * B * d)
    gather = balance * itemsize * (2.0 * B * k * d + 3.0 * u * d)
    return {"union": union, "gather_dot": gather}


def default_balance(device: torch.device) -> float:
    """Machine balance (flop/byte) for ``path_costs``: measured on a host; an estimate on
    an accelerator, where tensor-core GEMMs raise it (H100: ~400 TFLOP/s TF32 over
    3.35 TB/s ≈ 120; we take 60 to allow for gathers reaching ~half the bandwidth)."""
    return DEFAULT_BALANCE if device.type == "cpu" else 60.0


def _check(features: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must have shape (B, d), got {tuple(features.shape)}")
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must have shape (C_local, {features.shape[1]}), "
                         f"got {tuple(weight.shape)}")
    if cols.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cols must be an integer tensor of local row ids, got {cols.dtype}")
    if cols.dim() == 2 and cols.shape[0] != features.shape[0]:
        raise ValueError(f"cols must have shape (n,) or (B={features.shape[0]}, k), "
                         f"got {tuple(cols.shape)}")
    if cols.dim() not in (1, 2):
        raise ValueError(f"cols must have shape (n,) or (B, k), got {tuple(cols.shape)}")


def sampled_logits(features: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor,
                   path: str = "auto", balance: float | None = None, unique: bool = False,
                   touch: torch.Tensor | None = None, first: torch.Tensor | None = None):
    """Logits of the sampled classes and a handle to their row gradient.

    features: (B, d), may require grad; weight: (C_local, d), never receives ``.grad``;
    cols: (n,) local row ids shared by the batch, or (B, k) per-sample local row ids.
    balance: flop/byte of the machine for ``auto`` (None: ``default_balance``).
    unique: the caller promises that 1-D cols has no duplicates (e.g. a batch-shared
    sample set, whose columns are unique by construction); the handle then says so and
    the optimizer skips coalescing duplicate rows. Ignored for 2-D cols.
    first: 1-D cols only, see :class:`RowGrad`.
    Returns (logits (B, n) or (B, k), RowGrad). Ids are not range-checked (that would
    synchronise an accelerator); out-of-range ids fail inside index_select.
    """
    _check(features, weight, cols)
    if path not in PATHS + ("auto",):
        raise ValueError(f"path must be one of {PATHS + ('auto',)}, got {path!r}")
    cols = cols.long()
    if cols.dim() == 1:
        if path not in ("auto", "batch_shared"):
            raise ValueError(f"path {path!r} needs per-sample cols (B, k); got shape (n,)")
        leaf = _leaf(weight, cols)                      # (n, d)
        return features @ leaf.t(), RowGrad(cols, "batch_shared", unique=bool(unique), leaf=leaf,
                                            touch=touch, first=first)
    if path == "batch_shared":
        raise ValueError("path 'batch_shared' needs one shared class set cols (n,)")
    B, k = cols.shape
    U, inv, order, starts = unique_rows(cols, with_inverse=path != "gather_dot")
    if path == "auto":
        if balance is None:
            balance = default_balance(features.device)
        costs = path_costs(B, k, features.shape[1], U.numel(), balance, features.element_size())
        path = min(costs, key=costs.get)
    if k == 0:
        path = "union"                                  # nothing to gather
    if path == "union":
        if inv is None:
            inv = unique_rows(cols)[1]
        leaf = _leaf(weight, U)                         # (u, d)
        logits = (features @ leaf.t()).gather(1, inv)   # (B, u) -> (B, k)
        return logits, RowGrad(U, "union", unique=True, leaf=leaf)
    grad_on = torch.is_grad_enabled()
    handle = RowGrad(U, "gather_dot", unique=True, active=grad_on)
    anchor = features.new_zeros((), requires_grad=grad_on)
    logits = _GatherDot.apply(features, anchor, weight.detach(), cols, order, starts, handle)
    return logits, handle


class _HybridLogits(torch.autograd.Function):
    """[per-row dots | shared GEMM] straight from the weight rows, with a hand-written
    backward (about half the operations autograd would record for the same graph).

    Collectives: none in forward or backward (purely column-local).
    forward:  features (B, d), anchor () leaf, weight (C_local, d) detached, row_cols
              (B, nd), shared_cols (u,) local ids, handle -> logits (B, nd + u):
              logits[b, j] = φ_b · W[row_cols[b, j]] for j < nd, φ @ W[shared_cols]ᵀ after.
              Only the u shared rows are gathered (for the GEMM); the per-row dots and both
              of their backward products read the weight rows in place with the native
              kernels (dkd/head/native.py), or gather them once (B, nd, d) without.
    backward: grad (B, nd + u) = [g_r | g_s] ->
              grad_features = Σ_j g_r[b, j] W[row_cols[b, j]] + g_s W[shared_cols];
              row gradients, one per entry of [row_cols.flatten(), shared_cols] (the
              handle's rows, repeats included: the optimizer sums them): g_sᵀ φ (u, d) for
              the shared rows and g_r[b, j] φ_b for the per-row ones, kept factored as
              (coef g_r, source row b, φ) (``RowGrad.set_split``; the native optimizer
              never materialises them). ``anchor`` only makes
              autograd call this backward when the features need no gradient; it gets None.
    """

    @staticmethod
    def forward(ctx, features, anchor, weight, row_cols, shared_cols, handle):
        B, nd = row_cols.shape
        w_s = weight.index_select(0, shared_cols)
        ctx.handle = handle
        # Native: the per-row dots read the weight rows in place (no (B, nd, d) copy).
        ctx.native = native.supports(features, weight, row_cols) and native.available()
        if ctx.native:
            dots = native.gather_dot(features, weight, row_cols)
            ctx.save_for_backward(features, weight, row_cols, w_s)
        else:
            w_row = weight.index_select(0, row_cols.reshape(-1)).view(B, nd, weight.shape[1])
            ctx.save_for_backward(features, w_row, None, w_s)
            # nd = 1: a plain product-sum (a reduction over a size-1 dim is ~4x slower)
            dots = (torch.linalg.vecdot(w_row[:, 0], features).unsqueeze(1) if nd == 1
                    else (w_row * features.unsqueeze(1)).sum(-1))
        return torch.cat([dots, features @ w_s.t()], 1)

    @staticmethod
    def backward(ctx, grad):
        features, w, row_cols, w_s = ctx.saved_tensors   # w: the weight, or w_row (B, nd, d)
        B, d = features.shape
        nd = grad.shape[1] - w_s.shape[0]
        grad = grad.contiguous()
        g_r, g_s = grad[:, :nd], grad[:, nd:]
        g_feat = None
        if ctx.needs_input_grad[0]:
            g_feat = g_s @ w_s
            if ctx.native:
                native.gather_axpy_(g_feat, g_r, w, row_cols)
            else:   # Σ_j g_r[b, j] w_row[b, j]; nd = 1: a plain product, as in forward
                g_feat.add_(g_r * w[:, 0] if nd == 1 else torch.bmm(g_r.unsqueeze(1), w).squeeze(1))
        if ctx.needs_input_grad[1]:
            h = ctx.handle
            # source row of each per-row entry, b repeated nd times (an expand: no
            # data-dependent repeat_interleave)
            src = torch.arange(B, device=grad.device).unsqueeze(1).expand(B, nd).reshape(-1)
            # per-sample rows stay factored, g_r[b, j]·φ_b: the optimizer sums them into
            # their rows without a (B·nd, d) tensor ever being written
            h.set_split(h.rows[B * nd:], g_s.t() @ features,
                        (h.rows[:B * nd], g_r.reshape(-1), src, features))
        return g_feat, None, None, None, None, None


def hybrid_logits(features: torch.Tensor, weight: torch.Tensor, row_cols: torch.Tensor,
                  shared_cols: torch.Tensor, touch: torch.Tensor | None = None):
    """Logits of per-row columns and batch-shared columns: (B, nd + u), and their handle.

    row_cols (B, nd): local row ids of each sample's own columns (the hybrid estimator's
    D_b: target and top-t, so nd is small); shared_cols (u,): ids shared by the batch.
    The row part is a per-sample dot, the shared part one GEMM as ``batch_shared``
    (:class:`_HybridLogits`). The handle's rows are [row_cols.flatten(), shared_cols],
    repeats included (targets shared by samples): ``unique`` is False and the optimizer
    sums them. touch: optional bool mask over those rows (see RowGrad). No collective.
    """
    _check(features, weight, row_cols)
    _check(features, weight, shared_cols)
    if row_cols.dim() != 2 or shared_cols.dim() != 1:
        raise ValueError(f"row_cols must be (B, nd) and shared_cols (u,), got "
                         f"{tuple(row_cols.shape)} and {tuple(shared_cols.shape)}")
    row_cols, shared_cols = row_cols.long().contiguous(), shared_cols.long()
    grad_on = torch.is_grad_enabled()
    handle = RowGrad(torch.cat([row_cols.reshape(-1), shared_cols]), "hybrid", unique=False,
                     active=grad_on, touch=touch)
    anchor = features.new_zeros((), requires_grad=grad_on)
    logits = _HybridLogits.apply(features, anchor, weight.detach(), row_cols, shared_cols,
                                 handle)
    return logits, handle


@torch.no_grad()
def column_logits(features: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor):
    """Logits without gradient at given columns (a live teacher's exact logits at the
    sampled classes): cols (n,) -> (B, n) = features @ weight[cols].T; cols (B, n) ->
    [b, j] = features_b · weight[cols[b, j]] (the native gather-dot on a host: no (B, n, d)
    copy of the rows; else a batched matmul over the gathered rows)."""
    f = features.to(weight.dtype).contiguous()
    if cols.dim() == 1:
        return f @ weight.index_select(0, cols).T
    if native.supports(f, weight, cols) and native.available():
        return native.gather_dot(f, weight, cols.contiguous())
    rows = weight.index_select(0, cols.reshape(-1)).view(*cols.shape, -1)
    return torch.bmm(rows, f.unsqueeze(2)).squeeze(2)


def full_logits(features: torch.Tensor, weight: torch.Tensor):
    """Logits of every local class (B, C_local) and a handle to the dense (C_local, d) grad.

    The leaf is a detached *view* of the weight (no copy); it shares the weight's version
    counter, so updating the weight in place before backward raises instead of silently
    corrupting the features' gradient.
    """
    if features.dim() != 2 or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"features (B, d) and weight (C_local, d) must agree on d, got "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    leaf = weight.detach().requires_grad_(torch.is_grad_enabled())
    return features @ leaf.t(), RowGrad(None, "full", unique=True, leaf=leaf)


__all__ = ["PATHS", "DEFAULT_BALANCE", "RowGrad", "sampled_logits", "full_logits",
           "path_costs", "default_balance", "unique_rows", "hybrid_logits", "column_logits"]
