"""Velocity networks for the latent flow: a DiT over latent tokens and an MLP-ResNet."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from latentcell.nn._embeddings import TimeEmbedding


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply an adaptive affine transform; ``shift``/``scale`` broadcast over tokens."""
    if x.dim() == 3:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


class AdaLNZero(nn.Module):
    """Map the conditioning vector to ``n_chunks`` modulation vectors, initialised to zero.

    With zero initialisation every residual branch starts gated off, so the network starts
    as the identity map on its residual stream (the adaLN-Zero scheme of DiT).
    """

    def __init__(self, n_hidden: int, n_chunks: int):
        super().__init__()
        self.n_chunks = n_chunks
        self.linear = nn.Linear(n_hidden, n_chunks * n_hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return ``n_chunks`` tensors of shape ``(batch, n_hidden)``."""
        return self.linear(F.silu(c)).chunk(self.n_chunks, dim=-1)


class CrossAttention(nn.Module):
    """Queries attend to context tokens (multi-head, masked).

    Used to condition the denoisers on a variable set of tokens (gene programs): every
    query position reads the context tokens its sample's mask allows.

    Parameters
    ----------
    n_hidden
        Width of queries and context tokens.
    n_heads
        Attention heads; must divide ``n_hidden``.
    """

    def __init__(self, n_hidden: int, n_heads: int = 4):
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"n_hidden={n_hidden} must be divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(n_hidden, n_hidden)
        self.kv = nn.Linear(n_hidden, 2 * n_hidden)
        self.proj = nn.Linear(n_hidden, n_hidden)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend from ``x`` ``(batch, n, d)`` to ``tokens`` ``(batch, m, d)``.

        ``mask`` ``(batch, m)`` is ``True`` for the tokens that may be read; each sample
        needs at least one. Returns ``(batch, n, d)``.
        """
        b, n, d = x.shape
        m, h = tokens.shape[1], self.n_heads
        q = self.q(self.norm(x)).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(tokens).view(b, m, 2, h, d // h).unbind(2)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (self-attention + MLP).

    Parameters
    ----------
    n_hidden
        Token width.
    n_heads
        Attention heads; must divide ``n_hidden``.
    mlp_ratio
        Width multiplier of the feed-forward layer.
    dropout
        Dropout inside attention and MLP.
    cross_attention
        Add a cross-attention layer (to context tokens, e.g. gene programs) between the
        self-attention and the MLP, gated by its own adaLN-Zero gate.
    """

    def __init__(
        self,
        n_hidden: int,
        n_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cross_attention: bool = False,
    ):
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"n_hidden={n_hidden} must be divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(n_hidden, 3 * n_hidden)
        self.proj = nn.Linear(n_hidden, n_hidden)
        self.norm2 = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        n_mlp = int(n_hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(n_hidden, n_mlp),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(n_mlp, n_hidden),
        )
        self.ada = AdaLNZero(n_hidden, 6)
        self.cross = CrossAttention(n_hidden, n_heads) if cross_attention else None
        self.cross_gate = AdaLNZero(n_hidden, 1) if cross_attention else None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Update tokens ``x`` ``(batch, tokens, n_hidden)`` given conditioning ``c``.

        ``context`` is ``(tokens, mask)`` for the cross-attention layer, if there is one.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + gate1[:, None] * self._attention(_modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None and context is not None:
            (gate,) = self.cross_gate(c)
            x = x + gate[:, None] * self.cross(x, *context)
        x = x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class _FinalLayer(nn.Module):
    """Adaptive layer norm then a zero-initialised projection."""

    def __init__(self, n_hidden: int, n_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        self.ada = AdaLNZero(n_hidden, 2)
        self.linear = nn.Linear(n_hidden, n_out)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiTDenoiser(nn.Module):
    """Diffusion transformer over a latent vector split into tokens.

    The latent of size ``n_latent`` is zero-padded to a multiple of ``token_dim`` and cut
    into ``ceil(n_latent / token_dim)`` tokens, each projected to ``n_hidden`` and given a
    learned position embedding. Blocks are conditioned through adaLN-Zero on
    ``time_embedding(t) + c``.

    Parameters
    ----------
    n_latent
        Size of the latent vector.
    n_hidden
        Token width.
    n_layers
        Number of DiT blocks.
    n_heads
        Attention heads.
    token_dim
        Latent coordinates per token.
    mlp_ratio
        Feed-forward width multiplier.
    dropout
        Dropout rate inside the blocks.
    cross_attention
        Give every block a cross-attention layer to context tokens (gene programs).
    """

    def __init__(
        self,
        n_latent: int,
        n_hidden: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        token_dim: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.n_latent = n_latent
        self.token_dim = token_dim
        self.n_tokens = -(-n_latent // token_dim)
        self.n_hidden = n_hidden
        self.time_embedding = TimeEmbedding(n_hidden)
        self.embed = nn.Linear(token_dim, n_hidden)
        self.pos = nn.Parameter(torch.randn(1, self.n_tokens, n_hidden) * 0.02)
        self.blocks = nn.ModuleList(
            DiTBlock(n_hidden, n_heads, mlp_ratio, dropout, cross_attention)
            for _ in range(n_layers)
        )
        self.final = _FinalLayer(n_hidden, token_dim)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity at ``x`` ``(batch, n_latent)``, time ``t`` ``(batch,)``, condition ``c``.

        ``context``: ``(tokens, mask)`` read by the cross-attention layers, if any.
        """
        b = x.shape[0]
        pad = self.n_tokens * self.token_dim - self.n_latent
        h = F.pad(x, (0, pad)).view(b, self.n_tokens, self.token_dim)
        h = self.embed(h) + self.pos
        cond = self.time_embedding(t) + c
        for block in self.blocks:
            h = block(h, cond, context)
        out = self.final(h, cond).reshape(b, -1)
        return out[:, : self.n_latent]


class _ResBlock(nn.Module):
    def __init__(self, n_hidden: int, dropout: float, cross_attention: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(n_hidden, n_hidden * 2),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(n_hidden * 2, n_hidden),
        )
        self.ada = AdaLNZero(n_hidden, 3)
        self.cross = CrossAttention(n_hidden) if cross_attention else None
        self.cross_gate = AdaLNZero(n_hidden, 1) if cross_attention else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, context=None) -> torch.Tensor:
        shift, scale, gate = self.ada(c)
        x = x + gate * self.mlp(_modulate(self.norm(x), shift, scale))
        if self.cross is not None and context is not None:
            # the residual stream is one query token
            (gate,) = self.cross_gate(c)
            x = x + gate * self.cross(x[:, None], *context)[:, 0]
        return x


class MLPDenoiser(nn.Module):
    """Residual MLP velocity network with adaLN-Zero conditioning.

    Parameters
    ----------
    n_latent
        Size of the latent vector.
    n_hidden
        Width of the residual stream.
    n_layers
        Number of residual blocks.
    dropout
        Dropout rate inside the blocks.
    cross_attention
        Give every block a cross-attention layer (the residual stream as one query token)
        to context tokens (gene programs).
    """

    def __init__(
        self,
        n_latent: int,
        n_hidden: int = 256,
        n_layers: int = 4,
        dropout: float = 0.0,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.n_latent = n_latent
        self.n_hidden = n_hidden
        self.time_embedding = TimeEmbedding(n_hidden)
        self.embed = nn.Linear(n_latent, n_hidden)
        self.blocks = nn.ModuleList(
            _ResBlock(n_hidden, dropout, cross_attention) for _ in range(n_layers)
        )
        self.final = _FinalLayer(n_hidden, n_latent)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity at ``x`` ``(batch, n_latent)``, time ``t`` ``(batch,)``, condition ``c``.

        ``context``: ``(tokens, mask)`` read by the cross-attention layers, if any.
        """
        cond = self.time_embedding(t) + c
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, cond, context)
        return self.final(h, cond)
