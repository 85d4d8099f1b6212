"""MuData models: setup, the product-of-experts VAE, sampling, translation, save/load."""

import mudata
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomialMixture
from torch.distributions import Bernoulli

import latentcell as lc
from latentcell import LatentDiffusionModel as LDM
from latentcell.module import MultiModalVAE, TranslationFlow

from .conftest import FAST_MODEL

QUIET = dict(accelerator="cpu", enable_progress_bar=False)
FAST = dict(n_steps=3, progress_bar=False)
N_GENES, N_PROT, N_PEAKS = 50, 8, 30
CELL_TYPES = np.array(["A", "B", "C"])
RNA2PROT = {"rna": "rna", "protein": "prot"}

# The "biology" shared by every synthetic data set: per cell type, gene means, protein means
# (strongly type-dependent, log-scale spread of 1.5) and accessibility probabilities.
_BIO = np.random.default_rng(100)
GENE_MU = _BIO.lognormal(0.5, 1.0, size=(3, N_GENES))
PROT_MU = np.exp(_BIO.normal(2.5, 1.5, size=(3, N_PROT)))
PEAK_P = _BIO.uniform(0.02, 0.9, size=(3, N_PEAKS))


def _mdata(n_cells=200, seed=0, peaks=False, n_missing_protein=0, prefix="cell"):
    """Synthetic CITE-seq(-like) MuData; returns it, the cell types and true protein means."""
    rng = np.random.default_rng(seed)
    ct = rng.integers(0, 3, n_cells)
    lib = rng.lognormal(0.0, 0.2, size=(n_cells, 1))
    rna = rng.negative_binomial(5, 5 / (5 + GENE_MU[ct] * lib)).astype(np.float32)
    prot = rng.negative_binomial(10, 10 / (10 + PROT_MU[ct])).astype(np.float32)
    prot[:n_missing_protein] = 0
    names = pd.Index([f"{prefix}{i}" for i in range(n_cells)])

    def mod(x, var_prefix, n):
        return AnnData(
            X=x,
            obs=pd.DataFrame(index=names),
            var=pd.DataFrame(index=[f"{var_prefix}{j}" for j in range(n)]),
        )

    mods = {"rna": mod(sparse.csr_matrix(rna), "g", N_GENES), "prot": mod(prot, "p", N_PROT)}
    if peaks:
        atac = (rng.random((n_cells, N_PEAKS)) < PEAK_P[ct]).astype(np.float32)
        mods["atac"] = mod(sparse.csr_matrix(atac), "r", N_PEAKS)
    md = mudata.MuData(mods)
    md.obs["cell_type"] = pd.Categorical(CELL_TYPES[ct])
    md.obs["batch"] = pd.Categorical(np.array(["b0", "b1"])[rng.integers(0, 2, n_cells)])
    return md, ct, PROT_MU[ct]


def _snapshot(md):
    return (
        list(md.obs.columns),
        set(md.uns),
        {
            k: (list(a.obs.columns), set(a.uns), sparse.csr_matrix(a.X).copy())
            for k, a in md.mod.items()
        },
    )


def _assert_unchanged(md, snap):
    obs_cols, uns, mods = snap
    assert list(md.obs.columns) == obs_cols
    assert set(md.uns) == uns
    assert set(md.mod) == set(mods)
    for k, (cols, muns, x) in mods.items():
        assert list(md.mod[k].obs.columns) == cols
        assert set(md.mod[k].uns) == muns
        np.testing.assert_array_equal(_dense(md.mod[k].X), x.toarray())


def _dense(x):
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _is_counts(x):
    x = _dense(x)
    return np.all(np.isfinite(x)) and np.all(x >= 0) and np.all(x == np.round(x))


def _same(a, b):
    assert a.shape == b.shape
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    np.testing.assert_array_equal(a.layers["latentcell_mean"], b.layers["latentcell_mean"])
    assert set(a.obsm) == set(b.obsm)
    for key in a.obsm:
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])


# --------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mm():
    """RNA + protein model, trained long enough to learn; 20 training cells lack protein."""
    train, _, _ = _mdata(n_cells=300, seed=0, n_missing_protein=20)
    test, ct_test, prot_test = _mdata(n_cells=100, seed=1, prefix="held")
    LDM.setup_mudata(train, modalities=RNA2PROT, labels_key="cell_type", batch_key="batch")
    scvi.settings.seed = 0
    model = LDM(train, **FAST_MODEL)
    model.train(
        max_epochs=20,
        flow_max_epochs=20,
        lr=1e-2,
        flow_lr=3e-3,
        flow_batch_size=64,
        seed=0,
        **QUIET,
    )
    return dict(model=model, train=train, test=test, ct_test=ct_test, prot_test=prot_test)


@pytest.fixture(scope="module")
def tri():
    """RNA + protein + binary accessibility, trained briefly."""
    md, _, _ = _mdata(n_cells=200, seed=2, peaks=True)
    LDM.setup_mudata(
        md,
        modalities={"rna": "rna", "protein": "prot", "accessibility": "atac"},
        batch_key="batch",
    )
    scvi.settings.seed = 0
    model = LDM(md, **FAST_MODEL)
    model.train(max_epochs=3, flow_max_epochs=3, seed=0, **QUIET)
    return model


# --------------------------------------------------------------------------- setup
@pytest.mark.parametrize(
    ("modalities", "match"),
    [
        ({"rna": "rna", "antibody": "prot"}, "Unknown modality"),
        ({"protein": "prot"}, "'rna'"),
        ({"rna": "rna"}, "'rna'"),
        ({"rna": "rna", "protein": "adt"}, "'adt' is not in mdata.mod"),
    ],
)
def test_setup_mudata_rejects_bad_modalities(modalities, match):
    md, _, _ = _mdata(n_cells=30)
    snap = _snapshot(md)
    with pytest.raises(ValueError, match=match):
        LDM.setup_mudata(md, modalities=modalities, batch_key="batch")
    _assert_unchanged(md, snap)


