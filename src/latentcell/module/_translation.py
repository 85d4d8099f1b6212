"""A conditional flow from noise to a cell's joint latent, given its latent from one modality."""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from latentcell._constants import FLOW_KEYS
from latentcell.module._path import (
    SamplerMethod,
    guided_velocity,
    integrate,
    interpolate,
    target_velocity,
)
from latentcell.nn import MLPDenoiser


class TranslationFlow(BaseModuleClass):
    """Rectified flow for ``p(z | z_source)``: the joint latent given one modality's latent.

    ``z`` is a cell's posterior mean under all of its modalities, ``z_source`` its posterior
    mean when the encoder sees the source modality only (e.g. RNA). Sampling from noise under
    a ``z_source`` draws latents of complete cells consistent with the observed modality,
    and decoding them gives the missing modality with its uncertainty, rather than one
    decoded mean. The source vector is embedded by an MLP and conditions the denoiser like
    the labels of :class:`LatentFlow`; it is dropped to a learned null vector for a fraction
    ``p_uncond`` of training cells, so classifier-free guidance is available.

    Parameters
    ----------
    n_latent
        Size of the latent vectors.
    n_hidden, n_layers, dropout
        Width, depth and dropout of the MLP denoiser.
    p_uncond
        Probability of dropping the source of a training cell.
    """

    def __init__(
        self,
        n_latent: int,
        n_hidden: int = 128,
        n_layers: int = 4,
        dropout: float = 0.0,
        p_uncond: float = 0.1,
    ):
        super().__init__()
        self.n_latent = n_latent
        self.p_uncond = p_uncond
        self.embedding = nn.Sequential(
            nn.Linear(n_latent, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden)
        )
        self.null = nn.Parameter(torch.zeros(n_hidden))
        self.denoiser = MLPDenoiser(n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
        self.register_buffer("latent_mean", torch.zeros(n_latent))
        self.register_buffer("latent_std", torch.ones(n_latent))
        self.register_buffer("source_mean", torch.zeros(n_latent))
        self.register_buffer("source_std", torch.ones(n_latent))

    def set_scaling(self, z: torch.Tensor, z_source: torch.Tensor) -> None:
        """Record per-dimension mean and standard deviation of the targets and sources."""
        self.latent_mean.copy_(z.mean(0))
        self.latent_std.copy_(z.std(0).clamp_min(1e-4))
        self.source_mean.copy_(z_source.mean(0))
        self.source_std.copy_(z_source.std(0).clamp_min(1e-4))

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, source: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        """Velocity at standardised ``x``, time ``t`` and ``source``; ``drop`` nulls sources."""
        c = torch.where(drop[:, None], self.null.expand(x.shape[0], -1), self.embedding(source))
        return self.denoiser(x, t, c)

    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        return {"tensors": tensors}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {}

    @auto_move_data
    def inference(self, tensors: dict) -> dict:
        """Standardise the target and source latents of a batch."""
        return {
            "x1": (tensors[FLOW_KEYS.LATENT] - self.latent_mean) / self.latent_std,
            "source": (tensors[FLOW_KEYS.SOURCE] - self.source_mean) / self.source_std,
        }

    def generative(self) -> dict:
        """Return nothing: the flow has no separate generative pass during training."""
        return {}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        """Flow-matching loss with source dropout (fixed noise/times/mask if the batch has them)."""
        x1, source = inference_outputs["x1"], inference_outputs["source"]
        n, device = x1.shape[0], x1.device
        x0 = tensors.get(FLOW_KEYS.NOISE)
        x0 = torch.randn_like(x1) if x0 is None else x0.to(device)
        t = tensors.get(FLOW_KEYS.TIME)
        t = torch.rand(n, device=device) if t is None else t.to(device).reshape(-1)
        drop = tensors.get(FLOW_KEYS.DROP)
        if drop is None:
            drop = torch.rand(n, device=device) < self.p_uncond
        else:
            drop = drop.to(device).bool().reshape(n, -1).any(-1)
        v = self.velocity(interpolate(x0, x1, t), t, source, drop)
        per_cell = ((v - target_velocity(x0, x1)) ** 2).mean(-1)
        loss = per_cell.mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=per_cell,
            n_obs_minibatch=n,
            extra_metrics={"translation_loss": loss.detach()},
        )

    @torch.inference_mode()
    def sample(
        self,
        z_source: torch.Tensor,
        n_steps: int = 20,
        method: SamplerMethod = "midpoint",
        cfg_scale: float = 1.0,
        noise: torch.Tensor | None = None,
        callback=None,
    ) -> torch.Tensor:
        """Draw joint latents (VAE space) for source latents ``(n, n_latent)``.

        ``cfg_scale`` weighs ``v = v_null + w (v_source - v_null)``; 1 is the plain
        conditional flow. ``noise`` gives the starting points (drawn if omitted).
        """
        device = self.latent_mean.device
        source = (z_source.to(device) - self.source_mean) / self.source_std
        n = source.shape[0]
        x0 = torch.randn(n, self.n_latent, device=device) if noise is None else noise.to(device)
        keep = torch.zeros(n, dtype=torch.bool, device=device)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(self.velocity, x, t, (source, keep), (source, ~keep), cfg_scale)

        x = integrate(velocity, x0, n_steps=n_steps, method=method, callback=callback)
        return x * self.latent_std + self.latent_mean
