"""Imputing an unmeasured tissue region: Xenium mouse brain and ST olfactory bulb.

Protocol (issue #6). A contiguous region is masked: the cells nearest to a random centre
(drawn per seed among cells in the middle 60% of the tissue's extent), 10% of the cells for
Xenium, 20% of the spots for the olfactory bulb. latentcell (``setup_anndata(spatial_key=
"spatial")``) is trained on the other cells and fills the region with
``impute_region(mask, adata=full)``: one generated cell at each masked cell's position, given
its position and the neighbourhood of observed cells around it (Euler solver, 50 steps).

Rows, all from this run, on the same mask, one cell per masked cell:
- latentcell: ``impute_region`` (position + neighbourhood summary);
- latentcell, position only: the same model, ``use_neighbourhood=False``;
- unconditional: ``model.sample(n)`` with no condition (i.i.d. cells, placed at the masked
  positions);
- spatial kNN: for each masked position, the average counts of its k nearest observed cells
  (k = 15 for Xenium, 6 for the bulb's spot grid);
- nearest observed cell: the counts of the single nearest observed cell (a real cell);
- real-vs-real null (energy): two random halves of the masked cells.

Scores on the masked cells:
- per-gene Pearson correlation of spatially smoothed log1p(CP10k) expression
  (:func:`latentcell.metrics.smoothed_gene_correlation`, 10 neighbours), mean over genes; for
  latentcell also on its decoded means (``layers["latentcell_mean"]``, a point estimate)
  instead of the sampled counts;
- energy distance and kNN two-sample accuracy in the evaluation space fit on the masked truth
  (:func:`latentcell.metrics.evaluate_generation`);
- olfactory bulb only: layer accuracy, a logistic regression on the PCA of the observed spots'
  log1p(CP10k) (fit on observed spots and their annotated layer) predicting the layer of each
  imputed spot, against the true layer at that position; the same classifier on the real
  masked spots is the ceiling.

Usage: ``python benchmarks/spatial_imputation.py [--dataset xenium olfactory_bulb]
[--seeds 0 1 2] [--device cpu|cuda] [--quick]``. Writes ``results/spatial_imputation.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import DATA_DIR, add_device_arguments, resolve_accelerator, write_results

FILES = {
    "xenium": "xenium_mouse_brain_small_36602cells.h5ad",
    "olfactory_bulb": "st_mouse_olfactory_bulb_stahl2016_262spots.h5ad",
}
SETTINGS = {  # masked fraction, spatial-kNN k
    "xenium": (0.10, 15),
    "olfactory_bulb": (0.20, 6),
}
MEAN_LAYER = "latentcell_mean"
ROWS = (
    "latentcell",
    "latentcell, position only",
    "unconditional",
    "spatial kNN",
    "nearest observed cell",
)


def load(name: str) -> ad.AnnData:
    adata = ad.read_h5ad(DATA_DIR / "spatial" / FILES[name])
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32)
    adata.obs_names_make_unique()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()  # Xenium: 49 empty cells
    if "layer" in adata.obs:  # the olfactory bulb: 2 of 262 spots carry no layer
        adata = adata[adata.obs["layer"].notna()].copy()
    return adata


def region_mask(coords: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The ``fraction`` of cells nearest to a random centre in the middle of the tissue."""
    lo, hi = np.quantile(coords, [0.2, 0.8], axis=0)
    inner = np.flatnonzero(((coords >= lo) & (coords <= hi)).all(axis=1))
    center = coords[rng.choice(inner)]
    n = round(fraction * len(coords))
    _, idx = cKDTree(coords).query(center, k=n)
    mask = np.zeros(len(coords), dtype=bool)
    mask[idx] = True
    return mask


def select_genes(adata: ad.AnnData, observed: np.ndarray, n: int = 2000) -> ad.AnnData:
    """The ``n`` most variable genes of the observed cells (all genes if fewer)."""
    import scanpy as sc

    if adata.n_vars <= n:
        return adata
    ref = adata[observed].copy()
    ref = ref[:, np.asarray(ref.X.sum(0)).ravel() > 0].copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=n, flavor="seurat_v3")
    return adata[:, ref.var_names[ref.var["highly_variable"]]].copy()


