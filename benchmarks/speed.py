"""Speed and memory of latentcell's stages, each as a ratio against a baseline in this process.

Same data for every row: synthetic counts (``--n-cells`` x ``--n-genes``). Rows:
- VAE stage: seconds per epoch of latentcell's stage 1 vs scvi-tools' SCVI (the baseline;
  stage 1 is scvi-tools' VAE with the same architecture and batch size), with latentcell's
  in-memory data path (the default) and with scvi-tools' AnnDataLoader;
- flow stage: seconds per epoch of the DiT and of the MLP denoiser, against the VAE epoch;
- sampling: generated cells per second with the flow (midpoint, 50 steps = 100 network
  evaluations, and Euler with 1, 2, 4, 8, 16 and 50 steps for the default MLP denoiser) vs
  decoding alone from the VAE's normal prior (the no-flow baseline);
- flow stage without a VAE: seconds per epoch of the same flow (MLP denoiser of the model,
  conditioned on cell type and batch, same cells, batch size, split and training loop,
  ``benchmarks/_gene_flow.py``) on the log1p(CP10k) of all ``--n-genes`` genes against the
  VAE's latent means, reported as ``gene_flow_vs_latent_flow_epoch_ratio`` (how many times
  cheaper an epoch of the latent flow is);
- peak GPU memory of each phase (``torch.cuda.max_memory_allocated``) on a GPU.

Usage: ``python benchmarks/speed.py [--device cuda|cpu] [--n-cells 20000]``
(``--accelerator gpu`` also works). Prints a markdown table and writes
``results/speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _cli import add_device_arguments, resolve_accelerator
from _gene_flow import log_expression, train_vector_flow


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    parser.add_argument("--n-cells", type=int, default=20000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-sample", type=int, default=20000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    import scvi

    import latentcell as lc

    adata = lc.datasets.synthetic_counts(
        n_cells=args.n_cells, n_genes=args.n_genes, n_cell_types=8, n_batches=2, seed=0
    )
    common = dict(accelerator=args.accelerator, enable_progress_bar=False, devices=1)
    rows = {}

    def timed(fn):
        _peak_reset()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0, _peak()

    base = adata.copy()
    scvi.model.SCVI.setup_anndata(base, layer="counts", batch_key="batch", labels_key="cell_type")
    ref = scvi.model.SCVI(base, n_latent=16)
    ref.train(max_epochs=1, **common)  # warm-up (allocations, kernels)
    sec, mem = timed(lambda: ref.train(max_epochs=args.epochs, early_stopping=False, **common))
    rows["scVI epoch (baseline)"] = dict(seconds=sec / args.epochs, peak_mib=mem)

    lc.LatentDiffusionModel.setup_anndata(
        adata, layer="counts", batch_key="batch", labels_key="cell_type"
    )
    for denoiser in ("dit", "mlp"):
        model = lc.LatentDiffusionModel(adata, denoiser=denoiser)
        model.train(stage="vae", max_epochs=1, early_stopping=False, **common)
        if denoiser == "dit":
            sec, mem = timed(
                lambda m=model: m.train(
                    stage="vae", max_epochs=args.epochs, early_stopping=False, **common
                )
            )
            rows["latentcell VAE epoch"] = dict(seconds=sec / args.epochs, peak_mib=mem)
            sec, mem = timed(
                lambda m=model: m.train(
                    stage="vae",
                    max_epochs=args.epochs,
                    early_stopping=False,
                    load_in_memory=False,
                    **common,
                )
            )
            rows["latentcell VAE epoch, scvi-tools AnnDataLoader"] = dict(
                seconds=sec / args.epochs, peak_mib=mem
            )
        model.train(stage="flow", flow_max_epochs=1, early_stopping=False, **common)
        sec, mem = timed(
            lambda m=model: m.train(
                stage="flow", flow_max_epochs=args.epochs, early_stopping=False, **common
            )
        )
        rows[f"flow epoch ({denoiser})"] = dict(seconds=sec / args.epochs, peak_mib=mem)
        n = args.n_sample
        model.sample(n_samples=256, progress_bar=False)
        sec, mem = timed(
            lambda m=model, n=n: m.sample(
                n_samples=n, n_steps=50, method="midpoint", progress_bar=False, batch_size=4096
            )
        )
        rows[f"sample {n} cells, flow ({denoiser}, 100 evals)"] = dict(
            seconds=sec, cells_per_s=n / sec, peak_mib=mem
        )
        if denoiser == "dit":
            sec, mem = timed(
                lambda m=model, n=n: m.sample(
                    n_samples=n, latent_prior="normal", progress_bar=False, batch_size=4096
                )
            )
            rows[f"sample {n} cells, VAE prior (baseline)"] = dict(
                seconds=sec, cells_per_s=n / sec, peak_mib=mem
            )
        else:  # the default denoiser: throughput against the number of Euler steps
            for steps in (1, 2, 4, 8, 16, 50):
                sec, mem = timed(
                    lambda m=model, n=n, s=steps: m.sample(
                        n_samples=n,
                        n_steps=s,
                        method="euler",
                        progress_bar=False,
                        batch_size=4096,
                    )
                )
                rows[f"sample {n} cells, flow (mlp, euler {steps} steps)"] = dict(
                    seconds=sec, cells_per_s=n / sec, peak_mib=mem
                )

    # The flow stage without a VAE: the same flow on genes vs on the latent (of the last,
    # default-denoiser model), in one training loop, so that only the input width differs.
    flow = model.module.flow
    denoiser = dict(n_hidden=flow.denoiser.n_hidden, n_layers=len(flow.denoiser.blocks))
    columns = [pd.Categorical(adata.obs[k]) for k in ("cell_type", "batch")]
    cat = np.stack([c.codes for c in columns], axis=1).astype(np.int64)
    n_cats = [len(c.categories) for c in columns]
    inputs = {
        f"flow epoch, latent flow (mlp, {flow.n_latent} dims, same loop)": (
            model.get_latent_representation(key_added=None)
        ),
        f"flow epoch, gene-space flow (mlp, {args.n_genes} genes, no VAE)": log_expression(
            adata, layer="counts"
        ),
    }
    fit = dict(early_stopping=False, accelerator=args.accelerator, seed=0, **denoiser)
    epoch_seconds = {}
    for name, x in inputs.items():
        train_vector_flow(x, cat, n_cats, max_epochs=1, **fit)  # warm-up
        logs = []
        sec, mem = timed(
            lambda x=x, logs=logs: logs.append(
                train_vector_flow(x, cat, n_cats, max_epochs=args.epochs, **fit)[1]
            )
        )
        # mean time of an epoch (training and validation), without the trainer's set-up
        epoch_seconds[name] = float(np.mean(logs[0].epoch_seconds))
        rows[name] = dict(seconds=epoch_seconds[name], peak_mib=mem)
    latent_epoch, gene_epoch = epoch_seconds.values()
    gene_vs_latent = gene_epoch / latent_epoch

    base_epoch = rows["scVI epoch (baseline)"]["seconds"]
    base_sample = rows[f"sample {args.n_sample} cells, VAE prior (baseline)"]["seconds"]
    for name, r in rows.items():
        r["ratio_to_baseline"] = round(
            r["seconds"] / (base_sample if name.startswith("sample") else base_epoch), 2
        )
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.accelerator != "cpu"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    result = dict(
        device=device,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        rows=rows,
        gene_flow_vs_latent_flow_epoch_ratio=round(gene_vs_latent, 2),
        torch=torch.__version__,
        scvi=scvi.__version__,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if "cpu" not in device else "cpu"
    (out / f"speed_{tag}.json").write_text(json.dumps(result, indent=2))
    print(f"device: {device}; {args.n_cells} cells x {args.n_genes} genes")
    print("| phase | seconds | ratio to baseline | cells/s | peak GPU MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        cps = f"{r['cells_per_s']:.0f}" if "cells_per_s" in r else ""
        print(
            f"| {name} | {r['seconds']:.3f} | {r['ratio_to_baseline']} | {cps} | "
            f"{r['peak_mib'] if r['peak_mib'] is not None else ''} |"
        )
    print(
        f"flow epoch, gene space ({args.n_genes} genes) / latent space ({flow.n_latent} dims): "
        f"{gene_vs_latent:.1f}x (the latent flow is {gene_vs_latent:.1f}x cheaper per epoch; "
        "target >= 10x)"
    )
    return result


if __name__ == "__main__":
    main()
