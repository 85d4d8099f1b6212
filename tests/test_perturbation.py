"""Perturbation prediction: setup, condition vectors, OT pairing, training and queries."""

import copy
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import latentcell as lc
from latentcell import LatentDiffusionModel as LDM
from latentcell.model._data import PairedLatentDataModule, ot_pairs
from latentcell.module._perturbation import PERTURBATION_KEY, SOURCE_KEY, TARGET_KEY, TIME_KEY

from .conftest import FAST_MODEL, FAST_TRAIN

PERT_TRAIN = dict(FAST_TRAIN, perturbation_max_epochs=8)
KEY = "condition"
QUIET = dict(n_steps=3, progress_bar=False)


def _data(n_cells=240, n_genes=30, perturbations=("A", "B", "A+B"), seed=0, **kw):
    return lc.datasets.synthetic_perturbation(
        n_cells=n_cells, n_genes=n_genes, perturbations=perturbations, seed=seed, **kw
    )


def _snapshot(adata):
    x = adata.X.copy()
    counts = adata.layers["counts"].copy()
    return x, counts, adata.obs.copy(), copy.deepcopy(dict(adata.uns))


def _assert_unchanged(adata, snap):
    x, counts, obs, uns = snap
    assert (adata.X != x).nnz == 0
    assert (adata.layers["counts"] != counts).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.uns) == set(uns)
    np.testing.assert_equal(dict(adata.uns), uns)


def _same_prediction(a, b):
    assert a.shape == b.shape
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["X_latentcell"], b.obsm["X_latentcell"])
    np.testing.assert_array_equal(a.layers["latentcell_mean"], b.layers["latentcell_mean"])
    pd.testing.assert_frame_equal(a.obs, b.obs)


def _fresh(adata, idx=None):
    """A copy of some cells without registration fields, like a newly read AnnData."""
    out = (adata if idx is None else adata[idx]).copy()
    out.obs = out.obs[[c for c in out.obs.columns if not c.startswith("_scvi")]].copy()
    for k in [k for k in out.uns if k.startswith("_scvi")]:
        del out.uns[k]
    return out


@pytest.fixture(scope="module")
def pert_model():
    """All three stages trained on labels x batch with a one-hot perturbation vocabulary."""
    adata = _data()
    LDM.setup_anndata(
        adata, layer="counts", labels_key="cell_type", batch_key="batch", perturbation_key=KEY
    )
    model = LDM(adata, **FAST_MODEL)
    model.train(**PERT_TRAIN)
    return model


@pytest.fixture(scope="module")
def dose_emb_model():
    """Perturbation embeddings (from an uns key, with two never-seen rows) and a dose column."""
    adata = _data(n_cells=200, n_genes=20, perturbations=("A", "B"), seed=3)
    rng = np.random.default_rng(0)
    adata.uns["emb"] = pd.DataFrame(
        rng.normal(size=(4, 3)), index=["A", "B", "C", "D"], columns=["e0", "e1", "e2"]
    )
    adata.obs["dose"] = np.where(adata.obs[KEY] == "ctrl", 0.0, 10.0)
    LDM.setup_anndata(
        adata,
        layer="counts",
        labels_key="cell_type",
        perturbation_key=KEY,
        dose_key="dose",
        perturbation_embeddings="emb",
    )
    model = LDM(adata, **FAST_MODEL)
    model.train(max_epochs=3, flow_max_epochs=2, perturbation_max_epochs=3, **_quiet_train())
    return model


def _quiet_train():
    return dict(accelerator="cpu", seed=0, enable_progress_bar=False)


# --------------------------------------------------------------------------- setup
def test_setup_registers_perturbation_fields():
    adata = _data(n_cells=60, n_genes=15)
    before_obs, before_uns = set(adata.obs.columns), set(adata.uns)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    assert set(adata.obs.columns) - before_obs <= {
        "_scvi_batch",
        "_scvi_labels",
        "_scvi_perturbation",
    }
    assert set(adata.uns) - before_uns <= {"_scvi_uuid", "_scvi_manager_uuid"}
    model = LDM(adata, **FAST_MODEL)
    state = model._perturbation_state()
    assert state["key"] == KEY and state["control"] == "ctrl" and state["separator"] == "+"
    assert state["names"] == ["A", "B"] and not state["has_embeddings"]
    assert state["dose_key"] is None
    assert set(state["observed"]) == {"ctrl", "A", "B", "A+B"}
    assert model.module.perturbation_flow.n_condition == 2
    assert "Trained stages: none" in repr(model)


def test_setup_with_dose_and_embeddings(dose_emb_model):
    state = dose_emb_model._perturbation_state()
    assert state["dose_key"] == "dose" and state["has_embeddings"]
    assert state["names"] == ["A", "B", "C", "D"]
    assert state["matrix"].shape == (4, 3)
    # embedding width plus the dose column
    assert dose_emb_model.module.perturbation_flow.n_condition == 4
    # the embeddings were normalised to plain JSON-able lists in the registry
    emb = dose_emb_model.registry_["setup_args"]["perturbation_embeddings"]
    assert set(emb) == {"names", "values"}
    json.dumps(emb)


