"""Plots: matplotlib figures of real and generated cells."""

from latentcell.pl._embedding import real_vs_generated_umap

__all__ = ["real_vs_generated_umap"]
