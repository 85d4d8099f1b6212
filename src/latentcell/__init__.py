"""latentcell: latent diffusion for single-cell omics, AnnData in and out."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("latentcell")
except PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"

logger = logging.getLogger("latentcell")

from latentcell import datasets, metrics, pl  # noqa: E402
from latentcell.model import LatentDiffusionModel  # noqa: E402

__all__ = ["LatentDiffusionModel", "__version__", "datasets", "metrics", "pl"]