def _non_integer_protein(md):
    md.mod["prot"].X[3, 1] = 2.5


def _negative_protein(md):
    md.mod["prot"].X[3, 1] = -1.0


def _nan_protein(md):
    md.mod["prot"].X[3, 1] = np.nan


def _empty_rna_cell(md):
    x = md.mod["rna"].X.tolil()
    x[0, :] = 0
    md.mod["rna"].X = x.tocsr()


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_non_integer_protein, r"Modality 'protein' \(mdata.mod\['prot'\]\).*non-integer"),
        (_negative_protein, r"Modality 'protein' \(mdata.mod\['prot'\]\).*negative"),
        (_nan_protein, r"Modality 'protein'.*NaN"),
        (_empty_rna_cell, r"Modality 'rna'.*no counts"),
    ],
)
def test_setup_mudata_rejects_bad_counts_and_leaves_mudata_unchanged(corrupt, match):
    md, _, _ = _mdata(n_cells=30)
    corrupt(md)
    snap = _snapshot(md)
    with pytest.raises(ValueError, match=match):
        LDM.setup_mudata(md, modalities=RNA2PROT, labels_key="cell_type", batch_key="batch")
    _assert_unchanged(md, snap)


def test_setup_mudata_on_a_copy_keeps_the_originals_registration():
    md, _, _ = _mdata()
    LDM.setup_mudata(md, modalities=RNA2PROT, labels_key="cell_type", batch_key="batch")
    copy = md.copy()
    LDM.setup_mudata(copy, modalities=RNA2PROT, labels_key="cell_type")
    assert copy.uns["_scvi_uuid"] != md.uns["_scvi_uuid"]
    assert LDM(md).registry_["setup_args"]["batch_key"] == "batch"
    assert LDM(copy).registry_["setup_args"]["batch_key"] is None


def test_setup_mudata_rejects_modality_with_other_cells():
    md, _, _ = _mdata(n_cells=30)
    subset = mudata.MuData({"rna": md.mod["rna"].copy(), "prot": md.mod["prot"][:20].copy()})
    subset.obs["batch"] = "b0"
    snap = _snapshot(subset)
    with pytest.raises(ValueError, match=r"mdata.mod\['prot'\] does not hold the same cells"):
        LDM.setup_mudata(subset, modalities=RNA2PROT, batch_key="batch")
    _assert_unchanged(subset, snap)


def test_setup_mudata_missing_obs_column_and_layer_leave_mudata_unchanged():
    md, _, _ = _mdata(n_cells=30)
    snap = _snapshot(md)
    with pytest.raises(ValueError, match="no_such_column"):
        LDM.setup_mudata(md, modalities=RNA2PROT, labels_key="no_such_column")
    with pytest.raises(ValueError, match=r"Modality 'protein'.*Layer 'counts' not found"):
        LDM.setup_mudata(md, modalities=RNA2PROT, protein_layer="counts")
    _assert_unchanged(md, snap)


def test_setup_mudata_needs_a_mudata():
    md, _, _ = _mdata(n_cells=30)
    rna = md.mod["rna"].copy()
    with pytest.raises(TypeError, match="MuData"):
        LDM.setup_mudata(rna, modalities=RNA2PROT)
    assert list(rna.obs.columns) == [] and "_scvi_uuid" not in rna.uns


def test_setup_mudata_registers_layers_and_builds_multimodal_vae():
    md, _, _ = _mdata(n_cells=40, n_missing_protein=5)
    # counts in a layer, normalised values in X: the layer must be used
    md.mod["prot"].layers["counts"] = md.mod["prot"].X.copy()
    md.mod["prot"].X = np.log1p(md.mod["prot"].X) / 3.0
    LDM.setup_mudata(md, modalities=RNA2PROT, protein_layer="counts", batch_key="batch")
    model = LDM(md, **FAST_MODEL)
    assert model.is_multimodal
    assert [m["name"] for m in model._modalities()] == ["rna", "protein"]
    vae = model.module.vae
    assert isinstance(vae, MultiModalVAE)
    assert vae.n_features == {"rna": N_GENES, "protein": N_PROT}
    assert vae.likelihoods == {"rna": "nb", "protein": "nb"}
    assert vae.modality_dropout == 0.3
    assert isinstance(model.module.translation_flow, TranslationFlow)
    assert "modalities=['rna', 'protein']" in repr(model)
    manager = model.adata_manager
    np.testing.assert_array_equal(
        _dense(manager.get_from_registry(REGISTRY_KEYS.PROTEIN_EXP_KEY)),
        md.mod["prot"].layers["counts"],
    )
    # zero protein rows are accepted: not measured
    observed = model._observed_modalities(md)
    assert observed.shape == (40, 2)
    assert observed[:, 0].all() and not observed[:5, 1].any() and observed[5:, 1].all()


def test_invalid_model_options_for_mudata():
    md, _, _ = _mdata(n_cells=30)
    LDM.setup_mudata(md, modalities=RNA2PROT)
    with pytest.raises(ValueError, match="protein_likelihood"):
        LDM(md, protein_likelihood="poisson", **FAST_MODEL)
    with pytest.raises(ValueError, match="gene_likelihood='nb'"):
        LDM(md, gene_likelihood="zinb", **FAST_MODEL)
    with pytest.raises(ValueError, match="modality_dropout"):
        LDM(md, modality_dropout=1.0, **FAST_MODEL)
    model = LDM(md, protein_likelihood="nb_mixture", modality_dropout=0.5, **FAST_MODEL)
    assert model.module.vae.likelihoods["protein"] == "nb_mixture"
    assert model.module.vae.modality_dropout == 0.5


