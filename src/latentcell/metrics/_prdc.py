"""Precision, recall, density and coverage of generated cells (k-NN manifold estimates)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors

from latentcell.metrics._classifiers import _check_k
from latentcell.metrics._distances import _check_pair

# Target number of distance-matrix entries per block (about 32 MB of float64).
_BLOCK_ENTRIES = 4_000_000
# The k-d tree computes exact Euclidean distances that match ``scipy.spatial.distance.cdist``
# (unlike sklearn's "brute" algorithm, which uses the less precise dot-product expansion), so
# points lying exactly on a ball's boundary are classified consistently.
_ALGORITHM = "kd_tree"


def precision_recall_density_coverage(
    real_x: np.ndarray,
    gen_x: np.ndarray,
    k: int = 5,
) -> dict[str, float]:
    """Fidelity and diversity of generated points from k-nearest-neighbour balls.

    Convention: for every point, its radius is the Euclidean distance to its ``k``-th nearest
    neighbour *within its own set, excluding the point itself* (duplicates of the point count
    as neighbours at distance 0). With ``r_i`` the radius of real point ``x_i`` and ``s_j``
    that of generated point ``y_j`` (``n`` real and ``m`` generated points), and ``B(c, r)``
    the closed ball ``{z : ||z - c|| <= r}``:

    - precision (Kynkäänniemi et al., 2019): fraction of generated points inside the union of
      the real balls, ``mean_j 1[exists i : y_j in B(x_i, r_i)]``;
    - recall (Kynkäänniemi et al., 2019): fraction of real points inside the union of the
      generated balls, ``mean_i 1[exists j : x_i in B(y_j, s_j)]``;
    - density (Naeem et al., 2020): ``sum_j sum_i 1[y_j in B(x_i, r_i)] / (k m)``, the mean
      number of real balls containing a generated point divided by ``k``; about 1 when both
      sets come from the same distribution (exactly ``(k + 1) / k`` when ``gen_x`` equals
      ``real_x`` without ties), larger where generated points crowd dense real regions;
    - coverage (Naeem et al., 2020): fraction of real points whose ball contains at least one
      generated point, ``mean_i 1[min_j ||x_i - y_j|| <= r_i]``.

    Precision, recall and coverage lie in ``[0, 1]``; density is non-negative and unbounded.
    Radii and nearest neighbours come from :class:`sklearn.neighbors.NearestNeighbors` (k-d
    tree, exact Euclidean distances); ball memberships are evaluated block by block with
    :func:`scipy.spatial.distance.cdist`, so memory stays bounded for large sets.

    Parameters
    ----------
    real_x
        Real points, shape ``(n, d)`` with ``n > k``.
    gen_x
        Generated points, shape ``(m, d)`` with ``m > k``.
    k
        Number of neighbours defining the radii.

    Returns
    -------
    dict
        ``{"precision": float, "recall": float, "density": float, "coverage": float}``.
    """
    real_x, gen_x = _check_pair(real_x, gen_x)
    _check_k(k)
    for name, arr in (("real_x", real_x), ("gen_x", gen_x)):
        if len(arr) <= k:
            raise ValueError(
                f"{name} needs more than k={k} points (the point itself is excluded from its "
                f"neighbours), got {len(arr)}."
            )
    real_radii = _knn_radii(real_x, k)
    gen_radii = _knn_radii(gen_x, k)

    # Generated points against real balls (precision, density); real points against generated
    # balls (recall). Blocks of rows keep memory bounded.
    n_real_balls = np.zeros(len(gen_x), dtype=np.int64)
    for start, block in _row_blocks(gen_x, len(real_x)):
        inside = cdist(block, real_x) <= real_radii[None, :]
        n_real_balls[start : start + len(block)] = inside.sum(axis=1)
    in_gen_ball = np.zeros(len(real_x), dtype=bool)
    for start, block in _row_blocks(real_x, len(gen_x)):
        inside = cdist(block, gen_x) <= gen_radii[None, :]
        in_gen_ball[start : start + len(block)] = inside.any(axis=1)

    nearest_gen = NearestNeighbors(n_neighbors=1, algorithm=_ALGORITHM).fit(gen_x)
    dist_to_gen = nearest_gen.kneighbors(real_x, return_distance=True)[0][:, 0]

    return {
        "precision": float(np.mean(n_real_balls > 0)),
        "recall": float(np.mean(in_gen_ball)),
        "density": float(n_real_balls.sum() / (k * len(gen_x))),
        "coverage": float(np.mean(dist_to_gen <= real_radii)),
    }


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in ``x``, excluding itself."""
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm=_ALGORITHM).fit(x)
    # Querying the fitted points returns each point (or a duplicate) at distance 0 among the
    # k + 1 nearest; the (k + 1)-th smallest distance is the k-th excluding the point itself.
    distances = nn.kneighbors(x, return_distance=True)[0]
    return np.asarray(distances[:, k], dtype=np.float64)


def _row_blocks(a: np.ndarray, n_cols: int) -> Iterator[tuple[int, np.ndarray]]:
    step = max(1, _BLOCK_ENTRIES // max(n_cols, 1))
    for start in range(0, len(a), step):
        yield start, a[start : start + step]
