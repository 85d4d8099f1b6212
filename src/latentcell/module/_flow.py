"""Conditional rectified flow (or DDPM) on a (frozen) VAE latent space. Tensors only."""

from __future__ import annotations

from typing import Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from latentcell._constants import FLOW_KEYS
from latentcell.module._diffusion import DIFFUSION_METHODS, DiffusionMethod, ddim_sample, diffuse
from latentcell.module._path import (
    SAMPLER_METHODS,
    SamplerMethod,
    guided_velocity,
    integrate,
    interpolate,
    target_velocity,
)
from latentcell.nn import ConditionEmbedding, DiTDenoiser, MLPDenoiser

Objective = Literal["flow", "ddpm"]
OBJECTIVES = ("flow", "ddpm")


class LatentFlow(BaseModuleClass):
    """Rectified flow or DDPM with classifier-free guidance on standardised latent vectors.

    Both objectives share the denoiser and the time convention (``t = 0`` noise, ``t = 1``
    data): with ``"flow"`` the network predicts the velocity ``x1 - x0`` of the straight
    path and sampling integrates an ODE (:func:`latentcell.module.integrate`); with
    ``"ddpm"`` it predicts the noise ``eps`` of ``x_t = sqrt(ab) x1 + sqrt(1 - ab) eps``
    under a cosine schedule ``ab = alpha_bar(t)`` and sampling is deterministic DDIM
    (:func:`latentcell.module.ddim_sample`).

    Parameters
    ----------
    n_latent
        Size of the latent vectors.
    n_cats_per_attr
        Number of categories of each categorical condition.
    n_continuous
        Number of continuous conditions.
    n_spatial
        Dimension of a spatial position condition (0: none).
    n_context
        Length of a neighbourhood-summary condition (0: none). Continuous inputs are the
        scalars, then the position, then the summary, then the program activities (see
        :class:`latentcell.nn.ConditionEmbedding`); all are standardised per column.
    n_programs
        Number of gene programs; with any, the denoiser reads program tokens through
        cross-attention layers (:class:`latentcell.nn.CrossAttention`).
    denoiser
        ``"dit"`` (transformer over latent tokens) or ``"mlp"`` (residual MLP).
    n_hidden
        Width of the denoiser.
    n_layers
        Depth of the denoiser.
    n_heads
        Attention heads (DiT only).
    token_dim
        Latent coordinates per token (DiT only).
    dropout
        Dropout inside the denoiser.
    p_uncond
        Probability of dropping all conditions of a training sample to their null tokens.
    p_drop_attr
        Probability of dropping each condition independently, so that any subset of
        conditions can be left unspecified at sampling time.
    objective
        ``"flow"`` (rectified flow, velocity prediction) or ``"ddpm"`` (cosine-schedule
        diffusion, noise prediction, DDIM sampling).
    """

    def __init__(
        self,
        n_latent: int,
        n_cats_per_attr: list[int],
        n_continuous: int = 0,
        denoiser: Literal["dit", "mlp"] = "mlp",
        n_hidden: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        token_dim: int = 4,
        dropout: float = 0.0,
        p_uncond: float = 0.1,
        p_drop_attr: float = 0.1,
        objective: Objective = "flow",
        n_spatial: int = 0,
        n_context: int = 0,
        n_programs: int = 0,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        self.objective = objective
        self.n_latent = n_latent
        self.p_uncond = p_uncond
        self.p_drop_attr = p_drop_attr
        self.condition = ConditionEmbedding(
            n_cats_per_attr,
            n_continuous,
            n_hidden,
            n_spatial=n_spatial,
            n_context=n_context,
            n_programs=n_programs,
        )
        n_continuous = n_continuous + n_spatial + n_context + n_programs
        cross = n_programs > 0
        if denoiser == "dit":
            self.denoiser = DiTDenoiser(
                n_latent,
                n_hidden=n_hidden,
                n_layers=n_layers,
                n_heads=n_heads,
                token_dim=token_dim,
                dropout=dropout,
                cross_attention=cross,
            )
        elif denoiser == "mlp":
            self.denoiser = MLPDenoiser(
                n_latent,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout=dropout,
                cross_attention=cross,
            )
        else:
            raise ValueError(f"denoiser must be 'dit' or 'mlp', got {denoiser!r}.")
        self.register_buffer("latent_mean", torch.zeros(n_latent))
        self.register_buffer("latent_std", torch.ones(n_latent))
        self.register_buffer("cont_mean", torch.zeros(n_continuous))
        self.register_buffer("cont_std", torch.ones(n_continuous))

    # ---------------------------------------------------------------- scaling
    def set_scaling(self, z: torch.Tensor, cont: torch.Tensor | None = None) -> None:
        """Record per-dimension mean and standard deviation of training latents/covariates."""
        self.latent_mean.copy_(z.mean(0))
        self.latent_std.copy_(z.std(0).clamp_min(1e-4))
        if cont is not None and cont.shape[1]:
            self.cont_mean.copy_(cont.mean(0))
            self.cont_std.copy_(cont.std(0).clamp_min(1e-6) if cont.shape[0] > 1 else 1.0)

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents to the standardised space the flow works in."""
        return (z - self.latent_mean) / self.latent_std

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        """Map flow outputs back to the VAE latent space."""
        return x * self.latent_std + self.latent_mean

    def scale_continuous(self, cont: torch.Tensor) -> torch.Tensor:
        """Standardise continuous conditions (NaN, meaning 'unspecified', stays NaN)."""
        return (cont - self.cont_mean) / self.cont_std

    # ---------------------------------------------------------------- network
    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cat: torch.Tensor,
        cont: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Network output at standardised ``x`` and time ``t`` under the conditions.

        The predicted velocity for ``objective="flow"``, the predicted noise ``eps`` for
        ``objective="ddpm"``.
        """
        context = self.condition.program_tokens(cont, drop)
        return self.denoiser(x, t, self.condition(cat, cont, drop), context)

    def condition_dropout_mask(self, n: int, device: torch.device) -> torch.Tensor:
        """Boolean mask ``(n, n_attributes)``: per-attribute drops OR whole-sample drops."""
        n_attr = self.condition.n_attributes
        per_attr = torch.rand(n, n_attr, device=device) < self.p_drop_attr
        whole = torch.rand(n, 1, device=device) < self.p_uncond
        return per_attr | whole

    # ---------------------------------------------------------------- scvi-tools module API
    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        return {"tensors": tensors}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {}

    @auto_move_data
    def inference(self, tensors: dict) -> dict:
        """Standardise the latent batch and collect conditions."""
        z = tensors[FLOW_KEYS.LATENT]
        n = z.shape[0]
        cat = tensors.get(FLOW_KEYS.COND_CAT)
        if cat is None:
            cat = torch.zeros(n, 0, dtype=torch.long, device=z.device)
        cont = tensors.get(FLOW_KEYS.COND_CONT)
        if cont is None:
            cont = torch.zeros(n, 0, device=z.device)
        return {"x1": self.standardize(z), "cat": cat.long(), "cont": self.scale_continuous(cont)}

    def generative(self) -> dict:
        """Return nothing: the flow has no separate generative pass during training."""
        return {}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        """Conditional flow-matching (or DDPM noise-prediction) loss with condition dropout.

        Noise, times and the dropout mask are drawn here unless the batch provides them
        (validation batches carry fixed ones so that the validation loss is deterministic).
        With ``objective="ddpm"`` the loss is the per-cell mean squared error between the
        predicted and the true noise of ``x_t = sqrt(ab) x1 + sqrt(1 - ab) x0``; it is still
        reported as ``flow_loss``.
        """
        x1 = inference_outputs["x1"]
        n, device = x1.shape[0], x1.device
        x0 = tensors.get(FLOW_KEYS.NOISE)
        x0 = torch.randn_like(x1) if x0 is None else x0.to(device)
        t = tensors.get(FLOW_KEYS.TIME)
        t = torch.rand(n, device=device) if t is None else t.to(device).reshape(-1)
        drop = tensors.get(FLOW_KEYS.DROP)
        drop = self.condition_dropout_mask(n, device) if drop is None else drop.to(device).bool()
        if self.objective == "flow":
            xt, target = interpolate(x0, x1, t), target_velocity(x0, x1)
        else:
            xt, target = diffuse(x0, x1, t), x0
        pred = self.velocity(xt, t, inference_outputs["cat"], inference_outputs["cont"], drop)
        per_cell = ((pred - target) ** 2).mean(-1)
        loss = per_cell.mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=per_cell,
            n_obs_minibatch=n,
            extra_metrics={"flow_loss": loss.detach()},
        )

    @torch.inference_mode()
    def invert(
        self,
        z: torch.Tensor,
        cat: torch.Tensor,
        cont: torch.Tensor,
        n_steps: int = 50,
        method: SamplerMethod = "midpoint",
        callback=None,
    ) -> torch.Tensor:
        """Noise that the flow carries to the latents ``z`` under the given conditions.

        The flow's ODE integrated backwards, from the data end (``t = 1``, the standardised
        ``z``) to the noise end (``t = 0``), with the plain conditional velocity (no
        guidance, so that :meth:`sample` from the result under the same conditions returns
        ``z`` up to the solver's error). Only for ``objective="flow"``.

        Parameters
        ----------
        z
            Latents ``(n, n_latent)`` in the VAE latent space.
        cat, cont
            Conditions of each latent, as for :meth:`sample`.
        n_steps, method
            Solver settings, see :func:`latentcell.module.integrate`.
        callback
            Called with the step index after each solver step.

        Returns
        -------
        torch.Tensor
            Noise ``(n, n_latent)`` at ``t = 0``.
        """
        if self.objective != "flow":
            raise ValueError(
                "Inverting the sampler needs objective='flow' (the rectified flow's ODE); this "
                f"flow was trained with objective={self.objective!r}."
            )
        device = self.latent_mean.device
        cat = cat.to(device).long()
        cont = self.scale_continuous(cont.to(device).float())

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.velocity(x, t, cat, cont)

        x1 = self.standardize(z.to(device).float())
        return integrate(velocity, x1, n_steps, method, t0=1.0, t1=0.0, callback=callback)

    @torch.inference_mode()
    def sample(
        self,
        cat: torch.Tensor,
        cont: torch.Tensor,
        n_steps: int = 50,
        method: SamplerMethod | DiffusionMethod | None = None,
        cfg_scale: float = 1.0,
        noise: torch.Tensor | None = None,
        callback=None,
    ) -> torch.Tensor:
        """Generate latents (in the VAE latent space) for the given conditions.

        Parameters
        ----------
        cat
            Categorical codes ``(n, n_categorical)``; null-token codes mean "unspecified".
        cont
            Raw continuous conditions ``(n, n_continuous)``; NaN means "unspecified".
        n_steps
            Solver steps. Euler and DDIM evaluate the network ``n_steps`` times, midpoint
            and Heun ``2 * n_steps`` times.
        method
            With ``objective="flow"``: ``"euler"`` (the default), ``"midpoint"`` or
            ``"heun"``, see :func:`latentcell.module.integrate`. With ``objective="ddpm"``:
            ``"ddim"`` (the default), see :func:`latentcell.module.ddim_sample`.
        cfg_scale
            Classifier-free guidance weight ``w`` in ``v = v_null + w (v_cond - v_null)``
            (applied to the predicted noise for ``"ddpm"``); 1 is the plain conditional
            model, 0 the unconditional one.
        noise
            Starting points at ``t = 0``; drawn from the global torch RNG if omitted.
        callback
            Called with the step index after each solver step.

        Returns
        -------
        torch.Tensor
            Latents of shape ``(n, n_latent)``.
        """
        valid = SAMPLER_METHODS if self.objective == "flow" else DIFFUSION_METHODS
        if method is None:
            method = valid[0]
        if method not in valid:
            raise ValueError(
                f"method {method!r} is not valid for objective={self.objective!r}; "
                f"choose one of {valid}."
            )
        n = cat.shape[0]
        device = self.latent_mean.device
        cat = cat.to(device).long()
        cont = self.scale_continuous(cont.to(device).float())
        x0 = torch.randn(n, self.n_latent, device=device) if noise is None else noise.to(device)
        null_cat = self.condition.null_codes(n, device)
        null_cont = torch.full_like(cont, float("nan"))

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(
                self.velocity, x, t, (cat, cont), (null_cat, null_cont), cfg_scale
            )

        if self.objective == "flow":
            x = integrate(velocity, x0, n_steps=n_steps, method=method, callback=callback)
        else:
            x = ddim_sample(velocity, x0, n_steps=n_steps, callback=callback)
        return self.unstandardize(x)
