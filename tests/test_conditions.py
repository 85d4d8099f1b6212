"""Continuous flow-only conditions: setup, sampling at any value, paths, learning, save/load."""

import numpy as np
import pandas as pd
import pytest
import scvi
from anndata import AnnData
from scipy import sparse, stats

from latentcell import LatentDiffusionModel as LDM
from latentcell._constants import CONT_CONDITIONS_FIELD

QUIET = dict(accelerator="cpu", enable_progress_bar=False)
FAST = dict(n_steps=8, progress_bar=False)
SMALL = dict(n_latent=8, n_hidden=32, flow_n_hidden=64, flow_n_layers=2, token_dim=4)
N_GENES, N_RISE, N_MARKER = 60, 12, 6
HOLD_OUT = (0.4, 0.6)

# Ground truth shared by every data set: gene g has mean base_g * exp(slope_g * t), with
# clearly rising (first N_RISE genes), falling (next N_RISE) and flat genes; the last
# N_MARKER genes are 6x higher in cell type "b".
_BIO = np.random.default_rng(7)
BASE = _BIO.lognormal(0.0, 0.7, N_GENES)
SLOPE = np.zeros(N_GENES)
SLOPE[:N_RISE] = _BIO.uniform(2.0, 3.0, N_RISE)
SLOPE[N_RISE : 2 * N_RISE] = -_BIO.uniform(1.5, 2.5, N_RISE)


def _time_data(n_cells=400, seed=0, hold_out=False, t=None, score=None):
    """Counts whose rising genes grow smoothly with obs['t'] in [0, 1]."""
    rng = np.random.default_rng(seed)
    if t is None:
        t = rng.uniform(0.0, 1.0, n_cells)
        if hold_out:
            t = t[(t <= HOLD_OUT[0]) | (t >= HOLD_OUT[1])]
    n = t.size
    ct = rng.integers(0, 2, n)
    lib = rng.lognormal(0.0, 0.2, (n, 1))
    mu = 3.0 * BASE * np.exp(SLOPE * t[:, None]) * lib
    mu[:, -N_MARKER:] *= np.where(ct[:, None] == 1, 6.0, 1.0)
    x = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1
    obs = pd.DataFrame(
        {"t": t, "cell_type": pd.Categorical(np.array(["a", "b"])[ct])},
        index=[f"c{i}" for i in range(n)],
    )
    if score is not None:
        obs["score"] = score
    var = pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)])
    return AnnData(sparse.csr_matrix(x), obs=obs, var=var)


def _rising(gen):
    """Log share of the rising genes in each generated cell's decoded mean."""
    mean = np.asarray(gen.layers["latentcell_mean"], dtype=float)
    return np.log(mean[:, :N_RISE].sum(1) / mean.sum(1))


def _snapshot(adata):
    return adata.obs.copy(), set(adata.obsm), set(adata.uns), adata.X.copy()


def _assert_unchanged(adata, snap):
    obs, obsm, uns, x = snap
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm) == obsm
    assert set(adata.uns) == uns
    assert (adata.X != x).nnz == 0


def _same(a, b):
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.layers["latentcell_mean"], b.layers["latentcell_mean"])
    np.testing.assert_array_equal(a.obsm["X_latentcell"], b.obsm["X_latentcell"])
    pd.testing.assert_frame_equal(a.obs, b.obs)


# --------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def timed():
    """Model conditioned on cell type and time, trained without cells with 0.4 < t < 0.6."""
    adata = _time_data(hold_out=True)
    LDM.setup_anndata(adata, labels_key="cell_type", continuous_condition_keys=["t"])
    scvi.settings.seed = 0
    model = LDM(adata, **SMALL)
    model.train(
        max_epochs=40,
        flow_max_epochs=100,
        lr=3e-3,
        flow_lr=3e-3,
        early_stopping=False,
        seed=0,
        **QUIET,
    )
    return model


