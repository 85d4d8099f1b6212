import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import latentcell as lc
from latentcell import LatentDiffusionModel as LDM

from .conftest import FAST_MODEL, FAST_TRAIN


def _snapshot(adata):
    return adata.X.copy(), adata.obs.copy(), adata.var.copy(), set(adata.layers), set(adata.uns)


def test_setup_registers_and_writes_only_registry_fields(synthetic):
    before = set(synthetic.obs.columns)
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type", batch_key="batch")
    added = set(synthetic.obs.columns) - before
    assert added <= {"_scvi_batch", "_scvi_labels"}
    model = LDM(synthetic, **FAST_MODEL)
    assert "Trained stages: none" in repr(model)
    assert model.module.flow.condition.n_cats_per_attr == [3, 2]


def test_setup_on_a_copy_keeps_the_originals_registration(synthetic):
    # a copy keeps uns["_scvi_uuid"]; registered under it, scvi-tools would replace the
    # original's registration and refuse models on the original ("Did you make a copy?")
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type", batch_key="batch")
    copy = synthetic.copy()
    LDM.setup_anndata(copy, layer="counts", labels_key="batch")
    assert copy.uns["_scvi_uuid"] != synthetic.uns["_scvi_uuid"]
    original, other = LDM(synthetic, **FAST_MODEL), LDM(copy, **FAST_MODEL)
    assert original.registry_["setup_args"]["batch_key"] == "batch"
    assert other.registry_["setup_args"]["batch_key"] is None
    # registering the same object again keeps its id
    uuid = copy.uns["_scvi_uuid"]
    LDM.setup_anndata(copy, layer="counts", labels_key="cell_type")
    assert copy.uns["_scvi_uuid"] == uuid


