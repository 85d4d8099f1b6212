"""Classifier-based metrics: kNN two-sample test and label transfer accuracy."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from latentcell.metrics._distances import _check_pair

logger = logging.getLogger(__name__)


def knn_two_sample_accuracy(
    x: np.ndarray,
    y: np.ndarray,
    k: int = 5,
    test_size: float = 0.3,
    seed: int = 0,
) -> dict[str, float]:
    """Classifier two-sample test with a k-nearest-neighbour classifier.

    Real cells ``x`` are labelled 0 and generated cells ``y`` 1. The larger set is subsampled
    (without replacement, ``numpy.random.default_rng(seed)``) to the size of the smaller one,
    the pooled cells are split into stratified train/test parts (``random_state=seed``), a
    ``KNeighborsClassifier(n_neighbors=k)`` is fit on the train part and scored on the held-out
    part only. Values near 0.5 mean the two samples are indistinguishable; near 1, separable.

    Parameters
    ----------
    x
        Real cells, shape ``(n, d)``.
    y
        Generated cells, shape ``(m, d)``.
    k
        Number of neighbours.
    test_size
        Fraction of the balanced pool held out for scoring, in ``(0, 1)``.
    seed
        Seed for the subsampling and the split.

    Returns
    -------
    dict
        ``{"accuracy": float, "auc": float}`` on the held-out part.
    """
    x, y = _check_pair(x, y)
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    _check_k(k)
    rng = np.random.default_rng(seed)
    n_per_class = min(len(x), len(y))
    x = _subsample(x, n_per_class, rng)
    y = _subsample(y, n_per_class, rng)
    n_test = int(np.ceil(test_size * 2 * n_per_class))
    if n_test < 2 or 2 * n_per_class - n_test < 2:
        raise ValueError(
            f"Too few cells ({n_per_class} per class) for a stratified split with "
            f"test_size={test_size}."
        )
    features = np.vstack([x, y])
    target = np.repeat([0, 1], n_per_class)
    x_train, x_test, t_train, t_test = train_test_split(
        features, target, test_size=test_size, stratify=target, random_state=seed
    )
    if k > len(x_train):
        raise ValueError(f"k={k} exceeds the number of training cells ({len(x_train)}).")
    clf = KNeighborsClassifier(n_neighbors=k).fit(x_train, t_train)
    accuracy = accuracy_score(t_test, clf.predict(x_test))
    auc = roc_auc_score(t_test, clf.predict_proba(x_test)[:, 1])
    return {"accuracy": float(accuracy), "auc": float(auc)}


def label_accuracy(
    real_x: np.ndarray,
    real_labels: Sequence | np.ndarray,
    gen_x: np.ndarray,
    gen_labels: Sequence | np.ndarray,
    k: int = 15,
) -> float:
    """Accuracy of a kNN classifier trained on real cells at recovering generated cells' labels.

    A ``KNeighborsClassifier(n_neighbors=k)`` is fit on ``(real_x, real_labels)`` and predicts
    the labels of ``gen_x``; the fraction equal to the requested ``gen_labels`` is returned.
    Used with ``real_x`` = training cells and ``gen_x`` = held-out *real* cells, it gives the
    real-vs-real reference ("floor") that generated cells can be compared against.

    Parameters
    ----------
    real_x
        Reference cells, shape ``(n, d)``.
    real_labels
        Labels of the reference cells, length ``n``.
    gen_x
        Cells to classify, shape ``(m, d)``.
    gen_labels
        Requested (conditioning) labels of ``gen_x``, length ``m``.
    k
        Number of neighbours (at most ``n``).

    Returns
    -------
    float
        Fraction of ``gen_x`` whose predicted label equals its requested label.
    """
    real_x, gen_x = _check_pair(real_x, gen_x)
    real_y = _check_labels(real_labels, len(real_x), "real_labels")
    gen_y = _check_labels(gen_labels, len(gen_x), "gen_labels")
    _check_k(k)
    if k > len(real_x):
        raise ValueError(f"k={k} exceeds the number of reference cells ({len(real_x)}).")
    unseen = set(pd.unique(gen_y)) - set(pd.unique(real_y))
    if unseen:
        logger.warning("Labels absent from the reference count as errors: %s", sorted(unseen))
    clf = KNeighborsClassifier(n_neighbors=k).fit(real_x, real_y)
    predicted = np.asarray(clf.predict(gen_x), dtype=object)
    return float(np.mean(predicted == gen_y))


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")


def _check_labels(labels: Sequence | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(labels, dtype=object)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {arr.shape}.")
    if pd.isna(arr).any():
        raise ValueError(f"{name} contains missing values.")
    return arr


def _subsample(a: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if len(a) == size:
        return a
    return a[np.sort(rng.choice(len(a), size=size, replace=False))]
