"""Plot of differential expression: the volcano of one comparison."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def volcano(
    de: pd.DataFrame,
    comparison: str | None = None,
    n_labels: int = 10,
    fdr_column: str | None = None,
    ax=None,
    return_fig: bool = False,
):
    """Volcano plot of :meth:`~latentcell.LatentDiffusionModel.differential_expression`.

    One dot per gene: its mean log2 fold change (``lfc_mean``) against the probability that
    it is differentially expressed (``proba_de``, ``mode="change"``); genes called at the
    false discovery rate of the result (the ``is_de_fdr_*`` column) are coloured, and the
    ``n_labels`` most probable are named.

    Parameters
    ----------
    de
        The DataFrame ``differential_expression`` returned (``mode="change"``).
    comparison
        Which comparison to show when ``de`` holds several (a value of its ``comparison``
        column, e.g. ``"B cells vs Rest"``); required then.
    n_labels
        Genes to name, by ``proba_de``.
    fdr_column
        Column of the calls; default the ``is_de_fdr_*`` column of ``de``.
    ax
        Matplotlib axes to draw in; a new figure by default.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    missing = [c for c in ("lfc_mean", "proba_de") if c not in de]
    if missing:
        raise ValueError(
            f"de lacks column(s) {missing}: pass the result of "
            "differential_expression(..., mode='change')."
        )
    if "comparison" in de and de["comparison"].nunique() > 1:
        if comparison is None:
            raise ValueError(
                "de holds several comparisons; pick one with comparison=, one of "
                f"{sorted(de['comparison'].unique())[:10]}."
            )
        if comparison not in set(de["comparison"]):
            raise ValueError(f"comparison {comparison!r} is not in de['comparison'].")
    if comparison is not None:
        de = de[de["comparison"] == comparison]
    if fdr_column is None:
        calls = [c for c in de.columns if str(c).startswith("is_de_fdr_")]
        fdr_column = calls[0] if calls else None
    called = de[fdr_column].to_numpy(bool) if fdr_column is not None else np.zeros(len(de), bool)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.6, 4.0))
    else:
        fig = ax.figure
    lfc, proba = de["lfc_mean"].to_numpy(float), de["proba_de"].to_numpy(float)
    ax.scatter(lfc[~called], proba[~called], s=6, c="lightgrey", label="not called")
    ax.scatter(lfc[called], proba[called], s=8, c="tab:red", label=f"called ({fdr_column})")
    for i in np.argsort(-proba, kind="stable")[:n_labels]:
        ax.annotate(
            str(de.index[i]),
            (lfc[i], proba[i]),
            fontsize=7,
            xytext=(2, 2),
            textcoords="offset points",
        )
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("mean log2 fold change")
    ax.set_ylabel("probability of differential expression")
    if comparison is not None or "comparison" in de:
        ax.set_title(comparison or str(de["comparison"].iloc[0]))
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return fig if return_fig else None
