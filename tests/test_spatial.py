"""Spatial conditioning: setup, neighbourhood summaries, sampling at positions, imputation."""

import inspect

import anndata
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from anndata import AnnData
from scipy import sparse

from latentcell import LatentDiffusionModel as LDM
from latentcell._constants import SPATIAL_FIELD
from latentcell.model import _spatial
from latentcell.model._spatial import neighbourhood_summary, simulate_holes
from latentcell.nn import ConditionEmbedding, FourierFeatures

QUIET = dict(accelerator="cpu", enable_progress_bar=False)
FAST = dict(n_steps=10, progress_bar=False)
TINY = dict(n_latent=4, n_hidden=32, flow_n_hidden=32, flow_n_layers=2)
N_GENES, N_UP = 40, 20  # genes 0-19 are high on the right (x > 50), genes 20-39 on the left
HIGH, LOW = 8.0, 1.0

# positions well inside the left and right halves of the [0, 100]^2 tissue
_POS = np.random.default_rng(11)
LEFT = np.c_[_POS.uniform(5, 40, 60), _POS.uniform(5, 95, 60)]
RIGHT = np.c_[_POS.uniform(60, 95, 60), _POS.uniform(5, 95, 60)]


def _spatial_data(n_cells=600, seed=0, flip=False, prefix="c", key="spatial", n_dims=2):
    """Poisson counts whose genes 0-19 are high for x > 50 (genes 20-39 for x < 50).

    ``flip`` swaps the two halves (a section with the opposite pattern).
    """
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n_cells, n_dims))
    right = (xy[:, 0] > 50) ^ flip
    mu = np.empty((n_cells, N_GENES))
    mu[:, :N_UP] = np.where(right[:, None], HIGH, LOW)
    mu[:, N_UP:] = np.where(right[:, None], LOW, HIGH)
    x = rng.poisson(mu).astype(np.float32)
    adata = AnnData(
        sparse.csr_matrix(x),
        obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )
    adata.obsm[key] = xy
    return adata


def _sections():
    """Two sections over the same coordinate range with opposite patterns (B is flipped)."""
    a = _spatial_data(300, seed=0, prefix="a")
    b = _spatial_data(300, seed=1, flip=True, prefix="b")
    a.obs["section"], b.obs["section"] = "A", "B"
    adata = anndata.concat([a, b])
    adata.obs["section"] = adata.obs["section"].astype("category")
    return adata


def _up_down(out):
    """Mean generated counts of genes 0-19 and of genes 20-39."""
    x = out.X.toarray()
    return x[:, :N_UP].mean(), x[:, N_UP:].mean()


def _region(adata):
    xy = adata.obsm["spatial"]
    return (xy[:, 0] > 60) & (xy[:, 1] < 40)


def _snapshot(adata):
    return (
        adata.X.copy(),
        adata.obs.copy(),
        {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        set(adata.uns),
    )


def _assert_unchanged(adata, snap):
    x, obs, obsm, uns = snap
    assert (adata.X != x).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm) == set(obsm)
    for k, v in obsm.items():
        np.testing.assert_array_equal(adata.obsm[k], v)
    assert set(adata.uns) == uns


def _same(a, b):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.layers["latentcell_mean"], b.layers["latentcell_mean"])
    np.testing.assert_array_equal(a.obsm["X_latentcell"], b.obsm["X_latentcell"])
    pd.testing.assert_frame_equal(a.obs, b.obs)


def _brute_neighbourhood(query, pool, latent, k, q_groups=None, p_groups=None, exclude=False):
    """Reference: sort every pool cell of the query's group by distance, take the first k."""
    m = len(query)
    q_groups = np.zeros(m, int) if q_groups is None else q_groups
    p_groups = np.zeros(len(pool), int) if p_groups is None else p_groups
    summary = np.empty((m, latent.shape[1] + 1))
    neighbours = np.empty((m, k), dtype=np.int64)
    for i in range(m):
        cand = np.flatnonzero(p_groups == q_groups[i])
        if exclude:
            cand = cand[cand != i]
        dist = np.sqrt(((pool[cand] - query[i]) ** 2).sum(axis=1))
        order = np.argsort(dist, kind="stable")[:k]
        chosen, d = cand[order], dist[order]
        summary[i, :-1] = latent[chosen].mean(axis=0)
        summary[i, -1] = np.log(d.mean() + 1e-6)
        neighbours[i] = chosen[np.arange(k) % len(chosen)]
    return summary, neighbours