@pytest.fixture(scope="module")
def both():
    """Tiny model with a decoder covariate ('score') and a flow-only condition ('t')."""
    rng = np.random.default_rng(3)
    adata = _time_data(n_cells=150, seed=3, score=rng.uniform(0, 1, 150))
    LDM.setup_anndata(
        adata,
        labels_key="cell_type",
        continuous_covariate_keys=["score"],
        continuous_condition_keys=["t"],
    )
    scvi.settings.seed = 0
    model = LDM(adata, encode_covariates=True, **SMALL)
    model.train(max_epochs=3, flow_max_epochs=3, early_stopping=False, seed=0, **QUIET)
    return model


# --------------------------------------------------------------------------- setup
def test_setup_registers_flow_only_field():
    adata = _time_data(n_cells=50)
    before = set(adata.obs.columns)
    LDM.setup_anndata(adata, labels_key="cell_type", continuous_condition_keys=["t"])
    assert set(adata.obs.columns) - before <= {"_scvi_batch", "_scvi_labels"}
    model = LDM(adata, **SMALL)
    assert CONT_CONDITIONS_FIELD in model.adata_manager.data_registry
    np.testing.assert_allclose(
        np.asarray(model.adata_manager.get_from_registry(CONT_CONDITIONS_FIELD)).ravel(),
        adata.obs["t"].to_numpy(),
        rtol=1e-6,
    )
    attrs = model._condition_attributes()
    assert attrs["continuous"] == ["t"] and attrs["n_cont_covs"] == 0
    assert [a["name"] for a in attrs["categorical"]] == ["cell_type"]
    assert model.module.flow.condition.n_continuous == 1
    codes = model._registered_codes(adata)
    assert codes["cont_covs"].shape == (50, 0)
    _, cont = model._flow_codes(codes)
    np.testing.assert_allclose(cont[:, 0], adata.obs["t"].to_numpy(), rtol=1e-6)
    assert "t" in repr(model)


@pytest.mark.parametrize("encode_covariates", [False, True])
def test_vae_never_gets_conditions_but_gets_covariates(encode_covariates):
    sizes = {}
    for name, kw in {
        "none": {},
        "condition": {"continuous_condition_keys": ["t", "score"]},
        "covariate": {"continuous_covariate_keys": ["t", "score"]},
    }.items():
        adata = _time_data(n_cells=60, score=np.linspace(0, 1, 60))
        LDM.setup_anndata(adata, labels_key="cell_type", **kw)
        model = LDM(adata, encode_covariates=encode_covariates, **SMALL)
        vae = model.module.vae
        sizes[name] = (
            vae.z_encoder.encoder.fc_layers[0][0].in_features,
            vae.decoder.px_decoder.fc_layers[0][0].in_features,
            model.module.flow.condition.n_continuous,
        )
    enc, dec, flow = sizes["none"]
    assert flow == 0
    assert sizes["condition"] == (enc, dec, 2)  # the flow only
    assert sizes["covariate"] == (enc + 2 * encode_covariates, dec + 2, 2)


def test_vae_latent_ignores_condition_values(both):
    """Changing t leaves the VAE's latent alone; changing the covariate does not."""
    adata = both.adata
    z = both.get_latent_representation(key_added=None)
    x = adata.X.copy()
    obs = adata.obs[["t", "cell_type", "score"]].copy()

    def query(**changes):
        new = AnnData(x.copy(), obs=obs.assign(**changes), var=adata.var.copy())
        return both.get_latent_representation(new, key_added=None)

    np.testing.assert_allclose(query(t=5.0 - obs["t"].to_numpy()), z, rtol=1e-5, atol=1e-6)
    assert np.abs(query(score=5.0 - obs["score"].to_numpy()) - z).max() > 1e-3


