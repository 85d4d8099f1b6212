"""Spatial conditioning for LatentDiffusionModel: neighbourhood summaries and region imputation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree
from scvi import settings

from latentcell._constants import SPATIAL_FIELD


def neighbourhood_summary(
    query: np.ndarray,
    pool_coords: np.ndarray,
    pool_latent: np.ndarray,
    n_neighbors: int,
    query_groups: np.ndarray | None = None,
    pool_groups: np.ndarray | None = None,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Summarise the observed neighbourhood of positions.

    For each query position, the ``n_neighbors`` nearest pool cells (Euclidean distance,
    within the same group, e.g. the same tissue section) give the summary
    ``[mean of their latents, log of their mean distance]``. The distance tells the flow how
    far away the evidence is: a cell deep inside an unmeasured region sees its neighbourhood
    from the region's edge.

    Parameters
    ----------
    query
        Positions ``(m, n_dims)``.
    pool_coords, pool_latent
        Positions ``(n, n_dims)`` and latents ``(n, n_latent)`` of the observed cells.
    n_neighbors
        Neighbours per query (fewer if a group has fewer pool cells).
    query_groups, pool_groups
        Optional group codes; neighbours are searched within the query's group only.
    exclude_self
        The query positions are the pool itself (row ``i`` of ``query`` is pool cell ``i``):
        leave each cell out of its own neighbourhood.

    Returns
    -------
    tuple of numpy.ndarray
        ``(summary, neighbours)``: float32 ``(m, n_latent + 1)`` and the pool indices
        ``(m, n_neighbors)`` of the neighbours (repeated where a group had fewer).
    """
    query = np.asarray(query, dtype=np.float64)
    pool_coords = np.asarray(pool_coords, dtype=np.float64)
    m, n_latent = len(query), pool_latent.shape[1]
    if query_groups is None or pool_groups is None:
        query_groups, pool_groups = np.zeros(m, int), np.zeros(len(pool_coords), int)
    summary = np.empty((m, n_latent + 1), dtype=np.float32)
    neighbours = np.empty((m, n_neighbors), dtype=np.int64)
    for group in np.unique(query_groups):
        q = np.flatnonzero(query_groups == group)
        p = np.flatnonzero(pool_groups == group)
        k = min(n_neighbors, len(p) - int(exclude_self))
        if k < 1:
            raise ValueError(
                f"No observed cells to take a neighbourhood from in group {group!r}; "
                f"generate there without one (use_neighbourhood=False) or add observed cells."
            )
        dist, idx = cKDTree(pool_coords[p]).query(query[q], k=k + int(exclude_self))
        dist, idx = dist.reshape(len(q), -1), idx.reshape(len(q), -1)
        if exclude_self:
            # drop each cell's own row (first if present, else the farthest neighbour)
            own = p[idx] == q[:, None]
            own[~own.any(axis=1), -1] = True
            order = np.argsort(own, axis=1, kind="stable")[:, :k]
            dist = np.take_along_axis(dist, order, axis=1)
            idx = np.take_along_axis(idx, order, axis=1)
        rows = p[idx]
        summary[q, :n_latent] = pool_latent[rows].mean(axis=1)
        summary[q, n_latent] = np.log(dist.mean(axis=1) + 1e-6)
        neighbours[q] = rows[:, np.arange(n_neighbors) % k]
    return summary, neighbours


def simulate_holes(
    coords: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_fraction: float = 0.15,
) -> np.ndarray:
    """Mark cells inside random contiguous holes until ``fraction`` of the cells are covered.

    Each hole is the ``s`` cells nearest to a random cell of one group, with ``s``
    log-uniform between ``min_size`` and ``max_fraction`` of the group's cells, so small and
    large unmeasured regions are both represented. Holes never cover more than half of a
    group, so every hole has observed cells around it; in small groups the mask may
    therefore cover less than ``fraction``.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the cells in a hole.
    """
    in_hole = np.zeros(len(coords), dtype=bool)
    if fraction <= 0:
        return in_hole
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    trees = {g: cKDTree(coords[m]) for g, m in members.items()}
    target = fraction * len(coords)
    for _ in range(100 * len(coords)):  # bounded: small sections may make the target unreachable
        if in_hole.sum() >= target:
            break
        center = int(rng.integers(len(coords)))
        group = groups[center]
        member = members[group]
        hi = max(min_size, int(max_fraction * len(member)))
        size = min(len(member) - 1, int(np.exp(rng.uniform(np.log(min_size), np.log(hi)))))
        if size < 1:
            continue
        _, idx = trees[group].query(coords[center], k=size)
        hole = member[np.atleast_1d(idx)]
        # a section keeps at least half of its cells observed, so every hole has an edge
        if (in_hole[member].sum() + (~in_hole[hole]).sum()) * 2 > len(member):
            continue
        in_hole[hole] = True
    return in_hole