def test_setup_embeddings_as_dataframe_and_custom_control_separator():
    adata = _data(n_cells=60, n_genes=15)
    adata.obs[KEY] = adata.obs[KEY].astype(str).str.replace("+", "|").replace("ctrl", "none")
    emb = pd.DataFrame(np.eye(3), index=["A", "B", "X"])
    LDM.setup_anndata(
        adata,
        layer="counts",
        perturbation_key=KEY,
        control_value="none",
        perturbation_separator="|",
        perturbation_embeddings=emb,
    )
    model = LDM(adata, **FAST_MODEL)
    vec = model._perturbation_vectors(["A|B", "none", "X"])
    np.testing.assert_array_equal(vec, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


def _drop_cell_label(adata):
    adata.obs.loc[adata.obs_names[0], KEY] = np.nan


def _text_dose(adata):
    adata.obs["dose"] = "high"


def _nan_dose(adata):
    adata.obs["dose"] = 1.0
    adata.obs.loc[adata.obs_names[3], "dose"] = np.nan


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (
            None,
            dict(perturbation_key=KEY, control_value="control"),
            r"control_value='control' does not occur in adata\.obs\['condition'\].*'ctrl'",
        ),
        (None, dict(perturbation_key="perturbation"), r"'perturbation' not found in adata\.obs"),
        (_drop_cell_label, dict(perturbation_key=KEY), r"adata\.obs\['condition'\] has 1 missing"),
        (
            None,
            dict(perturbation_key=KEY, perturbation_embeddings=pd.DataFrame(np.eye(2), ["A", "Z"])),
            r"1 perturbations of adata\.obs\['condition'\] have no row in "
            r"perturbation_embeddings \(e\.g\. \['B'\]\)",
        ),
        (
            None,
            dict(perturbation_key=KEY, perturbation_embeddings="gene_emb"),
            r"perturbation_embeddings='gene_emb' is not a key of adata\.uns",
        ),
        (None, dict(dose_key="dose"), r"dose_key and perturbation_embeddings need a perturbation"),
        (
            None,
            dict(perturbation_embeddings=pd.DataFrame(np.eye(2), ["A", "B"])),
            r"dose_key and perturbation_embeddings need a perturbation",
        ),
        (
            _text_dose,
            dict(perturbation_key=KEY, dose_key="dose"),
            r"\['dose'\] must hold numeric doses",
        ),
        (_nan_dose, dict(perturbation_key=KEY, dose_key="dose"), r"\['dose'\] has 1 NaN"),
        (None, dict(perturbation_key=KEY, perturbation_separator=""), "perturbation_separator"),
    ],
    ids=[
        "control-absent",
        "missing-column",
        "nan-label",
        "embedding-row-missing",
        "embedding-uns-key-missing",
        "dose-without-key",
        "embeddings-without-key",
        "dose-not-numeric",
        "dose-nan",
        "empty-separator",
    ],
)
def test_setup_errors_leave_adata_unchanged(mutate, kwargs, match):
    adata = _data(n_cells=60, n_genes=15)
    if mutate is not None:
        mutate(adata)
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=match):
        LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", **kwargs)
    _assert_unchanged(adata, snap)
    assert not [c for c in adata.obs.columns if c.startswith("_scvi")]
    assert not [k for k in adata.uns if k.startswith("_scvi")]


# --------------------------------------------------------------------------- vectors
@pytest.fixture(scope="module")
def untrained():
    adata = _data(n_cells=60, n_genes=15)
    LDM.setup_anndata(adata, layer="counts", perturbation_key=KEY)
    return LDM(adata, **FAST_MODEL)


def test_vectors_one_hot_sum_and_control(untrained):
    vec = untrained._perturbation_vectors(["A", "B", "A+B", "B+A", "ctrl", "A"])
    assert vec.dtype == np.float32
    np.testing.assert_array_equal(vec, [[1, 0], [0, 1], [1, 1], [1, 1], [0, 0], [1, 0]])


@pytest.mark.parametrize("value", ["Z", "A+Z", "+"])
def test_vectors_unknown_perturbation_names_known_ones(untrained, value):
    with pytest.raises(ValueError, match=r"Cannot represent perturbation .*'A', 'B'.*'ctrl'"):
        untrained._perturbation_vectors(["A", value])


def test_vectors_append_log1p_dose(dose_emb_model):
    emb = dose_emb_model.adata.uns["emb"]
    vec = dose_emb_model._perturbation_vectors(["A", "ctrl", "A+C"], [10.0, 0.0, 2.5])
    assert vec.shape == (3, 4)
    np.testing.assert_allclose(vec[:, -1], np.log1p([10.0, 0.0, 2.5]), rtol=1e-6)
    np.testing.assert_allclose(vec[0, :3], emb.loc["A"], rtol=1e-6)
    np.testing.assert_array_equal(vec[1], 0.0)
    np.testing.assert_allclose(vec[2, :3], emb.loc["A"] + emb.loc["C"], rtol=1e-5, atol=1e-6)
    # without doses the dose column is log1p(0) = 0
    np.testing.assert_array_equal(dose_emb_model._perturbation_vectors(["A"])[:, -1], 0.0)
    with pytest.raises(ValueError, match="Doses must be finite and non-negative"):
        dose_emb_model._perturbation_vectors(["A"], [-1.0])


