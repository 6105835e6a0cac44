"""Next-word backbones over a context of n token ids (B, n) -> features (B, d).

Inputs may arrive as floats (the training loop casts inputs to the engine dtype); they are
rounded back to integer ids. An id outside the embedding table raises (no silent clamp).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dkd.models.mlp import ResidualMLP


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


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-norm encoder layers (GELU, FFN
    4 * embed_dim, no dropout), final LayerNorm; causal attention by default. Features: the
    last position's output (``pooling=last``) or the mean over positions. (B, n) -> (B, E)."""

    def __init__(self, vocab_size: int, context: int, embed_dim: int, layers: int, heads: int,
                 causal: bool = True, pooling: str = "last"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos = nn.Parameter(torch.randn(context, embed_dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(embed_dim, heads, 4 * embed_dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
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
