"""Batch correction by regeneration (``LatentDiffusionModel.correct_batch``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

import latentcell as lc
from latentcell.model._batch import CORRECTED_KEY

from .conftest import FAST_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress_bar=False, seed=0)


@pytest.fixture(scope="module")
def corrected_model():
    """A model trained long enough for the batch effect of the synthetic data to be learnt."""
    adata = lc.datasets.synthetic_counts(n_cells=600, n_genes=50, n_cell_types=3, seed=0)
    adata.obs["donor"] = adata.obs["batch"].astype(str).str.replace("batch", "donor")
    lc.LatentDiffusionModel.setup_anndata(
        adata, layer="counts", labels_key="cell_type", batch_key="batch"
    )
    model = lc.LatentDiffusionModel(adata, **FAST_MODEL)
    model.train(
        max_epochs=30, flow_max_epochs=40, accelerator="cpu", seed=0, enable_progress_bar=False
    )
    return model


def _mean_log(x, rows):
    x = x[rows]
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4).mean(0)


def test_flow_inversion_then_sampling_returns_the_latent(trained):
    z = torch.randn(20, trained.module.flow.n_latent)
    cat = trained.module.flow.condition.null_codes(20, torch.device("cpu"))
    cont = torch.zeros(20, trained.module.flow.condition.n_continuous)
    noise = trained.module.flow.invert(z, cat, cont, n_steps=40)
    back = trained.module.flow.sample(cat, cont, n_steps=40, method="midpoint", noise=noise)
    np.testing.assert_allclose(back.numpy(), z.numpy(), atol=1e-3)


def test_correcting_into_the_own_batch_keeps_each_cell(trained):
    own = trained.adata.obs["batch"].astype(str).to_numpy()
    out = trained.correct_batch(target_batch=own, n_steps=30, **QUIET)
    z, zc = out.obsm["X_latentcell"], out.obsm[CORRECTED_KEY]
    # the round trip noise -> latent -> noise is exact up to the solver's error
    assert np.abs(z - zc).mean() < 0.01 * z.std()
    np.testing.assert_allclose(z, trained.get_latent_representation(key_added=None), atol=1e-5)


def test_output_is_a_new_anndata_and_the_input_is_untouched(trained):
    adata = trained.adata
    before = (adata.obs.copy(), adata.layers["counts"].copy(), dict(adata.obsm))
    out = trained.correct_batch(target_batch="batch_0", n_steps=5, **QUIET)
    assert out is not adata and out.shape == adata.shape
    assert list(out.var_names) == list(adata.var_names)
    assert sparse.issparse(out.X) and out.X.dtype == np.float32
    assert np.array_equal(out.X.data, np.round(out.X.data))  # counts
    assert out.layers["latentcell_mean"].shape == adata.shape
    assert out.obsm[CORRECTED_KEY].shape == (adata.n_obs, FAST_MODEL["n_latent"])
    # source obs kept (the original batch too), so integration metrics see where cells came from
    assert out.obs["batch"].tolist() == adata.obs["batch"].tolist()
    assert list(out.obs["source_cell"]) == list(adata.obs_names)
    assert not any(c.startswith("_scvi") for c in out.obs.columns)
    assert out.uns["latentcell"]["target_batch"] == "batch_0"
    assert out.uns["latentcell"]["task"] == "correct_batch"
    assert adata.obs.equals(before[0])
    assert (adata.layers["counts"] != before[1]).nnz == 0
    assert set(adata.obsm) == set(before[2])


def test_correction_removes_most_of_the_synthetic_batch_effect(corrected_model):
    model = corrected_model
    obs = model.adata.obs
    own = model.correct_batch(target_batch=obs["batch"].astype(str).to_numpy(), **QUIET)
    out = model.correct_batch(target_batch="batch_0", **QUIET)
    before, after = [], []
    for ct in obs["cell_type"].cat.categories:
        b0 = ((obs["cell_type"] == ct) & (obs["batch"] == "batch_0")).to_numpy()
        b1 = ((obs["cell_type"] == ct) & (obs["batch"] == "batch_1")).to_numpy()
        reference = _mean_log(own.layers["latentcell_mean"], b0)
        before.append(np.abs(_mean_log(own.layers["latentcell_mean"], b1) - reference).mean())
        after.append(np.abs(_mean_log(out.layers["latentcell_mean"], b1) - reference).mean())
        # batch_0 cells asked to stay in batch_0 come back as they were
        np.testing.assert_allclose(
            _mean_log(out.layers["latentcell_mean"], b0), reference, atol=1e-3
        )
    # measured: 0.151 -> 0.067 on average over the three cell types (seed 0)
    assert np.mean(after) < 0.7 * np.mean(before), (before, after)


def test_decoder_strategy_keeps_the_latent_and_changes_only_the_decoder(corrected_model):
    out = corrected_model.correct_batch(target_batch="batch_0", strategy="decoder", **QUIET)
    np.testing.assert_array_equal(out.obsm["X_latentcell"], out.obsm[CORRECTED_KEY])
    assert out.uns["latentcell"]["strategy"] == "decoder"


def test_query_cells_labels_left_out_and_indices(corrected_model):
    query = corrected_model.adata[:50].copy()
    query.obs = query.obs[["cell_type", "batch", "score", "donor"]]
    out = corrected_model.correct_batch(
        query, target_batch="batch_1", use_labels=False, indices=np.arange(10, 30), **QUIET
    )
    assert out.n_obs == 20 and list(out.obs_names) == list(query.obs_names[10:30])
    assert np.isfinite(out.obsm[CORRECTED_KEY]).all()


def test_categorical_covariate_as_the_batch():
    adata = lc.datasets.synthetic_counts(n_cells=200, n_genes=30, seed=0)
    lc.LatentDiffusionModel.setup_anndata(
        adata, layer="counts", labels_key="cell_type", categorical_covariate_keys=["batch"]
    )
    model = lc.LatentDiffusionModel(adata, **FAST_MODEL)
    model.train(max_epochs=2, flow_max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    with pytest.raises(ValueError, match="no registered batch"):
        model.correct_batch(target_batch="batch_0")
    out = model.correct_batch(target_batch="batch_1", batch_key="batch", n_steps=3, **QUIET)
    assert out.uns["latentcell"]["batch_key"] == "batch"
    same = model.correct_batch(target_batch="batch_1", batch_key="batch", n_steps=3, **QUIET)
    np.testing.assert_array_equal(out.X.toarray(), same.X.toarray())  # seeded


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_batch=None), r"Pass target_batch=.*'batch_0', 'batch_1'"),
        (dict(target_batch="batch_9"), r"'batch_9'.*not seen in training.*'batch_0'"),
        (dict(target_batch=["batch_0"] * 3), "3 values for 300 cells"),
        (dict(target_batch="batch_0", batch_key="cell_type"), "not a registered batch column"),
        (dict(target_batch="batch_0", batch_key="nope"), r"registered batch.*\['batch'\]"),
        (dict(target_batch="batch_0", strategy="magic"), "strategy must be"),
        (dict(target_batch="batch_0", method="rk4"), "method must be one of"),
        (dict(target_batch="batch_0", indices=[]), "No cells to correct"),
    ],
)
def test_bad_requests_name_the_problem(trained, kwargs, match):
    obs = trained.adata.obs.copy()
    with pytest.raises(ValueError, match=match):
        trained.correct_batch(**kwargs)
    assert trained.adata.obs.equals(obs)


def test_untrained_model_and_ddpm_flow_are_refused():
    adata = lc.datasets.synthetic_counts(n_cells=120, n_genes=20, seed=0)
    lc.LatentDiffusionModel.setup_anndata(adata, layer="counts", batch_key="batch")
    model = lc.LatentDiffusionModel(adata, objective="ddpm", **FAST_MODEL)
    with pytest.raises(RuntimeError, match="has not been trained"):
        model.correct_batch(target_batch="batch_0")
    model.train(max_epochs=1, flow_max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    with pytest.raises(ValueError, match="objective='flow'"):
        model.correct_batch(target_batch="batch_0", **QUIET)
