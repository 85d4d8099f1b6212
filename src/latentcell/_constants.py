"""Keys shared by the model and the modules."""

from __future__ import annotations

from typing import NamedTuple


class _FlowKeys(NamedTuple):
    LATENT: str = "z"
    COND_CAT: str = "cond_cat"
    COND_CONT: str = "cond_cont"
    NOISE: str = "x0"
    TIME: str = "t"
    DROP: str = "drop"
    SOURCE: str = "z_source"


FLOW_KEYS = _FlowKeys()

#: Default key of the latent representation in ``obsm``.
LATENT_KEY = "X_latentcell"
#: Layer holding decoded mean expression in generated AnnData.
MEAN_LAYER = "latentcell_mean"
#: scvi-tools registry keys of the perturbation label and dose of each cell.
PERTURBATION_FIELD = "perturbation"
DOSE_FIELD = "dose"
#: scvi-tools registry key of continuous conditions of the flow that the VAE never sees.
CONT_CONDITIONS_FIELD = "continuous_conditions"
#: scvi-tools registry key of the spatial coordinates (``obsm``) of each cell.
SPATIAL_FIELD = "spatial"
