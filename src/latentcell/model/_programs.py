"""Gene programs: registration, the activity score, and program conditions for sampling.

Activity convention (documented so users can score their own sets the same way): for a cell,
``log1p(CP10k)`` expression, each gene standardised by its mean and standard deviation over
the training cells (a z-score), averaged over the program's genes. It is
``scanpy.tl.score_genes``' mean-over-the-set idea on z-scored genes, without the random
control-gene subtraction (which would make the score depend on a draw): a score of 0 is the
training average, 1 is one (gene-level) standard deviation above it.

What the flow is conditioned on: a score computed from one cell's counts is noisy (a few
counts per gene; within a cell type its split-half reliability can be as low as 0.5), and a
generator conditioned on a noisy variable regresses toward the mean when asked for an
extreme (regression dilution: asked for the top decile of *observed* scores, it returns cells
whose observed scores fall well short of it). So the flow is conditioned on each cell's
*expected* activity instead: the expectation of the same score under the VAE's likelihood at
the cell's posterior-mean latent, with its own library and covariates (summed over each
gene's count distribution, no random draws; ``get_program_scores(expected=True)``). It is in
the same units as the observed score, and generated cells asked for a level have observed
scores that average to that level. ``"high"`` / ``"low"`` are percentiles of the expected
activity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

from latentcell.model._validation import row_blocks

#: Percentiles of the training activity that ``"high"`` and ``"low"`` ask for.
LEVELS = {"high": 90.0, "low": 10.0}
#: Fewest training cells of a label for its own percentiles; rarer labels use all cells'.
MIN_LABEL_CELLS = 20
#: Points of each gene's count distribution summed over for the expected activity.
N_GRID = 256


def activity_levels(activity: np.ndarray, names: Sequence[str]) -> dict:
    """``{program: {"high": p90, "low": p10}}`` of activities ``(n_cells, n_programs)``."""
    return {
        name: {level: float(np.percentile(activity[:, j], q)) for level, q in LEVELS.items()}
        for j, name in enumerate(names)
    }


def check_programs(
    adata: AnnData, gene_programs: Mapping[str, Sequence[str]] | str | None
) -> dict[str, list[str]] | None:
    """Resolve ``gene_programs`` to ``{name: [genes present in adata.var_names]}``.

    Accepts a dict of gene lists or the key of a binary genes x programs matrix in
    ``adata.varm`` (a DataFrame names the programs by its columns; an array gets
    ``program_0``, ``program_1``, ...). Genes missing from ``var_names`` are dropped with a
    warning; a program with none left, or an empty or malformed definition, is an error.
    """
    if gene_programs is None:
        return None
    if isinstance(gene_programs, str):
        if gene_programs not in adata.varm:
            raise ValueError(
                f"gene_programs={gene_programs!r} is not a key of adata.varm "
                f"(keys: {list(adata.varm)}); pass a dict {{name: [genes]}} or a varm key."
            )
        matrix = adata.varm[gene_programs]
        names = (
            [str(c) for c in matrix.columns]
            if isinstance(matrix, pd.DataFrame)
            else [f"program_{i}" for i in range(np.asarray(matrix).shape[1])]
        )
        values = np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(
                f"adata.varm[{gene_programs!r}] must be binary (1 = the gene is in the program)."
            )
        gene_programs = {
            name: list(adata.var_names[values[:, j] > 0]) for j, name in enumerate(names)
        }
    if not isinstance(gene_programs, Mapping) or not gene_programs:
        raise ValueError("gene_programs must be a non-empty dict {name: [genes]} or a varm key.")
    known = set(adata.var_names)
    out, missing = {}, {}
    for name, genes in gene_programs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Program names must be non-empty strings, got {name!r}.")
        if isinstance(genes, str) or not isinstance(genes, Sequence | np.ndarray | pd.Index):
            raise ValueError(f"Program {name!r} must be a list of gene names, got {genes!r}.")
        genes = [str(g) for g in genes]
        present = list(dict.fromkeys(g for g in genes if g in known))
        if len(present) < len(genes):
            missing[name] = [g for g in genes if g not in known]
        if not present:
            raise ValueError(
                f"None of the genes of program {name!r} is in adata.var_names "
                f"(e.g. {genes[:5]}); check the gene identifiers (symbols vs Ensembl IDs)."
            )
        out[name] = present
    if missing:
        text = "; ".join(
            f"{k}: {v[:5]}" + ("..." if len(v) > 5 else "") for k, v in missing.items()
        )
        warnings.warn(
            f"Genes not in adata.var_names were left out of the programs ({text}).", stacklevel=3
        )
    return out


def _log_norm_block(block, columns: np.ndarray) -> np.ndarray:
    """log1p(CP10k) of ``columns`` of a block of cells (library over all genes)."""
    library = np.asarray(block.sum(axis=1), dtype=np.float64).reshape(-1, 1)
    sub = block[:, columns]
    sub = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    return np.log1p(sub / np.maximum(library, 1e-12) * 1e4)


def program_gene_stats(x, n_obs: int, programs: Mapping[str, Sequence[str]], var_names) -> dict:
    """Mean and standard deviation of each program gene's log1p(CP10k) over the cells of ``x``.

    ``x`` (in memory or backed) is read block by block.
    """
    genes = list(dict.fromkeys(g for gs in programs.values() for g in gs))
    index = pd.Index(np.asarray(var_names).astype(str)).get_indexer(genes)
    total = np.zeros(len(genes))
    total_sq = np.zeros(len(genes))
    for block in row_blocks(x, n_obs):
        ln = _log_norm_block(block, index)
        total += ln.sum(0)
        total_sq += (ln**2).sum(0)
    mean = total / n_obs
    sd = np.sqrt(np.maximum(total_sq / n_obs - mean**2, 0.0))
    return {"genes": genes, "mean": mean.tolist(), "sd": np.maximum(sd, 1e-3).tolist()}


def program_activity(
    x, n_obs: int, programs: Mapping[str, Sequence[str]], stats: Mapping, var_names
) -> np.ndarray:
    """Activity ``(n_obs, n_programs)`` of every cell of ``x`` (see the module docstring)."""
    genes = list(stats["genes"])
    index = pd.Index(np.asarray(var_names).astype(str)).get_indexer(genes)
    if (index < 0).any():
        lost = [g for g, i in zip(genes, index, strict=True) if i < 0]
        raise ValueError(
            f"The data lack program genes {lost[:5]}; score data with the model's genes."
        )
    mean, sd = np.asarray(stats["mean"]), np.asarray(stats["sd"])
    position = {g: i for i, g in enumerate(genes)}
    members = [np.array([position[g] for g in gs]) for gs in programs.values()]
    out = []
    for block in row_blocks(x, n_obs):
        z = (_log_norm_block(block, index) - mean) / sd
        out.append(np.stack([z[:, m].mean(1) for m in members], axis=1))
    if not out:
        return np.zeros((0, len(members)), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def expected_activity(
    px, columns: torch.Tensor, library: torch.Tensor, stats: Mapping, members
) -> torch.Tensor:
    """Return the expected activity ``(cells, programs)`` under a decoder likelihood.

    The score is a mean of per-gene terms ``(log1p(1e4 * k / library) - mean) / sd``, so its
    expectation is the mean of the genes' expected terms. Each gene's expectation is a sum
    over its count distribution, in float64, from ``mean - 8 sd`` (at least 0) to
    ``mean + 12 sd``: the first ``N_GRID / 2`` counts one by one (where the logarithm moves
    fastest), the rest of the range in equal blocks at their midpoints, weighted by their
    width (the midpoint rule; exact when the range is narrower than ``N_GRID`` counts). No
    random draws: a cell's value does not depend on the other cells.

    Parameters
    ----------
    px
        The decoder's distribution over all genes (scvi-tools ``NegativeBinomial``,
        ``ZeroInflatedNegativeBinomial`` or ``Poisson``), one row per cell.
    columns
        Positions of ``stats["genes"]`` among the decoder's genes.
    library
        Each cell's library size (the CP10k denominator of the observed score).
    stats
        The genes' training mean and standard deviation (:func:`program_gene_stats`).
    members
        Per program, the positions of its genes in ``stats["genes"]``.
    """
    from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

    if isinstance(px, NegativeBinomial):
        rate = px.mu  # a zero-inflated distribution's `mean` includes the zeros
    elif isinstance(px, torch.distributions.Poisson):
        rate = px.rate
    else:
        raise TypeError(f"No expected program activity for a {type(px).__name__} likelihood.")

    def take(t):  # the program genes, in float64 on the CPU (which every backend can give)
        return t.expand_as(rate)[:, columns.to(t.device)].double().cpu()

    mu = take(rate).clamp_min(1e-8)
    theta, zero_inflation = None, None
    sd = torch.sqrt(mu)
    if isinstance(px, NegativeBinomial):
        theta = take(px.theta).clamp_min(1e-8)
        sd = torch.sqrt(mu + mu**2 / theta)
        if isinstance(px, ZeroInflatedNegativeBinomial):
            zero_inflation = take(px.zi_probs)
    # the first half of the grid: every count from `low`, where the score moves fastest;
    # the second: blocks of `step` counts up to mean + 12 sd, each at its midpoint
    half = N_GRID // 2
    low = torch.floor(torch.clamp_min(mu - 8 * sd, 0.0))[..., None]
    step = torch.clamp_min(torch.ceil((mu + 12 * sd - low[..., 0] - half) / half), 1.0)[..., None]
    j = torch.arange(N_GRID, dtype=mu.dtype)
    k = low + torch.where(j < half, j, half + (j - half) * step + (step - 1) / 2)
    width = torch.where(j < half, torch.ones_like(k), step.expand_as(k))
    m = mu[..., None]
    if theta is None:
        log_pmf = k * torch.log(m) - m - torch.lgamma(k + 1)
    else:
        t = theta[..., None]
        log_pmf = (
            torch.lgamma(k + t)
            - torch.lgamma(t)
            - torch.lgamma(k + 1)
            + t * torch.log(t / (t + m))
            + k * torch.log(m / (t + m))
        )
    weight = torch.softmax(log_pmf + torch.log(width), dim=-1)  # renormalised
    gene_mean = torch.as_tensor(stats["mean"], dtype=mu.dtype, device=mu.device)
    gene_sd = torch.as_tensor(stats["sd"], dtype=mu.dtype, device=mu.device)

    def term(counts):
        scaled = torch.log1p(counts / library.double().cpu()[:, None, None] * 1e4)
        return (scaled - gene_mean[:, None]) / gene_sd[:, None]

    expected = (weight * term(k)).sum(-1)
    if zero_inflation is not None:
        at_zero = term(torch.zeros_like(k[..., :1]))[..., 0]
        expected = zero_inflation * at_zero + (1 - zero_inflation) * expected
    return torch.stack([expected[:, m].mean(-1) for m in members], dim=-1).float()


def requested_levels(
    request: Mapping,
    n: int,
    names: Sequence[str],
    levels: Mapping[str, Mapping[str, float]],
    labels: Sequence | None = None,
    levels_by_label: Mapping[str, Mapping] | None = None,
) -> np.ndarray:
    """Program activities ``(n, n_programs)`` asked for in ``conditions['programs']``.

    Values are ``"high"`` / ``"low"``, numbers (activity in the module docstring's units) or
    one of these per cell; programs not named stay NaN (unspecified: the flow draws them).
    ``"high"`` / ``"low"`` are the 90th / 10th percentile of the program's activity among
    the training cells of the cell's requested label (``labels``, looked up in
    ``levels_by_label``), so that "high within a cell type" is high for that type; a cell
    without a requested label, or whose label had fewer than ``MIN_LABEL_CELLS`` training
    cells, gets the percentile over all training cells (``levels``).
    """
    if not isinstance(request, Mapping):
        raise ValueError(
            'conditions["programs"] must be a dict {program: "high" | "low" | value}, '
            f"got {type(request).__name__}."
        )
    unknown = [k for k in request if k not in names]
    if unknown:
        raise ValueError(
            f"Unknown program(s) {unknown}; the registered programs are {list(names)}."
        )
    out = np.full((n, len(names)), np.nan, dtype=np.float32)
    for name, value in request.items():
        values = [value] * n if isinstance(value, str) or np.ndim(value) == 0 else list(value)
        if len(values) != n:
            raise ValueError(
                f"Program {name!r} has {len(values)} values for {n} cells; pass one or one "
                f"per cell."
            )
        col = []
        for i, v in enumerate(values):
            if isinstance(v, str):
                if v not in LEVELS:
                    raise ValueError(
                        f"Program level {v!r} of {name!r} is not understood; use 'high', 'low' "
                        f"or a number (activity: mean z-score of the program's genes)."
                    )
                own = (levels_by_label or {}).get(None if labels is None else str(labels[i]))
                col.append((own or levels)[name][v])
            else:
                v = float(v)
                if not np.isfinite(v):
                    raise ValueError(f"Program {name!r} got a non-finite level {v}.")
                col.append(v)
        out[:, names.index(name)] = col
    return out


class ProgramMixin:
    """Gene-program conditioning for :class:`~latentcell.LatentDiffusionModel`."""

    def _program_state(self) -> dict | None:
        """Return the registered programs and their statistics (``None`` without programs).

        The genes' statistics come from the training cells, computed on first use (a loaded
        model brings its saved ones, so loading never recomputes them); the ``"high"`` /
        ``"low"`` levels are added when the flow is trained (:meth:`_program_levels`).
        """
        programs = self.registry_["setup_args"].get("gene_programs")
        if not programs:
            return None
        if not self.program_stats_:
            self.program_stats_ = self._training_gene_stats(programs)
        return {"programs": dict(programs), "names": list(programs), "stats": self.program_stats_}

    def _training_gene_stats(self, programs: Mapping[str, Sequence[str]]) -> dict:
        """Mean and standard deviation of the program genes over the training cells."""
        if self.adata is None:
            raise ValueError("This model holds neither program statistics nor training data.")
        from scvi import REGISTRY_KEYS

        x = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        stats = program_gene_stats(x, self.adata.n_obs, programs, self.var_names_)
        # what the flow is conditioned on; models saved before this key existed were
        # conditioned on the observed score, which they keep using
        stats["conditioning"] = "expected"
        return stats

    def _conditions_on_expected_activity(self) -> bool:
        return self.program_stats_.get("conditioning") == "expected"

    def _set_program_levels(self, activity: np.ndarray) -> None:
        """Store ``"high"`` / ``"low"`` (overall and per label) of the training activity."""
        from scvi import REGISTRY_KEYS

        state = self._program_state()
        stats, names = state["stats"], state["names"]
        stats["levels"] = activity_levels(activity, names)
        stats.pop("levels_by_label", None)
        if self.registry_["setup_args"].get("labels_key") is not None:
            codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY))
            codes = codes.ravel().astype(int)
            labels = self._field_state(REGISTRY_KEYS.LABELS_KEY)["categorical_mapping"]
            stats["levels_by_label"] = {
                str(label): activity_levels(activity[codes == k], names)
                for k, label in enumerate(labels)
                if (codes == k).sum() >= MIN_LABEL_CELLS
            }

    def _program_levels(self) -> dict:
        """Return the program statistics, computing the levels first if they are missing."""
        stats = self._program_state()["stats"]
        if "levels" not in stats:
            self._check_stage("vae", "compute program levels")
            self._set_program_levels(self._registered_codes(self.adata)["programs"])
        return stats

    def _program_codes(
        self, adata: AnnData, x, codes: Mapping[str, np.ndarray], latents=None, indices=None
    ) -> np.ndarray:
        """Return the program activity the flow is conditioned on, for cells of ``adata``.

        The expected activity once the VAE is trained (observed before that, and for models
        saved when the flow read the observed score). ``indices`` are the cells (``None``:
        all); ``codes`` their registered covariates and log library sizes; ``latents`` their
        posterior means, if the caller has them (otherwise they are encoded).
        """
        state = self._program_state()
        n = adata.n_obs if indices is None else len(indices)
        if state is None:
            return np.zeros((n, 0), dtype=np.float32)
        if self._conditions_on_expected_activity() and "vae" in self.trained_stages_:
            return self._expected_program_scores(adata, codes, latents, indices=indices)
        observed = program_activity(
            x, adata.n_obs, state["programs"], state["stats"], self.var_names_
        )
        return observed if indices is None else observed[indices]

    @torch.inference_mode()
    def _expected_program_scores(
        self,
        adata: AnnData,
        codes: Mapping[str, np.ndarray],
        latents: np.ndarray | None = None,
        batch_size: int = 256,
        indices: np.ndarray | None = None,
    ) -> np.ndarray:
        """Return the expected activity ``(cells, programs)`` (see the module docstring).

        ``codes`` and ``latents`` hold one row per cell of ``indices`` (``None``: all cells).
        """
        state = self._program_state()
        stats = state["stats"]
        position = {g: i for i, g in enumerate(self.var_names_)}
        columns = torch.as_tensor([position[g] for g in stats["genes"]])
        within = {g: i for i, g in enumerate(stats["genes"])}
        members = [torch.as_tensor([within[g] for g in gs]) for gs in state["programs"].values()]
        z = (
            self._latent_means(adata, indices=indices, batch_size=1024)
            if latents is None
            else latents
        )
        device = self.module.device
        out = []
        for start in range(0, len(z), batch_size):
            sl = slice(start, start + batch_size)
            px = self._decode(
                torch.as_tensor(z[sl], device=device), {k: v[sl] for k, v in codes.items()}
            )
            library = torch.as_tensor(np.exp(codes["log_library"][sl]))
            out.append(expected_activity(px, columns, library, stats, members))
        if not out:
            return np.zeros((0, len(members)), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32)

    def get_program_scores(
        self, adata: AnnData | None = None, layer: str | None = None, expected: bool = False
    ) -> pd.DataFrame:
        """Activity of every registered gene program in each cell.

        The observed score (see :mod:`latentcell.model._programs`): the mean z-score of the
        program's genes' log1p(CP10k) expression, each gene standardised with the training
        cells' mean and standard deviation. Works on any AnnData with the model's genes, so
        generated cells are scored exactly like real ones. With ``expected=True``, the
        model's noise-free estimate instead: the mean of the same score over counts drawn
        from the VAE at each cell's latent, with its own library and covariates, which is what
        the flow is conditioned on and what numeric program levels in ``sample`` refer to.

        Parameters
        ----------
        adata
            Cells with counts (``None``: the training data). For the observed score they
            need not be registered: generated AnnData (``sample``, ``correct_batch``) work as
            they are. The expected score encodes them, so they need the registered fields
            (a query AnnData is registered as in every scvi-tools query method).
        layer
            Layer holding the counts; ``None`` uses ``adata.X`` (for the training data, the
            registered counts). Observed score only: the expected one reads the registered
            counts.
        expected
            Return the expected activity (needs a trained VAE) instead of the observed one.

        Returns
        -------
        pandas.DataFrame
            DataFrame (cells x programs), indexed by ``adata.obs_names``.
        """
        state = self._program_state()
        if state is None:
            raise ValueError(
                "This model has no gene programs; set up the AnnData with gene_programs=..."
            )
        if expected:
            if layer is not None:
                raise ValueError(
                    "layer= applies to the observed score; the expected score reads the "
                    "counts registered in setup_anndata."
                )
            self._check_stage("vae", "compute expected program scores")
            adata = self._validate_anndata(adata)
            codes = self._registered_codes(adata, programs=False)
            scores = self._expected_program_scores(adata, codes)
            return pd.DataFrame(scores, index=adata.obs_names.copy(), columns=state["names"])
        if adata is None:
            if self.adata is None:
                raise ValueError("This model holds no AnnData; pass adata=...")
            from scvi import REGISTRY_KEYS

            adata, x = self.adata, self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        else:
            x = adata.X if layer is None else adata.layers[layer]
        scores = program_activity(
            x, adata.n_obs, state["programs"], state["stats"], adata.var_names
        )
        return pd.DataFrame(scores, index=adata.obs_names.copy(), columns=state["names"])


__all__ = [
    "LEVELS",
    "MIN_LABEL_CELLS",
    "N_GRID",
    "ProgramMixin",
    "check_programs",
    "expected_activity",
    "program_activity",
    "program_gene_stats",
]