# --------------------------------------------------------------------------- module
def _module(likelihood="nb", modality_dropout=0.3, dropout_rate=0.0, peaks=False, seed=0):
    torch.manual_seed(seed)
    specs = [("rna", "X", 20, "nb"), ("protein", "protein_expression", 6, likelihood)]
    if peaks:
        specs.append(("accessibility", "accessibility", 12, "bernoulli"))
    return MultiModalVAE(
        specs,
        n_batch=2,
        n_latent=4,
        n_hidden=16,
        modality_dropout=modality_dropout,
        dropout_rate=dropout_rate,
    )


def _tensors(n=64, seed=0, n_missing_protein=0, peaks=False):
    g = torch.Generator().manual_seed(seed)
    out = {
        "X": torch.poisson(torch.full((n, 20), 3.0), generator=g),
        "protein_expression": torch.poisson(torch.full((n, 6), 20.0), generator=g),
        REGISTRY_KEYS.BATCH_KEY: torch.randint(0, 2, (n, 1), generator=g),
    }
    out["X"][:, 0] += 1  # every cell has RNA
    out["protein_expression"][:n_missing_protein] = 0
    if peaks:
        out["accessibility"] = (torch.rand(n, 12, generator=g) < 0.3).float()
    return out


def _qz(module, tensors, **kwargs):
    inp = module._get_inference_input(tensors)
    return module.inference(**inp, **kwargs)["qz"]


def test_module_rejects_bad_specs():
    with pytest.raises(ValueError, match="two modalities"):
        MultiModalVAE([("rna", "X", 5, "nb")])
    with pytest.raises(ValueError, match="Likelihood of modality 'protein'"):
        MultiModalVAE([("rna", "X", 5, "nb"), ("protein", "p", 3, "poisson")])
    with pytest.raises(ValueError, match="primary"):
        MultiModalVAE([("rna", "X", 5, "bernoulli"), ("protein", "p", 3, "nb")])
    with pytest.raises(ValueError, match="modality_dropout"):
        MultiModalVAE([("rna", "X", 5, "nb"), ("protein", "p", 3, "nb")], modality_dropout=-0.1)


@pytest.mark.parametrize("likelihood", ["nb", "nb_mixture"])
def test_loss_masks_cells_without_protein(likelihood):
    module = _module(likelihood)
    module.eval()
    tensors = _tensors(n_missing_protein=5)
    _, gen, loss = module(tensors)
    rec = loss.reconstruction_loss
    prot = rec["reconstruction_loss_protein"].detach()
    assert torch.all(prot[:5] == 0)
    assert torch.all(prot[5:] > 0)
    assert torch.all(rec["reconstruction_loss_rna"].detach() > 0)
    # the logged likelihood is per cell that measured the modality, not diluted by the others
    torch.testing.assert_close(loss.extra_metrics["nll_protein"], prot[5:].mean())
    torch.testing.assert_close(
        loss.extra_metrics["nll_rna"], rec["reconstruction_loss_rna"].detach().mean()
    )
    # the decoder would give zero counts a non-trivial likelihood: the zero comes from the mask
    assert torch.all(gen["px"]["protein"].log_prob(tensors["protein_expression"])[:5].sum(-1) < 0)

    # cells without protein give no gradient to the protein decoder nor to the protein expert
    only_missing = {k: v[:5] for k, v in tensors.items()}
    module.zero_grad()
    module(only_missing)[2].loss.backward()
    for part in (module.decoders["protein"], module.encoders["protein"]):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert all(torch.all(gr == 0) for gr in grads)
    rna_grads = [p.grad for p in module.decoders["rna"].parameters() if p.grad is not None]
    assert any(torch.any(gr != 0) for gr in rna_grads)

    # and their loss does not change with the protein decoder's output (same latent draws)
    def seeded_loss(t):
        torch.manual_seed(0)
        return module(t)[2].loss.item()

    before, full_before = seeded_loss(only_missing), seeded_loss(tensors)
    with torch.no_grad():
        for p in module.decoders["protein"].parameters():
            p.add_(0.5)
    assert seeded_loss(only_missing) == pytest.approx(before, rel=1e-6)
    assert seeded_loss(tensors) != pytest.approx(full_before, rel=1e-3)  # control


def test_product_of_experts_matches_the_formula_and_prior():
    module = _module()
    module.eval()
    tensors = _tensors(n=16, n_missing_protein=4)
    qz = _qz(module, tensors)
    batch = tensors[REGISTRY_KEYS.BATCH_KEY]
    precision, weighted = torch.ones(16, 4), torch.zeros(16, 4)
    with torch.no_grad():
        for name, key in (("rna", "X"), ("protein", "protein_expression")):
            mean, logvar = module.encoders[name](torch.log1p(tensors[key]), batch)
            w = torch.exp(-logvar) * (tensors[key].sum(-1, keepdim=True) > 0)
            precision += w
            weighted += w * mean
    torch.testing.assert_close(qz.loc, weighted / precision)
    torch.testing.assert_close(qz.scale, precision.rsqrt())

    # nothing visible: the standard normal prior
    for kwargs in (
        dict(use_modalities=[]),
        dict(encoder_mask={"rna": torch.zeros(16), "protein": torch.zeros(16)}),
    ):
        prior = _qz(module, tensors, **kwargs)
        torch.testing.assert_close(prior.loc, torch.zeros(16, 4))
        torch.testing.assert_close(prior.scale, torch.ones(16, 4))
    empty = {**tensors, "X": torch.zeros(16, 20), "protein_expression": torch.zeros(16, 6)}
    torch.testing.assert_close(_qz(module, empty).loc, torch.zeros(16, 4))
    torch.testing.assert_close(_qz(module, empty).scale, torch.ones(16, 4))