def test_key_in_both_lists_raises_and_leaves_adata():
    adata = _time_data(n_cells=30)
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="both"):
        LDM.setup_anndata(adata, continuous_covariate_keys=["t"], continuous_condition_keys=["t"])
    _assert_unchanged(adata, snap)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, "not found"),
        ("nan", "NaN"),
        ("inf", "NaN or infinite"),
        ("text", "numeric"),
    ],
)
def test_bad_condition_column_raises_and_leaves_adata(value, match):
    adata = _time_data(n_cells=30)
    if value == "nan":
        adata.obs.loc[adata.obs_names[3], "t"] = np.nan
    elif value == "inf":
        adata.obs.loc[adata.obs_names[3], "t"] = np.inf
    elif value == "text":
        adata.obs["t"] = adata.obs["t"].round(2).astype(str)
    key = "missing" if value is None else "t"
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=match):
        LDM.setup_anndata(adata, labels_key="cell_type", continuous_condition_keys=[key])
    _assert_unchanged(adata, snap)


# --------------------------------------------------------------------------- sample
@pytest.mark.parametrize("value", [0.35, 0.5, 1.0, -0.5, 1.7, 12])
def test_sample_any_finite_value(timed, value):
    gen = timed.sample(10, conditions={"t": value, "cell_type": "b"}, seed=0, **FAST)
    assert gen.shape == (10, N_GENES)
    assert gen.obs["t"].dtype == float
    np.testing.assert_array_equal(gen.obs["t"].to_numpy(), np.full(10, float(value)))
    assert (gen.obs["cell_type"] == "b").all()
    assert np.isfinite(gen.layers["latentcell_mean"]).all()
    assert gen.uns["latentcell"]["requested"] == ["t", "cell_type"]


def test_sample_without_condition_gives_nan(timed):
    for conditions in (None, {"cell_type": "a"}):
        gen = timed.sample(12, conditions=conditions, seed=1, **FAST)
        assert gen.obs["t"].isna().all()
        assert np.isfinite(gen.layers["latentcell_mean"]).all()


def test_sample_per_cell_values_and_dataframe(timed):
    values = np.linspace(-0.2, 1.2, 8)
    gen = timed.sample(conditions={"t": values}, seed=0, **FAST)
    np.testing.assert_allclose(gen.obs["t"].to_numpy(), values)
    frame = pd.DataFrame({"t": values, "cell_type": ["a", "b"] * 4}, index=list("abcdefgh"))
    gen = timed.sample(conditions=frame, seed=0, **FAST)
    np.testing.assert_allclose(gen.obs["t"].to_numpy(), values)
    assert list(gen.obs["cell_type"]) == ["a", "b"] * 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "soon"])
def test_sample_rejects_non_finite_values(timed, bad):
    with pytest.raises(ValueError, match="finite"):
        timed.sample(5, conditions={"t": bad}, **FAST)


def test_sample_same_seed_same_cells(timed):
    kw = dict(conditions={"t": 0.3, "cell_type": "a"}, **FAST)
    a, b = timed.sample(20, seed=4, **kw), timed.sample(20, seed=4, **kw)
    _same(a, b)
    c = timed.sample(20, seed=5, **kw)
    assert not np.array_equal(a.obsm["X_latentcell"], c.obsm["X_latentcell"])


def test_covariate_and_condition_together(both):
    attrs = both._condition_attributes()
    assert attrs["continuous"] == ["score", "t"] and attrs["n_cont_covs"] == 1
    gen = both.sample(10, conditions={"t": 0.25}, seed=0, **FAST)
    np.testing.assert_array_equal(gen.obs["t"], np.full(10, 0.25))
    # the decoder covariate comes from the reference cells, the flow-only condition does not
    seen = both.adata.obs["score"].to_numpy(np.float32)
    assert np.isin(gen.obs["score"].to_numpy(np.float32), seen).all()
    gen = both.sample(10, conditions={"score": 0.9}, seed=0, **FAST)
    assert gen.obs["t"].isna().all()
    np.testing.assert_allclose(gen.obs["score"], 0.9, rtol=1e-6)
    path = both.sample_path("score", 0, 1, n_points=3, n_per_point=2, seed=0, **FAST)
    np.testing.assert_allclose(path.obs["score"], np.repeat([0.0, 0.5, 1.0], 2), atol=1e-6)
    assert path.obs["t"].isna().all()


