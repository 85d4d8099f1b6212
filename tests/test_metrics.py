from __future__ import annotations

import math
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from latentcell.metrics import (
    EvalSpace,
    energy_distance,
    evaluate_generation,
    fit_eval_space,
    knn_two_sample_accuracy,
    label_accuracy,
    log1p_cp10k,
    median_heuristic_bandwidths,
    mmd_rbf,
    real_vs_real_null,
    wasserstein,
)

# --------------------------------------------------------------------------- helpers


def _cloud(n: int, d: int = 5, shift: float = 0.0, scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(loc=shift, scale=scale, size=(n, d))


def _counts_adata(
    n_cells: int = 200,
    n_genes: int = 60,
    seed: int = 0,
    sparse: bool = False,
    rate_shift: float = 1.0,
) -> ad.AnnData:
    """Poisson counts from two cell types with different gene programmes."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(123).gamma(2.0, 1.5, size=(2, n_genes))
    labels = np.array(["A", "B"])[np.arange(n_cells) % 2]
    rates = base[np.arange(n_cells) % 2] * rate_shift
    library = rng.uniform(0.5, 1.5, size=(n_cells, 1))
    counts = rng.poisson(rates * library).astype(np.float32)
    x = sp.csr_matrix(counts) if sparse else counts
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{seed}_{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=x, obs=obs, var=var)


# --------------------------------------------------------------------------- energy distance


def test_energy_single_points_by_hand():
    assert energy_distance(np.array([[0.0]]), np.array([[1.0]])) == pytest.approx(2.0)


def test_energy_two_vs_two_by_hand():
    x = np.array([[0.0], [1.0]])
    y = np.array([[3.0], [5.0]])
    exy = (3 + 5 + 2 + 4) / 4  # all cross pairs
    exx = (0 + 1 + 1 + 0) / 4  # V-statistic: diagonal zeros included
    eyy = (0 + 2 + 2 + 0) / 4
    assert energy_distance(x, y) == pytest.approx(2 * exy - exx - eyy)  # 5.5


def test_energy_2d_matches_brute_force_and_chunking(monkeypatch):
    import latentcell.metrics._distances as dist

    x, y = _cloud(37, 3, seed=1), _cloud(23, 3, shift=0.3, seed=2)

    def mean_d(a, b):
        return np.mean(np.linalg.norm(a[:, None] - b[None], axis=-1))

    expected = 2 * mean_d(x, y) - mean_d(x, x) - mean_d(y, y)
    assert energy_distance(x, y) == pytest.approx(expected)
    mmd_one_block = mmd_rbf(x, y, 1.0)
    monkeypatch.setattr(dist, "_BLOCK_ENTRIES", 50)  # force many small blocks
    assert energy_distance(x, y) == pytest.approx(expected)
    assert mmd_rbf(x, y, 1.0) == pytest.approx(mmd_one_block, rel=1e-12)


def test_energy_identical_sample_is_zero():
    x = _cloud(50)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- MMD


def test_mmd_two_vs_two_by_hand():
    x = np.array([[0.0], [1.0]])
    y = np.array([[0.0], [3.0]])
    # k(a, b) = exp(-(a - b)^2 / (2 * 1^2)) with h = 1
    kxx = (math.exp(-0.5) + math.exp(-0.5)) / (2 * 1)  # off-diagonal pairs only
    kyy = (math.exp(-4.5) + math.exp(-4.5)) / (2 * 1)
    kxy = (1.0 + math.exp(-4.5) + math.exp(-0.5) + math.exp(-2.0)) / (2 * 2)
    expected = kxx + kyy - 2 * kxy
    assert mmd_rbf(x, y, bandwidths=1.0) == pytest.approx(expected)
    assert mmd_rbf(x, y, bandwidths=[1.0]) == pytest.approx(expected)


def test_mmd_sum_of_kernels_is_sum_of_mmds():
    x, y = _cloud(30, 2, seed=3), _cloud(40, 2, shift=1.0, seed=4)
    total = mmd_rbf(x, y, [0.5, 2.0])
    assert total == pytest.approx(mmd_rbf(x, y, 0.5) + mmd_rbf(x, y, 2.0))


def test_median_heuristic_bandwidths():
    from scipy.spatial.distance import pdist

    x, y = _cloud(20, 3, seed=5), _cloud(25, 3, seed=6)
    h_med = np.median(pdist(np.vstack([x, y])))
    np.testing.assert_allclose(
        median_heuristic_bandwidths(x, y), h_med * np.array([0.25, 0.5, 1, 2, 4])
    )
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(x, y, h_med * np.array([0.25, 0.5, 1, 2, 4])))
    # subsampling above 1000 points is deterministic
    big_x, big_y = _cloud(700, 2, seed=7), _cloud(700, 2, seed=8)
    np.testing.assert_array_equal(
        median_heuristic_bandwidths(big_x, big_y), median_heuristic_bandwidths(big_x, big_y)
    )


def test_mmd_bad_input():
    x = _cloud(10, 2)
    with pytest.raises(ValueError, match="positive"):
        mmd_rbf(x, x, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        mmd_rbf(x[:1], x)
    with pytest.raises(ValueError, match="same number of columns"):
        mmd_rbf(x, _cloud(10, 3))
    with pytest.raises(ValueError, match="2-D"):
        energy_distance(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        energy_distance(np.array([[np.nan]]), np.array([[0.0]]))


# --------------------------------------------------------------------------- Wasserstein


def test_wasserstein_shift_1d():
    x = np.array([[0.0], [1.0], [2.0]])
    assert wasserstein(x, x + 1.5, p=1) == pytest.approx(1.5)
    assert wasserstein(x, x + 1.5, p=2) == pytest.approx(1.5)
    assert wasserstein(x, x, p=2) == pytest.approx(0.0, abs=1e-12)


def test_wasserstein_unequal_sizes_by_hand():
    # mass 1/2 at 0 and 1/2 at 2 vs a single point at 1: every unit of mass moves 1
    assert wasserstein(np.array([[0.0], [2.0]]), np.array([[1.0]]), p=2) == pytest.approx(1.0)


def test_wasserstein_bad_p_and_missing_pot(monkeypatch):
    x = _cloud(5, 2)
    with pytest.raises(ValueError, match="p must"):
        wasserstein(x, x, p=0.5)
    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError, match="pip install pot"):
        wasserstein(x, x)


# --------------------------------------------------------------------------- ranking / null


def test_shift_ranking_and_same_distribution():
    x = _cloud(300, 5, seed=10)
    same = _cloud(300, 5, seed=11)
    small = _cloud(300, 5, shift=0.5, seed=12)
    large = _cloud(300, 5, shift=2.0, seed=13)
    bw = median_heuristic_bandwidths(x, same)
    for metric in (
        energy_distance,
        lambda a, b: mmd_rbf(a, b),
        lambda a, b: mmd_rbf(a, b, bw),
        lambda a, b: wasserstein(a[:150], b[:150]),
        lambda a, b: knn_two_sample_accuracy(a, b)["accuracy"],
    ):
        d_same, d_small, d_large = metric(x, same), metric(x, small), metric(x, large)
        assert d_same < d_small < d_large
    assert abs(mmd_rbf(x, same)) < 0.02
    assert energy_distance(x, same) < 0.1 * energy_distance(x, large)


def test_same_distribution_within_split_null_and_scale_detected():
    x = _cloud(400, 5, seed=20)
    same = _cloud(400, 5, seed=21)
    scaled = _cloud(400, 5, scale=2.0, seed=22)
    rng = np.random.default_rng(0)
    null_e, null_m = [], []
    for _ in range(10):
        order = rng.permutation(len(x))
        a, b = x[order[:200]], x[order[200:]]
        null_e.append(energy_distance(a, b))
        null_m.append(mmd_rbf(a, b))
    e_hi = np.mean(null_e) + 3 * np.std(null_e)
    m_hi = np.mean(null_m) + 3 * np.std(null_m)
    assert energy_distance(x, same) < e_hi
    assert mmd_rbf(x, same) < m_hi
    assert energy_distance(x, scaled) > 5 * e_hi
    assert mmd_rbf(x, scaled) > 5 * m_hi
    assert knn_two_sample_accuracy(x, scaled)["accuracy"] > 0.7


# --------------------------------------------------------------------------- classifiers


def test_knn_accuracy_same_vs_separated():
    x = _cloud(600, 5, seed=30)
    same = _cloud(600, 5, seed=31)
    far = _cloud(600, 5, shift=10.0, seed=32)
    res = knn_two_sample_accuracy(x, same)
    assert set(res) == {"accuracy", "auc"}
    assert abs(res["accuracy"] - 0.5) < 0.1
    assert abs(res["auc"] - 0.5) < 0.1
    res_far = knn_two_sample_accuracy(x, far)
    assert res_far["accuracy"] > 0.99
    assert res_far["auc"] > 0.99


def test_knn_accuracy_balances_and_is_seeded():
    x = _cloud(500, 3, seed=33)
    y = _cloud(80, 3, shift=3.0, seed=34)
    assert knn_two_sample_accuracy(x, y, seed=1) == knn_two_sample_accuracy(x, y, seed=1)
    assert knn_two_sample_accuracy(x, y)["accuracy"] > 0.9
    with pytest.raises(ValueError, match="k must"):
        knn_two_sample_accuracy(x, y, k=0)
    with pytest.raises(ValueError, match="test_size"):
        knn_two_sample_accuracy(x, y, test_size=1.5)


def test_label_accuracy_separable_clusters():
    rng = np.random.default_rng(40)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    real_labels = np.repeat(["a", "b", "c"], 100)
    real_x = centers[np.repeat([0, 1, 2], 100)] + rng.normal(size=(300, 2))
    gen_labels = np.repeat(["a", "b", "c"], 30)
    gen_x = centers[np.repeat([0, 1, 2], 30)] + rng.normal(size=(90, 2))
    assert label_accuracy(real_x, real_labels, gen_x, gen_labels) > 0.95
    # generated cells placed in the wrong cluster are counted as errors
    assert label_accuracy(real_x, real_labels, gen_x, np.roll(gen_labels, 30)) < 0.05
    with pytest.raises(ValueError, match="gen_labels"):
        label_accuracy(real_x, real_labels, gen_x, gen_labels[:-1])
    with pytest.raises(ValueError, match="exceeds"):
        label_accuracy(real_x[:5], real_labels[:5], gen_x, gen_labels, k=15)


# --------------------------------------------------------------------------- evaluation space


def test_log1p_cp10k_dense_sparse_and_zero_cells():
    counts = np.array([[1.0, 3.0], [0.0, 0.0]])
    expected = np.array([[np.log1p(2500.0), np.log1p(7500.0)], [0.0, 0.0]])
    np.testing.assert_allclose(log1p_cp10k(counts), expected)
    np.testing.assert_allclose(log1p_cp10k(sp.csr_matrix(counts)).toarray(), expected)


def test_eval_space_fit_on_real_only():
    real = _counts_adata(seed=0)
    space = fit_eval_space(real, n_comps=10, seed=0)
    assert isinstance(space, EvalSpace)
    z = space.transform(real)
    assert z.shape == (real.n_obs, 10)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-10)
    # identical to a PCA fit by hand on the normalised real cells
    x = np.asarray(real.X, dtype=np.float64)
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    ref = PCA(n_components=10, svd_solver="full").fit(x)
    np.testing.assert_allclose(np.abs(space.components), np.abs(ref.components_), atol=1e-8)
    # generated data does not change the space
    gen = _counts_adata(seed=1, rate_shift=3.0)
    res = evaluate_generation(real, gen, space=space)
    np.testing.assert_array_equal(space.transform(real), z)
    refit = fit_eval_space(real, n_comps=10, seed=0)
    np.testing.assert_array_equal(refit.components, space.components)
    assert res["space"]["n_comps"] == 10


def test_eval_space_dict_genes_and_hvg():
    import scanpy as sc

    real = _counts_adata(n_cells=300, n_genes=80, seed=0)
    space = fit_eval_space(real, n_comps=5, n_top_genes=30, seed=3)
    hvg = sc.pp.highly_variable_genes(
        real.copy(), flavor="seurat_v3", n_top_genes=30, inplace=False
    )
    assert space.genes == list(real.var_names[hvg["highly_variable"].to_numpy()])
    desc = space.to_dict()
    assert desc == {
        "space": "pca_log1p_cp10k",
        "n_comps": 5,
        "genes": space.genes,
        "seed": 3,
        "fit_on": "real",
    }
    assert space.to_dict(include_genes=False)["n_genes"] == 30
    full = fit_eval_space(real, n_comps=5, n_top_genes=500)
    assert full.genes == list(real.var_names)


def test_eval_space_missing_genes_and_gene_order():
    real = _counts_adata(seed=0)
    space = fit_eval_space(real, n_comps=5)
    gen = _counts_adata(seed=1)
    with pytest.raises(ValueError, match=r"g3, g7"):
        space.transform(gen[:, [g for g in gen.var_names if g not in {"g3", "g7"}]].copy())
    # permuted genes plus an extra gene give the same coordinates
    perm = gen[:, gen.var_names[::-1]].copy()
    extra = ad.concat(
        [perm, ad.AnnData(np.ones((gen.n_obs, 1)), obs=gen.obs, var=pd.DataFrame(index=["x"]))],
        axis=1,
    )
    np.testing.assert_allclose(space.transform(extra), space.transform(gen), atol=1e-10)


def test_eval_space_sparse_dense_and_layer():
    dense = _counts_adata(seed=0)
    sparse = _counts_adata(seed=0, sparse=True)
    s_dense = fit_eval_space(dense, n_comps=5)
    s_sparse = fit_eval_space(sparse, n_comps=5)
    np.testing.assert_allclose(s_dense.components, s_sparse.components, atol=1e-10)
    np.testing.assert_allclose(s_dense.transform(dense), s_dense.transform(sparse), atol=1e-10)
    layered = dense.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = np.zeros_like(layered.X)
    s_layer = fit_eval_space(layered, n_comps=5, layer="counts")
    np.testing.assert_allclose(s_layer.components, s_dense.components, atol=1e-10)
    with pytest.raises(ValueError, match="Layer 'nope'"):
        fit_eval_space(layered, layer="nope")


def test_eval_space_bad_input():
    real = _counts_adata(n_cells=20, n_genes=10)
    with pytest.raises(ValueError, match="n_comps"):
        fit_eval_space(real, n_comps=11)
    neg = real.copy()
    neg.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        fit_eval_space(neg, n_comps=3)


def test_inputs_not_modified():
    real = _counts_adata(seed=0)
    gen = _counts_adata(seed=1, sparse=True)
    real_x, gen_x = real.X.copy(), gen.X.copy()
    real_var, real_obs = real.var.copy(), real.obs.copy()
    fit_eval_space(real, n_comps=5, n_top_genes=20)
    evaluate_generation(real, gen, labels_key="cell_type", n_comps=5)
    real_vs_real_null(real, n_repeats=2, n_comps=5)
    np.testing.assert_array_equal(real.X, real_x)
    np.testing.assert_array_equal(gen.X.toarray(), gen_x.toarray())
    pd.testing.assert_frame_equal(real.var, real_var)
    pd.testing.assert_frame_equal(real.obs, real_obs)
    assert real.uns.keys() == set() and not real.obsm


# --------------------------------------------------------------------------- evaluate


def test_evaluate_generation_keys_and_null():
    real = _counts_adata(n_cells=300, seed=0)
    same = _counts_adata(n_cells=300, seed=1)
    shifted = _counts_adata(n_cells=300, seed=2, rate_shift=1.0)
    shifted.X[:, :20] = shifted.X[:, :20] * 5  # upregulate a gene programme
    res = evaluate_generation(real, same, labels_key="cell_type", n_comps=10)
    assert set(res) == {
        "energy",
        "mmd",
        "knn_accuracy",
        "knn_auc",
        "label_accuracy",
        "precision",
        "recall",
        "density",
        "coverage",
        "gene_mean_pearson",
        "gene_var_pearson",
        "n_real",
        "n_generated",
        "space",
    }
    assert res["n_real"] == 300 and res["n_generated"] == 300
    assert res["space"] == {
        "space": "pca_log1p_cp10k",
        "n_comps": 10,
        "n_genes": 60,
        "seed": 0,
        "fit_on": "real",
    }
    assert res["label_accuracy"] > 0.95
    null = real_vs_real_null(real, n_repeats=5, n_comps=10)
    assert set(null) == {"n_repeats"} | {
        f"{m}_{s}"
        for m in ("energy", "mmd", "knn_accuracy", "precision", "recall", "density", "coverage")
        for s in ("mean", "std")
    }
    assert null == real_vs_real_null(real, n_repeats=5, n_comps=10)
    assert res["energy"] < null["energy_mean"] + 3 * null["energy_std"]
    assert res["mmd"] < null["mmd_mean"] + 3 * null["mmd_std"]
    bad = evaluate_generation(real, shifted, n_comps=10)
    assert "label_accuracy" not in bad
    assert bad["energy"] > null["energy_mean"] + 5 * null["energy_std"]
    assert bad["mmd"] > null["mmd_mean"] + 5 * null["mmd_std"]
    assert bad["knn_accuracy"] > res["knn_accuracy"]


def test_evaluate_generation_reference_and_labels():
    real = _counts_adata(n_cells=100, seed=0)
    train = _counts_adata(n_cells=200, seed=5)
    gen = _counts_adata(n_cells=100, seed=1)
    gen.obs["cell_type"] = np.roll(gen.obs["cell_type"].to_numpy(), 1)  # wrong labels
    res = evaluate_generation(real, gen, labels_key="cell_type", reference=train, n_comps=5)
    assert res["label_accuracy"] < 0.05
    with pytest.raises(ValueError, match="labels_key 'missing'"):
        evaluate_generation(real, gen, labels_key="missing", n_comps=5)
    with pytest.raises(ValueError, match="n_repeats"):
        real_vs_real_null(real, n_repeats=0)
