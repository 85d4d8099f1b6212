"""Time and condition embeddings for the latent denoiser."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal features of a scalar per sample.

    Parameters
    ----------
    t
        Values of shape ``(batch,)``, typically flow times in ``[0, 1]``.
    dim
        Number of output features (an odd ``dim`` is zero-padded).
    max_period
        Longest period of the sinusoids.
    scale
        Multiplier applied to ``t`` first. Flow times live in ``[0, 1]``; without scaling,
        all but the fastest frequencies would be near-constant over that range.

    Returns
    -------
    torch.Tensor
        Tensor of shape ``(batch, dim)``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the flow time followed by a two-layer MLP.

    Parameters
    ----------
    n_hidden
        Output (and hidden) width.
    n_frequencies
        Number of sinusoidal features fed to the MLP.
    """

    def __init__(self, n_hidden: int, n_frequencies: int = 256):
        super().__init__()
        self.n_frequencies = n_frequencies
        self.mlp = nn.Sequential(
            nn.Linear(n_frequencies, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed times of shape ``(batch,)`` into ``(batch, n_hidden)``."""
        return self.mlp(sinusoidal_embedding(t, self.n_frequencies))


class FourierFeatures(nn.Module):
    """Random Fourier features of a position, at several spatial scales.

    A position ``x`` (standardised coordinates, shape ``(batch, n_dims)``) is mapped to
    ``[cos(2 pi x B), sin(2 pi x B)]`` with a fixed Gaussian matrix ``B`` whose columns are
    drawn with standard deviation ``scale`` (in cycles per unit of ``x``) for each scale in
    ``scales``: the coarse scales tell the network where in the tissue a cell is, the fine
    ones resolve structures a few cell widths across. ``B`` is a buffer drawn from a fixed
    seed, so it is saved with the weights and identical between runs.

    Parameters
    ----------
    n_dims
        Dimension of the positions (2 or 3).
    n_per_scale
        Frequencies drawn per scale.
    scales
        Standard deviations of the frequencies, in cycles per unit of the input.
    """

    def __init__(
        self, n_dims: int, n_per_scale: int = 32, scales: tuple[float, ...] = (0.5, 2.0, 8.0)
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        blocks = [torch.randn(n_dims, n_per_scale, generator=gen) * s for s in scales]
        self.register_buffer("frequencies", torch.cat(blocks, dim=1))

    @property
    def n_features(self) -> int:
        """Number of output features."""
        return 2 * self.frequencies.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(batch, n_features)`` of positions ``(batch, n_dims)``."""
        args = 2 * math.pi * x.float() @ self.frequencies
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionEmbedding(nn.Module):
    """Sum of per-attribute embeddings, each with its own learned null token.

    Categorical attribute ``i`` with ``n_i`` categories gets an embedding table of
    ``n_i + 1`` rows; row ``n_i`` is the null token used for classifier-free guidance and
    for attributes left unspecified at sampling time. Each continuous attribute is embedded
    by a small MLP of its (standardised) value, and replaced by its own learned null vector
    where dropped. Two optional vector-valued attributes follow the continuous ones: a
    spatial position (Fourier features, :class:`FourierFeatures`, then an MLP) and a
    neighbourhood summary (an MLP of a fixed-length vector); each is one attribute with one
    null vector, used where any of its entries is NaN or where it is dropped.

    Parameters
    ----------
    n_cats_per_attr
        Number of categories of each categorical attribute.
    n_continuous
        Number of continuous attributes.
    n_hidden
        Embedding width.
    n_spatial
        Dimension of the spatial position (0: no position attribute).
    n_context
        Length of the neighbourhood summary (0: no neighbourhood attribute).
    n_programs
        Number of gene programs (0: none). Programs are not summed into the conditioning
        vector: :meth:`program_tokens` turns them into tokens for cross-attention
        (:class:`CrossAttention`), one per program (a learned program embedding plus an MLP
        of its activity), each its own attribute with its own dropout; an unspecified
        (NaN) or dropped program is left out of the tokens.

    Notes
    -----
    The continuous input ``cont`` holds, in this order, the ``n_continuous`` scalars, the
    ``n_spatial`` coordinates, the ``n_context`` summary entries and the ``n_programs``
    program activities.
    """

    def __init__(
        self,
        n_cats_per_attr: list[int],
        n_continuous: int,
        n_hidden: int,
        n_spatial: int = 0,
        n_context: int = 0,
        n_programs: int = 0,
    ):
        super().__init__()
        self.n_cats_per_attr = list(n_cats_per_attr)
        self.n_programs = n_programs
        self.n_continuous = n_continuous
        self.n_spatial = n_spatial
        self.n_context = n_context
        self.n_hidden = n_hidden
        self.vector_embeddings = nn.ModuleList()
        self.vector_slices: list[tuple[int, int]] = []
        if n_spatial:
            fourier = FourierFeatures(n_spatial)
            self.vector_embeddings.append(
                nn.Sequential(fourier, *_mlp(fourier.n_features, n_hidden))
            )
            self.vector_slices.append((n_continuous, n_continuous + n_spatial))
        if n_context:
            self.vector_embeddings.append(nn.Sequential(*_mlp(n_context, n_hidden)))
            start = n_continuous + n_spatial
            self.vector_slices.append((start, start + n_context))
        self.vector_null = nn.Parameter(torch.zeros(len(self.vector_embeddings), n_hidden))
        self.cat_embeddings = nn.ModuleList(nn.Embedding(n + 1, n_hidden) for n in n_cats_per_attr)
        self.cont_embeddings = nn.ModuleList(
            nn.Sequential(nn.Linear(1, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden))
            for _ in range(n_continuous)
        )
        self.cont_null = nn.Parameter(torch.zeros(n_continuous, n_hidden))
        for emb in self.cat_embeddings:
            nn.init.normal_(emb.weight, std=0.02)
        if n_programs:
            self.program_identity = nn.Parameter(torch.randn(n_programs, n_hidden) * 0.02)
            self.program_value = nn.Sequential(*_mlp(1, n_hidden))
            # always present, so that a cell with no program specified attends to something
            self.program_null = nn.Parameter(torch.zeros(1, 1, n_hidden))

    @property
    def n_attributes(self) -> int:
        """Number of attributes (categorical, continuous, then position and neighbourhood)."""
        return (
            len(self.n_cats_per_attr)
            + self.n_continuous
            + len(self.vector_embeddings)
            + self.n_programs
        )

    def null_codes(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Categorical codes of ``n`` samples that all point at the null tokens."""
        codes = torch.tensor(self.n_cats_per_attr, dtype=torch.long, device=device)
        return codes.expand(n, -1).clone()

    def forward(
        self,
        cat: torch.Tensor | None,
        cont: torch.Tensor | None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed conditions.

        Parameters
        ----------
        cat
            Integer codes ``(batch, n_categorical)``; a code equal to the attribute's number of
            categories selects its null token.
        cont
            Standardised values ``(batch, n_continuous + n_spatial + n_context + n_programs)``
            (the program columns are not used here).
        drop
            Boolean mask ``(batch, n_attributes)``; ``True`` replaces that attribute by its
            null token.

        Returns
        -------
        torch.Tensor
            Tensor ``(batch, n_hidden)``, the sum of the attribute embeddings.
        """
        n = cat.shape[0] if cat is not None else cont.shape[0]
        device = (cat if cat is not None else cont).device
        out = torch.zeros(n, self.n_hidden, device=device)
        n_cat = len(self.n_cats_per_attr)
        for i, emb in enumerate(self.cat_embeddings):
            code = cat[:, i].long()
            if drop is not None:
                code = torch.where(drop[:, i], torch.full_like(code, self.n_cats_per_attr[i]), code)
            out = out + emb(code)
        for j, emb in enumerate(self.cont_embeddings):
            value = cont[:, j : j + 1]
            is_null = ~torch.isfinite(value[:, 0])
            if drop is not None:
                is_null = is_null | drop[:, n_cat + j]
            e = emb(torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0))
            out = out + torch.where(is_null[:, None], self.cont_null[j].expand_as(e), e)
        n_scalar = n_cat + self.n_continuous
        for j, (emb, (lo, hi)) in enumerate(
            zip(self.vector_embeddings, self.vector_slices, strict=True)
        ):
            value = cont[:, lo:hi]
            is_null = ~torch.isfinite(value).all(dim=1)
            if drop is not None:
                is_null = is_null | drop[:, n_scalar + j]
            e = emb(torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0))
            out = out + torch.where(is_null[:, None], self.vector_null[j].expand_as(e), e)
        return out

    def program_tokens(
        self, cont: torch.Tensor, drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tokens of the gene programs, for cross-attention.

        Parameters
        ----------
        cont
            The continuous input of :meth:`forward`; its last ``n_programs`` columns are the
            (standardised) program activities, NaN where unspecified.
        drop
            The dropout mask of :meth:`forward`; its last ``n_programs`` columns drop
            programs.

        Returns
        -------
        tuple of torch.Tensor or None
            ``None`` without programs; otherwise ``(tokens, mask)``: tokens
            ``(batch, 1 + n_programs, n_hidden)`` (a learned null token, then one per program)
            and a boolean mask ``(batch, 1 + n_programs)``, ``True`` for the tokens to attend to
            (the null token always, a program where it is specified and not dropped).
        """
        if not self.n_programs:
            return None
        values = cont[:, -self.n_programs :]
        present = torch.isfinite(values)
        if drop is not None:
            present = present & ~drop[:, -self.n_programs :]
        value = self.program_value(torch.nan_to_num(values, nan=0.0)[..., None])
        tokens = self.program_identity[None] + value
        n = values.shape[0]
        tokens = torch.cat([self.program_null.expand(n, -1, -1), tokens], dim=1)
        mask = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
        return tokens, mask


def _mlp(n_in: int, n_hidden: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden)]
