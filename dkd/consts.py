"""Cached constant tensors of the sampled step (counters, scales, 0-d scalars).

A sampled step on a GPU is bound by its kernel count, so tensors that depend only on
shapes and settings are built once per device instead of once per step (``torch.where``
with a Python number, for one, makes a fresh 0-d tensor on every call). Under a
fake-tensor mode (the device checks) nothing is cached, so fake tensors never leak into
real runs or into one another.
"""
from __future__ import annotations

import torch

_CACHE: dict = {}
_LIMIT = 512


def constant(key, fn) -> torch.Tensor:
    """fn() memoised under ``key`` (which must name the device)."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return fn()
    t = _CACHE.get(key)
    if t is None:
        if len(_CACHE) > _LIMIT:
            _CACHE.clear()
        t = _CACHE[key] = fn()
    return t


def scalar(value, dtype, device) -> torch.Tensor:
    """A cached 0-d tensor holding ``value``."""
    dev = torch.device(device)
    return constant(("scalar", value, dtype, dev),
                    lambda: torch.full((), value, dtype=dtype, device=dev))


def values(vals, dtype, device) -> torch.Tensor:
    """A cached 1-d tensor of the host numbers ``vals`` (made on the host and copied once:
    ``torch.tensor(..., device=...)`` would bypass a fake mode on the meta device)."""
    dev, vals = torch.device(device), tuple(vals)
    return constant(("values", vals, dtype, dev),
                    lambda: torch.tensor(vals, dtype=dtype).to(dev))


__all__ = ["constant", "scalar", "values"]
