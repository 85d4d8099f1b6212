"""Write generated cells to an .h5ad file block by block, so they never sit in memory at once."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from anndata import AnnData
from anndata.io import sparse_dataset, write_elem
from scipy import sparse

from latentcell._constants import LATENT_KEY


class H5adWriter:
    """Append blocks of generated cells to an ``.h5ad`` file.

    The file is first written from ``skeleton``: an AnnData with the final ``obs``, ``var``,
    ``uns`` and ``obsm`` (latents as zeros) and an empty sparse ``X`` of the final shape. Each
    :meth:`append` then adds the counts of the next block of rows to ``X`` (anndata's
    on-disk sparse dataset, CSR) and writes its latents in place.

    Parameters
    ----------
    path
        File to create (overwritten).
    skeleton
        The AnnData as it will be read back, with an empty ``X``.
    """

    def __init__(self, path: str | Path, skeleton: AnnData):
        self.path = Path(path)
        self.n_obs = skeleton.n_obs
        self.n_written = 0
        skeleton.write_h5ad(self.path)
        self.file = h5py.File(self.path, "r+")
        del self.file["X"]
        self.x = None

    def append(self, counts: sparse.csr_matrix, latents: np.ndarray) -> None:
        """Add the next block of rows."""
        counts = sparse.csr_matrix(counts, dtype=np.float32)
        rows = slice(self.n_written, self.n_written + counts.shape[0])
        if self.x is None:
            write_elem(self.file, "X", counts)
            self.x = sparse_dataset(self.file["X"])
        else:
            self.x.append(counts)
        self.file["obsm"][LATENT_KEY][rows] = latents
        self.n_written = rows.stop

    def close(self) -> None:
        """Close the file; raises if fewer rows were written than announced."""
        self.file.close()
        if self.n_written != self.n_obs:
            raise RuntimeError(f"Wrote {self.n_written} of {self.n_obs} cells to {self.path}.")
