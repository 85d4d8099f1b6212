"""In-memory data for the flow stage: precomputed latents and condition codes."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from latentcell._constants import FLOW_KEYS


class _TensorDict(Dataset):
    """Rows of a dict of equally long tensors; batches are gathered in one indexing call."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return {k: v[idx] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


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
