"""Unseen combinations and unseen perturbations on synthetic data with a known truth.

Data: :func:`latentcell.datasets.synthetic_perturbation` with single perturbations A-F and
pairs; a pair's true log-fold change is the sum of its components' (scaled per cell type).

- Unseen combinations: controls, all singles and the pairs A+B, C+D, E+F are trained on;
  A+C, B+D, C+E and D+F are held out and predicted from control cells. Baseline: additive,
  the held-out controls' log1p(CP10k) plus the sum of the singles' mean shifts (from the
  training cells, per cell type), the rule that matches or beats deep models on unseen
  combinations in Ahlmann-Eltze et al. (2025). Here the truth is additive by construction,
  so the baseline is the right model and this measures how close latentcell gets to it.
- Unseen perturbations: with ``perturbation_embeddings`` (each single's vector is a noisy
  random projection of its true log-fold change, so similar embeddings mean similar
  effects), single E is never seen in training and is predicted from its embedding.
  Baseline: the effect of the training single with the nearest embedding.

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
UNSEEN_SINGLE = "E"
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
    model = lc.LatentDiffusionModel(train)
    common = dict(accelerator=accelerator, enable_progress_bar=False, devices=1)
    model.train(stage="vae", **common)
    model.train(stage="perturbation", **common)
    return model


def _evaluate(model, adata, train, held, baseline_fn, seed) -> dict:
    """Score latentcell and a baseline on each held-out perturbation, per cell type."""
    out = {}
    for pert in held:
        for ct in sorted(adata.obs["cell_type"].unique()):
            truth = adata[(adata.obs["condition"] == pert) & (adata.obs["cell_type"] == ct)]
            src = np.flatnonzero(
                ((train.obs["condition"] == "ctrl") & (train.obs["cell_type"] == ct)).to_numpy()
            )
            control = train[src].copy()
            pred = model.predict_perturbation(
                indices=src, perturbation=pert, seed=seed, progress_bar=False
            )
            out[f"{pert} | {ct}"] = {
                "latentcell": _score(pred, truth.copy(), control, seed),
                "baseline": _score(baseline_fn(pert, ct, control), truth.copy(), control, seed),
                "control as prediction": _score(control, truth.copy(), control, seed),
            }
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

    results["unseen_combinations"] = _evaluate(model, adata, train, HELD_PAIRS, additive, args.seed)

    # ---- unseen single perturbation, through embeddings
    truth = adata.uns["ground_truth"]
    rng = np.random.default_rng(args.seed)
    projection = rng.normal(size=(truth["log_fold_changes"].shape[1], 16)) / 4.0
    vectors = truth["log_fold_changes"] @ projection
    vectors += rng.normal(scale=0.1 * vectors.std(), size=vectors.shape)
    embeddings = pd.DataFrame(vectors, index=truth["singles"])
    keep = adata.obs["condition"].isin(("ctrl", *[s for s in SINGLES if s != UNSEEN_SINGLE]))
    train_e = adata[keep.to_numpy()].copy()
    model_e = _fit(train_e, accelerator, args.seed, perturbation_embeddings=embeddings)
    seen = [s for s in SINGLES if s != UNSEEN_SINGLE]
    dists = np.linalg.norm(
        embeddings.loc[seen].to_numpy() - embeddings.loc[UNSEEN_SINGLE].to_numpy(), axis=1
    )
    nearest = seen[int(np.argmin(dists))]

    def nearest_embedding(pert, ct, control):
        return _shifted(control, _mean_shift(train_e, nearest, ct))

    results["unseen_perturbation"] = _evaluate(
        model_e, adata, train_e, (UNSEEN_SINGLE,), nearest_embedding, args.seed
    )
    results["unseen_perturbation_nearest"] = nearest

    table = markdown(results)
    print(table)
    write_results(args.out, "perturbation_synthetic", results, table)
    return results


def markdown(results: dict) -> str:
    lines = []
    for task, baseline in (
        ("unseen_combinations", "additive (sum of single shifts)"),
        ("unseen_perturbation", f"nearest embedding ({results['unseen_perturbation_nearest']})"),
    ):
        rows = results[task]
        lines += [
            f"**{task.replace('_', ' ')}** (mean over {len(rows)} perturbation x cell type)",
            "",
            f"| prediction | R² all | R² top-{K} DE | Δ Pearson | energy |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, label in (
            ("control as prediction", "control as prediction"),
            ("baseline", baseline),
            ("latentcell", "latentcell"),
        ):
            m = {k: np.nanmean([r[name][k] for r in rows.values()]) for k in SCORES}
            lines.append(
                f"| {label} | {m['r2_pearson_all']:.3f} | {m[f'r2_pearson_top{K}']:.3f} | "
                f"{m['delta_pearson_all']:.3f} | {m['energy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
