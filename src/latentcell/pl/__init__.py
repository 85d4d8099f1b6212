"""Plots: matplotlib figures of real and generated cells and of training."""

from latentcell.pl._embedding import real_vs_generated_umap
from latentcell.pl._history import training_history

__all__ = ["real_vs_generated_umap", "training_history"]
