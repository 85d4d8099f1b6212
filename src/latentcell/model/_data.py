"""In-memory data modules: registered counts for the VAE stage, latents for the flow stage."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset

from latentcell._constants import FLOW_KEYS


class _TensorDict(Dataset):
    """Rows of a dict of equally long arrays; batches are gathered in one indexing call.

    Values are torch tensors, or scipy CSR matrices whose gathered rows are densified per
    batch (so a large sparse count matrix is never held dense).
    """

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.n = next(iter(tensors.values())).shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return self.__getitems__([idx])

    def __getitems__(self, indices: list[int]):
        idx = np.asarray(indices, dtype=np.int64)
        out = {}
        for k, v in self.tensors.items():
            if sparse.issparse(v):
                out[k] = torch.from_numpy(v[idx].toarray())
            else:
                out[k] = v[torch.from_numpy(idx)]
        return out


def _identity(batch):
    return batch


class LatentDataModule(pl.LightningDataModule):
    """Train/validation loaders over the frozen VAE's latent means.

    The validation set carries fixed noise, times and an all-False dropout mask drawn once
    from ``seed``, so the validation flow loss is a deterministic function of the weights and
    early stopping compares like with like.

    Parameters
    ----------
    tensors
        ``{key: tensor}`` with one row per cell (latents and conditions).
    train_idx, val_idx
        Cells of each split.
    batch_size
        Minibatch size.
    n_attributes
        Number of conditions (width of the dropout mask).
    seed
        Seed of the fixed validation noise.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int = 256,
        n_attributes: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.train_idx = np.asarray(train_idx)
        self.val_idx = np.asarray(val_idx)
        self.n_train = len(self.train_idx)
        self.n_val = len(self.val_idx)
        self.batch_size = batch_size
        ti = torch.as_tensor(self.train_idx, dtype=torch.long)
        vi = torch.as_tensor(self.val_idx, dtype=torch.long)
        self.train_set = _TensorDict({k: v[ti] for k, v in tensors.items()})
        val = {k: v[vi] for k, v in tensors.items()}
        gen = torch.Generator().manual_seed(int(seed))
        z = tensors[FLOW_KEYS.LATENT]
        val[FLOW_KEYS.NOISE] = torch.randn(self.n_val, z.shape[1], generator=gen)
        val[FLOW_KEYS.TIME] = torch.rand(self.n_val, generator=gen)
        val[FLOW_KEYS.DROP] = torch.zeros(self.n_val, n_attributes, dtype=torch.bool)
        self.val_set = _TensorDict(val)

    def train_dataloader(self) -> DataLoader:
        """Shuffled minibatches of training cells."""
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=_identity,
            drop_last=self.n_train > self.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Return the validation cells with their fixed noise and times."""
        if self.n_val == 0:
            return []
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 1024), collate_fn=_identity)


class CountsDataModule(pl.LightningDataModule):
    """Train/validation loaders over registered counts held in memory.

    A lighter data path than scvi-tools' ``AnnDataLoader`` for AnnData that fit in memory:
    the registered fields are read once from the :class:`~scvi.data.AnnDataManager` into
    tensors (counts as float32, dense when smaller than ``dense_limit_bytes``, otherwise a
    CSR matrix densified one minibatch at a time), and each minibatch is one indexing call.
    Batches carry the same keys and dtypes as scvi-tools' loaders, so scvi-tools' modules
    and training plans consume them unchanged.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    train_idx, val_idx
        Cells of each split (e.g. from :class:`scvi.dataloaders.DataSplitter`).
    batch_size
        Minibatch size.
    dense_limit_bytes
        Largest count matrix stored dense.
    extra
        Further per-cell tensors to serve with each batch (e.g. flow conditions).
    """

    def __init__(
        self,
        adata_manager,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int = 128,
        dense_limit_bytes: int = 2**30,
        extra: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.train_idx = np.asarray(train_idx)
        self.val_idx = np.asarray(val_idx)
        self.test_idx = np.zeros(0, dtype=np.int64)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        self.batch_size = batch_size
        tensors = {**registered_tensors(adata_manager, dense_limit_bytes), **(extra or {})}
        self.train_set = _TensorDict(_rows(tensors, self.train_idx))
        self.val_set = _TensorDict(_rows(tensors, self.val_idx))

    def train_dataloader(self) -> DataLoader:
        """Return shuffled minibatches of training cells.

        A last batch of fewer than 3 cells is dropped, as scvi-tools does, so batch
        normalisation never sees a single cell.
        """
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=_identity,
            drop_last=self.n_train % self.batch_size < 3 and self.n_train > self.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Return the validation cells in order."""
        if self.n_val == 0:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=_identity)