def knn_average(full: ad.AnnData, mask: np.ndarray, k: int, average: bool = True) -> ad.AnnData:
    """Average counts (or, with ``k=1``, the counts) of the nearest observed cells."""
    coords = full.obsm["spatial"]
    observed = np.flatnonzero(~mask)
    _, idx = cKDTree(coords[observed]).query(coords[mask], k=k)
    idx = observed[np.asarray(idx).reshape(mask.sum(), k)]
    x = full.X
    rows = np.repeat(np.arange(mask.sum()), k)
    weights = sparse.csr_matrix(
        (np.full(rows.size, 1.0 / k), (rows, idx.ravel())), shape=(mask.sum(), full.n_obs)
    )
    out = ad.AnnData(sparse.csr_matrix(weights @ x, dtype=np.float32), var=full.var[[]].copy())
    out.obsm["spatial"] = coords[mask].astype(np.float32)
    return out


def layer_accuracy(full, mask, preds, seed) -> dict:
    """Layer classifier on observed spots, applied to real and imputed masked spots."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    import latentcell as lc

    def expr(a):
        return np.asarray(lc.metrics.log1p_cp10k(a.X).toarray())

    pca = PCA(n_components=20, random_state=seed).fit(expr(full[~mask]))
    clf = LogisticRegression(max_iter=2000).fit(
        pca.transform(expr(full[~mask])), full.obs["layer"][~mask]
    )
    truth = full.obs["layer"].to_numpy()[mask]

    predicted = {"real masked spots": clf.predict(pca.transform(expr(full[mask])))}
    predicted.update({row: clf.predict(pca.transform(expr(pred))) for row, pred in preds.items()})
    out = {row: float(np.mean(p == truth)) for row, p in predicted.items()}
    # how often each layer is predicted (a collapse onto one layer shows here)
    out["predicted_layers"] = {
        row: {str(k): int(v) for k, v in zip(*np.unique(p, return_counts=True), strict=True)}
        for row, p in predicted.items()
    }
    out["true_layers"] = {
        str(k): int(v) for k, v in zip(*np.unique(truth, return_counts=True), strict=True)
    }
    return out


def run(dataset: str, seed: int, accelerator: str, quick: bool) -> dict:
    import scvi

    import latentcell as lc

    fraction, k = SETTINGS[dataset]
    full = load(dataset)
    rng = np.random.default_rng(seed)
    mask = region_mask(full.obsm["spatial"], fraction, rng)
    full = select_genes(full, ~mask)
    train = full[~mask].copy()
    truth = full[mask].copy()
    scvi.settings.seed = seed
    lc.LatentDiffusionModel.setup_anndata(train, spatial_key="spatial")
    model = lc.LatentDiffusionModel(train)
    epochs = dict(max_epochs=3, flow_max_epochs=3) if quick else {}
    t0 = time.time()
    model.train(accelerator=accelerator, devices=1, enable_progress_bar=False, **epochs)
    fit = time.time() - t0
    t0 = time.time()
    # Euler, 50 steps: the solver the published figures were measured with
    imputed = model.impute_region(mask, adata=full, method="euler", seed=seed, progress_bar=False)
    impute_seconds = time.time() - t0
    unconditional = model.sample(int(mask.sum()), seed=seed, progress_bar=False)
    # i.i.d. cells: placing cell i at masked position i is a random placement
    unconditional.obsm["spatial"] = truth.obsm["spatial"]
    preds = {
        "latentcell": imputed,
        "latentcell, position only": model.impute_region(
            mask, adata=full, use_neighbourhood=False, method="euler", seed=seed, progress_bar=False
        ),
        "unconditional": unconditional,
        "spatial kNN": knn_average(full, mask, k),
        "nearest observed cell": knn_average(full, mask, 1),
    }
    for pred in preds.values():
        pred.var_names = full.var_names
    n_comps = min(30, truth.n_obs - 1, truth.n_vars - 1)
    space = lc.metrics.fit_eval_space(truth, n_comps=n_comps, seed=seed)
    null = lc.metrics.real_vs_real_null(truth, space=space, seed=seed)
    scores = {}
    for row, pred in preds.items():
        res = lc.metrics.evaluate_generation(truth, pred, space=space, seed=seed)
        corr = lc.metrics.smoothed_gene_correlation(truth, pred)
        scores[row] = {
            "smoothed_correlation": float(np.nanmean(corr)),
            "energy": float(res["energy"]),
            "knn_accuracy": float(res["knn_accuracy"]),
        }
        if MEAN_LAYER in pred.layers:  # the decoded means: a point estimate, not a sample
            corr = lc.metrics.smoothed_gene_correlation(truth, pred, generated_layer=MEAN_LAYER)
            scores[row]["smoothed_correlation_means"] = float(np.nanmean(corr))
    out = {
        "fit_seconds": fit,
        "impute_seconds": impute_seconds,
        "n_train": int(train.n_obs),
        "n_masked": int(mask.sum()),
        "n_genes": int(full.n_vars),
        "null_energy": null["energy_mean"],
        "scores": scores,
    }
    if "layer" in full.obs:
        out["layer_accuracy"] = layer_accuracy(full, mask, preds, seed)
    return out


def _cell(values: list[float]) -> str:
    text = f"{np.mean(values):.3f}"
    return text + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")


def markdown(results: dict) -> str:
    lines = [
        "| imputed region | dataset (masked / observed cells) | "
        + " | ".join(ROWS)
        + " | real-vs-real null |",
        "|---|---|" + "---:|" * (len(ROWS) + 1),
    ]
    for dataset, by_seed in results["per_dataset"].items():
        runs = list(by_seed.values())
        label = f"{dataset} ({runs[0]['n_masked']} / {runs[0]['n_train']})"
        for metric, name in (
            ("smoothed_correlation", "smoothed gene correlation (higher is better)"),
            ("energy", "energy distance (lower is better)"),
        ):
            null = _cell([r["null_energy"] for r in runs]) if metric == "energy" else ""
            lines.append(
                f"| {name} | {label} | "
                + " | ".join(_cell([r["scores"][row][metric] for r in runs]) for row in ROWS)
                + f" | {null} |"
            )
        lines.append(
            f"| smoothed gene correlation, decoded means instead of counts | {label} | "
            + " | ".join(
                _cell([r["scores"][row]["smoothed_correlation_means"] for r in runs])
                if "smoothed_correlation_means" in runs[0]["scores"][row]
                else ""
                for row in ROWS
            )
            + " |  |"
        )
        if "layer_accuracy" in runs[0]:
            ceiling = _cell([r["layer_accuracy"]["real masked spots"] for r in runs])
            lines.append(
                f"| layer accuracy (real masked spots: {ceiling}) | {label} | "
                + " | ".join(_cell([r["layer_accuracy"][row] for r in runs]) for row in ROWS)
                + " |  |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", nargs="+", choices=tuple(FILES), default=["xenium", "olfactory_bulb"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--merge", help="add these runs to an existing results JSON")
    parser.add_argument("--quick", action="store_true", help="3 epochs per stage (smoke test)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    accelerator = resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if not (DATA_DIR / "spatial").exists():
        print(f"skipped: {DATA_DIR / 'spatial'} not found (set LATENTCELL_DATA)")
        return {}
    results = {"protocol": __doc__, "per_dataset": {}}
    if args.merge and Path(args.merge).exists():
        results = json.loads(Path(args.merge).read_text())
    for dataset in args.dataset:
        results["per_dataset"].setdefault(dataset, {})
        for seed in args.seeds:
            res = run(dataset, seed, accelerator, args.quick)
            results["per_dataset"][dataset][str(seed)] = res
            print(
                f"{dataset} seed {seed}: "
                + ", ".join(
                    f"{r} corr {res['scores'][r]['smoothed_correlation']:.3f} "
                    f"energy {res['scores'][r]['energy']:.3f}"
                    for r in ROWS
                )
                + f", null {res['null_energy']:.3f} (fit {res['fit_seconds']:.0f} s)"
                + (f", layers {res['layer_accuracy']}" if "layer_accuracy" in res else ""),
                flush=True,
            )
    table = markdown(results)
    print(table)
    if not args.quick:
        write_results(args.out, "spatial_imputation", results, table)
    return results


if __name__ == "__main__":
    main()