def test_use_modalities_ignores_the_other_modalities():
    module = _module()
    module.eval()
    tensors = _tensors(n=16)
    changed = {**tensors, "protein_expression": tensors["protein_expression"] * 5 + 3}
    rna_only = _qz(module, tensors, use_modalities=["rna"])
    torch.testing.assert_close(rna_only.loc, _qz(module, changed, use_modalities=["rna"]).loc)
    torch.testing.assert_close(rna_only.scale, _qz(module, changed, use_modalities=["rna"]).scale)
    # a cell without protein encodes like its RNA alone
    no_prot = {**tensors, "protein_expression": torch.zeros(16, 6)}
    torch.testing.assert_close(_qz(module, no_prot).loc, rna_only.loc)
    # control: with every modality visible, the protein counts matter
    assert not torch.allclose(_qz(module, tensors).loc, _qz(module, changed).loc)
    assert not torch.allclose(_qz(module, tensors).loc, rna_only.loc)


def test_modality_dropout_training_only_and_never_hides_everything():
    n = 400
    module = _module(modality_dropout=0.5)
    tensors = _tensors(n=n, n_missing_protein=100)
    ones = torch.ones(n)
    module.train()  # BatchNorm uses batch statistics: the same for every call on this batch
    with torch.no_grad():
        candidates = {
            "full": _qz(module, tensors, encoder_mask={"rna": ones, "protein": ones}).loc,
            "rna": _qz(module, tensors, encoder_mask={"rna": ones, "protein": 0 * ones}).loc,
            "protein": _qz(module, tensors, encoder_mask={"rna": 0 * ones, "protein": ones}).loc,
        }
        drawn = _qz(module, tensors).loc
    match = {
        k: torch.isclose(drawn, v, atol=1e-6, rtol=1e-5).all(-1) for k, v in candidates.items()
    }
    assert torch.all(match["full"] | match["rna"] | match["protein"])
    assert not torch.any(torch.isclose(drawn, torch.zeros_like(drawn)).all(-1))  # never the prior
    # cells without protein have nothing to drop
    assert torch.all(match["full"][:100])
    # about half of the cells with both modalities see only one, each hidden about equally
    hidden = ~match["full"][100:]
    assert 0.35 < hidden.float().mean().item() < 0.65
    assert match["rna"][100:].sum() > 30 and match["protein"][100:].sum() > 30

    # three modalities: at most one is hidden, never all
    visible = {
        "rna": torch.ones(n, dtype=torch.bool),
        "protein": torch.ones(n, dtype=torch.bool),
        "accessibility": torch.rand(n) < 0.5,
    }
    module3 = _module(modality_dropout=0.9, peaks=True)
    out = module3._drop_modalities(visible)
    stacked_in = torch.stack(list(visible.values()), 1)
    stacked_out = torch.stack([out[k] for k in visible], 1)
    assert torch.all(stacked_out <= stacked_in)
    assert torch.all(stacked_out.sum(1) >= 1)
    assert torch.all(stacked_in.sum(1) - stacked_out.sum(1) <= 1)
    assert (stacked_in.sum(1) - stacked_out.sum(1)).float().mean() > 0.8

    # in eval mode (BatchNorm running statistics) there is no modality dropout
    module.eval()
    with torch.no_grad():
        full = _qz(module, tensors, encoder_mask={"rna": ones, "protein": ones}).loc
        torch.testing.assert_close(_qz(module, tensors).loc, full)
        torch.testing.assert_close(_qz(module, tensors).loc, full)


def test_bernoulli_and_mixture_likelihoods():
    module = _module("nb_mixture", peaks=True)
    module.eval()
    tensors = _tensors(n=32, peaks=True, n_missing_protein=3)
    torch.manual_seed(1)
    _, gen, loss = module(tensors)
    px = gen["px"]
    assert isinstance(px["accessibility"], Bernoulli)
    assert isinstance(px["protein"], NegativeBinomialMixture)
    assert torch.all(torch.isfinite(px["protein"].mean)) and torch.all(px["protein"].mean > 0)
    assert torch.isfinite(loss.loss)
    acc = loss.reconstruction_loss["reconstruction_loss_accessibility"]
    # accessibility counts above one are read as one, in the encoder and in the loss
    counts = {**tensors, "accessibility": tensors["accessibility"] * 4}
    torch.testing.assert_close(_qz(module, counts).loc, _qz(module, tensors).loc)
    torch.manual_seed(1)
    _, _, loss4 = module(counts)
    torch.testing.assert_close(loss4.reconstruction_loss["reconstruction_loss_accessibility"], acc)
    expected = -px["accessibility"].log_prob(tensors["accessibility"]).sum(-1)
    torch.testing.assert_close(acc, expected)


def test_translation_flow_sample_shape_and_scaling():
    torch.manual_seed(0)
    flow = TranslationFlow(n_latent=4, n_hidden=16, n_layers=2)
    z = torch.randn(50, 4) * 3 + 5
    flow.set_scaling(z, torch.randn(50, 4))
    torch.testing.assert_close(flow.latent_mean, z.mean(0))
    noise = torch.randn(7, 4)
    a = flow.sample(torch.randn(7, 4), n_steps=2, noise=noise)
    assert a.shape == (7, 4) and torch.all(torch.isfinite(a))
    b = flow.sample(torch.zeros(7, 4), n_steps=2, noise=noise, cfg_scale=2.0)
    assert b.shape == (7, 4)