# --------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """Spatial model (position + neighbourhood) trained on the left/right pattern."""
    adata = _spatial_data()
    LDM.setup_anndata(adata, spatial_key="spatial")
    scvi.settings.seed = 0
    model = LDM(adata, **TINY)
    model.train(max_epochs=30, flow_max_epochs=30, seed=0, **QUIET)
    return model


@pytest.fixture(scope="module")
def position_only():
    """spatial_neighbors=0: the flow sees the position only (coordinates in obsm['xy'])."""
    adata = _spatial_data(seed=2, key="xy")
    LDM.setup_anndata(adata, spatial_key="xy")
    scvi.settings.seed = 0
    model = LDM(adata, spatial_neighbors=0, **TINY)
    model.train(max_epochs=30, flow_max_epochs=30, seed=0, **QUIET)
    return model


@pytest.fixture(scope="module")
def sectioned():
    """Two sections (registered batches) with overlapping coordinates, opposite patterns."""
    adata = _sections()
    LDM.setup_anndata(adata, spatial_key="spatial", batch_key="section")
    scvi.settings.seed = 0
    model = LDM(adata, **TINY)
    model.train(max_epochs=30, flow_max_epochs=30, seed=0, **QUIET)
    return model


@pytest.fixture(scope="module")
def plain():
    """A non-spatial model, trained for one epoch (only its errors are tested)."""
    adata = _spatial_data(n_cells=100)
    LDM.setup_anndata(adata)
    scvi.settings.seed = 0
    model = LDM(adata, **TINY)
    model.train(max_epochs=1, flow_max_epochs=1, seed=0, **QUIET)
    return model


# --------------------------------------------------------------------------- setup
@pytest.mark.parametrize("n_dims", [2, 3])
def test_setup_registers_positions(n_dims):
    adata = _spatial_data(n_cells=80, n_dims=n_dims)
    obs_before, obsm_before = set(adata.obs.columns), set(adata.obsm)
    LDM.setup_anndata(adata, spatial_key="spatial")
    assert set(adata.obs.columns) - obs_before <= {"_scvi_batch", "_scvi_labels"}
    assert set(adata.obsm) == obsm_before
    model = LDM(adata, **TINY)
    assert SPATIAL_FIELD in model.adata_manager.data_registry
    np.testing.assert_allclose(
        np.asarray(model.adata_manager.get_from_registry(SPATIAL_FIELD)),
        adata.obsm["spatial"],
        rtol=1e-6,
    )
    condition = model.module.flow.condition
    assert condition.n_spatial == n_dims
    assert condition.n_context == TINY["n_latent"] + 1
    assert condition.n_attributes == 2  # no categorical or continuous conditions
    codes = model._registered_codes(adata)
    assert codes["spatial"].shape == (80, n_dims)
    assert "spatial" in repr(model)
    no_context = LDM(adata, spatial_neighbors=0, **TINY).module.flow.condition
    assert (no_context.n_spatial, no_context.n_context, no_context.n_attributes) == (n_dims, 0, 1)


def _drop_key(adata):
    del adata.obsm["spatial"]


def _set_coords(value_fn):
    def mutate(adata):
        adata.obsm["spatial"] = value_fn(np.asarray(adata.obsm["spatial"]).copy())

    return mutate


