"""Generation at unseen developmental times: paul15 pseudotime and pancreas stages.

Protocol (issue #6). A window of developmental time is removed from training; latentcell,
conditioned on time (``continuous_condition_keys``, seen by the flow only) and lineage
(``labels_key``), generates one cell per held-out cell at that cell's time and lineage, and
the generated cells are compared with the held-out ones.

- ``paul15`` (myeloid progenitors, slingshot pseudotime of two lineages, 240 genes): each cell
  belongs to the lineage of its larger curve weight ("shared" where both weights are 1) and
  takes that curve's pseudotime; held out: lineage-1 cells between the 40th and 60th
  percentile of lineage-1 pseudotime (the middle 20%), scored as a whole and in its lower and
  upper halves;
- ``pancreas`` (endocrinogenesis E15.5, 2000 HVGs of the training cells): time is the
  developmental stage of the cluster (Ductal 0, Ngn3 low EP 1, Ngn3 high EP 2,
  Pre-endocrine 3, Alpha/Beta/Delta/Epsilon 4), lineage is "endocrine" for the four
  hormone-cell clusters and "progenitor" otherwise; held out: Ngn3 high EP (stage 2).

Rows, all from this run, on the same split, the same number of cells as held out:
- latentcell: ``sample(conditions=held_out.obs[[lineage, time]])``;
- latentcell without time: the same model, time left to the flow (null token): what the
  time condition adds;
- nearest seen time: for each held-out cell, the training cell of the same lineage whose
  time is closest (real cells);
- latent interpolation: in latentcell's VAE, for each held-out cell, a random training cell
  of the window just below and one of the window just above (same width as the held-out
  window; for pancreas the neighbouring stages), their latent means mixed linearly by where
  the held-out time lies between the two windows' mean times, decoded with the first
  cell's library size;
- real-vs-real null: two random halves of the held-out cells.

Distances: :func:`latentcell.metrics.evaluate_generation` (energy distance, kNN two-sample
accuracy) in the evaluation space fit on the held-out cells (log1p(CP10k), PCA).

Usage: ``python benchmarks/time_trajectory.py [--dataset paul15 pancreas] [--seeds 0 1 2]
[--device cpu|cuda] [--quick]``. Writes ``results/time_trajectory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import DATA_DIR, add_device_arguments, resolve_accelerator, write_results

LINEAGE, TIME = "lineage", "time"
ROWS = (
    "latentcell",
    "latentcell without time",
    "nearest seen time",
    "latent interpolation",
)
PANCREAS_STAGE = {
    "Ductal": 0,
    "Ngn3 low EP": 1,
    "Ngn3 high EP": 2,
    "Pre-endocrine": 3,
    "Alpha": 4,
    "Beta": 4,
    "Delta": 4,
    "Epsilon": 4,
}


def load(name: str) -> tuple[ad.AnnData, np.ndarray, list[tuple[str, np.ndarray]]]:
    """Counts with ``obs[lineage, time]``, the held-out mask and the scored windows."""
    if name == "paul15":
        adata = ad.read_h5ad(DATA_DIR / "time" / "paul15_tradeseq_2660x240.h5ad")
        o = adata.obs
        w1, w2 = o["weight_curve1"].to_numpy(), o["weight_curve2"].to_numpy()
        lineage = np.where(w1 > w2, "1", np.where(w2 > w1, "2", "shared"))
        t = np.where(
            lineage == "1",
            o["pseudotime_curve1"],
            np.where(
                lineage == "2",
                o["pseudotime_curve2"],
                (o["pseudotime_curve1"] + o["pseudotime_curve2"]) / 2,
            ),
        )
        adata.obs = pd.DataFrame({LINEAGE: lineage, TIME: t.astype(float)}, index=o.index)
        in_1 = lineage == "1"
        lo, hi = np.quantile(t[in_1], [0.4, 0.6])
        held = in_1 & (t >= lo) & (t <= hi)
        mid = (lo + hi) / 2
        windows = [
            ("whole window", held),
            ("lower half", held & (t < mid)),
            ("upper half", held & (t >= mid)),
        ]
    elif name == "pancreas":
        adata = ad.read_h5ad(DATA_DIR / "time" / "pancreas_endocrinogenesis_veloviz_739x7192.h5ad")
        clusters = adata.obs["clusters"].astype(str).to_numpy()
        t = np.array([PANCREAS_STAGE[c] for c in clusters], dtype=float)
        lineage = np.where(t >= 4, "endocrine", "progenitor")
        adata.obs = pd.DataFrame({LINEAGE: lineage, TIME: t}, index=adata.obs.index)
        adata.X = sparse.csr_matrix(adata.X)
        adata.layers = {}
        held = clusters == "Ngn3 high EP"
        windows = [("Ngn3 high EP", held)]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return adata, held, windows


def select_genes(adata: ad.AnnData, train_mask: np.ndarray, n: int = 2000) -> ad.AnnData:
    """Keep the ``n`` most variable genes of the training cells (all if fewer)."""
    import scanpy as sc

    if adata.n_vars <= n:
        return adata
    a = adata[train_mask].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=n, flavor="seurat")
    return adata[:, a.var["highly_variable"].to_numpy()].copy()


def neighbour_windows(train: ad.AnnData, held: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Training cells just below and just above the held-out time window, same lineage."""
    lineage = held.obs[LINEAGE].iloc[0]
    t = train.obs[TIME].to_numpy()
    same = (train.obs[LINEAGE] == lineage).to_numpy()
    lo, hi = held.obs[TIME].min(), held.obs[TIME].max()
    width = max(hi - lo, 1e-9)
    below = np.flatnonzero(same & (t < lo) & (t >= lo - width))
    above = np.flatnonzero(same & (t > hi) & (t <= hi + width))
    if below.size == 0 or above.size == 0:  # discrete stages: the neighbouring stages
        below = np.flatnonzero(t == t[t < lo].max())
        above = np.flatnonzero(t == t[t > hi].min())
    return below, above


