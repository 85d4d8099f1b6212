"""User-facing models: AnnData in, AnnData out."""

from latentcell.model._data import CountsDataModule
from latentcell.model._model import LatentDiffusionModel

__all__ = ["CountsDataModule", "LatentDiffusionModel"]