def _with(coords, index, value):
    coords[index] = value
    return coords


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_drop_key, "not found in adata.obsm"),
        (_set_coords(lambda c: c[:, :1]), "2 or 3 columns"),
        (_set_coords(lambda c: np.c_[c, c]), "2 or 3 columns"),
        (_set_coords(lambda c: _with(c, (3, 1), np.nan)), "finite"),
        (_set_coords(lambda c: _with(c, (7, 0), np.inf)), "finite"),
    ],
    ids=["missing", "one_column", "four_columns", "nan", "inf"],
)
def test_setup_rejects_bad_positions_and_leaves_adata_unchanged(mutate, match):
    adata = _spatial_data(n_cells=50)
    mutate(adata)
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=match):
        LDM.setup_anndata(adata, spatial_key="spatial")
    _assert_unchanged(adata, snap)
    assert not [c for c in adata.obs.columns if c.startswith("_scvi")]
    assert not [k for k in adata.uns if k.startswith("_scvi")]


def test_setup_rejects_other_missing_key():
    adata = _spatial_data(n_cells=50)
    with pytest.raises(ValueError, match="'xy'"):
        LDM.setup_anndata(adata, spatial_key="xy")


@pytest.mark.parametrize(
    "kwargs",
    [dict(spatial_neighbors=-1), dict(spatial_holes=1.0), dict(spatial_holes=-0.1)],
)
def test_invalid_spatial_options(kwargs):
    adata = _spatial_data(n_cells=50)
    LDM.setup_anndata(adata, spatial_key="spatial")
    with pytest.raises(ValueError, match="spatial_"):
        LDM(adata, **TINY, **kwargs)


# --------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_neighbourhood_summary_matches_brute_force(grouped, exclude_self):
    rng = np.random.default_rng(0)
    n_pool, k = 60, 5
    pool = rng.uniform(0, 10, (n_pool, 2))
    pool[1] = pool[0] + 1e-3  # two cells almost at the same position
    latent = rng.normal(size=(n_pool, 3)).astype(np.float32)
    # group 2 has 3 cells: fewer than k (and fewer than k + 1 with exclude_self)
    groups = np.r_[np.zeros(30, int), np.ones(27, int), np.full(3, 2)] if grouped else None
    if exclude_self:
        query, q_groups = pool, groups
    else:
        query = rng.uniform(0, 10, (25, 2))
        q_groups = rng.choice([0, 1, 2], size=25) if grouped else None
    summary, neighbours = neighbourhood_summary(
        query, pool, latent, k, q_groups, groups, exclude_self=exclude_self
    )
    want_summary, want_neighbours = _brute_neighbourhood(
        query, pool, latent, k, q_groups, groups, exclude_self
    )
    assert summary.dtype == np.float32
    assert summary.shape == (len(query), 4)
    assert neighbours.shape == (len(query), k)
    np.testing.assert_allclose(summary, want_summary, rtol=1e-5, atol=1e-5)
    # the same neighbours (their order among equal distances is free)
    np.testing.assert_array_equal(np.sort(neighbours, 1), np.sort(want_neighbours, 1))
    if grouped:
        assert (groups[neighbours] == q_groups[:, None]).all()
    if exclude_self:
        assert (neighbours != np.arange(n_pool)[:, None]).all()
        # each of the near twins is the other's nearest neighbour
        assert neighbours[0, 0] == 1 and neighbours[1, 0] == 0


def test_neighbourhood_summary_exclude_self_with_cells_at_the_same_position():
    rng = np.random.default_rng(4)
    pool = rng.uniform(0, 10, (8, 2))
    pool[1] = pool[0]  # the tree may list the twin before the cell itself
    pool[3] = pool[2]
    latent = rng.normal(size=(8, 2)).astype(np.float32)
    summary, neighbours = neighbourhood_summary(pool, pool, latent, 1, exclude_self=True)
    assert list(neighbours[:4, 0]) == [1, 0, 3, 2]
    np.testing.assert_allclose(summary[:4, :2], latent[[1, 0, 3, 2]], rtol=1e-6)
    np.testing.assert_allclose(summary[:4, 2], np.log(1e-6), rtol=1e-5)
    summary, neighbours = neighbourhood_summary(pool, pool, latent, 3, exclude_self=True)
    assert (neighbours != np.arange(8)[:, None]).all()
    assert neighbours[0, 0] == 1 and neighbours[1, 0] == 0


