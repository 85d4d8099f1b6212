"""Plots of tissue sections: an imputed region next to the measured one."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from scipy import sparse

from latentcell.metrics import log1p_cp10k


def _expression(adata: AnnData, genes: Sequence[str], layer: str | None, name: str) -> np.ndarray:
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise ValueError(f"{name} lacks gene(s) {missing}.")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"{name} has no layer {layer!r}; layers: {list(adata.layers)}.")
    x = adata.X if layer is None else adata.layers[layer]
    x = log1p_cp10k(x)
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return x[:, adata.var_names.get_indexer(list(genes))]


def imputed_region(
    adata: AnnData,
    imputed: AnnData,
    genes: Sequence[str],
    spatial_key: str = "spatial",
    layer: str | None = None,
    imputed_layer: str | None = None,
    point_size: float | None = None,
    cmap: str = "viridis",
    return_fig: bool = False,
):
    """Show the measured section beside the section with a region filled by generated cells.

    One row per gene: on the left the measured expression of every cell of ``adata``; on the
    right the same section where the cells of the region (those of ``adata`` named like the
    rows of ``imputed``, as :meth:`~latentcell.LatentDiffusionModel.impute_region` names them
    for a mask) are replaced by the generated cells at their positions; a dashed line marks
    the convex hull of the imputed positions.
    Expression is log1p(CP10k) of the counts, on one colour scale per gene.

    Parameters
    ----------
    adata
        Measured cells with counts and ``obsm[spatial_key]``. Not modified.
    imputed
        Generated cells with counts and ``obsm[spatial_key]``. Not modified.
    genes
        Genes to show, one row each.
    spatial_key
        ``obsm`` key of the positions.
    layer, imputed_layer
        Layers holding the counts (``None``: ``.X``).
    point_size
        Marker size; default scales with the number of cells.
    cmap
        Colour map.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    for data, name in ((adata, "adata"), (imputed, "imputed")):
        if spatial_key not in data.obsm:
            raise ValueError(f"{name}.obsm has no {spatial_key!r}.")
    genes = list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    real = _expression(adata, genes, layer, "adata")
    gen = _expression(imputed, genes, imputed_layer, "imputed")
    xy = np.asarray(adata.obsm[spatial_key])[:, :2]
    xy_gen = np.asarray(imputed.obsm[spatial_key])[:, :2]
    kept = ~adata.obs_names.isin(imputed.obs_names)
    size = point_size or float(np.clip(2e4 / adata.n_obs, 0.5, 30))
    outline = _hull(xy_gen)
    fig, axes = plt.subplots(len(genes), 2, figsize=(9, 3.6 * len(genes)), squeeze=False)
    for i, gene in enumerate(genes):
        vmax = float(np.quantile(real[:, i], 0.99)) or 1.0
        style = dict(cmap=cmap, vmin=0.0, vmax=vmax, rasterized=True)
        axes[i, 0].scatter(*xy.T, c=real[:, i], s=size, **style)
        axes[i, 1].scatter(*xy[kept].T, c=real[kept, i], s=size, **style)
        points = axes[i, 1].scatter(*xy_gen.T, c=gen[:, i], s=size, **style)
        if outline is not None:
            axes[i, 1].plot(*outline.T, color="w", lw=1.0, ls="--")
        axes[i, 0].set_title(f"{gene}: measured")
        axes[i, 1].set_title(f"{gene}: region imputed ({imputed.n_obs} cells)")
        fig.colorbar(points, ax=axes[i].tolist(), shrink=0.8, label="log1p(CP10k)")
        for ax in axes[i]:
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.invert_yaxis()
    return fig if return_fig else None


def _hull(points: np.ndarray) -> np.ndarray | None:
    """Return the closed convex hull of 2-D points (``None`` if fewer than 3 or collinear)."""
    from scipy.spatial import ConvexHull, QhullError

    if len(points) < 3:
        return None
    try:
        vertices = ConvexHull(points).vertices
    except QhullError:
        return None
    return points[np.r_[vertices, vertices[0]]]
