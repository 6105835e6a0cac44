"""Next-word backbones over a context of n token ids (B, n) -> features (B, d).

Inputs may arrive as floats (the training loop casts inputs to the engine dtype); they are
rounded back to integer ids. An id outside the embedding table raises (no silent clamp).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dkd.models.mlp import Gate, ResidualMLP


def as_ids(x: torch.Tensor) -> torch.Tensor:
    return x if not x.is_floating_point() else x.round().long()


class NgramMLP(nn.Module):
    """Bengio et al. 2003 style: the n context embeddings, concatenated (n * embed_dim), go
    through the residual MLP (hidden width, depth blocks) to feature_dim features."""

    def __init__(self, vocab_size: int, context: int, embed_dim: int, hidden: int, depth: int,
                 feature_dim: int, norm: str = "batch", inner: list[int] | None = None,
                 gated: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.mlp = ResidualMLP(context * embed_dim, hidden, depth, feature_dim, norm, inner,
                               gated)
        self.context, self.feature_dim = context, feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = as_ids(x)  # (B, n)
        return self.mlp(self.embed(ids).flatten(1))  # (B, n * E) -> (B, d)


class EncoderLayer(nn.TransformerEncoderLayer):
    """torch's pre-norm encoder layer whose feed-forward units can carry a Gate (student
    search): linear2(gate(act(linear1(x)))). The same state-dict keys as torch's layer
    (plus gate.g when gated). A gated layer leaves torch's fused inference path, which
    would bypass the gate."""

    def __init__(self, embed_dim: int, heads: int, ff: int, gated: bool = False):
        super().__init__(embed_dim, heads, ff, dropout=0.0, activation="gelu",
                         batch_first=True, norm_first=True)
        self.gate = Gate(ff, channel_last=True) if gated else None
        if gated:
            self.activation_relu_or_gelu = 0   # why: the fused path skips _ff_block

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.linear1(x))
        if self.gate is not None:
            h = self.gate(h)
        return self.dropout2(self.linear2(self.dropout(h)))

    def gated_pair(self):
        return self.linear1, None, self.linear2


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-norm encoder layers (GELU, FFN
    4 * embed_dim, no dropout), final LayerNorm; causal attention by default. Features: the
    last position's output (``pooling=last``) or the mean over positions. (B, n) -> (B, E)."""

    def __init__(self, vocab_size: int, context: int, embed_dim: int, layers: int, heads: int,
                 causal: bool = True, pooling: str = "last", inner: list[int] | None = None,
                 gated: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos = nn.Parameter(torch.randn(context, embed_dim) * 0.02)
        inner = list(inner) if inner is not None else [4 * embed_dim] * layers
        if len(inner) != layers:
            raise ValueError(f"inner widths: expected {layers} (model.layers), got {len(inner)}")
        self.layers = nn.ModuleList(EncoderLayer(embed_dim, heads, w, gated) for w in inner)
        self.norm = nn.LayerNorm(embed_dim)
        self.context, self.causal, self.pooling = context, causal, pooling
        self.feature_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = as_ids(x)
        n = ids.shape[1]
        h = self.embed(ids) + self.pos[:n]  # (B, n, E)
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=h.device, dtype=h.dtype) \
            if self.causal else None
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=self.causal)
        h = self.norm(h)
        return h[:, -1] if self.pooling == "last" else h.mean(1)
