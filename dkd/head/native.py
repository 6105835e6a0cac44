"""Native (C) kernels of the head, compiled on first use and cached, with a torch fallback.

    from dkd.head import native
    if native.available():
        native.row_adam(weight, exp_avg, exp_avg_sq, step, rows, grad, lr, ...)

Why: on a host, the lazy row-sparse Adam step over a few hundred rows is ~15 small torch
passes (gather the moments, lerp, addcmul, sqrt, div, write them back), each paying its
dispatch and a trip through memory; one C loop reads and writes every element once
(226 rows of 512, timed alone: 0.56 ms -> 0.12 ms; the other kernels, see the README).

How: ``csrc/head.c`` is compiled with the system C compiler (``$CC``, else ``cc``) into
``$DKD_CACHE_DIR`` (default ``~/.cache/dkd``) under a name keyed by the source, the
compiler, its flags and this CPU, written atomically (a temporary file, then a rename), so
several ranks may build it at once. It is plain C with no torch headers (a second to build) and
is called through ctypes on the tensors' data pointers. Where there is no compiler, the
build fails, or ``DKD_NATIVE=0``, :func:`available` is False (:func:`status` says why)
and callers use their torch path; results agree to float rounding (tests check both).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("csrc") / "head.c"
_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
_lib: ctypes.CDLL | None = None
_why: str | None = None     # None: not tried yet; "" loaded; else the reason it is off


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC, or install cc/gcc)")
    src = _SRC.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256(src + version.encode() + _cpu_key().encode()
                         + " ".join(_FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DKD_CACHE_DIR", Path.home() / ".cache" / "dkd"))
    out = cache / f"head_{key}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            err = ""
            for march in (["-march=native"], []):    # some compilers lack -march=native
                res = subprocess.run([cc, *_FLAGS, *march, "-o", tmp, str(_SRC), "-lm"],
                                     capture_output=True, text=True, timeout=300)
                if res.returncode == 0:
                    break
                err = res.stderr.strip()[-500:]
            else:
                raise RuntimeError(f"{cc} failed to build {_SRC.name}: {err}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    P, I, D, N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for name, args, res in (
            ("dkd_row_adam", [P, P, P, P, I, I, P, I, P, P, I, P, P, P, I, D, D, D, D, D, N, N,
                              P, P, P, ctypes.c_float, ctypes.c_float], I),
            ("dkd_gather_dot", [P, I, P, P, I, P, I, I, I], N),
            ("dkd_gather_axpy", [P, P, I, P, I, P, I, I, I], N),
            ("dkd_sampled_loss", [P, P, P, I, P, I, P, I, I, I, D, D, P, P], None),
            ("dkd_topk_block", [P, I, I, I, I, I, P, P, P, P, P], None),
            ("dkd_topk_finish", [P, P, I, I, P, P], N),
            ("dkd_outside", [P, P, I, I, I, P, I, I, P], N),
            ("dkd_rank_draw", [P, P, P, I, I, I, P, P, I, P, P, I, D, P, P, P, P], N)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


_off = 0    # > 0 inside ``disabled()``


def available() -> bool:
    """Whether the native kernels are loaded (built on the first call) and not disabled."""
    global _lib, _why
    if _off:
        return False
    if _why is None:
        if os.environ.get("DKD_NATIVE", "1") == "0":
            _why = "disabled by DKD_NATIVE=0"
        else:
            try:
                _lib, _why = _build(), ""
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _why = str(e)
    return _lib is not None


@contextlib.contextmanager
def disabled():
    """Within this block every caller takes its torch path (tests compare the two; for a
    whole process, ``DKD_NATIVE=0``)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def status() -> str:
    """'native' when loaded, else 'torch (<reason>)'."""
    if _off:
        return "torch (disabled)"
    return "native" if available() else f"torch ({_why})"


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors: contiguous on the host, float32 (the
    int64 ids and slot maps aside)."""
    return all(t.device.type == "cpu" and t.is_contiguous()
               and t.dtype in (torch.float32, torch.int64) for t in tensors)


# Below this many elements a step stays on one thread: starting threads costs more.
_THREADED_ELEMENTS = 2 ** 18


def row_adam(weight, exp_avg, exp_avg_sq, step, rows, grad, lr: float, betas, eps: float,
             weight_decay: float, decoupled: bool, slot: torch.Tensor | None = None,
             factored=None, catchup=None) -> int:
    """One lazy Adam (decoupled: AdamW) step, in place, on the rows ``rows`` (n,) int64 of
    the (C, d) float32 ``weight`` and moments with ``grad`` (n, d), bumping ``step`` (C,)
    float32 per row; rows=None: every row (grad (C, d)). Returns the distinct rows updated.

    factored: optional (rows_f (n_f,), coef (n_f,), src (n_f,), x (·, d)): more gradient
    rows, coef[i] · x[src[i]] for row rows_f[i], never materialised. slot: (C,) int64
    scratch, required when rows repeat or ``factored`` is given: each distinct row's
    gradients are then summed (factored ones first, in order). Inputs are not modified.
    catchup: optional (last (C,) float32, clock, cap): each updated row's lr is scaled by
    min(clock - last[row], cap) and last[row] = clock.
    Callers check :func:`supports` on every tensor."""
    d = weight.shape[1]
    n_d = weight.shape[0] if rows is None else rows.numel()
    rows_f, coef, src, x = factored if factored is not None else (None,) * 4
    n_f = 0 if rows_f is None else rows_f.numel()
    if n_f and slot is None:
        raise ValueError("factored gradient rows need the slot map")
    n = n_d + n_f
    threads = torch.get_num_threads() if n * d >= _THREADED_ELEMENTS else 1
    scratch = None if slot is None else torch.empty(5 * n + 2, dtype=torch.int64)
    last, clock, cap = catchup if catchup is not None else (None, 0.0, 0.0)
    u = _lib.dkd_row_adam(
        weight.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), step.data_ptr(),
        weight.shape[0], d, _ptr(rows), n_d, grad.data_ptr(), _ptr(rows_f), n_f, _ptr(coef),
        _ptr(src), _ptr(x), 0 if x is None else x.shape[0], float(lr), float(betas[0]),
        float(betas[1]), float(eps), float(weight_decay), int(decoupled), threads, _ptr(slot),
        _ptr(scratch), _ptr(last), float(clock), float(cap))
    _ok(u, "rows", weight.shape[0])
    _written(weight, exp_avg, exp_avg_sq, step, *(() if last is None else (last,)))
    return u


def _ok(code: int, what: str, hi: int) -> None:
    """Raise for a kernel's -1 (an id out of range) or -2 (no memory); it wrote nothing."""
    if code == -2:
        raise MemoryError("native row update: no memory for its row buffers")
    if code < 0:
        raise IndexError(f"{what}: an id is outside [0, {hi})")


