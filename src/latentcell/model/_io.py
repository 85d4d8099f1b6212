"""Safe persistence: JSON metadata and weights-only tensor files. Nothing is unpickled."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"
MDATA_FILE = "mdata.h5mu"
FORMAT_VERSION = 1


def to_jsonable(obj: Any) -> Any:
    """Encode registries and histories (dicts of arrays, frames, numpy scalars) as JSON."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": [to_jsonable(v) for v in obj.tolist()], "dtype": str(obj.dtype)}
    if isinstance(obj, pd.DataFrame):
        return {
            "__dataframe__": {c: to_jsonable(obj[c].to_numpy()) for c in obj.columns},
            "index": to_jsonable(obj.index.to_numpy()),
            "index_name": obj.index.name,
        }
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"Cannot store {type(obj).__name__} in model metadata.")


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            values = [from_jsonable(v) for v in obj["__ndarray__"]]
            return np.array(values, dtype=object if obj["dtype"] == "object" else obj["dtype"])
        if "__dataframe__" in obj:
            frame = pd.DataFrame(
                {c: from_jsonable(v) for c, v in obj["__dataframe__"].items()},
                index=from_jsonable(obj["index"]),
            )
            frame.index.name = obj["index_name"]
            return frame
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def write_model(
    dir_path: str | Path, metadata: dict, tensors: dict[str, Any], overwrite: bool
) -> Path:
    """Write metadata (JSON) and tensors (a dict of tensors saved with ``torch.save``)."""
    path = Path(dir_path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} already exists and is not empty; pass overwrite=True.")
    path.mkdir(parents=True, exist_ok=True)
    (path / METADATA_FILE).write_text(json.dumps(to_jsonable(metadata), indent=1))
    torch.save(tensors, path / WEIGHTS_FILE)
    return path


def read_model(dir_path: str | Path, map_location: str | torch.device = "cpu"):
    """Read what :func:`write_model` wrote, loading tensors with ``weights_only=True``."""
    path = Path(dir_path)
    meta_file, weights_file = path / METADATA_FILE, path / WEIGHTS_FILE
    if not meta_file.exists() or not weights_file.exists():
        raise FileNotFoundError(
            f"{path} does not hold a saved latentcell model (expected {METADATA_FILE} and "
            f"{WEIGHTS_FILE}); save one with model.save(dir_path)."
        )
    try:
        metadata = from_jsonable(json.loads(meta_file.read_text()))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{meta_file} is not valid JSON ({err}); the model folder is corrupted. Save the "
            f"model again."
        ) from err
    registry = metadata.get("registry") if isinstance(metadata, dict) else None
    if not (
        isinstance(registry, dict)
        and isinstance(registry.get("setup_args"), dict)
        and isinstance(registry.get("field_registries"), dict)
        and isinstance(metadata.get("init_params"), dict)
    ):
        raise ValueError(
            f"{meta_file} lacks the model's registry or parameters; it was not written by "
            f"latentcell's model.save() or has been edited. Save the model again."
        )
    try:
        tensors = torch.load(weights_file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{weights_file} could not be read as weights ({type(err).__name__}): the file is "
            f"truncated, corrupted or holds objects other than tensors. Nothing in it was "
            f"executed. Save the model again; never load untrusted files with pickle."
        ) from None
    if not (isinstance(tensors, dict) and {"module", "reference"} <= set(tensors)):
        raise ValueError(f"{weights_file} does not hold a latentcell model's weights.")
    return metadata, tensors