def registered_tensors(adata_manager, dense_limit_bytes: int = 2**30) -> dict:
    """Every registered field of an AnnData as a tensor (counts possibly as CSR).

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    dense_limit_bytes
        Largest count matrix converted to a dense tensor.

    Returns
    -------
    dict
        ``{registry key: tensor or scipy CSR matrix}`` with one row per cell; categorical
        fields are int64 columns, everything else float32, as in scvi-tools' loaders.
    """
    import pandas as pd
    from scvi import REGISTRY_KEYS

    out = {}
    for key in adata_manager.data_registry:
        values = adata_manager.get_from_registry(key)
        if key == REGISTRY_KEYS.X_KEY or sparse.issparse(values):
            # count matrices (RNA, and other modalities of a MuData)
            if sparse.issparse(values):
                values = sparse.csr_matrix(values, dtype=np.float32)
                if values.shape[0] * values.shape[1] * 4 <= dense_limit_bytes:
                    values = torch.from_numpy(values.toarray())
            else:
                values = torch.from_numpy(np.asarray(values, dtype=np.float32))
            out[key] = values
            continue
        values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values)
        values = values.reshape(values.shape[0], -1)
        is_categorical = key in (
            REGISTRY_KEYS.BATCH_KEY,
            REGISTRY_KEYS.LABELS_KEY,
            REGISTRY_KEYS.CAT_COVS_KEY,
        )
        dtype = np.int64 if is_categorical else np.float32
        out[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=dtype))
    return out


def _rows(tensors: dict, idx: np.ndarray) -> dict:
    return {
        k: v[idx] if sparse.issparse(v) else v[torch.as_tensor(idx, dtype=torch.long)]
        for k, v in tensors.items()
    }