def test_neighbourhood_summary_small_group_repeats_neighbours():
    rng = np.random.default_rng(1)
    pool = rng.uniform(0, 1, (12, 2))
    latent = rng.normal(size=(12, 2)).astype(np.float32)
    groups = np.r_[np.zeros(10, int), np.ones(2, int)]
    query = np.array([[0.5, 0.5]])
    summary, neighbours = neighbourhood_summary(query, pool, latent, 4, np.array([1]), groups)
    assert sorted(set(neighbours[0])) == [10, 11]  # both cells of the group, repeated
    np.testing.assert_allclose(summary[0, :2], latent[10:].mean(0), rtol=1e-6)
    dist = np.linalg.norm(pool[10:] - query, axis=1)
    np.testing.assert_allclose(summary[0, 2], np.log(dist.mean() + 1e-6), rtol=1e-5)


def test_neighbourhood_summary_without_cells_in_group_raises():
    pool = np.zeros((3, 2))
    latent = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="No observed cells"):
        neighbourhood_summary(np.zeros((1, 2)), pool, latent, 2, np.array([1]), np.zeros(3, int))
    with pytest.raises(ValueError, match="No observed cells"):
        neighbourhood_summary(pool[:1], pool[:1], latent[:1], 2, exclude_self=True)


def test_neighbourhood_summary_respects_sections():
    adata = _sections()
    rng = np.random.default_rng(2)
    latent = rng.normal(size=(adata.n_obs, 4)).astype(np.float32)
    groups = (adata.obs["section"] == "B").to_numpy().astype(int)
    query = np.array([[80.0, 20.0], [20.0, 80.0]])
    _, neighbours = neighbourhood_summary(
        query, adata.obsm["spatial"], latent, 10, np.array([1, 0]), groups
    )
    assert (groups[neighbours[0]] == 1).all() and (groups[neighbours[1]] == 0).all()
    _, mixed = neighbourhood_summary(query, adata.obsm["spatial"], latent, 10)
    assert len(set(groups[mixed.ravel()])) == 2  # without groups, both sections are near


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_simulate_holes_covers_the_fraction(fraction):
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 100, (400, 2))
    groups = np.repeat([0, 1], 200)
    mask = simulate_holes(coords, groups, fraction, np.random.default_rng(3), min_size=10)
    assert mask.dtype == bool and mask.shape == (400,)
    assert mask.mean() >= fraction
    # the last hole stops as soon as the fraction is reached: at most 15% of a group more
    assert mask.sum() < fraction * 400 + max(10, int(0.15 * 200))
    same = simulate_holes(coords, groups, fraction, np.random.default_rng(3), min_size=10)
    np.testing.assert_array_equal(mask, same)


def test_simulate_holes_zero_fraction_and_single_hole_in_one_group():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 100, (200, 2))
    groups = rng.integers(0, 2, 200)  # two interleaved sections over the same area
    assert not simulate_holes(coords, groups, 0.0, np.random.default_rng(0)).any()
    for seed in range(5):
        # a fraction of one cell: exactly one hole
        mask = simulate_holes(coords, groups, 1 / 200, np.random.default_rng(seed), min_size=8)
        assert mask.sum() >= 8
        assert len(set(groups[mask])) == 1
        # contiguous: the hole's cells are the nearest cells of its group to one of them
        members = np.flatnonzero(groups == groups[mask][0])
        inside = coords[mask]
        outside = coords[members[~mask[members]]]
        centre_found = False
        for c in inside:
            r = np.linalg.norm(inside - c, axis=1).max()
            if (np.linalg.norm(outside - c, axis=1) >= r).all():
                centre_found = True
                break
        assert centre_found