def test_vectors_unseen_perturbation_with_embedding_row(dose_emb_model):
    # "C" and "D" never occur in the data but have embedding rows
    assert "C" not in set(dose_emb_model.adata.obs[KEY].astype(str))
    vec = dose_emb_model._perturbation_vectors(["C+D"])
    emb = dose_emb_model.adata.uns["emb"]
    np.testing.assert_allclose(vec[0, :3], emb.loc["C"] + emb.loc["D"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'E'.*rows of perturbation_embeddings.*'A', 'B', 'C'"):
        dose_emb_model._perturbation_vectors(["E"])
    out = dose_emb_model.predict_perturbation(perturbation="C+D", seed=0, **QUIET)
    assert (out.obs[KEY] == "C+D").all()
    assert np.isfinite(out.obsm["X_latentcell"]).all()
    # an unseen perturbation has no training cells: its default dose is 0
    np.testing.assert_array_equal(out.obs["dose"], 0.0)
    # latent arithmetic needs cells of the perturbation (or of each component)
    with pytest.raises(ValueError, match=r"latent_shift.*'C'.*\['C'\] never occur"):
        dose_emb_model.predict_perturbation(perturbation="C", strategy="latent_shift", **QUIET)


def test_vectors_ignore_unused_categories():
    adata = _data(n_cells=60, n_genes=15, perturbations=("A", "B"))
    adata = adata[adata.obs[KEY] != "B"].copy()
    adata.obs[KEY] = adata.obs[KEY].cat.add_categories(["B"])  # no cell has "B"
    LDM.setup_anndata(adata, layer="counts", perturbation_key=KEY)
    model = LDM(adata, **FAST_MODEL)
    # what was seen is recorded after the VAE stage, before any flow can be trained
    model.train(stage="vae", max_epochs=2, **_quiet_train())
    assert model.perturbation_summary_["seen"] == ["A"]
    with pytest.raises(ValueError, match="Cannot represent perturbation 'B'"):
        model._perturbation_vectors(["B"])


# --------------------------------------------------------------------------- OT pairing
def _cost(z, src, tgt):
    return float(((z[src] - z[tgt]) ** 2).sum())


def test_ot_pairs_is_the_optimal_matching():
    # 1-D toy: controls at 0, 10, 20; perturbed cells at 21, 1, 11
    z = np.array([[0.0], [10.0], [20.0], [21.0], [1.0], [11.0]])
    is_control = np.array([True, True, True, False, False, False])
    perts = np.array([0, 0, 0, 1, 1, 1])
    src, tgt = ot_pairs(
        z, np.arange(6), np.zeros(6, int), perts, is_control, np.random.default_rng(0)
    )
    pairs = dict(zip(tgt.tolist(), src.tolist(), strict=True))
    assert {t: pairs[t] for t in (3, 4, 5)} == {3: 2, 4: 0, 5: 1}
    # random 2-D cases: the matching of the perturbed cells has the minimum total cost
    for seed in range(5):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(10, 2))
        is_control = np.arange(10) < 5
        perts = (~is_control).astype(int)
        src, tgt = ot_pairs(z, np.arange(10), np.zeros(10, int), perts, is_control, rng)
        keep = ~is_control[tgt]
        best = min(
            _cost(z, np.array(p), np.arange(5, 10)) for p in itertools.permutations(range(5))
        )
        assert _cost(z, src[keep], tgt[keep]) == pytest.approx(best)
        assert sorted(src[keep]) == list(range(5))  # one to one


def test_ot_pairs_groups_controls_and_identity():
    rng = np.random.default_rng(0)
    n = 90
    z = rng.normal(size=(n, 3))
    groups = np.repeat([0, 1, 2], 30)
    perts = np.tile([0, 1, 2], 30)  # 0 is the control
    is_control = perts == 0
    is_control[groups == 2] = False  # group 2 has no controls
    perts[groups == 2] = np.where(perts[groups == 2] == 0, 1, perts[groups == 2])
    cells = rng.permutation(n)[:80]
    for seed in range(3):
        src, tgt = ot_pairs(z, cells, groups, perts, is_control, np.random.default_rng(seed))
        assert len(src) == len(tgt)
        assert np.isin(src, cells).all() and np.isin(tgt, cells).all()
        assert is_control[src].all()
        np.testing.assert_array_equal(groups[src], groups[tgt])
        assert not (groups[tgt] == 2).any()  # no controls in group 2: nothing
        expected = np.sort(cells[groups[cells] != 2])
        np.testing.assert_array_equal(np.sort(tgt), expected)  # every other cell once
        ctrl = is_control[tgt]
        np.testing.assert_array_equal(src[ctrl], tgt[ctrl])  # identity pairs
        assert (src[~ctrl] != tgt[~ctrl]).all()


def test_ot_pairs_more_targets_than_controls_and_empty():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(12, 2))
    is_control = np.arange(12) < 2
    perts = (~is_control).astype(int)
    src, tgt = ot_pairs(z, np.arange(12), np.zeros(12, int), perts, is_control, rng)
    assert len(tgt) == 12 and set(src) <= {0, 1}
    none = ot_pairs(z, np.arange(2, 12), np.zeros(12, int), perts, is_control, rng)
    assert none[0].size == 0 and none[1].size == 0 and none[0].dtype == np.int64


def test_ot_pairs_identity_when_chunked():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(10, 2))
    src, tgt = ot_pairs(
        z, np.arange(10), np.zeros(10, int), np.zeros(10, int), np.ones(10, bool), rng, 3
    )
    np.testing.assert_array_equal(src, tgt)


