"""The fast count sampler draws from exactly the negative binomial it is given."""

import numpy as np
import pytest
import torch
from scipy import stats
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from torch.distributions import Poisson

from latentcell.module._counts import sample_counts, sample_negative_binomial


def _pmf_gap(draws: np.ndarray, mu: float, theta: float) -> float:
    """Largest absolute gap between the empirical and the exact pmf over 0..30."""
    ks = np.arange(31)
    exact = stats.nbinom.pmf(ks, theta, theta / (theta + mu))
    empirical = np.bincount(draws.astype(int), minlength=200)[:31] / draws.size
    return float(np.abs(exact - empirical).max())


@pytest.mark.parametrize(
    ("mu", "theta"),
    [(0.05, 0.5), (0.7, 2.0), (3.0, 0.3), (7.9, 5.0), (12.0, 1.5)],
)
def test_matches_negative_binomial_pmf(mu, theta):
    torch.manual_seed(0)
    n = 200_000
    draws = sample_negative_binomial(torch.full((n,), mu), torch.tensor(theta)).numpy()
    # 4 standard errors of the largest cell probability
    assert _pmf_gap(draws, mu, theta) < 4 * np.sqrt(0.25 / n)
    assert draws.mean() == pytest.approx(mu, rel=0.03)
    assert draws.var() == pytest.approx(mu + mu**2 / theta, rel=0.06)


@pytest.mark.parametrize(
    ("mu", "theta", "kwargs"), [(2.0, 0.05, {}), (2.0, 1.0, {"max_ratio": 0.1})]
)
def test_gamma_poisson_branch_keeps_distribution(mu, theta, kwargs):
    # heavy tail (q near one) or a forced fallback: the gamma-Poisson branch
    torch.manual_seed(1)
    n = 100_000
    draws = sample_negative_binomial(torch.full((n,), mu), torch.tensor(theta), **kwargs)
    assert _pmf_gap(draws.numpy(), mu, theta) < 4 * np.sqrt(0.25 / n)


def test_mixed_entries_keep_their_own_parameters():
    torch.manual_seed(2)
    n = 50_000
    mu = torch.tensor([0.2, 5.0, 30.0]).repeat(n, 1)
    theta = torch.tensor([1.0, 0.05, 2.0])
    draws = sample_negative_binomial(mu, theta)
    assert draws.mean(0).numpy() == pytest.approx([0.2, 5.0, 30.0], rel=0.05)


def test_shape_seed_and_integer_values():
    mu = torch.rand(7, 5) * 3
    theta = torch.rand(5) + 0.5
    torch.manual_seed(3)
    a = sample_negative_binomial(mu, theta)
    torch.manual_seed(3)
    b = sample_negative_binomial(mu, theta)
    assert a.shape == mu.shape and a.dtype == mu.dtype
    assert torch.equal(a, b)
    assert torch.equal(a, a.round()) and (a >= 0).all()


def test_sample_counts_dispatch():
    torch.manual_seed(0)
    n = 100_000
    mu = torch.full((n,), 2.0)
    theta = torch.full((n,), 1.0)
    zi_logits = torch.full((n,), 0.0)  # zero-inflation probability 0.5
    zinb = sample_counts(ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi_logits))
    p0 = 0.5 + 0.5 * stats.nbinom.pmf(0, 1.0, 1.0 / 3.0)
    assert (zinb == 0).float().mean().item() == pytest.approx(p0, abs=0.01)
    nb = sample_counts(NegativeBinomial(mu=mu, theta=theta))
    assert nb.mean().item() == pytest.approx(2.0, rel=0.03)
    pois = sample_counts(Poisson(mu))
    assert pois.var().item() == pytest.approx(2.0, rel=0.05)