# --------------------------------------------------------------------------- embeddings
def test_fourier_features_shape_and_determinism():
    ff, other = FourierFeatures(2), FourierFeatures(2)
    assert ff.frequencies.shape == (2, 96)
    assert ff.n_features == 192
    torch.testing.assert_close(ff.frequencies, other.frequencies, rtol=0, atol=0)
    assert "frequencies" in ff.state_dict()  # saved with the weights
    x = torch.randn(7, 2)
    out = ff(x)
    assert out.shape == (7, 192)
    torch.testing.assert_close(out, other(x), rtol=0, atol=0)
    cos, sin = out[:, :96], out[:, 96:]
    torch.testing.assert_close(cos**2 + sin**2, torch.ones(7, 96))
    assert FourierFeatures(3, n_per_scale=4, scales=(1.0,))(torch.zeros(5, 3)).shape == (5, 8)
    assert not torch.allclose(out[0], out[1])  # different positions, different features


def test_condition_embedding_vector_attributes_and_their_null():
    torch.manual_seed(0)
    emb = ConditionEmbedding([3, 2], n_continuous=1, n_hidden=16, n_spatial=2, n_context=5)
    assert emb.n_attributes == 2 + 1 + 2
    assert ConditionEmbedding([3], 1, 16).n_attributes == 2
    assert ConditionEmbedding([3], 1, 16, n_spatial=3).n_attributes == 3
    with torch.no_grad():  # a non-zero null vector, so that the comparison means something
        emb.vector_null.normal_()
    n = 6
    cat = torch.stack([torch.randint(0, 3, (n,)), torch.randint(0, 2, (n,))], dim=1)
    cont = torch.randn(n, 1 + 2 + 5)
    no_drop = torch.zeros(n, emb.n_attributes, dtype=torch.bool)
    base = emb(cat, cont, no_drop)
    for attribute, columns in ((3, slice(1, 3)), (4, slice(3, 8))):
        drop = no_drop.clone()
        drop[:, attribute] = True
        dropped = emb(cat, cont, drop)
        assert not torch.allclose(dropped, base)
        for bad in (np.nan, np.inf):
            for col in range(columns.start, columns.stop):
                broken = cont.clone()
                broken[:2, col] = bad  # rows 0-1: one entry of the attribute is not finite
                out = emb(cat, broken, no_drop)
                torch.testing.assert_close(out[:2], dropped[:2])
                torch.testing.assert_close(out[2:], base[2:])
        # a NaN already there and a drop give the same null contribution
        broken = cont.clone()
        broken[:, columns.start] = np.nan
        torch.testing.assert_close(emb(cat, broken, drop), dropped)
    # without a drop mask, NaN positions are still null
    broken = cont.clone()
    broken[:, 1] = np.nan
    drop = no_drop.clone()
    drop[:, 3] = True
    torch.testing.assert_close(emb(cat, broken), emb(cat, cont, drop))


# --------------------------------------------------------------------------- sampling
def test_sample_at_positions_output(trained):
    coords = RIGHT[:25]
    out = trained.sample(conditions={"spatial": coords}, seed=0, **FAST)
    assert out.shape == (25, N_GENES)
    assert out.obsm["spatial"].dtype == np.float32
    np.testing.assert_array_equal(out.obsm["spatial"], coords.astype(np.float32))
    assert out.obsm["X_latentcell"].shape == (25, TINY["n_latent"])
    assert out.layers["latentcell_mean"].shape == (25, N_GENES)
    assert "spatial" in out.uns["latentcell"]["requested"]
    assert list(out.var_names) == list(trained.adata.var_names)
    same_n = trained.sample(n_samples=25, conditions={"spatial": coords}, seed=0, **FAST)
    _same(out, same_n)
    one = trained.sample(conditions={"spatial": coords[0]}, seed=0, **FAST)  # one position
    assert one.n_obs == 1


def test_sample_at_positions_is_seeded(trained):
    a = trained.sample(conditions={"spatial": LEFT[:20]}, seed=3, **FAST)
    b = trained.sample(conditions={"spatial": LEFT[:20]}, seed=3, **FAST)
    c = trained.sample(conditions={"spatial": LEFT[:20]}, seed=4, **FAST)
    _same(a, b)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert not np.allclose(a.obsm["X_latentcell"], c.obsm["X_latentcell"])


