"""Speed and memory of latentcell's stages, each as a ratio against a baseline in this process.

Same data for every row: synthetic counts (``--n-cells`` x ``--n-genes``). Rows:
- VAE stage: seconds per epoch of latentcell's stage 1 vs scvi-tools' SCVI (the baseline;
  stage 1 is scvi-tools' VAE, so the ratio should be about 1);
- flow stage: seconds per epoch of the DiT and of the MLP denoiser, against the VAE epoch;
- sampling: generated cells per second with the flow (midpoint, 50 steps = 100 network
  evaluations, and Euler with 1, 2, 4, 8, 16 and 50 steps for the default MLP denoiser) vs
  decoding alone from the VAE's normal prior (the no-flow baseline);
- peak GPU memory of each phase (``torch.cuda.max_memory_allocated``) on a GPU.

Usage: ``python benchmarks/speed.py [--accelerator gpu] [--n-cells 20000]``. Prints a
markdown table and writes ``results/speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch


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
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--n-cells", type=int, default=20000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-sample", type=int, default=20000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
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
    return result


if __name__ == "__main__":
    main()
