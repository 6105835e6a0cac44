"""Backbones and a small registry. A backbone maps inputs to features (B, d); the classifier
head is a separate module (dkd.head), because it is sharded and sampled by class.

Every backbone built here has ``feature_dim == cfg.feature_dim``: architectures whose
natural width differs end in a Linear-norm-ReLU projection (see ``NATURAL_WIDTH``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch.nn as nn

from dkd.config import ModelConfig
from dkd.models.common import Backbone, image_shape
from dkd.models.mlp import ResidualMLP

# A builder gets (cfg, input_dim, input_shape or None, vocab_size or None); the gateable
# ones (GATEABLE) also take inner= (per-block inner widths) and gated= (student search).
Builder = Callable[..., nn.Module]

# Width of each architecture's own features, before any projection to model.feature_dim.
NATURAL_WIDTH: dict[str, Callable[[ModelConfig], int]] = {
    "mlp": lambda cfg: cfg.feature_dim, "resnet32": lambda cfg: 64, "lenet": lambda cfg: 84,
    "shallow_cnn": lambda cfg: 2048, "resnet18": lambda cfg: 512, "resnet152": lambda cfg: 2048,
    "ngram_mlp": lambda cfg: cfg.feature_dim, "transformer": lambda cfg: cfg.embed_dim,
}


def _image(make: Callable[..., nn.Module]) -> Builder:
    def build(cfg, in_dim, shape, vocab, **search):
        flat = image_shape(in_dim, shape, cfg.arch)
        body = make(**search)
        return Backbone(body, body.feature_dim, cfg.feature_dim, cfg.norm, flat, image=True)
    return build


def _vocab(cfg: ModelConfig, vocab: Optional[int]) -> int:
    v = cfg.vocab_size or vocab
    if not v:
        raise ValueError(f"model.vocab_size: text backbone {cfg.arch!r} needs the vocabulary "
                         "size; pass vocab_size (DataBundle.vocab_size) or set model.vocab_size")
    return v


def _ngram(cfg, in_dim, shape, vocab, **search):
    from dkd.models.text import NgramMLP
    return NgramMLP(_vocab(cfg, vocab), in_dim, cfg.embed_dim, cfg.hidden, cfg.depth,
                    cfg.feature_dim, cfg.norm, **search)


def _transformer(cfg, in_dim, shape, vocab, **search):
    from dkd.models.text import TinyTransformer
    body = TinyTransformer(_vocab(cfg, vocab), in_dim, cfg.embed_dim, cfg.layers, cfg.heads,
                           cfg.causal, cfg.pooling, **search)
    return Backbone(body, cfg.embed_dim, cfg.feature_dim, cfg.norm)


def _resnet32(**search):
    from dkd.models.resnet_cifar import ResNetCIFAR
    return ResNetCIFAR(32, **search)


def _cnn(name: str):
    def make():
        from dkd.models import cnn
        return {"lenet": cnn.LeNet, "shallow_cnn": cnn.ShallowCNN}[name]()
    return make


def _tv(name: str):
    def make():
        from dkd.models.cnn import torchvision_resnet
        return torchvision_resnet(name)
    return make


_REGISTRY: dict[str, Builder] = {
    "mlp": lambda cfg, in_dim, shape, vocab, **search: ResidualMLP(
        in_dim, cfg.hidden, cfg.depth, cfg.feature_dim, cfg.norm, **search),
    "resnet32": _image(_resnet32),
    "lenet": _image(_cnn("lenet")),
    "shallow_cnn": _image(_cnn("shallow_cnn")),
    "resnet18": _image(_tv("resnet18")),
    "resnet152": _image(_tv("resnet152")),
    "ngram_mlp": _ngram,
    "transformer": _transformer,
}


# Architectures whose channels student search can gate and remove (dkd/search/space.py):
# the inner units of every residual block (the transformer's: its feed-forward units).
GATEABLE = ("mlp", "ngram_mlp", "resnet32", "transformer")


def build_backbone(cfg: ModelConfig, input_dim: int, input_shape: Optional[Sequence[int]] = None,
                   vocab_size: Optional[int] = None, inner: Optional[list] = None,
                   gated: bool = False) -> nn.Module:
    """Backbone for inputs of ``input_dim`` elements (shape ``input_shape``: (3, H, W) for
    images, (n,) for text); text models also need ``vocab_size`` (or model.vocab_size).
    ``build_backbone(cfg, data.input_dim, **data.backbone_kwargs())`` passes both.
    ``model.arch: searched`` builds the student a search exported (``model.spec``);
    ``inner`` / ``gated`` (GATEABLE archs only) set per-block inner widths and gates."""
    if cfg.arch == "searched":
        from dkd.search.space import build_searched
        return build_searched(cfg, input_dim, input_shape, vocab_size)
    if cfg.arch not in _REGISTRY:
        raise ValueError(f"model.arch: unknown {cfg.arch!r}; expected one of {sorted(_REGISTRY)}")
    if inner is None and not gated:
        return _REGISTRY[cfg.arch](cfg, input_dim, input_shape, vocab_size)
    if cfg.arch not in GATEABLE:
        raise ValueError(f"model.arch {cfg.arch!r} has no gateable layers; student search "
                         f"supports {', '.join(GATEABLE)}")
    return _REGISTRY[cfg.arch](cfg, input_dim, input_shape, vocab_size, inner=inner,
                               gated=gated)
