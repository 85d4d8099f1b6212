from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.metrics import smoothed_gene_correlation, smoothing_matrix

# --------------------------------------------------------------------------- helpers


def _coords(n: int = 50, d: int = 2, seed: int = 0) -> np.ndarray:
    """Distinct random positions (continuous, so no distance ties)."""
    return np.random.default_rng(seed).uniform(0.0, 10.0, size=(n, d))


def _brute_smoothing(coords: np.ndarray, k: int) -> np.ndarray:
    """Dense neighbour-average matrix from all pairwise distances."""
    n = len(coords)
    dist = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)
    order = np.argsort(dist, axis=1, kind="stable")[:, : k + 1]
    s = np.zeros((n, n))
    s[np.arange(n)[:, None], order] = 1.0 / (k + 1)
    return s


def _brute_log1p_cp10k(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(counts * scale)


def _brute_correlation(real_counts, gen_counts, coords, k) -> np.ndarray:
    s = _brute_smoothing(coords, min(k, len(coords) - 1))
    a = s @ _brute_log1p_cp10k(real_counts)
    b = s @ _brute_log1p_cp10k(gen_counts)
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        if a[:, j].std() > 0 and b[:, j].std() > 0:
            out[j] = np.corrcoef(a[:, j], b[:, j])[0, 1]
    return out


def _spatial_adata(
    n_cells: int = 60,
    n_genes: int = 8,
    seed: int = 0,
    coords: np.ndarray | None = None,
    sparse: bool = False,
    flip: bool = False,
    with_coords: bool = True,
) -> ad.AnnData:
    """Poisson counts whose first genes follow a gradient along the first coordinate.

    ``flip=True`` reverses the gradients (high where the unflipped data are low).
    """
    rng = np.random.default_rng(seed)
    if coords is None:
        coords = _coords(n_cells, seed=100)
    x = coords[:, 0] / 10.0
    x = 1.0 - x if flip else x
    rates = np.full((n_cells, n_genes), 4.0)
    rates[:, 0] = 1.0 + 30.0 * x
    rates[:, 1] = 1.0 + 20.0 * x**2
    rates[:, 2] = 1.0 + 25.0 * (1.0 - x)
    counts = rng.poisson(rates).astype(np.float32)
    matrix = sp.csr_matrix(counts) if sparse else counts
    obs = pd.DataFrame(index=[f"cell{seed}_{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    if with_coords:
        adata.obsm["spatial"] = coords.copy()
    return adata


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


# --------------------------------------------------------------------------- smoothing_matrix


@pytest.mark.parametrize("k", [1, 3, 10])
def test_smoothing_matrix_matches_brute_force(k):
    coords = _coords(40, seed=1)
    s = smoothing_matrix(coords, n_neighbors=k)
    assert isinstance(s, sp.csr_matrix)
    assert s.shape == (40, 40)
    np.testing.assert_allclose(np.asarray(s.sum(axis=1)).ravel(), 1.0)
    assert np.all(np.diff(s.indptr) == k + 1)
    np.testing.assert_allclose(s.diagonal(), 1.0 / (k + 1))
    np.testing.assert_allclose(s.toarray(), _brute_smoothing(coords, k))


def test_smoothing_matrix_is_neighbourhood_mean():
    coords = _coords(30, seed=2)
    values = np.random.default_rng(3).normal(size=(30, 4))
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    nearest = np.argsort(dist, axis=1)[:, :6]
    expected = values[nearest].mean(axis=1)
    np.testing.assert_allclose(smoothing_matrix(coords, n_neighbors=5) @ values, expected)


def test_smoothing_matrix_by_hand_on_a_line():
    coords = np.array([[0.0], [1.0], [3.0], [7.0]])
    s = smoothing_matrix(coords, n_neighbors=1).toarray()
    expected = np.array(
        [
            [0.5, 0.5, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.0, 0.5, 0.5, 0.0],
            [0.0, 0.0, 0.5, 0.5],
        ]
    )
    np.testing.assert_allclose(s, expected)


def test_smoothing_matrix_clips_n_neighbors():
    coords = _coords(6, seed=4)
    s = smoothing_matrix(coords, n_neighbors=50)
    # Every cell averages over all six cells.
    np.testing.assert_allclose(s.toarray(), np.full((6, 6), 1.0 / 6))
    np.testing.assert_allclose(s.toarray(), smoothing_matrix(coords, n_neighbors=5).toarray())


def test_smoothing_matrix_zero_neighbours_and_single_cell():
    coords = _coords(5, seed=5)
    np.testing.assert_allclose(smoothing_matrix(coords, n_neighbors=0).toarray(), np.eye(5))
    np.testing.assert_allclose(smoothing_matrix(coords[:1], n_neighbors=10).toarray(), [[1.0]])


def test_smoothing_matrix_3d_coordinates():
    coords = _coords(35, d=3, seed=6)
    s = smoothing_matrix(coords, n_neighbors=4)
    np.testing.assert_allclose(s.toarray(), _brute_smoothing(coords, 4))
    # The third axis matters: dropping it changes the neighbourhoods.
    assert not np.allclose(s.toarray(), _brute_smoothing(coords[:, :2], 4))


def test_smoothing_matrix_accepts_lists_and_does_not_modify_input():
    coords = _coords(12, seed=7)
    before = coords.copy()
    s = smoothing_matrix(coords.tolist(), n_neighbors=3)
    np.testing.assert_allclose(s.toarray(), _brute_smoothing(coords, 3))
    np.testing.assert_array_equal(coords, before)


def test_smoothing_matrix_empty_raises():
    with pytest.raises(ValueError, match="at least one cell"):
        smoothing_matrix(np.zeros((0, 2)))


# ------------------------------------------------------------------ smoothed_gene_correlation


@pytest.mark.parametrize("k", [3, 10])
def test_smoothed_correlation_matches_brute_force(k):
    real = _spatial_adata(seed=0)
    generated = _spatial_adata(seed=1)
    result = smoothed_gene_correlation(real, generated, n_neighbors=k)
    assert isinstance(result, pd.Series)
    assert result.name == "smoothed_correlation"
    assert list(result.index) == list(real.var_names)
    expected = _brute_correlation(real.X, generated.X, real.obsm["spatial"], k)
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-10, atol=1e-12)
    # The gradient genes share the spatial pattern, so their smoothed profiles agree.
    assert np.all(result.iloc[:3] > 0.8)


def test_smoothed_correlation_identical_inputs_is_one():
    real = _spatial_adata(seed=2)
    result = smoothed_gene_correlation(real, real.copy(), n_neighbors=5)
    assert not result.isna().any()
    np.testing.assert_allclose(result.to_numpy(), 1.0)


def test_smoothed_correlation_anti_aligned_pattern_is_negative():
    real = _spatial_adata(seed=3)
    generated = _spatial_adata(seed=4, flip=True)
    result = smoothed_gene_correlation(real, generated, n_neighbors=8)
    # Normalisation to CP10k couples the genes, so the anti-alignment is not perfect.
    assert np.all(result.iloc[:3] < -0.4)
    expected = _brute_correlation(real.X, generated.X, real.obsm["spatial"], 8)
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["real", "generated"])
def test_smoothed_correlation_constant_gene_is_nan(which):
    real = _spatial_adata(seed=5)
    generated = _spatial_adata(seed=6)
    target = real if which == "real" else generated
    target.X[:, 4] = 0.0
    result = smoothed_gene_correlation(real, generated, n_neighbors=5)
    assert np.isnan(result["g4"])
    assert result.drop("g4").notna().all()
    expected = _brute_correlation(real.X, generated.X, real.obsm["spatial"], 5)
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-10, atol=1e-12)


