"""Gene programs: registration, the activity score, and program conditions for sampling.

Activity convention (documented so users can score their own sets the same way): for a cell,
``log1p(CP10k)`` expression, each gene standardised by its mean and standard deviation over
the training cells (a z-score), averaged over the program's genes. It is
``scanpy.tl.score_genes``' mean-over-the-set idea on z-scored genes, without the random
control-gene subtraction (which would make the score depend on a draw): a score of 0 is the
training average, 1 is one (gene-level) standard deviation above it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from latentcell.model._validation import row_blocks

#: Percentiles of the training activity that ``"high"`` and ``"low"`` ask for.
LEVELS = {"high": 90.0, "low": 10.0}
#: Fewest training cells of a label for its own percentiles; rarer labels use all cells'.
MIN_LABEL_CELLS = 20


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

        The statistics come from the training cells, computed on first use (a loaded model
        brings its saved ones, so loading never recomputes them).
        """
        programs = self.registry_["setup_args"].get("gene_programs")
        if not programs:
            return None
        if not self.program_stats_:
            self.program_stats_ = self._training_program_stats(programs)
        return {"programs": dict(programs), "names": list(programs), "stats": self.program_stats_}

    def _training_program_stats(self, programs: Mapping[str, Sequence[str]]) -> dict:
        """Gene statistics and activity percentiles of the training cells."""
        if self.adata is None:
            raise ValueError("This model holds neither program statistics nor training data.")
        from scvi import REGISTRY_KEYS

        x = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        n = self.adata.n_obs
        stats = program_gene_stats(x, n, programs, self.var_names_)
        activity = program_activity(x, n, programs, stats, self.var_names_)
        stats["levels"] = activity_levels(activity, list(programs))
        labels_key = self.registry_["setup_args"].get("labels_key")
        if labels_key is not None:
            codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY))
            names = self._field_state(REGISTRY_KEYS.LABELS_KEY)["categorical_mapping"]
            codes = codes.ravel().astype(int)
            stats["levels_by_label"] = {
                str(label): activity_levels(activity[codes == k], list(programs))
                for k, label in enumerate(names)
                if (codes == k).sum() >= MIN_LABEL_CELLS
            }
        return stats

    def _program_codes(self, x, n_obs: int) -> np.ndarray:
        state = self._program_state()
        if state is None:
            return np.zeros((n_obs, 0), dtype=np.float32)
        return program_activity(x, n_obs, state["programs"], state["stats"], self.var_names_)

    def get_program_scores(
        self, adata: AnnData | None = None, layer: str | None = None
    ) -> pd.DataFrame:
        """Activity of every registered gene program in each cell.

        The score the flow is conditioned on (see :mod:`latentcell.model._programs`): the
        mean z-score of the program's genes' log1p(CP10k) expression, each gene standardised
        with the training cells' mean and standard deviation. Works on any AnnData with the
        model's genes, so generated cells are scored exactly like real ones.

        Parameters
        ----------
        adata
            Cells with counts (``None``: the training data). They need not be registered:
            generated AnnData (``sample``, ``correct_batch``) work as they are.
        layer
            Layer holding the counts; ``None`` uses ``adata.X`` (for the training data, the
            registered counts).

        Returns
        -------
        DataFrame (cells x programs), indexed by ``adata.obs_names``.
        """
        state = self._program_state()
        if state is None:
            raise ValueError(
                "This model has no gene programs; set up the AnnData with gene_programs=..."
            )
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
    "ProgramMixin",
    "check_programs",
    "program_activity",
    "program_gene_stats",
]
