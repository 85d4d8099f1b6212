"""Plots of translated modalities (e.g. protein predicted from RNA) against measurements."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from scipy import sparse


def _values(adata: AnnData, layer: str | None, name: str) -> np.ndarray:
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"{name} has no layer {layer!r}; layers: {list(adata.layers)}.")
    x = adata.X if layer is None else adata.layers[layer]
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return np.log1p(x.astype(np.float64))


def translation_scatter(
    pred: AnnData,
    true: AnnData,
    features: Sequence[str] | None = None,
    n_features: int = 8,
    pred_layer: str | None = "latentcell_mean",
    true_layer: str | None = None,
    n_cols: int = 4,
    return_fig: bool = False,
):
    """One panel per feature: measured (x) against predicted (y) log1p values, cell by cell.

    Meant for :meth:`latentcell.LatentDiffusionModel.translate` outputs against the measured
    modality of the same cells; each panel's title gives the Pearson correlation across
    cells, the statistic of the CITE-seq benchmark.

    Parameters
    ----------
    pred
        Predicted cells (one row per cell of ``true``, same order; with several samples per
        cell, average them first). Not modified.
    true
        Measured cells with the same features. Not modified.
    features
        Features to show; ``None`` picks the ``n_features`` most variable measured ones.
    n_features
        Number of features when ``features`` is ``None``.
    pred_layer, true_layer
        Layers holding the values (``None``: ``.X``); the default plots the decoded means of
        the prediction against the measured counts.
    n_cols
        Panels per row.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    if pred.n_obs != true.n_obs:
        raise ValueError(
            f"pred has {pred.n_obs} cells and true {true.n_obs}; pass one prediction per "
            f"measured cell (average samples first)."
        )
    missing = sorted(set(true.var_names) - set(pred.var_names))
    if missing:
        raise ValueError(f"pred lacks features of true, e.g. {missing[:3]}.")
    y_all = _values(true, true_layer, "true")
    x_pred = _values(pred[:, true.var_names], pred_layer, "pred")
    names = list(true.var_names)
    if features is None:
        order = np.argsort(-y_all.var(0))[: min(n_features, len(names))]
    else:
        unknown = [f for f in features if f not in names]
        if unknown:
            raise ValueError(f"Unknown feature(s) {unknown}.")
        order = np.asarray([names.index(f) for f in features])
    n = len(order)
    n_cols = max(1, min(n_cols, n))
    n_rows = int(np.ceil(n / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.5 * n_rows), squeeze=False)
    for ax, j in zip(axes.ravel(), order, strict=False):
        t, p = y_all[:, j], x_pred[:, j]
        r = np.corrcoef(t, p)[0, 1] if np.ptp(t) > 0 and np.ptp(p) > 0 else np.nan
        ax.scatter(t, p, s=5, c="C0", lw=0, alpha=0.7)
        ax.set_title(f"{names[j]}  r={r:.2f}", fontsize=9)
        ax.set_xlabel("measured log1p", fontsize=8)
        ax.set_ylabel("predicted log1p", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig if return_fig else None