@pytest.mark.parametrize("denoiser", ["dit", "mlp"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_train_both_stages_and_sample(synthetic, denoiser, likelihood):
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, gene_likelihood=likelihood, denoiser=denoiser, **FAST_MODEL)
    model.train(**FAST_TRAIN)
    assert model.trained_stages_ == ["vae", "flow"]
    for key in ("elbo_train", "elbo_validation", "flow_loss_train", "flow_loss_validation"):
        assert key in model.history and len(model.history[key]) > 0
    gen = model.sample(
        n_samples=20, conditions={"cell_type": "type_1"}, n_steps=4, seed=0, progress_bar=False
    )
    assert gen.shape == (20, synthetic.n_vars)
    assert sparse.issparse(gen.X) and gen.X.dtype == np.float32
    assert np.array_equal(gen.X.data, np.round(gen.X.data)) and (gen.X.data >= 0).all()
    assert (gen.obs["cell_type"] == "type_1").all()
    assert list(gen.var_names) == list(synthetic.var_names)
    assert gen.obsm["X_latentcell"].shape == (20, 8)
    assert gen.layers["latentcell_mean"].shape == (20, synthetic.n_vars)


def test_history_keeps_both_stages_and_retraining_flow(trained):
    n_vae = len(trained.history["elbo_train"])
    trained.train(
        stage="flow",
        flow_max_epochs=3,
        accelerator="cpu",
        early_stopping=False,
        enable_progress_bar=False,
    )
    assert len(trained.history["elbo_train"]) == n_vae
    assert len(trained.history["flow_loss_train"]) == 3
    # the module was put back in train mode for the second run, and left in eval mode after
    assert not trained.module.training


def test_latent_representation(trained):
    adata = trained.adata
    z = trained.get_latent_representation()
    assert z.shape == (adata.n_obs, 8)
    np.testing.assert_allclose(adata.obsm["X_latentcell"], z)
    z2 = trained.get_latent_representation(indices=np.arange(10), key_added=None)
    np.testing.assert_allclose(z2, z[:10], rtol=1e-5, atol=1e-6)
    z3 = trained.get_latent_representation(key_added="other")
    assert "other" in adata.obsm
    np.testing.assert_allclose(z3, z, rtol=1e-5, atol=1e-6)


def test_sample_conditions_forms_and_seed(trained):
    kw = dict(n_steps=3, progress_bar=False)
    uncond = trained.sample(n_samples=7, seed=1, **kw)
    assert uncond.n_obs == 7 and "cell_type" not in uncond.obs
    assert "batch" in uncond.obs  # decoder batch drawn with the reference cell
    frame = pd.DataFrame(
        {"cell_type": ["type_0", "type_2", "type_2"], "batch": ["batch_1", "batch_0", "batch_1"]},
        index=["a", "b", "c"],
    )
    gen = trained.sample(conditions=frame, seed=2, **kw)
    assert list(gen.obs["cell_type"]) == ["type_0", "type_2", "type_2"]
    assert list(gen.obs["batch"]) == ["batch_1", "batch_0", "batch_1"]
    again = trained.sample(conditions=frame, seed=2, **kw)
    assert (gen.X != again.X).nnz == 0
    np.testing.assert_array_equal(gen.obsm["X_latentcell"], again.obsm["X_latentcell"])
    other = trained.sample(conditions=frame, seed=3, **kw)
    assert not np.allclose(gen.obsm["X_latentcell"], other.obsm["X_latentcell"])
    cont = trained.sample(n_samples=4, conditions={"score": 0.7, "cell_type": "type_1"}, **kw)
    np.testing.assert_allclose(cont.obs["score"], 0.7)
    for method in ("euler", "heun"):
        g = trained.sample(n_samples=3, method=method, cfg_scale=2.0, seed=0, **kw)
        assert g.n_obs == 3
    prior = trained.sample(n_samples=5, latent_prior="normal", seed=0, progress_bar=False)
    assert prior.uns["latentcell"]["latent_prior"] == "normal"
    per_cell = trained.sample(conditions={"cell_type": ["type_0", "type_1"]}, seed=0, **kw)
    assert list(per_cell.obs["cell_type"]) == ["type_0", "type_1"]


def test_library_size_drawn_from_matching_cells(trained):
    adata = trained.adata
    gen = trained.sample(
        n_samples=200, conditions={"cell_type": "type_0"}, n_steps=2, seed=0, progress_bar=False
    )
    lib = gen.layers["latentcell_mean"].sum(1)
    real = np.asarray(adata.layers["counts"].sum(1)).ravel()
    # decoder means sum to the drawn library size, which is a training library size
    assert np.isin(np.round(lib).astype(int), np.round(real).astype(int)).mean() > 0.95


def test_flow_conditioning_is_learned():
    adata = lc.datasets.synthetic_counts(n_cells=600, n_genes=40, n_cell_types=3, seed=5)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type")
    model = LDM(adata, n_latent=8, n_hidden=64, flow_n_hidden=64, flow_n_layers=2)
    model.train(
        max_epochs=60, flow_max_epochs=150, accelerator="cpu", seed=0, enable_progress_bar=False
    )
    z = model.get_latent_representation(key_added=None)
    labels = adata.obs["cell_type"].to_numpy()
    centroids = {c: z[labels == c].mean(0) for c in np.unique(labels)}
    gen = model.sample(
        n_samples=150, conditions={"cell_type": "type_2"}, n_steps=20, seed=0, progress_bar=False
    )
    zg = gen.obsm["X_latentcell"]
    dists = np.stack([np.linalg.norm(zg - centroids[c], axis=1) for c in sorted(centroids)], 1)
    nearest = np.array(sorted(centroids))[dists.argmin(1)]
    assert (nearest == "type_2").mean() > 0.9


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "model"
    trained.save(path)
    with pytest.raises(ValueError, match="overwrite"):
        trained.save(path)
    loaded = LDM.load(path, adata=trained.adata.copy(), accelerator="cpu")
    z0 = trained.get_latent_representation(key_added=None)
    z1 = loaded.get_latent_representation(key_added=None)
    np.testing.assert_array_equal(z0, z1)
    kw = dict(
        n_samples=12, conditions={"cell_type": "type_1"}, n_steps=3, seed=4, progress_bar=False
    )
    a, b = trained.sample(**kw), loaded.sample(**kw)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["X_latentcell"], b.obsm["X_latentcell"])
    assert set(loaded.history) == set(trained.history)
    # without data: sampling still works, reading cells needs an AnnData
    bare = LDM.load(path, accelerator="cpu")
    c = bare.sample(**kw)
    assert (a.X != c.X).nnz == 0
    with pytest.raises(ValueError, match="no AnnData"):
        bare.get_latent_representation()
    np.testing.assert_array_equal(
        bare.get_latent_representation(trained.adata.copy(), key_added=None), z0
    )
    trained.save(path, overwrite=True, save_anndata=True)
    with_data = LDM.load(path, accelerator="cpu")
    assert with_data.adata.n_obs == trained.adata.n_obs


