"""Plots of gene-program activity: generated sets beside real cells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def program_activity(
    scores: Mapping[str, pd.DataFrame],
    programs: Sequence[str] | None = None,
    requested: str | None = None,
    return_fig: bool = False,
):
    """Box plots of program activity, one panel per program, one box per set of cells.

    Typical use: the scores (:meth:`~latentcell.LatentDiffusionModel.get_program_scores`) of
    cells generated with a program ``"low"``, unspecified and ``"high"``, beside real cells
    of the same type, to see that the requested program moved and the others did not.

    Parameters
    ----------
    scores
        ``{set name: DataFrame (cells x programs)}``, in the order to show.
    programs
        Programs to show (columns of the frames); default every column of the first frame.
    requested
        The program that was requested, marked "(requested)" in its panel title.
    return_fig
        Return the figure instead of ``None``.

    Returns
    -------
    matplotlib.figure.Figure or None
        The figure if ``return_fig``.
    """
    if not scores:
        raise ValueError("Pass at least one set of scores.")
    frames = dict(scores)
    programs = list(programs) if programs is not None else list(next(iter(frames.values())))
    for name, frame in frames.items():
        missing = [p for p in programs if p not in frame.columns]
        if missing:
            raise ValueError(f"Scores {name!r} lack program(s) {missing}.")
    fig, axes = plt.subplots(
        1, len(programs), figsize=(1.2 + 1.1 * len(frames) * len(programs), 3.4), squeeze=False
    )
    for ax, program in zip(axes[0], programs, strict=True):
        values = [np.asarray(frame[program], dtype=float) for frame in frames.values()]
        ax.boxplot(values, showfliers=False)
        ax.set_xticks(range(1, len(frames) + 1), list(frames), rotation=30, ha="right")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(program + (" (requested)" if program == requested else ""))
    axes[0][0].set_ylabel("activity (mean z-score)")
    fig.tight_layout()
    return fig if return_fig else None