def test_unconditional_sample_on_spatial_model(trained):
    out = trained.sample(12, seed=0, **FAST)
    assert out.shape == (12, N_GENES)
    assert "spatial" not in out.obsm
    assert np.isfinite(out.obsm["X_latentcell"]).all()


def test_sample_position_errors(trained):
    with pytest.raises(ValueError, match="n_samples"):
        trained.sample(n_samples=5, conditions={"spatial": LEFT[:4]}, **FAST)
    with pytest.raises(ValueError, match=r"\(n_cells, 2\)"):
        trained.sample(conditions={"spatial": np.zeros((4, 3))}, **FAST)
    with pytest.raises(ValueError, match="finite"):
        trained.sample(conditions={"spatial": np.full((4, 2), np.nan)}, **FAST)
    with pytest.raises(ValueError):
        trained.sample(conditions={"spatial": np.zeros((0, 2))}, **FAST)


def test_non_spatial_model_rejects_positions(plain):
    with pytest.raises(ValueError, match="spatial_key"):
        plain.sample(conditions={"spatial": LEFT[:4]}, **FAST)
    with pytest.raises(ValueError, match="spatial_key"):
        plain.impute_region(np.ones(plain.adata.n_obs, dtype=bool), **FAST)
    with pytest.raises(ValueError, match="spatial_key"):
        plain.impute_region(LEFT[:4], **FAST)


def test_joint_stage_is_refused_for_spatial_models(trained):
    stages = list(trained.trained_stages_)
    with pytest.raises(ValueError, match="spatial"):
        trained.train(stage="joint", joint_max_epochs=1, **QUIET)
    assert trained.trained_stages_ == stages


# --------------------------------------------------------------------------- impute_region
def test_impute_region_with_mask(trained):
    adata = trained.adata
    mask = _region(adata)
    snap = _snapshot(adata)
    out = trained.impute_region(mask, seed=0, **FAST)
    _assert_unchanged(adata, snap)
    assert out.shape == (mask.sum(), N_GENES)
    assert list(out.obs_names) == list(adata.obs_names[mask])
    np.testing.assert_array_equal(
        out.obsm["spatial"], np.asarray(adata.obsm["spatial"][mask], dtype=np.float32)
    )
    assert out.obsm["X_latentcell"].shape == (mask.sum(), TINY["n_latent"])
    assert out.layers["latentcell_mean"].shape == (mask.sum(), N_GENES)
    assert out.uns["latentcell"]["imputed_region"] is True
    again = trained.impute_region(mask, seed=0, **FAST)
    _same(out, again)
    without = trained.impute_region(mask, use_neighbourhood=False, seed=0, **FAST)
    assert list(without.obs_names) == list(out.obs_names)
    assert not np.allclose(without.obsm["X_latentcell"], out.obsm["X_latentcell"])


def test_impute_region_on_a_new_anndata(trained):
    fresh = _spatial_data()  # the training data, as newly read (not registered)
    mask = _region(fresh)
    x, obsm = fresh.X.copy(), np.array(fresh.obsm["spatial"], copy=True)
    obs_columns = list(fresh.obs.columns)
    out = trained.impute_region(mask, adata=fresh, seed=0, **FAST)
    _same(out, trained.impute_region(mask, seed=0, **FAST))
    assert (fresh.X != x).nnz == 0
    np.testing.assert_array_equal(fresh.obsm["spatial"], obsm)
    # as in every scvi-tools query method, a new AnnData gets its registration fields only
    assert all(c.startswith("_scvi") for c in set(fresh.obs.columns) - set(obs_columns))


def test_impute_region_at_coordinates(trained):
    adata = trained.adata
    snap = _snapshot(adata)
    coords = np.array([[80.0, 20.0], [82.0, 22.0], [20.0, 80.0]])
    out = trained.impute_region(coords, seed=0, **FAST)
    _assert_unchanged(adata, snap)
    assert list(out.obs_names) == ["imputed_0", "imputed_1", "imputed_2"]
    np.testing.assert_array_equal(out.obsm["spatial"], coords.astype(np.float32))
    assert out.uns["latentcell"]["imputed_region"] is True
    assert out.obsm["X_latentcell"].shape == (3, TINY["n_latent"])


