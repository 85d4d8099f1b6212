"""Mean expression of genes along a continuous condition, generated and real."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from scipy import sparse


def _log_cp10k(adata: AnnData, genes: Sequence[str], layer: str | None, name: str) -> np.ndarray:
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise ValueError(f"{name} lacks gene(s) {missing[:5]}.")
    x = adata.X if layer is None else adata.layers[layer]
    x = x.toarray() if sparse.issparse(x) else np.asarray(x, dtype=float)
    total = np.maximum(x.sum(1, keepdims=True), 1e-12)
    idx = [adata.var_names.get_loc(g) for g in genes]
    return np.log1p(x[:, idx] / total * 1e4)


def _binned(values: np.ndarray, y: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bins = np.clip(np.digitize(values, edges[1:-1]), 0, len(edges) - 2)
    centers, means = [], []
    for b in range(len(edges) - 1):
        members = bins == b
        if members.any():
            centers.append(values[members].mean())
            means.append(y[members].mean(0))
    return np.asarray(centers), np.asarray(means)


def expression_along_path(
    generated: AnnData,
    genes: Sequence[str],
    key: str,
    real: AnnData | None = None,
    n_bins: int = 20,
    layer: str | None = None,
    n_cols: int = 4,
    return_fig: bool = False,
):
    """One panel per gene: mean log1p(CP10k) against a continuous condition.

    Generated cells (e.g. from :meth:`latentcell.LatentDiffusionModel.sample_path`) are drawn
    as a line, real cells (binned into ``n_bins`` equal-width bins of ``key`` over the range
    of both sets) as dots, so held-out or unmeasured stretches of the path stand out.

    Parameters
    ----------
    generated
        Cells with counts and ``obs[key]``. Not modified.
    genes
        Genes to show.
    key
        The continuous ``obs`` column (time, pseudotime, dose, ...).
    real
        Optional real cells with counts and ``obs[key]``. Not modified.
    n_bins
        Bins of ``key`` in which means are taken.
    layer
        Layer holding the counts in every object (``None``: ``.X``).
    n_cols
        Panels per row.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    genes = list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    sets = [("generated", generated)] + ([("real", real)] if real is not None else [])
    for name, a in sets:
        if key not in a.obs:
            raise ValueError(f"{name} has no obs column {key!r}.")
    values = {name: a.obs[key].to_numpy(dtype=float) for name, a in sets}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
    if finite.size == 0:
        raise ValueError(f"obs[{key!r}] has no finite values.")
    edges = np.linspace(finite.min(), finite.max() + 1e-12, n_bins + 1)
    n_cols = max(1, min(n_cols, len(genes)))
    n_rows = int(np.ceil(len(genes) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.8 * n_cols, 2.4 * n_rows), squeeze=False)
    for name, a in sets:
        v = values[name]
        keep = np.isfinite(v)
        y = _log_cp10k(a[keep], genes, layer, name)
        centers, means = _binned(v[keep], y, edges)
        for i, ax in enumerate(axes.ravel()[: len(genes)]):
            if name == "generated":
                ax.plot(centers, means[:, i], c="C1", lw=1.8, label="generated")
            else:
                ax.scatter(centers, means[:, i], s=12, c="0.3", label="real", zorder=3)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(genes):
            ax.set_visible(False)
            continue
        ax.set_title(genes[i], fontsize=9)
        ax.set_xlabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
        if i % n_cols == 0:
            ax.set_ylabel("mean log1p(CP10k)", fontsize=8)
    axes.ravel()[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig if return_fig else None
