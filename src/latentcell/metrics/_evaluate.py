"""One-call evaluation of generated cells against real held-out cells."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from anndata import AnnData

from latentcell.metrics._classifiers import knn_two_sample_accuracy, label_accuracy
from latentcell.metrics._distances import energy_distance, mmd_rbf
from latentcell.metrics._space import EvalSpace, fit_eval_space

logger = logging.getLogger(__name__)

#: Neighbours of the label-transfer classifier (reduced when fewer reference cells exist).
LABEL_K = 15


def evaluate_generation(
    real: AnnData,
    generated: AnnData,
    labels_key: str | None = None,
    space: EvalSpace | None = None,
    n_comps: int = 30,
    layer: str | None = None,
    seed: int = 0,
    reference: AnnData | None = None,
) -> dict[str, Any]:
    """Compare generated cells with real held-out cells in a fixed evaluation space.

    Both sets are projected into ``space`` (fit on ``real`` with :func:`fit_eval_space` if not
    given) and compared with :func:`energy_distance`, :func:`mmd_rbf` (median-heuristic
    bandwidths) and :func:`knn_two_sample_accuracy` (``k=5``, ``test_size=0.3``). With
    ``labels_key``, :func:`label_accuracy` (``k=15``, or fewer if the reference is smaller)
    trains on ``reference`` (or on ``real`` if no reference is given) and predicts the labels
    stored in ``generated.obs[labels_key]``.

    Parameters
    ----------
    real
        Real held-out cells with raw counts. Not modified.
    generated
        Generated cells with raw counts on (at least) the space's genes. Not modified.
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

    Returns
    -------
    dict
        ``{"energy", "mmd", "knn_accuracy", "knn_auc", ["label_accuracy"], "n_real",
        "n_generated", "space"}`` where ``"space"`` is :meth:`EvalSpace.to_dict` with the gene
        list replaced by ``"n_genes"``.
    """
    _check_nonempty(real, "real")
    _check_nonempty(generated, "generated")
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
    return result


def real_vs_real_null(
    real: AnnData,
    n_repeats: int = 5,
    seed: int = 0,
    space: EvalSpace | None = None,
    n_comps: int = 30,
    layer: str | None = None,
) -> dict[str, float | int]:
    """Estimate the spread of energy distance and MMD between random halves of real cells.

    The real cells are projected into ``space`` (fit on ``real`` if not given), randomly split
    into two halves ``n_repeats`` times (``numpy.random.default_rng(seed)``), and
    :func:`energy_distance` and :func:`mmd_rbf` are computed between the halves. Because each
    half has only half the cells, this null is slightly conservative (larger) relative to a
    comparison of all real cells with an equally sized generated set.

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
        ``{"energy_mean", "energy_std", "mmd_mean", "mmd_std", "n_repeats"}``; standard
        deviations use ``ddof=1`` (0.0 when ``n_repeats == 1``).
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
    energies, mmds = [], []
    for _ in range(n_repeats):
        order = rng.permutation(len(z))
        a, b = z[order[:half]], z[order[half:]]
        energies.append(energy_distance(a, b))
        mmds.append(mmd_rbf(a, b))
    return {
        "energy_mean": float(np.mean(energies)),
        "energy_std": _std(energies),
        "mmd_mean": float(np.mean(mmds)),
        "mmd_std": _std(mmds),
        "n_repeats": int(n_repeats),
    }


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
