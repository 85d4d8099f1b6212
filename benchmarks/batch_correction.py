"""Batch correction by regeneration against scVI's integration and uncorrected data (scib-metrics).

Datasets (``--dataset``):

- ``kang``: Kang 2018 PBMCs (1,556 cells, 1,267 genes), batch = ``donor`` (101, 107), labels =
  5 cell types; half the cells are interferon-stimulated, which both donors share;
- ``tal1``: mouse embryo chimeras (2,889 cells, 300 genes), batch = ``sample`` (4), labels =
  ``celltype.mapped`` (3). Samples 1-2 are knockout and 3-4 wild type, so moving every cell
  into one sample also removes the genotype difference (confounded with the sample); the
  scores here are about mixing samples while keeping cell types.

One model per seed: latentcell (defaults; labels and batch registered) and scVI (scvi-tools,
the same latent size, batch registered; unsupervised, like latentcell's VAE). Every cell is
moved to the largest batch (``target``). Embeddings scored by scib-metrics' ``Benchmarker``
(batch = the cells' original batch, label = cell type; the unintegrated PCA is the
pre-integration reference):

- ``Unintegrated``: PCA (30) of log1p(CP10k) of the real counts;
- ``scVI latent``: scVI's latent space (its integration);
- ``latentcell VAE latent``: latentcell's stage-1 latent (the same kind of integration);
- ``scVI transform_batch``: PCA of scVI's normalised expression with ``transform_batch=target``,
  times each cell's library (its counterfactual means in the target batch);
- ``latentcell decoder only``: ``correct_batch(strategy="decoder")``: each latent decoded with
  the target batch (the same counterfactual in latentcell's VAE), PCA of the decoded means;
- ``latentcell corrected``: ``correct_batch(strategy="flow")`` (the flow inverted under the
  own batch and sampled under the target), PCA of the decoded means; and
  ``latentcell corrected counts``: the same, PCA of the sampled counts.

Every PCA of generated expression is fitted on the real cells' log1p(CP10k) and applied to
the generated cells, so all count-space embeddings share one basis.

Identity check: a logistic regression trained on the real target-batch cells (on that PCA)
predicts the cell type of the other batches' cells, real (uncorrected) and corrected; the
5-fold cross-validated accuracy on the real target-batch cells is the ceiling.

Usage: ``python benchmarks/batch_correction.py [--dataset kang|tal1] [--seeds 0]``
(needs ``pip install scib-metrics``; data from ``../shared/data``). Writes
``results/batch_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from _cli import DATA_DIR, add_device_arguments, resolve_accelerator, write_results

DATASETS = {
    "kang": ("perturbation/kang2018_muscat_1556x1267.h5ad", "cell_type", "donor"),
    "tal1": ("perturbation/tal1_chimera_mouse_embryo_milode.h5ad", "celltype.mapped", "sample"),
}
LABEL, BATCH = "cell_type", "batch"


def load(name: str) -> ad.AnnData:
    """Counts with ``obs['cell_type']`` and ``obs['batch']`` (strings)."""
    path, label, batch = DATASETS[name]
    adata = ad.read_h5ad(DATA_DIR / path)
    obs = pd.DataFrame(index=adata.obs_names)
    obs[LABEL] = adata.obs[label].astype(str).to_numpy()
    obs[BATCH] = adata.obs[batch].astype(str).to_numpy()
    out = ad.AnnData(sparse.csr_matrix(adata.X, dtype=np.float32), obs=obs, var=adata.var[[]])
    out.layers["counts"] = out.X.copy()
    return out


def log_norm(x) -> np.ndarray:
    """Dense log1p(CP10k) (``latentcell.metrics.log1p_cp10k``)."""
    from latentcell.metrics import log1p_cp10k

    out = log1p_cp10k(x)
    return out.toarray() if hasattr(out, "toarray") else np.asarray(out)


def identity_accuracy(pca, real_log, generated: dict, labels, batch, target) -> dict:
    """Cell-type accuracy of a classifier trained on real target-batch cells."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    train = batch == target
    clf = LogisticRegression(max_iter=2000)
    xt = pca.transform(real_log[train])
    out = {
        "ceiling (5-fold CV on real target cells)": float(
            cross_val_score(clf, xt, labels[train], cv=5).mean()
        )
    }
    clf.fit(xt, labels[train])
    other = ~train
    out["uncorrected real cells"] = float(
        (clf.predict(pca.transform(real_log[other])) == labels[other]).mean()
    )
    for name, x in generated.items():
        out[name] = float((clf.predict(pca.transform(x[other])) == labels[other]).mean())
    return out