class SpatialMixin:
    """Methods of :class:`~latentcell.LatentDiffusionModel` for spatial data."""

    def _spatial_state(self) -> dict | None:
        """Return the registered spatial key and settings (``None`` without ``spatial_key``)."""
        key = self.registry_["setup_args"].get("spatial_key")
        if key is None:
            return None
        return {
            "key": key,
            "n_dims": len(self._field_state(SPATIAL_FIELD)["column_names"]),
            "n_neighbors": int(self._spatial_neighbors),
            "holes": float(self._spatial_holes),
        }

    def _groups(self, codes: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Tissue sections: the registered batch (neighbours never cross batches)."""
        return codes["batch"] if self.registry_["setup_args"].get("batch_key") else None

    def _spatial_flow_rows(self, z, cat, cont, codes, train_idx, val_idx):
        """Add the neighbourhood summary to the flow's training conditions.

        Every cell enters with the summary of its own neighbours (itself left out); with
        ``spatial_holes > 0`` the cells inside random simulated holes enter a second time,
        with the summary seen from the hole's edge, as :meth:`impute_region` will see it.

        Returns
        -------
        tuple
            ``(z, cat, cont, train_idx, val_idx)`` over the (possibly repeated) rows.
        """
        state = self._spatial_state()
        if state is None:
            return z, cat, cont, train_idx, val_idx
        coords, groups = codes["spatial"], self._groups(codes)
        self.reference_["latent"] = np.asarray(z, dtype=np.float32)
        if not state["n_neighbors"]:
            return z, cat, cont, train_idx, val_idx
        k = state["n_neighbors"]
        context, _ = neighbourhood_summary(coords, coords, z, k, groups, groups, exclude_self=True)
        groups_ = np.zeros(len(coords), int) if groups is None else groups
        in_hole = simulate_holes(
            coords, groups_, state["holes"], np.random.default_rng(settings.seed), min_size=k
        )
        rows = np.arange(len(coords))
        if in_hole.any() and (~in_hole).any():
            h = np.flatnonzero(in_hole)
            hole_context, _ = neighbourhood_summary(
                coords[h], coords[~in_hole], z[~in_hole], k, groups_[h], groups_[~in_hole]
            )
            rows = np.concatenate([rows, h])
            context = np.concatenate([context, hole_context])
        is_train = np.isin(rows, train_idx)
        is_val = np.isin(rows, val_idx)
        return (
            z[rows],
            cat[rows],
            np.concatenate([cont[rows], context], axis=1),
            np.flatnonzero(is_train),
            np.flatnonzero(is_val),
        )

    def _spatial_request(self, conditions):
        """Split the spatial coordinates off a ``conditions`` dict.

        Returns
        -------
        tuple
            ``(coords or None, conditions without them)``.
        """
        state = self._spatial_state()
        if not isinstance(conditions, Mapping):
            return None, conditions
        names = {"spatial"} | ({state["key"]} if state else set())
        given = [k for k in conditions if k in names]
        if not given:
            return None, conditions
        if state is None:
            raise ValueError(
                "This model has no spatial condition; set it up with "
                "setup_anndata(..., spatial_key='spatial') to generate at positions."
            )
        coords = check_positions(conditions[given[0]], state["n_dims"], "conditions['spatial']")
        return coords, {k: v for k, v in conditions.items() if k not in names}

    def _spatial_columns(
        self,
        n: int,
        coords: np.ndarray | None,
        pool: Mapping | None,
        query_groups: np.ndarray | None,
        rng: np.random.Generator,
        use_neighbourhood: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Flow condition columns of the position and neighbourhood for ``n`` requested cells.

        Returns
        -------
        tuple
            ``(columns, rows)``: the columns (NaN, i.e. null, where not requested) and, when a
            neighbourhood was used, one random neighbour per cell (pool rows), whose library size
            and covariates the decoder then uses.
        """
        state = self._spatial_state()
        if state is None:
            return np.zeros((n, 0), dtype=np.float32), None
        n_context = self.module.flow.condition.n_context
        columns = np.full((n, state["n_dims"] + n_context), np.nan, dtype=np.float32)
        if coords is None:
            return columns, None
        columns[:, : state["n_dims"]] = coords
        if not (n_context and use_neighbourhood):
            return columns, None
        groups = None if query_groups is None else pool["groups"]
        summary, neighbours = neighbourhood_summary(
            coords, pool["coords"], pool["latent"], state["n_neighbors"], query_groups, groups
        )
        columns[:, state["n_dims"] :] = summary
        rows = neighbours[np.arange(n), rng.integers(neighbours.shape[1], size=n)]
        return columns, rows

    def _reference_pool(self) -> dict:
        """Return the training cells as the observed neighbourhood of generated positions."""
        if "latent" not in self.reference_:
            raise RuntimeError("The model has no spatial reference; call model.train() first.")
        return {
            "coords": self.reference_["spatial"],
            "latent": self.reference_["latent"],
            "groups": self._groups(self.reference_),
            "codes": self.reference_,
        }

    def impute_region(
        self,
        mask_or_coords,
        adata: AnnData | None = None,
        conditions: Mapping | None = None,
        use_neighbourhood: bool = True,
        n_steps: int = 50,
        method: Literal["euler", "midpoint", "heun", "ddim"] | None = None,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        batch_size: int = 1024,
        progress_bar: bool = True,
    ) -> AnnData:
        """Generate the cells of a tissue region that was not measured.

        Parameters
        ----------
        mask_or_coords
            Either a boolean mask over the cells of ``adata`` marking the region (those cells
            are treated as unmeasured: only their positions are used, and the neighbourhood
            comes from the cells outside the mask), or an array ``(n, n_dims)`` of positions
            to fill (e.g. centroids of segmented but unmeasured cells, or a grid), whose
            neighbourhood comes from all cells of ``adata``.
        adata
            Spatial AnnData with the model's genes and ``obsm[spatial_key]``; defaults to the
            training data.
        conditions
            Further conditions of every generated cell, e.g. ``{"batch": "section_2"}``
            (which also restricts the neighbourhood to that section).
        use_neighbourhood
            Condition on the neighbourhood summary; ``False`` uses the position only.
        n_steps, method, cfg_scale, seed, batch_size, progress_bar
            As in :meth:`sample`.

        Returns
        -------
        anndata.AnnData
            AnnData as :meth:`sample` returns it, one generated cell per position, with the
            positions in ``obsm[spatial_key]`` (named after the masked cells when a mask was
            given), ready for ``squidpy.gr.spatial_neighbors`` and ``squidpy.pl.spatial_scatter``.
            The input is not modified.
        """
        state = self._spatial_state()
        if state is None:
            raise ValueError(
                "impute_region needs a spatial model: setup_anndata(..., spatial_key='spatial')."
            )
        self._check_stage("flow", "impute a region")
        adata = self._validate_anndata(adata)
        codes = self._registered_codes(adata)
        mask = np.asarray(mask_or_coords)
        if mask.dtype == bool:
            if mask.shape != (adata.n_obs,):
                raise ValueError(
                    f"The mask has shape {mask.shape}; it needs one boolean per cell of adata "
                    f"({adata.n_obs},)."
                )
            if not mask.any() or mask.all():
                raise ValueError(
                    "The mask must mark some cells, and leave some observed ones around them."
                )
            query, observed = np.flatnonzero(mask), np.flatnonzero(~mask)
            coords = codes["spatial"][query]
            names = adata.obs_names[query]
        else:
            coords = check_positions(mask_or_coords, state["n_dims"], "mask_or_coords")
            query, observed = None, np.arange(adata.n_obs)
            names = pd.Index([f"imputed_{i}" for i in range(len(coords))])
        latent = (
            self._latent_means(adata, indices=observed, batch_size=1024)
            if use_neighbourhood and state["n_neighbors"]
            else np.zeros((len(observed), 0), dtype=np.float32)
        )
        pool_codes = {k: np.asarray(v)[observed] for k, v in codes.items()}
        pool = {
            "coords": pool_codes["spatial"],
            "latent": latent,
            "groups": self._groups(pool_codes),
            "codes": pool_codes,
        }
        conditions = dict(conditions or {})
        batch_key = self.registry_["setup_args"].get("batch_key")
        if query is not None and batch_key:
            conditions.setdefault(batch_key, adata.obs[batch_key].to_numpy()[query])
        out = self._generate(
            self._parse_conditions(len(coords), conditions),
            n_steps=n_steps,
            method=self._sampler_method(method),
            cfg_scale=cfg_scale,
            seed=seed,
            batch_size=batch_size,
            latent_prior="flow",
            progress_bar=progress_bar,
            coords=coords,
            pool=pool,
            use_neighbourhood=use_neighbourhood,
        )
        out.obs_names = names
        out.uns["latentcell"]["imputed_region"] = True
        return out


def check_positions(value, n_dims: int, what: str) -> np.ndarray:
    """Positions as a float32 ``(n, n_dims)`` array, or a clear error."""
    try:
        coords = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be an array of numbers (n, {n_dims}).") from err
    if coords.ndim == 1 and coords.size == n_dims:
        coords = coords[None]
    if coords.ndim != 2 or coords.shape[1] != n_dims or not len(coords):
        raise ValueError(
            f"{what} must have shape (n_cells, {n_dims}), the model's spatial dimensions; got "
            f"{coords.shape}."
        )
    if not np.isfinite(coords).all():
        raise ValueError(f"{what} must hold finite numbers.")
    return coords.astype(np.float32)
