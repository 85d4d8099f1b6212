"""Plots: matplotlib figures of real and generated cells, of training and of sampling cost."""

from latentcell.pl._de import volcano
from latentcell.pl._embedding import real_vs_generated_umap
from latentcell.pl._history import training_history
from latentcell.pl._path import expression_along_path
from latentcell.pl._perturbation import mean_expression_scatter
from latentcell.pl._programs import program_activity
from latentcell.pl._spatial import imputed_region
from latentcell.pl._steps import steps_quality
from latentcell.pl._translation import translation_scatter

__all__ = [
    "expression_along_path",
    "imputed_region",
    "mean_expression_scatter",
    "program_activity",
    "real_vs_generated_umap",
    "steps_quality",
    "training_history",
    "translation_scatter",
    "volcano",
]
