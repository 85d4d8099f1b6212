"""Predicted against true mean expression of a perturbation response."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from latentcell.metrics import top_de_genes
from latentcell.metrics._perturbation import _mean_profile, _reference_genes


def mean_expression_scatter(
    pred: AnnData,
    true: AnnData,
    control: AnnData | None = None,
    top_k: int = 100,
    n_labels: int = 5,
    layer: str | None = None,
    ax=None,
    return_fig: bool = False,
):
    """Scatter the mean log1p(CP10k) of every gene, true (x) against predicted (y).

    The convention of :func:`latentcell.metrics.score_perturbation`: per-gene means of
    log1p(CP10k) of the counts; with ``control``, the ``top_k`` genes of the true response
    (largest ``|mean(true) - mean(control)|``) are highlighted, the ``n_labels`` strongest
    are named, and the title gives the squared Pearson correlation over all genes and over
    those genes.

    Parameters
    ----------
    pred, true
        Predicted and true perturbed cells with raw counts (same genes). Not modified.
    control
        Control cells, to pick the top differentially expressed genes of the true response.
    top_k
        Number of top DE genes to highlight.
    n_labels
        Number of top DE genes to label with their names.
    layer
        Layer holding the counts in every object; ``None`` uses ``.X``.
    ax
        Matplotlib axes to draw into; ``None`` creates a figure.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    genes = _reference_genes(true, "true")
    x = _mean_profile(true, genes, layer, "true")
    y = _mean_profile(pred, genes, layer, "pred")
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    else:
        fig = ax.figure
    ax.scatter(x, y, s=6, c="0.65", lw=0, label="all genes")
    title = f"R² all genes {np.corrcoef(x, y)[0, 1] ** 2:.3f}"
    if control is not None:
        top = top_de_genes(control, true, k=top_k, layer=layer)
        idx = np.asarray([genes.index(g) for g in top])
        ax.scatter(x[idx], y[idx], s=10, c="C3", lw=0, label=f"top {len(top)} DE genes")
        for i in idx[:n_labels]:
            ax.annotate(
                genes[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        title += f", top {len(top)} DE {np.corrcoef(x[idx], y[idx])[0, 1] ** 2:.3f}"
        ax.legend(frameon=False, loc="upper left", fontsize=8)
    hi = float(max(x.max(), y.max())) * 1.05
    ax.plot([0, hi], [0, hi], ls="--", c="0.3", lw=0.8)
    ax.set_xlabel("true mean log1p(CP10k)")
    ax.set_ylabel("predicted mean log1p(CP10k)")
    ax.set_title(title, fontsize=9)
    return fig if return_fig else None