# --------------------------------------------------------------------------- training
def test_training_runs_vae_flow_translation(mm):
    model = mm["model"]
    assert model.trained_stages_ == ["vae", "flow", "translation"]
    assert {"vae", "flow", "translation"} <= set(model.stage_history_)
    history = model.history
    assert "translation_loss_train" in history
    assert np.isfinite(history["elbo_train"].to_numpy(float)).all()
    assert "Trained stages: vae, flow, translation" in repr(model)


def test_stage_checks():
    md, _, _ = _mdata(n_cells=30)
    LDM.setup_mudata(md, modalities=RNA2PROT)
    model = LDM(md, **FAST_MODEL)
    with pytest.raises(ValueError, match="joint"):
        model.train(stage="joint", **QUIET)
    with pytest.raises(RuntimeError, match="VAE"):
        model.translate(strategy="encoder", **FAST)
    with pytest.raises(RuntimeError, match="TRANSLATION"):
        model.translate(**FAST)
    with pytest.raises(RuntimeError, match="VAE"):
        model.train(stage="translation", **QUIET)
    assert model.trained_stages_ == []

    adata = lc.datasets.synthetic_counts(n_cells=30, n_genes=10, seed=0)
    LDM.setup_anndata(adata, layer="counts")
    plain = LDM(adata, **FAST_MODEL)
    with pytest.raises(ValueError, match="translation"):
        plain.train(stage="translation", **QUIET)
    with pytest.raises(RuntimeError, match="setup_mudata"):
        plain.translate(**FAST)


def test_vae_only_model_translates_with_encoder_not_flow():
    md, _, _ = _mdata(n_cells=80, seed=4)
    LDM.setup_mudata(md, modalities=RNA2PROT, batch_key="batch")
    scvi.settings.seed = 0
    model = LDM(md, **FAST_MODEL)
    model.train(stage="vae", max_epochs=2, seed=0, **QUIET)
    with pytest.raises(RuntimeError, match="TRANSLATION"):
        model.translate(**FAST)
    out = model.translate(strategy="encoder", indices=[0, 1, 2], seed=0, **FAST)
    assert out.shape == (3, N_PROT)
    assert out.uns["latentcell"]["strategy"] == "encoder"


def test_multimodal_vae_stops_on_the_other_modalities_likelihood():
    md, _, _ = _mdata(n_cells=80, seed=4)
    LDM.setup_mudata(md, modalities=RNA2PROT)
    scvi.settings.seed = 0
    model = LDM(md, **FAST_MODEL)
    # early stopping is on by default; Lightning raises if its monitor is not logged
    model.train(stage="vae", max_epochs=3, seed=0, **QUIET)
    history = model.history
    assert "nll_secondary_validation" in history
    np.testing.assert_allclose(
        history["nll_secondary_validation"].to_numpy(),
        history["nll_protein_validation"].to_numpy(),
        rtol=1e-6,
    )


def test_default_vae_epochs_give_small_multimodal_data_enough_steps():
    from latentcell.model._model import (
        MULTIMODAL_MAX_EPOCHS,
        MULTIMODAL_MIN_STEPS,
        default_vae_epochs,
    )

    # RNA only: scvi-tools' heuristic, whatever the size
    assert default_vae_epochs(140, 126, 128, multimodal=False) == 400
    assert default_vae_epochs(100_000, 90_000, 128, multimodal=False) == 80
    # MuData: at least MULTIMODAL_MIN_STEPS steps, at most MULTIMODAL_MAX_EPOCHS epochs
    assert default_vae_epochs(140, 126, 128, multimodal=True) == MULTIMODAL_MAX_EPOCHS
    n_epochs = default_vae_epochs(500, 450, 128, multimodal=True)  # 4 steps per epoch
    assert n_epochs == MULTIMODAL_MIN_STEPS // 4 > 400
    assert default_vae_epochs(3000, 2700, 128, multimodal=True) == 400  # 22 steps per epoch
    assert default_vae_epochs(100_000, 90_000, 128, multimodal=True) == 80  # plenty of steps


# --------------------------------------------------------------------------- sampling
def test_sample_returns_mudata_and_round_trips(mm, tmp_path):
    model = mm["model"]
    types = ["A"] * 5 + ["C"] * 4
    out = model.sample(conditions={"cell_type": types}, seed=0, **FAST)
    assert isinstance(out, mudata.MuData)
    assert set(out.mod) == {"rna", "prot"}
    assert out.mod["rna"].shape == (9, N_GENES) and out.mod["prot"].shape == (9, N_PROT)
    assert list(out.mod["rna"].var_names) == list(mm["train"].mod["rna"].var_names)
    assert list(out.mod["prot"].var_names) == list(mm["train"].mod["prot"].var_names)
    assert list(out.obs["cell_type"].astype(str)) == types
    assert set(out.obs["batch"].astype(str)) <= {"b0", "b1"}
    assert out.obsm["X_latentcell"].shape == (9, FAST_MODEL["n_latent"])
    for a in out.mod.values():
        assert _is_counts(a.X)
        assert a.layers["latentcell_mean"].shape == a.shape
        assert np.all(np.isfinite(a.layers["latentcell_mean"]))
        assert list(a.obs_names) == list(out.obs_names)
    np.testing.assert_array_equal(out.mod["rna"].obsm["X_latentcell"], out.obsm["X_latentcell"])
    again = model.sample(conditions={"cell_type": types}, seed=0, **FAST)
    for k in out.mod:
        _same(out.mod[k], again.mod[k])

    path = tmp_path / "gen.h5mu"
    out.write_h5mu(path)
    back = mudata.read_h5mu(path)
    assert set(back.mod) == set(out.mod)
    for k in out.mod:
        np.testing.assert_array_equal(_dense(back.mod[k].X), _dense(out.mod[k].X))
        np.testing.assert_allclose(
            back.mod[k].layers["latentcell_mean"], out.mod[k].layers["latentcell_mean"]
        )
    assert list(back.obs["cell_type"].astype(str)) == types
    np.testing.assert_array_equal(back.obsm["X_latentcell"], out.obsm["X_latentcell"])


