"""A flow that carries control cells to perturbed cells in the VAE latent space. Tensors only."""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from latentcell.module._path import (
    SamplerMethod,
    guided_velocity,
    integrate,
    interpolate,
    target_velocity,
)
from latentcell.nn import MLPDenoiser

#: Batch keys of the perturbation flow's training pairs.
SOURCE_KEY = "z_source"
TARGET_KEY = "z_target"
PERTURBATION_KEY = "perturbation_vector"
TIME_KEY = "t"


class PerturbationFlow(BaseModuleClass):
    """Flow matching from control latents to perturbed latents, given a perturbation vector.

    Training pairs ``(source, target)`` are a control cell and a perturbed cell of the same
    context (cell type, batch), matched by minibatch optimal transport; identity pairs of two
    control cells under the zero vector teach the flow to leave unperturbed cells in place.
    The network sees where a cell is (its latent), when (``t``) and what was done to it (the
    perturbation vector: a sum of one-hot or user-supplied embedding vectors of the
    perturbation's components, plus an optional dose), never the cell type, so that it can
    be applied to cell types whose perturbed state was never observed.

    Parameters
    ----------
    n_latent
        Size of the latent vectors.
    n_condition
        Length of the perturbation vector.
    n_hidden, n_layers, dropout
        Width, depth and dropout of the MLP velocity network.
    residual
        Learn the velocity as a correction to a linear latent shift: ``v = c W + net(x, t, c)``
        with ``W`` fitted by least squares to the training displacements (see
        :meth:`set_shift`). The network's last layer starts at zero, so training starts
        from scGen-style latent arithmetic and learns where cells deviate from it.
    """

    def __init__(
        self,
        n_latent: int,
        n_condition: int,
        n_hidden: int = 128,
        n_layers: int = 4,
        dropout: float = 0.0,
        residual: bool = False,
    ):
        super().__init__()
        self.n_latent = n_latent
        self.n_condition = n_condition
        self.residual = residual
        self.embedding = nn.Sequential(
            nn.Linear(n_condition, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden)
        )
        self.denoiser = MLPDenoiser(n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
        self.register_buffer("latent_mean", torch.zeros(n_latent))
        self.register_buffer("latent_std", torch.ones(n_latent))
        self.register_buffer("shift_weight", torch.zeros(n_condition, n_latent))

    def set_scaling(self, z: torch.Tensor) -> None:
        """Record per-dimension mean and standard deviation of the training latents."""
        self.latent_mean.copy_(z.mean(0))
        self.latent_std.copy_(z.std(0).clamp_min(1e-4))

    def set_shift(self, condition: torch.Tensor, displacement: torch.Tensor) -> None:
        """Fit the linear shift ``W`` of the residual parameterisation by least squares.

        Parameters
        ----------
        condition
            Perturbation vectors of training cells ``(n, n_condition)``.
        displacement
            Their standardised latent minus the mean standardised latent of the controls of
            their group ``(n, n_latent)`` (zero for controls).
        """
        solution = torch.linalg.lstsq(condition.double(), displacement.double()).solution
        self.shift_weight.copy_(solution.float())

    def velocity(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Velocity at standardised ``x`` and time ``t`` under perturbation vectors."""
        v = self.denoiser(x, t, self.embedding(condition))
        if self.residual:
            v = v + condition @ self.shift_weight
        return v

    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        return {"tensors": tensors}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {}

    @auto_move_data
    def inference(self, tensors: dict) -> dict:
        """Standardise the source and target latents of a batch of pairs."""
        return {
            "x0": (tensors[SOURCE_KEY] - self.latent_mean) / self.latent_std,
            "x1": (tensors[TARGET_KEY] - self.latent_mean) / self.latent_std,
            "condition": tensors[PERTURBATION_KEY].float(),
        }

    def generative(self) -> dict:
        """Return nothing: the flow has no separate generative pass during training."""
        return {}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        """Flow-matching loss on the straight path from each source to its target."""
        x0, x1 = inference_outputs["x0"], inference_outputs["x1"]
        n = x0.shape[0]
        t = tensors.get(TIME_KEY)
        t = torch.rand(n, device=x0.device) if t is None else t.to(x0.device).reshape(-1)
        v = self.velocity(interpolate(x0, x1, t), t, inference_outputs["condition"])
        per_pair = ((v - target_velocity(x0, x1)) ** 2).mean(-1)
        loss = per_pair.mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=per_pair,
            n_obs_minibatch=n,
            extra_metrics={"perturbation_loss": loss.detach()},
        )

    @torch.inference_mode()
    def transport(
        self,
        z: torch.Tensor,
        condition: torch.Tensor,
        n_steps: int = 20,
        method: SamplerMethod = "midpoint",
        cfg_scale: float = 1.0,
        callback=None,
    ) -> torch.Tensor:
        """Carry latents ``z`` (VAE space) along the flow of the given perturbation vectors.

        Parameters
        ----------
        z
            Source latents ``(n, n_latent)``.
        condition
            Perturbation vectors ``(n, n_condition)``.
        n_steps, method
            ODE solver settings, see :func:`latentcell.module.integrate`.
        cfg_scale
            Effect-size weight ``w`` in ``v = v_0 + w (v_p - v_0)``, where ``v_0`` is the
            velocity under the zero vector (no perturbation); 1 is the learned response.
        callback
            Called after each solver step.

        Returns
        -------
        torch.Tensor
            Predicted perturbed latents ``(n, n_latent)`` in the VAE latent space.
        """
        device = self.latent_mean.device
        x0 = (z.to(device) - self.latent_mean) / self.latent_std
        condition = condition.to(device).float()
        null = torch.zeros_like(condition)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(self.velocity, x, t, (condition,), (null,), cfg_scale)

        x = integrate(velocity, x0, n_steps=n_steps, method=method, callback=callback)
        return x * self.latent_std + self.latent_mean
