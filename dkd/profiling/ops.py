"""Counting what a step asks of a GPU: ATen operations and host synchronisations.

``with OpCounter() as c: step()`` records every ATen operation dispatched inside (a
``TorchDispatchMode``: it sees the operations the autograd engine runs in backward too).

* ``aten_ops``: operations that produce new data — on a GPU each is about one kernel
  launch. View operations (``func.is_view``: reshapes, slices, expands) launch nothing and
  are counted apart, in ``aten_views``.
* ``host_syncs``: operations among them that make a GPU's host wait for the device: scalar
  reads (ops tagged ``data_dependent_output``: ``.item()``, ``float(t)``, ``bool(t)``),
  outputs whose shape depends on the data (tagged ``dynamic_output_shape``: ``nonzero``,
  ``unique``, ``masked_select``; advanced indexing and ``index_put_`` only when an index is
  a bool mask), and copies from an accelerator to the host.

Counted on the host, on the torch path (``DKD_NATIVE=0``, the path a GPU takes).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DYN, _DATA = torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output
_BOOL_INDEXED = {"index.Tensor", "index_put_.default", "index_put.default"}


def _is_sync(func, args, kwargs) -> bool:
    name = f"{func._opname}.{func._overloadname}"
    if name in _BOOL_INDEXED:
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                   for t in idx if t is not None)
    if _DATA in func.tags or _DYN in func.tags:
        return True
    if func._opname == "_to_copy" and args:           # accelerator -> host
        return args[0].device.type != "cpu" and str(kwargs.get("device")) == "cpu"
    if func._opname == "copy_" and len(args) > 1:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active; see the module doc."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func._opname}.{func._overloadname}"
        if func.is_view:
            self.views += 1
        else:
            self.ops[name] += 1
            if _is_sync(func, args, kwargs):
                self.syncs[name] += 1
        return func(*args, **kwargs)

    def record(self) -> dict:
        return {"aten_ops": sum(self.ops.values()), "aten_views": self.views,
                "host_syncs": sum(self.syncs.values()), "sync_ops": dict(self.syncs),
                "top_ops": dict(self.ops.most_common(12))}


__all__ = ["OpCounter"]