def test_conditioned_samples_carry_the_cell_type_protein_profile(mm):
    """Protein of cells generated per cell type follows that type's true profile (can fail)."""
    types = np.repeat(CELL_TYPES, 30)
    out = mm["model"].sample(conditions={"cell_type": types}, n_steps=5, seed=0, progress_bar=False)
    assert list(out.obs["cell_type"].astype(str)) == list(types)
    per_type = np.log1p(out.mod["prot"].layers["latentcell_mean"]).reshape(3, 30, N_PROT).mean(1)
    truth = np.log1p(PROT_MU)
    # differences between cell types, per protein
    r = np.corrcoef((per_type - per_type.mean(0)).ravel(), (truth - truth.mean(0)).ravel())[0, 1]
    assert r > 0.6, r


# --------------------------------------------------------------------------- translation
def test_translate_output(mm):
    model, train = mm["model"], mm["train"]
    out = model.translate(indices=np.arange(10), seed=0, **FAST)
    assert isinstance(out, AnnData)
    assert out.shape == (10, N_PROT)
    assert list(out.var_names) == list(train.mod["prot"].var_names)
    assert list(out.obs_names) == list(train.obs_names[:10])
    assert list(out.obs["source_cell"]) == list(train.obs_names[:10])
    assert list(out.obs["cell_type"]) == list(train.obs["cell_type"][:10])
    assert not [c for c in out.obs.columns if c.startswith("_scvi")]
    assert _is_counts(out.X)
    mean = out.layers["latentcell_mean"]
    assert mean.shape == (10, N_PROT) and np.all(np.isfinite(mean)) and np.all(mean > 0)
    assert out.obsm["X_latentcell"].shape == (10, FAST_MODEL["n_latent"])
    assert out.uns["latentcell"]["task"] == "translate"
    assert out.uns["latentcell"]["target"] == "protein"

    many = model.translate(indices=[3, 7], n_samples=3, seed=0, **FAST)
    names = train.obs_names
    assert list(many.obs_names) == [f"{names[i]}-{k}" for i in (3, 7) for k in range(3)]
    assert list(many.obs["source_cell"]) == [names[i] for i in (3, 7) for _ in range(3)]
    assert many.obs_names.is_unique


def test_translate_seed_and_input_unchanged(mm):
    model, test = mm["model"], mm["test"]
    snap = _snapshot(test)
    a = model.translate(test, seed=1, **FAST)
    b = model.translate(test, seed=1, **FAST)
    c = model.translate(test, seed=2, **FAST)
    _assert_unchanged(test, snap)
    _same(a, b)
    assert not np.allclose(a.obsm["X_latentcell"], c.obsm["X_latentcell"])
    assert (a.X != c.X).nnz > 0
    assert list(a.obs_names) == list(test.obs_names)
    assert list(a.obs["cell_type"]) == list(test.obs["cell_type"])

    # an AnnData of the RNA alone (with the batch column) translates the same
    rna = test.mod["rna"].copy()
    rna.obs["batch"] = test.obs["batch"].to_numpy()
    rna_snap = (list(rna.obs.columns), set(rna.uns), rna.X.copy())
    d = model.translate(rna, seed=1, **FAST)
    _same(a, d)
    assert list(rna.obs.columns) == rna_snap[0] and set(rna.uns) == rna_snap[1]
    assert (rna.X != rna_snap[2]).nnz == 0

    no_batch = test.mod["rna"].copy()
    with pytest.raises(ValueError, match="batch"):
        model.translate(no_batch, **FAST)


def test_translate_key_added(mm):
    model, test = mm["model"], mm["test"]
    snap = _snapshot(test)
    out = model.translate(test, key_added="prot_pred", seed=1, **FAST)
    _assert_unchanged(test, snap)
    assert isinstance(out, mudata.MuData)
    assert set(out.mod) == {"rna", "prot", "prot_pred"}
    assert out.mod["prot_pred"].shape == (test.n_obs, N_PROT)
    _same(out.mod["prot_pred"], model.translate(test, seed=1, **FAST))
    np.testing.assert_array_equal(_dense(out.mod["prot"].X), _dense(test.mod["prot"].X))
    assert list(out.obs["cell_type"]) == list(test.obs["cell_type"])
    with pytest.raises(ValueError, match="n_samples=1"):
        model.translate(test, key_added="x", n_samples=2, **FAST)
    with pytest.raises(ValueError, match="already a modality"):
        model.translate(test, key_added="prot", **FAST)
    with pytest.raises(ValueError, match="every cell"):
        model.translate(test, key_added="x", indices=[0, 1], **FAST)


def test_translate_argument_errors(mm):
    model = mm["model"]
    with pytest.raises(ValueError, match="Unknown modality 'antibody'"):
        model.translate(source="antibody", **FAST)
    with pytest.raises(ValueError, match="Unknown modality 'accessibility'"):
        model.translate(target="accessibility", **FAST)
    with pytest.raises(ValueError, match="different"):
        model.translate(source="rna", target="rna", **FAST)
    with pytest.raises(ValueError, match="strategy"):
        model.translate(strategy="nearest", **FAST)
    with pytest.raises(ValueError, match="n_samples"):
        model.translate(n_samples=0, **FAST)
    with pytest.raises(ValueError, match="strategy='encoder'"):
        model.translate(source="protein", target="rna", strategy="flow", **FAST)
    with pytest.raises(TypeError):
        model.translate(np.zeros((3, N_GENES)), **FAST)
    bad = mm["test"].copy()
    bad.mod["rna"].X = bad.mod["rna"].X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        model.translate(bad, **FAST)
    # a MuData model refuses a plain AnnData where a MuData is needed
    with pytest.raises(TypeError, match="MuData"):
        model.get_latent_representation(mm["test"].mod["rna"].copy(), key_added=None)