def test_impute_region_errors(trained):
    n = trained.adata.n_obs
    snap = _snapshot(trained.adata)
    with pytest.raises(ValueError, match="one boolean per cell"):
        trained.impute_region(np.ones(n - 1, dtype=bool), **FAST)
    with pytest.raises(ValueError, match="mark some cells"):
        trained.impute_region(np.zeros(n, dtype=bool), **FAST)
    with pytest.raises(ValueError, match="mark some cells"):
        trained.impute_region(np.ones(n, dtype=bool), **FAST)
    with pytest.raises(ValueError, match=r"\(n_cells, 2\)"):
        trained.impute_region(np.zeros((3, 3)), **FAST)
    _assert_unchanged(trained.adata, snap)


# --------------------------------------------------------------------------- learning
def test_generation_follows_the_spatial_pattern(trained):
    up_left, down_left = _up_down(trained.sample(conditions={"spatial": LEFT}, seed=0, **FAST))
    up_right, down_right = _up_down(trained.sample(conditions={"spatial": RIGHT}, seed=0, **FAST))
    # truth: left 1 vs 8, right 8 vs 1
    assert down_left > 2 * up_left, (up_left, down_left)
    assert up_right > 2 * down_right, (up_right, down_right)


@pytest.mark.parametrize("use_neighbourhood", [True, False])
def test_imputed_region_follows_the_spatial_pattern(trained, use_neighbourhood):
    mask = _region(trained.adata)  # x > 60: genes 0-19 high
    out = trained.impute_region(mask, use_neighbourhood=use_neighbourhood, seed=0, **FAST)
    up, down = _up_down(out)
    assert up > 2 * down, (up, down)


def test_position_only_model_learns_and_samples(position_only):
    model = position_only
    assert model.module.flow.condition.n_context == 0
    left = model.sample(conditions={"xy": LEFT}, seed=0, **FAST)
    right = model.sample(conditions={"spatial": RIGHT}, seed=0, **FAST)
    np.testing.assert_array_equal(left.obsm["xy"], LEFT.astype(np.float32))
    assert "spatial" not in left.obsm
    up_left, down_left = _up_down(left)
    up_right, down_right = _up_down(right)
    assert down_left > 2 * up_left, (up_left, down_left)
    assert up_right > 2 * down_right, (up_right, down_right)
    xy = model.adata.obsm["xy"]
    mask = (xy[:, 0] > 60) & (xy[:, 1] < 40)
    out = model.impute_region(mask, seed=0, **FAST)
    assert out.n_obs == mask.sum()
    np.testing.assert_array_equal(out.obsm["xy"], np.asarray(xy[mask], dtype=np.float32))
    up, down = _up_down(out)
    assert up > 2 * down, (up, down)


# --------------------------------------------------------------------------- sections
def test_impute_region_in_a_section_uses_that_section(sectioned):
    adata = sectioned.adata
    in_b = (adata.obs["section"] == "B").to_numpy()
    mask = _region(adata) & in_b
    out = sectioned.impute_region(mask, seed=0, **FAST)
    assert list(out.obs_names) == list(adata.obs_names[mask])
    assert (out.obs["section"].astype(str) == "B").all()
    # section B is flipped: on the right, genes 20-39 are high (section A has the opposite)
    up, down = _up_down(out)
    assert down > 2 * up, (up, down)

    both = _region(adata)  # the same region in both sections
    out = sectioned.impute_region(both, seed=0, **FAST)
    np.testing.assert_array_equal(
        out.obs["section"].astype(str).to_numpy(), adata.obs["section"].astype(str).to_numpy()[both]
    )

    coords = np.array([[80.0, 20.0], [85.0, 15.0]])
    out = sectioned.impute_region(coords, conditions={"section": "B"}, seed=0, **FAST)
    assert (out.obs["section"].astype(str) == "B").all()
    out = sectioned.sample(conditions={"spatial": coords, "section": "A"}, seed=0, **FAST)
    assert (out.obs["section"].astype(str) == "A").all()
    np.testing.assert_array_equal(out.obsm["spatial"], coords.astype(np.float32))


