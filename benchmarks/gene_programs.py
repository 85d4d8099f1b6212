"""Gene-program conditioning on pbmc3k: ask for a program high or low within a cell type.

Protocol: pbmc3k counts, 2,000 highly variable genes (seurat_v3) plus the program genes, a
seeded 80/20 split of cells; latentcell trained with its defaults on the 80%, conditioned
on the cell type and two programs (``setup_anndata(gene_programs=...)``):

- ``interferon``: type-I interferon response genes (ISG15, IFI6, IFIT1, IFIT3, MX1, ...);
- ``mhc_ii``: MHC class II antigen presentation (HLA-DRA, HLA-DRB1, HLA-DPA1, CD74, ...).

Activity is latentcell's documented score (``model.get_program_scores``: mean z-score of the
set's log1p(CP10k) expression). The flow is conditioned on each training cell's *expected*
activity (``get_program_scores(expected=True)``: the score's expectation under the VAE at the
cell's latent, in the same units), because the score of one cell's counts is noisy and a
generator conditioned on it regresses toward the mean. For each (cell type, program) in
``TARGETS``, 500 cells are generated with the program ``"high"`` (90th percentile of the
expected activity among training cells of that type), ``"low"`` (10th) and unspecified (the
baseline: unconditional in the program, conditioned on the cell type), at guidance 1 and 2.
Reported, all scored with the same function on sampled counts (observed activity):

- the requested levels, and beside them the mean observed activity of the training cells of
  that type whose expected activity is at or beyond the level (real cells the model places
  there; they were selected on latents encoded from the same counts, which biases their
  observed mean away from the type's mean);
- the requested program's mean activity in each generated set, and the coverage: the share
  of the distance from the unspecified mean to the requested level that the generated mean
  covers (100%: the request is met on average);
- the real held-out cells of that type: their mean activity, and the mean of their top and
  bottom deciles of observed activity (inflated by count noise: not a reachable target);
- the other program's shift high - low (off-target), beside its shift between the real
  training cells at the two requested levels;
- label accuracy: a logistic regression on a 30-component PCA of log1p(CP10k), trained on the
  real training cells, predicting the cell type of the generated cells (held-out real cells
  of that type give the ceiling).

Usage: ``python benchmarks/gene_programs.py [--seeds 0] [--device cuda|cpu] [--merge
earlier.json ...]``. Writes
``results/gene_programs.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
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
    train_scores = model.get_program_scores()
    train_expected = model.get_program_scores(expected=True)
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
        ceiling = float((clf.predict(pca.transform(log_norm(held.X[rows]))) == cell_type).mean())
        # real cells at the requested levels: training cells of the type whose expected
        # activity (the flow's condition) is at or beyond the level
        requested = out["levels_by_label"][cell_type][program]
        own = (train.obs["cell_type"] == cell_type).to_numpy()
        expected, observed = train_expected[own], train_scores[own]
        at_high = (expected[program] >= requested["high"]).to_numpy()
        at_low = (expected[program] <= requested["low"]).to_numpy()
        entry = {
            "real_mean": float(real[program].mean()),
            "real_top_decile": float(real[program][real[program] >= hi].mean()),
            "real_bottom_decile": float(real[program][real[program] <= lo].mean()),
            "real_at_high": float(observed[program][at_high].mean()),
            "real_at_low": float(observed[program][at_low].mean()),
            "real_other_at_high": float(observed[other][at_high].mean()),
            "real_other_at_low": float(observed[other][at_low].mean()),
            "n_real_at_high_low": [int(at_high.sum()), int(at_low.sum())],
            # calibration: mean observed minus mean expected activity, training cells of the type
            "observed_minus_expected": float(observed[program].mean() - expected[program].mean()),
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
            res["shift"] = res["high"]["program"] - res["low"]["program"]
            res["other_shift"] = res["high"]["other"] - res["low"]["other"]
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
        "| cell type / program | guidance | requested high / low (real cells there) | generated "
        "high | unspecified | low | coverage high / low | real held-out: mean (bottom / top "
        "decile) | other program shift (real cells) | label accuracy high / unspecified / low "
        "(real ceiling) |",
        "|---|---:|---|---:|---:|---:|---|---|---|---|",
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

            def pct(get):
                v = 100 * np.array([get(r) for r in runs])
                return f"{v.mean():.0f}%" + (f" ± {v.std():.0f}" if len(v) > 1 else "")

            def coverage(r, level, target=target, cfg=cfg):
                # share of the way from the unspecified mean to the requested level
                base = g(r, "unspecified", "program", target=target, cfg=cfg)
                got = g(r, level, "program", target=target, cfg=cfg)
                return (got - base) / (req(r, level, target=target) - base)

            lines.append(
                f"| {target} | {cfg} | {m(lambda r: req(r, 'high'))} / "
                f"{m(lambda r: req(r, 'low'))} ({m(lambda r: t(r, 'real_at_high'))} / "
                f"{m(lambda r: t(r, 'real_at_low'))}) | {m(lambda r: g(r, 'high', 'program'))} | "
                f"{m(lambda r: g(r, 'unspecified', 'program'))} | "
                f"{m(lambda r: g(r, 'low', 'program'))} | "
                f"{pct(lambda r: coverage(r, 'high'))} / {pct(lambda r: coverage(r, 'low'))} | "
                f"{m(lambda r: t(r, 'real_mean'))} ({m(lambda r: t(r, 'real_bottom_decile'))} / "
                f"{m(lambda r: t(r, 'real_top_decile'))}) | "
                f"{m(lambda r: g(r, 'other_shift'))} "
                f"({m(lambda r: t(r, 'real_other_at_high') - t(r, 'real_other_at_low'))}) | "
                f"{m(lambda r: g(r, 'high', 'label_accuracy'))} / "
                f"{m(lambda r: g(r, 'unspecified', 'label_accuracy'))} / "
                f"{m(lambda r: g(r, 'low', 'label_accuracy'))} "
                f"({m(lambda r: t(r, 'label_accuracy_real_held_out'))}) |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--merge", nargs="*", default=[], help="JSON results of earlier runs (other seeds)"
    )
    args = parser.parse_args(argv)
    resolve_accelerator(parser, args)
    warnings.filterwarnings("ignore")
    results = {"protocol": __doc__, "programs": PROGRAMS, "seeds": args.seeds, "runs": {}}
    for seed in args.seeds:
        results["runs"][str(seed)] = run_seed(seed, args)
    for path in args.merge:
        results["runs"].update(json.loads(Path(path).read_text())["runs"])
    results["seeds"] = sorted(map(int, results["runs"]))
    table = markdown(results)
    print(table)
    write_results(args.out, "gene_programs", results, table)
    return results


if __name__ == "__main__":
    main()
