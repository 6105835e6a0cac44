"""The search space: the inner units of every residual block, gated; and the way back from
a gated network to the real smaller one (channels removed, weights copied and folded).

A gated block computes ``consumer(gate * act(norm(producer(x))))``. With the closed gates
exactly 0, removing a closed unit (its producer row, its norm entries, its consumer
column) changes nothing, and an open gate's value folds into its consumer column; batch
norm is per channel, so the smaller network computes the same function (layer norm, whose
statistics span the removed units, is refused).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import yaml

from dkd.config import ConfigError, ModelConfig


def gated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks with a gate, in forward order (module registration order)."""
    return [m for m in module.modules() if getattr(m, "gate", None) is not None]


def plain_blocks(module: nn.Module) -> list[nn.Module]:
    """The searchable blocks of a plain (ungated) network, in the same order."""
    return [m for m in module.modules() if hasattr(m, "gated_pair")]


def gate_params(module: nn.Module) -> list[nn.Parameter]:
    return [b.gate.g for b in gated_blocks(module)]


def widths_of(module: nn.Module) -> list[int]:
    return [b.gated_pair()[0].weight.shape[0] for b in plain_blocks(module)]


def _shape_g(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.view(1, -1, *([1] * (like.dim() - 2)))


@torch.no_grad()
def copy_pruned(src: nn.Module, dst: nn.Module, keeps: list[torch.Tensor]) -> None:
    """Copy gated ``src`` into the smaller plain ``dst``: every tensor outside the gated
    pairs as is; in block i only the units ``keeps[i]``, the gate folded into the consumer."""
    src_sd = src.state_dict()
    dst_sd = dst.state_dict()
    for k, v in dst_sd.items():
        if k in src_sd and src_sd[k].shape == v.shape:
            v.copy_(src_sd[k])
    for sb, db, keep in zip(gated_blocks(src), plain_blocks(dst), keeps):
        (p1, n1, c1), (p2, n2, c2) = sb.gated_pair(), db.gated_pair()
        g = sb.gate.g[keep]
        p2.weight.copy_(p1.weight[keep])
        if p1.bias is not None:
            p2.bias.copy_(p1.bias[keep])
        for name in ("weight", "bias", "running_mean", "running_var") if n1 is not None else ():
            if getattr(n1, name, None) is not None:
                getattr(n2, name).copy_(getattr(n1, name)[keep])
        if getattr(n1, "num_batches_tracked", None) is not None:
            n2.num_batches_tracked.copy_(n1.num_batches_tracked)
        c2.weight.copy_(c1.weight[:, keep] * _shape_g(g.to(c1.weight.dtype), c1.weight))
        if c1.bias is not None:
            c2.bias.copy_(c1.bias)


def keep_indices(gates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Open units per block (nonzero gates); a block with none keeps its unit 0."""
    out = []
    for g in gates:
        idx = (g != 0).nonzero().squeeze(1)
        out.append(idx if idx.numel() else torch.zeros(1, dtype=torch.long, device=g.device))
    return out


def check_searchable(model: ModelConfig) -> None:
    from dkd.models import GATEABLE
    if model.arch not in GATEABLE:
        raise ConfigError(f"search: model.arch {model.arch!r} has no gateable layers; student "
                          f"search supports {', '.join(GATEABLE)}")
    if model.norm == "layer" and model.arch in ("mlp", "ngram_mlp"):
        raise ConfigError("search: model.norm = layer cannot be pruned exactly (its statistics "
                          "span the removed units); use batch or none")


# ---------------------------------------------------------------- the student spec

def write_spec(path: Path, base: ModelConfig, widths: list[int], weights: str,
               extra: dict) -> None:
    from dkd.atomic import atomic_write_text
    spec = {"base": base.model_dump(mode="json"), "inner": [int(w) for w in widths],
            "weights": weights, **extra}
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.spec: {path} not found (a student.yaml written by dkd search)")
    try:
        spec = yaml.safe_load(path.read_text())
        base = ModelConfig.model_validate(spec["base"])
        inner = [int(w) for w in spec["inner"]]
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model.spec: {path} is not a student spec ({err})") from None
    return {**spec, "base": base, "inner": inner, "path": path}


def build_searched(cfg: ModelConfig, input_dim: int, input_shape=None, vocab_size=None,
                   load_weights: bool | None = None) -> nn.Module:
    """The searched student of ``cfg.spec``; with spec_init = searched, its weights too."""
    from dkd.models import build_backbone
    spec = read_spec(cfg.spec)
    if spec["base"].feature_dim != cfg.feature_dim:
        raise ConfigError(f"model.spec: {spec['path']} ends in {spec['base'].feature_dim} "
                          f"features, model.feature_dim is {cfg.feature_dim}; set "
                          f"model.feature_dim = {spec['base'].feature_dim}")
    try:
        net = build_backbone(spec["base"], input_dim, input_shape, vocab_size,
                             inner=spec["inner"])
    except ValueError as err:
        raise ConfigError(f"model.spec: {spec['path']}: {err}") from None
    if load_weights if load_weights is not None else cfg.spec_init == "searched":
        wfile = spec["path"].parent / spec["weights"]
        if not wfile.is_file():
            raise ConfigError(f"model.spec: weights {wfile} of {spec['path']} not found")
        state = torch.load(wfile, map_location="cpu", weights_only=False)["backbone"]
        mine = net.state_dict()
        bad = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
        bad += [k for k in state if k not in mine]
        if bad:
            k = bad[0]
            got = tuple(state[k].shape) if k in state else "missing"
            want = tuple(mine[k].shape) if k in mine else "not in the spec's network"
            raise ConfigError(f"model.spec: {spec['path']} does not match its weights {wfile}: "
                              f"{k} is {got} in the weights, {want} in the spec "
                              f"({len(bad)} tensors differ)")
        net.load_state_dict(state)
    return net