def test_load_never_unpickles(trained, tmp_path):
    path = tmp_path / "model"
    trained.save(path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (path / "model.pt").write_bytes(pickle.dumps({"module": Evil()}))
    with pytest.raises(Exception):  # noqa: B017 - any refusal is fine, execution is not
        LDM.load(path, accelerator="cpu")
    assert not marker.exists()


# --------------------------------------------------------------------------- bad input
def _assert_unchanged(adata, snap):
    x, obs, var, layers, uns = snap
    if sparse.issparse(x):
        assert (adata.X != x).nnz == 0
    else:
        assert np.array_equal(adata.X, x, equal_nan=True)
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.layers) == layers and set(adata.uns) == uns


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x: x.__setitem__((0, 0), 0.5), "non-integer"),
        (lambda x: x.__setitem__((1, 1), -3.0), "negative"),
        (lambda x: x.__setitem__((2, 2), np.nan), "NaN or infinite"),
        (lambda x: x.__setitem__((2, 2), np.inf), "NaN or infinite"),
        (lambda x: x.__setitem__((slice(0, 2), slice(None)), 0.0), "2 of .* cells have no counts"),
    ],
)
def test_setup_rejects_bad_counts(synthetic, mutate, match):
    x = synthetic.X.toarray()
    mutate(x)
    synthetic.X = x
    snap = _snapshot(synthetic)
    with pytest.raises(ValueError, match=match):
        LDM.setup_anndata(synthetic, labels_key="cell_type")
    _assert_unchanged(synthetic, snap)


def test_setup_rejects_view_missing_layer_and_columns(synthetic):
    with pytest.raises(ValueError, match=r"view.*\.copy\(\)"):
        LDM.setup_anndata(synthetic[:10], layer="counts")
    with pytest.raises(ValueError, match="Layer 'raw' not found"):
        LDM.setup_anndata(synthetic, layer="raw")
    with pytest.raises(ValueError, match="'celltype' not found"):
        LDM.setup_anndata(synthetic, labels_key="celltype")
    synthetic.obs.loc[synthetic.obs_names[0], "score"] = np.nan
    snap = _snapshot(synthetic)
    with pytest.raises(ValueError, match="score.*NaN"):
        LDM.setup_anndata(synthetic, continuous_covariate_keys=["score"])
    _assert_unchanged(synthetic, snap)


def test_untrained_model_errors(synthetic):
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, **FAST_MODEL)
    with pytest.raises(RuntimeError, match="VAE stage .* not been trained"):
        model.get_latent_representation()
    with pytest.raises(RuntimeError, match="FLOW stage .* not been trained"):
        model.sample(n_samples=3)
    with pytest.raises(RuntimeError, match="VAE stage"):
        model.train(stage="flow")
    with pytest.raises(ValueError, match="stage must be"):
        model.train(stage="both")


def test_sample_bad_conditions(trained):
    with pytest.raises(ValueError, match=r"Unknown value\(s\) \['type_9'\].*Known values"):
        trained.sample(n_samples=2, conditions={"cell_type": "type_9"})
    with pytest.raises(ValueError, match=r"Unknown condition\(s\) \['tissue'\]"):
        trained.sample(n_samples=2, conditions={"tissue": "x"})
    with pytest.raises(ValueError, match="n_samples"):
        trained.sample()
    with pytest.raises(ValueError, match="rows"):
        trained.sample(n_samples=5, conditions=pd.DataFrame({"cell_type": ["type_0"]}))
    with pytest.raises(ValueError, match="method"):
        trained.sample(n_samples=2, method="rk4")


