"""Torch modules: the latent flow and the path/sampler. Never imports AnnData."""

from latentcell.module._flow import LatentFlow
from latentcell.module._path import SAMPLER_METHODS, integrate, interpolate, target_velocity

__all__ = ["SAMPLER_METHODS", "LatentFlow", "integrate", "interpolate", "target_velocity"]
