"""Gene-level agreement between generated and real cells (per-gene moments)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from latentcell.metrics._space import _select_genes, log1p_cp10k

logger = logging.getLogger(__name__)

_MAX_NAMES_IN_ERROR = 5


def gene_moment_correlation(
    real: AnnData,
    generated: AnnData,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
) -> dict[str, float | int]:
    """Pearson correlation, across genes, of per-gene means and variances (real vs generated).

    Counts of the chosen genes are normalised with :func:`log1p_cp10k` (the library size is
    computed over the chosen genes, as in :func:`fit_eval_space`), then each gene's mean and
    variance (``ddof=1``) over cells are computed separately for ``real`` and ``generated``.
    The returned values are the Pearson correlations, over genes, between the real and the
    generated means, and between the real and the generated variances. A correlation is
    undefined (``nan``, with a warning) when fewer than 2 genes are used or when either vector
    is constant.

    Parameters
    ----------
    real
        Real cells with raw counts (at least 2 cells). Not modified.
    generated
        Generated cells with raw counts (at least 2 cells). Not modified.
    layer
        Layer holding the counts in both AnnData objects; ``None`` uses ``.X``.
    genes
        Genes to compare, which both objects must contain. ``None`` uses all genes of ``real``
        (in ``real.var_names`` order), which ``generated`` must contain; extra genes of
        ``generated`` are ignored.

    Returns
    -------
    dict
        ``{"mean_pearson": float, "var_pearson": float, "n_genes": int}``.
    """
    for name, adata in (("real", real), ("generated", generated)):
        if not isinstance(adata, AnnData):
            raise ValueError(f"{name} must be an AnnData, got {type(adata).__name__}.")
        if adata.n_obs < 2:
            raise ValueError(f"{name} must contain at least 2 cells, got {adata.n_obs}.")
    if genes is None:
        chosen = [str(g) for g in real.var_names]
        _check_has_genes(generated, chosen, "generated", "genes of real")
    else:
        if isinstance(genes, str):
            raise ValueError("genes must be a sequence of gene names, not a single string.")
        chosen = [str(g) for g in genes]
        if not chosen:
            raise ValueError("genes must not be empty.")
        if len(set(chosen)) != len(chosen):
            raise ValueError("genes contains duplicate names.")
        _check_has_genes(real, chosen, "real", "requested genes")
        _check_has_genes(generated, chosen, "generated", "requested genes")
    mean_real, var_real = _gene_moments(real, chosen, layer)
    mean_gen, var_gen = _gene_moments(generated, chosen, layer)
    return {
        "mean_pearson": _pearson(mean_real, mean_gen, "means"),
        "var_pearson": _pearson(var_real, var_gen, "variances"),
        "n_genes": len(chosen),
    }


def _check_has_genes(adata: AnnData, genes: list[str], name: str, what: str) -> None:
    present = {str(g) for g in adata.var_names}
    missing = [g for g in genes if g not in present]
    if missing:
        shown = ", ".join(missing[:_MAX_NAMES_IN_ERROR])
        more = "" if len(missing) <= _MAX_NAMES_IN_ERROR else ", ..."
        raise ValueError(f"{name} lacks {len(missing)} of the {len(genes)} {what}: {shown}{more}.")


def _gene_moments(adata: AnnData, genes: list[str], layer: str | None) -> tuple[np.ndarray, ...]:
    normed = log1p_cp10k(_select_genes(adata, genes, layer))
    n = normed.shape[0]
    if sp.issparse(normed):
        mean = np.asarray(normed.mean(axis=0)).ravel()
        mean_sq = np.asarray(normed.multiply(normed).mean(axis=0)).ravel()
        var = np.maximum(mean_sq - mean**2, 0.0) * n / (n - 1)
    else:
        mean = normed.mean(axis=0)
        var = normed.var(axis=0, ddof=1)
    return np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)


def _pearson(a: np.ndarray, b: np.ndarray, what: str) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        logger.warning("Pearson correlation of per-gene %s is undefined; returning nan.", what)
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
