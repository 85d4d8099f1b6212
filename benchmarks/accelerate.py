"""Mixed precision and torch.compile: speed of each stage against eager float32 in this process.

Same synthetic counts for every row (``--n-cells`` x ``--n-genes``, 8 cell types, 2 batches),
same seed, same model (``--denoiser``, default the DiT). Rows:

- ``eager fp32`` (the baseline): the model as it comes;
- ``compiled``: :meth:`LatentDiffusionModel.compile` (``torch.compile`` of the denoiser and of
  the VAE's encoder and decoder);
- ``bf16-mixed``: Lightning's ``precision="bf16-mixed"`` for training and sampling inside
  ``torch.autocast(dtype=torch.bfloat16)``;
- ``compiled + bf16-mixed``: both.

For each row: one warm-up epoch of each stage and a warm-up sampling call (which compile,
when compiling), then ``--epochs`` timed epochs of the VAE and of the flow and ``--n-sample``
generated cells (midpoint, ``--n-steps`` steps). Reported: seconds per epoch and cells per
second, their ratio to eager fp32 (above 1 is faster), the warm-up seconds (compilation
cost) and the final validation ELBO and flow loss (equal within noise means the option does
not change what is learnt).

Usage: ``python benchmarks/accelerate.py [--device cuda|cpu] [--n-cells 20000]``.
Writes ``results/accelerate_<accelerator>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from pathlib import Path

import torch

from _cli import add_device_arguments, resolve_accelerator, write_results

ROWS = (
    ("eager fp32", False, "32-true"),
    ("compiled", True, "32-true"),
    ("bf16-mixed", False, "bf16-mixed"),
    ("compiled + bf16-mixed", True, "bf16-mixed"),
)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_row(adata, compiled: bool, precision: str, args) -> dict:
    """Warm up, then time the VAE, the flow and sampling for one configuration."""
    import scvi

    import latentcell as lc

    scvi.settings.seed = 0
    model = lc.LatentDiffusionModel(adata, denoiser=args.denoiser)
    if compiled:
        model.compile()
    common = dict(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,
        early_stopping=False,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
    )
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    out = {}

    def timed(fn):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - t0

    out["vae_warmup_s"] = timed(lambda: model.train(stage="vae", max_epochs=1, **common))
    out["vae_s_per_epoch"] = (
        timed(lambda: model.train(stage="vae", max_epochs=args.epochs, **common)) / args.epochs
    )
    out["elbo_validation"] = float(model.history["elbo_validation"].iloc[-1, 0])
    flow = dict(flow_batch_size=args.flow_batch_size, **common)
    out["flow_warmup_s"] = timed(lambda: model.train(stage="flow", flow_max_epochs=1, **flow))
    out["flow_s_per_epoch"] = (
        timed(lambda: model.train(stage="flow", flow_max_epochs=args.epochs, **flow)) / args.epochs
    )
    out["flow_loss_validation"] = float(model.history["flow_loss_validation"].iloc[-1, 0])

    def sample(n):
        with autocast:
            model.sample(n, n_steps=args.n_steps, seed=0, batch_size=4096, progress_bar=False)

    out["sample_warmup_s"] = timed(lambda: sample(4096))
    out["sample_cells_per_s"] = args.n_sample / timed(lambda: sample(args.n_sample))
    return out


def markdown(results: dict) -> str:
    base = results["rows"]["eager fp32"]
    lines = [
        "| configuration | VAE s/epoch | flow s/epoch | sampled cells/s | VAE speed-up | "
        "flow speed-up | sampling speed-up | warm-up s (VAE / flow / sample) | "
        "validation ELBO | validation flow loss |",
        "|---|" + "---:|" * 9,
    ]
    for name, r in results["rows"].items():
        lines.append(
            f"| {name} | {r['vae_s_per_epoch']:.2f} | {r['flow_s_per_epoch']:.2f} | "
            f"{r['sample_cells_per_s']:.0f} | "
            f"{base['vae_s_per_epoch'] / r['vae_s_per_epoch']:.2f} | "
            f"{base['flow_s_per_epoch'] / r['flow_s_per_epoch']:.2f} | "
            f"{r['sample_cells_per_s'] / base['sample_cells_per_s']:.2f} | "
            f"{r['vae_warmup_s']:.0f} / {r['flow_warmup_s']:.0f} / {r['sample_warmup_s']:.0f} | "
            f"{r['elbo_validation']:.1f} | {r['flow_loss_validation']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    parser.add_argument("--n-cells", type=int, default=20000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--flow-batch-size", type=int, default=1024)
    parser.add_argument("--n-sample", type=int, default=20000)
    parser.add_argument("--n-steps", type=int, default=25)
    parser.add_argument("--denoiser", default="dit", choices=["dit", "mlp"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    import latentcell as lc

    adata = lc.datasets.synthetic_counts(
        n_cells=args.n_cells, n_genes=args.n_genes, n_cell_types=8, n_batches=2, seed=0
    )
    lc.LatentDiffusionModel.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    results = {
        "protocol": __doc__,
        "accelerator": args.accelerator,
        "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": {},
    }
    for name, compiled, precision in ROWS:
        results["rows"][name] = run_row(adata, compiled, precision, args)
        print(name, results["rows"][name], flush=True)
    table = markdown(results)
    print(table)
    write_results(args.out, f"accelerate_{args.accelerator}", results, table)
    return results


if __name__ == "__main__":
    main()
