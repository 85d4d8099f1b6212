"""Spatial metrics: expression compared at matching positions after spatial smoothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree

from latentcell.metrics._space import _select_genes, log1p_cp10k


def smoothing_matrix(coords: np.ndarray, n_neighbors: int = 10) -> sp.csr_matrix:
    """Row-stochastic matrix averaging each cell with its spatial nearest neighbours.

    Parameters
    ----------
    coords
        Positions ``(n, n_dims)``.
    n_neighbors
        Neighbours besides the cell itself (Euclidean; at most ``n - 1``), as
        ``squidpy.gr.spatial_neighbors(coord_type="generic", n_neighs=n_neighbors)`` finds
        them.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n, n)`` CSR matrix ``S`` with ``1 / (k + 1)`` on each cell's row at itself and at its
        ``k`` neighbours, so ``S @ X`` is the neighbourhood mean of ``X``.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if n_neighbors < 0:
        raise ValueError(f"n_neighbors must be >= 0, got {n_neighbors}.")
    if n == 0:
        raise ValueError("Smoothing needs at least one cell.")
    k = min(int(n_neighbors), n - 1)
    _, idx = cKDTree(coords).query(coords, k=k + 1)
    idx = np.asarray(idx).reshape(n, k + 1)
    # cells sharing a position: make sure each row holds the cell itself
    missing_self = ~(idx == np.arange(n)[:, None]).any(axis=1)
    idx[missing_self, -1] = np.flatnonzero(missing_self)
    rows = np.repeat(np.arange(n), k + 1)
    return sp.csr_matrix((np.full(n * (k + 1), 1.0 / (k + 1)), (rows, idx.ravel())), (n, n))


def smoothed_gene_correlation(
    real: AnnData,
    generated: AnnData,
    spatial_key: str = "spatial",
    n_neighbors: int = 10,
    genes: list[str] | None = None,
    layer: str | None = None,
    generated_layer: str | None = None,
) -> pd.Series:
    """Per-gene Pearson correlation of spatially smoothed expression at the same positions.

    Convention: cell ``i`` of ``generated`` stands at the position of cell ``i`` of ``real``
    (``real.obsm[spatial_key]``; ``generated.obsm[spatial_key]``, when present, must match).
    Both are log1p(CP10k)-normalised, then each cell is replaced by the mean of itself and
    its ``n_neighbors`` nearest cells among the same positions (:func:`smoothing_matrix`),
    and each gene's smoothed profiles are correlated across cells. Smoothing scores the
    spatial pattern of a gene rather than single-cell noise, which a generator is meant to
    reproduce in distribution, not cell by cell.

    Parameters
    ----------
    real, generated
        AnnData with counts (``X`` or the given layers) at the same positions. Not modified.
    spatial_key
        ``obsm`` key of the positions.
    n_neighbors
        Neighbours averaged with each cell.
    genes
        Genes to score; default all genes of ``real`` (``generated`` must have them).
    layer, generated_layer
        Layers holding the counts; ``None`` uses ``X``.

    Returns
    -------
    pandas.Series
        Series of correlations indexed by gene; NaN for a gene constant in either smoothed set.
    """
    if spatial_key not in real.obsm:
        raise ValueError(f"real.obsm has no {spatial_key!r}; pass spatial_key=.")
    if generated.n_obs != real.n_obs:
        raise ValueError(
            f"generated has {generated.n_obs} cells and real {real.n_obs}; the metric compares "
            f"cells at the same positions, one generated cell per real one."
        )
    coords = np.asarray(real.obsm[spatial_key], dtype=np.float64)
    gen_coords = (
        np.asarray(generated.obsm[spatial_key], dtype=np.float64)
        if spatial_key in generated.obsm
        else coords
    )
    scale = float(max(np.ptp(coords), np.abs(coords).max())) if coords.size else 1.0
    if gen_coords.shape != coords.shape or not np.allclose(
        gen_coords, coords, rtol=0.0, atol=1e-6 * max(scale, 1e-12)
    ):
        raise ValueError(
            f"generated.obsm[{spatial_key!r}] differs from real's; generate one cell per real "
            f"position, in the same order."
        )
    genes = [str(g) for g in (real.var_names if genes is None else genes)]
    smooth = smoothing_matrix(coords, n_neighbors)
    a = _dense(smooth @ log1p_cp10k(_select_genes(real, genes, layer)))
    b = _dense(smooth @ log1p_cp10k(_select_genes(generated, genes, generated_layer)))
    a, b = a - a.mean(0), b - b.mean(0)
    denom = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 1e-12, (a * b).sum(0) / denom, np.nan)
    return pd.Series(corr, index=pd.Index(genes), name="smoothed_correlation")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