# --------------------------------------------------------------------------- data module
def _paired_module():
    rng = np.random.default_rng(0)
    n = 120
    ids = np.arange(n, dtype=np.float32)
    # column 0 identifies the cell, so batches can be traced back to cell indices
    z = torch.as_tensor(np.stack([ids, rng.normal(size=n).astype(np.float32)], 1))
    groups = np.arange(n) % 2
    perts = (np.arange(n) // 2) % 3
    is_control = perts == 0
    condition = torch.as_tensor(np.eye(3, dtype=np.float32)[perts][:, 1:])
    perm = rng.permutation(n)
    train_idx, val_idx = np.sort(perm[30:]), np.sort(perm[:30])
    dm = PairedLatentDataModule(
        z, condition, groups, perts, is_control, train_idx, val_idx, batch_size=16, seed=0
    )
    return dm, groups, is_control, condition, train_idx, val_idx


def _epoch(loader):
    batches = list(loader)
    src = torch.cat([b[SOURCE_KEY][:, 0] for b in batches]).long().numpy()
    tgt = torch.cat([b[TARGET_KEY][:, 0] for b in batches]).long().numpy()
    cond = torch.cat([b[PERTURBATION_KEY] for b in batches])
    times = torch.cat([b[TIME_KEY] for b in batches]) if TIME_KEY in batches[0] else None
    return src, tgt, cond, times


def test_paired_module_validation_pairs_are_fixed():
    dm, groups, is_control, condition, train_idx, val_idx = _paired_module()
    assert dm.n_val == len(val_idx)
    src, tgt, cond, times = _epoch(dm.val_dataloader())
    src2, tgt2, cond2, times2 = _epoch(dm.val_dataloader())
    np.testing.assert_array_equal(src, src2)
    np.testing.assert_array_equal(tgt, tgt2)
    assert torch.equal(times, times2) and torch.equal(cond, cond2)
    np.testing.assert_array_equal(np.sort(tgt), val_idx)  # only (all) validation targets
    assert is_control[src].all() and (groups[src] == groups[tgt]).all()
    # sources: validation controls, or training controls pooled with them
    assert np.isin(src, np.union1d(val_idx, train_idx[is_control[train_idx]])).all()
    assert torch.equal(cond, condition[torch.as_tensor(tgt)])
    assert ((times >= 0) & (times <= 1)).all()


def test_paired_module_training_pairs_change_between_epochs():
    dm, groups, is_control, condition, train_idx, _ = _paired_module()
    first = _epoch(dm.train_dataloader())
    second = _epoch(dm.train_dataloader())
    for src, tgt, cond, times in (first, second):
        assert times is None  # drawn per batch by the module
        assert np.isin(tgt, train_idx).all() and np.isin(src, train_idx).all()
        assert is_control[src].all() and (groups[src] == groups[tgt]).all()
        assert torch.equal(cond, condition[torch.as_tensor(tgt)])
        assert len(tgt) >= len(train_idx) - 1  # at most a last batch of one is dropped
    assert dm.train_set.epoch == 2
    assert not np.array_equal(first[1], second[1])  # reshuffled
    pairs = [set(zip(s.tolist(), t.tolist(), strict=True)) for s, t, *_ in (first, second)]
    assert pairs[0] != pairs[1]  # re-paired


# --------------------------------------------------------------------------- end to end
def test_train_runs_three_stages(pert_model):
    assert pert_model.trained_stages_ == ["vae", "flow", "perturbation"]
    for key in (
        "elbo_train",
        "flow_loss_train",
        "perturbation_loss_train",
        "perturbation_loss_validation",
    ):
        assert key in pert_model.history and len(pert_model.history[key]) > 0
    assert len(pert_model.history["perturbation_loss_train"]) == 8
    assert np.isfinite(
        pert_model.history["perturbation_loss_validation"].to_numpy(dtype=float)
    ).all()
    assert not pert_model.module.training


def test_predict_output(pert_model):
    adata = pert_model.adata
    snap = _snapshot(adata)
    out = pert_model.predict_perturbation(perturbation="A+B", seed=0, **QUIET)
    _assert_unchanged(adata, snap)  # input untouched
    assert out is not adata
    controls = adata.obs_names[adata.obs[KEY] == "ctrl"]
    assert out.shape == (len(controls), adata.n_vars)
    assert list(out.var_names) == list(adata.var_names)
    assert sparse.issparse(out.X) and out.X.dtype == np.float32
    assert np.array_equal(out.X.data, np.round(out.X.data)) and (out.X.data >= 0).all()
    assert out.layers["latentcell_mean"].shape == out.shape
    assert (out.layers["latentcell_mean"] > 0).all()
    assert out.obsm["X_latentcell"].shape == (len(controls), 8)
    # obs: the source cells' obs, perturbation set to the request, no registry columns
    np.testing.assert_array_equal(out.obs["source_cell"], controls)
    np.testing.assert_array_equal(out.obs_names, controls)
    assert (out.obs[KEY] == "A+B").all()
    for col in ("cell_type", "batch"):
        np.testing.assert_array_equal(
            out.obs[col].astype(str), adata.obs.loc[controls, col].astype(str)
        )
    assert not [c for c in out.obs.columns if c.startswith("_scvi")]
    assert not [k for k in out.uns if k.startswith("_scvi")]
    assert out.uns["latentcell"]["strategy"] == "flow"
    assert out.uns["latentcell"]["task"] == "predict_perturbation"
    # the prediction is a fresh object: editing it does not reach the training data
    out.obs.loc[out.obs_names[0], "cell_type"] = adata.obs["cell_type"].iloc[0]
    out.X.data[:] = 0
    _assert_unchanged(adata, snap)


def test_predict_only_registers_a_new_query(pert_model):
    # as in every scvi-tools query method, a new AnnData is registered (``_scvi_*`` fields);
    # nothing else of it changes
    query = _fresh(pert_model.adata, np.flatnonzero(pert_model.adata.obs[KEY] == "ctrl")[:10])
    obs, uns, x = query.obs.copy(), set(query.uns), query.X.copy()
    out = pert_model.predict_perturbation(query, perturbation="A", seed=0, **QUIET)
    assert out.n_obs == 10
    pd.testing.assert_frame_equal(query.obs[obs.columns], obs)
    assert all(c.startswith("_scvi") for c in set(query.obs.columns) - set(obs.columns))
    assert all(k.startswith("_scvi") for k in set(query.uns) - uns)
    assert (query.X != x).nnz == 0


def test_predict_samples_per_cell_seed_and_indices(pert_model):
    adata = pert_model.adata
    idx = np.flatnonzero(adata.obs[KEY] == "ctrl")[:7]
    kw = dict(perturbation="A", indices=idx, **QUIET)
    out = pert_model.predict_perturbation(adata, n_samples_per_cell=3, seed=1, **kw)
    assert out.n_obs == 21 and out.obs_names.is_unique
    np.testing.assert_array_equal(out.obs["source_cell"], np.repeat(adata.obs_names[idx], 3))
    # the latent prediction is deterministic; draws differ
    z = out.obsm["X_latentcell"].reshape(7, 3, -1)
    np.testing.assert_array_equal(z[:, 0], z[:, 1])
    again = pert_model.predict_perturbation(adata, n_samples_per_cell=3, seed=1, **kw)
    _same_prediction(out, again)
    other = pert_model.predict_perturbation(adata, n_samples_per_cell=3, seed=2, **kw)
    assert (out.X != other.X).nnz > 0
    np.testing.assert_array_equal(out.obsm["X_latentcell"], other.obsm["X_latentcell"])
    # perturbing perturbed cells works too (indices into any registered cells)
    pert_idx = np.flatnonzero(adata.obs[KEY] == "B")[:4]
    b = pert_model.predict_perturbation(perturbation="A", indices=pert_idx, seed=0, **QUIET)
    assert (b.obs[KEY] == "A").all()
    np.testing.assert_array_equal(b.obs["source_cell"], adata.obs_names[pert_idx])


def test_predict_per_cell_list_and_errors(pert_model):
    adata = pert_model.adata
    idx = np.flatnonzero(adata.obs[KEY] == "ctrl")[:4]
    values = ["A", "B", "A+B", "ctrl"]
    out = pert_model.predict_perturbation(perturbation=values, indices=idx, seed=0, **QUIET)
    assert list(out.obs[KEY].astype(str)) == values
    # a per-cell list equals the single-value calls cell by cell
    single = pert_model.predict_perturbation(perturbation="B", indices=idx, seed=0, **QUIET)
    np.testing.assert_allclose(
        out.obsm["X_latentcell"][1], single.obsm["X_latentcell"][1], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="perturbation has 3 values for 4 cells"):
        pert_model.predict_perturbation(perturbation=values[:3], indices=idx, **QUIET)
    with pytest.raises(ValueError, match=r"Pass perturbation=.*'A', 'A\+B', 'B'"):
        pert_model.predict_perturbation(**QUIET)
    with pytest.raises(ValueError, match=r"Cannot represent perturbation 'Z'.*'A', 'B'"):
        pert_model.predict_perturbation(perturbation="Z", **QUIET)
    with pytest.raises(ValueError, match="strategy must be"):
        pert_model.predict_perturbation(perturbation="A", strategy="shift", **QUIET)
    with pytest.raises(ValueError, match="method must be"):
        pert_model.predict_perturbation(perturbation="A", method="rk4", progress_bar=False)
    with pytest.raises(ValueError, match="n_samples_per_cell must be >= 1"):
        pert_model.predict_perturbation(perturbation="A", n_samples_per_cell=0, **QUIET)
    with pytest.raises(ValueError, match="No cells to perturb"):
        pert_model.predict_perturbation(perturbation="A", indices=[], **QUIET)


def test_predict_latent_shift_and_cfg(pert_model):
    idx = np.flatnonzero(pert_model.adata.obs[KEY] == "ctrl")[:5]
    kw = dict(indices=idx, seed=0, **QUIET)
    ctrl = pert_model.predict_perturbation(perturbation="ctrl", strategy="latent_shift", **kw)
    z0 = pert_model.get_latent_representation(indices=idx, key_added=None)
    np.testing.assert_allclose(ctrl.obsm["X_latentcell"], z0, rtol=1e-5, atol=1e-6)
    a = pert_model.predict_perturbation(perturbation="A", strategy="latent_shift", **kw)
    b = pert_model.predict_perturbation(perturbation="B", strategy="latent_shift", **kw)
    # an unseen order of a combination is the sum of the single shifts
    ba = pert_model.predict_perturbation(perturbation="B+A", strategy="latent_shift", **kw)
    shift = lambda o: o.obsm["X_latentcell"] - z0
    np.testing.assert_allclose(shift(ba), shift(a) + shift(b), rtol=1e-4, atol=1e-5)
    assert a.uns["latentcell"]["strategy"] == "latent_shift"
    # cfg_scale 0 keeps only the no-perturbation velocity
    zero = pert_model.predict_perturbation(perturbation="A", cfg_scale=0.0, **kw)
    ctrl_flow = pert_model.predict_perturbation(perturbation="ctrl", **kw)
    np.testing.assert_allclose(
        zero.obsm["X_latentcell"], ctrl_flow.obsm["X_latentcell"], rtol=1e-5, atol=1e-5
    )


def test_latent_shift_after_vae_only_and_stage_errors():
    adata = _data(n_cells=120, n_genes=15, perturbations=("A", "B"))
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    model = LDM(adata, **FAST_MODEL)
    with pytest.raises(RuntimeError, match="VAE stage .* not been trained"):
        model.predict_perturbation(perturbation="A", strategy="latent_shift", **QUIET)
    model.train(stage="vae", max_epochs=2, **_quiet_train())
    out = model.predict_perturbation(perturbation="A", strategy="latent_shift", seed=0, **QUIET)
    assert out.n_obs == int((adata.obs[KEY] == "ctrl").sum())
    assert (out.obs[KEY] == "A").all()
    with pytest.raises(ValueError, match=r"latent_shift' needs perturbation 'Z'.*Seen: 'A', 'B'"):
        model.predict_perturbation(perturbation="Z", strategy="latent_shift", **QUIET)
    with pytest.raises(RuntimeError, match=r"predict perturbations.*PERTURBATION stage"):
        model.predict_perturbation(perturbation="A", **QUIET)
    # the perturbation stage alone (no latent flow) is enough for strategy="flow"
    model.train(stage="perturbation", perturbation_max_epochs=2, **_quiet_train())
    assert model.trained_stages_ == ["vae", "perturbation"]
    assert model.predict_perturbation(perturbation="A", **QUIET).n_obs == out.n_obs


def test_untrained_perturbation_stage_hint(untrained):
    untrained.trained_stages_ = ["vae", "flow"]
    try:
        with pytest.raises(RuntimeError, match=r"train\(stage='perturbation'\)"):
            untrained.predict_perturbation(perturbation="A", **QUIET)
    finally:
        untrained.trained_stages_ = []


def test_no_perturbation_registered():
    adata = _data(n_cells=60, n_genes=15)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type")
    model = LDM(adata, **FAST_MODEL)
    assert model.module.perturbation_flow is None
    with pytest.raises(ValueError, match="no registered perturbation"):
        model.predict_perturbation(perturbation="A", **QUIET)


def test_train_without_perturbed_cells_raises():
    adata = _data(n_cells=160, n_genes=15)
    adata = adata[adata.obs[KEY] == "ctrl"].copy()
    LDM.setup_anndata(adata, layer="counts", perturbation_key=KEY)
    model = LDM(adata, **FAST_MODEL)
    with pytest.raises(ValueError, match=r"needs both control cells \('ctrl'\) and perturbed"):
        model.train(max_epochs=1, flow_max_epochs=1, **_quiet_train())
    assert "perturbation" not in model.trained_stages_


def test_train_without_shared_groups_raises():
    # controls only in type_0, perturbed cells only elsewhere: nothing to pair
    adata = _data(n_cells=160, n_genes=15, perturbations=("A",))
    is_ctrl = adata.obs[KEY] == "ctrl"
    adata = adata[is_ctrl == (adata.obs["cell_type"] == "type_0")].copy()
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    model = LDM(adata, **FAST_MODEL)
    model.train(stage="vae", max_epochs=1, **_quiet_train())
    with pytest.raises(ValueError, match=r"No group \(label x batch\) has both control"):
        model.train(
            stage="perturbation",
            perturbation_max_epochs=1,
            early_stopping=False,
            **_quiet_train(),
        )


def test_predicted_effect_direction():
    """Genes that 'A' raises (lowers) in the ground truth go up (down) in the prediction.

    The reference is the model's own decoding of the source controls (same cells, same
    library sizes), so only the perturbation differs.
    """
    adata = _data(n_cells=300, n_genes=40, perturbations=("A", "B"), effect=2.5, n_cell_types=2)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    scvi.settings.seed = 0  # initial weights
    model = LDM(adata, n_latent=8, n_hidden=64, flow_n_hidden=64, flow_n_layers=2)
    model.train(stage="vae", max_epochs=20, batch_size=64, lr=3e-3, **_quiet_train())
    model.train(stage="perturbation", perturbation_max_epochs=20, **_quiet_train())
    truth = adata.uns["ground_truth"]
    lfc = truth["log_fold_changes"][list(truth["singles"]).index("A")]
    up, down = lfc > 0, lfc < 0
    assert up.any() and down.any()

    def log_profile(out):
        mu = out.layers["latentcell_mean"]
        return np.log((mu / mu.sum(1, keepdims=True)).mean(0))

    kw = dict(seed=0, progress_bar=False)
    base = log_profile(
        model.predict_perturbation(perturbation="ctrl", strategy="latent_shift", **kw)
    )
    for strategy in ("flow", "latent_shift"):
        diff = log_profile(model.predict_perturbation(perturbation="A", strategy=strategy, **kw))
        diff = diff - base
        rest = np.abs(diff[~(up | down)]).mean()
        assert diff[up].mean() > 0.3, (strategy, diff[up])
        assert diff[down].mean() < -0.3, (strategy, diff[down])
        assert diff[up].mean() - diff[down].mean() > rest, strategy


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip(pert_model, tmp_path):
    path = tmp_path / "model"
    pert_model.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "model.pt"]
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["trained_stages"] == ["vae", "flow", "perturbation"]
    torch.load(path / "model.pt", weights_only=True)  # plain tensors only

    adata = pert_model.adata
    idx = np.flatnonzero(adata.obs[KEY] == "ctrl")[:12]
    kw = dict(perturbation="A", indices=idx, n_samples_per_cell=2, seed=5, **QUIET)
    ref = pert_model.predict_perturbation(**kw)
    loaded = LDM.load(path, adata=adata.copy(), accelerator="cpu")
    assert loaded.trained_stages_ == pert_model.trained_stages_
    assert "perturbation_loss_validation" in loaded.history
    _same_prediction(ref, loaded.predict_perturbation(**kw))
    shift_kw = dict(kw, strategy="latent_shift")
    _same_prediction(
        pert_model.predict_perturbation(**shift_kw), loaded.predict_perturbation(**shift_kw)
    )
    # without data: pass the cells (a newly read AnnData is registered on the fly)
    bare = LDM.load(path, accelerator="cpu")
    assert bare.adata is None
    with pytest.raises(ValueError, match="holds no AnnData"):
        bare.predict_perturbation(perturbation="A", **QUIET)
    _same_prediction(ref, bare.predict_perturbation(_fresh(adata), **kw))
    bare = LDM.load(path, accelerator="cpu")
    # the latent shifts were saved with the model: no training data needed
    np.testing.assert_allclose(
        bare._latent_shift(np.array(["A"])), pert_model._latent_shift(np.array(["A"]))
    )


