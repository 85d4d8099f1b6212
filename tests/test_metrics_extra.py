from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.metrics import evaluate_generation, fit_eval_space, real_vs_real_null
from latentcell.metrics._evaluate import evaluate_by_condition
from latentcell.metrics._genes import gene_moment_correlation
from latentcell.metrics._prdc import precision_recall_density_coverage

# --------------------------------------------------------------------------- helpers


def _counts_adata(
    n_cells: int = 120,
    n_genes: int = 40,
    seed: int = 0,
    sparse: bool = False,
    rate_scale: np.ndarray | float = 1.0,
    prefix: str = "c",
) -> ad.AnnData:
    """Poisson counts from two populations ("A", "B") with different gene programmes."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(123).gamma(2.0, 1.5, size=(2, n_genes))
    idx = np.arange(n_cells) % 2
    rates = base[idx] * rate_scale
    library = rng.uniform(0.5, 1.5, size=(n_cells, 1))
    counts = rng.poisson(rates * library).astype(np.float32)
    x = sp.csr_matrix(counts) if sparse else counts
    obs = pd.DataFrame(
        {"cond": np.array(["A", "B"])[idx]}, index=[f"{prefix}{seed}_{i}" for i in range(n_cells)]
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=x, obs=obs, var=var)


def _cloud(n: int, d: int = 2, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=shift, size=(n, d))


# --------------------------------------------------------------------------- PRDC


def test_prdc_identical_sets():
    x = _cloud(300, seed=1)
    k = 5
    res = precision_recall_density_coverage(x, x.copy(), k=k)
    assert res["precision"] == 1.0
    assert res["recall"] == 1.0
    assert res["coverage"] == 1.0
    # Each real ball holds its centre plus its k neighbours (no ties), so the total count of
    # (generated point, real ball) memberships is n (k + 1): density = (k + 1) / k, i.e. ~1.
    assert res["density"] == pytest.approx((k + 1) / k)


def test_prdc_same_distribution_density_near_one():
    res = precision_recall_density_coverage(_cloud(1500, seed=2), _cloud(1500, seed=3), k=5)
    assert res["density"] == pytest.approx(1.0, abs=0.15)
    assert res["precision"] > 0.85 and res["recall"] > 0.85 and res["coverage"] > 0.85


def test_prdc_tiny_1d_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    gen = np.array([[0.5], [10.0]])
    # k = 1, neighbours exclude the point itself.
    # Real radii: 0 -> 1, 1 -> 1, 2 -> 1, 3 -> 1 (distance to the nearest other real point).
    # Generated radii: 0.5 -> 9.5, 10 -> 9.5.
    # Precision: 0.5 is within 0.5 <= 1 of real 0; 10 is 7 > 1 from real 3 -> 1/2.
    # Recall: ball(0.5, 9.5) = [-9, 10] holds all of 0..3 -> 4/4 = 1.
    # Density: 0.5 lies in the balls of real 0 and 1 (0.5 <= 1) but not 2 (1.5 > 1): 2;
    #          10 lies in none: 0. Density = (2 + 0) / (k * m) = 2 / 2 = 1.
    # Coverage: nearest generated point to real 0, 1 is 0.5 at 0.5 <= 1 (covered); to real 2
    #           at 1.5 > 1 and to real 3 at 2.5 > 1 (not covered) -> 2/4.
    res = precision_recall_density_coverage(real, gen, k=1)
    assert res == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5})


def test_prdc_far_away_cloud():
    res = precision_recall_density_coverage(_cloud(200, seed=4), _cloud(200, shift=50, seed=5))
    assert res["precision"] == pytest.approx(0.0)
    assert res["coverage"] == pytest.approx(0.0)
    assert res["density"] == pytest.approx(0.0)
    assert res["recall"] == pytest.approx(0.0)


def test_prdc_collapsed_generator():
    real = _cloud(300, seed=6)
    gen = np.repeat(real[:1], 50, axis=0)  # mode collapse onto one real cell
    res = precision_recall_density_coverage(real, gen, k=5)
    assert res["precision"] == 1.0
    assert res["recall"] <= 0.02  # generated radii are 0: only the collapsed-on cell
    assert res["coverage"] <= 0.05  # only real cells whose ball reaches that cell


def test_prdc_validation():
    x = _cloud(10)
    with pytest.raises(ValueError, match="more than k"):
        precision_recall_density_coverage(x, x[:5], k=5)
    with pytest.raises(ValueError, match="positive integer"):
        precision_recall_density_coverage(x, x, k=0)
    with pytest.raises(ValueError, match="same number of columns"):
        precision_recall_density_coverage(x, _cloud(10, d=3))


# --------------------------------------------------------------------------- gene moments


@pytest.mark.parametrize("sparse", [False, True])
def test_gene_moments_identical(sparse):
    real = _counts_adata(sparse=sparse)
    res = gene_moment_correlation(real, real.copy())
    assert res["mean_pearson"] == pytest.approx(1.0)
    assert res["var_pearson"] == pytest.approx(1.0)
    assert res["n_genes"] == real.n_vars


def test_gene_moments_sparse_matches_dense():
    dense = _counts_adata(seed=1)
    gen = _counts_adata(seed=2)
    sparse = _counts_adata(seed=1, sparse=True)
    a = gene_moment_correlation(dense, gen)
    b = gene_moment_correlation(sparse, gen)
    assert a["mean_pearson"] == pytest.approx(b["mean_pearson"])
    assert a["var_pearson"] == pytest.approx(b["var_pearson"])


def test_gene_moments_perturbation_lowers_correlation():
    real = _counts_adata(seed=0)
    same = _counts_adata(seed=1)
    scale = np.ones(40)
    scale[:10] = 8.0  # strongly up-regulate a quarter of the genes
    perturbed = _counts_adata(seed=1, rate_scale=scale)
    base = gene_moment_correlation(real, same)
    pert = gene_moment_correlation(real, perturbed)
    assert base["mean_pearson"] > 0.95
    assert pert["mean_pearson"] < base["mean_pearson"] - 0.05
    assert pert["var_pearson"] < base["var_pearson"]


def test_gene_moments_genes_subset_and_extra_genes():
    real = _counts_adata(seed=0)
    gen = _counts_adata(seed=1, n_genes=45)  # extra genes g40..g44 are ignored
    res = gene_moment_correlation(real, gen)
    assert res["n_genes"] == 40
    sub = gene_moment_correlation(real, gen, genes=["g3", "g1", "g2", "g7"])
    assert sub["n_genes"] == 4


def test_gene_moments_missing_genes_error():
    real = _counts_adata(seed=0)
    gen = _counts_adata(seed=1)[:, 5:].copy()
    with pytest.raises(ValueError, match=r"generated lacks 5 .*g0, g1"):
        gene_moment_correlation(real, gen)
    with pytest.raises(ValueError, match="real lacks"):
        gene_moment_correlation(real, _counts_adata(n_genes=45), genes=["g1", "g44"])
    with pytest.raises(ValueError, match="single string"):
        gene_moment_correlation(real, real, genes="g1")


def test_gene_moments_does_not_modify_inputs():
    real = _counts_adata(seed=0, sparse=True)
    gen = _counts_adata(seed=1)
    real_x, gen_x = real.X.toarray().copy(), gen.X.copy()
    gene_moment_correlation(real, gen, genes=["g5", "g0", "g9"])
    np.testing.assert_array_equal(real.X.toarray(), real_x)
    np.testing.assert_array_equal(gen.X, gen_x)
    assert list(real.var_names) == [f"g{j}" for j in range(40)]
    assert len(real.uns) == 0 and len(gen.uns) == 0


# --------------------------------------------------------------------------- evaluate_generation


OLD_KEYS = {"energy", "mmd", "knn_accuracy", "knn_auc", "n_real", "n_generated", "space"}
NEW_KEYS = {
    "precision",
    "recall",
    "density",
    "coverage",
    "gene_mean_pearson",
    "gene_var_pearson",
}


def test_evaluate_generation_new_keys_and_no_write_by_default():
    real, gen = _counts_adata(seed=0), _counts_adata(seed=1)
    res = evaluate_generation(real, gen, n_comps=10)
    assert set(res) == OLD_KEYS | NEW_KEYS
    assert len(gen.uns) == 0 and len(real.uns) == 0
    space = fit_eval_space(real, n_comps=10)
    z_r, z_g = space.transform(real), space.transform(gen)
    expected = precision_recall_density_coverage(z_r, z_g, k=5)
    for key, value in expected.items():
        assert res[key] == pytest.approx(value)
    moments = gene_moment_correlation(real, gen, genes=space.genes)
    assert res["gene_mean_pearson"] == pytest.approx(moments["mean_pearson"])
    assert res["gene_mean_pearson"] > 0.9


def test_evaluate_generation_key_added_is_json_friendly():
    real, gen = _counts_adata(seed=0), _counts_adata(seed=1)
    res = evaluate_generation(real, gen, labels_key="cond", n_comps=10, key_added="eval")
    stored = gen.uns["eval"]
    assert stored == res
    assert stored is not res
    text = json.dumps(stored)
    assert json.loads(text)["space"]["n_comps"] == 10
    assert "eval" not in real.uns
    with pytest.raises(ValueError, match="key_added"):
        evaluate_generation(real, gen, n_comps=10, key_added="")


# --------------------------------------------------------------------------- evaluate_by_condition


def test_evaluate_by_condition_rows_space_and_mean():
    real = _counts_adata(n_cells=160, seed=0)
    gen = _counts_adata(n_cells=160, seed=1)
    # Add a condition only in real and one too small in generated.
    real.obs["cond"] = real.obs["cond"].astype(str)
    gen.obs["cond"] = gen.obs["cond"].astype(str)
    real.obs.iloc[:12, 0] = "C"
    gen.obs.iloc[:4, 0] = "D"
    df = evaluate_by_condition(real, gen, "cond", n_comps=10)
    assert list(df.index) == ["A", "B", "mean"]
    assert df.index.name == "cond"
    cols = ["energy", "mmd", "knn_accuracy", "precision", "recall", "density", "coverage"]
    assert list(df.columns) == [*cols, "n_real", "n_generated"]
    assert sorted(df.attrs["skipped"]) == ["C", "D"]
    for c in cols:
        assert df.loc["mean", c] == pytest.approx(df.loc[["A", "B"], c].mean())
    assert df.loc["mean", "n_real"] == df.loc["A", "n_real"] + df.loc["B", "n_real"]
    # Rows use the space fit once on all real cells.
    space = fit_eval_space(real, n_comps=10)
    mask_r, mask_g = (real.obs["cond"] == "A").to_numpy(), (gen.obs["cond"] == "A").to_numpy()
    res_a = evaluate_generation(real[mask_r], gen[mask_g], space=space)
    assert df.loc["A", "energy"] == pytest.approx(res_a["energy"])
    assert df.loc["A", "coverage"] == pytest.approx(res_a["coverage"])
    assert df.loc["A", "n_real"] == mask_r.sum()
    assert df.attrs["space"]["n_comps"] == 10


def test_evaluate_by_condition_detects_bad_condition():
    real = _counts_adata(n_cells=160, seed=0)
    scale = np.ones(40)
    scale[:20] = 6.0
    good = _counts_adata(n_cells=160, seed=1)
    bad = _counts_adata(n_cells=160, seed=1, rate_scale=scale, prefix="x")
    # Generated: condition A from the good model, condition B from the perturbed one.
    gen = ad.concat([good[good.obs["cond"] == "A"], bad[bad.obs["cond"] == "B"]])
    df = evaluate_by_condition(real, gen, "cond", labels_key="cond", n_comps=10)
    assert "label_accuracy" in df.columns
    assert df.loc["B", "energy"] > df.loc["A", "energy"]
    assert df.loc["B", "knn_accuracy"] > df.loc["A", "knn_accuracy"]
    assert df.loc["B", "coverage"] < df.loc["A", "coverage"]


def test_evaluate_by_condition_errors():
    real, gen = _counts_adata(seed=0), _counts_adata(seed=1)
    with pytest.raises(ValueError, match="condition_key"):
        evaluate_by_condition(real, gen, "missing", n_comps=10)
    with pytest.raises(ValueError, match="min_cells"):
        evaluate_by_condition(real, gen, "cond", n_comps=10, min_cells=1000)
    with pytest.raises(ValueError, match="min_cells"):
        evaluate_by_condition(real, gen, "cond", n_comps=10, min_cells=0)


# --------------------------------------------------------------------------- real_vs_real_null


def test_real_vs_real_null_new_keys():
    real = _counts_adata(n_cells=200, seed=0)
    null = real_vs_real_null(real, n_repeats=3, n_comps=10)
    for key in ("energy", "mmd", "knn_accuracy", "precision", "recall", "density", "coverage"):
        assert math.isfinite(null[f"{key}_mean"]) and null[f"{key}_std"] >= 0
    assert null["n_repeats"] == 3
    assert 0.3 < null["knn_accuracy_mean"] < 0.7
    assert null["precision_mean"] > 0.6 and null["coverage_mean"] > 0.6
    assert 0.6 < null["density_mean"] < 1.4


def test_real_vs_real_null_small_sets_stay_supported():
    real = _counts_adata(n_cells=6, n_genes=8, seed=0)
    null = real_vs_real_null(real, n_repeats=1, n_comps=3)
    assert null["energy_std"] == 0.0
    assert math.isnan(null["knn_accuracy_mean"])
    assert 0.0 <= null["precision_mean"] <= 1.0
