import numpy as np
import pytest

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


def test_synthetic_perturbations_through_shared_programs():
    singles = tuple(f"P{i}" for i in range(8))
    adata = lc.datasets.synthetic_perturbation(
        n_cells=400, n_genes=50, perturbations=singles, n_programs=4, seed=0
    )
    truth = adata.uns["ground_truth"]
    weights, lfc = truth["program_weights"], truth["log_fold_changes"]
    assert weights.shape == (8, 4)
    assert ((weights != 0).sum(1) == 2).all()
    assert set(np.abs(weights[weights != 0])) <= {0.5, 1.0}
    # every effect lies in the span of the four programs' gene vectors
    programs = np.linalg.lstsq(weights, lfc, rcond=None)[0]
    np.testing.assert_allclose(weights @ programs, lfc, atol=1e-8)
    assert np.linalg.matrix_rank(lfc) <= 4
    # without programs each single has its own tenth of the genes, and nothing else
    plain = lc.datasets.synthetic_perturbation(n_cells=200, n_genes=50, seed=0)
    assert "program_weights" not in plain.uns["ground_truth"]
    assert ((plain.uns["ground_truth"]["log_fold_changes"] != 0).sum(1) == 5).all()
    with pytest.raises(ValueError, match="n_programs must be at least 2"):
        lc.datasets.synthetic_perturbation(n_cells=50, n_programs=1)
