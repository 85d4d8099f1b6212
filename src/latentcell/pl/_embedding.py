"""Real and generated cells on one UMAP."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

from latentcell.metrics import fit_eval_space


def real_vs_generated_umap(
    real: AnnData,
    generated: AnnData,
    color: str | None = None,
    n_comps: int = 30,
    n_top_genes: int | None = 2000,
    layer: str | None = None,
    seed: int = 0,
    ax=None,
    return_fig: bool = False,
):
    """Plot real and generated cells on one UMAP, coloured by a label and by origin.

    The embedding follows latentcell's evaluation convention: log1p(CP10k) of the counts,
    PCA fit on the real cells only (generated cells are projected with the real mean
    subtracted), then a kNN graph and UMAP of both together (scanpy).

    Parameters
    ----------
    real, generated
        Count AnnData objects with the same genes (``generated`` as returned by
        :meth:`~latentcell.LatentDiffusionModel.sample`).
    color
        ``obs`` column present in both (e.g. the cell type) for the first panel.
    n_comps, n_top_genes, layer, seed
        Settings of :func:`latentcell.metrics.fit_eval_space` (``layer`` applies to
        ``real``; generated cells use ``.X``).
    ax
        Two matplotlib axes to draw into; ``None`` creates a figure.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``; the joint embedding is also returned as an AnnData in
        ``fig.latentcell_embedding`` for further plotting.
    """
    import scanpy as sc

    n_top = n_top_genes if n_top_genes and n_top_genes < real.n_vars else None
    space = fit_eval_space(
        real,
        n_comps=min(n_comps, real.n_obs - 1, real.n_vars - 1),
        n_top_genes=n_top,
        layer=layer,
        seed=seed,
    )
    coords = np.vstack([space.transform(real, layer=layer), space.transform(generated)])
    origin = np.array(["real"] * real.n_obs + ["generated"] * generated.n_obs)
    obs = pd.DataFrame(
        {"origin": pd.Categorical(origin, categories=["real", "generated"])},
        index=[f"r{i}" for i in range(real.n_obs)] + [f"g{i}" for i in range(generated.n_obs)],
    )
    if color is not None:
        for name, a in (("real", real), ("generated", generated)):
            if color not in a.obs:
                raise ValueError(f"obs column {color!r} is missing from the {name} cells.")
        obs[color] = pd.Categorical(
            np.concatenate([real.obs[color].astype(str), generated.obs[color].astype(str)])
        )
    joint = ad.AnnData(X=np.zeros((len(obs), 1), dtype=np.float32), obs=obs)
    joint.obsm["X_pca"] = coords.astype(np.float32)
    sc.pp.neighbors(joint, use_rep="X_pca", random_state=seed)
    sc.tl.umap(joint, random_state=seed)

    if ax is None:
        fig, ax = plt.subplots(1, 2, figsize=(12, 5))
    else:
        fig = np.ravel(ax)[0].figure
    panels = [color, "origin"] if color is not None else ["origin"]
    for axis, key in zip(np.ravel(ax), panels, strict=False):
        sc.pl.embedding(
            joint,
            basis="umap",
            color=key,
            ax=axis,
            show=False,
            frameon=False,
            title=f"real and generated cells: {key}",
        )
    fig.tight_layout()
    fig.latentcell_embedding = joint
    return fig if return_fig else None