def test_smoothed_correlation_genes_subset():
    real = _spatial_adata(seed=7)
    generated = _spatial_adata(seed=8)
    genes = ["g2", "g0", "g5"]
    result = smoothed_gene_correlation(real, generated, n_neighbors=6, genes=genes)
    assert list(result.index) == genes
    # Normalisation uses the selected genes only (library size over the subset).
    idx = [2, 0, 5]
    expected = _brute_correlation(real.X[:, idx], generated.X[:, idx], real.obsm["spatial"], 6)
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-10, atol=1e-12)


def test_smoothed_correlation_generated_gene_order_and_extra_genes():
    real = _spatial_adata(seed=9, n_genes=6)
    generated = _spatial_adata(seed=10, n_genes=8)
    # Generated genes in another order, with two genes real does not have.
    generated = generated[:, ["g7", "g3", "g0", "g5", "g1", "g6", "g2", "g4"]].copy()
    generated.var_names = ["extra1", "g3", "g0", "g5", "g1", "extra2", "g2", "g4"]
    result = smoothed_gene_correlation(real, generated, n_neighbors=5)
    assert list(result.index) == list(real.var_names)
    gen_counts = _dense(generated[:, list(real.var_names)].X)
    expected = _brute_correlation(real.X, gen_counts, real.obsm["spatial"], 5)
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-10, atol=1e-12)


