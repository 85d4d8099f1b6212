"""Input checks that run before anything is written to the user's AnnData.

Also the one adjustment made just before scvi-tools registers it: a registration id copied
from other data is dropped (:func:`detach_copied_registration`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from latentcell._memory import release_memory


def check_not_view(adata: AnnData, what: str = "adata") -> None:
    """Refuse AnnData views, which scvi-tools would otherwise copy behind the user's back."""
    if adata.is_view:
        raise ValueError(
            f"{what} is a view of another AnnData (for example `adata[mask]`). latentcell "
            f"writes registration fields into the object, which a view cannot hold. "
            f"Make it an AnnData of its own first: `{what} = {what}.copy()`."
        )


def _stored_values(x) -> np.ndarray:
    if sparse.issparse(x):
        return np.asarray(x.data)
    return np.asarray(x)


def row_blocks(x, n_rows: int, block: int = 8192):
    """Yield in-memory blocks of consecutive rows of ``x``.

    Works for numpy arrays, scipy sparse matrices and the on-disk matrices of a backed
    AnnData (h5py datasets, anndata's sparse datasets), so a pass over a matrix holds one
    block in memory, never the whole matrix (and the heap is trimmed after each block, see
    :func:`~latentcell._memory.release_memory`).
    """
    for start in range(0, n_rows, block):
        yield x[start : min(start + block, n_rows)]
        release_memory()


def row_sums(x, n_rows: int) -> np.ndarray:
    """Total of each row of ``x`` (in memory or on disk), block by block."""
    if n_rows == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(
        [np.asarray(b.sum(axis=1), dtype=np.float64).ravel() for b in row_blocks(x, n_rows)]
    )


