"""The search as a component of the training loop: it owns the gates' proximal step, its
own cadence of FLOP counts, the stop at the target and the export."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from dkd.atomic import atomic_torch_save
from dkd.config import ConfigError, ModelConfig, SearchConfig
from dkd.search.flops import count_flops, flops_saved_per_unit
from dkd.search.prox import ProxGates
from dkd.search.space import copy_pruned, gate_params, keep_indices, write_spec

STUDENT_SPEC, STUDENT_WEIGHTS = "student.yaml", "student.pt"


class GateSearch:
    """Gates of ``module`` (the engine's backbone), stepped identically on every rank."""

    def __init__(self, cfg: SearchConfig, model: ModelConfig, module: torch.nn.Module,
                 data, group) -> None:
        from dkd.models import build_backbone

        self.cfg, self.model, self.module, self.group = cfg, model, module, group
        self.gates = gate_params(module)
        self.opt = ProxGates(self.gates, cfg.gate_optimizer)
        self.example = data.train.get(torch.tensor([0]))[0]
        kw = data.backbone_kwargs()
        self.build = lambda widths: build_backbone(model, data.input_dim, inner=widths, **kw)
        self.build_gated = lambda: build_backbone(model, data.input_dim, gated=True, **kw)
        self.full = [g.numel() for g in self.gates]
        self.widths = list(self.full)
        self.start_flops, saved = flops_saved_per_unit(self.build, self.widths, self.example)
        self.flops = self.start_flops
        t = cfg.target_flops
        self.target = t * self.start_flops if t <= 1 else t
        if self.target >= self.start_flops:
            raise ConfigError(f"search.target_flops = {t:g} is not below the starting network's "
                              f"{self.start_flops:,} FLOPs per sample (a fraction <= 1, or "
                              "absolute FLOPs below that)")
        self.alpha = self._alpha(saved)

    def _alpha(self, saved: list[int]) -> list[float]:
        if not self.cfg.flops_weighting:
            return [1.0] * len(saved)
        top = max(saved) or 1
        return [s / top for s in saved]

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss the backward sees: |loss - kl_0| in the kl_0 variant."""
        kl0 = self.cfg.kl_target
        return loss if kl0 is None else (loss - kl0).abs()

    @torch.no_grad()
    def step(self) -> None:
        """The proximal step, at the accumulation boundary before the engine's step.
        Collective: one all-reduce of the flat gate gradient (averaged over ranks), so every
        rank takes the same step whatever the engine did with these gradients."""
        grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in self.gates]
        flat = torch.cat(grads)
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flat, group=self.group)
            flat /= dist.get_world_size(self.group)
        grads = list(flat.split(self.full))
        eta = self.cfg.gate_lr
        self.opt.step(grads, eta, [self.cfg.penalty * a * eta for a in self.alpha])
        for g in self.gates:
            g.grad = None

    def check(self, step: int, force: bool = False) -> dict | None:
        """Every search.check_every steps: count the open sub-network's FLOPs (and refresh
        alpha on it); returns the `search` metrics line, or None between counts."""
        if not force and step % self.cfg.check_every:
            return None
        self.widths = self.opt.open_counts()
        self.flops, saved = flops_saved_per_unit(self.build, self.widths, self.example)
        self.alpha = self._alpha(saved)
        line = {"kind": "search", "search/flops": self.flops,
                "search/flops_frac": self.flops / self.start_flops,
                "search/open_frac": sum(self.widths) / sum(self.full)}
        line.update({f"search/keep/{i}": w / f for i, (w, f) in
                     enumerate(zip(self.widths, self.full))})
        return line

    @property
    def reached(self) -> bool:
        return self.flops <= self.target

    def export(self, run_dir: Path, head: torch.Tensor) -> tuple[Path, torch.nn.Module, dict]:
        """Build the real smaller network from the open gates (rank 0); write student.pt and
        student.yaml. Returns (spec path, the network, its summary)."""
        self.opt.settle()
        keeps = keep_indices([g.detach().cpu() for g in self.gates])
        widths = [len(k) for k in keeps]
        src = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        gated = self.build_gated()
        gated.load_state_dict(src)
        plain = self.build(widths)
        copy_pruned(gated, plain, keeps)
        flops = count_flops(plain, self.example)
        atomic_torch_save({"backbone": plain.state_dict(), "head": head.cpu()},
                          run_dir / STUDENT_WEIGHTS)
        info = {"flops": flops, "start_flops": self.start_flops, "target_flops": self.target,
                "reached": flops <= self.target, "widths": widths, "full_widths": self.full}
        write_spec(run_dir / STUDENT_SPEC, self.model, widths, STUDENT_WEIGHTS,
                   {k: info[k] for k in ("flops", "start_flops", "target_flops", "reached")}
                   | {"source": run_dir.name})
        return run_dir / STUDENT_SPEC, plain, info

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "widths": self.widths, "flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.widths, self.flops = state["widths"], state["flops"]
