"""RNA -> protein translation on CITE-seq: latentcell against totalVI and a kNN baseline.

Protocol (issue #5). For each dataset and seed, 30% of cells are held out and their protein
counts hidden; the protein of each held-out cell is predicted from its RNA, and compared
with the measured protein:

- per protein, Pearson and Spearman correlation across held-out cells between predicted and
  measured log1p protein counts (proteins constant in the held-out cells are skipped), and
  their mean over proteins;
- energy distance between predicted and measured held-out cells in log1p protein space,
  beside the real-vs-real null (two random halves of the measured held-out cells, 5 splits)
  and the "training cells as prediction" floor (measured training proteins vs held-out).

Rows, all from this run and on the same split:
- latentcell (flow): ``translate(strategy="flow")`` of a model trained on the same data as
  totalVI: every cell's RNA (2000 HVGs of the training cells), protein for the training
  cells only (the held-out cells' protein rows are zero, which latentcell reads as "not
  measured"); point prediction = mean of the decoded protein means over 10 draws of the
  translation flow, energy also on one draw of counts;
- latentcell (encoder): the same model, decoding the RNA-only posterior mean (no flow);
- latentcell (flow, held-out cells unseen): trained on the training cells only (inductive);
- latentcell (nb_mixture, flow): ``protein_likelihood="nb_mixture"``, otherwise as the first
  row (the likelihood comparison behind the default);
- totalVI (scvi-tools): trained on all cells with the held-out cells' proteins set to zero
  in a batch of their own (totalVI's way to impute missing proteins: it sees the held-out
  RNA during training, latentcell does not), ``get_normalized_expression(transform_batch=
  "train", n_samples=25)`` protein foreground means;
- kNN: mean log1p protein of the 15 nearest training cells in a 30-component PCA of
  log1p(CP10k) RNA on the same HVGs (PCA fit on training cells).

Generation: the inductive latentcell model also generates as many joint cells as there are held-out
cells (``sample``); per modality, the energy distance to the held-out cells in the metrics
issue's evaluation space (:func:`latentcell.metrics.evaluate_generation`), beside the
real-vs-real null (:func:`latentcell.metrics.real_vs_real_null`).

Usage: ``python benchmarks/translation_citeseq.py [--seeds 0 1 2] [--device cpu|cuda]
[--quick] [--datasets 10x ECCITE] [--merge earlier.json ...] [--model-kwargs JSON]
[--name NAME]``. Writes ``results/<NAME>.json`` and ``.md`` (default
``translation_citeseq``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import sparse, stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import DATA_DIR, add_device_arguments, resolve_accelerator, write_results

DATASETS = {
    "ECCITE PBMC (500 cells, 49 proteins)": "citefuse_eccite_pbmc_500.h5mu",
    "10x PBMC 10k (200 cells, 14 proteins)": "scvi_pbmc_10k_protein_v3_200cells.h5mu",
}
ROWS = (
    "latentcell (flow)",
    "latentcell (encoder)",
    "latentcell (flow, held-out cells unseen)",
    "latentcell (nb_mixture, flow)",
    "totalVI",
    "kNN (15 neighbours, RNA PCA)",
)
HELD_OUT = 0.3
N_HVG = 2000


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def load(name: str):
    """RNA and protein AnnData of a dataset (raw counts, same cells)."""
    import mudata

    mdata = mudata.read_h5mu(DATA_DIR / "citeseq" / name)
    rna, prot = mdata.mod["rna"].copy(), mdata.mod["prot"].copy()
    keep = (_dense(rna.X).sum(1) > 0) & (_dense(prot.X).sum(1) > 0)
    return rna[keep].copy(), prot[keep].copy()


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_held = round(HELD_OUT * n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def hvgs(rna, train_idx) -> np.ndarray:
    """2000 highly variable genes of the training cells (scanpy, seurat flavour on log1p)."""
    import scanpy as sc

    a = rna[train_idx].copy()
    sc.pp.filter_genes(a, min_cells=3)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(N_HVG, a.n_vars), flavor="seurat")
    return a.var_names[a.var["highly_variable"]].to_numpy()


def correlations(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Per-protein Pearson and Spearman of log1p values (columns), and their means."""
    pearson, spearman = [], []
    for j in range(truth.shape[1]):
        t, p = truth[:, j], pred[:, j]
        if np.ptp(t) == 0 or np.ptp(p) == 0:
            pearson.append(np.nan)
            spearman.append(np.nan)
            continue
        pearson.append(stats.pearsonr(p, t)[0])
        spearman.append(stats.spearmanr(p, t)[0])
    return {
        "pearson": float(np.nanmean(pearson)),
        "spearman": float(np.nanmean(spearman)),
        "pearson_per_protein": [float(v) for v in pearson],
        "spearman_per_protein": [float(v) for v in spearman],
    }