# --------------------------------------------------------------------------- sample_path
def test_sample_path_layout(timed):
    gen = timed.sample_path("t", 0, 1, n_points=5, n_per_point=3, seed=0, **FAST)
    assert gen.n_obs == 15
    np.testing.assert_allclose(gen.obs["t"], np.repeat(np.linspace(0, 1, 5), 3))
    np.testing.assert_array_equal(gen.obs["path_step"], np.repeat(np.arange(5), 3))
    assert gen.uns["latentcell"]["n_steps"] == FAST["n_steps"]

    values = [1.5, -0.3, 0.7]  # any order, beyond the range seen
    gen = timed.sample_path(
        "t", values=values, n_per_point=2, conditions={"cell_type": "b"}, seed=0, **FAST
    )
    np.testing.assert_allclose(gen.obs["t"], np.repeat(values, 2))
    np.testing.assert_array_equal(gen.obs["path_step"], [0, 0, 1, 1, 2, 2])
    assert (gen.obs["cell_type"] == "b").all()

    one = timed.sample_path("t", 0.2, 0.9, n_points=1, n_per_point=4, seed=0, **FAST)
    np.testing.assert_allclose(one.obs["t"], 0.2)


def test_sample_path_seed_and_sample_equivalence(timed):
    kw = dict(n_points=3, n_per_point=4, conditions={"cell_type": "a"}, seed=2, **FAST)
    a, b = timed.sample_path("t", 0, 1, **kw), timed.sample_path("t", 0, 1, **kw)
    _same(a, b)
    # the path is sample() with one row per cell
    direct = timed.sample(
        conditions=pd.DataFrame({"t": np.repeat([0.0, 0.5, 1.0], 4), "cell_type": ["a"] * 12}),
        seed=2,
        **FAST,
    )
    np.testing.assert_array_equal(direct.obsm["X_latentcell"], a.obsm["X_latentcell"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(key="cell_type", start=0, stop=1), "not a continuous condition"),
        (dict(key="nope", start=0, stop=1), "not a continuous condition"),
        (dict(key="t", start=0), "start and stop"),
        (dict(key="t", stop=1), "start and stop"),
        (dict(key="t"), "start and stop"),
        (dict(key="t", start=0, stop=1, n_points=0), "n_points"),
        (dict(key="t", values=[0.1, np.nan]), "finite"),
        (dict(key="t", values=[0.1, np.inf]), "finite"),
        (dict(key="t", start=0, stop=np.inf), "finite"),
        (dict(key="t", values=[]), "finite"),
        (dict(key="t", start=0, stop=1, n_per_point=0), "n_per_point"),
        (dict(key="t", start=0, stop=1, conditions={"t": 0.5}), "own condition"),
        (dict(key="t", start=0, stop=1, conditions={"cell_type": ["a", "b"]}), "one value"),
        (dict(key="t", start=0, stop=1, conditions={"unknown": 1}), "Unknown condition"),
        (dict(key="t", start=0, stop=1, conditions={"cell_type": "zzz"}), "Unknown value"),
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # linspace(0, inf)
def test_sample_path_errors(timed, kwargs, match):
    with pytest.raises(ValueError, match=match):
        timed.sample_path(**kwargs, n_steps=2, progress_bar=False)


def test_sample_path_needs_a_continuous_condition():
    adata = _time_data(n_cells=40)
    LDM.setup_anndata(adata, labels_key="cell_type")
    model = LDM(adata, **SMALL)
    with pytest.raises(ValueError, match="none"):
        model.sample_path("t", 0, 1)


# --------------------------------------------------------------------------- learning
def test_training_data_holds_no_cells_in_the_gap(timed):
    t = timed.adata.obs["t"].to_numpy()
    assert not ((t > HOLD_OUT[0]) & (t < HOLD_OUT[1])).any()
    assert t.min() < 0.05 and t.max() > 0.95


def test_learns_rising_genes_along_time(timed):
    """Known truth: the rising genes' share grows with t; so must the generated one."""
    gen = timed.sample_path("t", 0, 1, n_points=5, n_per_point=100, seed=0, **FAST)
    rising = _rising(gen)
    rho = stats.spearmanr(gen.obs["t"], rising)[0]
    assert rho > 0.8, rho
    means = np.array([rising[gen.obs["path_step"] == i].mean() for i in range(5)])
    assert (np.diff(means) > -0.05).all(), means
    assert means[-1] - means[0] > 0.6, means
    # the generated counts agree with the decoded means
    x = gen.X.toarray()
    share = x[:, :N_RISE].sum(1) / x.sum(1)
    assert stats.spearmanr(gen.obs["t"], share)[0] > 0.6
    # falling genes go the other way
    mean = np.asarray(gen.layers["latentcell_mean"])
    falling = np.log(mean[:, N_RISE : 2 * N_RISE].sum(1) / mean.sum(1))
    assert stats.spearmanr(gen.obs["t"], falling)[0] < -0.7


def test_interpolates_into_held_out_times(timed):
    """No training cell has 0.4 < t < 0.6, yet cells at t=0.5 lie between t=0.2 and 0.8."""
    gen = timed.sample_path("t", values=[0.2, 0.5, 0.8], n_per_point=150, seed=1, **FAST)
    rising = _rising(gen)
    lo, mid, hi = (rising[gen.obs["path_step"] == i].mean() for i in range(3))
    assert lo + 0.1 < mid < hi - 0.1, (lo, mid, hi)


def test_condition_changes_the_flow_output(timed):
    """The same noise at different t gives different latents (the condition is used)."""
    a = timed.sample(50, conditions={"t": 0.0}, seed=3, **FAST)
    b = timed.sample(50, conditions={"t": 1.0}, seed=3, **FAST)
    assert np.abs(a.obsm["X_latentcell"] - b.obsm["X_latentcell"]).mean() > 0.1
    assert _rising(b).mean() > _rising(a).mean() + 0.5


# --------------------------------------------------------------------------- persistence
def test_save_load_keeps_conditions(timed, tmp_path):
    path = tmp_path / "model"
    timed.save(path)
    kw = dict(n_points=3, n_per_point=5, conditions={"cell_type": "b"}, seed=7, **FAST)
    expected = timed.sample_path("t", -0.2, 1.2, **kw)

    loaded = LDM.load(path, adata=timed.adata.copy(), accelerator="cpu")
    assert loaded._condition_attributes()["continuous"] == ["t"]
    assert loaded.registry_["setup_args"]["continuous_condition_keys"] == ["t"]
    assert loaded.module.flow.condition.n_continuous == 1
    _same(loaded.sample_path("t", -0.2, 1.2, **kw), expected)
    one = dict(conditions={"t": 0.45, "cell_type": "a"}, seed=3, **FAST)
    _same(loaded.sample(6, **one), timed.sample(6, **one))

    bare = LDM.load(path, accelerator="cpu")
    assert bare.adata is None
    _same(bare.sample_path("t", -0.2, 1.2, **kw), expected)
    with pytest.raises(ValueError, match="own condition"):
        bare.sample_path("t", 0, 1, conditions={"t": 0.1})


def test_query_without_condition_column_names_it(timed):
    query = timed.adata[:10].copy()
    del query.obs["t"]
    for col in [c for c in query.obs.columns if c.startswith("_scvi")]:
        del query.obs[col]
    query.uns.pop("_scvi_uuid", None)
    query.uns.pop("_scvi_manager_uuid", None)
    before = query.obs.copy()
    with pytest.raises(ValueError, match=r"lacks the registered column\(s\) \['t'\]"):
        timed.get_latent_representation(query, key_added=None)
    pd.testing.assert_frame_equal(query.obs, before)
