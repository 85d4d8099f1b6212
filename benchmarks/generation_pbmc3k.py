"""Generation quality on pbmc3k: latentcell against scVI and its own VAE prior.

Protocol (issue #2): 2000 highly variable genes (seurat_v3 on counts), a seeded 70/30 split
of cells, every model trained with its defaults on the 70%, then as many generated cells as
held-out cells with the held-out cells' labels. Distances are measured in a 30-component PCA
of log1p(CP10k) fit on the held-out real cells (latentcell.metrics): energy distance,
RBF-MMD, kNN real-vs-generated accuracy (0.5 is ideal) and the accuracy of a kNN classifier
trained on the real training cells at recovering the requested label.

Rows, all from this one run:
- floor: real training cells (a label-matched draw of them) vs held-out cells;
- scVI posterior predictive: for each held-out cell, a training cell of the same label
  encoded and decoded by scVI (``posterior_predictive_sample``);
- scVI prior: z ~ N(0, I) through the trained scVI decoder, library size of a training cell
  of the same label;
- latentcell VAE prior: the same through latentcell's own VAE, without the flow;
- latentcell: the model with its defaults (MLP denoiser), flow conditioned on the label;
- latentcell (dit denoiser): the same with ``denoiser="dit"``.

Usage: ``python benchmarks/generation_pbmc3k.py [--seed 0] [--out benchmarks/results]``
(data from ``../shared/data``, or the folder in ``$LATENTCELL_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

DATA_DIR = Path(
    os.environ.get(
        "LATENTCELL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)
DATA = DATA_DIR / "generation" / "pbmc3k_raw_counts_louvain_2638.h5ad"
LABELS = "cell_type"


def load_split(seed: int):
    import scanpy as sc

    adata = ad.read_h5ad(DATA)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", subset=True)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(adata.n_obs)
    n_test = round(0.3 * adata.n_obs)
    test, train = adata[np.sort(perm[:n_test])].copy(), adata[np.sort(perm[n_test:])].copy()
    return train, test


def label_matched_rows(train, test, rng):
    """For each held-out cell, a distinct random training cell with the same label."""
    rows = np.empty(test.n_obs, dtype=np.int64)
    labels = train.obs[LABELS].to_numpy()
    for lab in np.unique(test.obs[LABELS]):
        members = np.flatnonzero(test.obs[LABELS].to_numpy() == lab)
        pool = np.flatnonzero(labels == lab)
        rows[members] = rng.choice(pool, size=len(members), replace=len(pool) < len(members))
    return rows


def scvi_baselines(train, test, seed):
    import scvi

    scvi.settings.seed = seed
    t0 = time.time()
    data = train.copy()
    scvi.model.SCVI.setup_anndata(data, labels_key=LABELS)
    model = scvi.model.SCVI(data)
    model.train(early_stopping=True, enable_progress_bar=False)
    fit = time.time() - t0
    rng = np.random.default_rng(seed)
    rows = label_matched_rows(train, test, rng)
    post = model.posterior_predictive_sample(data, indices=rows, n_samples=1)
    post = post.to_scipy_sparse() if hasattr(post, "to_scipy_sparse") else post
    post = ad.AnnData(
        X=np.asarray(
            post.todense() if hasattr(post, "todense") else post, dtype=np.float32
        ).reshape(test.n_obs, -1),
        obs=test.obs[[LABELS]].reset_index(drop=True),
        var=train.var,
    )
    lib = np.log(np.asarray(train.X.sum(1)).ravel()[rows]).astype(np.float32)
    module = model.module
    module.eval()
    with torch.inference_mode():
        torch.manual_seed(seed)
        dev = next(module.parameters()).device
        z = torch.randn(test.n_obs, module.n_latent).to(dev)
        out = module.generative(
            z=z,
            library=torch.as_tensor(lib, device=dev)[:, None],
            batch_index=torch.zeros(test.n_obs, 1, dtype=torch.long, device=dev),
        )
        counts = out["px"].sample().cpu().numpy().astype(np.float32)
    prior = ad.AnnData(X=counts, obs=test.obs[[LABELS]].reset_index(drop=True), var=train.var)
    return post, prior, fit, model.history["elbo_validation"].shape[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (needs ../shared/data beside the repository)")
        return {}
    warnings.filterwarnings("ignore")
    import scvi

    import latentcell as lc
    from latentcell.metrics import evaluate_generation, fit_eval_space, real_vs_real_null

    train, test = load_split(args.seed)
    scvi.settings.seed = args.seed  # seeds the initial weights of the model built next
    t0 = time.time()
    lc.LatentDiffusionModel.setup_anndata(train, labels_key=LABELS)
    model = lc.LatentDiffusionModel(train)
    model.train(seed=args.seed, accelerator=args.accelerator, enable_progress_bar=False)
    ldm_fit = time.time() - t0
    conditions = test.obs[[LABELS]]
    t0 = time.time()
    gen = model.sample(conditions=conditions, seed=args.seed, progress_bar=False)
    sample_time = time.time() - t0
    vae_prior = model.sample(
        conditions=conditions, seed=args.seed, latent_prior="normal", progress_bar=False
    )
    t0 = time.time()
    scvi.settings.seed = args.seed
    dit = lc.LatentDiffusionModel(train, denoiser="dit")
    dit.train(seed=args.seed, accelerator=args.accelerator, enable_progress_bar=False)
    dit_fit = time.time() - t0
    gen_dit = dit.sample(conditions=conditions, seed=args.seed, progress_bar=False)
    post, prior, scvi_fit, scvi_epochs = scvi_baselines(train, test, args.seed)
    rows = label_matched_rows(train, test, np.random.default_rng(args.seed + 1))
    floor = train[rows].copy()

    space = fit_eval_space(test, n_comps=30, seed=args.seed)
    rows_out = {}
    for name, cells in [
        ("floor: real train vs held-out", floor),
        ("scVI posterior predictive", post),
        ("scVI prior", prior),
        ("latentcell VAE prior (no flow)", vae_prior),
        ("latentcell (dit denoiser)", gen_dit),
        ("latentcell", gen),
    ]:
        rows_out[name] = evaluate_generation(
            test, cells, labels_key=LABELS, space=space, seed=args.seed, reference=train
        )
    solver_sweep = {}
    for method in ("euler", "midpoint", "heun"):
        for n_steps in (10, 25, 50):
            cells = model.sample(
                conditions=conditions,
                seed=args.seed,
                method=method,
                n_steps=n_steps,
                progress_bar=False,
            )
            r = evaluate_generation(
                test, cells, labels_key=LABELS, space=space, seed=args.seed, reference=train
            )
            solver_sweep[f"{method}-{n_steps}"] = {
                k: r[k] for k in ("energy", "knn_accuracy", "label_accuracy")
            }
    null = real_vs_real_null(test, n_repeats=5, seed=args.seed, space=space)
    result = {
        "dataset": "pbmc3k (2638 cells; 2000 HVGs)",
        "n_train": train.n_obs,
        "n_test": test.n_obs,
        "seed": args.seed,
        "results": rows_out,
        "real_vs_real_null_halves_of_test": null,
        "solver_sweep_latentcell": solver_sweep,
        "timing_seconds": {
            "latentcell_fit": round(ldm_fit, 1),
            "latentcell_sample": round(sample_time, 2),
            "latentcell_dit_fit": round(dit_fit, 1),
            "scvi_fit": round(scvi_fit, 1),
        },
        "latentcell_epochs": {
            k: len(model.history[k]) for k in ("elbo_validation", "flow_loss_validation")
        },
        "scvi_epochs": int(scvi_epochs),
        "space": space.to_dict(include_genes=False),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation_pbmc3k.json").write_text(json.dumps(result, indent=2, default=float))
    table = markdown_table(rows_out)
    (out / "generation_pbmc3k.md").write_text(table + "\n")
    print(table)
    print(
        f"real-vs-real null (random halves of held-out cells): energy "
        f"{null['energy_mean']:.3f} ± {null['energy_std']:.3f}"
    )
    print(json.dumps(result["timing_seconds"]), json.dumps(result["latentcell_epochs"]))
    print("solver sweep (energy):", {k: round(v["energy"], 3) for k, v in solver_sweep.items()})
    return result


def markdown_table(rows: dict) -> str:
    lines = [
        "| cells compared with held-out pbmc3k | energy | MMD | kNN acc (0.5 ideal) | label acc |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['energy']:.3f} | {r['mmd']:.4f} | "
            f"{r['knn_accuracy']:.3f} | {r['label_accuracy']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