def test_save_load_with_embeddings_and_dose(dose_emb_model, tmp_path):
    path = tmp_path / "model"
    dose_emb_model.save(path)
    adata = dose_emb_model.adata
    kw = dict(perturbation="C", dose=3.0, seed=2, **QUIET)
    ref = dose_emb_model.predict_perturbation(**kw)
    np.testing.assert_array_equal(ref.obs["dose"], 3.0)
    loaded = LDM.load(path, adata=adata.copy(), accelerator="cpu")
    assert loaded._perturbation_state()["names"] == ["A", "B", "C", "D"]
    _same_prediction(ref, loaded.predict_perturbation(**kw))
    bare = LDM.load(path, accelerator="cpu")
    controls = np.flatnonzero(adata.obs[KEY] == "ctrl")
    _same_prediction(ref, bare.predict_perturbation(_fresh(adata, controls), **kw))


def test_default_dose_is_mean_training_dose(dose_emb_model):
    out = dose_emb_model.predict_perturbation(perturbation="A", seed=0, **QUIET)
    np.testing.assert_array_equal(out.obs["dose"], 10.0)
    per_cell = dose_emb_model.predict_perturbation(
        perturbation="A", dose=[1.0, 2.0], indices=[0, 1], seed=0, **QUIET
    )
    np.testing.assert_array_equal(per_cell.obs["dose"], [1.0, 2.0])
    with pytest.raises(ValueError, match="dose has 3 values for 2 cells"):
        dose_emb_model.predict_perturbation(
            perturbation="A", dose=[1.0, 2.0, 3.0], indices=[0, 1], **QUIET
        )
    with pytest.raises(ValueError, match="Doses must be finite and non-negative"):
        dose_emb_model.predict_perturbation(perturbation="A", dose=-1.0, **QUIET)


