"""LatentDiffusionModel: a count VAE with a conditional rectified-flow prior on its latent."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import anndata
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
    ObsmField,
)
from scvi.dataloaders import DataSplitter
from scvi.model._utils import get_max_epochs_heuristic
from scvi.model.base import BaseModelClass
from scvi.module import VAE
from scvi.train import TrainingPlan, TrainRunner
from tqdm.auto import tqdm

from latentcell._constants import (
    CONT_CONDITIONS_FIELD,
    DOSE_FIELD,
    FLOW_KEYS,
    LATENT_KEY,
    MEAN_LAYER,
    PERTURBATION_FIELD,
    SPATIAL_FIELD,
)
from latentcell._memory import release_memory
from latentcell.model import _io
from latentcell.model._batch import BatchCorrectionMixin
from latentcell.model._data import CountsDataModule, LatentDataModule
from latentcell.model._multimodal import MultiModalMixin, _is_mudata
from latentcell.model._perturbation import PerturbationMixin
from latentcell.model._programs import ProgramMixin, check_programs, requested_levels
from latentcell.model._spatial import SpatialMixin
from latentcell.model._stream import H5adWriter
from latentcell.model._training import FlowStageOptions, FlowTrainingPlan, quiet_litlogger_tip
from latentcell.model._validation import (
    check_counts,
    check_not_view,
    check_obs_columns,
    check_perturbation,
    check_registered_obs,
    check_spatial,
    check_var_names,
    detach_copied_registration,
    row_sums,
)
from latentcell.module import (
    DIFFUSION_METHODS,
    OBJECTIVES,
    SAMPLER_METHODS,
    JointModule,
    LatentFlow,
    MultiModalVAE,
    PerturbationFlow,
    TranslationFlow,
)
from latentcell.module._counts import sample_counts

logger = logging.getLogger(__name__)

_CAT_COVS = REGISTRY_KEYS.CAT_COVS_KEY
_CONT_COVS = REGISTRY_KEYS.CONT_COVS_KEY
_LARGE = 100_000
_STAGES = ("vae", "flow", "joint", "perturbation", "translation")
#: Default VAE length of MuData models: at least this many optimisation steps (small
#: CITE-seq data: protein reconstruction still improves after 4000 steps while RNA's validation
#: likelihood is best after ~500; benchmarks/translation_citeseq.py) ...
MULTIMODAL_MIN_STEPS = 4000
#: ... and at most this many epochs.
MULTIMODAL_MAX_EPOCHS = 2000


def default_vae_epochs(n_obs: int, n_train: int, batch_size: int, multimodal: bool) -> int:
    """Default maximum epochs of the VAE stage.

    scvi-tools' heuristic (``min(400, 400 * 20000 / n_obs)``); for a MuData model at least
    :data:`MULTIMODAL_MIN_STEPS` optimisation steps over its ``n_train`` training cells,
    capped at :data:`MULTIMODAL_MAX_EPOCHS` epochs.
    """
    max_epochs = get_max_epochs_heuristic(n_obs)
    if multimodal:
        steps_per_epoch = max(1, math.ceil(n_train / batch_size))
        max_epochs = min(
            MULTIMODAL_MAX_EPOCHS,
            max(max_epochs, math.ceil(MULTIMODAL_MIN_STEPS / steps_per_epoch)),
        )
    return int(max_epochs)


class LatentDiffusionModule(torch.nn.Module):
    """Container of the stages: a VAE, a latent flow, perturbation and translation flows."""

    def __init__(
        self,
        vae: VAE | MultiModalVAE,
        flow: LatentFlow,
        perturbation_flow: PerturbationFlow | None = None,
        translation_flow: TranslationFlow | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.flow = flow
        self.perturbation_flow = perturbation_flow
        self.translation_flow = translation_flow

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device


class LatentDiffusionModel(
    PerturbationMixin,
    MultiModalMixin,
    SpatialMixin,
    BatchCorrectionMixin,
    ProgramMixin,
    BaseModelClass,
):
    """Latent diffusion for single-cell counts.

    Stage 1 is a count variational autoencoder (scvi-tools' ``VAE``: negative binomial,
    zero-inflated negative binomial or Poisson likelihood, batch and covariates injected
    into the decoder; or, for a MuData set up with :meth:`setup_mudata`, a joint VAE of RNA
    and protein/accessibility, :class:`latentcell.module.MultiModalVAE`). Stage 2 freezes
    it and trains a rectified flow on the encoder's latent means, conditioned on the
    registered labels, batch and covariates with classifier-free guidance. Sampling
    integrates the flow from noise, decodes the latents and draws counts from the
    likelihood. MuData models add a translation flow (:meth:`translate`).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (or MuData registered with
        :meth:`setup_mudata`). May be ``None`` when ``registry``
        is given (used by :meth:`load` for a model saved without its data).
    registry
        A saved scvi-tools registry, instead of ``adata``.
    n_latent
        Latent dimension.
    n_hidden
        Width of the VAE's hidden layers.
    n_layers
        Hidden layers in the VAE encoder and decoder.
    dropout_rate
        Dropout in the VAE.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dispersion
        Negative binomial dispersion: ``"gene"``, ``"gene-batch"`` or ``"gene-label"``.
    denoiser
        ``"mlp"`` (residual MLP with adaLN-Zero conditioning) or ``"dit"`` (transformer over
        latent tokens with the same conditioning). The MLP is the default because on pbmc3k
        (see ``benchmarks/generation_pbmc3k.py``) it matched or beat the DiT in every run and
        trains 2-5x faster on CPU.
    flow_n_hidden
        Width of the denoiser. ``None`` picks 128 below 100k cells and 256 above.
    flow_n_layers
        Depth of the denoiser. ``None`` picks 4 below 100k cells and 6 above.
    flow_n_heads
        Attention heads of the DiT.
    token_dim
        Latent coordinates per DiT token.
    p_uncond
        Probability that all conditions of a training cell are replaced by null tokens.
    p_drop_attr
        Probability that each condition is replaced by its null token independently.
    objective
        ``"flow"`` (rectified flow, sampled with an ODE solver) or ``"ddpm"`` (noise
        prediction with a cosine schedule, sampled with DDIM), same denoiser. Rectified flow
        is the default: see ``benchmarks/generation_pbmc3k.py`` for the comparison per
        number of steps.
    perturbation_residual
        Parameterise the perturbation flow as a learned correction to a linear latent shift
        (see :class:`latentcell.module.PerturbationFlow`); the linear part extends to unseen
        combinations and, with ``perturbation_embeddings``, unseen perturbations. ``False``
        gives the plain flow, behind the residual one on every perturbation benchmark in the
        README (mean-expression R²).
    protein_likelihood
        MuData models: likelihood of protein counts, ``"nb"`` (negative binomial) or
        ``"nb_mixture"`` (background/foreground mixture, as in totalVI); see the CITE-seq
        benchmark for the comparison behind the default.
    modality_dropout
        MuData models: fraction of training cells whose encoder sees one of their modalities
        hidden, so that cells measured in one modality encode well (translation).
    spatial_neighbors
        Spatial models (``setup_anndata(spatial_key=...)``): observed neighbours whose mean
        latent (and mean distance) summarise a position's neighbourhood for the flow;
        0 conditions on the position only.
    spatial_holes
        Spatial models: fraction of training cells that also enter the flow's training data
        with their neighbourhood seen from the edge of a random simulated hole, as it is
        seen inside a region to impute (:meth:`impute_region`).
    **vae_kwargs
        Further keyword arguments of :class:`scvi.module.VAE`. MuData models take
        ``use_batch_norm`` and ``use_layer_norm`` (``"encoder"``, ``"decoder"``, ``"both"``,
        ``"none"``; default batch norm in both, as scVI) and no others.

    Examples
    --------
    >>> adata = latentcell.datasets.pbmc68k_counts()
    >>> LatentDiffusionModel.setup_anndata(adata, layer="counts", labels_key="cell_type")
    >>> model = LatentDiffusionModel(adata)
    >>> model.train()
    >>> generated = model.sample(n_samples=100, conditions={"cell_type": "CD14+ Monocyte"})
    """

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb",
        dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene",
        denoiser: Literal["dit", "mlp"] = "mlp",
        flow_n_hidden: int | None = None,
        flow_n_layers: int | None = None,
        flow_n_heads: int = 4,
        token_dim: int = 4,
        p_uncond: float = 0.1,
        p_drop_attr: float = 0.1,
        objective: Literal["flow", "ddpm"] = "flow",
        perturbation_residual: bool = True,
        protein_likelihood: Literal["nb", "nb_mixture"] = "nb",
        modality_dropout: float = 0.3,
        spatial_neighbors: int = 10,
        spatial_holes: float = 0.25,
        **vae_kwargs,
    ):
        if gene_likelihood not in ("nb", "zinb", "poisson"):
            raise ValueError(
                f"gene_likelihood must be 'nb', 'zinb' or 'poisson', got {gene_likelihood!r}."
            )
        if denoiser not in ("dit", "mlp"):
            raise ValueError(f"denoiser must be 'dit' or 'mlp', got {denoiser!r}.")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        if spatial_neighbors < 0 or not 0 <= spatial_holes < 1:
            raise ValueError(
                f"spatial_neighbors must be >= 0 and spatial_holes in [0, 1); got "
                f"{spatial_neighbors} and {spatial_holes}."
            )
        super().__init__(adata, registry=registry)
        self._spatial_neighbors, self._spatial_holes = int(spatial_neighbors), float(spatial_holes)
        spatial = self._spatial_state()
        n_cells = int(self.summary_stats.n_cells)
        large = n_cells >= _LARGE
        flow_n_hidden = flow_n_hidden or (256 if large else 128)
        flow_n_layers = flow_n_layers or (6 if large else 4)

        cat_state = self._field_state(_CAT_COVS)
        n_cats_per_cov = list(cat_state.get("n_cats_per_key", [])) if cat_state else []
        n_cont = (
            len(self._field_state(_CONT_COVS).get("columns", [])) if self._has(_CONT_COVS) else 0
        )
        multimodal = self.is_multimodal
        if multimodal:
            if protein_likelihood not in ("nb", "nb_mixture"):
                raise ValueError(
                    f"protein_likelihood must be 'nb' or 'nb_mixture', got {protein_likelihood!r}."
                )
            other = sorted(set(vae_kwargs) - {"use_batch_norm", "use_layer_norm"})
            if gene_likelihood != "nb" or dispersion != "gene" or other:
                raise ValueError(
                    "MuData models use gene_likelihood='nb' and dispersion='gene' and take, of "
                    "scvi VAE keyword arguments, only use_batch_norm and use_layer_norm (got "
                    f"{gene_likelihood!r}, {dispersion!r}, {other})."
                )
            vae = MultiModalVAE(
                self._multimodal_specs(protein_likelihood),
                n_batch=int(self.summary_stats.n_batch),
                n_latent=n_latent,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                n_continuous_cov=n_cont,
                n_cats_per_cov=n_cats_per_cov,
                modality_dropout=modality_dropout,
                **vae_kwargs,
            )
        else:
            vae = VAE(
                n_input=int(self.summary_stats.n_vars),
                n_batch=int(self.summary_stats.n_batch),
                n_labels=int(self.summary_stats.n_labels),
                n_hidden=n_hidden,
                n_latent=n_latent,
                n_layers=n_layers,
                n_continuous_cov=n_cont,
                n_cats_per_cov=n_cats_per_cov,
                dropout_rate=dropout_rate,
                dispersion=dispersion,
                gene_likelihood=gene_likelihood,
                **vae_kwargs,
            )
        attrs = self._condition_attributes()
        self._flow_kwargs = dict(
            n_latent=n_latent,
            n_cats_per_attr=[len(a["categories"]) for a in attrs["categorical"]],
            n_continuous=len(attrs["continuous"]),
            denoiser=denoiser,
            n_hidden=flow_n_hidden,
            n_layers=flow_n_layers,
            n_heads=flow_n_heads,
            token_dim=token_dim,
            p_uncond=p_uncond,
            p_drop_attr=p_drop_attr,
            objective=objective,
            n_spatial=spatial["n_dims"] if spatial else 0,
            n_context=n_latent + 1 if spatial and spatial_neighbors else 0,
            n_programs=len(self.registry_["setup_args"].get("gene_programs") or {}),
        )
        pert = self._perturbation_state()
        self._perturbation_kwargs = (
            dict(
                n_latent=n_latent,
                n_condition=pert["matrix"].shape[1] + (pert["dose_key"] is not None),
                n_hidden=flow_n_hidden,
                n_layers=flow_n_layers,
                residual=perturbation_residual,
            )
            if pert
            else None
        )
        self._translation_kwargs = (
            dict(n_latent=n_latent, n_hidden=flow_n_hidden, n_layers=flow_n_layers)
            if multimodal
            else None
        )
        self.module = LatentDiffusionModule(
            vae,
            LatentFlow(**self._flow_kwargs),
            PerturbationFlow(**self._perturbation_kwargs) if pert else None,
            TranslationFlow(**self._translation_kwargs) if multimodal else None,
        )
        self.trained_stages_: list[str] = []
        self.stage_history_: dict[str, dict] = {}
        self.reference_: dict[str, np.ndarray] = {}
        self.perturbation_summary_: dict = {}
        self.var_names_ = self._registry_var_names()
        self.program_stats_: dict = {}  # filled on first use (ProgramMixin._program_state)
        modality_text = (
            f"modalities={[m['name'] for m in self._modalities()]} "
            f"(protein_likelihood={protein_likelihood}), "
            if multimodal
            else ""
        )
        self._model_summary_string = (
            f"LatentDiffusionModel: {modality_text}n_latent={n_latent}, "
            f"gene_likelihood={gene_likelihood}, "
            f"{objective} prior, denoiser={denoiser} (hidden {flow_n_hidden}, "
            f"{flow_n_layers} layers), "
            f"conditions={[a['name'] for a in attrs['categorical']] + attrs['continuous']}"
            + (f", spatial={spatial['key']!r} ({spatial_neighbors} neighbours)" if spatial else "")
            + (
                f", gene programs={list(self.registry_['setup_args']['gene_programs'])}"
                if self.registry_["setup_args"].get("gene_programs")
                else ""
            )
        )
        self.init_params_ = self._get_init_params(locals())

    def __repr__(self) -> str:
        stages = ", ".join(self.trained_stages_) if self.trained_stages_ else "none"
        n_cells = "no AnnData" if self.adata is None else f"{self.adata.n_obs} cells"
        return f"{self._model_summary_string}\nTrained stages: {stages}; {n_cells}."

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        continuous_condition_keys: list[str] | None = None,
        perturbation_key: str | None = None,
        control_value: str = "ctrl",
        perturbation_separator: str = "+",
        dose_key: str | None = None,
        perturbation_embeddings: pd.DataFrame | str | None = None,
        spatial_key: str | None = None,
        gene_programs: Mapping[str, list[str]] | str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData with the model.

        The data are checked before anything is written: the counts must be finite,
        non-negative integers, every cell must have at least one count, and registered
        ``obs`` columns must exist without missing values. On success scvi-tools'
        :class:`~scvi.data.AnnDataManager` writes its usual fields (``obs['_scvi_batch']``,
        ``obs['_scvi_labels']``, ``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']`` and,
        with covariates, ``obsm['_scvi_extra_categorical_covs']`` /
        ``obsm['_scvi_extra_continuous_covs']``); nothing else is changed. A copy of
        registered data (``adata.copy()``) gets an ``uns['_scvi_uuid']`` of its own, so
        registering it leaves the original's registration, and models on the original, as
        they were.

        Parameters
        ----------
        adata
            AnnData with raw counts (not a view).
        layer
            Layer holding the counts; ``None`` uses ``adata.X``.
        labels_key
            ``obs`` column of cell labels (e.g. cell type), a condition of the flow.
        batch_key
            ``obs`` column of batches: a decoder covariate and a condition of the flow.
        categorical_covariate_keys
            Further categorical ``obs`` columns, used like ``batch_key``.
        continuous_covariate_keys
            Continuous ``obs`` columns: decoder covariates and flow conditions.
        continuous_condition_keys
            Continuous ``obs`` columns that condition the flow only (embedded, not nuisance
            covariates: the VAE never sees them, so the latent keeps what they explain), e.g.
            pseudotime, developmental time or dose. :meth:`sample` and :meth:`sample_path`
            take any value, between or beyond those seen.
        perturbation_key
            ``obs`` column naming the perturbation of each cell (``control_value`` for
            controls; combinations joined with ``perturbation_separator``, e.g. ``"A+B"``).
            Enables :meth:`predict_perturbation`. It is not given to the VAE, so the latent
            space carries the response.
        control_value
            Label of control cells in ``perturbation_key``.
        perturbation_separator
            Separator of the components of combined perturbations.
        dose_key
            Optional numeric ``obs`` column with the dose of each perturbation.
        perturbation_embeddings
            Optional vectors of single perturbations (e.g. gene or drug embeddings): a
            DataFrame with one row per perturbation name, or the key of one in ``adata.uns``.
            A combination is the sum of its components' vectors. With embeddings, perturbations
            never seen in training can be predicted; without, each single perturbation seen
            in training gets its own one-hot direction.
        spatial_key
            Optional ``obsm`` key of the cells' coordinates (2 or 3 columns, e.g.
            ``"spatial"`` as squidpy writes it). The flow is then conditioned on the position
            (multi-scale Fourier features) and on a summary of the observed neighbourhood
            (see ``spatial_neighbors``), so :meth:`sample` takes
            ``conditions={"spatial": coords}`` and :meth:`impute_region` fills unmeasured
            regions. Neighbourhoods never cross batches: register one batch per section.
        gene_programs
            Optional gene sets whose activity conditions the flow: a dict
            ``{name: [genes]}`` or the key of a binary genes x programs matrix in
            ``adata.varm`` (a DataFrame's columns name the programs). Each cell's activity is
            the mean z-score of the set's log1p(CP10k) expression (see
            :meth:`get_program_scores`); the denoiser reads one token per program through
            cross-attention, so :meth:`sample` takes
            ``conditions={"programs": {"interferon": "high"}}``. Genes not in ``var_names``
            are left out with a warning.
        """
        if spatial_key is not None and gene_programs is not None:
            raise ValueError(
                "gene_programs and spatial_key cannot be combined yet; register one of them."
            )
        gene_programs = check_programs(adata, gene_programs)
        if perturbation_key is not None:
            perturbation_embeddings = check_perturbation(
                adata,
                perturbation_key,
                control_value,
                perturbation_separator,
                dose_key,
                perturbation_embeddings,
            )
        elif dose_key is not None or perturbation_embeddings is not None:
            raise ValueError("dose_key and perturbation_embeddings need a perturbation_key.")
        setup_method_args = cls._get_setup_method_args(**locals())
        check_not_view(adata)
        check_counts(adata, layer)
        if spatial_key is not None:
            check_spatial(adata, spatial_key)
        categorical = [k for k in [labels_key, batch_key, *(categorical_covariate_keys or [])] if k]
        both = set(continuous_covariate_keys or []) & set(continuous_condition_keys or [])
        if both:
            raise ValueError(
                f"{sorted(both)} given as both continuous covariate and continuous condition; "
                f"pick one (a condition is seen by the flow only)."
            )
        check_obs_columns(
            adata,
            categorical,
            list(continuous_covariate_keys or []) + list(continuous_condition_keys or []),
        )
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalJointObsField(_CAT_COVS, categorical_covariate_keys),
            NumericalJointObsField(_CONT_COVS, continuous_covariate_keys),
            NumericalJointObsField(CONT_CONDITIONS_FIELD, continuous_condition_keys),
        ]
        if spatial_key is not None:
            anndata_fields.append(ObsmField(SPATIAL_FIELD, spatial_key))
        if perturbation_key is not None:
            anndata_fields.append(CategoricalObsField(PERTURBATION_FIELD, perturbation_key))
        if dose_key is not None:
            anndata_fields.append(NumericalObsField(DOSE_FIELD, dose_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        detach_copied_registration(cls._setup_adata_manager_store, adata)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ registry helpers
    def _has(self, key: str) -> bool:
        return key in self.registry_["field_registries"] and bool(
            self.registry_["field_registries"][key].get("state_registry")
        )

    def _field_state(self, key: str) -> dict:
        return self.registry_["field_registries"].get(key, {}).get("state_registry", {}) or {}

    def _registry_var_names(self) -> np.ndarray:
        return np.asarray(self._field_state(REGISTRY_KEYS.X_KEY)["column_names"]).astype(str)

    def _condition_attributes(self) -> dict:
        """Conditions of the flow, in the order the module sees them.

        Categorical: the labels (if ``labels_key`` was set), the batch (if ``batch_key`` was
        set), then each categorical covariate. Continuous: each continuous covariate, then
        each continuous condition (``n_cont_covs`` says where the conditions start).
        """
        args = self.registry_["setup_args"]
        categorical = []
        for key, reg_key in (
            (args.get("labels_key"), REGISTRY_KEYS.LABELS_KEY),
            (args.get("batch_key"), REGISTRY_KEYS.BATCH_KEY),
        ):
            if key is not None:
                cats = np.asarray(self._field_state(reg_key)["categorical_mapping"])
                categorical.append({"name": key, "source": reg_key, "categories": cats})
        cat_state = self._field_state(_CAT_COVS)
        for i, key in enumerate(cat_state.get("field_keys", []) or []):
            cats = np.asarray(cat_state["mappings"][key])
            categorical.append({"name": key, "source": _CAT_COVS, "column": i, "categories": cats})
        covariates = list(args.get("continuous_covariate_keys") or [])
        conditions = list(args.get("continuous_condition_keys") or [])
        return {
            "categorical": categorical,
            "continuous": covariates + conditions,
            "n_cont_covs": len(covariates),
        }

    def _registered_codes(
        self,
        adata: AnnData,
        programs: bool = True,
        latents: np.ndarray | None = None,
        indices: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Integer codes and values of the registered covariates of every cell.

        ``indices`` restricts the result to those cells of ``adata`` (in that order).
        ``programs=False`` leaves out the gene-program activities (which take an encoder
        pass once the VAE is trained) for callers that only decode; callers that hold the
        cells' posterior-mean ``latents`` (one row per returned cell) pass them to spare
        that pass.
        """
        manager = self.get_anndata_manager(adata, required=True)
        n = adata.n_obs

        def get(key, dtype):
            if key not in manager.data_registry:
                return np.zeros((n, 0), dtype=dtype)
            values = manager.get_from_registry(key)
            values = values.to_numpy() if isinstance(values, pd.DataFrame) else values
            return np.asarray(values, dtype=dtype).reshape(n, -1)

        counts = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        library = row_sums(counts, n)
        codes = {
            "labels": get(REGISTRY_KEYS.LABELS_KEY, np.int64)[:, 0],
            "batch": get(REGISTRY_KEYS.BATCH_KEY, np.int64)[:, 0],
            "cat_covs": get(_CAT_COVS, np.int64),
            "cont_covs": get(_CONT_COVS, np.float32),
            "cont_conds": get(CONT_CONDITIONS_FIELD, np.float32),
            "spatial": get(SPATIAL_FIELD, np.float32),
            "log_library": np.log(np.maximum(library, 1e-12)).astype(np.float32),
        }
        if indices is not None:
            indices = np.asarray(indices)
            codes = {k: v[indices] for k, v in codes.items()}
        if programs:
            codes["programs"] = self._program_codes(adata, counts, codes, latents, indices)
        return codes

    def _flow_codes(self, codes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stack the per-cell codes into the flow's (categorical, continuous) condition arrays."""
        columns = []
        for attr in self._condition_attributes()["categorical"]:
            if attr["source"] == REGISTRY_KEYS.LABELS_KEY:
                columns.append(codes["labels"])
            elif attr["source"] == REGISTRY_KEYS.BATCH_KEY:
                columns.append(codes["batch"])
            else:
                columns.append(codes["cat_covs"][:, attr["column"]])
        n = len(codes["labels"])
        cat = np.stack(columns, axis=1) if columns else np.zeros((n, 0), dtype=np.int64)
        cont = codes["cont_covs"]
        for key in ("cont_conds", "spatial", "programs"):
            if key in codes and codes[key].shape[1]:
                cont = np.concatenate([cont, codes[key]], axis=1)
        return cat.astype(np.int64), cont.astype(np.float32)

    # ------------------------------------------------------------------ checks
    def _check_stage(self, stage: Literal["vae", "flow", "perturbation"], action: str) -> None:
        if stage not in self.trained_stages_:
            needed = "model.train()" + ("" if stage == "vae" else f" (or train(stage={stage!r}))")
            raise RuntimeError(
                f"Cannot {action}: the {stage.upper()} stage of this model has not been trained. "
                f"Call {needed} first."
            )

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = False):
        """Check genes and registration of a query AnnData (never copies it silently)."""
        if adata is None:
            if self.adata is None:
                raise ValueError(
                    "This model holds no AnnData (it was loaded without one); pass adata=..."
                )
            adata = self.adata
        check_not_view(adata)
        if _is_mudata(adata):
            if not self.is_multimodal:
                raise TypeError("This model was set up with an AnnData; pass an AnnData.")
            args = self.registry_["setup_args"]
            for m in self._modalities():
                if m["mod_key"] not in adata.mod:
                    raise ValueError(
                        f"The MuData lacks the {m['name']!r} modality "
                        f"(mdata.mod[{m['mod_key']!r}])."
                    )
                mod = adata.mod[m["mod_key"]]
                check_var_names(mod, m["var_names"])
                if self.get_anndata_manager(adata) is None:
                    check_counts(
                        mod, args.get(f"{m['name']}_layer"), allow_empty_cells=m["name"] != "rna"
                    )
            return super()._validate_anndata(adata, copy_if_view=False)
        if self.is_multimodal:
            raise TypeError(
                "This model was set up with a MuData (setup_mudata); pass a MuData, or use "
                "translate() for cells measured in one modality."
            )
        check_var_names(adata, self.var_names_)
        if self.get_anndata_manager(adata) is None:
            layer = self.registry_["setup_args"].get("layer")
            check_counts(adata, layer)
            self._check_query_columns(adata)
        return super()._validate_anndata(adata, copy_if_view=False)

    # ------------------------------------------------------------------ training
    def train(
        self,
        stage: Literal["vae", "flow", "joint", "perturbation", "translation"] | None = None,
        max_epochs: int | None = None,
        flow_max_epochs: int | None = None,
        perturbation_max_epochs: int | None = None,
        perturbation_validation: Literal["cells", "labels"] = "cells",
        joint_max_epochs: int = 30,
        joint_flow_weight: float = 1.0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        flow_batch_size: int | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int | None = None,
        n_epochs_kl_warmup: int | None = None,
        lr: float = 1e-3,
        flow_lr: float = 1e-3,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        flow_plan_kwargs: dict | None = None,
        seed: int | None = None,
        load_in_memory: bool | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the VAE, the latent flow, then the perturbation or translation flow (or one stage).

        Each stage stops on its own held-out validation loss by default (the ELBO for the
        VAE, a flow-matching loss with fixed noise and times for the flow), because small
        datasets are the common case and fixed epoch counts overfit them.

        Parameters
        ----------
        stage
            ``"vae"``, ``"flow"`` or ``"perturbation"`` to run one stage; ``None`` runs them
            all (the perturbation flow only when a ``perturbation_key`` was registered,
            the translation flow only for MuData models; ``"translation"`` trains
            :class:`latentcell.module.TranslationFlow` for :meth:`translate`, with the
            flow's settings: ``flow_max_epochs``, ``flow_batch_size``, ``flow_lr``).
            Retraining the VAE invalidates the flows, which must then be retrained.
            ``"joint"`` is an optional extra stage after the flow: the VAE and the flow
            fine-tuned together on ELBO + ``joint_flow_weight`` x flow loss
            (:class:`latentcell.module.JointModule`); it is not run by default (see the
            pbmc3k benchmark for why) and invalidates a trained perturbation flow.
        max_epochs
            Maximum VAE epochs; default ``min(400, 400 * 20000 / n_cells)`` (scvi-tools'
            heuristic). For MuData models, at least enough epochs for 4000 optimisation
            steps (at most 2000 epochs): the likelihoods of the smaller modalities (protein)
            converge far more slowly than RNA's on small datasets.
        flow_max_epochs
            Maximum flow epochs; default about ``max(4000, n_cells / 50)`` optimisation steps,
            between 5 and 1000 epochs.
        joint_max_epochs, joint_flow_weight
            Epochs (early stopping on the validation loss) and flow-loss weight of the
            ``"joint"`` stage, which uses ``lr / 10``.
        perturbation_max_epochs
            Maximum epochs of the perturbation flow; default about ``max(3000, n_cells / 50)``
            optimisation steps. It shares ``flow_batch_size`` (default 256 pairs),
            ``flow_lr`` and ``flow_plan_kwargs`` with the latent flow.
        perturbation_validation
            How the perturbation flow's number of epochs is chosen. ``"cells"`` stops on the
            flow-matching loss of the validation cells (the VAE's split), whose labels are
            all seen perturbed in training. ``"labels"`` measures transfer instead: the
            perturbed training cells of about a fifth of the labels (``labels_key``; at
            least one) are held out, the flow is trained on the rest with early stopping
            on their flow-matching loss, and then refit on all training cells for as many
            optimisation steps as that loss needed to reach its minimum. Use it to predict
            labels never seen perturbed (e.g. a held-out cell type); the curve is in
            ``history["perturbation_selection_loss_validation"]`` and the choice in
            ``perturbation_summary_["epoch_selection"]``. It costs one more (short) fit.
            Kang 2018, held-out cell types, residual flow, seeds 5-6: mean top-100-DE R²
            0.791 against 0.800 and energy distance 4.44 against 5.36 for ``"cells"``.
        accelerator, devices
            Passed to Lightning.
        train_size, validation_size
            Split of cells for the VAE's early stopping; the flow uses the same split.
        batch_size, flow_batch_size
            Minibatch sizes of the two stages; ``flow_batch_size=None`` picks 128 below 100k
            cells and 1024 above.
        early_stopping
            Stop each stage when its validation loss has not improved for
            ``early_stopping_patience`` epochs.
        early_stopping_patience
            Default 45 epochs for the VAE and ``max(50, flow_max_epochs // 5)`` for the flow,
            which also never stops in its first ~1500 optimisation steps. The VAE of a MuData
            model stops on the validation likelihood of its modalities other than RNA
            (``nll_secondary_validation``: RNA's overfits first) with a patience of
            ``max(45, max_epochs // 4)``.
        n_epochs_kl_warmup
            Epochs of linear KL warm-up of the VAE; default ``min(50, max_epochs // 4)``.
        lr, flow_lr
            Learning rates of the two stages.
        datasplitter_kwargs
            Keyword arguments of :class:`scvi.dataloaders.DataSplitter`.
        plan_kwargs, flow_plan_kwargs
            Keyword arguments of the stages' training plans.
        seed
            Seed for scvi-tools (``scvi.settings.seed``) before training; ``None`` leaves the
            global seed as it is. Initial weights are drawn when the model is built: set
            ``scvi.settings.seed`` before ``LatentDiffusionModel(...)`` for runs that are
            identical end to end.
        load_in_memory
            VAE stage only: read the registered counts into memory once and serve minibatches
            by indexing (:class:`latentcell.model.CountsDataModule`), instead of scvi-tools'
            ``AnnDataLoader`` (which reads the AnnData per minibatch and also works for
            backed AnnData). ``None`` uses memory unless the AnnData is backed. The split of
            cells is scvi-tools' ``DataSplitter`` either way.
        **trainer_kwargs
            Further keyword arguments of :class:`scvi.train.Trainer` (Lightning).
        """
        if stage not in (None, *_STAGES):
            raise ValueError(f"stage must be None or one of {_STAGES}, got {stage!r}.")
        if self.adata is None:
            raise ValueError("This model holds no AnnData; load it with adata=... to train.")
        if seed is not None:
            settings.seed = seed
        if stage == "perturbation" or (stage is None and self._perturbation_state()):
            self._check_perturbation_data(perturbation_validation)

        def flow_options(max_epochs: int | None) -> FlowStageOptions:
            # fresh dicts per stage: the stages set their own defaults in them
            return FlowStageOptions(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=train_size,
                validation_size=validation_size,
                batch_size=flow_batch_size,
                early_stopping=early_stopping,
                patience=early_stopping_patience,
                lr=flow_lr,
                plan_kwargs=dict(flow_plan_kwargs or {}),
                trainer_kwargs=dict(trainer_kwargs),
            )

        if stage == "joint" and self.is_multimodal:
            raise ValueError("The 'joint' stage is not available for MuData models yet.")
        if stage == "translation" and not self.is_multimodal:
            raise ValueError(
                "The 'translation' stage needs a MuData model (LatentDiffusionModel.setup_mudata)."
            )
        if stage in (None, "vae"):
            self._train_vae(
                max_epochs,
                accelerator,
                devices,
                train_size,
                validation_size,
                batch_size,
                early_stopping,
                early_stopping_patience,
                n_epochs_kl_warmup,
                lr,
                datasplitter_kwargs or {},
                plan_kwargs or {},
                dict(trainer_kwargs),
                load_in_memory,
            )
        if stage in (None, "flow"):
            self._train_flow(flow_options(flow_max_epochs))
        if stage == "joint":
            self._train_joint(
                joint_max_epochs,
                joint_flow_weight,
                accelerator,
                devices,
                batch_size,
                early_stopping,
                lr / 10,
                dict(trainer_kwargs),
            )
        if stage == "perturbation" or (stage is None and self._perturbation_state()):
            self._train_perturbation(flow_options(perturbation_max_epochs), perturbation_validation)

        if stage == "translation" or (stage is None and self.is_multimodal):
            self._train_translation(flow_options(flow_max_epochs))

    def _run(self, stage: str, plan, data, max_epochs: int, accelerator, devices, **kwargs):
        """Run scvi-tools' TrainRunner for one stage and keep that stage's history apart."""
        self._apply_compile()
        self.history_, self.is_trained_ = None, False
        with quiet_litlogger_tip():  # Lightning's tip, logged by every Trainer built here
            runner = TrainRunner(
                self,
                training_plan=plan,
                data_splitter=data,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                **kwargs,
            )
            runner()
        release_memory()
        self.stage_history_[stage] = dict(self.history_ or {})
        self.history_ = self._merged_history()
        self.is_trained_ = True
        self.module.eval()

    def _train_vae(
        self,
        max_epochs,
        accelerator,
        devices,
        train_size,
        validation_size,
        batch_size,
        early_stopping,
        patience,
        n_epochs_kl_warmup,
        lr,
        splitter_kwargs,
        plan_kwargs,
        trainer_kwargs,
        load_in_memory,
    ) -> None:
        n_obs = self.adata.n_obs
        splitter = DataSplitter(
            self.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            **splitter_kwargs,
        )
        splitter.setup()
        if max_epochs is None:
            max_epochs = default_vae_epochs(
                n_obs, splitter.n_train, batch_size, multimodal=self.is_multimodal
            )
        if n_epochs_kl_warmup is None:
            n_epochs_kl_warmup = max(1, min(50, max_epochs // 4))
        if early_stopping and splitter.n_val == 0:
            raise ValueError(
                "Early stopping needs validation cells, but the split left none "
                f"(n_obs={n_obs}, train_size={train_size}). Lower train_size or pass "
                "early_stopping=False."
            )
        plan = TrainingPlan(
            self.module.vae, lr=lr, n_epochs_kl_warmup=n_epochs_kl_warmup, **plan_kwargs
        )
        if early_stopping:
            # a MuData model's validation ELBO is RNA's, which overfits long before the other
            # modalities have converged: stop on theirs
            monitor, default_patience = (
                ("nll_secondary_validation", max(45, max_epochs // 4))
                if self.is_multimodal
                else ("elbo_validation", 45)
            )
            trainer_kwargs.setdefault("early_stopping", True)
            trainer_kwargs.setdefault("early_stopping_monitor", monitor)
            trainer_kwargs.setdefault("early_stopping_patience", patience or default_patience)
        # A previous train() leaves the module in eval mode (scvi-tools' runner ends with
        # module.eval()); put the VAE back in train mode for this stage.
        self.module.vae.train()
        for p in self.module.vae.parameters():
            p.requires_grad_(True)
        if len(self.trained_stages_) > 1:
            # the old flows were fit to the old latent space: start them afresh
            device = self.module.device
            self.module.flow = LatentFlow(**self._flow_kwargs).to(device)
            if self._perturbation_kwargs:
                self.module.perturbation_flow = PerturbationFlow(**self._perturbation_kwargs).to(
                    device
                )
            if self._translation_kwargs:
                self.module.translation_flow = TranslationFlow(**self._translation_kwargs).to(
                    device
                )
        self.trained_stages_ = []
        self.stage_history_ = {}
        self.program_stats_ = {}  # program levels belong to a VAE: recomputed for the new one
        if load_in_memory is None:
            load_in_memory = not getattr(self.adata, "isbacked", False)
        data = splitter
        if load_in_memory:
            data = CountsDataModule(
                self.adata_manager, splitter.train_idx, splitter.val_idx, batch_size=batch_size
            )
        self._run("vae", plan, data, max_epochs, accelerator, devices, **trainer_kwargs)
        # library sizes and covariates of the training cells, drawn from when sampling
        self.reference_ = {k: np.asarray(v) for k, v in self._registered_codes(self.adata).items()}
        self.perturbation_summary_ = self._summarize_perturbations()
        self.trained_stages_ = ["vae"]

    @torch.inference_mode()
    def _latent_means(
        self,
        adata: AnnData,
        indices=None,
        batch_size: int | None = None,
        use_modalities=None,
        return_scale: bool = False,
    ):
        """Posterior means of the cells' latents (and their standard deviations)."""
        vae = self.module.vae
        vae.eval()
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        extra = {} if use_modalities is None else {"use_modalities": list(use_modalities)}
        means, scales = [], []
        for tensors in loader:
            inference_inputs = vae._get_inference_input(tensors)
            outputs = vae.inference(**inference_inputs, **extra)
            means.append(outputs["qz"].loc.cpu())
            if return_scale:
                scales.append(outputs["qz"].scale.cpu())
            release_memory()
        loc = torch.cat(means).numpy()
        return (loc, torch.cat(scales).numpy()) if return_scale else loc

    def _train_flow(self, opts: FlowStageOptions) -> None:
        self._check_stage("vae", "train the flow")
        adata = self.adata
        self.module.vae.eval()
        for p in self.module.vae.parameters():
            p.requires_grad_(False)
        z = self._latent_means(adata, batch_size=1024)
        codes = self._registered_codes(adata, latents=z)
        if "programs" in codes and codes["programs"].shape[1]:
            self._set_program_levels(codes["programs"])  # "high" / "low" of this VAE's cells
        cat, cont = self._flow_codes(codes)
        flow = self.module.flow
        device = flow.latent_mean.device

        batch_size = opts.batch_size or (1024 if adata.n_obs >= _LARGE else 128)
        train_idx, val_idx = self._flow_split(adata.n_obs, opts.train_size, opts.validation_size)
        z, cat, cont, train_idx, val_idx = self._spatial_flow_rows(
            z, cat, cont, codes, train_idx, val_idx
        )
        z = torch.as_tensor(z)
        flow.set_scaling(z.to(device), torch.as_tensor(cont).to(device))
        data = LatentDataModule(
            {
                FLOW_KEYS.LATENT: z,
                FLOW_KEYS.COND_CAT: torch.as_tensor(cat),
                FLOW_KEYS.COND_CONT: torch.as_tensor(cont),
            },
            train_idx=train_idx,
            val_idx=val_idx,
            batch_size=batch_size,
            n_attributes=flow.condition.n_attributes,
            seed=settings.seed or 0,
        )
        if opts.early_stopping and len(val_idx) == 0:
            raise ValueError("Early stopping of the flow needs validation cells; lower train_size.")
        self._run_flow_stage("flow", flow, data, len(train_idx), 4000, batch_size, opts)

    def _train_joint(
        self,
        max_epochs: int,
        flow_weight: float,
        accelerator,
        devices,
        batch_size: int,
        early_stopping: bool,
        lr: float,
        trainer_kwargs: dict,
    ) -> None:
        self._check_stage("flow", "fine-tune jointly")
        if self._spatial_state():
            raise ValueError("The 'joint' stage is not available for spatial models yet.")
        cat, cont = self._flow_codes(self._registered_codes(self.adata))
        train_idx, val_idx = self._flow_split(self.adata.n_obs, 0.9, None)
        data = CountsDataModule(
            self.adata_manager,
            train_idx,
            val_idx,
            batch_size=batch_size,
            extra={
                FLOW_KEYS.COND_CAT: torch.as_tensor(cat),
                FLOW_KEYS.COND_CONT: torch.as_tensor(cont),
            },
        )
        joint = JointModule(self.module.vae, self.module.flow, flow_weight=flow_weight)
        for p in joint.parameters():
            p.requires_grad_(True)
        if early_stopping and data.n_val:
            trainer_kwargs.setdefault("early_stopping", True)
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
            trainer_kwargs.setdefault("early_stopping_patience", 10)
        plan = TrainingPlan(joint, lr=lr, n_epochs_kl_warmup=None)
        joint.train()
        self._run("joint", plan, data, max_epochs, accelerator, devices, **trainer_kwargs)
        # keep the VAE's own curves: the joint stage logs the same metric names
        self.stage_history_["joint"] = {
            k if k.startswith("joint_") else f"joint_{k}": v
            for k, v in self.stage_history_["joint"].items()
        }
        self.history_ = self._merged_history()
        for p in self.module.vae.parameters():
            p.requires_grad_(False)
        if "perturbation" in self.trained_stages_:
            # the perturbation flow was fit to the latent space before fine-tuning
            self.trained_stages_.remove("perturbation")
            self.module.perturbation_flow = PerturbationFlow(**self._perturbation_kwargs).to(
                self.module.device
            )
        self.perturbation_summary_ = self._summarize_perturbations()
        self._set_trained("joint")

    def _run_flow_stage(
        self,
        stage: str,
        flow,
        data,
        n_items: int,
        min_steps: int,
        batch_size: int,
        opts: FlowStageOptions,
    ) -> None:
        """Train a flow module (latent, perturbation or translation) with the shared recipe.

        About ``max(min_steps, n_cells / 50)`` optimisation steps (5 to 1000 epochs), AdamW,
        early stopping on ``<stage metric>_validation`` with patience ``max(50, epochs // 5)``
        and never within the first ~1500 steps: the DiT's validation loss can sit on a
        plateau for its first few hundred steps (adaLN-Zero starts every block switched off).
        """
        metric = "flow_loss" if stage == "flow" else f"{stage}_loss"
        trainer_kwargs, patience = opts.trainer_kwargs, opts.patience
        steps_per_epoch = max(1, math.ceil(n_items / batch_size))
        target_steps = max(min_steps, self.adata.n_obs // 50)
        max_epochs = opts.max_epochs or int(np.clip(round(target_steps / steps_per_epoch), 5, 1000))
        if opts.early_stopping and data.n_val > 0:
            trainer_kwargs.setdefault("early_stopping", True)
            trainer_kwargs.setdefault("early_stopping_monitor", f"{metric}_validation")
            trainer_kwargs.setdefault(
                "early_stopping_patience", patience or max(50, max_epochs // 5)
            )
            trainer_kwargs.setdefault(
                "early_stopping_warmup_epochs",
                min(max_epochs // 2, math.ceil(1500 / steps_per_epoch)),
            )
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        plan_kwargs = {"eps": 1e-8, "optimizer": "AdamW", "weight_decay": 1e-4, **opts.plan_kwargs}
        plan = FlowTrainingPlan(flow, lr=opts.lr, metric_name=metric, **plan_kwargs)
        flow.train()
        self._run(stage, plan, data, max_epochs, opts.accelerator, opts.devices, **trainer_kwargs)
        self._set_trained(stage)

    def _flow_split(self, n_obs: int, train_size: float, validation_size: float | None):
        """Reuse the VAE's train/validation split, so neither stage sees validation cells."""
        train_idx, val_idx = self.train_indices, self.validation_indices
        if (
            train_idx is not None
            and val_idx is not None
            and (len(train_idx) + len(val_idx) <= n_obs)
        ):
            return np.asarray(train_idx), np.asarray(val_idx)
        rng = np.random.default_rng(settings.seed)
        perm = rng.permutation(n_obs)
        n_val = round(n_obs * (validation_size if validation_size else 1 - train_size))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def _set_trained(self, stage: str) -> None:
        """Record a trained stage, keeping the stages in their canonical order."""
        done = set(self.trained_stages_) | {stage}
        self.trained_stages_ = [s for s in _STAGES if s in done]

    def _merged_history(self) -> dict:
        merged = {}
        for stage in _STAGES:
            merged.update(self.stage_history_.get(stage, {}))
        return merged

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Training curves of both stages, one DataFrame per logged metric.

        VAE metrics keep scvi-tools' names (``elbo_train``, ``elbo_validation``,
        ``reconstruction_loss_train``, ...); flow metrics are ``flow_loss_train`` and
        ``flow_loss_validation``. Values are floats (scvi-tools stores them with object
        dtype).
        """
        out = {}
        for name, frame in self._merged_history().items():
            try:
                out[name] = frame.astype(float)
            except (TypeError, ValueError):
                out[name] = frame
        return out

    # ------------------------------------------------------------------ compilation
    def compile(self, vae: bool = True, **compile_kwargs) -> LatentDiffusionModel:
        """Compile the model's networks with :func:`torch.compile` for training and sampling.

        Compiles, in place (:meth:`torch.nn.Module.compile`, so weights, ``state_dict`` and
        :meth:`save` are unchanged), the denoiser of every flow and, with ``vae=True``, the
        VAE's encoder and decoder networks. The setting is remembered: flows rebuilt later
        (retraining the VAE resets them) are compiled when their stage trains. The first
        minibatch or sampling step of each new shape compiles (seconds to a minute);
        later ones run the compiled code. A loaded model is not compiled: call this again.

        Whether it helps depends on the hardware and the network size: see the
        ``benchmarks/accelerate.py`` figures in the README before turning it on. Mixed
        precision is a Lightning option of :meth:`train` (``precision="bf16-mixed"``).

        Parameters
        ----------
        vae
            Also compile the VAE's encoder and decoder networks.
        **compile_kwargs
            Keyword arguments of :func:`torch.compile` (``mode``, ``dynamic``, ``backend``,
            ...).

        Returns
        -------
        LatentDiffusionModel
            The model itself, so ``model.compile().train()`` reads naturally.
        """
        self._compile_kwargs = {"vae": vae, **compile_kwargs}
        self._apply_compile()
        return self

    def _compiled_networks(self, vae: bool) -> list[torch.nn.Module]:
        nets = []
        for name in ("flow", "perturbation_flow", "translation_flow"):
            flow = getattr(self.module, name, None)
            if flow is not None:
                nets.append(flow.denoiser)
        if vae:
            for name in ("z_encoder", "l_encoder", "decoder", "encoders", "decoders"):
                net = getattr(self.module.vae, name, None)
                if isinstance(net, torch.nn.ModuleDict):  # one network per modality
                    nets.extend(net.values())
                elif isinstance(net, torch.nn.Module):
                    nets.append(net)
        return nets

    def _apply_compile(self) -> None:
        """Compile the networks not compiled yet, if :meth:`compile` was called."""
        kwargs = dict(getattr(self, "_compile_kwargs", None) or {})
        if not kwargs:
            return
        for net in self._compiled_networks(kwargs.pop("vae")):
            if getattr(net, "_compiled_call_impl", None) is None:
                net.compile(**kwargs)

    # ------------------------------------------------------------------ latent space
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices=None,
        key_added: str | None = LATENT_KEY,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent means of cells under the VAE encoder.

        Parameters
        ----------
        adata
            AnnData with the training genes; defaults to the training data.
        indices
            Cells to encode; ``None`` encodes all.
        key_added
            ``obsm`` key to write the latents to (only when all cells are encoded);
            ``None`` only returns them.
        batch_size
            Minibatch size.

        Returns
        -------
        numpy.ndarray
            Array ``(n_cells, n_latent)``. Writes ``adata.obsm[key_added]`` unless ``key_added``
            is ``None`` or ``indices`` is given.
        """
        self._check_stage("vae", "compute latents")
        adata = self._validate_anndata(adata)
        latent = self._latent_means(adata, indices=indices, batch_size=batch_size)
        if key_added is not None and indices is None:
            adata.obsm[key_added] = latent
        return latent

    def _vae_loader(self, adata, indices, batch_size, action: str):
        """Put the VAE in eval mode and return a data loader over the cells (scvi-tools')."""
        self._check_stage("vae", action)
        adata = self._validate_anndata(adata)
        self.module.vae.eval()
        return self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)

    @torch.inference_mode()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices=None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Evidence lower bound of the cells under the VAE (higher is better), as scVI's.

        The expected log-likelihood of each cell's counts at its posterior latents minus the
        KL divergence of its posterior from the prior (scvi-tools' ``compute_elbo``, with
        scVI's sign). A lower bound on the marginal log-likelihood: compare models on the same
        cells, e.g. held-out ones, to spot overfitting.

        Parameters
        ----------
        adata
            AnnData (or MuData, for a MuData model) with the training genes; defaults to the
            training data. Not modified.
        indices
            Cells to use; ``None`` uses all.
        batch_size
            Cells per minibatch (``None``: scvi-tools' default).
        return_mean
            Return the mean over cells; ``False`` returns one value per cell.

        Returns
        -------
        float or numpy.ndarray
            The mean ELBO (a float) or an array with one value per cell.
        """
        from scvi.model.base._log_likelihood import compute_elbo

        loader = self._vae_loader(adata, indices, batch_size, "compute the ELBO")
        values = -compute_elbo(self.module.vae, loader, return_mean=return_mean)
        return float(values) if return_mean else values.cpu().numpy()

    @torch.inference_mode()
    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices=None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """Negative log-likelihood of the cells' counts at their posterior latents, as scVI's.

        scvi-tools' ``compute_reconstruction_error`` on the VAE (lower is better). A MuData
        model reports one entry per modality (``"reconstruction_loss_<modality>"``).

        Parameters
        ----------
        adata
            AnnData (or MuData) with the training genes; defaults to the training data.
        indices
            Cells to use; ``None`` uses all.
        batch_size
            Cells per minibatch (``None``: scvi-tools' default).
        return_mean
            Return means over cells; ``False`` returns one value per cell.

        Returns
        -------
        dict
            ``{"reconstruction_loss": value}`` (one key per modality for a MuData model), each a
            float or an array with one value per cell.
        """
        from scvi.model.base._log_likelihood import compute_reconstruction_error

        loader = self._vae_loader(adata, indices, batch_size, "compute the reconstruction error")
        out = compute_reconstruction_error(self.module.vae, loader, return_mean=return_mean)
        return {k: float(v) if return_mean else v.cpu().numpy() for k, v in out.items()}

    @torch.inference_mode()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Marginal log-likelihood of the cells under the VAE by importance sampling (scVI's).

        scvi-tools' ``VAE.marginal_ll``: ``n_mc_samples`` latents drawn from each cell's
        posterior, weighted by prior x likelihood / posterior (higher is better). RNA-only
        models.

        Parameters
        ----------
        adata
            AnnData with the training genes; defaults to the training data.
        indices
            Cells to use; ``None`` uses all.
        n_mc_samples
            Importance samples per cell (more: tighter, slower).
        batch_size
            Cells per minibatch (``None``: scvi-tools' default).
        return_mean
            Return the mean over cells; ``False`` returns one value per cell.

        Returns
        -------
        float or numpy.ndarray
            The mean marginal log-likelihood (a float) or an array with one value per cell.
        """
        if self.is_multimodal:
            raise ValueError(
                "get_marginal_ll is for RNA-only models; use get_elbo for a MuData model."
            )
        if int(n_mc_samples) < 1:
            raise ValueError(f"n_mc_samples must be at least 1, got {n_mc_samples}.")
        loader = self._vae_loader(adata, indices, batch_size, "compute the marginal likelihood")
        values = [
            self.module.vae.marginal_ll(tensors, n_mc_samples=int(n_mc_samples), return_mean=False)
            for tensors in loader
        ]
        values = torch.cat([torch.as_tensor(v).reshape(-1) for v in values]).cpu().numpy()
        return float(values.mean()) if return_mean else values

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices=None,
        transform_batch: str | None = None,
        gene_list=None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 1,
        return_mean: bool = True,
        batch_size: int = 1024,
        return_numpy: bool = False,
        seed: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression of cells: the VAE decoder's mean at each cell's latent.

        scVI's convention: each cell is encoded, decoded with its own covariates (or with the
        batch ``transform_batch``), and the decoder's normalised expression (proportions that
        sum to 1 over all genes) is scaled by ``library_size``. With ``n_samples=1`` the
        latent is the posterior mean (deterministic); with more, that many latents are drawn
        from each cell's posterior.

        Parameters
        ----------
        adata
            AnnData with the training genes; defaults to the training data. Not modified
            (a query AnnData not yet seen is registered, as in every scvi-tools query method).
        indices
            Cells to use; ``None`` uses all.
        transform_batch
            Decode every cell as if it came from this batch (a category of the registered
            ``batch_key``); ``None`` keeps each cell's own batch.
        gene_list
            Genes to return (names in the training genes); ``None`` returns all.
        library_size
            Scale of the proportions: a number (e.g. ``1e4`` for counts per 10,000), or
            ``"latent"`` for each cell's own observed library size (the decoder's mean counts).
        n_samples
            Latents per cell: 1 uses the posterior mean, more draw from the posterior.
        return_mean
            With ``n_samples > 1``, average the draws; ``False`` returns them all as an array
            ``(n_samples, n_cells, n_genes)``, as scVI does.
        batch_size
            Cells decoded at once.
        return_numpy
            Return an array instead of a DataFrame.
        seed
            Seed of the posterior draws (``n_samples > 1``).

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            Cells x genes, as a DataFrame indexed by the cells' names with the genes as columns
            (or an array).
        """
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        values, adata, indices, names = self._decoded_draws(
            adata,
            indices,
            transform_batch,
            gene_list,
            library_size,
            n_draws=0 if n_samples == 1 else int(n_samples),
            batch_size=batch_size,
            seed=seed,
        )
        if n_samples == 1 or return_mean:
            values = values.mean(0)
        else:
            return values
        if return_numpy:
            return values
        return pd.DataFrame(values, index=adata.obs_names[indices].copy(), columns=names)

    def _decoded_draws(
        self,
        adata,
        indices,
        transform_batch,
        gene_list,
        library_size,
        n_draws,
        batch_size,
        seed,
        counts: bool = False,
    ) -> tuple[np.ndarray, AnnData, np.ndarray, pd.Index]:
        """``(max(n_draws, 1), cells, genes)`` decoded expression; 0 draws: posterior means.

        ``counts=True`` draws counts from the likelihood (at the observed library) instead.
        """
        self._check_stage("vae", "compute normalised expression")
        if self.is_multimodal:
            raise ValueError(
                "get_normalized_expression, posterior_predictive_sample and "
                "differential_expression are for RNA-only models; for a MuData model use "
                "translate(...) or sample(...), which return every modality's decoded means."
            )
        if not (library_size == "latent" or (np.ndim(library_size) == 0 and library_size > 0)):
            raise ValueError(
                f"library_size must be a positive number or 'latent', got {library_size!r}."
            )
        genes = self.var_names_
        columns = np.arange(len(genes))
        if gene_list is not None:
            position = {g: i for i, g in enumerate(genes)}
            missing = [g for g in gene_list if g not in position]
            if missing:
                raise ValueError(
                    f"{len(missing)} gene(s) of gene_list are not among the model's genes, e.g. "
                    f"{missing[:3]}."
                )
            columns = np.array([position[g] for g in gene_list], dtype=np.int64)
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        codes = {
            k: np.asarray(v)[indices]
            for k, v in self._registered_codes(adata, programs=False).items()
        }
        if transform_batch is not None:
            _, attr = self._batch_attribute(None)  # the registered batch_key
            batches = [str(b) for b in attr["categories"]]
            if str(transform_batch) not in batches:
                raise ValueError(
                    f"transform_batch={transform_batch!r} is not a registered batch; the "
                    f"batches are {batches}."
                )
            codes["batch"] = np.full(len(indices), batches.index(str(transform_batch)))
        # encode each distinct cell once, in file order (indices may repeat: DE draws cells)
        distinct, inverse = np.unique(indices, return_inverse=True)
        loc, scale = self._latent_means(
            adata, indices=distinct, batch_size=batch_size, return_scale=True
        )
        loc, scale = loc[inverse], scale[inverse]
        rng = np.random.default_rng(seed)
        if n_draws:
            eps = rng.standard_normal((n_draws, *loc.shape)).astype(np.float32)
            latents = loc[None] + scale[None] * eps
        else:
            latents = loc[None]
        device = self.module.device
        self.module.eval()
        values = np.zeros((len(latents), len(indices), len(columns)), dtype=np.float32)
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.inference_mode(),
        ):
            torch.manual_seed(int(rng.integers(2**62)))
            for d, z in enumerate(latents):
                for start in range(0, len(indices), batch_size):
                    sl = slice(start, start + batch_size)
                    px = self._decode(
                        torch.as_tensor(z[sl], device=device),
                        {k: v[sl] for k, v in codes.items()},
                    )
                    if counts:
                        values[d, sl] = sample_counts(px).cpu().numpy()[:, columns]
                        continue
                    proportions = px.scale.cpu().numpy()[:, columns]
                    if library_size == "latent":
                        values[d, sl] = proportions * np.exp(codes["log_library"][sl])[:, None]
                    else:
                        values[d, sl] = proportions * float(library_size)
        return values, adata, indices, pd.Index(genes[columns])

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices=None,
        n_samples: int = 1,
        gene_list=None,
        batch_size: int = 1024,
        seed: int | None = None,
    ):
        """Draw counts from the model at each cell's posterior (scVI's check of fit).

        For each cell and draw, a latent is drawn from the cell's posterior, decoded with the
        cell's own covariates and observed library size, and counts are drawn from the
        decoder's likelihood: data the model considers likely for that cell, to compare with
        the observed counts (for example their means, variances or zero fractions per gene).

        Parameters
        ----------
        adata
            AnnData with the training genes; defaults to the training data. Not modified.
        indices
            Cells to use; ``None`` uses all (the draws are held densely in memory: pass
            ``indices`` in chunks for large data).
        n_samples
            Draws per cell.
        gene_list
            Genes to return (names in the training genes); ``None`` returns all.
        batch_size
            Cells decoded at once.
        seed
            Seed of the latents and counts drawn.

        Returns
        -------
        scipy.sparse.csr_matrix or sparse.GCXS
            As scVI: a ``scipy.sparse.csr_matrix`` of cells x genes for one draw, else a
            ``sparse.GCXS`` array of shape ``(cells, genes, n_samples)``.
        """
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        values, *_ = self._decoded_draws(
            adata,
            indices,
            None,
            gene_list,
            1.0,
            n_draws=int(n_samples),
            batch_size=batch_size,
            seed=seed,
            counts=True,
        )
        if n_samples == 1:
            return sparse.csr_matrix(values[0])
        import sparse as pydata_sparse

        return pydata_sparse.GCXS.from_numpy(np.moveaxis(values, 0, -1))

    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: str | list[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: Literal["vanilla", "change"] = "change",
        delta: float = 0.25,
        batch_size: int = 1024,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: list[str] | None = None,
        batchid2: list[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        seed: int | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression between groups of cells, as in scVI.

        scvi-tools' engine (``DifferentialComputation``) on this model's VAE: expression
        proportions are decoded at latents drawn from the posteriors of cells drawn from
        each group (:meth:`get_normalized_expression`), and compared gene by gene.
        ``mode="change"`` (default) gives the probability that the log fold change exceeds
        ``delta`` in absolute value (``proba_de``), the log fold change's posterior
        summaries and a call at false discovery rate ``fdr_target``
        (``is_de_fdr_<fdr_target>``); ``mode="vanilla"`` gives Bayes factors of
        ``group1 > group2``. The result has one row per gene (and per comparison), sorted
        by ``proba_de`` (or ``bayes_factor``), with the raw-count statistics of the groups
        when ``all_stats``.

        Parameters
        ----------
        adata
            AnnData registered with this model; defaults to the training data. scvi-tools'
            temporary ``obs`` columns are removed afterwards.
        groupby
            ``obs`` column of the groups.
        group1
            Group(s) of ``groupby`` to test, each against ``group2``; ``None`` tests every
            group against the rest.
        group2
            Reference group; ``None`` is the rest of the cells.
        idx1, idx2
            Cells of the two groups as indices or boolean masks, instead of ``groupby``.
        mode, delta, fdr_target
            See above.
        batch_size
            Cells decoded at once.
        all_stats
            Add mean counts, detection rates and mean normalised expression per group.
        batch_correction, batchid1, batchid2
            Decode every drawn cell in every batch (or in the given batches of the registered
            ``batch_key``) and pool, rather than in its own batch.
        silent
            Hide the progress bar.
        seed
            Seed of the cells and latents drawn.
        **kwargs
            Passed to :meth:`scvi.model.base.DifferentialComputation.get_bayes_factors`
            (e.g. ``n_samples``, ``pseudocounts``).

        Returns
        -------
        pandas.DataFrame
            A DataFrame as scVI's ``differential_expression`` returns.
        """
        from scvi.model._utils import scrna_raw_counts_properties
        from scvi.model.base._de_core import _de_core

        self._check_stage("vae", "test differential expression")
        if self.is_multimodal:
            raise ValueError("differential_expression is for RNA-only models.")
        if (groupby is None) == (idx1 is None):
            raise ValueError("Pass either groupby (an obs column) or idx1 (and idx2), not both.")
        adata = self._validate_anndata(adata)
        if groupby is not None:
            if groupby not in adata.obs:
                raise ValueError(f"groupby={groupby!r} is not a column of adata.obs.")
            present = set(adata.obs[groupby].astype(str))
            asked = [] if group1 is None else [group1] if isinstance(group1, str) else group1
            unknown = [g for g in [*asked, group2] if g is not None and str(g) not in present]
            if unknown:
                raise ValueError(
                    f"{unknown} not found in adata.obs[{groupby!r}], whose groups are "
                    f"{sorted(present)[:20]}."
                )
        rng = np.random.default_rng(seed)

        def model_fn(data, indices, transform_batch=None, n_samples_overall=None):
            indices = np.asarray(indices)
            if n_samples_overall is not None:
                indices = rng.choice(indices, int(n_samples_overall))
            values, *_ = self._decoded_draws(
                data,
                indices,
                transform_batch,
                None,
                1.0,
                n_draws=1,
                batch_size=batch_size,
                seed=int(rng.integers(2**31)),
            )
            return values[0]

        added = [c for c in ("_scvi_raw_norm_scaling", "_scvi_temp_de") if c not in adata.obs]
        try:
            result = _de_core(
                self.get_anndata_manager(adata, required=True),
                model_fn,
                None,
                groupby,
                group1,
                group2,
                idx1,
                idx2,
                all_stats,
                scrna_raw_counts_properties,
                pd.Index(self.var_names_),
                mode,
                batchid1,
                batchid2,
                delta,
                batch_correction,
                fdr_target,
                silent,
                **kwargs,
            )
        finally:
            # scvi-tools leaves a count-normalisation factor (and, on errors, its temporary
            # group column) in obs: leave none behind
            adata.obs.drop(columns=[c for c in added if c in adata.obs], inplace=True)
        return result

    # ------------------------------------------------------------------ sampling
    def _parse_conditions(self, n_samples, conditions) -> pd.DataFrame:
        attrs = self._condition_attributes()
        known = [a["name"] for a in attrs["categorical"]] + attrs["continuous"]
        if conditions is None:
            if n_samples is None:
                raise ValueError("Pass n_samples (how many cells to generate).")
            frame = pd.DataFrame(index=range(int(n_samples)))
        elif isinstance(conditions, pd.DataFrame):
            if n_samples is not None and n_samples != len(conditions):
                raise ValueError(
                    f"n_samples={n_samples} but conditions has {len(conditions)} rows; one "
                    f"cell is generated per row, so leave n_samples=None."
                )
            frame = conditions.reset_index(drop=True).copy()
        elif isinstance(conditions, Mapping):
            if n_samples is None:
                lengths = {len(v) for v in conditions.values() if np.ndim(v) == 1}
                if len(lengths) != 1:
                    raise ValueError("Pass n_samples, or per-cell lists of one common length.")
                n_samples = lengths.pop()
            frame = pd.DataFrame(index=range(int(n_samples)))
            for key, value in conditions.items():
                if np.ndim(value) == 1 and len(value) != n_samples:
                    raise ValueError(
                        f"conditions[{key!r}] has {len(value)} values for n_samples={n_samples}."
                    )
                frame[key] = list(value) if np.ndim(value) == 1 else [value] * int(n_samples)
        else:
            raise TypeError("conditions must be None, a dict or a pandas DataFrame.")
        unknown = [c for c in frame.columns if c not in known]
        if unknown:
            raise ValueError(
                f"Unknown condition(s) {unknown}. This model was set up with conditions "
                f"{known or '(none)'}."
            )
        for attr in attrs["categorical"]:
            name = attr["name"]
            if name in frame:
                cats = attr["categories"]
                values = frame[name].astype(object)
                bad = sorted({str(v) for v in values if v not in set(cats.tolist())})
                if bad:
                    raise ValueError(
                        f"Unknown value(s) {bad} for condition {name!r}. Known values: "
                        f"{cats.tolist()}."
                    )
        for name in attrs["continuous"]:
            if name in frame:
                values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
                if not np.isfinite(values).all():
                    raise ValueError(f"Condition {name!r} needs finite numbers.")
                frame[name] = values
        return frame

    def _reference_rows(self, frame: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """Pick one training cell per requested cell, matching its categorical conditions.

        The chosen cell supplies the library size and the decoder covariates that were not
        requested.
        """
        attrs = self._condition_attributes()["categorical"]
        cat_ref, _ = self._flow_codes(self.reference_)
        n_ref = cat_ref.shape[0]
        specified = [(i, a) for i, a in enumerate(attrs) if a["name"] in frame]
        rows = np.empty(len(frame), dtype=np.int64)
        if not specified:
            return rng.integers(0, n_ref, size=len(frame))
        code_cols = np.stack(
            [
                pd.Categorical(frame[a["name"]], categories=a["categories"]).codes
                for _, a in specified
            ],
            axis=1,
        )
        groups = pd.DataFrame(code_cols).groupby(list(range(code_cols.shape[1]))).indices
        for key, members in groups.items():
            key = key if isinstance(key, tuple) else (key,)
            match = np.ones(n_ref, dtype=bool)
            for (i, _), code in zip(specified, key, strict=True):
                match &= cat_ref[:, i] == code
            candidates = np.flatnonzero(match)
            if candidates.size == 0:
                first_i = specified[0][0]
                candidates = np.flatnonzero(cat_ref[:, first_i] == key[0])
                if candidates.size == 0:
                    attr = specified[0][1]
                    raise ValueError(
                        f"No training cell has {attr['name']}={attr['categories'][key[0]]!r} "
                        f"(a registered category without cells), so there is no library size "
                        f"to generate it with. Ask for a category with training cells."
                    )
                combo = dict(zip([a["name"] for _, a in specified], key, strict=True))
                warnings.warn(
                    f"No training cell has the combination {combo}; drawing library sizes "
                    f"from cells matching {specified[0][1]['name']!r} only.",
                    UserWarning,
                    stacklevel=3,
                )
            rows[members] = rng.choice(candidates, size=len(members), replace=True)
        return rows

    def sample(
        self,
        n_samples: int | None = None,
        conditions: Mapping | pd.DataFrame | None = None,
        n_steps: int = 50,
        method: Literal["euler", "midpoint", "heun", "ddim"] | None = None,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        batch_size: int = 1024,
        latent_prior: Literal["flow", "normal"] = "flow",
        progress_bar: bool = True,
        out_path: str | Path | None = None,
    ) -> AnnData:
        """Generate cells.

        Parameters
        ----------
        n_samples
            Number of cells; with a DataFrame of conditions it is the number of rows.
        conditions
            ``None`` (unconditional: every condition takes its null token), a dict
            ``{key: value}`` (``n_samples`` cells with that condition; values may also be
            per-cell lists) or a DataFrame with one row per cell and registered keys as
            columns (e.g. ``held_out.obs[["cell_type"]]``). Conditions not given are left to
            the flow (null token); the decoder's batch/covariates and the library size come
            from a training cell drawn among those matching the given categorical
            conditions. Spatial models also take ``{"spatial": coords}``, an array
            ``(n_samples, n_dims)`` of positions: each cell is generated at its position,
            given the neighbourhood of training cells there, and its library size and
            covariates come from one of those neighbours. Models with ``gene_programs`` take
            ``{"programs": {"interferon": "high", "mhc_ii": -0.5}}`` in a dict: ``"high"`` /
            ``"low"`` (the 90th / 10th percentile of the expected activity among training
            cells of the requested ``labels_key`` value, or among all training cells when no
            label is requested or it had fewer than 20 training cells), a number (an
            expected activity, ``get_program_scores(expected=True)``, in the units of the
            observed score, which generated cells then average) or one per cell; programs
            not named
            are left to the flow, and the requested levels are written to
            ``obs['<program>_program']``.
        n_steps
            Solver steps (``"midpoint"`` and ``"heun"`` evaluate the network twice per step).
        method
            ``"euler"``, ``"midpoint"`` or ``"heun"`` for ``objective="flow"`` (default
            ``"midpoint"``); ``"ddim"`` (the default) for ``objective="ddpm"``.
        cfg_scale
            Classifier-free guidance weight; 1 is the plain conditional flow, larger values
            push samples towards the condition at the cost of diversity.
        seed
            Seed of this call; the same seed gives the same cells.
        batch_size
            Cells generated per batch.
        latent_prior
            ``"flow"`` (the trained flow) or ``"normal"`` (the VAE's standard normal prior,
            no flow; a baseline, which ignores the conditions except through the decoder).
        progress_bar
            Show a progress bar.
        out_path
            Write the cells to this ``.h5ad`` file batch by batch instead of keeping them in
            memory, and return the file opened backed (``backed="r"``): for millions of
            cells, memory then stays at one batch. The decoded means are not stored in this
            mode (they are dense); everything else is as described below.

        Returns
        -------
        anndata.AnnData or mudata.MuData
            For a MuData model, a MuData with one AnnData per modality (each as described next),
            the conditions also in the global ``obs`` and the latents in its ``obsm``. Otherwise,
            an AnnData of generated cells: integer counts drawn from the decoder's likelihood in
            ``.X`` (float32, CSR), the decoded mean expression in
            ``layers['latentcell_mean']``, the conditions (requested, or drawn with the
            reference cell for decoder covariates) in ``obs``, the generated latents in
            ``obsm['X_latentcell']``, the training genes as ``var`` and the call's settings in
            ``uns['latentcell']``. With positions (spatial models), also the positions in
            ``obsm[spatial_key]``.
        """
        self._check_stage("flow" if latent_prior == "flow" else "vae", "sample")
        method = self._sampler_method(method)
        if latent_prior not in ("flow", "normal"):
            raise ValueError(f"latent_prior must be 'flow' or 'normal', got {latent_prior!r}.")
        if not self.reference_:
            raise RuntimeError("The model has no reference cells; call model.train() first.")
        coords, conditions = self._spatial_request(conditions)
        program_request = None
        if isinstance(conditions, Mapping) and "programs" in conditions:
            if self._program_state() is None:
                raise ValueError(
                    'conditions["programs"] needs a model set up with gene_programs=...'
                )
            conditions = dict(conditions)
            program_request = conditions.pop("programs")
        if coords is not None:
            if n_samples is not None and n_samples != len(coords):
                raise ValueError(
                    f"n_samples={n_samples} but {len(coords)} positions were given; one cell is "
                    f"generated per position, so leave n_samples=None."
                )
            n_samples = len(coords)
        frame = self._parse_conditions(n_samples, conditions)
        programs = None
        if program_request is not None:
            state = self._program_state()
            labels_key = self.registry_["setup_args"].get("labels_key")
            programs = requested_levels(
                program_request,
                len(frame),
                state["names"],
                self._program_levels()["levels"],
                labels=frame[labels_key].tolist() if labels_key in frame else None,
                levels_by_label=state["stats"].get("levels_by_label"),
            )
        return self._generate(
            frame,
            n_steps,
            method,
            cfg_scale,
            seed,
            batch_size,
            latent_prior,
            progress_bar,
            coords,
            out_path=out_path,
            programs=programs,
        )

    def _sampler_method(self, method: str | None) -> str:
        """Return the solver to use: ``method``, or the objective's default, checked."""
        objective = self.module.flow.objective
        valid = SAMPLER_METHODS if objective == "flow" else DIFFUSION_METHODS
        method = method or ("midpoint" if objective == "flow" else "ddim")
        if method not in valid:
            raise ValueError(
                f"method must be one of {valid} for objective={objective!r}, got {method!r}."
            )
        return method

    def _generate(
        self,
        frame: pd.DataFrame,
        n_steps: int,
        method: str,
        cfg_scale: float,
        seed: int | None,
        batch_size: int,
        latent_prior: str,
        progress_bar: bool,
        coords: np.ndarray | None = None,
        pool: Mapping | None = None,
        use_neighbourhood: bool = True,
        out_path: str | Path | None = None,
        programs: np.ndarray | None = None,
    ):
        """Generate one cell per row of parsed conditions (and per position, if given).

        ``pool`` holds the observed cells (positions, latents, registered codes) that
        neighbourhoods of the positions are taken from; ``None`` uses the training cells.
        """
        n = len(frame)
        rng = np.random.default_rng(seed)
        attrs = self._condition_attributes()
        # Flow conditions: requested values, null tokens (or NaN) otherwise.
        flow_cat = (
            np.stack(
                [
                    pd.Categorical(frame[a["name"]], categories=a["categories"]).codes.astype(
                        np.int64
                    )
                    if a["name"] in frame
                    else np.full(n, len(a["categories"]), dtype=np.int64)
                    for a in attrs["categorical"]
                ],
                axis=1,
            )
            if attrs["categorical"]
            else np.zeros((n, 0), dtype=np.int64)
        )
        flow_cont = (
            np.stack(
                [
                    frame[c].to_numpy(np.float32) if c in frame else np.full(n, np.nan, np.float32)
                    for c in attrs["continuous"]
                ],
                axis=1,
            )
            if attrs["continuous"]
            else np.zeros((n, 0), dtype=np.float32)
        )
        spatial = self._spatial_state()
        if coords is not None and spatial["n_neighbors"] and use_neighbourhood:
            pool = pool or self._reference_pool()
            # a requested batch (section) restricts each position's neighbours to it
            batch_column = [
                i
                for i, a in enumerate(attrs["categorical"])
                if a["source"] == REGISTRY_KEYS.BATCH_KEY and a["name"] in frame
            ]
            query_groups = (
                flow_cat[:, batch_column[0]]
                if batch_column and pool["groups"] is not None
                else None
            )
            spatial_cols, ref_rows = self._spatial_columns(
                n, coords, pool, query_groups, rng, use_neighbourhood
            )
            ref = {k: np.asarray(v)[ref_rows] for k, v in pool["codes"].items()}
        else:
            spatial_cols, _ = self._spatial_columns(n, coords, None, None, rng, False)
            ref_rows = self._reference_rows(frame, rng)
            ref = {k: v[ref_rows] for k, v in self.reference_.items()}
        program_names = (self._program_state() or {}).get("names", [])
        n_programs = len(program_names)
        if programs is None:
            programs = np.full((n, n_programs), np.nan, dtype=np.float32)
        flow_cont = np.concatenate([flow_cont, spatial_cols, programs], axis=1)
        # Decoder covariates: requested values override the reference cell's.
        for i, a in enumerate(attrs["categorical"]):
            if a["name"] not in frame:
                continue
            if a["source"] == REGISTRY_KEYS.BATCH_KEY:
                ref["batch"] = flow_cat[:, i].copy()
            elif a["source"] == _CAT_COVS:
                ref["cat_covs"] = ref["cat_covs"].copy()
                ref["cat_covs"][:, a["column"]] = flow_cat[:, i]
        for j, c in enumerate(attrs["continuous"][: attrs["n_cont_covs"]]):
            if c in frame:
                ref["cont_covs"] = ref["cont_covs"].copy()
                ref["cont_covs"][:, j] = flow_cont[:, j]

        settings_used = dict(
            n_steps=n_steps,
            method=method,
            cfg_scale=cfg_scale,
            seed=seed,
            latent_prior=latent_prior,
            requested=list(frame.columns)
            + (["spatial"] if coords is not None else [])
            + (["programs"] if n_programs and np.isfinite(programs).any() else []),
        )
        writer = None
        if out_path is not None:
            if self.is_multimodal:
                raise ValueError("out_path is not available for MuData models yet.")
            skeleton = self._generated_anndata(
                sparse.csr_matrix((n, len(self.var_names_)), dtype=np.float32),
                None,
                np.zeros((n, self.module.flow.n_latent), dtype=np.float32),
                frame,
                ref,
                {**settings_used, "out_path": str(out_path)},
            )
            self._annotate_generated(skeleton, programs, program_names, coords)
            writer = H5adWriter(out_path, skeleton)

        device = self.module.device
        self.module.eval()
        parts: dict[str, tuple[list, list]] = {}
        latents = []
        n_batches = math.ceil(n / batch_size)
        total = n_batches * (n_steps if latent_prior == "flow" else 1)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(rng.integers(2**62)))
        with (
            tqdm(total=total, desc="Sampling", disable=not progress_bar, unit="step") as bar,
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.inference_mode(),
        ):
            torch.manual_seed(int(rng.integers(2**62)))
            for start in range(0, n, batch_size):
                sl = slice(start, min(start + batch_size, n))
                noise = torch.randn(sl.stop - sl.start, self.module.flow.n_latent, generator=gen)
                if latent_prior == "flow":
                    z = self.module.flow.sample(
                        torch.as_tensor(flow_cat[sl]),
                        torch.as_tensor(flow_cont[sl]),
                        n_steps=n_steps,
                        method=method,
                        cfg_scale=cfg_scale,
                        noise=noise,
                        callback=lambda _: bar.update(1),
                    )
                else:
                    z = noise.to(device)
                    bar.update(1)
                px = self._decode(z, {k: v[sl] for k, v in ref.items()})
                if writer is not None:
                    writer.append(self._draw(px)["rna"][0], z.cpu().numpy())
                    release_memory()
                    continue
                for name, (c, m) in self._draw(px).items():
                    parts.setdefault(name, ([], []))
                    parts[name][0].append(c)
                    parts[name][1].append(m)
                latents.append(z.cpu().numpy())
        if writer is not None:
            writer.close()
            return anndata.read_h5ad(out_path, backed="r")
        parts = {
            name: (sparse.vstack(c).tocsr(), np.concatenate(m)) for name, (c, m) in parts.items()
        }
        latents = np.concatenate(latents)
        rna = self._generated_anndata(*parts["rna"], latents, frame, ref, settings_used)
        self._annotate_generated(rna, programs, program_names, coords)
        return self._generated_mudata(rna, parts, latents) if self.is_multimodal else rna

    def _annotate_generated(self, adata: AnnData, programs, program_names, coords) -> None:
        """Write the requested program levels and the positions of generated cells."""
        for j, name in enumerate(program_names):
            if np.isfinite(programs[:, j]).any():
                adata.obs[f"{name}_program"] = programs[:, j]
        if coords is not None:
            adata.obsm[self._spatial_state()["key"]] = np.asarray(coords, dtype=np.float32)

    def sample_path(
        self,
        key: str,
        start: float | None = None,
        stop: float | None = None,
        n_points: int = 20,
        values=None,
        n_per_point: int = 50,
        conditions: Mapping | None = None,
        **sample_kwargs,
    ):
        """Generate cells along a path of values of one continuous condition.

        For example 20 points of pseudotime from its start to its end, 50 cells each, in one
        lineage: ``model.sample_path("pseudotime", 0, 1, conditions={"lineage": "ery"})``.

        Parameters
        ----------
        key
            A continuous condition (``continuous_condition_keys``) or covariate of the model.
        start, stop, n_points
            ``n_points`` evenly spaced values from ``start`` to ``stop`` (both included);
            they may lie between or beyond the values seen in training.
        values
            Explicit values instead of ``start``/``stop``/``n_points``.
        n_per_point
            Cells generated at each value.
        conditions
            Further conditions held fixed along the path (``{name: value}``).
        **sample_kwargs
            Passed to :meth:`sample` (``n_steps``, ``cfg_scale``, ``seed``, ...).

        Returns
        -------
        anndata.AnnData or mudata.MuData
            One AnnData (MuData for a MuData model) as :meth:`sample` returns it, with the value
            of ``key`` in ``obs[key]`` and the index of the point in ``obs['path_step']``.
        """
        attrs = self._condition_attributes()
        if key not in attrs["continuous"]:
            raise ValueError(
                f"{key!r} is not a continuous condition of this model; its continuous "
                f"conditions are {attrs['continuous'] or '(none)'} (register one with "
                f"setup_anndata(continuous_condition_keys=[...]))."
            )
        if values is None:
            if start is None or stop is None:
                raise ValueError("Pass start and stop (and n_points), or values.")
            if n_points < 1:
                raise ValueError(f"n_points must be >= 1, got {n_points}.")
            values = np.linspace(float(start), float(stop), int(n_points))
        values = np.asarray(values, dtype=float).ravel()
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError("The path needs at least one finite value.")
        if n_per_point < 1:
            raise ValueError(f"n_per_point must be >= 1, got {n_per_point}.")
        frame = pd.DataFrame({key: np.repeat(values, n_per_point)})
        for name, value in (conditions or {}).items():
            if name == key:
                raise ValueError(f"{key!r} is the path's own condition; do not fix it.")
            if np.ndim(value) != 0:
                raise ValueError(f"conditions[{name!r}] must be one value, held along the path.")
            frame[name] = [value] * len(frame)
        out = self.sample(conditions=frame, **sample_kwargs)
        out.obs["path_step"] = np.repeat(np.arange(values.size), n_per_point)
        return out

    def _decode(self, z: torch.Tensor, ref: dict[str, np.ndarray]):
        """Return the decoder likelihood at ``z`` for given library sizes and covariates."""
        device = z.device
        vae = self.module.vae
        cat_covs = (
            torch.as_tensor(ref["cat_covs"], device=device) if ref["cat_covs"].shape[1] else None
        )
        cont_covs = (
            torch.as_tensor(ref["cont_covs"], device=device) if ref["cont_covs"].shape[1] else None
        )
        out = vae.generative(
            z=z,
            library=torch.as_tensor(ref["log_library"], device=device)[:, None],
            batch_index=torch.as_tensor(ref["batch"], device=device)[:, None],
            cont_covs=cont_covs,
            cat_covs=cat_covs,
            y=torch.as_tensor(ref["labels"], device=device)[:, None],
        )
        return out["px"]

    def _generated_anndata(self, counts, means, latents, frame, ref, settings_used) -> AnnData:
        attrs = self._condition_attributes()
        obs = pd.DataFrame(index=[f"gen_{i}" for i in range(counts.shape[0])])
        batch_state = self._field_state(REGISTRY_KEYS.BATCH_KEY)
        for a in attrs["categorical"]:
            name, cats = a["name"], a["categories"]
            if name in frame:
                obs[name] = pd.Categorical(frame[name].to_numpy(), categories=cats)
            elif a["source"] == REGISTRY_KEYS.BATCH_KEY:
                obs[name] = pd.Categorical.from_codes(
                    ref["batch"], categories=batch_state["categorical_mapping"]
                )
            elif a["source"] == _CAT_COVS:
                codes = ref["cat_covs"][:, a["column"]]
                obs[name] = pd.Categorical.from_codes(codes, categories=cats)
        for j, c in enumerate(attrs["continuous"]):
            if j < attrs["n_cont_covs"]:
                obs[c] = ref["cont_covs"][:, j]
            else:  # flow-only condition: the requested value, NaN where left to the flow
                obs[c] = frame[c].to_numpy(float) if c in frame else np.nan
        if self.is_multimodal:
            var = self._modality_var("rna")
        elif self.adata is not None:
            var = self.adata.var.copy()
        else:
            var = pd.DataFrame(index=pd.Index(self.var_names_))
        out = AnnData(X=counts, obs=obs, var=var)
        if means is not None:
            out.layers[MEAN_LAYER] = means
        out.obsm[LATENT_KEY] = latents
        out.uns["latentcell"] = {k: v for k, v in settings_used.items() if v is not None}
        return out

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        dir_path: str | Path,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model: weights as tensors, everything else as JSON.

        Parameters
        ----------
        dir_path
            Folder to create (``metadata.json``, ``model.pt`` and optionally
            ``adata.h5ad``, or ``mdata.h5mu`` for a MuData model).
        overwrite
            Replace an existing non-empty folder.
        save_anndata
            Also write the training AnnData (MuData).
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad` (:meth:`mudata.MuData.write_h5mu`).
        """
        metadata = {
            "format_version": _io.FORMAT_VERSION,
            "model_class": type(self).__name__,
            "latentcell_version": _version(),
            "init_params": self.init_params_,
            "registry": self.registry_,
            "var_names": np.asarray(self.var_names_, dtype=object),
            "trained_stages": list(self.trained_stages_),
            "perturbation_summary": self.perturbation_summary_,
            "program_stats": self.program_stats_,
            "stage_history": self.stage_history_,
            "train_indices": self.train_indices,
            "validation_indices": self.validation_indices,
        }
        tensors = {
            "module": self.module.state_dict(),
            "reference": {k: torch.as_tensor(v) for k, v in self.reference_.items()},
        }
        path = _io.write_model(dir_path, metadata, tensors, overwrite)
        if save_anndata:
            if self.adata is None:
                raise ValueError("This model holds no AnnData to save.")
            if self.is_multimodal:
                self.adata.write_h5mu(path / _io.MDATA_FILE, **anndata_write_kwargs)
            else:
                self.adata.write_h5ad(path / _io.ADATA_FILE, **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ) -> LatentDiffusionModel:
        """Load a model saved with :meth:`save`.

        Tensors are read with ``torch.load(weights_only=True)`` and metadata from JSON, so
        loading never executes code stored in the files.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData (MuData for a MuData model) with the training genes to attach (it is
            registered with the saved setup). ``None`` uses the saved AnnData if there is
            one, else loads the model without data: sampling works, methods that read cells
            need ``adata=...``.
        accelerator, device
            Where to put the model.

        Returns
        -------
        LatentDiffusionModel
            The loaded model.
        """
        from scvi.model._utils import parse_device_args

        metadata, tensors = _io.read_model(dir_path)
        if metadata.get("model_class") != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {metadata.get('model_class')!r}, not a {cls.__name__}."
            )
        registry = metadata["registry"]
        saved_data = None
        if adata is None and (Path(dir_path) / _io.ADATA_FILE).exists():
            saved_data = Path(dir_path) / _io.ADATA_FILE
        elif adata is None and (Path(dir_path) / _io.MDATA_FILE).exists():
            saved_data = Path(dir_path) / _io.MDATA_FILE
        if saved_data is not None:
            import mudata

            read = anndata.read_h5ad if saved_data.suffix == ".h5ad" else mudata.read_h5mu
            try:
                adata = read(saved_data)
            except OSError as err:
                raise ValueError(
                    f"{saved_data} could not be read ({err}); the saved data are corrupted. "
                    f"Pass the training data with adata=..., or delete the file to load the "
                    f"model without data."
                ) from None
        init = metadata["init_params"]
        kwargs = {k: v for d in init.get("kwargs", {}).values() for k, v in d.items()}
        if adata is not None:
            check_not_view(adata)
            if "modalities" in registry["setup_args"]:
                if not _is_mudata(adata):
                    raise TypeError("This model was saved from a MuData; pass a MuData.")
                rna = adata.mod[registry["setup_args"]["modalities"]["rna"]]
                check_var_names(rna, metadata["var_names"])
                cls.setup_mudata(adata, source_registry=registry, **registry["setup_args"])
            else:
                check_var_names(adata, metadata["var_names"])
                check_registered_obs(adata, registry)
                cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
        try:
            model = (
                cls(adata, **init["non_kwargs"], **kwargs)
                if adata is not None
                else cls(None, registry=registry, **init["non_kwargs"], **kwargs)
            )
            model.module.load_state_dict(tensors["module"])
        except (KeyError, AttributeError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "state_dict" not in str(err):
                raise
            raise ValueError(
                f"{Path(dir_path) / _io.METADATA_FILE} and {_io.WEIGHTS_FILE} do not describe "
                f"one consistent model ({type(err).__name__}: {err}); the folder was edited or "
                f"mixes two saves. Save the model again."
            ) from None
        model.reference_ = {k: v.numpy() for k, v in tensors["reference"].items()}
        model.trained_stages_ = list(metadata["trained_stages"])
        model.perturbation_summary_ = metadata.get("perturbation_summary") or {}
        model.program_stats_ = metadata.get("program_stats") or {}
        model.stage_history_ = metadata["stage_history"]
        model.history_ = model._merged_history()
        model.is_trained_ = bool(model.trained_stages_)
        for name in ("train_indices", "validation_indices"):
            value = metadata.get(name)
            setattr(model, name, None if value is None else np.asarray(value))
        _, _, torch_device = parse_device_args(
            accelerator=accelerator,
            devices=device,
            return_device="torch",
            validate_single_device=True,
        )
        model.to_device(torch_device)
        model.module.eval()
        return model


def _version() -> str:
    from latentcell import __version__

    return __version__