def check_counts(adata: AnnData, layer: str | None, allow_empty_cells: bool = False) -> None:
    """Check that the matrix used by a count likelihood holds finite non-negative integers.

    ``allow_empty_cells`` accepts cells without counts (a modality not measured in them).
    The matrix is read in blocks of rows, so a backed AnnData is never loaded whole.

    Raises
    ------
    ValueError
        Naming the problem (NaN/inf, negative, non-integer values, or cells with no counts),
        how many entries or cells are affected, and how to fix it.
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise ValueError(
            f"Layer {layer!r} not found. Available layers: {list(adata.layers)}; pass "
            f"layer=None to use adata.X."
        )
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise ValueError(f"{where} is empty; store raw counts there or pass layer=...")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"{where} has {adata.n_obs} cells and {adata.n_vars} genes; the model needs at least "
            f"one of each."
        )
    n_bad = n_neg = n_frac = 0
    minimum, example = np.inf, None
    totals = []
    for block in row_blocks(x, adata.n_obs):
        values = _stored_values(block)
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
            values.dtype, np.complexfloating
        ):
            raise ValueError(f"{where} has dtype {values.dtype}; expected numeric counts.")
        finite = np.isfinite(values)
        n_bad += int((~finite).sum())
        values = values[finite]
        n_neg += int((values < 0).sum())
        minimum = min(minimum, float(values.min())) if values.size else minimum
        distance = np.round(values)  # in place from here: one temporary per block
        np.subtract(distance, values, out=distance)
        np.abs(distance, out=distance)
        frac = distance > 1e-6
        del distance
        n_frac += int(frac.sum())
        if example is None and frac.any():
            example = float(values[frac][0])
        totals.append(np.asarray(block.sum(axis=1), dtype=np.float64).ravel())
    if n_bad:
        raise ValueError(
            f"{where} contains {n_bad} NaN or infinite values. Count likelihoods need finite "
            f"non-negative integer counts: fix or drop the affected cells/genes first."
        )
    if n_neg:
        raise ValueError(
            f"{where} contains {n_neg} negative values (minimum {minimum:g}). This looks "
            f"like scaled or centred data; pass the raw counts with layer=... instead."
        )
    if n_frac:
        raise ValueError(
            f"{where} contains {n_frac} non-integer values "
            f"(e.g. {example:g}). gene_likelihood 'nb', 'zinb' and "
            f"'poisson' model raw integer counts; this "
            f"looks normalised or log-transformed. Pass the layer holding raw counts with "
            f"layer=..., or round recovered counts explicitly."
        )
    totals = np.concatenate(totals) if totals else np.zeros(0)
    empty = np.flatnonzero(totals <= 0)
    if empty.size and not allow_empty_cells:
        names = ", ".join(map(str, adata.obs_names[empty[:3]]))
        raise ValueError(
            f"{empty.size} of {adata.n_obs} cells have no counts in {where} (e.g. {names}). "
            f"Drop them before setup: `sc.pp.filter_cells(adata, min_counts=1)` or "
            f"`adata = adata[adata.X.sum(1).A1 > 0].copy()`."
        )


def check_obs_columns(adata: AnnData, categorical: list[str], continuous: list[str]) -> None:
    """Check that registered obs columns exist and hold no missing values."""
    for key in [*categorical, *continuous]:
        if key not in adata.obs:
            raise ValueError(
                f"Column {key!r} not found in adata.obs. Available columns: "
                f"{list(adata.obs.columns)}."
            )
    for key in categorical:
        n_missing = int(pd.isna(adata.obs[key]).sum())
        if n_missing:
            raise ValueError(
                f"adata.obs[{key!r}] has {n_missing} missing values. Fill them with an explicit "
                f"category (e.g. 'unknown') or drop those cells before setup."
            )
    for key in continuous:
        col = adata.obs[key]
        if not pd.api.types.is_numeric_dtype(col):
            raise ValueError(f"adata.obs[{key!r}] must be numeric to be a continuous covariate.")
        n_bad = int((~np.isfinite(col.to_numpy(dtype=float))).sum())
        if n_bad:
            raise ValueError(
                f"adata.obs[{key!r}] has {n_bad} NaN or infinite values; fill or drop them."
            )


def check_var_names(adata: AnnData, var_names: pd.Index | np.ndarray) -> None:
    """Require the genes, in order, that the model was trained on."""
    expected = pd.Index(var_names)
    if adata.n_vars == len(expected) and (adata.var_names == expected).all():
        return
    missing = expected.difference(adata.var_names)
    extra = adata.var_names.difference(expected)
    detail = []
    if len(missing):
        detail.append(f"{len(missing)} genes missing (e.g. {list(missing[:3])})")
    if len(extra):
        detail.append(f"{len(extra)} unexpected genes (e.g. {list(extra[:3])})")
    if not detail:
        detail.append("same genes in a different order")
    raise ValueError(
        f"The AnnData's genes do not match the {len(expected)} genes the model was trained on: "
        f"{'; '.join(detail)}. Subset and reorder first, e.g. "
        f"`adata = adata[:, model_var_names].copy()` with the training var_names."
    )


def check_perturbation(
    adata: AnnData,
    perturbation_key: str,
    control_value: str,
    separator: str,
    dose_key: str | None,
    embeddings,
) -> dict | None:
    """Check the perturbation columns and normalise the embeddings to a JSON-able dict.

    Returns
    -------
    dict or None
        ``None`` without embeddings, else ``{"names": [...], "values": [[...], ...]}``.
    """
    if dose_key is not None and dose_key in adata.obs:
        if not pd.api.types.is_numeric_dtype(adata.obs[dose_key]):
            raise ValueError(
                f"adata.obs[{dose_key!r}] must hold numeric doses, got dtype "
                f"{adata.obs[dose_key].dtype}."
            )
    check_obs_columns(adata, [perturbation_key], [dose_key] if dose_key else [])
    values = adata.obs[perturbation_key].astype(str)
    if control_value not in set(values):
        found = sorted(set(values))[:10]
        raise ValueError(
            f"control_value={control_value!r} does not occur in adata.obs[{perturbation_key!r}] "
            f"(values include {found}). Pass the label of the control cells as control_value."
        )
    if not separator:
        raise ValueError("perturbation_separator must be a non-empty string, e.g. '+'.")
    if embeddings is None:
        return None
    if isinstance(embeddings, str):
        if embeddings not in adata.uns:
            raise ValueError(
                f"perturbation_embeddings={embeddings!r} is not a key of adata.uns "
                f"(keys: {list(adata.uns)}). Pass a DataFrame or the key of one in adata.uns."
            )
        embeddings = adata.uns[embeddings]
    if isinstance(embeddings, dict) and set(embeddings) == {"names", "values"}:
        embeddings = pd.DataFrame(np.asarray(embeddings["values"]), index=embeddings["names"])
    if not isinstance(embeddings, pd.DataFrame):
        raise ValueError(
            "perturbation_embeddings must be a DataFrame (one row per single perturbation, "
            f"indexed by its name) or a key of adata.uns holding one, got "
            f"{type(embeddings).__name__}."
        )
    matrix = embeddings.to_numpy(dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.isfinite(matrix).all():
        raise ValueError("perturbation_embeddings must hold finite numbers, one row per name.")
    names = embeddings.index.astype(str)
    if names.has_duplicates:
        raise ValueError("perturbation_embeddings has duplicated row names.")
    components = {c for v in set(values) if v != control_value for c in v.split(separator) if c}
    missing = sorted(components - set(names))
    if missing:
        raise ValueError(
            f"{len(missing)} perturbations of adata.obs[{perturbation_key!r}] have no row in "
            f"perturbation_embeddings (e.g. {missing[:5]}). Add their vectors, or drop those "
            f"cells."
        )
    return {"names": list(names), "values": matrix.tolist()}


def check_spatial(adata: AnnData, spatial_key: str) -> None:
    """Require ``obsm[spatial_key]``: finite 2-D or 3-D coordinates, one row per cell."""
    if spatial_key not in adata.obsm:
        raise ValueError(
            f"spatial_key={spatial_key!r} not found in adata.obsm (keys: "
            f"{list(adata.obsm.keys())}). Put the cell coordinates there, e.g. "
            f"adata.obsm['spatial'] = adata.obs[['x', 'y']].to_numpy()."
        )
    coords = adata.obsm[spatial_key]
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must have 2 or 3 columns (x, y[, z]); got shape "
            f"{coords.shape}."
        )
    if not np.issubdtype(coords.dtype, np.number) or not np.isfinite(coords).all():
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must hold finite numbers; drop the cells without "
            f"coordinates first."
        )


def check_registered_obs(adata: AnnData, registry: dict) -> None:
    """Check a query's registered ``obs`` columns against a saved scvi-tools registry.

    Before scvi-tools transfers the setup (and writes into the AnnData), name the columns
    with missing values and the categories the model never saw, so the user's AnnData is left
    as it was.
    """
    from scvi import REGISTRY_KEYS

    args, fields = registry["setup_args"], registry["field_registries"]

    def state(key):
        return (fields.get(key) or {}).get("state_registry") or {}

    categorical = {}
    for arg, field in (
        ("labels_key", REGISTRY_KEYS.LABELS_KEY),
        ("batch_key", REGISTRY_KEYS.BATCH_KEY),
        ("perturbation_key", "perturbation"),
    ):
        if args.get(arg) is not None and "categorical_mapping" in state(field):
            categorical[args[arg]] = state(field)["categorical_mapping"]
    for key, cats in (state(REGISTRY_KEYS.CAT_COVS_KEY).get("mappings") or {}).items():
        categorical[key] = cats
    continuous = [
        *(args.get("continuous_covariate_keys") or []),
        *(args.get("continuous_condition_keys") or []),
        *([args["dose_key"]] if args.get("dose_key") else []),
    ]
    for key in [*categorical, *continuous]:
        if key in adata.obs and int(pd.isna(adata.obs[key]).sum()):
            raise ValueError(
                f"adata.obs[{key!r}] has {int(pd.isna(adata.obs[key]).sum())} missing values; "
                f"fill them with a category the model knows, or drop those cells."
            )
    for key, cats in categorical.items():
        if key not in adata.obs or key == args.get("perturbation_key"):
            continue
        known = {str(c) for c in np.asarray(cats)}
        unseen = sorted({str(v) for v in pd.unique(adata.obs[key])} - known)
        if unseen:
            raise ValueError(
                f"adata.obs[{key!r}] has value(s) {unseen[:5]} the model never saw; it knows "
                f"{sorted(known)[:20]}. Map them to known values or drop those cells."
            )


def detach_copied_registration(store: dict, data) -> None:
    """Let a copy of registered data be registered without undoing the original's registration.

    ``data.copy()`` keeps ``uns['_scvi_uuid']``, the id under which scvi-tools files a
    registration (``store``: the model class's ``_setup_adata_manager_store``). Registering the
    copy under that id would replace the original's registration, and models built on the
    original afterwards fail with scvi-tools' "Did you make a copy?". When the id is already
    filed for another object, it is removed here, so the copy is given an id of its own.
    """
    from scvi.data import _constants

    uuid = data.uns.get(_constants._SCVI_UUID_KEY)
    manager = store.get(uuid) if uuid is not None else None
    if manager is not None and manager.adata is not data:
        del data.uns[_constants._SCVI_UUID_KEY]
