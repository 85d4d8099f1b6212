"""Metrics comparing generated single cells with real held-out cells.

All metrics are computed in a fixed evaluation space fit on the real cells only
(:func:`fit_eval_space`: log1p(CP10k) + PCA).
"""

from __future__ import annotations

from latentcell.metrics._classifiers import knn_two_sample_accuracy, label_accuracy
from latentcell.metrics._distances import (
    energy_distance,
    median_heuristic_bandwidths,
    mmd_rbf,
    wasserstein,
)
from latentcell.metrics._evaluate import evaluate_generation, real_vs_real_null
from latentcell.metrics._space import EvalSpace, fit_eval_space, log1p_cp10k

__all__ = [
    "EvalSpace",
    "energy_distance",
    "evaluate_generation",
    "fit_eval_space",
    "knn_two_sample_accuracy",
    "label_accuracy",
    "log1p_cp10k",
    "median_heuristic_bandwidths",
    "mmd_rbf",
    "real_vs_real_null",
    "wasserstein",
]
