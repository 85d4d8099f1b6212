"""Scores for predicted perturbation responses.

Convention: every score is computed on log1p(CP10k) expression of *count* AnnData objects.
Counts are read from ``.X`` or ``layers[layer]``; each cell is scaled to 1e4 total counts and
``log1p``-transformed with :func:`~latentcell.metrics.log1p_cp10k`. The library size is computed
over the *reference genes*, which are the ``var_names`` of the true perturbed cells (``true`` or
``perturbed``), so predicted, true and control cells are normalised identically. The other
AnnData objects must contain every reference gene (otherwise a ``ValueError`` names the missing
genes); their extra genes are ignored and gene order does not matter. A "mean profile" is the
per-gene mean over cells of this log1p(CP10k) expression. Inputs are never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.metrics import r2_score

from latentcell.metrics._classifiers import _check_k
from latentcell.metrics._distances import energy_distance
from latentcell.metrics._space import _get_counts, fit_eval_space, log1p_cp10k

logger = logging.getLogger(__name__)

_MAX_NAMES_IN_ERROR = 20


def top_de_genes(
    control: AnnData,
    perturbed: AnnData,
    k: int = 100,
    layer: str | None = None,
) -> list[str]:
    """Top-``k`` genes of the true perturbation response.

    Genes are ranked by the absolute difference of mean log1p(CP10k) expression between the
    true perturbed cells and the control cells, ``|mean(perturbed) - mean(control)|``, largest
    first. Ties are broken deterministically by gene name (ascending). The reference genes are
    ``perturbed.var_names``; ``control`` must contain all of them. If ``k`` exceeds the number
    of genes, all genes are returned (ranked).

    Parameters
    ----------
    control
        Control (unperturbed) cells with raw counts. Not modified.
    perturbed
        True perturbed cells with raw counts. Not modified.
    k
        Number of genes to return, ``k >= 1``.
    layer
        Layer holding the counts in both objects; ``None`` uses ``.X``.

    Returns
    -------
    list of str
        The ``min(k, n_genes)`` top genes, most changed first.
    """
    _check_k(k)
    genes = _reference_genes(perturbed, "perturbed")
    true_means = _mean_profile(perturbed, genes, layer, "perturbed")
    control_means = _mean_profile(control, genes, layer, "control")
    return _rank_de(control_means, true_means, genes, k)


def r2_mean_expression(
    pred: AnnData,
    true: AnnData,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
) -> dict[str, float | int]:
    """Agreement of predicted and true per-gene mean expression.

    Mean profiles are computed on log1p(CP10k) expression (library size over all genes of
    ``true``) and then restricted to ``genes``.

    Parameters
    ----------
    pred
        Predicted perturbed cells with raw counts. Not modified.
    true
        True perturbed cells with raw counts. Not modified.
    genes
        Genes to score (at least 2, all in ``true.var_names``); ``None`` uses all genes of
        ``true``.
    layer
        Layer holding the counts in both objects; ``None`` uses ``.X``.

    Returns
    -------
    dict
        ``{"r2_pearson", "r2_score", "n_genes"}``. ``r2_pearson`` is the squared Pearson
        correlation of the per-gene means (the scGen convention; NaN if either profile is
        constant); ``r2_score`` is ``sklearn.metrics.r2_score(true_means, pred_means)`` (the
        coefficient of determination, which also penalises offsets and scale errors and can be
        negative).
    """
    ref = _reference_genes(true, "true")
    idx = _gene_index(ref, genes)
    true_means = _mean_profile(true, ref, layer, "true")[idx]
    pred_means = _mean_profile(pred, ref, layer, "pred")[idx]
    return _r2_from_means(true_means, pred_means)


def delta_pearson(
    pred: AnnData,
    true: AnnData,
    control: AnnData,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
) -> float:
    """Pearson correlation between the predicted and the true change from control.

    The predicted change is ``mean(pred) - mean(control)`` and the true change is
    ``mean(true) - mean(control)``, per gene, on log1p(CP10k) mean profiles; the correlation is
    taken across genes.

    Parameters
    ----------
    pred
        Predicted perturbed cells with raw counts. Not modified.
    true
        True perturbed cells with raw counts. Not modified.
    control
        Control cells with raw counts. Not modified.
    genes
        Genes to score (at least 2, all in ``true.var_names``); ``None`` uses all genes of
        ``true``.
    layer
        Layer holding the counts in all objects; ``None`` uses ``.X``.

    Returns
    -------
    float
        The Pearson correlation in ``[-1, 1]``; NaN (with a warning) if either change is
        constant across the genes.
    """
    ref = _reference_genes(true, "true")
    idx = _gene_index(ref, genes)
    true_means = _mean_profile(true, ref, layer, "true")[idx]
    pred_means = _mean_profile(pred, ref, layer, "pred")[idx]
    control_means = _mean_profile(control, ref, layer, "control")[idx]
    return _pearson(pred_means - control_means, true_means - control_means)


def perturbation_energy(
    pred: AnnData,
    true: AnnData,
    n_comps: int = 30,
    seed: int = 0,
    layer: str | None = None,
) -> float:
    """Energy distance between predicted and true perturbed cells.

    The cells are projected into a PCA space of log1p(CP10k) expression fitted on the *true*
    cells only (:func:`~latentcell.metrics.fit_eval_space` on all genes of ``true``), and the
    energy distance (V-statistic, :func:`~latentcell.metrics.energy_distance`) is computed there.
    The number of components is capped at ``min(n_true_cells - 1, n_genes - 1)``.

    Parameters
    ----------
    pred
        Predicted perturbed cells with raw counts. Not modified.
    true
        True perturbed cells with raw counts (at least 2 cells and 2 genes). Not modified.
    n_comps
        Requested number of principal components, ``n_comps >= 1``.
    seed
        Random seed of the PCA.
    layer
        Layer holding the counts in both objects; ``None`` uses ``.X``.

    Returns
    -------
    float
        The energy distance (non-negative).
    """
    if n_comps < 1:
        raise ValueError(f"n_comps must be a positive integer, got {n_comps}.")
    ref = _reference_genes(true, "true")
    if true.n_obs < 2 or len(ref) < 2:
        raise ValueError(
            f"perturbation_energy needs at least 2 true cells and 2 genes, got {true.n_obs} "
            f"cells and {len(ref)} genes."
        )
    _check_cells(pred, "pred")
    _check_genes_present(pred, ref, "pred")
    used = min(n_comps, true.n_obs - 1, len(ref) - 1)
    if used < n_comps:
        logger.info("perturbation_energy: capping n_comps from %d to %d.", n_comps, used)
    space = fit_eval_space(true, n_comps=used, layer=layer, seed=seed)
    return energy_distance(space.transform(pred, layer=layer), space.transform(true, layer=layer))


def discrimination_score(
    preds: Mapping[str, AnnData],
    trues: Mapping[str, AnnData],
    layer: str | None = None,
) -> dict[str, dict[str, float] | float]:
    """How well each predicted perturbation identifies its own true perturbation.

    For each perturbation ``p``, the Euclidean distance is computed from the predicted mean
    profile of ``p`` to the true mean profile of every perturbation (log1p(CP10k), genes common
    to all true AnnData objects, in the order of the first one; library sizes over these genes).
    The normalised rank of ``p`` is the number of *other* true perturbations strictly closer
    than the true ``p``, divided by ``n_perturbations - 1``. It is 0 for a perfect
    identification, about 0.5 for a random guess and 1 when every other perturbation is closer.

    Parameters
    ----------
    preds
        Predicted cells per perturbation (raw counts). Not modified.
    trues
        True cells per perturbation (raw counts), with the same keys as ``preds`` and at least 2
        perturbations. Not modified.
    layer
        Layer holding the counts in all objects; ``None`` uses ``.X``.

    Returns
    -------
    dict
        ``{"per_perturbation": {p: normalized_rank}, "mean": mean normalized rank}``.
    """
    missing_pred = [p for p in trues if p not in preds]
    missing_true = [p for p in preds if p not in trues]
    if missing_pred or missing_true:
        raise ValueError(
            "preds and trues must have the same perturbations; missing from preds: "
            f"{_format_names(missing_pred)}; missing from trues: {_format_names(missing_true)}."
        )
    names = list(trues)
    if len(names) < 2:
        raise ValueError(f"discrimination_score needs at least 2 perturbations, got {len(names)}.")
    common = pd.Index(_reference_genes(trues[names[0]], f"trues[{names[0]!r}]"))
    for p in names[1:]:
        common = common.intersection(
            pd.Index(_reference_genes(trues[p], f"trues[{p!r}]")), sort=False
        )
    if len(common) == 0:
        raise ValueError("The true AnnData objects have no gene in common.")
    genes = list(common)
    true_means = np.vstack([_mean_profile(trues[p], genes, layer, f"trues[{p!r}]") for p in names])
    per: dict[str, float] = {}
    for i, p in enumerate(names):
        pred_mean = _mean_profile(preds[p], genes, layer, f"preds[{p!r}]")
        dists = np.sqrt(((true_means - pred_mean) ** 2).sum(axis=1))
        closer = int(np.sum(np.delete(dists, i) < dists[i]))
        per[p] = closer / (len(names) - 1)
    return {"per_perturbation": per, "mean": float(np.mean(list(per.values())))}


def score_perturbation(
    pred: AnnData,
    true: AnnData,
    control: AnnData,
    k: int = 100,
    n_comps: int = 30,
    seed: int = 0,
    layer: str | None = None,
) -> dict[str, float | int]:
    """All scores of one predicted perturbation response.

    The top-``k`` genes are those of the *true* response (:func:`top_de_genes` of ``control``
    and ``true``); if ``k`` exceeds the number of genes, all genes are used, but the keys still
    use the requested ``k``.

    Parameters
    ----------
    pred
        Predicted perturbed cells with raw counts. Not modified.
    true
        True perturbed cells with raw counts. Not modified.
    control
        Control cells with raw counts. Not modified.
    k
        Number of top differentially expressed genes, ``k >= 1``.
    n_comps
        Requested number of principal components for :func:`perturbation_energy`.
    seed
        Random seed of the PCA.
    layer
        Layer holding the counts in all objects; ``None`` uses ``.X``.

    Returns
    -------
    dict
        ``r2_pearson_all``, ``r2_score_all``, ``r2_pearson_top{k}``, ``r2_score_top{k}``,
        ``delta_pearson_all``, ``delta_pearson_top{k}``, ``energy``, ``n_pred``, ``n_true`` and
        ``k``.
    """
    _check_k(k)
    ref = _reference_genes(true, "true")
    true_means = _mean_profile(true, ref, layer, "true")
    pred_means = _mean_profile(pred, ref, layer, "pred")
    control_means = _mean_profile(control, ref, layer, "control")
    top = _rank_de(control_means, true_means, ref, k)
    idx = _gene_index(ref, top)
    if len(top) < 2:
        raise ValueError(f"k must be at least 2 to score the top genes, got {k}.")
    r2_all = _r2_from_means(true_means, pred_means)
    r2_top = _r2_from_means(true_means[idx], pred_means[idx])
    return {
        "r2_pearson_all": r2_all["r2_pearson"],
        "r2_score_all": r2_all["r2_score"],
        f"r2_pearson_top{k}": r2_top["r2_pearson"],
        f"r2_score_top{k}": r2_top["r2_score"],
        "delta_pearson_all": _pearson(pred_means - control_means, true_means - control_means),
        f"delta_pearson_top{k}": _pearson(
            pred_means[idx] - control_means[idx], true_means[idx] - control_means[idx]
        ),
        "energy": perturbation_energy(pred, true, n_comps=n_comps, seed=seed, layer=layer),
        "n_pred": int(pred.n_obs),
        "n_true": int(true.n_obs),
        "k": int(k),
    }


def _check_cells(adata: AnnData, name: str) -> None:
    if adata.n_obs == 0:
        raise ValueError(f"{name} has no cells.")


def _reference_genes(adata: AnnData, name: str) -> list[str]:
    genes = [str(g) for g in adata.var_names]
    if not genes:
        raise ValueError(f"{name} has no genes.")
    if not pd.Index(genes).is_unique:
        raise ValueError(f"{name}.var_names must be unique.")
    return genes


def _format_names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(str(n) for n in names[:_MAX_NAMES_IN_ERROR])
    extra = len(names) - _MAX_NAMES_IN_ERROR
    return f"{shown} (and {extra} more)" if extra > 0 else shown


def _check_genes_present(adata: AnnData, genes: Sequence[str], name: str) -> pd.Index:
    var_names = pd.Index([str(g) for g in adata.var_names])
    missing = [g for g in genes if g not in var_names]
    if missing:
        raise ValueError(
            f"{len(missing)} gene(s) are missing from {name}: {_format_names(missing)}."
        )
    if not var_names.is_unique:
        raise ValueError(f"{name}.var_names must be unique.")
    return var_names


def _mean_profile(adata: AnnData, genes: Sequence[str], layer: str | None, name: str) -> np.ndarray:
    """Per-gene mean of log1p(CP10k) over ``genes`` (library size over ``genes``)."""
    _check_cells(adata, name)
    var_names = _check_genes_present(adata, genes, name)
    counts = _get_counts(adata, layer)
    if list(var_names) != list(genes):
        counts = counts[:, var_names.get_indexer(genes)]
    normed = log1p_cp10k(counts)
    means = normed.mean(axis=0) if sp.issparse(normed) else np.mean(normed, axis=0)
    return np.asarray(means, dtype=np.float64).ravel()


def _gene_index(ref: Sequence[str], genes: Sequence[str] | None) -> np.ndarray:
    if genes is None:
        return np.arange(len(ref))
    if isinstance(genes, str):
        raise ValueError("genes must be a sequence of gene names, not a single string.")
    genes = [str(g) for g in genes]
    ref_index = pd.Index(ref)
    missing = [g for g in genes if g not in ref_index]
    if missing:
        raise ValueError(
            f"{len(missing)} requested gene(s) are missing from true: {_format_names(missing)}."
        )
    if not pd.Index(genes).is_unique:
        raise ValueError("genes must not contain duplicates.")
    return ref_index.get_indexer(genes)


def _rank_de(
    control_means: np.ndarray, true_means: np.ndarray, genes: Sequence[str], k: int
) -> list[str]:
    score = np.abs(true_means - control_means)
    names = [str(g) for g in genes]
    order = sorted(range(len(names)), key=lambda i: (-float(score[i]), names[i]))
    return [names[i] for i in order[:k]]


def _r2_from_means(true_means: np.ndarray, pred_means: np.ndarray) -> dict[str, float | int]:
    n_genes = int(true_means.shape[0])
    if n_genes < 2:
        raise ValueError(f"At least 2 genes are needed to compute r2, got {n_genes}.")
    r = _pearson(pred_means, true_means)
    return {
        "r2_pearson": float(r**2),
        "r2_score": float(r2_score(true_means, pred_means)),
        "n_genes": n_genes,
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] < 2:
        raise ValueError(
            f"At least 2 genes are needed for a Pearson correlation, got {a.shape[0]}."
        )
    a_c = a - a.mean()
    b_c = b - b.mean()
    denom = float(np.sqrt((a_c**2).sum() * (b_c**2).sum()))
    if denom == 0.0:
        logger.warning("Pearson correlation undefined (constant profile); returning NaN.")
        return float("nan")
    return float(np.clip((a_c @ b_c) / denom, -1.0, 1.0))
