"""Batch correction by regeneration: invert the flow under one batch, sample under another."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from tqdm.auto import tqdm

from latentcell.model._multimodal import _is_mudata
from latentcell.model._perturbation import _preview, per_cell_output
from latentcell.module._path import SAMPLER_METHODS

#: ``obsm`` key of the corrected latents.
CORRECTED_KEY = "X_latentcell_corrected"


class BatchCorrectionMixin:
    """:meth:`correct_batch` for :class:`~latentcell.LatentDiffusionModel`."""

    def _batch_attribute(self, batch_key: str | None) -> tuple[int, dict]:
        """Column of the flow's categorical conditions that holds ``batch_key``, and its entry."""
        attrs = self._condition_attributes()["categorical"]
        if batch_key is None:
            batch_key = self.registry_["setup_args"].get("batch_key")
            if batch_key is None:
                raise ValueError(
                    "This model has no registered batch: set up the AnnData with batch_key=... "
                    "(or a categorical_covariate_keys column and pass batch_key=<that column>)."
                )
        for i, attr in enumerate(attrs):
            if attr["name"] == batch_key and attr["source"] != REGISTRY_KEYS.LABELS_KEY:
                return i, attr
        choices = [a["name"] for a in attrs if a["source"] != REGISTRY_KEYS.LABELS_KEY]
        raise ValueError(
            f"{batch_key!r} is not a registered batch column; the registered batch and "
            f"categorical covariates are: {choices}."
        )

    def correct_batch(
        self,
        adata: AnnData | None = None,
        target_batch: str | Sequence[str] | None = None,
        batch_key: str | None = None,
        indices: Sequence[int] | None = None,
        use_labels: bool = True,
        strategy: Literal["flow", "decoder"] = "flow",
        n_steps: int = 50,
        method: str = "midpoint",
        cfg_scale: float = 1.0,
        seed: int | None = None,
        batch_size: int = 1024,
        progress_bar: bool = True,
    ) -> AnnData:
        """Move cells into another batch by regeneration, keeping their biology.

        Each cell is encoded (the VAE's latent mean), carried by the latent flow's ODE
        backwards to noise under its own conditions (batch, labels, covariates), carried
        forwards again from that noise with the batch replaced by ``target_batch`` (all other
        conditions kept), decoded with the target batch and the cell's own library size and
        covariates, and counts are drawn from the decoder's likelihood. The noise is the
        cell's coordinate in the flow's batch-free base distribution, so what the flow
        learnt to depend on the batch changes and the rest is kept.

        Parameters
        ----------
        adata
            Cells to correct, with the training genes and the registered ``obs`` columns;
            ``None`` uses the training data.
        target_batch
            The batch to move every cell into (a category of ``batch_key`` seen in
            training), or one per cell.
        batch_key
            The registered column to change: ``None`` is the registered ``batch_key``; the
            name of a registered categorical covariate (e.g. a donor column) also works.
        indices
            Subset of the cells of ``adata`` to correct.
        use_labels
            Condition both passes on the cells' registered labels (when a ``labels_key`` was
            registered). ``False`` leaves the labels unspecified (the flow's null label),
            for query cells whose labels are unknown.
        strategy
            ``"flow"`` (the regeneration above) or ``"decoder"``: keep each cell's latent and
            only decode it with the target batch (scVI's ``transform_batch`` counterfactual in
            the same VAE; a baseline that leaves out the flow).
        n_steps, method
            ODE solver settings of both passes (``"euler"``, ``"midpoint"`` or ``"heun"``).
        cfg_scale
            Classifier-free guidance of the forward pass (1 is the plain conditional flow);
            the backward pass is never guided.
        seed
            Seed of the count draws.
        batch_size
            Cells per minibatch.
        progress_bar
            Show a progress bar.

        Returns
        -------
        anndata.AnnData
            A new AnnData (the input is not modified): corrected counts in ``.X`` (float32
            CSR), decoded means in ``layers['latentcell_mean']``, the source cells' ``obs``
            (with their original batch) and ``obs['source_cell']``, the cells' own latents in
            ``obsm['X_latentcell']`` and the corrected ones in
            ``obsm['X_latentcell_corrected']``, the settings in ``uns['latentcell']``.

        Examples
        --------
        >>> corrected = model.correct_batch(target_batch="10x v3")  # doctest: +SKIP
        >>> sc.pp.log1p(corrected); sc.pp.pca(corrected)  # doctest: +SKIP
        """
        self._check_stage("flow", "correct batches")
        if self.is_multimodal or (adata is not None and _is_mudata(adata)):
            raise ValueError("correct_batch is available for AnnData models only (not MuData).")
        if self._spatial_state() is not None:
            raise ValueError("correct_batch is not available for spatial models yet.")
        if method not in SAMPLER_METHODS:
            raise ValueError(f"method must be one of {SAMPLER_METHODS}, got {method!r}.")
        if strategy not in ("flow", "decoder"):
            raise ValueError(f"strategy must be 'flow' or 'decoder', got {strategy!r}.")
        column, attr = self._batch_attribute(batch_key)
        categories = [str(c) for c in attr["categories"]]
        if target_batch is None:
            raise ValueError(
                f"Pass target_batch=...; the batches of {attr['name']!r} are "
                f"{_preview(categories)}."
            )
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        n = len(indices)
        if n == 0:
            raise ValueError("No cells to correct.")
        targets = (
            np.full(n, str(target_batch), dtype=object)
            if isinstance(target_batch, str) or np.ndim(target_batch) == 0
            else np.asarray(target_batch, dtype=object).astype(str)
        )
        if len(targets) != n:
            raise ValueError(
                f"target_batch has {len(targets)} values for {n} cells; pass one or one per cell."
            )
        unknown = sorted(set(targets) - set(categories))
        if unknown:
            raise ValueError(
                f"target_batch {_preview(unknown)} not seen in training; the batches of "
                f"{attr['name']!r} are {_preview(categories)}."
            )
        target_codes = pd.Categorical(targets, categories=categories).codes.astype(np.int64)

        z = self._latent_means(adata, indices=indices, batch_size=batch_size)
        codes = self._registered_codes(adata, latents=z, indices=indices)
        cat, cont = self._flow_codes(codes)
        if not use_labels:
            for i, a in enumerate(self._condition_attributes()["categorical"]):
                if a["source"] == REGISTRY_KEYS.LABELS_KEY:
                    cat[:, i] = len(a["categories"])  # the null token
        target_cat = cat.copy()
        target_cat[:, column] = target_codes
        ref = dict(codes)
        if attr["source"] == REGISTRY_KEYS.BATCH_KEY:
            ref["batch"] = target_codes
        else:
            ref["cat_covs"] = ref["cat_covs"].copy()
            ref["cat_covs"][:, attr["column"]] = target_codes

        flow, device = self.module.flow, self.module.device
        self.module.eval()
        rng = np.random.default_rng(seed)
        corrected, counts, means = [], [], []
        with (
            tqdm(
                total=(2 * n_steps if strategy == "flow" else 1) * math.ceil(n / batch_size),
                desc="Correcting",
                disable=not progress_bar,
                unit="step",
            ) as bar,
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.inference_mode(),
        ):
            torch.manual_seed(int(rng.integers(2**62)))
            for start in range(0, n, batch_size):
                sl = slice(start, min(start + batch_size, n))
                c_own, c_target = torch.as_tensor(cat[sl]), torch.as_tensor(target_cat[sl])
                c_cont = torch.as_tensor(cont[sl])
                if strategy == "flow":
                    step = dict(n_steps=n_steps, method=method, callback=lambda _: bar.update(1))
                    noise = flow.invert(torch.as_tensor(z[sl]), c_own, c_cont, **step)
                    z_new = flow.sample(c_target, c_cont, cfg_scale=cfg_scale, noise=noise, **step)
                else:
                    z_new = torch.as_tensor(z[sl], device=device)
                    bar.update(1)
                px = self._decode(z_new, {k: v[sl] for k, v in ref.items()})
                c, m = self._draw(px)["rna"]
                counts.append(c)
                means.append(m)
                corrected.append(z_new.cpu().numpy())

        var = (
            self.adata.var.copy()
            if self.adata is not None
            else pd.DataFrame(index=pd.Index(self.var_names_))
        )
        out = per_cell_output(
            adata.obs.iloc[indices],
            np.arange(n),
            1,
            counts,
            means,
            z,
            var,
            dict(
                task="correct_batch",
                batch_key=attr["name"],
                target_batch=str(target_batch) if isinstance(target_batch, str) else None,
                use_labels=use_labels,
                strategy=strategy,
                n_steps=n_steps,
                method=method,
                cfg_scale=cfg_scale,
                seed=seed,
            ),
        )
        out.obsm[CORRECTED_KEY] = np.concatenate(corrected).astype(np.float32)
        return out


__all__ = ["CORRECTED_KEY", "BatchCorrectionMixin"]