def ot_pairs(
    z: np.ndarray,
    cells: np.ndarray,
    groups: np.ndarray,
    perturbations: np.ndarray,
    is_control: np.ndarray,
    rng: np.random.Generator,
    chunk_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair every cell with a control cell of its group by minibatch optimal transport.

    Within each group (e.g. cell type x batch) and each perturbation, the cells are shuffled
    and cut into chunks of at most ``chunk_size``; each chunk is matched one to one with as
    many controls drawn from the group (without replacement where there are enough) by
    minimising the summed squared distance (:func:`scipy.optimize.linear_sum_assignment`).
    Each control cell is also paired with itself (an identity pair: no perturbation, no
    movement). Groups without controls contribute nothing.

    Parameters
    ----------
    z
        Latents ``(n_cells, n_latent)`` (standardised, so every dimension counts alike).
    cells
        Indices of the cells to pair (e.g. the training split).
    groups, perturbations
        Integer group and perturbation code of every cell.
    is_control
        Whether each cell is a control.
    rng
        Random generator (shuffling and control draws).
    chunk_size
        Largest assignment problem solved at once.

    Returns
    -------
    tuple of numpy.ndarray
        ``(sources, targets)``: equally long arrays of cell indices.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    cells = np.asarray(cells)
    sources, targets = [], []
    for g in np.unique(groups[cells]):
        members = cells[groups[cells] == g]
        controls = members[is_control[members]]
        if controls.size == 0:
            continue
        sources.append(controls)
        targets.append(controls)
        for p in np.unique(perturbations[members[~is_control[members]]]):
            tgt = rng.permutation(members[perturbations[members] == p])
            for start in range(0, tgt.size, chunk_size):
                chunk = tgt[start : start + chunk_size]
                src = rng.choice(controls, size=chunk.size, replace=chunk.size > controls.size)
                rows, cols = linear_sum_assignment(cdist(z[src], z[chunk], "sqeuclidean"))
                sources.append(src[rows])
                targets.append(chunk[cols])
    if not sources:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(sources), np.concatenate(targets)


class _PairBatches(torch.utils.data.IterableDataset):
    """Minibatches of (control, perturbed) latent pairs, re-paired at every epoch."""

    def __init__(self, z, condition, pair_fn, batch_size, seed, fixed: bool, n_pairs: int = 0):
        self.z, self.condition = z, condition
        self.pair_fn, self.batch_size, self.seed = pair_fn, batch_size, seed
        self.epoch = 0
        self._fixed = pair_fn(np.random.default_rng(seed)) if fixed else None
        self.n_pairs = len(self._fixed[0]) if fixed else n_pairs

    def __len__(self) -> int:
        """Approximate number of minibatches (the pairing can vary a little per epoch)."""
        return max(1, -(-self.n_pairs // self.batch_size))

    def __iter__(self):
        from latentcell.module._perturbation import (
            PERTURBATION_KEY,
            SOURCE_KEY,
            TARGET_KEY,
            TIME_KEY,
        )

        if self._fixed is not None:
            sources, targets = self._fixed
            order = np.arange(len(sources))
            times = torch.rand(len(sources), generator=torch.Generator().manual_seed(self.seed))
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            self.epoch += 1
            sources, targets = self.pair_fn(rng)
            order = rng.permutation(len(sources))
            times = None
        for start in range(0, len(order), self.batch_size):
            sel = order[start : start + self.batch_size]
            if sel.size < 2 and len(order) > 1:
                continue
            src = torch.as_tensor(sources[sel], dtype=torch.long)
            tgt = torch.as_tensor(targets[sel], dtype=torch.long)
            batch = {
                SOURCE_KEY: self.z[src],
                TARGET_KEY: self.z[tgt],
                PERTURBATION_KEY: self.condition[tgt],
            }
            if times is not None:
                batch[TIME_KEY] = times[torch.as_tensor(sel)]
            yield batch


class PairedLatentDataModule(pl.LightningDataModule):
    """Training and validation pairs for :class:`latentcell.module.PerturbationFlow`.

    Training pairs are drawn afresh every epoch with :func:`ot_pairs` among training cells;
    validation pairs (among validation cells, with controls of the validation split, or of
    the training split where a validation group has none) and their flow times are drawn
    once, so the validation loss depends only on the weights.

    Parameters
    ----------
    z
        Latents of all cells ``(n_cells, n_latent)``.
    condition
        Perturbation vector of every cell ``(n_cells, n_condition)`` (zero for controls).
    groups, perturbations, is_control
        Integer group and perturbation codes and the control flag of every cell.
    train_idx, val_idx
        Cells of each split.
    batch_size
        Pairs per minibatch.
    seed
        Seed of the pairings and of the fixed validation times.
    """

    def __init__(
        self,
        z: torch.Tensor,
        condition: torch.Tensor,
        groups: np.ndarray,
        perturbations: np.ndarray,
        is_control: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.test_idx = np.zeros(0, dtype=np.int64)
        scaled = ((z - z.mean(0)) / z.std(0).clamp_min(1e-4)).numpy()
        groups, perturbations = np.asarray(groups), np.asarray(perturbations)
        is_control = np.asarray(is_control, dtype=bool)

        def train_pairs(rng):
            return ot_pairs(scaled, self.train_idx, groups, perturbations, is_control, rng)

        def val_pairs(rng):
            # validation cells, with training controls added to the pool of sources only
            pool = np.union1d(self.val_idx, self.train_idx[is_control[self.train_idx]])
            src, tgt = ot_pairs(scaled, pool, groups, perturbations, is_control, rng)
            keep = np.isin(tgt, self.val_idx)
            return src[keep], tgt[keep]

        self.n_train = len(self.train_idx)
        self.train_set = _PairBatches(
            z, condition, train_pairs, batch_size, seed, False, n_pairs=self.n_train
        )
        self.val_set = (
            _PairBatches(z, condition, val_pairs, max(batch_size, 1024), seed + 1, True)
            if len(self.val_idx)
            else None
        )
        self.n_val = 0 if self.val_set is None else self.val_set.n_pairs

    def train_dataloader(self) -> DataLoader:
        """Return the epoch's shuffled pairs in minibatches."""
        return DataLoader(self.train_set, batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        """Return the fixed validation pairs."""
        if self.val_set is None or self.n_val == 0:
            return []
        return DataLoader(self.val_set, batch_size=None)