def test_default_dose_survives_load_without_adata(dose_emb_model, tmp_path):
    dose_emb_model.save(tmp_path / "m")
    bare = LDM.load(tmp_path / "m", accelerator="cpu")
    adata = dose_emb_model.adata
    controls = np.flatnonzero(adata.obs[KEY] == "ctrl")
    kw = dict(perturbation="A", seed=0, **QUIET)
    ref = dose_emb_model.predict_perturbation(**kw)  # dose 10, the mean of the "A" cells
    out = bare.predict_perturbation(_fresh(adata, controls), **kw)  # new control cells
    np.testing.assert_array_equal(out.obs["dose"], ref.obs["dose"])


def test_query_of_a_bare_model_does_not_change_latent_shift(pert_model, tmp_path):
    # scvi-tools attaches the first query to a model loaded without data; the latent shifts
    # were recorded at training time and saved, so they do not come from that query
    pert_model.save(tmp_path / "m")
    bare = LDM.load(tmp_path / "m", accelerator="cpu")
    controls = np.flatnonzero(pert_model.adata.obs[KEY] == "ctrl")
    query = _fresh(pert_model.adata, controls[:5])
    bare.predict_perturbation(query, perturbation="A", **QUIET)
    kw = dict(perturbation="A", strategy="latent_shift", seed=0, **QUIET)
    a = bare.predict_perturbation(_fresh(pert_model.adata, controls), **kw)
    b = pert_model.predict_perturbation(_fresh(pert_model.adata, controls), **kw)
    np.testing.assert_allclose(a.obsm["X_latentcell"], b.obsm["X_latentcell"], atol=1e-5)


