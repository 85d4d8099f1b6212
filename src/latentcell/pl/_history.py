"""Training curves of both stages."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

_PANELS = (
    ("VAE (stage 1)", "elbo_train", "elbo_validation", "negative ELBO"),
    ("flow (stage 2)", "flow_loss_train", "flow_loss_validation", "flow-matching loss"),
)
_PERTURBATION_PANEL = (
    "perturbation flow (stage 3)",
    "perturbation_loss_train",
    "perturbation_loss_validation",
    "flow-matching loss",
)


def training_history(model, ax=None, return_fig: bool = False):
    """Plot the training and validation curves of every stage of a model.

    Two panels (VAE and latent flow), and a third for the perturbation flow when the model
    has trained one.

    Parameters
    ----------
    model
        A trained :class:`~latentcell.LatentDiffusionModel` (anything with a ``history``
        dict of per-epoch DataFrames works).
    ax
        Matplotlib axes to draw into, one per panel; ``None`` creates a figure.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    history = model.history
    if not history:
        raise ValueError("The model has no training history yet; call model.train() first.")
    panels = _PANELS + ((_PERTURBATION_PANEL,) if _PERTURBATION_PANEL[1] in history else ())
    if ax is None:
        fig, ax = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    else:
        fig = np.ravel(ax)[0].figure
    for axis, (title, train_key, val_key, ylabel) in zip(np.ravel(ax), panels, strict=False):
        for key, style in ((train_key, "-"), (val_key, "--")):
            if key in history:
                frame = history[key]
                axis.plot(frame.index, frame.iloc[:, 0], style, label=key)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        if axis.lines:
            axis.legend(frameon=False)
        else:
            axis.text(0.5, 0.5, "not trained", ha="center", va="center", transform=axis.transAxes)
    fig.tight_layout()
    return fig if return_fig else None
