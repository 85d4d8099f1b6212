"""MuData support of LatentDiffusionModel: joint registration, MuData output, translation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import (
    MuDataCategoricalJointObsField,
    MuDataCategoricalObsField,
    MuDataLayerField,
    MuDataNumericalJointObsField,
)
from tqdm.auto import tqdm

from latentcell._constants import FLOW_KEYS, LATENT_KEY, MEAN_LAYER
from latentcell.model._data import LatentDataModule
from latentcell.model._perturbation import per_cell_output
from latentcell.model._validation import (
    check_counts,
    check_not_view,
    check_obs_columns,
    detach_copied_registration,
)
from latentcell.module._counts import sample_counts

#: Modalities latentcell knows, with their scvi-tools registry key and default likelihood.
MODALITIES = {
    "rna": (REGISTRY_KEYS.X_KEY, "nb"),
    "protein": (REGISTRY_KEYS.PROTEIN_EXP_KEY, "nb"),
    "accessibility": ("accessibility", "bernoulli"),
}


def _is_mudata(data) -> bool:
    return hasattr(data, "mod") and hasattr(data, "n_mod")


class MultiModalMixin:
    """Methods of :class:`LatentDiffusionModel` for models set up with :meth:`setup_mudata`."""

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_mudata(
        cls,
        mdata,
        modalities: Mapping[str, str],
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        accessibility_layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register a MuData with RNA and further modalities of the same cells.

        Parameters
        ----------
        mdata
            MuData whose modalities hold raw counts of the same cells, in the same order.
            A cell whose row of a non-RNA modality sums to zero is treated as not measured in
            that modality (it is skipped by that modality's loss and can be translated).
        modalities
            ``{"rna": <mod key>, "protein": <mod key>, "accessibility": <mod key>}``: which
            ``mdata.mod`` entry holds each modality; ``"rna"`` and at least one other are
            required.
        rna_layer, protein_layer, accessibility_layer
            Layer of each modality holding the counts (``None``: ``.X``).
        labels_key, batch_key, categorical_covariate_keys, continuous_covariate_keys
            Columns of ``mdata.obs``, as in :meth:`setup_anndata`: labels and batch are
            conditions of the flow, the batch is also a covariate of the encoders and
            decoders.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> LatentDiffusionModel.setup_mudata(
        ...     mdata, modalities={"rna": "rna", "protein": "prot"}, batch_key="donor"
        ... )
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not _is_mudata(mdata):
            raise TypeError(
                f"setup_mudata needs a MuData, got {type(mdata).__name__}; use setup_anndata "
                f"for a single AnnData."
            )
        modalities = dict(modalities)
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(
                f"Unknown modality name(s) {unknown}; latentcell knows {list(MODALITIES)}. "
                f"Map each to a key of mdata.mod, e.g. {{'rna': 'rna', 'protein': 'prot'}}."
            )
        if "rna" not in modalities or len(modalities) < 2:
            raise ValueError(
                "modalities must name 'rna' and at least one more modality, e.g. "
                "{'rna': 'rna', 'protein': 'prot'}."
            )
        check_not_view(mdata, "mdata")
        layers = {"rna": rna_layer, "protein": protein_layer, "accessibility": accessibility_layer}
        for name, mod_key in modalities.items():
            if mod_key not in mdata.mod:
                raise ValueError(
                    f"modalities[{name!r}] = {mod_key!r} is not in mdata.mod "
                    f"(keys: {list(mdata.mod)})."
                )
            mod = mdata.mod[mod_key]
            if mod.n_obs != mdata.n_obs or not (mod.obs_names == mdata.obs_names).all():
                raise ValueError(
                    f"mdata.mod[{mod_key!r}] does not hold the same cells, in the same order, as "
                    f"mdata ({mod.n_obs} vs {mdata.n_obs} cells). Give every modality a row per "
                    f"cell (zeros where it was not measured) and call mdata.update()."
                )
            try:
                check_counts(mod, layers[name], allow_empty_cells=name != "rna")
            except ValueError as err:
                raise ValueError(f"Modality {name!r} (mdata.mod[{mod_key!r}]): {err}") from None
        categorical = [k for k in [labels_key, batch_key, *(categorical_covariate_keys or [])] if k]
        check_obs_columns(mdata, categorical, list(continuous_covariate_keys or []))
        fields = [
            MuDataLayerField(
                MODALITIES[name][0],
                layers[name],
                mod_key=mod_key,
                is_count_data=True,
                mod_required=True,
            )
            for name, mod_key in sorted(
                modalities.items(), key=lambda kv: list(MODALITIES).index(kv[0])
            )
        ]
        fields += [
            MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            MuDataCategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            MuDataNumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        detach_copied_registration(cls._setup_adata_manager_store, mdata)
        manager.register_fields(mdata, **kwargs)
        cls.register_manager(manager)

    # ------------------------------------------------------------------ registry helpers
    @property
    def is_multimodal(self) -> bool:
        """Whether the model was set up with :meth:`setup_mudata`."""
        return "modalities" in self.registry_["setup_args"]

    def _modalities(self) -> list[dict]:
        """Return the registered modalities in canonical order (RNA first), with features."""
        mods = self.registry_["setup_args"]["modalities"]
        out = []
        for name in MODALITIES:
            if name in mods:
                key = MODALITIES[name][0]
                names = np.asarray(self._field_state(key)["column_names"]).astype(str)
                out.append(
                    {"name": name, "mod_key": mods[name], "registry_key": key, "var_names": names}
                )
        return out

    def _modality(self, name: str) -> dict:
        known = {m["name"]: m for m in self._modalities()}
        if name not in known:
            raise ValueError(f"Unknown modality {name!r}; this model has {list(known)}.")
        return known[name]

    def _modality_var(self, name: str) -> pd.DataFrame:
        mod = self._modality(name)
        if self.adata is not None:
            return self.adata.mod[mod["mod_key"]].var.copy()
        return pd.DataFrame(index=pd.Index(mod["var_names"]))

    def _multimodal_specs(self, protein_likelihood: str) -> list[tuple[str, str, int, str]]:
        likelihoods = {name: lik for name, (_, lik) in MODALITIES.items()}
        likelihoods["protein"] = protein_likelihood
        return [
            (m["name"], m["registry_key"], len(m["var_names"]), likelihoods[m["name"]])
            for m in self._modalities()
        ]

    # ------------------------------------------------------------------ training
    def _train_translation(self, opts) -> None:
        self._check_stage("vae", "train the translation flow")
        adata = self.adata
        primary = self._modalities()[0]["name"]
        z_full = self._latent_means(adata, batch_size=1024)
        z_source = self._latent_means(adata, batch_size=1024, use_modalities=[primary])
        observed = self._observed_modalities(adata)
        complete = observed.all(1)
        if complete.sum() < 2:
            raise ValueError(
                "The translation flow needs cells measured in every modality; found "
                f"{int(complete.sum())}."
            )
        train_idx, val_idx = self._flow_split(adata.n_obs, opts.train_size, opts.validation_size)
        train_idx = train_idx[complete[train_idx]]
        val_idx = val_idx[complete[val_idx]]
        flow = self.module.translation_flow
        rows = torch.as_tensor(np.flatnonzero(complete))
        z_full_t, z_source_t = torch.as_tensor(z_full), torch.as_tensor(z_source)
        device = flow.latent_mean.device
        flow.set_scaling(z_full_t[rows].to(device), z_source_t[rows].to(device))
        batch_size = opts.batch_size or 128
        data = LatentDataModule(
            {FLOW_KEYS.LATENT: z_full_t, FLOW_KEYS.SOURCE: z_source_t},
            train_idx,
            val_idx,
            batch_size=batch_size,
            n_attributes=1,
            seed=settings.seed or 0,
        )
        self._run_flow_stage("translation", flow, data, len(train_idx), 3000, batch_size, opts)

    @torch.inference_mode()
    def _observed_modalities(self, adata) -> np.ndarray:
        """Boolean ``(n_cells, n_modalities)``: which modalities of each cell were measured."""
        manager = self.get_anndata_manager(adata, required=True)
        cols = []
        for m in self._modalities():
            x = manager.get_from_registry(m["registry_key"])
            cols.append(np.asarray(x.sum(axis=1)).ravel() > 0)
        return np.stack(cols, axis=1)

    # ------------------------------------------------------------------ outputs
    def _draw(self, px) -> dict[str, tuple[sparse.csr_matrix, np.ndarray]]:
        """Draw counts from decoder likelihoods (one per modality) and return them with means."""
        if not isinstance(px, Mapping):
            px = {"rna": px}
        out = {}
        for name, dist in px.items():
            out[name] = (
                sparse.csr_matrix(sample_counts(dist).cpu().numpy().astype(np.float32)),
                dist.mean.cpu().numpy().astype(np.float32),
            )
        return out

    def _generated_mudata(self, rna: AnnData, parts: dict, latents: np.ndarray):
        """Wrap generated modalities into a MuData with the conditions in the global obs."""
        import mudata

        mods = {}
        for m in self._modalities():
            if m["name"] == "rna":
                mods[m["mod_key"]] = rna
                continue
            counts, means = parts[m["name"]]
            a = AnnData(X=counts, obs=rna.obs.copy(), var=self._modality_var(m["name"]))
            a.layers[MEAN_LAYER] = means
            mods[m["mod_key"]] = a
        out = mudata.MuData(mods)
        for col in rna.obs.columns:
            out.obs[col] = rna.obs[col].values
        out.obsm[LATENT_KEY] = latents
        out.uns["latentcell"] = dict(rna.uns.get("latentcell", {}))
        return out

    # ------------------------------------------------------------------ translation
    def _query_mudata(self, data, source: str):
        """Build a MuData registered like the training data, with only ``source`` measured."""
        import mudata

        from latentcell.model._validation import check_var_names

        src_mod = self._modality(source)
        if _is_mudata(data):
            if src_mod["mod_key"] not in data.mod:
                raise ValueError(
                    f"The MuData has no {source!r} modality (mdata.mod[{src_mod['mod_key']!r}]);"
                    f" its modalities are {list(data.mod)}."
                )
            src, obs = data.mod[src_mod["mod_key"]], data.obs
        elif isinstance(data, AnnData):
            src, obs = data, data.obs
        else:
            raise TypeError(f"Pass an AnnData or a MuData, got {type(data).__name__}.")
        check_not_view(src)
        check_var_names(src, src_mod["var_names"])
        args = self.registry_["setup_args"]
        layer = args.get(f"{source}_layer")
        x = src.X if layer is None else src.layers.get(layer)
        if x is None:
            raise ValueError(
                f"The {source!r} data has no layer {layer!r}, which the model was set up with."
            )
        check_counts(src, layer, allow_empty_cells=source != self._modalities()[0]["name"])
        index = pd.Index(src.obs_names.astype(str))
        mods = {}
        for m in self._modalities():
            values = (
                sparse.csr_matrix(x, dtype=np.float32)
                if m["name"] == source
                else sparse.csr_matrix((len(index), len(m["var_names"])), dtype=np.float32)
            )
            a = AnnData(X=values, obs=pd.DataFrame(index=index), var=self._modality_var(m["name"]))
            m_layer = args.get(f"{m['name']}_layer")
            if m_layer is not None:
                a.layers[m_layer] = values
            mods[m["mod_key"]] = a
        query = mudata.MuData(mods)
        labels_key, batch_key = args.get("labels_key"), args.get("batch_key")
        needed = [batch_key, *(args.get("categorical_covariate_keys") or [])]
        needed += list(args.get("continuous_covariate_keys") or [])
        missing = [k for k in needed if k and k not in obs]
        if missing:
            raise ValueError(
                f"The cells lack the obs column(s) {missing} the model was set up with; add "
                f"them (with categories seen in training)."
            )
        for k in [k for k in needed if k]:
            query.obs[k] = obs[k].to_numpy()
        if labels_key:
            # labels condition the prior flow only: unlabelled cells get the first category
            cats = self._field_state(REGISTRY_KEYS.LABELS_KEY)["categorical_mapping"]
            query.obs[labels_key] = obs[labels_key].to_numpy() if labels_key in obs else cats[0]
        return query, obs

    def translate(
        self,
        data=None,
        source: str = "rna",
        target: str = "protein",
        n_samples: int = 1,
        indices=None,
        strategy: Literal["flow", "encoder"] = "flow",
        n_steps: int = 20,
        method: Literal["euler", "midpoint", "heun"] = "midpoint",
        cfg_scale: float = 1.0,
        seed: int | None = None,
        batch_size: int = 1024,
        key_added: str | None = None,
        progress_bar: bool = True,
    ):
        """Predict a modality that was not measured from one that was (e.g. RNA to protein).

        The cells are encoded from the ``source`` modality alone; with ``strategy="flow"``
        the translation flow then draws latents of complete cells given that encoding (so
        repeated draws show the uncertainty of the prediction), which the ``target``
        decoder turns into counts. ``strategy="encoder"`` decodes the source-only posterior
        mean instead (no flow; a baseline, and the only way from a non-RNA source).

        Parameters
        ----------
        data
            AnnData of the source modality (same features as in training), or a MuData
            holding it; ``obs`` must have the registered batch and covariate columns.
            ``None`` uses the training data.
        source, target
            Modality names (``"rna"``, ``"protein"``, ``"accessibility"``).
        n_samples
            Predictions per cell (rows ``<cell>-<k>`` when above 1).
        indices
            Cells to translate; default all.
        strategy
            ``"flow"`` or ``"encoder"``, see above.
        n_steps, method, cfg_scale
            Sampler settings of the translation flow (``cfg_scale`` weighs the source
            condition against the flow's unconditional velocity).
        seed
            Seed of this call.
        batch_size
            Cells per batch.
        key_added
            If given, return a MuData with the input's modalities plus the prediction under
            this key (needs ``n_samples=1``).
        progress_bar
            Show a progress bar.

        Returns
        -------
        anndata.AnnData
            AnnData of the predicted ``target`` modality: counts drawn from its likelihood in
            ``.X``, decoded means in ``layers['latentcell_mean']``, the source cells' ``obs``
            (plus ``source_cell``), the latents in ``obsm['X_latentcell']``; or, with
            ``key_added``, a MuData as described there. The input is not modified.
        """
        if not self.is_multimodal:
            raise RuntimeError(
                "translate needs a multi-modal model: set it up with "
                "LatentDiffusionModel.setup_mudata(...)."
            )
        if source == target:
            raise ValueError("source and target must be different modalities.")
        for name in (source, target):
            self._modality(name)  # raises on unknown names
        if strategy not in ("flow", "encoder"):
            raise ValueError(f"strategy must be 'flow' or 'encoder', got {strategy!r}.")
        primary = self._modalities()[0]["name"]
        if strategy == "flow":
            if source != primary:
                raise ValueError(
                    f"The translation flow is conditioned on {primary!r}; translate from "
                    f"{source!r} with strategy='encoder'."
                )
            self._check_stage("translation", "translate with strategy='flow'")
        else:
            self._check_stage("vae", "translate")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        if key_added is not None and n_samples != 1:
            raise ValueError("key_added adds one prediction per cell: use n_samples=1.")
        if data is None:
            if self.adata is None:
                raise ValueError("This model holds no data; pass the cells to translate.")
            data = self.adata
        query, obs = self._query_mudata(data, source)
        # the query's other modalities are empty on purpose (not measured): skip the count
        # checks of _validate_anndata, which refuse empty RNA rows (the source is checked above)
        query = super()._validate_anndata(query, copy_if_view=False)
        indices = np.arange(query.n_obs) if indices is None else np.asarray(indices)
        if len(indices) == 0:
            raise ValueError("No cells to translate.")
        z_source = self._latent_means(
            query, indices=indices, batch_size=batch_size, use_modalities=[source]
        )
        codes = self._registered_codes(query, indices=indices)
        if source != primary:
            # the primary modality was not observed: decode it at the median training library
            codes["log_library"] = np.full(
                len(indices), np.median(self.reference_["log_library"]), dtype=np.float32
            )
        rep = np.repeat(np.arange(len(indices)), n_samples)
        device = self.module.device
        rng = np.random.default_rng(seed)
        latents, counts, means = [], [], []
        n_batches = math.ceil(len(rep) / batch_size)
        with (
            tqdm(
                total=n_batches * (n_steps if strategy == "flow" else 1),
                desc="Translating",
                disable=not progress_bar,
            ) as bar,
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.inference_mode(),
        ):
            torch.manual_seed(int(rng.integers(2**62)))
            self.module.eval()
            for start in range(0, len(rep), batch_size):
                rows = rep[start : start + batch_size]
                zs = torch.as_tensor(z_source[rows], device=device)
                if strategy == "flow":
                    z = self.module.translation_flow.sample(
                        zs,
                        n_steps=n_steps,
                        method=method,
                        cfg_scale=cfg_scale,
                        callback=lambda _: bar.update(1),
                    )
                else:
                    z = zs
                    bar.update(1)
                px = self._decode(z, {k: v[rows] for k, v in codes.items()})
                c, m = self._draw({target: px[target]})[target]
                counts.append(c)
                means.append(m)
                latents.append(z.cpu().numpy())
        out = per_cell_output(
            obs.iloc[indices],
            rep,
            n_samples,
            counts,
            means,
            np.concatenate(latents),
            self._modality_var(target),
            dict(
                task="translate",
                source=source,
                target=target,
                strategy=strategy,
                n_steps=n_steps if strategy == "flow" else None,
                method=method if strategy == "flow" else None,
                cfg_scale=cfg_scale,
                seed=seed,
            ),
        )
        if key_added is None:
            return out
        import mudata

        if _is_mudata(data):
            mods = {k: v.copy() for k, v in data.mod.items()}
        else:
            mods = {self._modality(source)["mod_key"]: data.copy()}
        if key_added in mods:
            raise ValueError(f"key_added={key_added!r} is already a modality of the input.")
        if len(indices) != len(obs):
            raise ValueError("key_added needs every cell translated (indices=None).")
        mods[key_added] = out
        with warnings.catch_warnings():
            # the prediction shares its var_names with the measured modality, by design
            warnings.filterwarnings("ignore", message="Cannot join columns", category=UserWarning)
            result = mudata.MuData(mods)
        for col in obs.columns:
            if not col.startswith("_scvi"):
                result.obs[col] = obs[col].to_numpy()
        return result