def energy_null(truth: np.ndarray, seed: int, n_repeats: int = 5) -> float:
    from latentcell.metrics import energy_distance

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_repeats):
        perm = rng.permutation(len(truth))
        half = len(truth) // 2
        values.append(energy_distance(truth[perm[:half]], truth[perm[half:]]))
    return float(np.mean(values))


def run_latentcell(
    rna,
    prot,
    genes,
    train_idx,
    held_idx,
    seed,
    accelerator,
    likelihood,
    quick,
    transductive,
    model_kwargs=None,
):
    import mudata
    import scvi

    import latentcell as lc

    if transductive:
        p = prot.copy()
        p.X = _dense(p.X).astype(np.float32)
        p.X[held_idx] = 0.0  # not measured
        mdata = mudata.MuData({"rna": rna[:, genes].copy(), "prot": p})
    else:
        mdata = mudata.MuData(
            {"rna": rna[train_idx][:, genes].copy(), "prot": prot[train_idx].copy()}
        )
    scvi.settings.seed = seed
    lc.LatentDiffusionModel.setup_mudata(mdata, modalities={"rna": "rna", "protein": "prot"})
    model = lc.LatentDiffusionModel(mdata, protein_likelihood=likelihood, **(model_kwargs or {}))
    epochs = dict(max_epochs=3, flow_max_epochs=3) if quick else {}
    t0 = time.time()
    model.train(accelerator=accelerator, devices=1, enable_progress_bar=False, **epochs)
    fit = time.time() - t0
    query = rna[held_idx][:, genes].copy()
    out = {"fit_seconds": fit, "n_epochs": {k: len(v) for k, v in model.history.items()}}
    draws = model.translate(query, n_samples=10, seed=seed, progress_bar=False)
    means = draws.layers["latentcell_mean"].reshape(len(held_idx), 10, -1).mean(1)
    one = _dense(draws.X).reshape(len(held_idx), 10, -1)[:, 0]
    out["flow"] = (np.log1p(means), np.log1p(one))
    enc = model.translate(query, strategy="encoder", seed=seed, progress_bar=False)
    out["encoder"] = (np.log1p(enc.layers["latentcell_mean"]), np.log1p(_dense(enc.X)))
    out["model"] = model
    return out


def run_totalvi(rna, prot, genes, held_idx, seed, accelerator, quick) -> np.ndarray:
    import mudata
    import scvi

    r = rna[:, genes].copy()
    p = prot.copy()
    p.X = _dense(p.X).astype(np.float32)
    p.X[held_idx] = 0.0
    mdata = mudata.MuData({"rna": r, "prot": p})
    group = np.full(r.n_obs, "train", dtype=object)
    group[held_idx] = "held_out"
    mdata.obs["split"] = group
    scvi.settings.seed = seed
    scvi.model.TOTALVI.setup_mudata(
        mdata,
        rna_layer=None,
        protein_layer=None,
        batch_key="split",
        modalities={"rna_layer": "rna", "protein_layer": "prot"},
    )
    model = scvi.model.TOTALVI(mdata)
    model.train(
        max_epochs=3 if quick else None,
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
    )
    _, protein = model.get_normalized_expression(
        indices=held_idx, transform_batch="train", n_samples=25, return_mean=True
    )
    return np.log1p(np.asarray(protein, dtype=np.float64))


