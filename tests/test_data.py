"""The in-memory VAE data path serves what scvi-tools' loader serves."""

import numpy as np
import pytest
import torch
from scipy import sparse
from scvi.dataloaders import DataSplitter

import latentcell as lc
from latentcell import LatentDiffusionModel as LDM
from latentcell.model import CountsDataModule
from latentcell.model._data import registered_tensors

from .conftest import FAST_MODEL, FAST_TRAIN


def _setup(adata):
    adata.obs["cc"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    LDM.setup_anndata(
        adata,
        layer="counts",
        labels_key="cell_type",
        batch_key="batch",
        categorical_covariate_keys=["cc"],
        continuous_covariate_keys=["score"],
    )
    return LDM(adata, **FAST_MODEL)


@pytest.mark.parametrize("dense_limit", [2**30, 0])
def test_batches_match_scvi_loader(synthetic, dense_limit):
    synthetic.layers["counts"] = sparse.csr_matrix(synthetic.layers["counts"])
    model = _setup(synthetic)
    splitter = DataSplitter(model.adata_manager, batch_size=50)
    splitter.setup()
    ours = CountsDataModule(
        model.adata_manager,
        splitter.train_idx,
        splitter.val_idx,
        batch_size=50,
        dense_limit_bytes=dense_limit,
    )
    stored = ours.train_set.tensors["X"]
    assert sparse.issparse(stored) == (dense_limit == 0)
    theirs = next(iter(splitter.val_dataloader()))
    mine = next(iter(ours.val_dataloader()))
    assert set(mine) == set(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype, key
        assert mine[key].shape == theirs[key].shape, key
        assert torch.equal(mine[key], theirs[key]), key
    assert ours.n_train == len(splitter.train_idx) and ours.n_val == len(splitter.val_idx)


def test_train_batches_cover_training_cells_once(synthetic):
    model = _setup(synthetic)
    tensors = registered_tensors(model.adata_manager)
    train_idx = np.arange(0, synthetic.n_obs, 2)
    data = CountsDataModule(model.adata_manager, train_idx, np.arange(1, 20, 2), batch_size=32)
    rows = torch.cat([b["X"] for b in data.train_dataloader()])
    # 120 training cells in batches of 32: the last batch (24 cells) is kept
    assert rows.shape[0] == len(train_idx)
    expected = tensors["X"][torch.as_tensor(train_idx)]
    assert torch.equal(rows.sum(0), expected.sum(0))


@pytest.mark.parametrize("load_in_memory", [True, False])
def test_training_with_either_data_path(synthetic, load_in_memory):
    model = _setup(synthetic)
    model.train(stage="vae", load_in_memory=load_in_memory, **FAST_TRAIN)
    assert len(model.history["elbo_validation"]) > 0
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()
    assert len(model.train_indices) + len(model.validation_indices) == synthetic.n_obs


def test_ddpm_objective_end_to_end(synthetic):
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, objective="ddpm", **FAST_MODEL)
    assert "ddpm prior" in repr(model)
    model.train(**FAST_TRAIN)
    gen = model.sample(
        n_samples=30, conditions={"cell_type": "type_0"}, n_steps=5, seed=0, progress_bar=False
    )
    assert gen.uns["latentcell"]["method"] == "ddim"
    assert np.isfinite(gen.obsm["X_latentcell"]).all()
    with pytest.raises(ValueError, match="for objective='ddpm'"):
        model.sample(n_samples=3, method="euler", progress_bar=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        LDM(synthetic, objective="score")


def test_flow_objective_rejects_ddim(trained):
    with pytest.raises(ValueError, match="for objective='flow'"):
        trained.sample(n_samples=3, method="ddim", progress_bar=False)
    assert lc.LatentDiffusionModel  # the public name stays importable


def test_joint_fine_tuning_stage(synthetic):
    LDM.setup_anndata(synthetic, layer="counts", labels_key="cell_type")
    model = LDM(synthetic, **FAST_MODEL)
    with pytest.raises(RuntimeError, match="FLOW stage"):
        model.train(stage="joint", accelerator="cpu", enable_progress_bar=False)
    model.train(**FAST_TRAIN)
    elbo_before = model.history["elbo_train"].copy()
    encoder_before = [p.detach().clone() for p in model.module.vae.z_encoder.parameters()]
    model.train(stage="joint", joint_max_epochs=3, **FAST_TRAIN)
    assert model.trained_stages_ == ["vae", "flow", "joint"]
    # the VAE's own curves are kept; the joint stage's are prefixed
    assert model.history["elbo_train"].equals(elbo_before)
    assert {"joint_elbo_train", "joint_flow_loss_train"} <= set(model.history)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(encoder_before, model.module.vae.z_encoder.parameters(), strict=True)
    ]
    assert any(changed)  # the flow loss reaches the encoder
    assert not any(p.requires_grad for p in model.module.vae.parameters())
    gen = model.sample(n_samples=10, n_steps=3, seed=0, progress_bar=False)
    assert np.isfinite(gen.obsm["X_latentcell"]).all()
