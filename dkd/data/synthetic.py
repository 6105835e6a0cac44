"""The synthetic dataset of "Understanding and Improving Knowledge Distillation" (Tang et al.
2020, section 5.1 and appendix), generated on the fly from a seed.

Construction (all from ``seed``):
- ``S`` orthonormal super-class basis vectors u_1..u_S in R^d (rows of a QR factor);
- class c belongs to super-class s(c) = c mod S and has the unit vector
  w_c = tau * u_s + sqrt(1 - tau^2) * v_c, with v_c a random unit vector orthogonal to u_s,
  so cos(w_c, u_s) = tau exactly (``similarity``): classes of one super-class are similar,
  which is the "domain knowledge" a teacher can pass on;
- inputs x ~ N(0, I_d);
- label y = argmax_c  w_c.x + sum_{j=1..m} sin(alpha_j * w_c.x + beta_j), with m =
  ``difficulty`` random (alpha_j, beta_j): m = 0 is a linear task, larger m is more
  non-linear and harder for a small student.

Samples are generated in fixed blocks seeded by (seed, block), so sample i is the same
whatever order it is asked in, and 10^5+ classes cost memory only for the C x d class
vectors, no disk.
"""
from __future__ import annotations

import math

import torch

_BLOCK = 4096


class SyntheticTask:
    """Class vectors and labelling function; ``sample(indices)`` returns (x, y)."""

    def __init__(self, num_classes: int, input_dim: int, num_super_classes: int,
                 similarity: float, difficulty: int, seed: int = 0):
        if num_super_classes > input_dim:
            raise ValueError(f"data.num_super_classes = {num_super_classes} must be <= "
                             f"data.input_dim = {input_dim} (the basis is orthonormal)")
        self.num_classes, self.input_dim, self.seed = num_classes, input_dim, seed
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(input_dim, num_super_classes, generator=g))
        basis = basis.T  # (S, d) orthonormal rows
        self.super_of = torch.arange(num_classes) % num_super_classes
        u = basis[self.super_of]  # (C, d)
        v = torch.randn(num_classes, input_dim, generator=g)
        v = v - (v * u).sum(1, keepdim=True) * u  # orthogonal to its super-class vector
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        tau = similarity
        self.class_vectors = tau * u + math.sqrt(max(0.0, 1 - tau * tau)) * v  # (C, d) unit
        self.alpha = torch.rand(difficulty, generator=g) + 1  # frequencies in [1, 2)
        self.beta = torch.rand(difficulty, generator=g) * 2 * math.pi

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, C) class scores; the label is their argmax."""
        proj = x @ self.class_vectors.T
        out = proj.clone()
        for a, b in zip(self.alpha.tolist(), self.beta.tolist()):
            out += torch.sin(a * proj + b)
        return out

    def _block(self, block: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, 7919, block)) & 0x7FFFFFFFFFFF)
        return torch.randn(_BLOCK, self.input_dim, generator=g)

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Inputs for global sample indices (N,) -> (N, d); order-independent."""
        out = torch.empty(len(indices), self.input_dim)
        blocks = indices // _BLOCK
        for b in torch.unique(blocks).tolist():
            sel = blocks == b
            out[sel] = self._block(b)[indices[sel] % _BLOCK]
        return out

    def sample(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inputs(indices)
        y = torch.cat([self.scores(c).argmax(1) for c in x.split(8192)]) if len(x) else \
            torch.empty(0, dtype=torch.long)
        return x, y


class SyntheticSplit:
    """A contiguous range of the sample stream: train = [0, N), test = [N, N + M).

    Small splits are materialised once (fast epochs); large ones generate per batch.
    """

    def __init__(self, task: SyntheticTask, offset: int, size: int, cache_limit: int = 2_000_000):
        self.task, self.offset, self.size = task, offset, size
        self._cache = None
        if size * (task.input_dim + task.num_classes) <= cache_limit * 64:
            self._cache = task.sample(torch.arange(offset, offset + size))

    def __len__(self) -> int:
        return self.size

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at split-local indices (N,) -> x (N, d), y (N,)."""
        if self._cache is not None:
            return self._cache[0][idx], self._cache[1][idx]
        return self.task.sample(idx + self.offset)