def run_knn(rna, prot, genes, train_idx, held_idx, k: int = 15) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    x = _dense(rna[:, genes].X)
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    pca = PCA(n_components=min(30, len(train_idx) - 1), random_state=0).fit(x[train_idx])
    nn = NearestNeighbors(n_neighbors=k).fit(pca.transform(x[train_idx]))
    _, idx = nn.kneighbors(pca.transform(x[held_idx]))
    y = np.log1p(_dense(prot.X))[train_idx]
    return y[idx].mean(1)


def generation_scores(model, rna, prot, genes, held_idx, seed) -> dict:
    """Energy distance of generated joint cells to held-out cells, per modality, and the null."""
    import anndata as ad

    import latentcell as lc

    gen = model.sample(n_samples=len(held_idx), seed=seed, progress_bar=False)
    out = {}
    for name, real, fake in (
        ("rna", rna[held_idx][:, genes].copy(), gen.mod["rna"]),
        ("protein", prot[held_idx].copy(), gen.mod["prot"]),
    ):
        real = ad.AnnData(X=sparse.csr_matrix(_dense(real.X)), var=real.var[[]].copy())
        fake = ad.AnnData(X=sparse.csr_matrix(_dense(fake.X)), var=real.var[[]].copy())
        n_comps = min(30, real.n_vars - 1, real.n_obs - 1)
        scores = lc.metrics.evaluate_generation(real, fake, n_comps=n_comps, seed=seed)
        null = lc.metrics.real_vs_real_null(real, n_comps=n_comps, seed=seed)
        out[name] = {"energy": float(scores["energy"]), "null_energy": float(null["energy_mean"])}
    return out


def run(
    dataset: str,
    seed: int,
    accelerator: str,
    quick: bool,
    mixture: bool = True,
    model_kwargs: dict | None = None,
) -> dict:
    rna, prot = load(DATASETS[dataset])
    train_idx, held_idx = split(rna.n_obs, seed)
    genes = hvgs(rna, train_idx)
    truth = np.log1p(_dense(prot.X))[held_idx]
    preds = {}
    args = (rna, prot, genes, train_idx, held_idx, seed, accelerator)
    lc_nb = run_latentcell(*args, "nb", quick, True, model_kwargs)
    preds["latentcell (flow)"] = lc_nb["flow"]
    preds["latentcell (encoder)"] = lc_nb["encoder"]
    lc_ind = run_latentcell(*args, "nb", quick, False, model_kwargs)
    preds["latentcell (flow, held-out cells unseen)"] = lc_ind["flow"]
    lc_mix = run_latentcell(*args, "nb_mixture", quick, True, model_kwargs) if mixture else None
    if lc_mix is not None:
        preds["latentcell (nb_mixture, flow)"] = lc_mix["flow"]
    t0 = time.time()
    tv = run_totalvi(rna, prot, genes, held_idx, seed, accelerator, quick)
    totalvi_seconds = time.time() - t0
    preds["totalVI"] = (tv, tv)
    knn = run_knn(rna, prot, genes, train_idx, held_idx)
    preds["kNN (15 neighbours, RNA PCA)"] = (knn, knn)

    from latentcell.metrics import energy_distance

    out = {"rows": {}, "proteins": prot.var_names.tolist()}
    for row, (point, draw) in preds.items():
        scores = correlations(point, truth)
        scores["energy_point"] = float(energy_distance(point, truth))
        scores["energy_draw"] = float(energy_distance(draw, truth))
        out["rows"][row] = scores
    out["null_energy"] = energy_null(truth, seed)
    out["train_as_prediction_energy"] = float(
        energy_distance(np.log1p(_dense(prot.X))[train_idx], truth)
    )
    out["fit_seconds"] = {
        "latentcell": lc_nb["fit_seconds"],
        "latentcell_inductive": lc_ind["fit_seconds"],
        "latentcell_nb_mixture": lc_mix["fit_seconds"] if lc_mix else None,
        "totalVI": totalvi_seconds,
    }
    out["generation"] = generation_scores(lc_ind["model"], rna, prot, genes, held_idx, seed)
    return out