def test_smoothed_correlation_layers():
    real = _spatial_adata(seed=11)
    generated = _spatial_adata(seed=12)
    expected = smoothed_gene_correlation(real, generated, n_neighbors=5)

    real_l = real.copy()
    real_l.layers["counts"] = real_l.X.copy()
    real_l.X = np.random.default_rng(0).uniform(size=real_l.shape).astype(np.float32)
    gen_l = generated.copy()
    gen_l.layers["raw"] = gen_l.X.copy()
    gen_l.X = np.zeros(gen_l.shape, dtype=np.float32)

    result = smoothed_gene_correlation(
        real_l, gen_l, n_neighbors=5, layer="counts", generated_layer="raw"
    )
    np.testing.assert_allclose(result.to_numpy(), expected.to_numpy(), rtol=1e-12)

    # Only one side from a layer: the other still reads X.
    result = smoothed_gene_correlation(real_l, generated, n_neighbors=5, layer="counts")
    np.testing.assert_allclose(result.to_numpy(), expected.to_numpy(), rtol=1e-12)


def test_smoothed_correlation_sparse_matches_dense():
    dense_real, dense_gen = _spatial_adata(seed=13), _spatial_adata(seed=14)
    sparse_real = _spatial_adata(seed=13, sparse=True)
    sparse_gen = _spatial_adata(seed=14, sparse=True)
    expected = smoothed_gene_correlation(dense_real, dense_gen, n_neighbors=7)
    pairs = [(sparse_real, sparse_gen), (sparse_real, dense_gen), (dense_real, sparse_gen)]
    for real, gen in pairs:
        result = smoothed_gene_correlation(real, gen, n_neighbors=7)
        np.testing.assert_allclose(result.to_numpy(), expected.to_numpy(), rtol=1e-10)
    brute = _brute_correlation(dense_real.X, dense_gen.X, dense_real.obsm["spatial"], 7)
    np.testing.assert_allclose(expected.to_numpy(), brute, rtol=1e-10, atol=1e-12)


def test_smoothed_correlation_generated_without_coordinates_and_custom_key():
    real = _spatial_adata(seed=15)
    generated = _spatial_adata(seed=16, with_coords=False)
    expected = smoothed_gene_correlation(real, generated, n_neighbors=4)
    np.testing.assert_allclose(
        expected.to_numpy(),
        _brute_correlation(real.X, generated.X, real.obsm["spatial"], 4),
        rtol=1e-10,
        atol=1e-12,
    )
    real.obsm["xy"] = real.obsm.pop("spatial")
    result = smoothed_gene_correlation(real, generated, spatial_key="xy", n_neighbors=4)
    np.testing.assert_allclose(result.to_numpy(), expected.to_numpy(), rtol=1e-12)


