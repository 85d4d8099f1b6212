"""Seeded synthetic counts with known cell-type and batch structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse


def synthetic_counts(
    n_cells: int = 600,
    n_genes: int = 100,
    n_cell_types: int = 3,
    n_batches: int = 2,
    dispersion: float = 5.0,
    seed: int = 0,
) -> AnnData:
    """Negative binomial counts from cell-type programs with a multiplicative batch effect.

    Each cell type has its own log-mean profile (a shared baseline plus type-specific
    up-regulated marker genes); each batch scales every gene by a log-normal factor; library
    sizes vary log-normally around 2,000. Counts are drawn as Gamma-Poisson (negative
    binomial) with inverse dispersion ``dispersion``.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the data.
    n_cell_types, n_batches
        Number of labels in ``obs['cell_type']`` and ``obs['batch']``.
    dispersion
        Inverse dispersion (theta) of the negative binomial.
    seed
        Seed of all draws.

    Returns
    -------
    anndata.AnnData
        AnnData with counts in ``.X`` (float32, CSR) and ``layers['counts']``, ``obs`` with
        ``cell_type``, ``batch`` and a continuous ``score`` in [0, 1], and the true per-cell
        means in ``layers['true_mean']``. ``uns['ground_truth']`` holds the cell-type log-mean
        profiles (``cell_types x genes``) and the batch log-factors.
    """
    rng = np.random.default_rng(seed)
    profiles = _cell_type_profiles(rng, n_genes, n_cell_types)
    batch_effect = rng.normal(0.0, 0.3, size=(n_batches, n_genes))
    cell_type = rng.integers(0, n_cell_types, size=n_cells)
    batch = rng.integers(0, n_batches, size=n_cells)
    score = rng.uniform(0.0, 1.0, size=n_cells)
    logits = profiles[cell_type] + batch_effect[batch]
    proportions = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    library = rng.lognormal(np.log(2000.0), 0.3, size=n_cells)
    mean = proportions * library[:, None]
    rate = rng.gamma(dispersion, mean / dispersion)
    counts = rng.poisson(rate).astype(np.float32)
    empty = counts.sum(1) == 0
    counts[empty, 0] = 1.0
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{k}" for k in cell_type]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
            "score": score,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    x = sparse.csr_matrix(counts)
    adata = AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.layers["true_mean"] = mean.astype(np.float32)
    adata.uns["ground_truth"] = {
        "profiles": profiles,
        "batch_effect": batch_effect,
        "cell_types": [f"type_{k}" for k in range(n_cell_types)],
    }
    return adata


def synthetic_perturbation(
    n_cells: int = 900,
    n_genes: int = 60,
    n_cell_types: int = 3,
    perturbations: tuple[str, ...] = ("A", "B", "A+B"),
    effect: float = 1.5,
    dispersion: float = 5.0,
    n_programs: int | None = None,
    seed: int = 0,
) -> AnnData:
    """Simulate control and perturbed cells with known, cell-type-dependent responses.

    Every single perturbation (the components of the names in ``perturbations``, split on
    ``"+"``) raises or lowers its own random tenth of the genes by ``effect`` on the log
    scale, scaled by a cell-type factor (1, 1.5, 2, ...), so the response depends on the
    context. With ``n_programs``, singles act through shared gene programs instead: each
    program raises or lowers its own random tenth of the genes by ``effect``, and each
    single's log-fold change is a signed combination of two programs (weights +-1 or +-0.5),
    so perturbations that share programs share effects, and the weights
    (``uns['ground_truth']['program_weights']``) are what an informative perturbation
    embedding knows. A combination's log-fold change is the sum of its components'
    (additive ground truth). Controls make up a share of cells equal to each
    perturbation's.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the data.
    n_cell_types
        Number of labels in ``obs['cell_type']``.
    perturbations
        Perturbation labels besides ``"ctrl"``; combinations are joined with ``"+"``.
    effect
        Size of each single perturbation's log-fold change.
    dispersion
        Inverse dispersion (theta) of the negative binomial.
    n_programs
        Number of shared gene programs behind the singles' effects (``None``: every single
        has its own genes).
    seed
        Seed of all draws.

    Returns
    -------
    anndata.AnnData
        AnnData with counts in ``.X`` and ``layers['counts']``, ``obs`` with ``cell_type``,
        ``condition`` (``"ctrl"`` or a perturbation) and ``batch``, the true means in
        ``layers['true_mean']``, and in ``uns['ground_truth']`` the log-fold change of every
        single perturbation (``singles x genes``), the cell-type scales and the base profiles
        (and, with ``n_programs``, the singles' program weights, ``singles x programs``).
    """
    rng = np.random.default_rng(seed)
    profiles = _cell_type_profiles(rng, n_genes, n_cell_types)
    singles = sorted({c for p in perturbations for c in p.split("+") if c})
    n_hit = max(1, n_genes // 10)
    n_sets = len(singles) if n_programs is None else int(n_programs)
    if n_sets < (1 if n_programs is None else 2):
        raise ValueError(f"n_programs must be at least 2, got {n_programs}.")
    gene_sets = np.zeros((n_sets, n_genes))
    for i in range(n_sets):
        genes = rng.choice(n_genes, size=n_hit, replace=False)
        gene_sets[i, genes] = effect * rng.choice([-1.0, 1.0], size=n_hit)
    if n_programs is None:
        weights, lfc = None, gene_sets
    else:
        weights = np.zeros((len(singles), n_sets))
        for i in range(len(singles)):
            chosen = rng.choice(n_sets, size=2, replace=False)
            weights[i, chosen] = rng.choice([-1.0, -0.5, 0.5, 1.0], size=2)
        lfc = weights @ gene_sets
    type_scale = 1.0 + 0.5 * np.arange(n_cell_types)
    labels = np.array(["ctrl", *perturbations], dtype=object)
    condition = labels[rng.integers(0, len(labels), size=n_cells)]
    cell_type = rng.integers(0, n_cell_types, size=n_cells)
    batch = rng.integers(0, 2, size=n_cells)
    logits = profiles[cell_type].copy()
    for j, label in enumerate(labels[1:], start=1):
        rows = condition == labels[j]
        parts = [singles.index(c) for c in label.split("+") if c]
        logits[rows] += type_scale[cell_type[rows], None] * lfc[parts].sum(0)
    proportions = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    library = rng.lognormal(np.log(2000.0), 0.3, size=n_cells)
    mean = proportions * library[:, None]
    counts = rng.poisson(rng.gamma(dispersion, mean / dispersion)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1.0
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{k}" for k in cell_type]),
            "condition": pd.Categorical(condition, categories=list(labels)),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    x = sparse.csr_matrix(counts)
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)]))
    adata.layers["counts"] = x.copy()
    adata.layers["true_mean"] = mean.astype(np.float32)
    adata.uns["ground_truth"] = {
        "singles": singles,
        "log_fold_changes": lfc,
        "cell_type_scale": type_scale,
        "profiles": profiles,
    }
    if weights is not None:
        adata.uns["ground_truth"]["program_weights"] = weights
    return adata


def _cell_type_profiles(rng: np.random.Generator, n_genes: int, n_cell_types: int) -> np.ndarray:
    """Log-mean profiles: a shared baseline plus up-regulated markers per cell type."""
    base = rng.normal(-1.0, 1.0, size=n_genes)
    profiles = np.tile(base, (n_cell_types, 1))
    markers = np.array_split(rng.permutation(n_genes), n_cell_types)
    for k, genes in enumerate(markers):
        profiles[k, genes[: max(1, len(genes) // 2)]] += 2.5
    return profiles