def test_impute_region_takes_neighbours_from_the_same_section(sectioned, monkeypatch):
    calls = []
    original = _spatial.neighbourhood_summary

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((inspect.signature(original).bind(*args, **kwargs).arguments, result))
        return result

    monkeypatch.setattr(_spatial, "neighbourhood_summary", spy)
    adata = sectioned.adata
    in_b = (adata.obs["section"] == "B").to_numpy()
    mask = _region(adata) & in_b
    sectioned.impute_region(mask, seed=0, **FAST)
    assert len(calls) == 1
    args, (_, neighbours) = calls[0]
    q_groups, p_groups = args["query_groups"], args["pool_groups"]
    assert len(args["pool_coords"]) == (~mask).sum()  # the observed cells only
    assert len(set(q_groups)) == 1
    assert (p_groups == q_groups[0]).sum() == (in_b & ~mask).sum()  # the code of section B
    assert (p_groups[neighbours] == q_groups[:, None]).all()

    calls.clear()
    coords = np.array([[80.0, 20.0], [20.0, 80.0]])
    sectioned.impute_region(coords, conditions={"section": "B"}, seed=0, **FAST)
    args, (_, neighbours) = calls[0]
    assert (args["pool_groups"] == args["query_groups"][0]).sum() == in_b.sum()
    assert (args["pool_groups"][neighbours] == args["query_groups"][:, None]).all()


def test_training_with_small_sections_never_leaves_a_section_without_neighbours():
    # Simulated holes (spatial_holes) must leave observed cells in every section: with ten
    # sections of 15 cells, seed 4 makes two holes cover all of one section, and the flow's
    # training data then has no neighbourhood to summarise for it.
    adata = _spatial_data(150, seed=4)
    adata.obs["section"] = pd.Categorical(np.repeat([f"s{i}" for i in range(10)], 15))
    LDM.setup_anndata(adata, spatial_key="spatial", batch_key="section")
    scvi.settings.seed = 4
    model = LDM(adata, **TINY)
    model.train(max_epochs=1, flow_max_epochs=1, seed=4, **QUIET)
    out = model.sample(conditions={"spatial": LEFT[:5], "section": "s9"}, seed=0, **FAST)
    assert out.n_obs == 5


# --------------------------------------------------------------------------- save / load
def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "m")
    adata = _spatial_data()  # the training data, as newly read
    loaded = LDM.load(tmp_path / "m", adata=adata)
    assert loaded.module.flow.condition.n_spatial == 2
    assert loaded.module.flow.condition.n_context == TINY["n_latent"] + 1
    coords = np.r_[LEFT[:10], RIGHT[:10]]
    a = trained.sample(conditions={"spatial": coords}, seed=0, **FAST)
    b = loaded.sample(conditions={"spatial": coords}, seed=0, **FAST)
    _same(a, b)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    mask = _region(adata)
    _same(
        trained.impute_region(mask, seed=0, **FAST),
        loaded.impute_region(mask, seed=0, **FAST),
    )
    without_data = LDM.load(tmp_path / "m")  # the reference cells travel with the weights
    _same(a, without_data.sample(conditions={"spatial": coords}, seed=0, **FAST))


def test_squidpy_reads_imputed_cells_as_they_are(trained, tmp_path):
    sq = pytest.importorskip("squidpy", reason="squidpy is the optional extra latentcell[spatial]")
    import matplotlib

    matplotlib.use("Agg")
    out = trained.impute_region(_region(trained.adata), seed=0, **FAST)
    sq.gr.spatial_neighbors(out, coord_type="generic", n_neighs=6)
    assert out.obsp["spatial_connectivities"].shape == (out.n_obs, out.n_obs)
    assert out.obsp["spatial_connectivities"].sum(axis=1).min() > 0
    out.var_names = [str(g) for g in out.var_names]
    sq.pl.spatial_scatter(out, color=out.var_names[0], shape=None, save=tmp_path / "region.png")