def test_translate_from_protein_with_encoder(mm):
    model, test = mm["model"], mm["test"]
    out = model.translate(test, source="protein", target="rna", strategy="encoder", seed=0, **FAST)
    assert out.shape == (test.n_obs, N_GENES)
    assert list(out.var_names) == list(test.mod["rna"].var_names)
    assert np.all(np.isfinite(out.layers["latentcell_mean"]))
    assert _is_counts(out.X)
    # the protein carries the cell type: decoded RNA follows the cell types' gene means
    pred = np.log1p(out.layers["latentcell_mean"])
    truth = np.log1p(GENE_MU[mm["ct_test"]])
    r = _centred_r(pred, truth)
    shuffled = _centred_r(pred, truth[np.random.default_rng(0).permutation(test.n_obs)])
    assert r > 0.6, r
    assert abs(shuffled) < 0.3, shuffled


def _centred_r(pred, truth):
    """Correlation of cell-to-cell differences (each feature centred), pooled over features."""
    return float(np.corrcoef((pred - pred.mean(0)).ravel(), (truth - truth.mean(0)).ravel())[0, 1])


def _per_protein_r(pred, truth):
    return float(np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(N_PROT)]))


@pytest.mark.parametrize("strategy", ["flow", "encoder"])
def test_translation_learns_protein_from_rna(mm, strategy):
    """Held-out cells: translated protein tracks the cell-type protein means (can fail)."""
    model, test = mm["model"], mm["test"]
    n_samples = 4 if strategy == "flow" else 1
    out = model.translate(
        test, n_samples=n_samples, strategy=strategy, n_steps=5, seed=0, progress_bar=False
    )
    mean = out.layers["latentcell_mean"].reshape(test.n_obs, n_samples, N_PROT).mean(1)
    pred, truth = np.log1p(mean), np.log1p(mm["prot_test"])
    r = _per_protein_r(pred, truth)
    shuffled = _per_protein_r(pred, truth[np.random.default_rng(0).permutation(test.n_obs)])
    assert r > 0.6, r
    assert abs(shuffled) < 0.3, shuffled
    # with n_samples draws per cell the flow shows uncertainty: draws of a cell differ
    if strategy == "flow":
        lat = out.obsm["X_latentcell"].reshape(test.n_obs, n_samples, -1)
        assert np.all(lat.std(1).mean(-1) > 0)


# --------------------------------------------------------------------------- save / load
def test_save_load_mudata_model(mm, tmp_path):
    model, test = mm["model"], mm["test"]
    path = tmp_path / "model"
    model.save(path, save_anndata=True)
    assert (path / "mdata.h5mu").exists()
    loaded = LDM.load(path)
    assert loaded.is_multimodal
    assert isinstance(loaded.adata, mudata.MuData)
    assert loaded.trained_stages_ == model.trained_stages_
    _same(loaded.translate(test, seed=3, **FAST), model.translate(test, seed=3, **FAST))
    _same(
        loaded.translate(indices=[0, 5], seed=3, **FAST),
        model.translate(indices=[0, 5], seed=3, **FAST),
    )
    a = loaded.sample(4, seed=3, **FAST)
    b = model.sample(4, seed=3, **FAST)
    for k in a.mod:
        _same(a.mod[k], b.mod[k])
    with pytest.raises(TypeError, match="MuData"):
        LDM.load(path, adata=mm["train"].mod["rna"].copy())

    # without the data: sampling and translating given cells still work
    bare = tmp_path / "bare"
    model.save(bare)
    nodata = LDM.load(bare)
    assert nodata.adata is None
    _same(nodata.translate(test, seed=3, **FAST), model.translate(test, seed=3, **FAST))
    assert list(nodata.sample(2, seed=0, **FAST).mod["prot"].var_names) == list(
        test.mod["prot"].var_names
    )


# --------------------------------------------------------------------------- other likelihoods
def test_accessibility_model_trains_samples_binary(tri):
    assert tri.trained_stages_ == ["vae", "flow", "translation"]
    assert tri.module.vae.likelihoods == {
        "rna": "nb",
        "protein": "nb",
        "accessibility": "bernoulli",
    }
    out = tri.sample(20, seed=0, **FAST)
    assert set(out.mod) == {"rna", "prot", "atac"}
    atac = out.mod["atac"]
    assert atac.shape == (20, N_PEAKS)
    assert set(np.unique(_dense(atac.X))) <= {0.0, 1.0}
    assert np.unique(_dense(atac.X)).size == 2
    p = atac.layers["latentcell_mean"]
    assert np.all((p >= 0) & (p <= 1))
    assert list(atac.var_names) == [f"r{j}" for j in range(N_PEAKS)]
    pred = tri.translate(target="accessibility", indices=np.arange(10), seed=0, **FAST)
    assert pred.shape == (10, N_PEAKS)
    assert set(np.unique(_dense(pred.X))) <= {0.0, 1.0}
    assert np.all((pred.layers["latentcell_mean"] >= 0) & (pred.layers["latentcell_mean"] <= 1))
    enc = tri.translate(
        source="accessibility", target="protein", strategy="encoder", indices=[0, 1], **FAST
    )
    assert enc.shape == (2, N_PROT) and np.all(np.isfinite(enc.layers["latentcell_mean"]))