def run_seed(adata, seed: int, args) -> dict:
    import scvi
    from scib_metrics.benchmark import Benchmarker
    from sklearn.decomposition import PCA

    import latentcell as lc

    labels = adata.obs[LABEL].to_numpy()
    batch = adata.obs[BATCH].to_numpy()
    target = adata.obs[BATCH].value_counts().idxmax()
    trainer = dict(accelerator=args.accelerator, enable_progress_bar=False)
    t0 = time.perf_counter()

    data = adata.copy()
    lc.LatentDiffusionModel.setup_anndata(data, layer="counts", labels_key=LABEL, batch_key=BATCH)
    scvi.settings.seed = seed
    model = lc.LatentDiffusionModel(data)
    model.train(seed=seed, **trainer)
    fit_s = time.perf_counter() - t0
    corrected = model.correct_batch(target_batch=target, seed=seed, progress_bar=False)
    decoder = model.correct_batch(
        target_batch=target, strategy="decoder", seed=seed, progress_bar=False
    )

    ref = adata.copy()
    scvi.model.SCVI.setup_anndata(ref, layer="counts", batch_key=BATCH)
    scvi.settings.seed = seed
    vi = scvi.model.SCVI(ref, n_latent=model.module.flow.n_latent)
    vi.train(**trainer)
    library = np.asarray(adata.layers["counts"].sum(1)).ravel()[:, None]
    vi_means = vi.get_normalized_expression(transform_batch=target, return_numpy=True) * library

    real_log = log_norm(adata.layers["counts"])
    pca = PCA(n_components=30, random_state=seed).fit(real_log)
    generated = {
        "scVI transform_batch": log_norm(vi_means),
        "latentcell decoder only": log_norm(decoder.layers["latentcell_mean"]),
        "latentcell corrected": log_norm(corrected.layers["latentcell_mean"]),
        "latentcell corrected counts": log_norm(corrected.X),
    }
    scored = adata.copy()
    scored.obsm["Unintegrated"] = pca.transform(real_log)
    scored.obsm["scVI latent"] = vi.get_latent_representation()
    scored.obsm["latentcell VAE latent"] = corrected.obsm["X_latentcell"]
    for name, x in generated.items():
        scored.obsm[name] = pca.transform(x)
    bench = Benchmarker(
        scored,
        batch_key=BATCH,
        label_key=LABEL,
        embedding_obsm_keys=[k for k in scored.obsm if k != "Unintegrated"] + ["Unintegrated"],
        pre_integrated_embedding_obsm_key="Unintegrated",
        n_jobs=1,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    metric_type = table.loc["Metric Type"]
    table = table.drop(index="Metric Type").astype(float)
    return {
        "target_batch": str(target),
        "fit_seconds": fit_s,
        "scib": {row: table.loc[row].to_dict() for row in table.index},
        "metric_type": metric_type.to_dict(),
        "identity_accuracy": identity_accuracy(pca, real_log, generated, labels, batch, target),
    }


def markdown(results: dict) -> str:
    seeds = results["seeds"]
    runs = [results["runs"][str(s)] for s in seeds]
    metric_type = runs[0]["metric_type"]
    metrics = list(runs[0]["scib"][next(iter(runs[0]["scib"]))])
    rows = list(runs[0]["scib"])
    lines = [
        "| embedding | " + " | ".join(metrics) + " |",
        "|---|" + "---:|" * len(metrics),
        "| (metric type) | " + " | ".join(metric_type[m] for m in metrics) + " |",
    ]
    for row in rows:
        vals = []
        for m in metrics:
            v = np.array([r["scib"][row][m] for r in runs])
            vals.append(f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else ""))
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    lines += ["", "| cells of the other batches | cell-type accuracy |", "|---|---:|"]
    for name in runs[0]["identity_accuracy"]:
        v = np.array([r["identity_accuracy"][name] for r in runs])
        lines.append(
            f"| {name} | {v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "") + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="kang")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    adata = load(args.dataset)
    results = {"protocol": __doc__, "dataset": args.dataset, "seeds": args.seeds, "runs": {}}
    for seed in args.seeds:
        results["runs"][str(seed)] = run_seed(adata, seed, args)
        print(f"seed {seed} done", flush=True)
    table = markdown(results)
    print(table)
    from pathlib import Path

    out = args.out or str(Path(__file__).parent / "results")
    write_results(out, f"batch_{args.dataset}", results, table)
    return results


if __name__ == "__main__":
    main()
