"""Sample quality against the number of sampler steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

_X_LABELS = {"n_evals": "network evaluations", "n_steps": "solver steps"}


def steps_quality(
    curve: pd.DataFrame | Sequence[Mapping],
    metric: str = "energy",
    x: str = "n_evals",
    null: float | tuple[float, float] | Mapping | None = None,
    null_label: str = "real vs real",
    throughput: str | None = None,
    ax=None,
    show: bool = True,
):
    """Plot a quality metric of generated cells against the number of sampler steps.

    One line per sampler (``method``), with the step axis on a log scale. Typical input is the
    ``"steps_curve"`` list written by ``benchmarks/generation_pbmc3k.py``: one record per
    sampling run with ``method``, ``n_steps``, ``n_evals`` (network evaluations: ``n_steps``
    for Euler, ``2 * n_steps`` for midpoint and Heun), the metrics of
    :func:`latentcell.metrics.evaluate_generation` (``energy``, ``knn_accuracy``,
    ``label_accuracy``, ...) and the sampling cost (``seconds``, ``cells_per_s``).

    Parameters
    ----------
    curve
        A DataFrame, or a list of dicts, with one row per sampling run. Needs the ``x`` and
        ``metric`` columns; ``method`` is optional (one line labelled ``metric`` without it).
    metric
        Column plotted on the y axis.
    x
        Column of the x axis: ``"n_evals"`` (default; compares samplers at equal cost) or
        ``"n_steps"``. Values must be positive (log scale).
    null
        Reference level of ``metric`` drawn as a horizontal line, e.g. the real-vs-real null
        or the real-train-vs-held-out floor: a number, a ``(mean, std)`` pair (line at the
        mean and a band of one standard deviation) or the dict returned by
        :func:`latentcell.metrics.real_vs_real_null` (its ``"{metric}_mean"`` and
        ``"{metric}_std"`` entries are used). ``None`` draws nothing.
    null_label
        Legend label of ``null``.
    throughput
        Column (e.g. ``"cells_per_s"`` or ``"seconds"``) drawn with dotted lines, one per
        method, on a secondary log-scale y axis; ``None`` draws no secondary axis.
    ax
        A matplotlib axes to draw into; ``None`` creates a figure.
    show
        Show the figure (``plt.show()``) and return ``None``; ``False`` returns the axes.

    Returns
    -------
    matplotlib.axes.Axes or None
        The matplotlib axes if ``show`` is ``False``. The secondary axis, when ``throughput`` is
        given, is ``ax.latentcell_throughput_ax``.

    Examples
    --------
    >>> result = json.loads(Path("benchmarks/results/generation_pbmc3k.json").read_text())
    >>> ax = latentcell.pl.steps_quality(
    ...     result["steps_curve"],
    ...     metric="energy",
    ...     null=result["real_vs_real_null_halves_of_test"],
    ...     throughput="cells_per_s",
    ...     show=False,
    ... )
    """
    frame = _as_frame(curve)
    for role, column in (("metric", metric), ("x", x), ("throughput", throughput)):
        if column is not None and column not in frame.columns:
            raise ValueError(
                f"{role} column {column!r} not found in the curve; columns: {list(frame.columns)}."
            )
    xs = pd.to_numeric(frame[x], errors="coerce")
    if xs.isna().any() or (xs <= 0).any():
        raise ValueError(f"Column {x!r} must hold positive numbers (log-scale x axis).")
    null_level = _null_level(null, metric)

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    groups = (
        list(frame.groupby("method", sort=False))
        if "method" in frame.columns
        else [(metric, frame)]
    )
    colors = {}
    for name, group in groups:
        group = group.assign(_x=xs[group.index]).sort_values("_x")
        (line,) = ax.plot(group["_x"], group[metric], "o-", label=str(name))
        colors[name] = line.get_color()
    if null_level is not None:
        mean, std = null_level
        ax.axhline(mean, color="0.3", linestyle="--", linewidth=1, label=null_label)
        if std > 0:
            ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel(_X_LABELS.get(x, x))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against sampler cost")
    handles, labels = ax.get_legend_handles_labels()
    if throughput is not None:
        twin = ax.twinx()
        for name, group in groups:
            group = group.assign(_x=xs[group.index]).sort_values("_x")
            twin.plot(
                group["_x"],
                group[throughput],
                ":",
                marker=".",
                color=colors[name],
                label=f"{name} ({throughput})",
            )
        twin.set_yscale("log")
        twin.set_ylabel(f"{throughput} (dotted)")
        extra_handles, extra_labels = twin.get_legend_handles_labels()
        handles, labels = handles + extra_handles, labels + extra_labels
        ax.latentcell_throughput_ax = twin
    ax.legend(handles, labels, frameon=False, fontsize="small")
    ax.figure.tight_layout()
    if show:
        plt.show()
        return None
    return ax


def _as_frame(curve) -> pd.DataFrame:
    if isinstance(curve, pd.DataFrame):
        frame = curve.reset_index(drop=True)
    elif isinstance(curve, Mapping) or isinstance(curve, str | bytes):
        raise ValueError(
            "curve must be a DataFrame or a list of dicts (one per sampling run), got a "
            f"{type(curve).__name__}."
        )
    else:
        records = list(curve)
        if not all(isinstance(r, Mapping) for r in records):
            raise ValueError("curve must be a DataFrame or a list of dicts.")
        frame = pd.DataFrame.from_records(records)
    if frame.empty:
        raise ValueError("curve is empty.")
    return frame


def _null_level(null, metric: str) -> tuple[float, float] | None:
    if null is None:
        return None
    if isinstance(null, Mapping):
        key = f"{metric}_mean"
        if key not in null:
            raise ValueError(f"null has no {key!r} entry for metric {metric!r}.")
        return float(null[key]), float(null.get(f"{metric}_std", 0.0))
    if np.ndim(null) == 0:
        return float(null), 0.0
    values = np.asarray(null, dtype=float).ravel()
    if values.shape != (2,):
        raise ValueError(f"null must be a number or a (mean, std) pair, got {null!r}.")
    if not np.isfinite(values).all() or values[1] < 0:
        raise ValueError(f"null must hold a finite mean and a non-negative std, got {null!r}.")
    return float(values[0]), float(values[1])
