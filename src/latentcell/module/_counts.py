"""Fast exact count sampling from the decoder's likelihood on CPU.

Drawing a negative binomial count the textbook way (a gamma rate, then a Poisson count) costs
two special-function draws per gene and cell, and on two CPU cores it dominates the time of
generating cells. Single-cell means are mostly far below one, so most draws are zero: here a
single uniform per entry is compared with the probability of zero, and only the few entries
above it walk up the cumulative distribution (inverse-transform sampling with the pmf
recurrence). Entries whose walk could be long (a large mean, or a heavy tail: success
probability ``mu / (mu + theta)`` near one) use gamma-Poisson instead. The result has exactly
the negative binomial distribution; it is only faster.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Poisson


def sample_negative_binomial(
    mu: torch.Tensor,
    theta: torch.Tensor,
    max_mean: float = 8.0,
    max_ratio: float = 0.9,
) -> torch.Tensor:
    """Draw negative binomial counts with mean ``mu`` and inverse dispersion ``theta``.

    The variance is ``mu + mu**2 / theta`` (scvi-tools' parameterisation). Entries with
    ``mu < max_mean`` and ``q = mu / (mu + theta) < max_ratio`` are drawn by inversion:
    ``P(0) = (1 - q) ** theta`` and ``P(k + 1) = P(k) * (k + theta) / (k + 1) * q``,
    accumulated in float64 until the cumulative probability passes the entry's uniform draw
    (the pmf decays at least like ``q ** k``, so the walk is short). The other entries use
    gamma-Poisson. Uses the global torch random number generator.

    Parameters
    ----------
    mu
        Means, any shape.
    theta
        Inverse dispersions, broadcastable to ``mu``.
    max_mean, max_ratio
        Entries with a mean or a ratio ``q`` at or above these are drawn by gamma-Poisson.

    Returns
    -------
    torch.Tensor
        Tensor of counts (float, shape and dtype of ``mu``).
    """
    theta = theta.expand_as(mu)
    out = torch.zeros_like(mu)
    u = torch.rand_like(mu)
    q = mu / (mu + theta)
    p0 = torch.exp(theta * torch.log1p(-q))
    small = (mu < max_mean) & (q < max_ratio)
    fallback = ~small
    idx = (small & (u > p0)).nonzero(as_tuple=True)
    if idx[0].numel():
        pos = torch.arange(idx[0].numel(), device=mu.device)
        uu, qq, th = u[idx].double(), q[idx].double(), theta[idx].double()
        pk = p0[idx].double()
        cdf = pk.clone()
        k = torch.zeros_like(uu)
        drawn = torch.zeros_like(uu)
        for _ in range(100_000):  # ends long before: the tail is below q**k
            pk = pk * (k + th) / (k + 1) * qq
            k = k + 1
            cdf = cdf + pk
            done = uu <= cdf
            drawn[pos[done]] = k[done]
            keep = ~done
            pos, uu, qq, th, pk, cdf, k = (a[keep] for a in (pos, uu, qq, th, pk, cdf, k))
            if pos.numel() == 0:
                break
        out[idx] = drawn.to(out.dtype)
    if fallback.any():
        m, t = mu[fallback], theta[fallback]
        out[fallback] = torch.poisson(torch._standard_gamma(t) * m / t)
    return out


def sample_counts(px: Distribution) -> torch.Tensor:
    """Draw counts from a decoder likelihood, using the fast sampler where it applies.

    Negative binomial and zero-inflated negative binomial likelihoods on the CPU use
    :func:`sample_negative_binomial` (plus the zero-inflation mask); anything else, or any
    likelihood on a GPU, uses the distribution's own ``sample()``.

    Parameters
    ----------
    px
        The decoder's distribution (scvi-tools ``NegativeBinomial``,
        ``ZeroInflatedNegativeBinomial`` or ``Poisson``).

    Returns
    -------
    torch.Tensor
        Tensor of counts with the shape of the distribution's mean.
    """
    from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

    if isinstance(px, NegativeBinomial) and px.mu.device.type == "cpu":
        counts = sample_negative_binomial(px.mu, px.theta)
        if isinstance(px, ZeroInflatedNegativeBinomial):
            counts = torch.where(torch.rand_like(counts) <= px.zi_probs, 0.0, counts)
        return counts
    if isinstance(px, Poisson):
        return torch.poisson(px.rate)
    return px.sample()