def test_nb_mixture_protein_trains_and_translates():
    md, _, _ = _mdata(n_cells=120, seed=5, n_missing_protein=10)
    LDM.setup_mudata(md, modalities=RNA2PROT, batch_key="batch")
    scvi.settings.seed = 0
    model = LDM(md, protein_likelihood="nb_mixture", **FAST_MODEL)
    model.train(max_epochs=3, flow_max_epochs=3, seed=0, **QUIET)
    assert model.trained_stages_ == ["vae", "flow", "translation"]
    assert np.isfinite(model.history["elbo_train"].to_numpy(float)).all()
    out = model.translate(indices=np.arange(15), n_samples=2, seed=0, **FAST)
    assert out.shape == (30, N_PROT)
    assert np.all(np.isfinite(out.layers["latentcell_mean"]))
    assert np.all(out.layers["latentcell_mean"] > 0)
    assert _is_counts(out.X)
    sampled = model.sample(5, seed=0, **FAST)
    assert np.all(np.isfinite(sampled.mod["prot"].layers["latentcell_mean"]))


def test_unmeasured_cells_stay_out_of_the_expert_batch_norm():
    """Cells without protein do not enter the protein expert's batch-norm statistics."""
    import copy

    complete = _tensors(n=32, seed=3)
    rna_only = _tensors(n=16, seed=4, n_missing_protein=16)
    mixed = {k: torch.cat([complete[k], rna_only[k]]) for k in complete}
    a = _module(modality_dropout=0.0)
    b = copy.deepcopy(a)
    a.train()
    b.train()
    _qz(a, complete)
    _qz(b, mixed)

    def stats(m, name):
        bn = [x for x in m.encoders[name].modules() if isinstance(x, torch.nn.BatchNorm1d)]
        return bn[0].running_mean, bn[0].running_var

    for got, want in zip(stats(b, "protein"), stats(a, "protein"), strict=True):
        torch.testing.assert_close(got, want)
    # control: the RNA expert does see the extra cells
    assert not torch.allclose(stats(b, "rna")[0], stats(a, "rna")[0])
    # and in eval mode a complete cell's posterior does not depend on its batch mates
    a.eval()
    full = _qz(a, mixed).loc[:32]
    alone = _qz(a, complete).loc
    torch.testing.assert_close(full, alone)


def test_elbo_and_reconstruction_error_of_a_mudata_model(mm):
    mm = mm["model"]
    rec = mm.get_reconstruction_error()
    assert set(rec) == {"reconstruction_loss_rna", "reconstruction_loss_protein"}
    assert all(v > 0 for v in rec.values())
    elbo = mm.get_elbo()
    assert -elbo >= sum(rec.values())  # plus a non-negative KL
    assert mm.get_elbo(return_mean=False).shape == (mm.adata.n_obs,)
    with pytest.raises(ValueError, match="RNA-only models; use get_elbo"):
        mm.get_marginal_ll()


def test_layer_norm_encoders_encode_each_cell_on_its_own(tmp_path):
    """``use_layer_norm="encoder"``: no batch statistics in the encoders, so in training mode
    a cell's posterior does not depend on the cells batched with it (RNA-only cells included)."""
    with pytest.raises(ValueError, match="use_layer_norm must be one of"):
        MultiModalVAE([("rna", "X", 5, "nb"), ("protein", "p", 3, "nb")], use_layer_norm="all")
    torch.manual_seed(0)
    specs = [("rna", "X", 20, "nb"), ("protein", "protein_expression", 6, "nb")]
    module = MultiModalVAE(
        specs,
        n_batch=2,
        n_latent=4,
        n_hidden=16,
        modality_dropout=0.0,
        dropout_rate=0.0,
        use_batch_norm="decoder",
        use_layer_norm="encoder",
    )

    def kinds(part):
        return {type(m).__name__ for m in part.modules()} & {"BatchNorm1d", "LayerNorm"}

    for name in module.names:
        assert kinds(module.encoders[name]) == {"LayerNorm"}
        assert kinds(module.decoders[name]) == {"BatchNorm1d"}
    complete = _tensors(n=32, seed=3)
    rna_only = _tensors(n=16, seed=4, n_missing_protein=16)
    mixed = {k: torch.cat([complete[k], rna_only[k]]) for k in complete}
    module.train()
    torch.testing.assert_close(_qz(module, mixed).loc[:32], _qz(module, complete).loc)
    # the default (batch norm everywhere) does depend on the batch in training mode
    default = _module(modality_dropout=0.0)
    default.train()
    assert not torch.allclose(_qz(default, mixed).loc[:32], _qz(default, complete).loc)

    # through the model: accepted, trained, saved and loaded with the same layers
    md, _, _ = _mdata(n_cells=60, seed=2, n_missing_protein=10)
    LDM.setup_mudata(md, modalities=RNA2PROT, batch_key="batch")
    with pytest.raises(ValueError, match="only use_batch_norm and use_layer_norm"):
        LDM(md, use_layer_norm="encoder", encode_covariates=True, **FAST_MODEL)
    scvi.settings.seed = 0
    model = LDM(md, use_batch_norm="decoder", use_layer_norm="encoder", **FAST_MODEL)
    assert kinds(model.module.vae.encoders["rna"]) == {"LayerNorm"}
    model.train(max_epochs=2, flow_max_epochs=2, seed=0, **QUIET)
    model.save(tmp_path / "m")
    loaded = LDM.load(tmp_path / "m", adata=md)
    assert kinds(loaded.module.vae.encoders["protein"]) == {"LayerNorm"}
    _same(
        loaded.translate(indices=[0, 1, 2], seed=1, **FAST),
        model.translate(indices=[0, 1, 2], seed=1, **FAST),
    )
