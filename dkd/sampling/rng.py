"""Counter-based randomness: uniforms as a pure function of (seed, step, stream, index).

The sampler never holds a generator. A step's key is a host integer mixed from the run
seed, the step and a stream id (one per draw site, and one per rank for per-rank draws);
element i of a draw is a 32-bit hash of (key, i) computed with int64 tensor ops on the
data's device. So every rank, every resume, and CPU and CUDA alike get bit-identical
draws for the same inputs, with no communication, no generator state to checkpoint, and
no host round trip.

The hash is "lowbias32" (two xorshift-multiply rounds, a bijection on 32-bit words with
low avalanche bias), applied to i·φ + key (φ the 32-bit golden ratio, which spreads
consecutive counters). Products are taken in int64 and masked to 32 bits: two's-complement
wrap-around gives the same low 32 bits on every backend.
"""
from __future__ import annotations

import torch

from dkd.consts import constant, scalar

_M32 = 0xFFFFFFFF
_GOLD = 0x9E3779B9
_C1, _C2 = 0x7FEB352D, 0x846CA68B


def _mix_int(x: int) -> int:
    """lowbias32 on a host integer (the key schedule)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def draw_key(seed: int, step: int, stream: int = 0) -> int:
    """The 32-bit key of one (seed, step, stream): a host int, no tensor involved."""
    h = _mix_int(int(seed) * _GOLD + 0x632BE5AB)
    h = _mix_int(h ^ (int(step) & _M32))
    h = _mix_int(h ^ ((int(step) >> 32) * _GOLD))
    return _mix_int(h ^ (int(stream) * 0x85EBCA6B))


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def uniforms(key: int, shape, device, dtype=torch.float64) -> torch.Tensor:
    """Uniforms in (0, 1) of the given shape: (hash32(key, i) + 0.5) / 2³²."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = 1
    for s in shape:
        n *= s
    dev = torch.device(device)
    # Shape-only constants, built once: the counters i·φ mod 2³², and the 0-d offset that
    # maps a hash h to (h + 0.5) / 2³² in one kernel. So a draw is 13 kernels.
    ctr = constant(("ctr", n, dev), lambda: (torch.arange(n, device=dev, dtype=torch.int64)
                                             * _GOLD) & _M32)
    half = scalar(2.0 ** -33, dtype, dev)
    x = _mix((ctr + (int(key) & _M32)) & _M32)
    return torch.add(half, x, alpha=2.0 ** -32).view(shape)


def row_uniforms(key: int, rows: torch.Tensor, n: int, dtype=torch.float64) -> torch.Tensor:
    """(len(rows), n) uniforms in (0, 1): element (b, i) a hash of (key, rows[b], i), so a
    row's draws do not depend on which batch or process it is computed in."""
    rk = _mix((rows.long() * _GOLD + (int(key) & _M32)) & _M32)             # per-row key
    ctr = (torch.arange(n, device=rows.device, dtype=torch.int64) * _GOLD) & _M32
    x = _mix((ctr.unsqueeze(0) + rk.unsqueeze(1)) & _M32)
    return (x.to(dtype) + 0.5) * 2.0 ** -32


__all__ = ["draw_key", "uniforms", "row_uniforms"]
