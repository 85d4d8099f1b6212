"""A VAE over several modalities (RNA, protein, accessibility) with one shared latent.

Tensors only: the model maps registry keys to modalities and turns outputs into MuData.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, NegativeBinomialMixture
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import FCLayers
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

ModalityLikelihood = Literal["nb", "nb_mixture", "bernoulli"]
MODALITY_LIKELIHOODS = ("nb", "nb_mixture", "bernoulli")
#: Where a normalisation applies, scvi-tools' spelling (``use_batch_norm`` / ``use_layer_norm``).
NORM_PLACES = ("encoder", "decoder", "both", "none")
#: Smallest and largest log-variance of an encoder expert (keeps the product finite).
_LOGVAR_RANGE = (-12.0, 8.0)


class _Expert(nn.Module):
    """Encoder of one modality: a Gaussian expert ``(mean, log-variance)`` over the latent."""

    def __init__(
        self, n_input, n_latent, n_cat_list, n_cont, n_hidden, n_layers, dropout, norm=(True, False)
    ):
        super().__init__()
        self.net = FCLayers(
            n_input + n_cont,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout,
            use_batch_norm=norm[0],
            use_layer_norm=norm[1],
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)

    def forward(self, x, *covariates):
        h = self.net(x, *covariates)
        return self.mean(h), self.logvar(h).clamp(*_LOGVAR_RANGE)


class _ModalityDecoder(nn.Module):
    """Decoder of one modality: the parameters of its likelihood at a latent ``z``."""

    def __init__(
        self,
        n_output,
        likelihood,
        use_library,
        n_latent,
        n_cat_list,
        n_cont,
        n_hidden,
        n_layers,
        norm=(True, False),
    ):
        super().__init__()
        self.likelihood = likelihood
        self.use_library = use_library
        self.net = FCLayers(
            n_latent + n_cont,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            use_batch_norm=norm[0],
            use_layer_norm=norm[1],
        )
        self.head = nn.Linear(n_hidden, n_output)
        if likelihood in ("nb", "nb_mixture"):
            self.log_theta = nn.Parameter(torch.zeros(n_output))
        if likelihood == "nb_mixture":
            n_batch = n_cat_list[0] if n_cat_list else 1
            # background rate per batch and feature, foreground = background * (1 + scale)
            self.log_background = nn.Parameter(torch.zeros(max(n_batch, 1), n_output))
            self.fore_head = nn.Linear(n_hidden, n_output)
            self.mix_head = nn.Linear(n_hidden, n_output)

    def forward(self, z, log_library, batch_index, *covariates):
        h = self.net(z, *covariates)
        out = self.head(h)
        if self.likelihood == "bernoulli":
            return Bernoulli(logits=out)
        theta = self.log_theta.exp()
        if self.likelihood == "nb":
            if self.use_library:
                rate = torch.softmax(out, dim=-1) * log_library.exp()
            else:
                rate = out.clamp(max=15.0).exp()
            return NegativeBinomial(mu=rate, theta=theta)
        background = self.log_background[batch_index.reshape(-1).long()].clamp(max=15.0).exp()
        foreground = background * (1.0 + F.softplus(self.fore_head(h)) + 1e-4)
        # scvi-tools' mixture: mixture_logits are the log-odds of the first (background) part
        return NegativeBinomialMixture(
            mu1=background, mu2=foreground, theta1=theta, mixture_logits=self.mix_head(h)
        )


class MultiModalVAE(BaseModuleClass):
    """Joint VAE of several modalities with a product-of-experts encoder.

    Each modality has its own encoder, giving a Gaussian expert over the shared latent; the
    posterior is the product of the experts of the observed modalities and of the standard
    normal prior, so a cell with any subset of modalities has a posterior. Each modality has
    its own decoder and likelihood; the loss sums the reconstruction terms of the observed
    modalities of each cell. During training, modality dropout hides one observed modality of
    a random fraction of cells from the encoder (they are still reconstructed), which teaches
    the encoder to place cells measured in one modality where cells measured in all would be:
    the basis of translation between modalities.

    A modality counts as not measured for a cell when its row sums to zero (for example a
    cell without protein measurements); its reconstruction term is skipped and its expert is
    neither evaluated on it nor part of its posterior (so unmeasured cells do not enter the
    expert's batch-norm statistics).

    Parameters
    ----------
    modalities
        ``(name, registry key, n_features, likelihood)`` per modality. The first is the
        primary modality (RNA): its decoder uses the observed library size (the negative
        binomial mean is a softmax over features times the library), the others predict
        rates directly, so they can be generated for cells where they were not measured.
        Likelihoods: ``"nb"`` (negative binomial), ``"nb_mixture"`` (background/foreground
        negative binomial mixture with a per-batch background rate, as for surface protein
        counts) or ``"bernoulli"`` (binary accessibility; counts above zero are read as 1).
    n_batch
        Number of batches (a covariate of every encoder and decoder).
    n_latent, n_hidden, n_layers, dropout_rate
        Latent size and the width, depth and dropout of the encoders and decoders.
    n_continuous_cov, n_cats_per_cov
        Extra covariates of the encoders and decoders.
    modality_dropout
        Fraction of training cells with two or more measured modalities whose encoder sees
        one of them hidden (chosen uniformly).
    use_batch_norm, use_layer_norm
        Where the hidden layers use batch normalisation and layer normalisation:
        ``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"`` (scvi-tools' spelling and
        meaning). Batch-norm statistics are shared by every cell of a batch, so in the
        encoders they let cells measured in fewer modalities shift the encoding of the
        others; layer normalisation works per cell.
    """

    def __init__(
        self,
        modalities: Sequence[tuple[str, str, int, str]],
        n_batch: int = 0,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        modality_dropout: float = 0.3,
        use_batch_norm: Literal["encoder", "decoder", "both", "none"] = "both",
        use_layer_norm: Literal["encoder", "decoder", "both", "none"] = "none",
    ):
        super().__init__()
        for arg, value in (("use_batch_norm", use_batch_norm), ("use_layer_norm", use_layer_norm)):
            if value not in NORM_PLACES:
                raise ValueError(f"{arg} must be one of {NORM_PLACES}, got {value!r}.")

        def norm(part: str) -> tuple[bool, bool]:
            return tuple(v in (part, "both") for v in (use_batch_norm, use_layer_norm))

        if len(modalities) < 2:
            raise ValueError("MultiModalVAE needs at least two modalities.")
        for name, _, _, likelihood in modalities:
            if likelihood not in MODALITY_LIKELIHOODS:
                raise ValueError(
                    f"Likelihood of modality {name!r} must be one of {MODALITY_LIKELIHOODS}, "
                    f"got {likelihood!r}."
                )
        if modalities[0][3] != "nb":
            raise ValueError("The primary (first) modality must use the 'nb' likelihood.")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}.")
        self.names = [m[0] for m in modalities]
        self.registry_keys = {m[0]: m[1] for m in modalities}
        self.n_features = {m[0]: int(m[2]) for m in modalities}
        self.likelihoods = {m[0]: m[3] for m in modalities}
        self.n_latent = n_latent
        self.n_batch = n_batch
        self.modality_dropout = modality_dropout
        cat_list = [n_batch, *(n_cats_per_cov or [])]
        self.encoders = nn.ModuleDict(
            {
                name: _Expert(
                    n,
                    n_latent,
                    cat_list,
                    n_continuous_cov,
                    n_hidden,
                    n_layers,
                    dropout_rate,
                    norm("encoder"),
                )
                for name, _, n, _ in modalities
            }
        )
        self.decoders = nn.ModuleDict(
            {
                name: _ModalityDecoder(
                    n,
                    likelihood,
                    i == 0,
                    n_latent,
                    cat_list,
                    n_continuous_cov,
                    n_hidden,
                    n_layers,
                    norm("decoder"),
                )
                for i, (name, _, n, likelihood) in enumerate(modalities)
            }
        )

    # ---------------------------------------------------------------- helpers
    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).float() if self.likelihoods[name] == "bernoulli" else torch.log1p(x)

    @staticmethod
    def _covariates(tensors: Mapping) -> dict:
        cat = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
        return {
            "batch_index": tensors[REGISTRY_KEYS.BATCH_KEY],
            "cont_covs": tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
            "cat_covs": cat,
        }

    def observed(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean per cell and modality: is the modality measured (row sum above zero)."""
        return {name: x[name].sum(-1) > 0 for name in self.names}

    # ---------------------------------------------------------------- scvi-tools module API
    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        return {
            "x": {name: tensors[key] for name, key in self.registry_keys.items()},
            **self._covariates(tensors),
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            **self._covariates(tensors),
        }

    @auto_move_data
    def inference(
        self,
        x: Mapping[str, torch.Tensor],
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        use_modalities: Sequence[str] | None = None,
        encoder_mask: Mapping[str, torch.Tensor] | None = None,
        n_samples: int = 1,
    ) -> dict:
        """Posterior over the latent from the measured (and selected) modalities.

        Parameters
        ----------
        x
            Counts per modality.
        batch_index, cont_covs, cat_covs
            Covariates.
        use_modalities
            Modalities the encoder may look at (default all); the others are ignored even
            where measured: translation encodes from the source modality only.
        encoder_mask
            Explicit per-cell boolean mask per modality of what the encoder sees (overrides
            modality dropout). By default, in training mode, modality dropout is applied.
        n_samples
            Ignored (one latent draw per cell); kept for scvi-tools' interface.

        Returns
        -------
        dict
            ``qz`` (the product-of-experts Normal), ``z`` (a draw from it), ``library`` (log
            library of the primary modality) and ``observed`` (per modality, per cell).
        """
        primary = self.names[0]
        observed = self.observed(x)
        if encoder_mask is not None:
            visible = {name: observed[name] & encoder_mask[name].bool() for name in self.names}
        else:
            visible = dict(observed)
            if self.training and self.modality_dropout > 0:
                visible = self._drop_modalities(visible)
        if use_modalities is not None:
            visible = {
                name: v if name in use_modalities else torch.zeros_like(v)
                for name, v in visible.items()
            }
        cont = cont_covs
        cats = [batch_index] + (
            list(torch.split(cat_covs, 1, dim=1)) if cat_covs is not None else []
        )
        precision = torch.ones(x[primary].shape[0], self.n_latent, device=x[primary].device)
        weighted = torch.zeros_like(precision)
        for name in self.names:
            if use_modalities is not None and name not in use_modalities:
                continue
            # run each expert on the cells that measured its modality only: zero rows of
            # unmeasured cells would otherwise enter its batch-norm statistics
            rows = torch.nonzero(observed[name]).squeeze(-1)
            if rows.numel() == 0 or (self.training and rows.numel() < 2):
                continue  # (batch norm needs two cells in training)
            inp = self._input(name, x[name][rows])
            if cont is not None:
                inp = torch.cat([inp, cont[rows]], dim=-1)
            mean, logvar = self.encoders[name](inp, *(c[rows] for c in cats))
            w = visible[name][rows].float()[:, None] * torch.exp(-logvar)
            precision = precision.index_add(0, rows, w)
            weighted = weighted.index_add(0, rows, w * mean)
        qz = Normal(weighted / precision, precision.rsqrt())
        z = qz.rsample()
        library = torch.log(x[primary].sum(-1, keepdim=True).clamp_min(1.0))
        return {"qz": qz, "z": z, "library": library, "observed": observed}

    def _drop_modalities(self, visible: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hide one measured modality from the encoder for a random fraction of cells."""
        stacked = torch.stack([visible[name] for name in self.names], dim=1)  # (n, M)
        n = stacked.shape[0]
        eligible = stacked.sum(1) >= 2
        drop = eligible & (torch.rand(n, device=stacked.device) < self.modality_dropout)
        # choose uniformly among the measured modalities of each cell
        scores = torch.rand(stacked.shape, device=stacked.device).masked_fill(~stacked, -1.0)
        which = scores.argmax(1)
        hide = torch.zeros_like(stacked)
        hide[torch.arange(n, device=stacked.device), which] = True
        stacked = stacked & ~(hide & drop[:, None])
        return {name: stacked[:, i] for i, name in enumerate(self.names)}

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> dict:
        """Likelihood of every modality at ``z``.

        Returns
        -------
        dict
            ``{"px": {modality: distribution}}``; the primary modality's mean scales with
            ``library`` (log), the others do not depend on it.
        """
        cats = [batch_index] + (
            list(torch.split(cat_covs, 1, dim=1)) if cat_covs is not None else []
        )
        cont = [cont_covs] if cont_covs is not None else []
        zin = torch.cat([z, *cont], dim=-1)
        return {
            "px": {
                name: self.decoders[name](zin, library, batch_index, *cats) for name in self.names
            }
        }

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Negative ELBO: reconstruction of each measured modality plus the latent KL."""
        x = self._get_inference_input(tensors)["x"]
        observed = inference_outputs["observed"]
        px = generative_outputs["px"]
        reconstruction = {}
        extra = {}
        for name in self.names:
            target = x[name].to(inference_outputs["z"].device)
            if self.likelihoods[name] == "bernoulli":
                target = (target > 0).float()
            measured = observed[name].float()
            nll = -px[name].log_prob(target).sum(-1) * measured
            reconstruction[f"reconstruction_loss_{name}"] = nll
            # per cell that measured the modality: cells without it would dilute the mean
            extra[f"nll_{name}"] = (nll.sum() / measured.sum().clamp_min(1.0)).detach()
        # what early stopping of a multi-modal VAE watches: the modalities after the first
        extra["nll_secondary"] = sum(extra[f"nll_{name}"] for name in self.names[1:])
        qz = inference_outputs["qz"]
        kl = kl_divergence(qz, Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale))).sum(-1)
        total = sum(reconstruction.values())
        return LossOutput(
            loss=torch.mean(total + kl_weight * kl),
            reconstruction_loss=reconstruction,
            kl_local={"kl_divergence_z": kl},
            extra_metrics=extra,
        )
