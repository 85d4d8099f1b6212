"""One-call evaluation of generated cells against real held-out cells."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from latentcell.metrics._classifiers import knn_two_sample_accuracy, label_accuracy
from latentcell.metrics._distances import energy_distance, mmd_rbf
from latentcell.metrics._genes import gene_moment_correlation
from latentcell.metrics._prdc import precision_recall_density_coverage
from latentcell.metrics._space import EvalSpace, fit_eval_space

logger = logging.getLogger(__name__)

#: Neighbours of the label-transfer classifier (reduced when fewer reference cells exist).
LABEL_K = 15
#: Neighbours of precision/recall/density/coverage (reduced when a set has at most 5 cells).
PRDC_K = 5
#: Metric columns of :func:`evaluate_by_condition` (averaged in its ``"mean"`` row).
CONDITION_METRICS = (
    "energy",
    "mmd",
    "knn_accuracy",
    "precision",
    "recall",
    "density",
    "coverage",
)


def evaluate_generation(
    real: AnnData,
    generated: AnnData,
    labels_key: str | None = None,
    space: EvalSpace | None = None,
    n_comps: int = 30,
    layer: str | None = None,
    seed: int = 0,
    reference: AnnData | None = None,
    key_added: str | None = None,
) -> dict[str, Any]:
    """Compare generated cells with real held-out cells in a fixed evaluation space.

    Both sets are projected into ``space`` (fit on ``real`` with :func:`fit_eval_space` if not
    given) and compared with :func:`energy_distance`, :func:`mmd_rbf` (median-heuristic
    bandwidths), :func:`knn_two_sample_accuracy` (``k=5``, ``test_size=0.3``) and
    :func:`precision_recall_density_coverage` (``k=5``, or ``min(n) - 1`` if a set has at most
    5 cells). :func:`gene_moment_correlation` compares per-gene log1p(CP10k) means and
    variances on the space's genes. With ``labels_key``, :func:`label_accuracy` (``k=15``, or
    fewer if the reference is smaller) trains on ``reference`` (or on ``real`` if no reference
    is given) and predicts the labels stored in ``generated.obs[labels_key]``.

    Parameters
    ----------
    real
        Real held-out cells with raw counts. Not modified.
    generated
        Generated cells with raw counts on (at least) the space's genes. Not modified, except
        for ``generated.uns[key_added]`` when ``key_added`` is given.
    labels_key
        Column of ``.obs`` with the (conditioning) labels, or ``None`` to skip label accuracy.
    space
        A pre-fitted evaluation space; ``None`` fits one on ``real``.
    n_comps
        Number of principal components when fitting the space.
    layer
        Layer holding the counts in every AnnData; ``None`` uses ``.X``.
    seed
        Seed for the space fit and the kNN two-sample test.
    reference
        Labelled real cells used to train the label classifier (e.g. the training cells).
    key_added
        If given, a copy of the result dict (plain ``float``/``int``/``str`` values and the
        ``"space"`` dict, JSON-serialisable) is stored in ``generated.uns[key_added]``,
        replacing any existing entry. This is the only write to any input; ``None`` (default)
        writes nothing.

    Returns
    -------
    dict
        ``{"energy", "mmd", "knn_accuracy", "knn_auc", "precision", "recall", "density",
        "coverage", "gene_mean_pearson", "gene_var_pearson", ["label_accuracy"], "n_real",
        "n_generated", "space"}`` where ``"space"`` is :meth:`EvalSpace.to_dict` with the gene
        list replaced by ``"n_genes"``. ``gene_*_pearson`` are ``nan`` when undefined (fewer
        than 2 genes, or constant per-gene moments).
    """
    _check_nonempty(real, "real")
    _check_nonempty(generated, "generated")
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"key_added must be a non-empty string or None, got {key_added!r}.")
    if labels_key is not None:
        _check_labels_key(labels_key, real if reference is None else reference, generated)
    if space is None:
        space = fit_eval_space(real, n_comps=n_comps, layer=layer, seed=seed)
    z_real = space.transform(real, layer=layer)
    z_gen = space.transform(generated, layer=layer)
    knn = knn_two_sample_accuracy(z_real, z_gen, seed=seed)
    result: dict[str, Any] = {
        "energy": energy_distance(z_real, z_gen),
        "mmd": mmd_rbf(z_real, z_gen),
        "knn_accuracy": knn["accuracy"],
        "knn_auc": knn["auc"],
    }
    prdc_k = min(PRDC_K, len(z_real) - 1, len(z_gen) - 1)
    result.update(precision_recall_density_coverage(z_real, z_gen, k=prdc_k))
    moments = gene_moment_correlation(real, generated, layer=layer, genes=space.genes)
    result["gene_mean_pearson"] = moments["mean_pearson"]
    result["gene_var_pearson"] = moments["var_pearson"]
    if labels_key is not None:
        ref = real if reference is None else reference
        z_ref = z_real if reference is None else space.transform(reference, layer=layer)
        result["label_accuracy"] = label_accuracy(
            z_ref,
            np.asarray(ref.obs[labels_key]),
            z_gen,
            np.asarray(generated.obs[labels_key]),
            k=min(LABEL_K, len(z_ref)),
        )
    result["n_real"] = int(real.n_obs)
    result["n_generated"] = int(generated.n_obs)
    result["space"] = space.to_dict(include_genes=False)
    logger.info("Generation metrics: %s", {k: v for k, v in result.items() if k != "space"})
    if key_added is not None:
        generated.uns[key_added] = _json_friendly(result)
    return result


def evaluate_by_condition(
    real: AnnData,
    generated: AnnData,
    condition_key: str,
    labels_key: str | None = None,
    space: EvalSpace | None = None,
    n_comps: int = 30,
    layer: str | None = None,
    seed: int = 0,
    reference: AnnData | None = None,
    min_cells: int = 10,
) -> pd.DataFrame:
    """Evaluate generated cells condition by condition in one shared evaluation space.

    The space is fit once on *all* real cells (unless ``space`` is given) and reused for every
    condition, so rows are comparable. For each value of ``obs[condition_key]`` present in both
    ``real`` and ``generated`` with at least ``min_cells`` cells in each, the cells of that
    condition are compared with :func:`evaluate_generation` (same ``seed``; the label
    classifier, if ``labels_key`` is given, is trained on all of ``reference``, or on all of
    ``real``). Other values are skipped and listed in ``df.attrs["skipped"]``. A final row
    ``"mean"`` holds the unweighted mean of the metric columns over the evaluated conditions
    and the *total* cell counts in ``n_real`` / ``n_generated``.

    Parameters
    ----------
    real
        Real held-out cells with raw counts. Not modified.
    generated
        Generated cells with raw counts on (at least) the space's genes. Not modified.
    condition_key
        Column of ``.obs`` (in both objects) holding the condition of each cell.
    labels_key
        Column of ``.obs`` with labels for :func:`label_accuracy` (adds a ``label_accuracy``
        column), or ``None``.
    space
        A pre-fitted evaluation space; ``None`` fits one on all of ``real``.
    n_comps
        Number of principal components when fitting the space.
    layer
        Layer holding the counts in every AnnData; ``None`` uses ``.X``.
    seed
        Seed for the space fit and the kNN two-sample tests.
    reference
        Labelled real cells used to train the label classifier.
    min_cells
        Minimum number of real and of generated cells for a condition to be evaluated.

    Returns
    -------
    pandas.DataFrame
        Indexed by condition (as strings, index name ``condition_key``) followed by
        ``"mean"``; columns ``energy, mmd, knn_accuracy, precision, recall, density, coverage,
        [label_accuracy], n_real, n_generated``. ``df.attrs`` holds ``"skipped"`` (list of
        skipped condition values, as strings) and ``"space"`` (:meth:`EvalSpace.to_dict`
        without the gene list).
    """
    _check_nonempty(real, "real")
    _check_nonempty(generated, "generated")
    if isinstance(min_cells, bool) or not isinstance(min_cells, int | np.integer) or min_cells < 1:
        raise ValueError(f"min_cells must be a positive integer, got {min_cells!r}.")
    for name, adata in (("real", real), ("generated", generated)):
        if condition_key not in adata.obs:
            raise ValueError(
                f"condition_key {condition_key!r} not found in {name}.obs columns: "
                f"{list(adata.obs.columns)}."
            )
    if labels_key is not None:
        _check_labels_key(labels_key, real if reference is None else reference, generated)
    real_cond = _condition_strings(real, condition_key, "real")
    gen_cond = _condition_strings(generated, condition_key, "generated")
    real_counts = pd.Series(real_cond).value_counts()
    gen_counts = pd.Series(gen_cond).value_counts()
    all_values = sorted(set(real_counts.index) | set(gen_counts.index))
    kept = [
        v
        for v in all_values
        if real_counts.get(v, 0) >= min_cells and gen_counts.get(v, 0) >= min_cells
    ]
    skipped = [v for v in all_values if v not in kept]
    if "mean" in kept:
        raise ValueError(
            f"A condition of {condition_key!r} is named 'mean', which clashes with the summary row."
        )
    if skipped:
        logger.warning(
            "Skipping %d condition(s) absent from one set or with fewer than %d cells: %s",
            len(skipped),
            min_cells,
            skipped,
        )
    if not kept:
        raise ValueError(
            f"No value of {condition_key!r} has at least min_cells={min_cells} cells in both "
            f"real and generated (values seen: {all_values})."
        )
    if space is None:
        space = fit_eval_space(real, n_comps=n_comps, layer=layer, seed=seed)
    ref = real if reference is None else reference
    columns = [*CONDITION_METRICS]
    if labels_key is not None:
        columns.append("label_accuracy")
    rows = []
    for value in kept:
        res = evaluate_generation(
            real[real_cond == value],
            generated[gen_cond == value],
            labels_key=labels_key,
            space=space,
            layer=layer,
            seed=seed,
            reference=ref if labels_key is not None else None,
        )
        row = {c: float(res[c]) for c in columns}
        row["n_real"] = int(res["n_real"])
        row["n_generated"] = int(res["n_generated"])
        rows.append(row)
    df = pd.DataFrame(rows, index=pd.Index(kept, name=condition_key))
    mean_row = {c: float(df[c].mean()) for c in columns}
    mean_row["n_real"] = int(df["n_real"].sum())
    mean_row["n_generated"] = int(df["n_generated"].sum())
    df.loc["mean"] = pd.Series(mean_row)
    df["n_real"] = df["n_real"].astype(int)
    df["n_generated"] = df["n_generated"].astype(int)
    df.attrs["skipped"] = skipped
    df.attrs["space"] = space.to_dict(include_genes=False)
    return df


def real_vs_real_null(
    real: AnnData,
    n_repeats: int = 5,
    seed: int = 0,
    space: EvalSpace | None = None,
    n_comps: int = 30,
    layer: str | None = None,
) -> dict[str, float | int]:
    """Estimate the spread of the generation metrics between random halves of real cells.

    The real cells are projected into ``space`` (fit on ``real`` if not given), randomly split
    into two halves ``n_repeats`` times (``numpy.random.default_rng(seed)``), and
    :func:`energy_distance`, :func:`mmd_rbf`, :func:`knn_two_sample_accuracy` (``k=5``,
    ``seed``) and :func:`precision_recall_density_coverage` (``k=5``, or half size minus 1 if
    smaller) are computed between the halves (first half as "real"). Because each half has
    only half the cells, this null is slightly conservative (larger distances, lower
    recall/coverage) relative to a comparison of all real cells with an equally sized
    generated set. The kNN accuracy is ``nan`` (with a warning) when the halves are too small
    for its train/test split.

    Parameters
    ----------
    real
        Real cells with raw counts (at least 4). Not modified.
    n_repeats
        Number of random splits.
    seed
        Seed for the space fit and the splits.
    space
        A pre-fitted evaluation space; ``None`` fits one on ``real``.
    n_comps
        Number of principal components when fitting the space.
    layer
        Layer holding the counts; ``None`` uses ``.X``.

    Returns
    -------
    dict
        ``{"energy_mean", "energy_std", "mmd_mean", "mmd_std", "n_repeats",
        "knn_accuracy_mean", "knn_accuracy_std", "precision_mean", "precision_std",
        "recall_mean", "recall_std", "density_mean", "density_std", "coverage_mean",
        "coverage_std"}``; standard deviations use ``ddof=1`` (0.0 when ``n_repeats == 1``).
    """
    if isinstance(n_repeats, bool) or not isinstance(n_repeats, int | np.integer) or n_repeats < 1:
        raise ValueError(f"n_repeats must be a positive integer, got {n_repeats!r}.")
    if real.n_obs < 4:
        raise ValueError(f"Need at least 4 real cells to split into halves, got {real.n_obs}.")
    if space is None:
        space = fit_eval_space(real, n_comps=n_comps, layer=layer, seed=seed)
    z = space.transform(real, layer=layer)
    rng = np.random.default_rng(seed)
    half = len(z) // 2
    prdc_k = min(PRDC_K, half - 1)
    energies, mmds, knns = [], [], []
    prdc: dict[str, list[float]] = {"precision": [], "recall": [], "density": [], "coverage": []}
    for _ in range(n_repeats):
        order = rng.permutation(len(z))
        a, b = z[order[:half]], z[order[half:]]
        energies.append(energy_distance(a, b))
        mmds.append(mmd_rbf(a, b))
        try:
            knns.append(knn_two_sample_accuracy(a, b, seed=seed)["accuracy"])
        except ValueError as err:
            logger.warning("kNN accuracy undefined for halves of %d cells: %s", half, err)
            knns.append(float("nan"))
        for key, value in precision_recall_density_coverage(a, b, k=prdc_k).items():
            prdc[key].append(value)
    out: dict[str, float | int] = {
        "energy_mean": float(np.mean(energies)),
        "energy_std": _std(energies),
        "mmd_mean": float(np.mean(mmds)),
        "mmd_std": _std(mmds),
        "n_repeats": int(n_repeats),
        "knn_accuracy_mean": float(np.mean(knns)),
        "knn_accuracy_std": _std(knns),
    }
    for key, values in prdc.items():
        out[f"{key}_mean"] = float(np.mean(values))
        out[f"{key}_std"] = _std(values)
    return out


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _check_nonempty(adata: AnnData, name: str) -> None:
    if not isinstance(adata, AnnData):
        raise ValueError(f"{name} must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs < 2:
        raise ValueError(f"{name} must contain at least 2 cells, got {adata.n_obs}.")


def _check_labels_key(labels_key: str, ref: AnnData, generated: AnnData) -> None:
    for name, adata in (("reference", ref), ("generated", generated)):
        if labels_key not in adata.obs:
            raise ValueError(
                f"labels_key {labels_key!r} not found in {name}.obs columns: "
                f"{list(adata.obs.columns)}."
            )


def _condition_strings(adata: AnnData, key: str, name: str) -> np.ndarray:
    values = adata.obs[key]
    if values.isna().any():
        raise ValueError(f"{name}.obs[{key!r}] contains missing values.")
    return np.asarray(values.astype(str), dtype=object)


def _json_friendly(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_friendly(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_friendly(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    return value if isinstance(value, str) or value is None else str(value)
