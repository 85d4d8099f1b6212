"""The rectified-flow path and its ODE sampler.

One time convention throughout latentcell: ``t`` in ``[0, 1]``, noise at ``t = 0``, data at
``t = 1``, ``x_t = t * x1 + (1 - t) * x0``, target velocity ``x1 - x0``, sampling integrates
from 0 to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

SamplerMethod = Literal["euler", "midpoint", "heun"]
SAMPLER_METHODS = ("euler", "midpoint", "heun")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the straight path from noise ``x0`` (t=0) to data ``x1`` (t=1)."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return t * x1 + (1 - t) * x0


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Velocity of the straight path, constant in time: ``x1 - x0``."""
    return x1 - x0


def guided_velocity(
    net: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    condition: tuple[torch.Tensor, ...],
    null: tuple[torch.Tensor, ...],
    cfg_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: ``v_null + cfg_scale * (v_cond - v_null)``.

    ``net(x, t, *condition)`` is the conditional output and ``net(x, t, *null)`` the one
    under the null condition; both are computed in one doubled batch. ``cfg_scale=1`` returns
    the conditional output alone (one network call), 0 the unconditional one.
    """
    if cfg_scale == 1.0:
        return net(x, t, *condition)
    both = net(
        torch.cat([x, x]),
        torch.cat([t, t]),
        *(torch.cat([c, n]) for c, n in zip(condition, null, strict=True)),
    )
    v_cond, v_null = both.chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


def integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    n_steps: int = 50,
    method: SamplerMethod = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t0`` to ``t1`` with a fixed step.

    Parameters
    ----------
    velocity
        Function of ``(x, t)`` with ``t`` of shape ``(batch,)``.
    x0
        State at ``t0``.
    n_steps
        Number of steps (the number of velocity evaluations is ``n_steps`` for Euler and
        ``2 * n_steps`` for midpoint and Heun).
    method
        ``"euler"`` (first order), ``"midpoint"`` or ``"heun"`` (second order).
    t0, t1
        Integration bounds; ``t1 < t0`` integrates backwards.
    callback
        Called with the step index after every step (e.g. to advance a progress bar).

    Returns
    -------
    torch.Tensor
        The state at ``t1``.
    """
    if method not in SAMPLER_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {SAMPLER_METHODS}.")
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}.")
    x = x0
    dt = (t1 - t0) / n_steps
    n = x.shape[0]
    for i in range(n_steps):
        t = torch.full((n,), t0 + i * dt, device=x.device, dtype=x.dtype)
        v = velocity(x, t)
        if method == "euler":
            x = x + dt * v
        elif method == "midpoint":
            x = x + dt * velocity(x + 0.5 * dt * v, t + 0.5 * dt)
        else:
            v_next = velocity(x + dt * v, t + dt)
            x = x + 0.5 * dt * (v + v_next)
        if callback is not None:
            callback(i)
    return x