def nearest_seen(train: ad.AnnData, held: ad.AnnData, rng) -> ad.AnnData:
    """For each held-out cell, the training cell of its lineage with the closest time."""
    rows = []
    t = train.obs[TIME].to_numpy()
    for lineage, time_value in zip(held.obs[LINEAGE], held.obs[TIME], strict=True):
        cand = np.flatnonzero((train.obs[LINEAGE] == lineage).to_numpy())
        d = np.abs(t[cand] - time_value)
        best = cand[d == d.min()]
        rows.append(rng.choice(best))
    return train[np.asarray(rows)].copy()


def latent_interpolation(model, train, held, rng, seed) -> ad.AnnData:
    """Mix latents of random cells from the neighbouring windows by the held-out time."""
    import torch

    below, above = neighbour_windows(train, held)
    z = model.get_latent_representation(train, key_added=None)
    t = train.obs[TIME].to_numpy()
    t_lo, t_hi = t[below].mean(), t[above].mean()
    frac = np.clip((held.obs[TIME].to_numpy() - t_lo) / max(t_hi - t_lo, 1e-9), 0, 1)
    a = rng.choice(below, size=held.n_obs)
    b = rng.choice(above, size=held.n_obs)
    z_mix = (1 - frac)[:, None] * z[a] + frac[:, None] * z[b]
    codes = {k: np.asarray(v)[a] for k, v in model._registered_codes(train).items()}
    torch.manual_seed(seed)
    with torch.inference_mode():
        px = model._decode(torch.as_tensor(z_mix, dtype=torch.float32), codes)
        counts, _ = model._draw(px)["rna"]
    return ad.AnnData(X=counts, obs=held.obs.copy(), var=train.var[[]].copy())


