"""Building blocks: embeddings and denoisers. Knows neither AnnData nor the model."""

from latentcell.nn._denoisers import (
    AdaLNZero,
    CrossAttention,
    DiTBlock,
    DiTDenoiser,
    MLPDenoiser,
)
from latentcell.nn._embeddings import (
    ConditionEmbedding,
    FourierFeatures,
    TimeEmbedding,
    sinusoidal_embedding,
)

__all__ = [
    "AdaLNZero",
    "ConditionEmbedding",
    "CrossAttention",
    "DiTBlock",
    "DiTDenoiser",
    "FourierFeatures",
    "MLPDenoiser",
    "TimeEmbedding",
    "sinusoidal_embedding",
]