def test_residual_flow_starts_at_the_linear_shift():
    adata = _data(n_cells=300, n_genes=20, perturbations=("A", "B"))
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    model = LDM(adata, perturbation_residual=True, **FAST_MODEL)
    model.train(stage="vae", max_epochs=3, **_quiet_train())
    model.train(stage="perturbation", perturbation_max_epochs=1, **_quiet_train())
    flow = model.module.perturbation_flow
    assert flow.residual and flow.shift_weight.abs().sum() > 0
    # the fitted shift of 'A' is the latent shift of 'A' (per-label means, averaged), up to
    # the weighting of labels, in the standardised space
    shift = model._latent_shift(np.array(["A"]))[0] / flow.latent_std.numpy()
    cond = torch.as_tensor(model._perturbation_vectors(["A"]))
    fitted = (cond @ flow.shift_weight).numpy()[0]
    assert np.corrcoef(shift, fitted)[0, 1] > 0.9


# --------------------------------------------------------------------------- label validation
@pytest.fixture(scope="module")
def label_model():
    """VAE plus a perturbation flow whose epochs were chosen on held-out labels."""
    adata = _data(n_cells=300, n_genes=20, perturbations=("A", "B"), n_cell_types=3)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    model = LDM(adata, **FAST_MODEL)
    model.train(stage="vae", max_epochs=3, **_quiet_train())
    model.vae_split = (np.copy(model.train_indices), np.copy(model.validation_indices))
    model.train(
        stage="perturbation",
        perturbation_max_epochs=6,
        perturbation_validation="labels",
        **_quiet_train(),
    )
    return model


