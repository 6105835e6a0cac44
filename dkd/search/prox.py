"""Proximal steps for the gates: min_g l(g) + sum_j t_j |g_j|, one step per optimizer step
(no extra forward or backward). Pure math on tensors; no process group."""
from __future__ import annotations

import torch


def soft_threshold(z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """S_t(z) = sign(z) * max(|z| - t, 0): the proximal operator of t * |.|, exactly 0 on
    [-t, t]."""
    return torch.sign(z) * torch.clamp(z.abs() - t, min=0.0)


def momentum(k: int) -> float:
    """mu_k = (k - 2) / (k + 1), clipped at 0 for the first steps."""
    return max(0.0, (k - 2) / (k + 1))


class ProxGates:
    """Proximal gradient on a list of gate vectors, in place.

    prox_sgd: g <- S(g - eta * grad).
    apg (the modified accelerated form, momentum folded into the iterate, as in
    Sutskever et al. and Bengio et al.): z = g - eta * grad; v <- S(z) - g + mu_{k-1} v;
    g <- S(z) + mu_k v. ``sparse`` keeps S(z), the exactly sparse point: its zeros are the
    closed channels (the accelerated iterate g itself may sit just off zero).
    """

    def __init__(self, gates: list[torch.Tensor], kind: str = "apg") -> None:
        if kind not in ("apg", "prox_sgd"):
            raise ValueError(f"search.gate_optimizer: expected apg or prox_sgd, got {kind!r}")
        self.gates, self.kind, self.k = gates, kind, 0
        self.v = [torch.zeros_like(g) for g in gates]
        self.sparse = [g.detach().clone() for g in gates]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], eta: float, thresholds: list[float]) -> None:
        """One step; ``thresholds[i]`` is t_i for every gate of vector i (lambda2 alpha_i eta)."""
        self.k += 1
        for i, (g, grad, t) in enumerate(zip(self.gates, grads, thresholds)):
            s = soft_threshold(g - eta * grad, t)
            if self.kind == "prox_sgd":
                g.copy_(s)
            else:
                self.v[i] = s - g + momentum(self.k - 1) * self.v[i]
                g.copy_(s + momentum(self.k) * self.v[i])
            self.sparse[i] = s

    def open_counts(self) -> list[int]:
        """Open units per gate vector; at least 1 (a block keeps one unit, whose gate may
        be 0: the exported network then carries a zero column there, still exact)."""
        return [max(1, int((s != 0).sum())) for s in self.sparse]

    @torch.no_grad()
    def settle(self) -> None:
        """Set the gates to the sparse point (before export: closed means exactly zero)."""
        for g, s in zip(self.gates, self.sparse):
            g.copy_(s)

    def state_dict(self) -> dict:
        return {"k": self.k, "v": [v.cpu() for v in self.v],
                "sparse": [s.cpu() for s in self.sparse]}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["k"]
        dev = self.gates[0].device
        self.v = [v.to(dev) for v in state["v"]]
        self.sparse = [s.to(dev) for s in state["sparse"]]
