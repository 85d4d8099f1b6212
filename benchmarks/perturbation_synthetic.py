"""Unseen combinations and unseen perturbations on synthetic data with a known truth.

Data: :func:`latentcell.datasets.synthetic_perturbation` with single perturbations A-F and
pairs; a pair's true log-fold change is the sum of its components' (scaled per cell type).

- Unseen combinations: controls, all singles and the pairs A+B, C+D, E+F are trained on;
  A+C, B+D, C+E and D+F are held out and predicted from control cells. Baseline: additive,
  the held-out controls' log1p(CP10k) plus the sum of the singles' mean shifts (from the
  training cells, per cell type), the rule that matches or beats deep models on unseen
  combinations in Ahlmann-Eltze et al. (2025). Here the truth is additive by construction,
  so the baseline is the right model and this measures how close latentcell gets to it.
- Unseen perturbations: a second dataset whose twelve singles act through six shared gene
  programs (``synthetic_perturbation(n_programs=6)``: each single is a signed combination of
  two programs), so what a held-out perturbation does can be learned from the others. The
  embeddings (``perturbation_embeddings``) are the singles' program weights plus noise (sd
  0.1), what a user would know as pathway membership. Three singles are never seen in
  training and are predicted from their embeddings. Baselines: the effect of the training
  single with the nearest embedding, and a linear map from embedding to effect (ridge
  regression of the training singles' mean shifts on their embeddings, per cell type), the
  right model for this truth, which is linear in the weights.

latentcell is shown with both perturbation flows on the same VAE: the plain flow
(``perturbation_residual=False``) and the residual flow (the default: a learned correction
to a linear map from the perturbation vector to a latent shift, fitted by least squares on
the training cells; with embeddings, that linear map extends to perturbations never seen).

Scores (:func:`latentcell.metrics.score_perturbation` against the true cells of the held-out
condition): R^2 of mean expression over all genes and the top-20 DE genes, Pearson of the
predicted vs true change, energy distance.

Usage: ``python benchmarks/perturbation_synthetic.py [--seed 0]``; writes
``results/perturbation_synthetic.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import add_device_arguments, resolve_accelerator, write_results

SINGLES = ("A", "B", "C", "D", "E", "F")
TRAIN_PAIRS = ("A+B", "C+D", "E+F")
HELD_PAIRS = ("A+C", "B+D", "C+E", "D+F")
PROGRAM_SINGLES = tuple(f"P{i:02d}" for i in range(12))
UNSEEN_SINGLES = ("P09", "P10", "P11")
K = 20
SCORES = ("r2_pearson_all", f"r2_pearson_top{K}", "delta_pearson_all", "energy")


def _log_norm(x) -> np.ndarray:
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def _shifted(control: ad.AnnData, shift: np.ndarray) -> ad.AnnData:
    """Control cells moved by a per-cell log-expression shift (rows of ``shift``)."""
    pred = np.expm1(np.clip(_log_norm(control.X) + shift, 0, None))
    return ad.AnnData(X=pred.astype(np.float32), obs=control.obs.copy(), var=control.var.copy())


def _mean_shift(train: ad.AnnData, perturbation: str, cell_type: str) -> np.ndarray:
    sub = train[train.obs["cell_type"] == cell_type]
    pert = sub[sub.obs["condition"] == perturbation]
    ctrl = sub[sub.obs["condition"] == "ctrl"]
    return _log_norm(pert.X).mean(0) - _log_norm(ctrl.X).mean(0)


def _score(pred, truth, control, seed):
    import latentcell as lc

    s = lc.metrics.score_perturbation(pred, truth, control, k=K, seed=seed)
    return {k: float(s[k]) for k in SCORES}


def _fit(train, accelerator, seed, **setup):
    import scvi

    import latentcell as lc

    scvi.settings.seed = seed
    lc.LatentDiffusionModel.setup_anndata(
        train,
        layer="counts",
        labels_key="cell_type",
        batch_key="batch",
        perturbation_key="condition",
        control_value="ctrl",
        **setup,
    )
    model = lc.LatentDiffusionModel(train, perturbation_residual=False)  # the plain flow first
    common = dict(accelerator=accelerator, enable_progress_bar=False, devices=1)
    model.train(stage="vae", **common)
    model.train(stage="perturbation", **common)
    return model


def _with_residual_flow(model, accelerator):
    """The same VAE with the perturbation flow retrained as a residual on a linear shift."""
    from latentcell.module import PerturbationFlow

    model._perturbation_kwargs["residual"] = True
    model.module.perturbation_flow = PerturbationFlow(**model._perturbation_kwargs)
    model.train(stage="perturbation", accelerator=accelerator, enable_progress_bar=False, devices=1)
    return model


def _controls(train, cell_type):
    """Positions of the training controls of a cell type."""
    return np.flatnonzero(
        ((train.obs["condition"] == "ctrl") & (train.obs["cell_type"] == cell_type)).to_numpy()
    )


def _predictions(model, adata, train, held, seed) -> dict:
    """latentcell's prediction of every held-out perturbation from each type's controls."""
    return {
        (pert, ct): model.predict_perturbation(
            indices=_controls(train, ct), perturbation=pert, seed=seed, progress_bar=False
        )
        for pert in held
        for ct in sorted(adata.obs["cell_type"].unique())
    }


def _evaluate(model, adata, train, held, baselines: dict, seed, accelerator) -> dict:
    """Score the baselines and latentcell's plain and residual flows per perturbation and type.

    ``model`` holds the plain flow; its perturbation flow is then retrained as a residual one
    on the same VAE (:func:`_with_residual_flow`).
    """
    plain = _predictions(model, adata, train, held, seed)
    residual = _predictions(_with_residual_flow(model, accelerator), adata, train, held, seed)
    out = {}
    for pert, ct in plain:
        truth = adata[(adata.obs["condition"] == pert) & (adata.obs["cell_type"] == ct)].copy()
        control = train[_controls(train, ct)].copy()
        row = {"control as prediction": _score(control, truth, control, seed)}
        for name, fn in baselines.items():
            row[name] = _score(fn(pert, ct, control), truth, control, seed)
        row["latentcell, plain flow"] = _score(plain[pert, ct], truth, control, seed)
        row["latentcell, residual flow (default)"] = _score(
            residual[pert, ct], truth, control, seed
        )
        out[f"{pert} | {ct}"] = row
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-cells", type=int, default=6000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    accelerator = resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import latentcell as lc

    adata = lc.datasets.synthetic_perturbation(
        n_cells=args.n_cells,
        n_genes=200,
        perturbations=SINGLES + TRAIN_PAIRS + HELD_PAIRS,
        seed=args.seed,
    )
    results = {"protocol": __doc__, "seed": args.seed}

    # ---- unseen combinations
    train = adata[~adata.obs["condition"].isin(HELD_PAIRS).to_numpy()].copy()
    model = _fit(train, accelerator, args.seed)

    def additive(pert, ct, control):
        shift = sum(_mean_shift(train, p, ct) for p in pert.split("+"))
        return _shifted(control, shift)

    results["unseen_combinations"] = _evaluate(
        model,
        adata,
        train,
        HELD_PAIRS,
        {"additive (sum of single shifts)": additive},
        args.seed,
        accelerator,
    )

    # ---- unseen single perturbations, through embeddings of shared programs
    adata_e = lc.datasets.synthetic_perturbation(
        n_cells=args.n_cells,
        n_genes=200,
        perturbations=PROGRAM_SINGLES,
        n_programs=6,
        seed=args.seed,
    )
    truth = adata_e.uns["ground_truth"]
    rng = np.random.default_rng(args.seed)
    weights = np.asarray(truth["program_weights"])
    embeddings = pd.DataFrame(
        weights + rng.normal(scale=0.1, size=weights.shape), index=truth["singles"]
    )
    seen = [s for s in PROGRAM_SINGLES if s not in UNSEEN_SINGLES]
    keep = adata_e.obs["condition"].isin(("ctrl", *seen))
    train_e = adata_e[keep.to_numpy()].copy()
    model_e = _fit(train_e, accelerator, args.seed, perturbation_embeddings=embeddings)
    seen_emb = embeddings.loc[seen].to_numpy()

    def nearest_embedding(pert, ct, control):
        dists = np.linalg.norm(seen_emb - embeddings.loc[pert].to_numpy(), axis=1)
        return _shifted(control, _mean_shift(train_e, seen[int(np.argmin(dists))], ct))

    def linear_map(pert, ct, control):
        shifts = np.stack([_mean_shift(train_e, s, ct) for s in seen])
        gram = seen_emb.T @ seen_emb + 1e-2 * np.eye(seen_emb.shape[1])
        coef = np.linalg.solve(gram, seen_emb.T @ shifts)  # embedding -> shift
        return _shifted(control, embeddings.loc[pert].to_numpy() @ coef)

    results["unseen_perturbation"] = _evaluate(
        model_e,
        adata_e,
        train_e,
        UNSEEN_SINGLES,
        {"nearest embedding": nearest_embedding, "linear map from embedding": linear_map},
        args.seed,
        accelerator,
    )

    table = markdown(results)
    print(table)
    write_results(args.out, "perturbation_synthetic", results, table)
    return results


def markdown(results: dict) -> str:
    lines = []
    for task in ("unseen_combinations", "unseen_perturbation"):
        rows = results[task]
        lines += [
            f"**{task.replace('_', ' ')}** (mean over {len(rows)} perturbation x cell type)",
            "",
            f"| prediction | R² all | R² top-{K} DE | Δ Pearson | energy |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in next(iter(rows.values())):
            m = {k: np.nanmean([r[name][k] for r in rows.values()]) for k in SCORES}
            lines.append(
                f"| {name} | {m['r2_pearson_all']:.3f} | {m[f'r2_pearson_top{K}']:.3f} | "
                f"{m['delta_pearson_all']:.3f} | {m['energy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