def markdown(results: dict) -> str:
    lines = [
        "| RNA → protein, held-out 30% | dataset | mean Pearson | mean Spearman | "
        "energy (point) | energy (one draw) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    per = results["per_dataset"]
    for dataset, by_seed in per.items():
        seeds = list(by_seed)
        for row in ROWS:
            have = [s for s in seeds if row in by_seed[s]["rows"]]
            if not have:
                continue
            vals = {
                k: np.mean([by_seed[s]["rows"][row][k] for s in have])
                for k in ("pearson", "spearman", "energy_point", "energy_draw")
            }
            sd = np.std([by_seed[s]["rows"][row]["pearson"] for s in have])
            label = row if len(have) == len(seeds) else f"{row} (seed {', '.join(have)} only)"
            lines.append(
                f"| {label} | {dataset} | **{vals['pearson']:.3f}** ± {sd:.3f} | "
                f"{vals['spearman']:.3f} | {vals['energy_point']:.3f} | "
                f"{vals['energy_draw']:.3f} |"
            )
        null = np.mean([by_seed[s]["null_energy"] for s in seeds])
        floor = np.mean([by_seed[s]["train_as_prediction_energy"] for s in seeds])
        lines.append(
            f"| real-vs-real null (halves of held-out) / training cells as prediction | "
            f"{dataset} |  |  | {null:.3f} / {floor:.3f} |  |"
        )
    lines += [
        "",
        "| generated joint cells vs held-out (energy) | dataset | RNA | RNA null | protein | "
        "protein null |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dataset, by_seed in per.items():
        g = {
            (m, k): np.mean([by_seed[s]["generation"][m][k] for s in by_seed])
            for m in ("rna", "protein")
            for k in ("energy", "null_energy")
        }
        lines.append(
            f"| latentcell sample() | {dataset} | {g['rna', 'energy']:.3f} | "
            f"{g['rna', 'null_energy']:.3f} | {g['protein', 'energy']:.3f} | "
            f"{g['protein', 'null_energy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="3 epochs per stage (smoke test)")
    parser.add_argument(
        "--mixture-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds that also fit protein_likelihood='nb_mixture' (default: all)",
    )
    parser.add_argument(
        "--datasets",
        nargs="*",
        default=None,
        help="run only the datasets whose name contains one of these (default: all; none: "
        "only merge --merge files)",
    )
    parser.add_argument(
        "--merge",
        nargs="*",
        default=[],
        help="JSON results of earlier runs (other seeds) to merge into the table",
    )
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON keyword arguments of every latentcell model, e.g. "
        '\'{"use_batch_norm": "decoder", "use_layer_norm": "encoder"}\'',
    )
    parser.add_argument("--name", default="translation_citeseq", help="results file name")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    accelerator = resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    if not (DATA_DIR / "citeseq").exists():
        print(f"skipped: {DATA_DIR / 'citeseq'} not found (set LATENTCELL_DATA)")
        return {}
    chosen = [d for d in DATASETS if args.datasets is None or any(k in d for k in args.datasets)]
    results = {
        "protocol": __doc__,
        "model_kwargs": args.model_kwargs,
        "seeds": args.seeds if chosen else [],
        "per_dataset": {},
    }
    for dataset in chosen:
        results["per_dataset"][dataset] = {}
        for seed in args.seeds:
            mixture = args.mixture_seeds is None or seed in args.mixture_seeds
            res = run(dataset, seed, accelerator, args.quick, mixture, args.model_kwargs)
            results["per_dataset"][dataset][str(seed)] = res
            print(
                f"{dataset} seed {seed}: "
                + ", ".join(
                    f"{r} {res['rows'][r]['pearson']:.3f}" for r in ROWS if r in res["rows"]
                ),
                flush=True,
            )
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        for dataset, by_seed in earlier["per_dataset"].items():
            results["per_dataset"].setdefault(dataset, {}).update(by_seed)
            results["seeds"] = sorted({*results["seeds"], *map(int, by_seed)})
    table = markdown(results)
    print(table)
    if not args.quick:
        write_results(args.out, args.name, results, table)
    return results


if __name__ == "__main__":
    main()
