"""Generation quality on pbmc3k: latentcell against scVI, its own VAE prior and a gene-space flow.

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
- latentcell (dit denoiser): the same with ``denoiser="dit"``;
- gene-space flow (no VAE): the same denoiser family (MLP, 128 hidden, 4 layers,
  label-conditioned rectified flow, same training recipe) trained directly on the
  log1p(CP10k) of the 2000 HVGs (``benchmarks/_gene_flow.py``); its cells are
  ``expm1`` of the generated values, which the metrics renormalise per cell;
- latentcell (ddpm objective): the default model with ``objective="ddpm"`` (noise
  prediction, cosine schedule), sampled with 50 DDIM steps;
- latentcell + joint fine-tuning: the default model, then ``train(stage="joint")`` (VAE and
  flow fine-tuned together for up to 30 epochs).

Each row's fit time is in the table. Steps-vs-quality curve (``steps_curve`` in the JSON): the
default latentcell model sampled with Euler at 1, 2, 4, 8, 16 and 50 steps, midpoint and Heun
at 1, 2, 4, 8, 25 and 50 steps (midpoint 50 is the model's default), each with energy
distance, kNN accuracy, label accuracy and the wall time of ``model.sample`` (flow, decoder
and count sampling; run ``latentcell.pl.steps_quality`` on it for a plot), plus the DDPM
model with DDIM at 1-50 steps. Guidance curve (``cfg_curve``): energy, kNN and label accuracy
against the classifier-free guidance scale (0, 1, 1.5, 2, 3) for the default condition
dropout (0.1 of cells lose all conditions, each condition is also dropped with 0.1) and for
a model trained with both at 0.2.

Usage: ``python benchmarks/generation_pbmc3k.py [--seed 0] [--device cuda|cpu]
[--out benchmarks/results] [--quick]`` (data from ``../shared/data``, or the folder in
``$LATENTCELL_DATA``). ``--quick`` is a smoke test (2 epochs per stage, a short steps curve,
results written to a temporary folder unless ``--out`` is given): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from _cli import DATA_DIR, add_device_arguments, resolve_accelerator
from _gene_flow import GeneSpaceFlow

DATA = DATA_DIR / "generation" / "pbmc3k_raw_counts_louvain_2638.h5ad"
LABELS = "cell_type"
#: Solver settings of the steps-vs-quality curve (midpoint 50 is the model's default).
STEPS_CURVE = {
    "euler": (1, 2, 4, 8, 16, 50),
    "midpoint": (1, 2, 4, 8, 25, 50),
    "heun": (1, 2, 4, 8, 25, 50),
}
QUICK_STEPS_CURVE = {"euler": (1, 2, 4, 8, 16, 50), "midpoint": (50,)}
#: DDIM steps of the DDPM-objective model (same denoiser, same data).
DDIM_STEPS = (1, 2, 4, 8, 16, 50)
#: Classifier-free guidance scales, for the default condition dropout and a doubled one.
CFG_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0)
CFG_DROPOUTS = ((0.1, 0.1), (0.2, 0.2))
#: Epochs of every stage with --quick.
QUICK_EPOCHS = 2
CURVE_METRICS = ("energy", "knn_accuracy", "label_accuracy")


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


def scvi_baselines(train, test, seed, accelerator="cpu", max_epochs=None):
    import scvi

    scvi.settings.seed = seed
    t0 = time.time()
    data = train.copy()
    scvi.model.SCVI.setup_anndata(data, labels_key=LABELS)
    model = scvi.model.SCVI(data)
    model.train(
        max_epochs=max_epochs,
        accelerator=accelerator,
        early_stopping=True,
        enable_progress_bar=False,
    )
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


def steps_curve(model, train, test, space, seed, settings) -> list[dict]:
    """Quality and sampling time of the model against the solver and its number of steps."""
    from latentcell.metrics import evaluate_generation

    conditions = test.obs[[LABELS]]
    model.sample(conditions=conditions.iloc[:64], n_steps=2, seed=seed, progress_bar=False)
    curve = []
    for method, all_steps in settings.items():
        for n_steps in all_steps:
            t0 = time.perf_counter()
            cells = model.sample(
                conditions=conditions,
                seed=seed,
                method=method,
                n_steps=n_steps,
                progress_bar=False,
            )
            seconds = time.perf_counter() - t0
            r = evaluate_generation(
                test, cells, labels_key=LABELS, space=space, seed=seed, reference=train
            )
            curve.append(
                {
                    "method": method,
                    "n_steps": n_steps,
                    "n_evals": n_steps * (1 if method in ("euler", "ddim") else 2),
                    **{k: float(r[k]) for k in CURVE_METRICS},
                    "seconds": round(seconds, 3),
                    "cells_per_s": round(cells.n_obs / seconds, 1),
                    "default": method == "midpoint" and n_steps == 50,
                }
            )
    return curve


def cfg_curve(model, train, test, space, seed, scales, dropout) -> list[dict]:
    """Label accuracy and distances of one model against the guidance scale."""
    from latentcell.metrics import evaluate_generation

    out = []
    for scale in scales:
        cells = model.sample(
            conditions=test.obs[[LABELS]], seed=seed, cfg_scale=scale, progress_bar=False
        )
        r = evaluate_generation(
            test, cells, labels_key=LABELS, space=space, seed=seed, reference=train
        )
        out.append(
            {
                "p_uncond": dropout[0],
                "p_drop_attr": dropout[1],
                "cfg_scale": scale,
                **{k: float(r[k]) for k in CURVE_METRICS},
            }
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default=None,
        help="results folder (default benchmarks/results; a temporary folder with --quick)",
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_EPOCHS} epochs per stage, short steps curve",
    )
    args = parser.parse_args(argv)
    accelerator = resolve_accelerator(parser, args)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (needs ../shared/data beside the repository)")
        return {}
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "latentcell_benchmark_quick"
            if args.quick
            else Path(__file__).parent / "results"
        )
    warnings.filterwarnings("ignore")
    import scvi

    import latentcell as lc
    from latentcell.metrics import evaluate_generation, fit_eval_space, real_vs_real_null

    epochs = QUICK_EPOCHS if args.quick else None
    lc_epochs = {"max_epochs": epochs, "flow_max_epochs": epochs}
    train, test = load_split(args.seed)
    scvi.settings.seed = args.seed  # seeds the initial weights of the model built next
    t0 = time.time()
    lc.LatentDiffusionModel.setup_anndata(train, labels_key=LABELS)
    model = lc.LatentDiffusionModel(train)
    model.train(seed=args.seed, accelerator=accelerator, enable_progress_bar=False, **lc_epochs)
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
    dit.train(seed=args.seed, accelerator=accelerator, enable_progress_bar=False, **lc_epochs)
    dit_fit = time.time() - t0
    gen_dit = dit.sample(conditions=conditions, seed=args.seed, progress_bar=False)
    t0 = time.time()
    gene_flow = GeneSpaceFlow(train, LABELS).train(
        max_epochs=epochs, accelerator=accelerator, seed=args.seed
    )
    gene_fit = time.time() - t0
    gen_gene = gene_flow.sample(conditions, seed=args.seed)
    t0 = time.time()
    scvi.settings.seed = args.seed
    ddpm = lc.LatentDiffusionModel(train, objective="ddpm")
    ddpm.train(seed=args.seed, accelerator=accelerator, enable_progress_bar=False, **lc_epochs)
    ddpm_fit = time.time() - t0
    gen_ddpm = ddpm.sample(conditions=conditions, seed=args.seed, progress_bar=False)
    t0 = time.time()
    scvi.settings.seed = args.seed
    joint = lc.LatentDiffusionModel(train)
    joint.train(seed=args.seed, accelerator=accelerator, enable_progress_bar=False, **lc_epochs)
    joint.train(
        stage="joint",
        joint_max_epochs=epochs or 30,
        seed=args.seed,
        accelerator=accelerator,
        enable_progress_bar=False,
    )
    joint_fit = time.time() - t0
    gen_joint = joint.sample(conditions=conditions, seed=args.seed, progress_bar=False)
    cfg = []
    for dropout in CFG_DROPOUTS:
        if dropout == (0.1, 0.1):
            guided = model
        else:
            scvi.settings.seed = args.seed
            guided = lc.LatentDiffusionModel(train, p_uncond=dropout[0], p_drop_attr=dropout[1])
            guided.train(
                seed=args.seed, accelerator=accelerator, enable_progress_bar=False, **lc_epochs
            )
        scales = (1.0, 2.0) if args.quick else CFG_SCALES
        cfg.append((guided, dropout, scales))
    post, prior, scvi_fit, scvi_epochs = scvi_baselines(
        train, test, args.seed, accelerator=accelerator, max_epochs=epochs
    )
    rows = label_matched_rows(train, test, np.random.default_rng(args.seed + 1))
    floor = train[rows].copy()

    space = fit_eval_space(test, n_comps=30, seed=args.seed)
    fit_seconds = {
        "scVI posterior predictive": scvi_fit,
        "scVI prior": scvi_fit,
        "latentcell VAE prior (no flow)": ldm_fit,
        "gene-space flow (no VAE)": gene_fit,
        "latentcell (dit denoiser)": dit_fit,
        "latentcell (ddpm objective, 50 DDIM steps)": ddpm_fit,
        "latentcell + joint fine-tuning": joint_fit,
        "latentcell": ldm_fit,
    }
    rows_out = {}
    for name, cells in [
        ("floor: real train vs held-out", floor),
        ("scVI posterior predictive", post),
        ("scVI prior", prior),
        ("latentcell VAE prior (no flow)", vae_prior),
        ("gene-space flow (no VAE)", gen_gene),
        ("latentcell (dit denoiser)", gen_dit),
        ("latentcell (ddpm objective, 50 DDIM steps)", gen_ddpm),
        ("latentcell + joint fine-tuning", gen_joint),
        ("latentcell", gen),
    ]:
        rows_out[name] = evaluate_generation(
            test, cells, labels_key=LABELS, space=space, seed=args.seed, reference=train
        )
        if name in fit_seconds:
            rows_out[name]["fit_seconds"] = round(fit_seconds[name], 1)
    curve = steps_curve(
        model, train, test, space, args.seed, QUICK_STEPS_CURVE if args.quick else STEPS_CURVE
    )
    curve += steps_curve(
        ddpm, train, test, space, args.seed, {"ddim": (1, 8, 50) if args.quick else DDIM_STEPS}
    )
    guidance = [
        row
        for guided, dropout, scales in cfg
        for row in cfg_curve(guided, train, test, space, args.seed, scales, dropout)
    ]
    null = real_vs_real_null(test, n_repeats=1 if args.quick else 5, seed=args.seed, space=space)
    result = {
        "dataset": "pbmc3k (2638 cells; 2000 HVGs)",
        "n_train": train.n_obs,
        "n_test": test.n_obs,
        "seed": args.seed,
        "quick": args.quick,
        "accelerator": accelerator,
        "results": rows_out,
        "real_vs_real_null_halves_of_test": null,
        "steps_curve": curve,
        "cfg_curve": guidance,
        "timing_seconds": {
            "latentcell_fit": round(ldm_fit, 1),
            "latentcell_sample": round(sample_time, 2),
            "latentcell_dit_fit": round(dit_fit, 1),
            "gene_flow_fit": round(gene_fit, 1),
            "ddpm_fit": round(ddpm_fit, 1),
            "joint_fit": round(joint_fit, 1),
            "scvi_fit": round(scvi_fit, 1),
        },
        "latentcell_epochs": {
            k: len(model.history[k]) for k in ("elbo_validation", "flow_loss_validation")
        },
        "gene_flow_epochs": len(gene_flow.history["flow_loss_validation"]),
        "scvi_epochs": int(scvi_epochs),
        "space": space.to_dict(include_genes=False),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation_pbmc3k.json").write_text(json.dumps(result, indent=2, default=float))
    table = markdown_table(rows_out)
    curve_table = steps_table(curve)
    cfg_table = guidance_table(guidance)
    (out / "generation_pbmc3k.md").write_text(
        table + "\n\n" + curve_table + "\n\n" + cfg_table + "\n"
    )
    print(table)
    print(
        f"real-vs-real null (random halves of held-out cells): energy "
        f"{null['energy_mean']:.3f} ± {null['energy_std']:.3f}"
    )
    print(
        json.dumps(result["timing_seconds"]),
        json.dumps(result["latentcell_epochs"]),
        f"gene-space flow epochs: {result['gene_flow_epochs']}",
    )
    print()
    print(curve_table)
    print()
    print(cfg_table)
    print(f"results written to {out}")
    return result


def markdown_table(rows: dict) -> str:
    lines = [
        "| cells compared with held-out pbmc3k | energy | MMD | kNN acc (0.5 ideal) | label acc "
        "| fit (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        fit = f"{r['fit_seconds']:.1f}" if "fit_seconds" in r else ""
        lines.append(
            f"| {name} | {r['energy']:.3f} | {r['mmd']:.4f} | "
            f"{r['knn_accuracy']:.3f} | {r['label_accuracy']:.3f} | {fit} |"
        )
    return "\n".join(lines)


def guidance_table(rows: list[dict]) -> str:
    lines = [
        "| condition dropout (all, each) | cfg scale | energy | kNN acc (0.5 ideal) | label acc |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['p_uncond']}, {r['p_drop_attr']} | {r['cfg_scale']} | {r['energy']:.3f} | "
            f"{r['knn_accuracy']:.3f} | {r['label_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def steps_table(curve: list[dict]) -> str:
    lines = [
        "| latentcell sampler | steps | network evals | energy | kNN acc (0.5 ideal) "
        "| label acc | sample (s) | cells/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in curve:
        name = r["method"] + (" (default)" if r.get("default") else "")
        lines.append(
            f"| {name} | {r['n_steps']} | {r['n_evals']} | {r['energy']:.3f} | "
            f"{r['knn_accuracy']:.3f} | {r['label_accuracy']:.3f} | {r['seconds']:.2f} | "
            f"{r['cells_per_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