def run(dataset: str, seed: int, accelerator: str, quick: bool) -> dict:
    import scvi

    import latentcell as lc

    adata, held_mask, windows = load(dataset)
    adata = select_genes(adata, ~held_mask)
    train = adata[~held_mask].copy()
    held = adata[held_mask].copy()
    scvi.settings.seed = seed
    lc.LatentDiffusionModel.setup_anndata(
        train, labels_key=LINEAGE, continuous_condition_keys=[TIME]
    )
    model = lc.LatentDiffusionModel(train)
    epochs = dict(max_epochs=3, flow_max_epochs=3) if quick else {}
    t0 = time.time()
    model.train(accelerator=accelerator, devices=1, enable_progress_bar=False, **epochs)
    fit = time.time() - t0
    rng = np.random.default_rng(seed)
    preds = {
        "latentcell": model.sample(
            conditions=held.obs[[LINEAGE, TIME]], seed=seed, progress_bar=False
        ),
        "latentcell without time": model.sample(
            conditions=held.obs[[LINEAGE]], seed=seed, progress_bar=False
        ),
        "nearest seen time": nearest_seen(train, held, rng),
        "latent interpolation": latent_interpolation(model, train, held, rng, seed),
    }
    out = {"fit_seconds": fit, "n_train": int(train.n_obs), "windows": {}}
    held_rows = np.flatnonzero(held_mask)
    for wname, wmask in windows:
        sel = np.isin(held_rows, np.flatnonzero(wmask))
        real = held[sel].copy()
        n_comps = min(30, real.n_obs - 1, real.n_vars - 1)
        space = lc.metrics.fit_eval_space(real, n_comps=n_comps, seed=seed)
        null = lc.metrics.real_vs_real_null(real, space=space, seed=seed)
        scores = {"n_cells": int(sel.sum()), "null_energy": null["energy_mean"]}
        for row, pred in preds.items():
            res = lc.metrics.evaluate_generation(real, pred[sel].copy(), space=space, seed=seed)
            scores[row] = {
                "energy": float(res["energy"]),
                "knn_accuracy": float(res["knn_accuracy"]),
            }
        out["windows"][wname] = scores
    return out


def markdown(results: dict) -> str:
    lines = [
        "| unseen time window | dataset / window | cells | "
        + " | ".join(ROWS)
        + " | real-vs-real null |",
        "|---|---|---:|" + "---:|" * (len(ROWS) + 1),
    ]
    for dataset, by_seed in results["per_dataset"].items():
        seeds = list(by_seed)
        for wname in by_seed[seeds[0]]["windows"]:
            w = [by_seed[s]["windows"][wname] for s in seeds]
            cells = [
                f"{np.mean([x[row]['energy'] for x in w]):.3f}"
                + (f" ± {np.std([x[row]['energy'] for x in w]):.3f}" if len(w) > 1 else "")
                for row in ROWS
            ]
            null = np.mean([x["null_energy"] for x in w])
            lines.append(
                f"| energy distance | {dataset} / {wname} | {w[0]['n_cells']} | "
                + " | ".join(cells)
                + f" | {null:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", nargs="+", choices=("paul15", "pancreas"), default=["paul15", "pancreas"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="3 epochs per stage (smoke test)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    accelerator = resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if not (DATA_DIR / "time").exists():
        print(f"skipped: {DATA_DIR / 'time'} not found (set LATENTCELL_DATA)")
        return {}
    results = {"protocol": __doc__, "seeds": args.seeds, "per_dataset": {}}
    for dataset in args.dataset:
        results["per_dataset"][dataset] = {}
        for seed in args.seeds:
            res = run(dataset, seed, accelerator, args.quick)
            results["per_dataset"][dataset][str(seed)] = res
            first = next(iter(res["windows"].values()))
            print(
                f"{dataset} seed {seed}: "
                + ", ".join(f"{r} {first[r]['energy']:.3f}" for r in ROWS)
                + f", null {first['null_energy']:.3f} (fit {res['fit_seconds']:.0f} s)",
                flush=True,
            )
    table = markdown(results)
    print(table)
    if not args.quick:
        write_results(args.out, "time_trajectory", results, table)
    return results


if __name__ == "__main__":
    main()
