"""Cosine-schedule diffusion (epsilon prediction) and its deterministic DDIM sampler.

The time convention is the one of :mod:`latentcell.module._path`: ``t`` in ``[0, 1]``,
noise at ``t = 0``, data at ``t = 1``, so the denoiser's time input means the same thing
for both objectives. The usual diffusion time is ``s = 1 - t``. With the cosine schedule
of Nichol & Dhariwal (2021) in continuous time,

``alpha_bar(t) = f(1 - t) / f(0)``, ``f(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2``,

clipped to ``[ALPHA_BAR_EPS, ALPHA_BAR_MAX]``, and
``x_t = sqrt(alpha_bar) x1 + sqrt(1 - alpha_bar) eps``.
The network predicts ``eps``; DDIM (``eta = 0``) samples from ``t = 0`` to ``t = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

DiffusionMethod = Literal["ddim"]
DIFFUSION_METHODS = ("ddim",)

#: Offset ``s`` of the cosine schedule (Nichol & Dhariwal 2021).
COSINE_OFFSET = 0.008
#: Lower clip of ``alpha_bar`` (the noise end). 1e-3 rather than the usual 1e-5: DDIM's first
#: step divides the noise error by ``sqrt(alpha_bar(0))``, and at 1e-5 a lightly trained
#: network's error blew samples up 20-40x on a toy (at 1e-3 they were right within 5 steps).
#: The price is a small mismatch: sampling starts from N(0, I), while the training marginal
#: at ``t = 0`` still holds ``sqrt(1e-3) = 3%`` of the data.
ALPHA_BAR_EPS = 1e-3
#: Upper clip of ``alpha_bar`` (the data end).
ALPHA_BAR_MAX = 1.0 - 1e-5


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``t`` ``(batch,)`` to broadcast against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def cosine_alpha_bar(
    t: torch.Tensor, offset: float = COSINE_OFFSET, eps: float = ALPHA_BAR_EPS
) -> torch.Tensor:
    """Signal fraction ``alpha_bar`` of the cosine schedule at flow time ``t``.

    Parameters
    ----------
    t
        Times in ``[0, 1]`` (0 is noise, 1 is data), any shape.
    offset
        Offset ``s`` that keeps the noise level small but non-zero near the data end.
    eps
        Lower clip (noise end); the result lies in ``[eps, ALPHA_BAR_MAX]``.

    Returns
    -------
    torch.Tensor
        ``alpha_bar(t) = f(1 - t) / f(0)`` with
        ``f(s) = cos((s + offset) / (1 + offset) * pi/2)^2``, clipped; increasing in ``t``,
        ``eps`` at ``t = 0`` and ``ALPHA_BAR_MAX`` at ``t = 1``.
    """
    s = 1.0 - t

    def f(u):
        return torch.cos((u + offset) / (1.0 + offset) * (math.pi / 2)) ** 2

    f0 = math.cos(offset / (1.0 + offset) * (math.pi / 2)) ** 2
    return (f(s) / f0).clamp(eps, ALPHA_BAR_MAX)


def diffuse(noise: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noised data ``x_t = sqrt(alpha_bar(t)) x1 + sqrt(1 - alpha_bar(t)) noise``.

    Parameters
    ----------
    noise
        Standard normal noise ``eps``, shaped like ``x1``.
    x1
        Data (``t = 1``).
    t
        Per-sample times ``(batch,)``.

    Returns
    -------
    torch.Tensor
        The noised samples, shaped like ``x1``.
    """
    ab = _broadcast(cosine_alpha_bar(t), x1)
    return ab.sqrt() * x1 + (1 - ab).sqrt() * noise


def predict_data(x: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Estimate the data as ``(x - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)``.

    Parameters
    ----------
    x
        Noised samples.
    eps_hat
        Predicted noise, shaped like ``x``.
    alpha_bar
        Signal fraction of ``x``, broadcastable against it.

    Returns
    -------
    torch.Tensor
        The predicted clean sample ``x1_hat``.
    """
    return (x - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()


def ddim_step(
    x: torch.Tensor,
    eps_hat: torch.Tensor,
    alpha_bar: torch.Tensor,
    alpha_bar_next: torch.Tensor,
) -> torch.Tensor:
    """One deterministic DDIM update (``eta = 0``).

    ``x_next = sqrt(alpha_bar_next) x1_hat + sqrt(1 - alpha_bar_next) eps_hat`` with
    ``x1_hat`` from :func:`predict_data`; ``alpha_bar_next = 1`` returns ``x1_hat``.

    Parameters
    ----------
    x
        Current samples at signal fraction ``alpha_bar``.
    eps_hat
        Predicted noise at ``x``.
    alpha_bar, alpha_bar_next
        Signal fractions of the current and the next point, broadcastable against ``x``.

    Returns
    -------
    torch.Tensor
        Samples at ``alpha_bar_next``.
    """
    x1_hat = predict_data(x, eps_hat, alpha_bar)
    return alpha_bar_next.sqrt() * x1_hat + (1 - alpha_bar_next).sqrt() * eps_hat


def ddim_sample(
    predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    n_steps: int = 50,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM from noise (``t = 0``) to data (``t = 1``).

    The network is evaluated at ``t_i = i / n_steps`` for ``i = 0, ..., n_steps - 1``
    (``n_steps`` evaluations); each step is a :func:`ddim_step` to ``t_{i+1}`` under the
    cosine schedule, except the last, which returns the predicted data ``x1_hat``.

    Parameters
    ----------
    predict_noise
        Function of ``(x, t)`` with ``t`` of shape ``(batch,)`` returning ``eps_hat``.
    noise
        Starting points at ``t = 0``.
    n_steps
        Number of steps (and of network evaluations).
    callback
        Called with the step index after every step.

    Returns
    -------
    torch.Tensor
        The samples at ``t = 1``.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}.")
    x = noise
    n = x.shape[0]
    for i in range(n_steps):
        t = torch.full((n,), i / n_steps, device=x.device, dtype=x.dtype)
        eps_hat = predict_noise(x, t)
        ab = _broadcast(cosine_alpha_bar(t), x)
        if i == n_steps - 1:
            ab_next = torch.ones_like(ab)
        else:
            t_next = torch.full((n,), (i + 1) / n_steps, device=x.device, dtype=x.dtype)
            ab_next = _broadcast(cosine_alpha_bar(t_next), x)
        x = ddim_step(x, eps_hat, ab, ab_next)
        if callback is not None:
            callback(i)
    return x