def _written(*tensors: torch.Tensor) -> None:
    """Bump the autograd version counters of tensors a kernel wrote through their data
    pointers, as an in-place torch op would: a backward that saved one of them (e.g. the
    full path's weight view) then raises instead of silently using the new values."""
    torch.autograd.graph.increment_version(tensors)


def _rows_of(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> tuple[int, int, int]:
    B, k = idx.shape
    if x.shape[0] != B or w.shape[1] != x.shape[1]:
        raise ValueError(f"idx (B, k), x (B, d) and w (C, d) must agree, got "
                         f"{tuple(idx.shape)}, {tuple(x.shape)}, {tuple(w.shape)}")
    return B, k, x.shape[1]


def gather_dot(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, k) with [b, j] = x_b · w[idx[b, j]], reading the rows of w in place.
    x (B, d), w (C, d) float32, idx (B, k) int64, all contiguous (:func:`supports`)."""
    B, k, d = _rows_of(w, idx, x)
    out = x.new_empty((B, k))
    _ok(_lib.dkd_gather_dot(out.data_ptr(), k, x.data_ptr(), w.data_ptr(), w.shape[0],
                            idx.data_ptr(), B, k, d), "idx", w.shape[0])
    return out


def gather_axpy_(out: torch.Tensor, coef: torch.Tensor, w: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    """out[b] += Σ_j coef[b, j] · w[idx[b, j]], in place; out (B, d), coef (B, k) with unit
    column stride (a column slice of a contiguous gradient is fine)."""
    B, k, d = _rows_of(w, idx, out)
    if coef.shape != (B, k) or (k > 1 and coef.stride(1) != 1):
        raise ValueError(f"coef must be (B, k) = {(B, k)} with unit column stride, got "
                         f"{tuple(coef.shape)}, strides {coef.stride()}")
    _ok(_lib.dkd_gather_axpy(out.data_ptr(), coef.data_ptr(), coef.stride(0), w.data_ptr(),
                             w.shape[0], idx.data_ptr(), B, k, d), "idx", w.shape[0])
    _written(out)
    return out


def _row_view(x: torch.Tensor | None, shape, dtype) -> tuple[torch.Tensor | None, int]:
    """x broadcast to ``shape`` (B, n) as a tensor with unit column stride and its row
    stride (0 when one row is broadcast: it is never copied to (B, n))."""
    if x is None:
        return None, 0
    x = x.to(dtype).expand(shape)
    if x.stride(1) != 1 or (x.stride(0) not in (0, shape[1])):
        x = x.contiguous()
    return x, x.stride(0)


def sampled_loss(z: torch.Tensor, a: torch.Tensor, o: torch.Tensor, keep, tgt, T: float,
                 lam: float) -> tuple[torch.Tensor, float, float]:
    """(dL/dz (B, n), kd mean, ce mean) of the one-process sampled mixed loss, forward and
    gradient in one pass (see csrc/head.c); o / keep / tgt broadcast to z's shape, keep /
    tgt may be None. z must be contiguous float32 (:func:`supports`)."""
    B, n = z.shape
    a = a.to(torch.float32).expand(B, n).contiguous()    # expand raises unless it broadcasts
    o, ldo = _row_view(o, (B, n), torch.float32)
    keep, ldk = _row_view(keep, (B, n), torch.bool)
    tgt, ldt = _row_view(tgt, (B, n), torch.bool)
    grad = torch.empty_like(z)
    out = (ctypes.c_double * 2)()
    _lib.dkd_sampled_loss(z.data_ptr(), a.data_ptr(), o.data_ptr(), ldo,
                          None if keep is None else keep.data_ptr(), ldk,
                          None if tgt is None else tgt.data_ptr(), ldt, B, n, float(T),
                          float(lam), grad.data_ptr(), out)
    return grad, out[0], out[1]


class RunningTopK:
    """The per-row top-k and log-sum-exp of a wide (B, C) matrix fed a block of columns at
    a time (see csrc/head.c, 4): ``update(block, col0)`` with a (B, n) float32 block whose
    columns are classes [col0, col0 + n) (any row stride, unit column stride); ``result()``
    the (values, ids) (B, k), values descending (equal values: the smaller id first) and
    the row log-sum-exp (B,), once at least k columns were fed. The values are
    ``torch.topk``'s; the log-sum-exp agrees with ``torch.logsumexp`` to float rounding."""

    def __init__(self, B: int, k: int):
        self.k, self.seen = k, 0
        # Candidate keys (see csrc/head.c), 16 spare slots for whole-vector stores.
        self.keys = torch.empty(B, 2 * k + 16, dtype=torch.int64)
        self.count = torch.zeros(B, dtype=torch.int64)
        self.thr = torch.full((B,), float("-inf"))
        self.lse_m = torch.full((B,), float("-inf"))
        self.lse_s = torch.zeros(B, dtype=torch.float64)

    def update(self, block: torch.Tensor, col0: int) -> None:
        B, n = block.shape
        if B != self.count.shape[0] or block.dtype != torch.float32 \
                or block.device.type != "cpu" or (n > 1 and block.stride(1) != 1):
            raise ValueError(f"block must be ({self.count.shape[0]}, n) float32 on the host "
                             f"with unit column stride, got {tuple(block.shape)} {block.dtype}")
        _lib.dkd_topk_block(block.data_ptr(), block.stride(0), B, n, int(col0), self.k,
                            self.keys.data_ptr(), self.count.data_ptr(), self.thr.data_ptr(),
                            self.lse_m.data_ptr(), self.lse_s.data_ptr())
        self.seen += n

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.seen < self.k:
            raise ValueError(f"top-{self.k} of only {self.seen} columns")
        B = self.count.shape[0]
        vals, ids = torch.empty(B, self.k), torch.empty(B, self.k, dtype=torch.int64)
        _ok(_lib.dkd_topk_finish(self.keys.data_ptr(), self.count.data_ptr(), B, self.k,
                                 vals.data_ptr(), ids.data_ptr()), "ids", 0)
        lse = (self.lse_m.double() + self.lse_s.log()).float()
        return vals, ids, lse


def outside(ex: torch.Tensor, extra: torch.Tensor, num_classes: int,
            i: torch.Tensor) -> torch.Tensor:
    """(B, m) int64: the i[b, j]-th (0-based) class of [0, C) not among row b's excluded
    ids ``ex`` (B, K) and ``extra`` (B,) (ids in [0, C]; C is a placeholder that excludes
    nothing); i is (B, m) or (m,) int64, each entry < C − #excluded. See csrc/head.c, 5."""
    B, K = ex.shape
    ex, extra = ex.contiguous(), extra.contiguous()
    if extra.shape != (B,):
        raise ValueError(f"extra must be (B,) = ({B},), got {tuple(extra.shape)}")
    i = i.contiguous()
    m = i.shape[-1]
    ldi = m if i.dim() == 2 else 0
    if i.dim() == 2 and i.shape[0] != B:
        raise ValueError(f"i must be (B, m) with B = {B} or (m,), got {tuple(i.shape)}")
    out = torch.empty(B, m, dtype=torch.int64)
    _ok(_lib.dkd_outside(ex.data_ptr(), extra.data_ptr(), B, K, int(num_classes),
                         i.data_ptr(), ldi, m, out.data_ptr()), "ex", num_classes + 1)
    return out


def rank_draw(ids, y, pos_y, num_classes: int, bins, cum, kd, u_tail, shift: float):
    """A rank proposal's per-sample draw in one pass (csrc/head.c, 5): ids (B, K) the
    rows' top-K ranked, y / pos_y (B,) targets and their top-K column (K: absent), bins /
    cum (Kb + 1,) float64 rank masses and their cumulative sum, kd (m,) the shared ranks,
    u_tail (m,) float64 uniforms of the tail draws, shift = log Z − log m. Returns
    (classes, columns (B, m) int64, o (B, m) float32, in_tail (B, m) bool)."""
    B, K = ids.shape
    m = kd.numel()
    ids, y, pos_y = ids.contiguous(), y.long().contiguous(), pos_y.contiguous()
    bins, cum = bins.contiguous(), cum.contiguous()
    kd, u_tail = kd.contiguous(), u_tail.contiguous()
    if bins.dtype != torch.float64 or cum.dtype != torch.float64 or u_tail.dtype != torch.float64:
        raise ValueError("bins, cum and u_tail must be float64")
    cls, col = torch.empty(B, m, dtype=torch.int64), torch.empty(B, m, dtype=torch.int64)
    o, tail = torch.empty(B, m), torch.empty(B, m, dtype=torch.uint8)
    _ok(_lib.dkd_rank_draw(ids.data_ptr(), y.data_ptr(), pos_y.data_ptr(), B, K,
                           int(num_classes), bins.data_ptr(), cum.data_ptr(),
                           bins.numel() - 1, kd.data_ptr(), u_tail.data_ptr(), m, float(shift),
                           cls.data_ptr(), col.data_ptr(), o.data_ptr(), tail.data_ptr()),
        "ids", num_classes)
    return cls, col, o, tail.bool()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


__all__ = ["available", "status", "supports", "disabled", "row_adam", "gather_dot",
           "gather_axpy_", "sampled_loss", "RunningTopK", "outside", "rank_draw"]
