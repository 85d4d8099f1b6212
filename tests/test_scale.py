"""Data that does not fit in memory: backed AnnData in, generated cells streamed to disk."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import latentcell as lc
from latentcell._memory import _malloc_trim, release_memory
from latentcell.model._validation import row_blocks, row_sums

from .conftest import FAST_MODEL

TINY_TRAIN = dict(max_epochs=2, flow_max_epochs=2, accelerator="cpu", enable_progress_bar=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, dense=False, mutate=None):
    adata = lc.datasets.synthetic_counts(n_cells=200, n_genes=30, seed=0)
    x = adata.layers["counts"]
    x = np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float32)
    if mutate is not None:
        mutate(x)
    out = ad.AnnData(
        X=x if dense else sparse.csr_matrix(x), obs=adata.obs[["cell_type", "batch"]].copy()
    )
    path = tmp_path / "counts.h5ad"
    out.write_h5ad(path)
    return path, out


def test_row_blocks_and_sums_cover_every_row(tmp_path):
    path, mem = _write(tmp_path)
    backed = ad.read_h5ad(path, backed="r")
    blocks = list(row_blocks(backed.X, backed.n_obs, block=64))
    assert [b.shape[0] for b in blocks] == [64, 64, 64, 8]
    np.testing.assert_allclose(row_sums(backed.X, backed.n_obs), mem.X.sum(axis=1).A1)
    assert row_sums(mem.X, 0).shape == (0,)


def _resident_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_release_memory_returns_freed_heap_blocks_to_the_system():
    # 1,500 heap blocks of 64 KiB (below glibc's mmap threshold, so they live in the heap),
    # every one but the last freed: the last pins the heap top, so only trimming inside
    # the heap can give the ~94 MiB back.
    blocks = [np.ones(8192) for _ in range(1500)]
    keep = blocks[-1]
    del blocks
    before = _resident_mib()
    assert release_memory()
    assert before - _resident_mib() > 50
    assert keep.sum() == 8192


@pytest.mark.parametrize("dense", [False, True])
def test_training_on_backed_anndata_matches_in_memory_setup(tmp_path, dense):
    path, mem = _write(tmp_path, dense=dense)
    backed = ad.read_h5ad(path, backed="r")
    lc.LatentDiffusionModel.setup_anndata(backed, labels_key="cell_type", batch_key="batch")
    model = lc.LatentDiffusionModel(backed, **FAST_MODEL)
    model.train(seed=0, **TINY_TRAIN)
    assert backed.isbacked
    np.testing.assert_allclose(
        np.exp(model.reference_["log_library"]), np.asarray(mem.X.sum(axis=1)).ravel(), rtol=1e-5
    )
    z = model.get_latent_representation(key_added=None)
    assert z.shape == (200, FAST_MODEL["n_latent"]) and np.isfinite(z).all()
    out = model.sample(20, conditions={"cell_type": "type_0"}, seed=0, progress_bar=False)
    assert out.n_obs == 20


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x: x.__setitem__((150, 3), 0.5), "non-integer"),
        (lambda x: x.__setitem__((190, 1), -2.0), "negative"),
        (lambda x: x.__setitem__(199, 0.0), "1 of 200 cells have no counts"),
    ],
)
def test_bad_counts_are_found_in_backed_files(tmp_path, mutate, match):
    path, _ = _write(tmp_path, mutate=mutate)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=match):
        lc.LatentDiffusionModel.setup_anndata(backed)
    assert "_scvi_uuid" not in backed.uns


def test_sample_to_disk_equals_sampling_in_memory(trained, tmp_path):
    path = tmp_path / "generated.h5ad"
    kwargs = dict(conditions={"cell_type": "type_1"}, seed=3, batch_size=16, progress_bar=False)
    on_disk = trained.sample(50, out_path=path, **kwargs)
    in_memory = trained.sample(50, **kwargs)
    assert on_disk.isbacked and on_disk.shape == (50, in_memory.n_vars)
    loaded = on_disk.to_memory()
    np.testing.assert_array_equal(loaded.X.toarray(), in_memory.X.toarray())
    np.testing.assert_array_equal(loaded.obsm["X_latentcell"], in_memory.obsm["X_latentcell"])
    assert loaded.obs.equals(in_memory.obs)
    assert list(loaded.var_names) == list(in_memory.var_names)
    assert "latentcell_mean" not in loaded.layers  # dense means are not streamed
    assert loaded.uns["latentcell"]["out_path"] == str(path)
    on_disk.file.close()


def test_mixed_precision_trains_both_stages_finite():
    adata = lc.datasets.synthetic_counts(n_cells=200, n_genes=30, seed=0)
    lc.LatentDiffusionModel.setup_anndata(adata, layer="counts", labels_key="cell_type")
    model = lc.LatentDiffusionModel(adata, **FAST_MODEL)
    model.train(seed=0, precision="bf16-mixed", **TINY_TRAIN)  # passed on to Lightning
    assert model.trained_stages_ == ["vae", "flow"]
    for key in ("elbo_train", "flow_loss_train"):
        assert model.history[key].dtypes.tolist() == [np.float64]
        assert np.isfinite(model.history[key].to_numpy()).all()
    out = model.sample(20, seed=0, progress_bar=False)
    assert np.isfinite(out.layers["latentcell_mean"]).all()


def _compile_pair(**compile_kwargs):
    adata = lc.datasets.synthetic_counts(n_cells=200, n_genes=30, seed=0)
    lc.LatentDiffusionModel.setup_anndata(adata, layer="counts", labels_key="cell_type")
    models = []
    for compiled in (False, True):
        import scvi

        scvi.settings.seed = 0
        model = lc.LatentDiffusionModel(adata, **FAST_MODEL)
        if compiled:
            assert model.compile(**compile_kwargs) is model
        model.train(seed=0, early_stopping=False, **TINY_TRAIN)
        models.append(model)
    return models


def test_compile_traces_every_network_and_learns_the_same_model(tmp_path):
    # the "eager" backend runs TorchDynamo's tracing without code generation: the same
    # operations as the uncompiled model, so the two must agree to float precision
    eager, compiled = _compile_pair(backend="eager")
    nets = compiled._compiled_networks(vae=True)
    assert len(nets) == 4  # flow denoiser; VAE z and library encoders, decoder
    assert all(net._compiled_call_impl is not None for net in nets)
    assert all(net._compiled_call_impl is None for net in eager._compiled_networks(vae=True))
    for key in ("elbo_train", "flow_loss_train"):
        np.testing.assert_allclose(
            compiled.history[key].to_numpy(), eager.history[key].to_numpy(), rtol=1e-4
        )
    kwargs = dict(conditions={"cell_type": "type_0"}, seed=1, n_steps=4, progress_bar=False)
    a, b = eager.sample(30, **kwargs), compiled.sample(30, **kwargs)
    np.testing.assert_allclose(a.obsm["X_latentcell"], b.obsm["X_latentcell"], atol=1e-4)
    # weights and the saved format are those of an uncompiled model
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())
    compiled.save(tmp_path / "m")
    loaded = lc.LatentDiffusionModel.load(tmp_path / "m", adata=compiled.adata)
    c = loaded.sample(30, **kwargs)
    np.testing.assert_allclose(c.obsm["X_latentcell"], b.obsm["X_latentcell"], atol=1e-4)
    # retraining the VAE rebuilds the flow; the new one is compiled when it trains
    compiled.train(stage="vae", max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    compiled.train(stage="flow", flow_max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    assert compiled.module.flow.denoiser._compiled_call_impl is not None
