import numpy as np

import latentcell as lc


def test_pbmc68k_counts_are_exact_integers():
    adata = lc.datasets.pbmc68k_counts()
    assert adata.shape == (700, 765)
    values = adata.X.data
    assert np.all(values >= 0) and np.array_equal(values, np.round(values))
    assert adata.obs["cell_type"].nunique() == 10
    assert (adata.layers["counts"] != adata.X).nnz == 0
    # normalising the recovered counts reproduces scanpy's stored log1p(CP10k) values
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    logn = np.log1p(adata.X.toarray() / ref.obs["n_counts"].to_numpy()[:, None] * 1e4)
    assert np.abs(logn - ref.raw.X.toarray()).max() < 0.01


def test_synthetic_is_seeded():
    a = lc.datasets.synthetic_counts(n_cells=50, n_genes=20, seed=3)
    b = lc.datasets.synthetic_counts(n_cells=50, n_genes=20, seed=3)
    assert (a.X != b.X).nnz == 0
    assert set(a.obs["cell_type"].cat.categories) == {"type_0", "type_1", "type_2"}
    assert a.X.sum(1).min() > 0
