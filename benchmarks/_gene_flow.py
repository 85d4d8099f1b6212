"""Gene-space rectified flow: the benchmark baseline "same denoiser, no VAE".

A :class:`latentcell.module.LatentFlow` with ``n_latent = n_genes`` trained directly on the
dense log1p(CP10k) expression of the training cells (CP10k over the AnnData's genes, i.e. the
benchmark's 2000 HVGs, which is also how ``latentcell.metrics`` normalises), conditioned on a
label, with the model's flow defaults: MLP denoiser, 128 hidden, 4 layers, the same condition
dropout, optimiser, batch size, epoch budget and early stopping on ``flow_loss_validation``
(see ``LatentDiffusionModel._train_flow``). Training uses ``LatentDataModule`` and
``FlowTrainingPlan`` with a plain Lightning ``Trainer``. The flow's per-dimension
standardisation (``set_scaling``) is kept, so the network sees z-scored genes.

Generated cells are returned as ``expm1`` of the generated log values clipped to
``[0, log1p(1e4)]``: a CP10k-scaled, non-integer expression. ``latentcell.metrics`` accepts
that (it only requires finite, non-negative values) and renormalises every cell to 1e4 before
its ``log1p``, so these cells are compared on the same footing as count-valued ones.

Not part of the package: imported by ``generation_pbmc3k.py`` and ``speed.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from latentcell._constants import FLOW_KEYS
from latentcell.metrics import log1p_cp10k
from latentcell.model._data import LatentDataModule
from latentcell.model._training import FlowTrainingPlan
from latentcell.module import LatentFlow

#: Largest value log1p(CP10k) can take (one gene holding every count of a cell).
LOG_MAX = float(np.log1p(1e4))
_LARGE = 100_000  # the model's threshold for its "large data" defaults


def log_expression(adata: ad.AnnData, layer: str | None = None) -> np.ndarray:
    """Dense float32 log1p(CP10k) of the counts in ``.X`` (or ``layer``), over all genes."""
    counts = adata.X if layer is None else adata.layers[layer]
    normed = log1p_cp10k(counts)
    normed = normed.toarray() if sp.issparse(normed) else normed
    return np.asarray(normed, dtype=np.float32)


def accelerator_device(accelerator: str) -> torch.device:
    """Torch device for a Lightning accelerator name."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class _WarmupEarlyStopping(EarlyStopping):
    """Lightning early stopping that never stops during the first ``warmup_epochs`` checks.

    Mirrors scvi-tools' ``early_stopping_warmup_epochs``, which the model uses for its flow.
    """

    def __init__(self, warmup_epochs: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.warmup_epochs = warmup_epochs
        self._n_checks = 0

    def _evaluate_stopping_criteria(self, current: torch.Tensor):
        self._n_checks += 1
        if self._n_checks <= self.warmup_epochs:
            return False, None
        return super()._evaluate_stopping_criteria(current)


class _EpochLog(Callback):
    """Record the logged flow losses of every epoch and the wall time of each epoch."""

    def __init__(self):
        self.history: dict[str, list[float]] = {
            "flow_loss_train": [],
            "flow_loss_validation": [],
        }
        self.epoch_seconds: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        # validation (when run) happens before on_train_epoch_end, so this covers both
        self.epoch_seconds.append(time.perf_counter() - self._t0)
        for key, values in self.history.items():
            if key in trainer.callback_metrics:
                values.append(float(trainer.callback_metrics[key]))


def train_vector_flow(
    x: np.ndarray,
    cat: np.ndarray,
    n_cats_per_attr: Sequence[int],
    *,
    denoiser: str = "mlp",
    n_hidden: int = 128,
    n_layers: int = 4,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    train_size: float = 0.9,
    early_stopping: bool = True,
    patience: int | None = None,
    lr: float = 1e-3,
    accelerator: str = "cpu",
    seed: int = 0,
    enable_progress_bar: bool = False,
    flow: LatentFlow | None = None,
) -> tuple[LatentFlow, _EpochLog]:
    """Train a conditional ``LatentFlow`` on arbitrary vectors, the way the model trains its own.

    Parameters
    ----------
    x
        Training vectors ``(n_cells, n_dims)`` (latent means, or log expression).
    cat
        Categorical condition codes ``(n_cells, n_attributes)``.
    n_cats_per_attr
        Number of categories of each condition.
    denoiser, n_hidden, n_layers
        Denoiser of the flow (the model's defaults below 100k cells).
    max_epochs
        ``None``: about ``max(4000, n_cells / 50)`` optimisation steps, 5 to 1000 epochs.
    batch_size
        ``None``: 128 below 100k cells, 1024 above.
    train_size
        Fraction of cells for training; the rest (seeded) is the validation set.
    early_stopping, patience
        Stop on ``flow_loss_validation``; patience ``max(50, max_epochs // 5)`` by default,
        never within the first ~1500 optimisation steps.
    lr
        AdamW learning rate (weight decay 1e-4, eps 1e-8, as the model).
    accelerator
        Lightning accelerator.
    seed
        Seeds the initial weights, the split, the minibatch order and the validation noise.
    enable_progress_bar
        Lightning progress bar.
    flow
        Continue training this flow instead of building a new one (its scaling is reset).

    Returns
    -------
    The trained flow (in eval mode, on the accelerator's device) and the epoch log, whose
    ``history`` holds per-epoch losses and ``epoch_seconds`` the wall time of each epoch.
    """
    x = np.asarray(x, dtype=np.float32)
    n, n_dims = x.shape
    cat = np.asarray(cat, dtype=np.int64).reshape(n, -1)
    pl.seed_everything(seed, verbose=False)
    if flow is None:
        flow = LatentFlow(
            n_latent=n_dims,
            n_cats_per_attr=list(n_cats_per_attr),
            denoiser=denoiser,
            n_hidden=n_hidden,
            n_layers=n_layers,
        )
    z = torch.as_tensor(x)
    flow.set_scaling(z)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(n * (1 - train_size))
    train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    batch_size = batch_size or (1024 if n >= _LARGE else 128)
    data = LatentDataModule(
        {
            FLOW_KEYS.LATENT: z,
            FLOW_KEYS.COND_CAT: torch.as_tensor(cat),
            FLOW_KEYS.COND_CONT: torch.zeros(n, 0),
        },
        train_idx=train_idx,
        val_idx=val_idx,
        batch_size=batch_size,
        n_attributes=flow.condition.n_attributes,
        seed=seed,
    )
    steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    target_steps = max(4000, n // 50)
    max_epochs = max_epochs or int(np.clip(round(target_steps / steps_per_epoch), 5, 1000))
    log = _EpochLog()
    callbacks: list[Callback] = [log]
    if early_stopping:
        if len(val_idx) == 0:
            raise ValueError("Early stopping needs validation cells; lower train_size.")
        callbacks.append(
            _WarmupEarlyStopping(
                monitor="flow_loss_validation",
                mode="min",
                patience=patience or max(50, max_epochs // 5),
                warmup_epochs=min(max_epochs // 2, math.ceil(1500 / steps_per_epoch)),
            )
        )
    plan = FlowTrainingPlan(flow, lr=lr, eps=1e-8, optimizer="AdamW", weight_decay=1e-4)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=enable_progress_bar,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        callbacks=callbacks,
    )
    flow.train()
    trainer.fit(plan, datamodule=data)
    flow.eval()
    flow.to(accelerator_device(accelerator))
    return flow, log


class GeneSpaceFlow:
    """Label-conditioned rectified flow on log1p(CP10k) expression, without a VAE.

    Parameters
    ----------
    adata
        Training cells with counts in ``.X`` (or ``layer``); every gene is modelled.
    labels_key
        Column of ``adata.obs`` the flow is conditioned on.
    layer
        Layer holding the counts; ``None`` uses ``.X``.
    **flow_kwargs
        Keyword arguments of :class:`latentcell.module.LatentFlow` (``denoiser``,
        ``n_hidden``, ``n_layers``, ...); defaults are the model's (MLP, 128, 4).
    """

    def __init__(self, adata: ad.AnnData, labels_key: str, layer: str | None = None, **kwargs):
        self.labels_key = labels_key
        self.var = adata.var.copy()
        self.categories = pd.Index(pd.Categorical(adata.obs[labels_key]).categories)
        self.codes = self.categories.get_indexer(adata.obs[labels_key]).astype(np.int64)
        self.x = log_expression(adata, layer)
        self.flow_kwargs = {"denoiser": "mlp", "n_hidden": 128, "n_layers": 4, **kwargs}
        self.flow: LatentFlow | None = None
        self.log: _EpochLog | None = None

    @property
    def n_genes(self) -> int:
        """Number of modelled genes (the flow's ``n_latent``)."""
        return self.x.shape[1]

    def train(self, **kwargs) -> GeneSpaceFlow:
        """Train the flow; keyword arguments go to :func:`train_vector_flow`."""
        self.flow, self.log = train_vector_flow(
            self.x, self.codes[:, None], [len(self.categories)], **self.flow_kwargs, **kwargs
        )
        return self

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-epoch ``flow_loss_train`` and ``flow_loss_validation``."""
        return {} if self.log is None else self.log.history

    def sample(
        self,
        conditions: pd.DataFrame | Sequence,
        n_steps: int = 50,
        method: str = "midpoint",
        seed: int = 0,
        batch_size: int = 1024,
    ) -> ad.AnnData:
        """Generate one cell per requested label.

        Parameters
        ----------
        conditions
            A DataFrame with a ``labels_key`` column (e.g. ``held_out.obs[[labels_key]]``) or
            a sequence of labels.
        n_steps, method
            ODE solver settings (the model's defaults: midpoint, 50 steps).
        seed
            Seed of the starting noise.
        batch_size
            Cells per batch.

        Returns
        -------
        AnnData with ``expm1(clip(generated log1p(CP10k), 0, log1p(1e4)))`` in ``.X`` (dense
        float32), the labels in ``obs`` and the training genes as ``var``.
        """
        if self.flow is None:
            raise RuntimeError("Train the gene-space flow before sampling.")
        labels = conditions[self.labels_key] if isinstance(conditions, pd.DataFrame) else conditions
        labels = pd.Series(np.asarray(labels))
        codes = self.categories.get_indexer(labels)
        if (codes < 0).any():
            unknown = sorted(set(labels[codes < 0].astype(str)))
            raise ValueError(f"Labels not seen in training: {unknown}.")
        n = len(codes)
        gen = torch.Generator().manual_seed(int(seed))
        out = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            noise = torch.randn(stop - start, self.n_genes, generator=gen)
            x = self.flow.sample(
                torch.as_tensor(codes[start:stop, None]),
                torch.zeros(stop - start, 0),
                n_steps=n_steps,
                method=method,
                noise=noise,
            )
            out.append(x.float().cpu().numpy())
        logx = np.clip(np.concatenate(out), 0.0, LOG_MAX)
        obs = pd.DataFrame(
            {self.labels_key: pd.Categorical(labels.to_numpy(), categories=self.categories)}
        )
        obs.index = obs.index.astype(str)
        return ad.AnnData(X=np.expm1(logx).astype(np.float32), obs=obs, var=self.var.copy())