def test_query_gene_mismatch_and_view(trained, tmp_path):
    adata = trained.adata
    wrong = adata[:, adata.var_names[:-1]].copy()
    with pytest.raises(ValueError, match="1 genes missing"):
        trained.get_latent_representation(wrong)
    swapped = adata[:, list(adata.var_names[::-1])].copy()
    with pytest.raises(ValueError, match="different order"):
        trained.get_latent_representation(swapped)
    with pytest.raises(ValueError, match="view"):
        trained.get_latent_representation(adata[:5])
    trained.save(tmp_path / "m")
    with pytest.raises(ValueError, match="genes missing"):
        LDM.load(tmp_path / "m", adata=wrong)


def test_query_on_new_cells_uses_registry(trained):
    new = lc.datasets.synthetic_counts(n_cells=30, n_genes=40, seed=9)
    z = trained.get_latent_representation(new)
    assert z.shape == (30, 8) and np.isfinite(z).all()
    assert torch.is_tensor(torch.as_tensor(z))


def test_retraining_vae_resets_flow(synthetic):
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, **FAST_MODEL)
    model.train(**FAST_TRAIN)
    old_flow = model.module.flow
    model.train(stage="vae", max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    assert model.trained_stages_ == ["vae"]
    assert model.module.flow is not old_flow
    assert "flow_loss_train" not in model.history
    with pytest.raises(RuntimeError, match="FLOW stage"):
        model.sample(n_samples=2)
    model.train(stage="flow", flow_max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    assert model.sample(n_samples=2, n_steps=2, progress_bar=False).n_obs == 2


def test_vae_prior_sampling_after_vae_stage_only(synthetic):
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, **FAST_MODEL)
    model.train(stage="vae", max_epochs=2, accelerator="cpu", enable_progress_bar=False)
    gen = model.sample(n_samples=4, latent_prior="normal", seed=0, progress_bar=False)
    assert gen.n_obs == 4 and gen.uns["latentcell"]["latent_prior"] == "normal"


def test_get_normalized_expression_follows_scvi_conventions(trained):
    adata = trained.adata
    before = (set(adata.obsm), set(adata.layers))
    props = trained.get_normalized_expression()
    assert props.shape == (adata.n_obs, adata.n_vars)
    assert list(props.index) == list(adata.obs_names)
    assert list(props.columns) == list(adata.var_names)
    np.testing.assert_allclose(props.sum(1), 1.0, rtol=1e-4)
    # "latent" scales by each cell's observed library: the decoder's mean counts
    means = trained.get_normalized_expression(indices=[0, 5], library_size="latent")
    library = np.asarray(adata.layers["counts"][[0, 5]].sum(1)).ravel()
    np.testing.assert_allclose(means.sum(1), library, rtol=1e-4)
    sub = trained.get_normalized_expression(
        indices=[0, 5], gene_list=["gene_3", "gene_1"], library_size=1e4, return_numpy=True
    )
    np.testing.assert_allclose(sub, 1e4 * props.iloc[[0, 5]][["gene_3", "gene_1"]], rtol=1e-4)
    # decoding every cell in one batch changes the cells of the other batch only
    batches = adata.obs["batch"].astype(str).to_numpy()
    moved = trained.get_normalized_expression(transform_batch=batches[0])
    same = batches == batches[0]
    np.testing.assert_allclose(moved[same], props[same], rtol=1e-5)
    assert not np.allclose(moved[~same], props[~same])
    assert (set(adata.obsm), set(adata.layers)) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transform_batch": "nope"}, "not a registered batch"),
        ({"gene_list": ["gene_1", "nope"]}, "not among the model's genes"),
        ({"library_size": 0}, "positive number or 'latent'"),
    ],
)
def test_get_normalized_expression_rejects_bad_requests(trained, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trained.get_normalized_expression(**kwargs)


def test_get_normalized_expression_draws_from_the_posterior(trained):
    mean = trained.get_normalized_expression(indices=[0, 1, 2], return_numpy=True)
    draws = trained.get_normalized_expression(
        indices=[0, 1, 2], n_samples=4, return_mean=False, seed=0
    )
    assert draws.shape == (4, 3, trained.adata.n_vars)
    np.testing.assert_allclose(draws.sum(-1), 1.0, rtol=1e-4)
    assert not np.allclose(draws[0], draws[1])  # distinct posterior draws
    again = trained.get_normalized_expression(indices=[0, 1, 2], n_samples=4, seed=0)
    np.testing.assert_allclose(again.to_numpy(), draws.mean(0), rtol=1e-5)
    assert np.abs(draws.mean(0) - mean).max() < 0.05  # around the posterior-mean decoding
    with pytest.raises(ValueError, match="n_samples"):
        trained.get_normalized_expression(n_samples=0)


@pytest.fixture(scope="module")
def de_model():
    """A VAE trained long enough on synthetic data with known marker genes."""
    import scvi

    adata = lc.datasets.synthetic_counts(n_cells=400, n_genes=40, n_batches=1, seed=0)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type")
    scvi.settings.seed = 0
    model = LDM(adata, **FAST_MODEL)
    model.train(stage="vae", max_epochs=60, accelerator="cpu", seed=0, enable_progress_bar=False)
    return model


def _true_log2_fold_change(adata, group):
    """log2 ratio of the true expression proportions of ``group`` and of the other cells."""
    truth = adata.uns["ground_truth"]
    p = np.exp(np.asarray(truth["profiles"]))
    p /= p.sum(1, keepdims=True)
    types = list(truth["cell_types"])
    n = adata.obs["cell_type"].value_counts().reindex(types).to_numpy()
    i = types.index(group)
    others = np.delete(np.arange(len(types)), i)
    rest = (p[others] * n[others, None]).sum(0) / n[others].sum()
    return np.log2(p[i] / rest)


def test_differential_expression_recovers_the_true_markers(de_model):
    adata = de_model.adata
    obs_before = adata.obs.copy()
    de = de_model.differential_expression(groupby="cell_type", group1="type_0", seed=0, silent=True)
    assert set(de["comparison"]) == {"type_0 vs Rest"}
    assert {"proba_de", "lfc_mean", "is_de_fdr_0.05", "raw_mean1"} <= set(de.columns)
    de = de.loc[adata.var_names]
    truth = _true_log2_fold_change(adata, "type_0")
    assert np.corrcoef(de["lfc_mean"], truth)[0, 1] > 0.7
    markers = set(adata.var_names[truth > 3])  # the type's up-regulated genes
    top = de["proba_de"].sort_values(ascending=False).index[: len(markers)]
    assert len(markers & set(top)) >= len(markers) - 2
    assert (de.loc[list(markers), "lfc_mean"] > 1).sum() >= len(markers) - 1
    fig = lc.pl.volcano(de, n_labels=3, return_fig=True)
    assert {t.get_text() for t in fig.axes[0].texts} == set(de["proba_de"].nlargest(3).index)
    pd.testing.assert_frame_equal(adata.obs, obs_before)  # the temporary column is gone


def test_differential_expression_by_indices_and_vanilla_mode(de_model):
    adata = de_model.adata
    is_0 = (adata.obs["cell_type"] == "type_0").to_numpy()
    de = de_model.differential_expression(
        idx1=is_0, idx2=~is_0, mode="vanilla", seed=0, silent=True, all_stats=False
    )
    assert "bayes_factor" in de and "proba_de" not in de
    assert len(de) == adata.n_vars
    truth = pd.Series(_true_log2_fold_change(adata, "type_0"), index=adata.var_names)
    # Bayes factors of "group 1 > group 2" are highest for the up-regulated genes
    assert truth[de.index[:3]].min() > 1
    with pytest.raises(ValueError, match="either groupby"):
        de_model.differential_expression(groupby="cell_type", idx1=is_0)
    with pytest.raises(ValueError, match="not a column"):
        de_model.differential_expression(groupby="nope")
    obs_before = adata.obs.copy()
    with pytest.raises(ValueError, match=r"\['nope'\] not found .* groups are"):
        de_model.differential_expression(groupby="cell_type", group1="type_0", group2="nope")
    pd.testing.assert_frame_equal(adata.obs, obs_before)


def test_posterior_predictive_sample_matches_the_data_it_was_trained_on(de_model):
    import sparse as pydata_sparse

    adata = de_model.adata
    one = de_model.posterior_predictive_sample(seed=0)
    assert sparse.issparse(one) and one.shape == (adata.n_obs, adata.n_vars)
    values = one.toarray()
    assert np.all(values >= 0) and np.allclose(values, np.round(values))
    # per-gene means of the draws follow the observed means (log scale)
    observed = np.asarray(adata.layers["counts"].mean(0)).ravel()
    drawn = values.mean(0)
    assert np.corrcoef(np.log1p(observed), np.log1p(drawn))[0, 1] > 0.95
    again = de_model.posterior_predictive_sample(seed=0)
    assert (again != one).nnz == 0  # seeded
    many = de_model.posterior_predictive_sample(
        indices=[0, 3, 5], n_samples=3, gene_list=["gene_1", "gene_0"], seed=1
    )
    assert isinstance(many, pydata_sparse.GCXS) and many.shape == (3, 2, 3)
    with pytest.raises(ValueError, match="n_samples"):
        de_model.posterior_predictive_sample(n_samples=0)


def test_elbo_reconstruction_error_and_marginal_likelihood_as_scvi(de_model):
    adata = de_model.adata
    elbo = de_model.get_elbo()
    per_cell = de_model.get_elbo(return_mean=False)
    # (one latent drawn per cell, as in scVI: two calls differ a little)
    assert per_cell.shape == (adata.n_obs,) and per_cell.mean() == pytest.approx(elbo, rel=0.01)
    rec = de_model.get_reconstruction_error()
    assert list(rec) == ["reconstruction_loss"]
    # ELBO = -(reconstruction error + KL), and the KL is non-negative
    assert -elbo >= rec["reconstruction_loss"] > 0
    # a lower bound of the importance-sampled marginal log-likelihood
    assert de_model.get_marginal_ll(n_mc_samples=50) > elbo
    # cells whose counts were scrambled across genes fit the model worse
    scrambled = adata[:60].copy()
    x = scrambled.layers["counts"].toarray()
    rng = np.random.default_rng(0)
    scrambled.layers["counts"] = sparse.csr_matrix(rng.permuted(x, axis=1))
    assert de_model.get_elbo(scrambled) < de_model.get_elbo(indices=np.arange(60)) - 5
    assert de_model.get_reconstruction_error(indices=[0, 1], return_mean=False)[
        "reconstruction_loss"
    ].shape == (2,)
    with pytest.raises(ValueError, match="n_mc_samples must be at least 1"):
        de_model.get_marginal_ll(n_mc_samples=0)


def test_training_drops_only_lightnings_litlogger_tip(synthetic, caplog):
    import logging

    from latentcell.model._training import _LIGHTNING_RANK_ZERO

    lightning_log = logging.getLogger(_LIGHTNING_RANK_ZERO)
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, **FAST_MODEL)
    with caplog.at_level(logging.INFO, logger=_LIGHTNING_RANK_ZERO):
        model.train(max_epochs=1, flow_max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    lightning_records = [r for r in caplog.records if r.name == _LIGHTNING_RANK_ZERO]
    assert lightning_records  # Lightning's other messages ("GPU available: ...") still pass
    assert not any("litlogger" in r.getMessage() for r in lightning_records)
    assert not lightning_log.filters  # the filter is removed after training
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=_LIGHTNING_RANK_ZERO):
        lightning_log.info("try installing litlogger")  # outside train(): untouched
    assert [r.getMessage() for r in caplog.records] == ["try installing litlogger"]
