"""A fixed evaluation space (log1p-CP10k + PCA) fitted on real cells only."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

logger = logging.getLogger(__name__)

SPACE_NAME = "pca_log1p_cp10k"
TARGET_SUM = 1e4
_MAX_NAMES_IN_ERROR = 20


@dataclass(frozen=True)
class EvalSpace:
    """A frozen evaluation space: gene list, log1p(CP10k) normalisation and a PCA projection.

    Instances are created by :func:`fit_eval_space`; see there for the convention.

    Parameters
    ----------
    genes
        Ordered gene names (``var_names``) the space is defined on.
    mean
        Mean of the normalised real cells, shape ``(n_genes,)``.
    components
        PCA loadings fitted on the real cells, shape ``(n_comps, n_genes)``.
    seed
        Random seed used for the fit (recorded for provenance).
    explained_variance_ratio
        Fraction of the real cells' variance explained by each component.
    """

    genes: list[str]
    mean: np.ndarray
    components: np.ndarray
    seed: int = 0
    explained_variance_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n_genes = len(self.genes)
        if self.components.ndim != 2 or self.components.shape[1] != n_genes:
            raise ValueError(
                f"components must have shape (n_comps, {n_genes}), got {self.components.shape}."
            )
        if self.mean.shape != (n_genes,):
            raise ValueError(f"mean must have shape ({n_genes},), got {self.mean.shape}.")

    @property
    def n_comps(self) -> int:
        """Number of principal components of the space."""
        return int(self.components.shape[0])

    def transform(self, adata: AnnData, layer: str | None = None) -> np.ndarray:
        """Project cells into the evaluation space.

        Parameters
        ----------
        adata
            Cells with raw counts in ``.X`` or ``layer``. Must contain every gene of the space
            (extra genes are ignored; gene order does not matter).
        layer
            Layer holding the counts; ``None`` uses ``.X``.

        Returns
        -------
        numpy.ndarray
            Coordinates of shape ``(adata.n_obs, n_comps)``: log1p(CP10k) of the space's genes,
            minus the real-cell mean, projected on the real-cell principal axes.
        """
        counts = _select_genes(adata, self.genes, layer)
        normed = log1p_cp10k(counts)
        if sp.issparse(normed):
            projected = np.asarray(normed @ self.components.T) - self.mean @ self.components.T
        else:
            projected = (normed - self.mean) @ self.components.T
        return np.asarray(projected, dtype=np.float64)

    def to_dict(self, include_genes: bool = True) -> dict[str, Any]:
        """Describe the space, for recording next to metric values.

        Parameters
        ----------
        include_genes
            If ``True`` the full gene list is stored under ``"genes"``; otherwise only its length
            under ``"n_genes"``.

        Returns
        -------
        dict
            ``{"space": "pca_log1p_cp10k", "n_comps", "genes" | "n_genes", "seed",
            "fit_on": "real"}``.
        """
        out: dict[str, Any] = {"space": SPACE_NAME, "n_comps": self.n_comps}
        if include_genes:
            out["genes"] = list(self.genes)
        else:
            out["n_genes"] = len(self.genes)
        out["seed"] = self.seed
        out["fit_on"] = "real"
        return out


def log1p_cp10k(counts: np.ndarray | sp.spmatrix) -> np.ndarray | sp.csr_matrix:
    """Normalise each cell to 1e4 total counts and apply ``log1p``.

    Parameters
    ----------
    counts
        Non-negative counts, shape ``(n_cells, n_genes)``, dense or sparse.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        ``log1p(1e4 * counts / total)`` per cell (a new array; the input is not modified).
        Cells with a total of zero stay all-zero.
    """
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        totals = np.asarray(csr.sum(axis=1)).ravel()
        scale = _safe_scale(totals)
        csr = sp.csr_matrix(sp.diags(scale) @ csr)
        csr.data = np.log1p(csr.data)
        return csr
    dense = np.asarray(counts, dtype=np.float64)
    scale = _safe_scale(dense.sum(axis=1))
    return np.log1p(dense * scale[:, None])


def fit_eval_space(
    real: AnnData,
    n_comps: int = 30,
    n_top_genes: int | None = None,
    layer: str | None = None,
    seed: int = 0,
) -> EvalSpace:
    """Fit the evaluation space on real cells only.

    Convention (``"pca_log1p_cp10k"``):

    1. Inputs are raw counts, taken from ``.X`` or ``real.layers[layer]``.
    2. If ``n_top_genes`` is set and smaller than ``real.n_vars``, highly variable genes are
       selected on the *real* cells with ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``
       on the counts; otherwise all genes are kept. Gene order follows ``real.var_names``.
    3. Counts restricted to the selected genes are normalised to 1e4 per cell and
       ``log1p``-transformed (the library size is computed over the selected genes, so real and
       generated cells are normalised identically; cells with zero total stay zero).
    4. A PCA (scikit-learn, deterministic ``svd_solver="full"``, ``random_state=seed``) is fit
       on the *real* cells only. :meth:`EvalSpace.transform` subtracts the real mean and projects
       any AnnData on these axes.

    Parameters
    ----------
    real
        Real (held-out) cells with raw counts. Not modified.
    n_comps
        Number of principal components; at most ``min(n_cells, n_genes)``.
    n_top_genes
        Number of highly variable genes to keep, or ``None`` for all genes.
    layer
        Layer holding the counts; ``None`` uses ``.X``.
    seed
        Random seed for the PCA (recorded in the space).

    Returns
    -------
    EvalSpace
        The fitted space.
    """
    if real.n_obs < 2:
        raise ValueError(f"Need at least 2 real cells to fit the space, got {real.n_obs}.")
    if not real.var_names.is_unique:
        raise ValueError("real.var_names must be unique to define the evaluation space.")
    genes = _choose_genes(real, n_top_genes, layer)
    max_comps = min(real.n_obs, len(genes))
    if not 1 <= n_comps <= max_comps:
        raise ValueError(
            f"n_comps must be between 1 and min(n_cells, n_genes)={max_comps}, got {n_comps}."
        )
    normed = log1p_cp10k(_select_genes(real, genes, layer))
    dense = normed.toarray() if sp.issparse(normed) else normed
    pca = PCA(n_components=n_comps, svd_solver="full", random_state=seed)
    pca.fit(dense)
    logger.info(
        "Fitted evaluation space on %d real cells, %d genes, %d components (%.1f%% variance).",
        real.n_obs,
        len(genes),
        n_comps,
        100 * pca.explained_variance_ratio_.sum(),
    )
    return EvalSpace(
        genes=genes,
        mean=np.asarray(pca.mean_, dtype=np.float64),
        components=np.asarray(pca.components_, dtype=np.float64),
        seed=seed,
        explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
    )


def _choose_genes(real: AnnData, n_top_genes: int | None, layer: str | None) -> list[str]:
    all_genes = [str(g) for g in real.var_names]
    if n_top_genes is None or n_top_genes >= real.n_vars:
        return all_genes
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be a positive integer or None, got {n_top_genes}.")
    import scanpy as sc

    counts = _get_counts(real, layer)
    tmp = AnnData(X=counts, var=pd.DataFrame(index=real.var_names.copy()))
    hvg = sc.pp.highly_variable_genes(
        tmp, flavor="seurat_v3", n_top_genes=n_top_genes, inplace=False
    )
    mask = np.asarray(hvg.loc[real.var_names, "highly_variable"], dtype=bool)
    return [g for g, keep in zip(all_genes, mask, strict=True) if keep]


def _get_counts(adata: AnnData, layer: str | None) -> np.ndarray | sp.spmatrix:
    if layer is None:
        matrix = adata.X
        if matrix is None:
            raise ValueError("adata.X is None; pass `layer` naming the counts layer.")
    else:
        if layer not in adata.layers:
            raise ValueError(
                f"Layer {layer!r} not found; available layers: {list(adata.layers.keys())}."
            )
        matrix = adata.layers[layer]
    if not sp.issparse(matrix):
        matrix = np.asarray(matrix)
    values = matrix.data if sp.issparse(matrix) else matrix
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError("Counts contain non-finite values (NaN or inf).")
    if values.size and values.min() < 0:
        raise ValueError("Counts contain negative values; expected raw (non-negative) counts.")
    return matrix


def _select_genes(adata: AnnData, genes: list[str], layer: str | None) -> np.ndarray | sp.spmatrix:
    var_names = pd.Index([str(g) for g in adata.var_names])
    missing = [g for g in genes if g not in var_names]
    if missing:
        shown = ", ".join(missing[:_MAX_NAMES_IN_ERROR])
        more = (
            f" (and {len(missing) - _MAX_NAMES_IN_ERROR} more)"
            if len(missing) > _MAX_NAMES_IN_ERROR
            else ""
        )
        raise ValueError(
            f"{len(missing)} gene(s) of the evaluation space are missing from the data: "
            f"{shown}{more}."
        )
    if not var_names.is_unique:
        raise ValueError("adata.var_names must be unique to select the evaluation genes.")
    counts = _get_counts(adata, layer)
    if list(var_names) == list(genes):
        return counts
    index = var_names.get_indexer(genes)
    return counts[:, index]


def _safe_scale(totals: np.ndarray) -> np.ndarray:
    scale = np.zeros_like(totals, dtype=np.float64)
    positive = totals > 0
    scale[positive] = TARGET_SUM / totals[positive]
    return scale