def test_smoothed_correlation_3d_positions():
    coords = _coords(50, d=3, seed=17)
    real = _spatial_adata(n_cells=50, seed=18, coords=coords)
    generated = _spatial_adata(n_cells=50, seed=19, coords=coords)
    result = smoothed_gene_correlation(real, generated, n_neighbors=6)
    expected = _brute_correlation(real.X, generated.X, coords, 6)
    np.testing.assert_allclose(result.to_numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_smoothed_correlation_does_not_modify_inputs(sparse):
    real = _spatial_adata(seed=20, sparse=sparse)
    generated = _spatial_adata(seed=21, sparse=sparse)
    generated.layers["counts"] = generated.X.copy()
    snapshots = [
        (real, _dense(real.X).copy(), real.obsm["spatial"].copy()),
        (generated, _dense(generated.X).copy(), generated.obsm["spatial"].copy()),
    ]
    layer_before = _dense(generated.layers["counts"]).copy()
    var_before = list(generated.var_names)
    smoothed_gene_correlation(real, generated, n_neighbors=5, generated_layer="counts")
    for adata, x_before, coords_before in snapshots:
        np.testing.assert_array_equal(_dense(adata.X), x_before)
        np.testing.assert_array_equal(adata.obsm["spatial"], coords_before)
        assert sp.issparse(adata.X) == sparse
    np.testing.assert_array_equal(_dense(generated.layers["counts"]), layer_before)
    assert list(generated.var_names) == var_before


# --------------------------------------------------------------------------- errors


def test_smoothed_correlation_different_cell_numbers():
    real = _spatial_adata(n_cells=60, seed=22)
    generated = _spatial_adata(n_cells=40, seed=23, with_coords=False)
    with pytest.raises(ValueError, match="generated has 40 cells and real 60"):
        smoothed_gene_correlation(real, generated)


def test_smoothed_correlation_mismatched_positions():
    real = _spatial_adata(seed=24)
    generated = _spatial_adata(seed=25)
    generated.obsm["spatial"] = generated.obsm["spatial"][::-1].copy()
    with pytest.raises(ValueError, match=r"generated\.obsm\['spatial'\] differs from real's"):
        smoothed_gene_correlation(real, generated)


def test_smoothed_correlation_tiny_position_noise_is_accepted():
    real = _spatial_adata(seed=26)
    generated = _spatial_adata(seed=27)
    generated.obsm["spatial"] = generated.obsm["spatial"] + 1e-6
    result = smoothed_gene_correlation(real, generated, n_neighbors=5)
    assert result.notna().all()


def test_smoothed_correlation_missing_spatial_key():
    real = _spatial_adata(seed=28, with_coords=False)
    generated = _spatial_adata(seed=29)
    with pytest.raises(ValueError, match="real.obsm has no 'spatial'"):
        smoothed_gene_correlation(real, generated)
    real = _spatial_adata(seed=28)
    with pytest.raises(ValueError, match="real.obsm has no 'xy'"):
        smoothed_gene_correlation(real, generated, spatial_key="xy")


def test_smoothed_correlation_gene_missing_from_generated():
    real = _spatial_adata(seed=30)
    generated = _spatial_adata(seed=31)[:, ["g0", "g1", "g2", "g3", "g4", "g5", "g6"]].copy()
    with pytest.raises(ValueError, match=r"1 gene\(s\).*missing.*g7"):
        smoothed_gene_correlation(real, generated)
    with pytest.raises(ValueError, match="missing.*nope"):
        smoothed_gene_correlation(real, _spatial_adata(seed=31), genes=["g0", "nope"])


def test_smoothed_correlation_missing_layer():
    real = _spatial_adata(seed=32)
    generated = _spatial_adata(seed=33)
    with pytest.raises(ValueError, match="Layer 'counts' not found"):
        smoothed_gene_correlation(real, generated, layer="counts")
    with pytest.raises(ValueError, match="Layer 'raw' not found"):
        smoothed_gene_correlation(real, generated, generated_layer="raw")
