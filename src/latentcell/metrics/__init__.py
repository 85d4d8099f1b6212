"""Metrics comparing generated single cells with real held-out cells.

All distribution metrics are computed in a fixed evaluation space fit on the real cells only
(:func:`fit_eval_space`: log1p(CP10k) + PCA). Perturbation scores work on log1p(CP10k)
expression of count AnnData.
"""

from __future__ import annotations

from latentcell.metrics._classifiers import knn_two_sample_accuracy, label_accuracy
from latentcell.metrics._distances import (
    energy_distance,
    median_heuristic_bandwidths,
    mmd_rbf,
    wasserstein,
)
from latentcell.metrics._evaluate import (
    evaluate_by_condition,
    evaluate_generation,
    real_vs_real_null,
)
from latentcell.metrics._genes import gene_moment_correlation
from latentcell.metrics._perturbation import (
    delta_pearson,
    discrimination_score,
    perturbation_energy,
    r2_mean_expression,
    score_perturbation,
    top_de_genes,
)
from latentcell.metrics._prdc import precision_recall_density_coverage
from latentcell.metrics._space import EvalSpace, fit_eval_space, log1p_cp10k
from latentcell.metrics._spatial import smoothed_gene_correlation, smoothing_matrix

__all__ = [
    "EvalSpace",
    "delta_pearson",
    "discrimination_score",
    "energy_distance",
    "evaluate_by_condition",
    "evaluate_generation",
    "fit_eval_space",
    "gene_moment_correlation",
    "knn_two_sample_accuracy",
    "label_accuracy",
    "log1p_cp10k",
    "median_heuristic_bandwidths",
    "mmd_rbf",
    "perturbation_energy",
    "precision_recall_density_coverage",
    "r2_mean_expression",
    "real_vs_real_null",
    "score_perturbation",
    "smoothed_gene_correlation",
    "smoothing_matrix",
    "top_de_genes",
    "wasserstein",
]
