"""Gene programs: registration, activity score, cross-attention, program-conditioned sampling."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import latentcell as lc
from latentcell.model._programs import (
    check_programs,
    expected_activity,
    program_activity,
    program_gene_stats,
)
from latentcell.nn import ConditionEmbedding, CrossAttention, DiTDenoiser, MLPDenoiser

from .conftest import FAST_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

PROGRAM = [f"gene_{i}" for i in range(6)]
OTHER = [f"gene_{i}" for i in range(20, 26)]


def _program_data(n_cells=600, seed=0):
    """Counts where genes 0-5 follow a per-cell program activity, independent of cell type."""
    adata = lc.datasets.synthetic_counts(n_cells=n_cells, n_genes=40, seed=seed)
    rng = np.random.default_rng(seed)
    activity = rng.normal(size=n_cells)
    mean = np.asarray(adata.layers["true_mean"], dtype=np.float64).copy()
    mean[:, :6] *= np.exp(1.5 * activity)[:, None]
    counts = rng.poisson(rng.gamma(5.0, mean / 5.0)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1
    adata.X = sparse.csr_matrix(counts)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["true_activity"] = activity
    return adata


@pytest.fixture(scope="module")
def program_model():
    adata = _program_data()
    lc.LatentDiffusionModel.setup_anndata(
        adata,
        layer="counts",
        labels_key="cell_type",
        batch_key="batch",
        gene_programs={"up": PROGRAM, "other": OTHER},
    )
    model = lc.LatentDiffusionModel(adata, **FAST_MODEL)
    model.train(
        max_epochs=100, flow_max_epochs=300, accelerator="cpu", seed=0, enable_progress_bar=False
    )
    return model


# ---------------------------------------------------------------- registration
def test_programs_resolve_from_dict_and_varm():
    adata = lc.datasets.synthetic_counts(n_cells=50, n_genes=10, seed=0)
    with pytest.warns(UserWarning, match=r"left out of the programs \(a: \['nope'\]\)"):
        out = check_programs(adata, {"a": ["gene_1", "nope", "gene_1"], "b": ["gene_2"]})
    assert out == {"a": ["gene_1"], "b": ["gene_2"]}
    matrix = pd.DataFrame(0, index=adata.var_names, columns=["x", "y"])
    matrix.loc[["gene_0", "gene_3"], "x"] = 1
    matrix.loc["gene_9", "y"] = 1
    adata.varm["sets"] = matrix
    assert check_programs(adata, "sets") == {"x": ["gene_0", "gene_3"], "y": ["gene_9"]}
    adata.varm["raw"] = matrix.to_numpy()
    assert list(check_programs(adata, "raw")) == ["program_0", "program_1"]


@pytest.mark.parametrize(
    ("programs", "match"),
    [
        ({"a": ["nope"]}, "None of the genes of program 'a'"),
        ({}, "non-empty dict"),
        ({"a": "gene_1"}, "must be a list of gene names"),
        ({"": ["gene_1"]}, "non-empty strings"),
        ("missing", "not a key of adata.varm"),
        ("counts_like", "must be binary"),
    ],
)
def test_bad_programs_are_refused_before_anything_is_written(programs, match):
    adata = lc.datasets.synthetic_counts(n_cells=50, n_genes=10, seed=0)
    adata.varm["counts_like"] = np.full((10, 2), 3.0)
    obs = adata.obs.copy()
    with pytest.raises(ValueError, match=match):
        lc.LatentDiffusionModel.setup_anndata(adata, layer="counts", gene_programs=programs)
    assert adata.obs.equals(obs) and "_scvi_uuid" not in adata.uns


def test_programs_and_space_are_not_combined_yet():
    adata = lc.datasets.synthetic_counts(n_cells=50, n_genes=10, seed=0)
    adata.obsm["spatial"] = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(ValueError, match="cannot be combined yet"):
        lc.LatentDiffusionModel.setup_anndata(
            adata, layer="counts", spatial_key="spatial", gene_programs={"a": ["gene_1"]}
        )


# ---------------------------------------------------------------- the score
def test_activity_follows_the_documented_convention(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(30, 8)).astype(np.float32) + 1
    var = [f"g{i}" for i in range(8)]
    programs = {"p": ["g1", "g4"], "q": ["g4", "g6", "g7"]}
    stats = program_gene_stats(x, 30, programs, var)
    ln = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    z = (ln - ln.mean(0)) / ln.std(0)
    expected = np.stack([z[:, [1, 4]].mean(1), z[:, [4, 6, 7]].mean(1)], axis=1)
    np.testing.assert_allclose(program_activity(x, 30, programs, stats, var), expected, atol=1e-5)
    # a backed sparse matrix gives the same numbers, block by block
    path = tmp_path / "x.h5ad"
    ad.AnnData(sparse.csr_matrix(x), var=pd.DataFrame(index=var)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    stats_b = program_gene_stats(backed.X, 30, programs, var)
    np.testing.assert_allclose(stats_b["mean"], stats["mean"], rtol=1e-6)
    np.testing.assert_allclose(
        program_activity(backed.X, 30, programs, stats_b, var), expected, atol=1e-5
    )


def test_training_scores_recover_the_planted_activity(program_model):
    scores = program_model.get_program_scores()
    truth = program_model.adata.obs["true_activity"]
    assert list(scores.columns) == ["up", "other"]
    up = np.corrcoef(scores["up"], truth)[0, 1]
    other = np.corrcoef(scores["other"], truth)[0, 1]
    # the other program only feels the planted one through the CP10k normalisation: when
    # the program's genes take a larger share of the library, every other gene's share falls
    assert up > 0.8 and -0.7 < other < 0 and abs(other) < 0.7 * up  # measured 0.93, -0.49
    levels = program_model.program_stats_["levels"]["up"]
    assert levels["low"] < 0 < levels["high"]


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_expected_activity_is_the_mean_score_under_the_likelihood(likelihood):
    from scipy import stats as st
    from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

    mu = torch.tensor([[0.3, 2.0, 6.0, 40.0], [1.0, 0.05, 12.0, 3.0]])
    theta = torch.tensor([[2.0, 0.5, 5.0, 1.0]]).expand_as(mu)
    zi_logits = torch.full_like(mu, -1.0)
    library = torch.tensor([1500.0, 4000.0])
    stats = {"mean": [0.5, 1.0, 2.0], "sd": [1.0, 0.5, 2.0]}
    columns = torch.tensor([0, 2, 3])  # gene 1 is not in a program
    members = [torch.tensor([0, 1]), torch.tensor([2])]
    if likelihood == "nb":
        px = NegativeBinomial(mu=mu, theta=theta)
    elif likelihood == "zinb":
        px = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi_logits)
    else:
        px = torch.distributions.Poisson(mu)
    # exact: sum the score's per-gene expectation over the count distribution
    k = np.arange(2000)
    gene_means = np.zeros((2, 3))
    for i in range(2):
        for j, col in enumerate(columns.tolist()):
            m, t = float(mu[i, col]), float(theta[i, col])
            pmf = (
                st.poisson.pmf(k, m)
                if likelihood == "poisson"
                else st.nbinom.pmf(k, t, t / (t + m))
            )
            if likelihood == "zinb":
                pi = 1 / (1 + np.exp(1.0))
                pmf = (1 - pi) * pmf + pi * (k == 0)
            value = (np.log1p(k / float(library[i]) * 1e4) - stats["mean"][j]) / stats["sd"][j]
            gene_means[i, j] = (pmf * value).sum()
    exact = np.stack([gene_means[:, :2].mean(1), gene_means[:, 2]], axis=1)
    got = expected_activity(px, columns, library, stats, members).numpy()
    np.testing.assert_allclose(got, exact, atol=1e-4)


def test_expected_scores_are_the_noise_free_activity_the_flow_reads(program_model):
    observed = program_model.get_program_scores()
    expected = program_model.get_program_scores(expected=True)
    assert list(expected.columns) == ["up", "other"]
    assert expected.index.equals(observed.index)
    # repeatable (no random draws), and the flow's training condition
    pd.testing.assert_frame_equal(program_model.get_program_scores(expected=True), expected)
    codes = program_model._registered_codes(program_model.adata)["programs"]
    np.testing.assert_allclose(codes, expected.to_numpy(), rtol=1e-6)
    # a function of the latent: it tracks the planted activity, and varies less than the
    # observed score, which adds the count noise (measured sd 0.53 vs 0.80)
    truth = program_model.adata.obs["true_activity"]
    assert np.corrcoef(expected["up"], truth)[0, 1] > 0.8
    assert expected["up"].std() < 0.85 * observed["up"].std()
    # query cells are scored the same way as the training cells
    query = program_model.adata[:40].copy()
    pd.testing.assert_frame_equal(
        program_model.get_program_scores(query, expected=True), expected.iloc[:40], atol=1e-5
    )
    with pytest.raises(ValueError, match="layer= applies to the observed score"):
        program_model.get_program_scores(expected=True, layer="counts")
    # a subset of cells is scored alone, with the same values (no pass over the others)
    subset = np.array([7, 3, 150])
    part = program_model._registered_codes(program_model.adata, indices=subset)
    np.testing.assert_allclose(part["programs"], codes[subset], rtol=1e-5, atol=1e-6)
    assert part["labels"].shape == (3,)


def test_models_saved_with_observed_conditioning_keep_it(program_model):
    stats = program_model.program_stats_
    legacy = {k: v for k, v in stats.items() if k != "conditioning"}
    program_model.program_stats_ = legacy
    try:
        codes = program_model._registered_codes(program_model.adata)["programs"]
        observed = program_model.get_program_scores().to_numpy()
        np.testing.assert_allclose(codes, observed, rtol=1e-6)
        part = program_model._registered_codes(program_model.adata, indices=[5, 2])["programs"]
        np.testing.assert_allclose(part, observed[[5, 2]], rtol=1e-6)
    finally:
        program_model.program_stats_ = stats


# ---------------------------------------------------------------- networks
def test_program_tokens_mask_unspecified_and_dropped_programs():
    emb = ConditionEmbedding([3], 1, 16, n_programs=2)
    assert emb.n_attributes == 4
    cont = torch.tensor([[0.5, 1.0, float("nan")], [0.5, -1.0, 2.0]])
    drop = torch.zeros(2, 4, dtype=torch.bool)
    drop[1, 3] = True
    tokens, mask = emb.program_tokens(cont, drop)
    assert tokens.shape == (2, 3, 16)
    assert mask.tolist() == [[True, True, False], [True, True, False]]
    # the conditioning vector ignores the program columns
    cat = torch.zeros(2, 1, dtype=torch.long)
    torch.testing.assert_close(emb(cat, cont)[0], emb(cat, cont.flip(0) * 0 + cont[0])[0])
    assert ConditionEmbedding([3], 1, 16).program_tokens(cont[:, :1]) is None


def test_cross_attention_ignores_masked_tokens():
    attn = CrossAttention(16, n_heads=4)
    x, tokens = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    out = attn(x, tokens, mask)
    changed = tokens.clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(attn(x, changed, mask), out)


@pytest.mark.parametrize("denoiser", [DiTDenoiser, MLPDenoiser])
def test_denoisers_read_the_context_once_their_gates_open(denoiser):
    net = denoiser(8, n_hidden=16, n_layers=2, cross_attention=True)
    x, t, c = torch.randn(4, 8), torch.rand(4), torch.randn(4, 16)
    tokens, mask = torch.randn(4, 3, 16), torch.ones(4, 3, dtype=torch.bool)
    # adaLN-Zero: every gate starts closed, so the context has no effect at initialisation
    torch.testing.assert_close(net(x, t, c, (tokens, mask)), net(x, t, c, None))
    for module in net.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    assert not torch.allclose(net(x, t, c, (tokens, mask)), net(x, t, c, (tokens * 2, mask)))


# ---------------------------------------------------------------- the model
def test_sampling_moves_the_requested_program_and_not_the_other(program_model):
    kw = dict(seed=0, progress_bar=False)
    cells = {"cell_type": "type_0"}
    # the 90th / 10th percentiles over all training cells (about 0.96 / -1.07), as numbers:
    # type_0's own percentiles (1.03 / -0.55) are a narrower range
    levels = program_model.program_stats_["levels"]["up"]
    scores = {}
    for level in ("high", "low", None):
        conditions = dict(cells, programs={"up": levels[level]}) if level else cells
        out = program_model.sample(300, conditions=conditions, **kw)
        scores[level] = program_model.get_program_scores(out).mean()
        if level:
            assert out.obs["up_program"].iloc[0] == pytest.approx(levels[level])
            assert "other_program" not in out.obs
            assert "programs" in out.uns["latentcell"]["requested"]
        assert (out.obs["cell_type"] == "type_0").all()
    # measured (seed 0): up about 0.5-0.7 (high), 0.0-0.2 (unspecified), -0.4 to -0.6 (low)
    assert scores["high"]["up"] > scores[None]["up"] + 0.3
    assert scores["low"]["up"] < scores[None]["up"] - 0.3
    # The other program is coupled to this one through the CP10k normalisation (when the
    # program's genes take a larger share of the library, every other gene's share falls):
    # in real cells its score falls by `slope` per unit of this one. Off-target means a
    # shift beyond that coupling.
    real = program_model.get_program_scores()
    slope = np.polyfit(real["up"], real["other"], 1)[0]
    shift = scores["high"] - scores["low"]
    assert abs(shift["other"] - slope * shift["up"]) < 0.5 * shift["up"], (slope, shift)


def test_high_and_low_are_percentiles_within_the_requested_label(program_model):
    stats = program_model.program_stats_
    # of the expected activity, which the flow reads
    real = program_model.get_program_scores(expected=True)
    labels = program_model.adata.obs["cell_type"].astype(str).to_numpy()
    for label in np.unique(labels):
        own = real["up"].to_numpy()[labels == label]
        assert stats["levels_by_label"][label]["up"]["high"] == pytest.approx(
            np.percentile(own, 90), rel=1e-5
        )
    assert stats["levels"]["up"]["low"] == pytest.approx(np.percentile(real["up"], 10), rel=1e-5)
    # per-cell labels pick their own percentiles; no label falls back to all cells'
    out = program_model.sample(
        conditions={"cell_type": ["type_0", "type_1"], "programs": {"up": "high"}},
        seed=0,
        progress_bar=False,
    )
    assert out.obs["up_program"].tolist() == pytest.approx(
        [stats["levels_by_label"][t]["up"]["high"] for t in ("type_0", "type_1")]
    )
    assert stats["levels_by_label"]["type_0"] != stats["levels_by_label"]["type_1"]
    # a model saved before per-label levels existed (or a label too rare) uses the global ones
    from latentcell.model._programs import requested_levels

    assert requested_levels(
        {"up": "low"}, 2, ["up"], stats["levels"], ["type_0", "rare"], {}
    ).ravel().tolist() == pytest.approx([stats["levels"]["up"]["low"]] * 2)


def test_numeric_levels_and_per_cell_levels(program_model):
    out = program_model.sample(
        4, conditions={"programs": {"up": [-1.0, 0.0, 1.0, "high"]}}, seed=0, progress_bar=False
    )
    high = program_model.program_stats_["levels"]["up"]["high"]
    assert out.obs["up_program"].tolist() == pytest.approx([-1.0, 0.0, 1.0, high])


@pytest.mark.parametrize(
    ("programs", "match"),
    [
        ({"down": "high"}, r"Unknown program\(s\) \['down'\]; the registered programs"),
        ({"up": "max"}, "level 'max' of 'up' is not understood"),
        ({"up": [1.0, 2.0]}, "2 values for 5 cells"),
        ({"up": float("nan")}, "non-finite"),
        (["up"], "must be a dict"),
    ],
)
def test_bad_program_requests_name_the_problem(program_model, programs, match):
    with pytest.raises(ValueError, match=match):
        program_model.sample(5, conditions={"programs": programs}, progress_bar=False)


def test_programs_need_a_program_model(trained):
    with pytest.raises(ValueError, match="gene_programs"):
        trained.sample(5, conditions={"programs": {"up": "high"}}, progress_bar=False)
    with pytest.raises(ValueError, match="no gene programs"):
        trained.get_program_scores()


def test_save_load_keeps_the_program_statistics(program_model, tmp_path):
    program_model.save(tmp_path / "m")
    loaded = lc.LatentDiffusionModel.load(tmp_path / "m")
    assert loaded.program_stats_ == program_model.program_stats_
    real = program_model.adata
    pd.testing.assert_frame_equal(
        loaded.get_program_scores(real, layer="counts"), program_model.get_program_scores()
    )
    kw = dict(conditions={"programs": {"up": "high"}}, seed=1, progress_bar=False)
    np.testing.assert_array_equal(
        loaded.sample(20, **kw).X.toarray(), program_model.sample(20, **kw).X.toarray()
    )


def test_batch_correction_keeps_each_cells_program_activity(program_model):
    out = program_model.correct_batch(target_batch="batch_0", seed=0, progress_bar=False)
    before = program_model.get_program_scores()["up"]
    after = program_model.get_program_scores(out)["up"]
    assert np.corrcoef(before, after)[0, 1] > 0.5


def test_streamed_samples_keep_the_requested_program_levels(program_model, tmp_path):
    conditions = {"cell_type": "type_0", "programs": {"up": "high"}}
    kw = dict(conditions=conditions, seed=0, batch_size=4, progress_bar=False)
    on_disk = program_model.sample(6, out_path=tmp_path / "cells.h5ad", **kw)
    in_memory = program_model.sample(6, **kw)
    assert "other_program" not in on_disk.obs
    np.testing.assert_allclose(on_disk.obs["up_program"], in_memory.obs["up_program"])
    np.testing.assert_allclose(on_disk.X[:].toarray(), in_memory.X.toarray())
    on_disk.file.close()
