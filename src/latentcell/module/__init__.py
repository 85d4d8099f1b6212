"""Torch modules: the latent flows, their ODE and DDIM samplers. Never imports AnnData."""

from latentcell.module._diffusion import (
    DIFFUSION_METHODS,
    cosine_alpha_bar,
    ddim_sample,
    ddim_step,
    diffuse,
    predict_data,
)
from latentcell.module._flow import OBJECTIVES, LatentFlow
from latentcell.module._joint import JointModule
from latentcell.module._multimodal import MODALITY_LIKELIHOODS, MultiModalVAE
from latentcell.module._path import (
    SAMPLER_METHODS,
    guided_velocity,
    integrate,
    interpolate,
    target_velocity,
)
from latentcell.module._perturbation import PerturbationFlow
from latentcell.module._translation import TranslationFlow

__all__ = [
    "DIFFUSION_METHODS",
    "MODALITY_LIKELIHOODS",
    "OBJECTIVES",
    "SAMPLER_METHODS",
    "JointModule",
    "LatentFlow",
    "MultiModalVAE",
    "PerturbationFlow",
    "TranslationFlow",
    "cosine_alpha_bar",
    "ddim_sample",
    "ddim_step",
    "diffuse",
    "guided_velocity",
    "integrate",
    "interpolate",
    "predict_data",
    "target_velocity",
]
