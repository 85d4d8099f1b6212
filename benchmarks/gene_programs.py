"""Gene-program conditioning on pbmc3k: ask for a program high or low within a cell type.

Protocol: pbmc3k counts, 2,000 highly variable genes (seurat_v3) plus the program genes, a
seeded 80/20 split of cells; latentcell trained with its defaults on the 80%, conditioned
on the cell type and two programs (``setup_anndata(gene_programs=...)``):

- ``interferon``: type-I interferon response genes (ISG15, IFI6, IFIT1, IFIT3, MX1, ...);
- ``mhc_ii``: MHC class II antigen presentation (HLA-DRA, HLA-DRB1, HLA-DPA1, CD74, ...).

Activity is latentcell's documented score (``model.get_program_scores``: mean z-score of the
set's log1p(CP10k) expression). For each (cell type, program) in ``TARGETS``, 500 cells are
generated with the program ``"high"`` (90th percentile of the activity among training cells
of that type), ``"low"`` (10th) and unspecified (the baseline: unconditional in the program,
conditioned on the cell type), at guidance 1 and 2. Reported, all scored with the same
function on sampled counts:

- the requested program's mean activity in each set, and the shift high - low;
- the real reference on held-out cells of that type: their mean activity, and the mean of
  their top and bottom deciles (what high and low look like among real cells: the spread
  a request can be expected to reach);
- the other program's shift high - low (off-target), beside the shift implied by the two
  programs' coupling in real cells of that type (slope of one score on the other, times
  the requested program's generated shift);
- label accuracy: a logistic regression on a 30-component PCA of log1p(CP10k), trained on the
  real training cells, predicting the cell type of the generated cells (held-out real cells
  of that type give the ceiling).

Usage: ``python benchmarks/gene_programs.py [--seeds 0] [--device cuda|cpu]``. Writes
``results/gene_programs.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np

from _cli import DATA_DIR, add_device_arguments, resolve_accelerator, write_results

PROGRAMS = {
    "interferon": [
        "ISG15", "IFI6", "IFIT1", "IFIT2", "IFIT3", "MX1", "OAS1", "IFITM3", "LY6E", "ISG20",
        "IFI44L", "XAF1", "STAT1",
    ],
    "mhc_ii": [
        "HLA-DRA", "HLA-DRB1", "HLA-DRB5", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1", "HLA-DQB1",
        "CD74", "HLA-DMA", "HLA-DMB",
    ],
}  # fmt: skip
TARGETS = [
    ("CD14+ Monocytes", "interferon"),
    ("CD14+ Monocytes", "mhc_ii"),
    ("B cells", "mhc_ii"),
]
N_CELLS = 500


def load(seed: int):
    import scanpy as sc

    adata = ad.read_h5ad(DATA_DIR / "generation" / "pbmc3k_raw_counts_louvain_2638.h5ad")
    hvg = sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", inplace=False)[
        "highly_variable"
    ].to_numpy()
    genes = set(g for gs in PROGRAMS.values() for g in gs)
    adata = adata[:, hvg | adata.var_names.isin(list(genes))].copy()
    adata.obs = adata.obs[["cell_type"]].astype(str).astype("category")
    rng = np.random.default_rng(seed)
    held = rng.random(adata.n_obs) < 0.2
    return adata[~held].copy(), adata[held].copy()


def log_norm(x) -> np.ndarray:
    """Dense log1p(CP10k) (``latentcell.metrics.log1p_cp10k``)."""
    from latentcell.metrics import log1p_cp10k

    out = log1p_cp10k(x)
    return out.toarray() if hasattr(out, "toarray") else np.asarray(out)


def run_seed(seed: int, args) -> dict:
    import scvi
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    import latentcell as lc

    train, held = load(seed)
    lc.LatentDiffusionModel.setup_anndata(train, labels_key="cell_type", gene_programs=PROGRAMS)
    scvi.settings.seed = seed
    model = lc.LatentDiffusionModel(train)
    t0 = time.perf_counter()
    model.train(seed=seed, accelerator=args.accelerator, enable_progress_bar=False)
    fit_s = time.perf_counter() - t0

    pca = PCA(30, random_state=seed).fit(log_norm(train.X))
    clf = LogisticRegression(max_iter=3000).fit(
        pca.transform(log_norm(train.X)), train.obs["cell_type"].to_numpy()
    )
    held_scores = model.get_program_scores(held)
    out = {
        "fit_seconds": fit_s,
        "levels": model.program_stats_["levels"],
        "levels_by_label": model.program_stats_.get("levels_by_label", {}),
        "targets": {},
    }
    for cell_type, program in TARGETS:
        other = next(p for p in PROGRAMS if p != program)
        rows = (held.obs["cell_type"] == cell_type).to_numpy()
        real = held_scores[rows]
        lo, hi = np.percentile(real[program], [10, 90])
        slope = float(np.polyfit(real[program], real[other], 1)[0])
        ceiling = float((clf.predict(pca.transform(log_norm(held.X[rows]))) == cell_type).mean())
        entry = {
            "real_mean": float(real[program].mean()),
            "real_top_decile": float(real[program][real[program] >= hi].mean()),
            "real_bottom_decile": float(real[program][real[program] <= lo].mean()),
            "real_other_slope": slope,
            "label_accuracy_real_held_out": ceiling,
            "n_real_held_out": int(rows.sum()),
            "by_cfg": {},
        }
        for cfg in args.cfg:
            res = {}
            for level in ("high", "unspecified", "low"):
                conditions = {"cell_type": cell_type}
                if level != "unspecified":
                    conditions["programs"] = {program: level}
                gen = model.sample(
                    N_CELLS, conditions=conditions, cfg_scale=cfg, seed=seed, progress_bar=False
                )
                scores = model.get_program_scores(gen)
                res[level] = {
                    "program": float(scores[program].mean()),
                    "other": float(scores[other].mean()),
                    "label_accuracy": float(
                        (clf.predict(pca.transform(log_norm(gen.X))) == cell_type).mean()
                    ),
                }
            shift = res["high"]["program"] - res["low"]["program"]
            res["shift"] = shift
            res["other_shift"] = res["high"]["other"] - res["low"]["other"]
            res["other_shift_expected_from_coupling"] = slope * shift
            entry["by_cfg"][str(cfg)] = res
        out["targets"][f"{cell_type} / {program}"] = entry
        print(cell_type, program, entry["by_cfg"], flush=True)
    return out


def markdown(results: dict) -> str:
    runs = [results["runs"][str(s)] for s in results["seeds"]]

    def m(get):
        v = np.array([get(r) for r in runs])
        return f"{v.mean():.2f}" + (f" ± {v.std():.2f}" if len(v) > 1 else "")

    lines = [
        "| cell type / program | guidance | requested high / low | generated high | unspecified "
        "| low | shift high-low "
        "| real held-out: mean (bottom / top decile) | other program shift (expected from "
        "coupling) | label accuracy high / unspecified / low (real ceiling) |",
        "|---|---:|---|---:|---:|---:|---:|---|---|---|",
    ]
    for target in runs[0]["targets"]:
        for cfg in runs[0]["targets"][target]["by_cfg"]:

            def g(r, *keys, target=target, cfg=cfg):
                x = r["targets"][target]["by_cfg"][cfg]
                for k in keys:
                    x = x[k]
                return x

            def t(r, key, target=target):
                return r["targets"][target][key]

            def req(r, level, target=target):
                cell_type, program = target.split(" / ")
                return r["levels_by_label"][cell_type][program][level]

            lines.append(
                f"| {target} | {cfg} | {m(lambda r: req(r, 'high'))} / "
                f"{m(lambda r: req(r, 'low'))} | {m(lambda r: g(r, 'high', 'program'))} | "
                f"{m(lambda r: g(r, 'unspecified', 'program'))} | "
                f"{m(lambda r: g(r, 'low', 'program'))} | {m(lambda r: g(r, 'shift'))} | "
                f"{m(lambda r: t(r, 'real_mean'))} ({m(lambda r: t(r, 'real_bottom_decile'))} / "
                f"{m(lambda r: t(r, 'real_top_decile'))}) | "
                f"{m(lambda r: g(r, 'other_shift'))} "
                f"({m(lambda r: g(r, 'other_shift_expected_from_coupling'))}) | "
                f"{m(lambda r: g(r, 'high', 'label_accuracy'))} / "
                f"{m(lambda r: g(r, 'unspecified', 'label_accuracy'))} / "
                f"{m(lambda r: g(r, 'low', 'label_accuracy'))} "
                f"({m(lambda r: t(r, 'label_accuracy_real_held_out'))}) |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    results = {"protocol": __doc__, "programs": PROGRAMS, "seeds": args.seeds, "runs": {}}
    for seed in args.seeds:
        results["runs"][str(seed)] = run_seed(seed, args)
    table = markdown(results)
    print(table)
    write_results(args.out, "gene_programs", results, table)
    return results


if __name__ == "__main__":
    main()