def test_label_holdout_hides_every_perturbed_cell_of_the_chosen_labels(label_model):
    model = label_model
    # the selection fit does not leave its split behind as the model's
    np.testing.assert_array_equal(model.train_indices, model.vae_split[0])
    np.testing.assert_array_equal(model.validation_indices, model.vae_split[1])
    labels, _ = model._perturbation_codes(model.adata)
    is_control = labels == "ctrl"
    train_idx = np.asarray(model.train_indices)
    names, sel_train, sel_val = model._label_holdout(
        model._perturbation_groups(model.adata), is_control, train_idx
    )
    cell_type = model.adata.obs["cell_type"].to_numpy()
    assert len(names) == 1 and names[0] in set(cell_type)
    np.testing.assert_array_equal(np.sort(np.r_[sel_train, sel_val]), np.sort(train_idx))
    hidden = (cell_type == names[0]) & ~is_control
    np.testing.assert_array_equal(np.sort(sel_val), np.sort(train_idx[hidden[train_idx]]))
    # the held-out label's controls stay in training as sources
    assert ((cell_type[sel_train] == names[0]) & is_control[sel_train]).any()


def test_label_validation_selects_epochs_then_refits(label_model):
    model = label_model
    sel = model.perturbation_summary_["epoch_selection"]
    assert set(sel) == {
        "validation_labels",
        "n_validation_cells",
        "best_epoch",
        "selection_epochs",
        "refit_epochs",
    }
    curve = model.history["perturbation_selection_loss_validation"].to_numpy().ravel()
    assert len(curve) == sel["selection_epochs"] == 6
    assert sel["best_epoch"] == int(np.argmin(curve)) + 1
    # the refit trains on all training cells (more per epoch), for as many steps
    n_train, n_sel = len(model.train_indices), len(model.train_indices) - sel["n_validation_cells"]
    steps = math.ceil(n_sel / 256) / math.ceil(n_train / 256)
    assert sel["refit_epochs"] == max(1, round(sel["best_epoch"] * steps))
    assert len(model.history["perturbation_loss_train"]) == sel["refit_epochs"]
    assert model.trained_stages_ == ["vae", "perturbation"]
    out = model.predict_perturbation(perturbation="A", **QUIET)
    assert np.isfinite(out.layers["latentcell_mean"]).all()


def test_label_validation_survives_save_load_and_is_dropped_on_retraining(label_model, tmp_path):
    label_model.save(tmp_path / "m")
    loaded = LDM.load(tmp_path / "m", adata=label_model.adata)
    assert (
        loaded.perturbation_summary_["epoch_selection"]
        == label_model.perturbation_summary_["epoch_selection"]
    )
    loaded.train(stage="perturbation", perturbation_max_epochs=1, **_quiet_train())
    assert "epoch_selection" not in loaded.perturbation_summary_
    assert "perturbation_selection_loss_validation" not in loaded.history


@pytest.mark.parametrize(
    ("value", "n_types", "match"),
    [
        ("genes", 3, "perturbation_validation must be 'cells' or 'labels'"),
        ("labels", 1, "needs at least two\\s+labels"),
    ],
)
def test_label_validation_errors_before_training(value, n_types, match):
    adata = _data(n_cells=90, n_genes=15, perturbations=("A",), n_cell_types=n_types)
    LDM.setup_anndata(adata, layer="counts", labels_key="cell_type", perturbation_key=KEY)
    model = LDM(adata, **FAST_MODEL)
    with pytest.raises(ValueError, match=match):
        model.train(max_epochs=1, perturbation_validation=value, **_quiet_train())
    assert model.trained_stages_ == []
