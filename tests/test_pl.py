import numpy as np
import pytest

import latentcell as lc


def test_training_history_plots_both_stages(trained):
    fig = lc.pl.training_history(trained, return_fig=True)
    labels = [line.get_label() for ax in fig.axes for line in ax.lines]
    assert {"elbo_train", "elbo_validation", "flow_loss_train", "flow_loss_validation"} <= set(
        labels
    )


def test_training_history_untrained(synthetic):
    lc.LatentDiffusionModel.setup_anndata(synthetic, layer="counts")
    model = lc.LatentDiffusionModel(synthetic, n_latent=4)
    with pytest.raises(ValueError, match="no training history"):
        lc.pl.training_history(model)


def test_real_vs_generated_umap_requires_color_in_both(trained):
    gen = trained.sample(n_samples=30, n_steps=2, seed=0, progress_bar=False)
    real = trained.adata.copy()
    real.X = real.layers["counts"]
    with pytest.raises(ValueError, match="missing from the generated cells"):
        lc.pl.real_vs_generated_umap(real, gen, color="cell_type")
    fig = lc.pl.real_vs_generated_umap(real, gen, color="batch", return_fig=True)
    assert fig.latentcell_embedding.n_obs == real.n_obs + 30


def test_mean_expression_scatter_titles_and_highlights():
    adata = lc.datasets.synthetic_perturbation(n_cells=300, n_genes=40, seed=0)
    control = adata[adata.obs["condition"] == "ctrl"].copy()
    true = adata[adata.obs["condition"] == "A"].copy()
    fig = lc.pl.mean_expression_scatter(true, true, control, top_k=10, return_fig=True)
    ax = fig.axes[0]
    assert "R² all genes 1.000" in ax.get_title() and "top 10 DE 1.000" in ax.get_title()
    assert len(ax.collections) == 2  # all genes, then the highlighted top genes
    assert ax.collections[1].get_offsets().shape == (10, 2)
    fig = lc.pl.mean_expression_scatter(control, true, return_fig=True)
    assert len(fig.axes[0].collections) == 1 and "DE" not in fig.axes[0].get_title()


def test_translation_scatter_panels_and_errors():
    import anndata as ad
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    true_counts = rng.poisson(5, (40, 6)).astype(np.float32)
    true = ad.AnnData(true_counts)
    true.var_names = [f"p{i}" for i in range(6)]
    pred = ad.AnnData(true_counts + rng.poisson(1, (40, 6)).astype(np.float32))
    pred.var_names = true.var_names
    pred.layers["latentcell_mean"] = pred.X.copy()
    fig = lc.pl.translation_scatter(pred, true, n_features=4, n_cols=2, return_fig=True)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4
    # a prediction close to the truth shows a high correlation in every title
    assert all(float(ax.get_title().split("r=")[1]) > 0.5 for ax in visible)
    plt.close(fig)
    fig = lc.pl.translation_scatter(pred, true, features=["p1"], return_fig=True)
    assert [ax.get_title().split()[0] for ax in fig.axes if ax.get_visible()] == ["p1"]
    plt.close(fig)
    with pytest.raises(ValueError, match="one prediction per"):
        lc.pl.translation_scatter(pred[:10], true)
    with pytest.raises(ValueError, match="Unknown feature"):
        lc.pl.translation_scatter(pred, true, features=["nope"])


def test_expression_along_path_lines_follow_the_data():
    import anndata as ad
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    t = np.repeat(np.linspace(0, 1, 10), 30)
    rising = rng.poisson(5 * np.exp(2 * t))
    flat = rng.poisson(20, size=t.size)
    gen = ad.AnnData(np.stack([rising, flat], 1).astype(np.float32))
    gen.var_names = ["up", "flat"]
    gen.obs["t"] = t
    real = gen[::2].copy()
    fig = lc.pl.expression_along_path(
        gen, ["up", "flat"], "t", real=real, n_bins=5, return_fig=True
    )
    ax_up = fig.axes[0]
    line = ax_up.lines[0].get_ydata()
    # the rising gene's share of counts grows along t: its generated line goes up
    assert line[-1] > line[0]
    assert len(ax_up.collections) == 1  # the real cells' dots
    plt.close(fig)
    with pytest.raises(ValueError, match="no obs column"):
        lc.pl.expression_along_path(gen, ["up"], "missing")
    with pytest.raises(ValueError, match="lacks gene"):
        lc.pl.expression_along_path(gen, ["nope"], "t")


def _spatial_pair(n=60, n_genes=5, seed=0):
    import anndata as ad
    from scipy import sparse

    rng = np.random.default_rng(seed)
    real = ad.AnnData(sparse.csr_matrix(rng.poisson(3.0, (n, n_genes)).astype(np.float32)))
    real.var_names = [f"g{i}" for i in range(n_genes)]
    real.obsm["spatial"] = rng.uniform(0, 10, (n, 2))
    region = real[:10].copy()
    region.X = sparse.csr_matrix(rng.poisson(9.0, (10, n_genes)).astype(np.float32))
    return real, region


def test_imputed_region_replaces_the_region_and_shares_the_colour_scale():
    real, region = _spatial_pair()
    before = real.X.toarray().copy()
    fig = lc.pl.imputed_region(real, region, ["g0", "g3"], return_fig=True)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4  # two genes x (measured, imputed)
    measured, imputed = panels[0], panels[1]
    assert measured.collections[0].get_offsets().shape == (60, 2)
    # the imputed panel shows the 50 cells outside the region, then the 10 generated ones
    assert [c.get_offsets().shape[0] for c in imputed.collections] == [50, 10]
    assert imputed.collections[0].get_clim() == measured.collections[0].get_clim()
    assert len(imputed.lines) == 1 and not measured.lines  # the region's outline
    np.testing.assert_array_equal(real.X.toarray(), before)


def test_imputed_region_errors():
    real, region = _spatial_pair()
    with pytest.raises(ValueError, match="lacks gene"):
        lc.pl.imputed_region(real, region, ["nope"])
    with pytest.raises(ValueError, match="at least one gene"):
        lc.pl.imputed_region(real, region, [])
    del region.obsm["spatial"]
    with pytest.raises(ValueError, match="imputed.obsm has no 'spatial'"):
        lc.pl.imputed_region(real, region, ["g0"])


def test_program_activity_panels_and_errors():
    import pandas as pd

    rng = np.random.default_rng(0)
    sets = {
        name: pd.DataFrame(rng.normal(shift, 1, (40, 2)), columns=["ifn", "mhc"])
        for name, shift in (("low", -1), ("high", 1), ("real", 0))
    }
    fig = lc.pl.program_activity(sets, requested="ifn", return_fig=True)
    assert [ax.get_title() for ax in fig.axes] == ["ifn (requested)", "mhc"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["low", "high", "real"]
    with pytest.raises(ValueError, match=r"lack program\(s\) \['other'\]"):
        lc.pl.program_activity(sets, programs=["other"])
    with pytest.raises(ValueError, match="at least one"):
        lc.pl.program_activity({})


def _de_frame(comparisons=("A vs Rest",)):
    import pandas as pd

    rng = np.random.default_rng(0)
    frames = []
    for comparison in comparisons:
        lfc = rng.normal(0, 1.5, 30)
        proba = 1 / (1 + np.exp(-3 * (np.abs(lfc) - 1.5)))
        frames.append(
            pd.DataFrame(
                {
                    "lfc_mean": lfc,
                    "proba_de": proba,
                    "is_de_fdr_0.05": proba > 0.9,
                    "comparison": comparison,
                },
                index=[f"g{i}" for i in range(30)],
            )
        )
    return pd.concat(frames)


def test_volcano_colours_calls_and_names_the_top_genes():
    de = _de_frame()
    fig = lc.pl.volcano(de, n_labels=4, return_fig=True)
    ax = fig.axes[0]
    grey, red = ax.collections
    assert len(red.get_offsets()) == int(de["is_de_fdr_0.05"].sum()) > 0
    assert len(grey.get_offsets()) + len(red.get_offsets()) == len(de)
    named = {t.get_text() for t in ax.texts}
    assert named == set(de["proba_de"].nlargest(4).index)
    assert ax.get_title() == "A vs Rest"


def test_volcano_errors():
    two = _de_frame(("A vs Rest", "B vs Rest"))
    with pytest.raises(ValueError, match="several comparisons"):
        lc.pl.volcano(two)
    with pytest.raises(ValueError, match="not in de"):
        lc.pl.volcano(two, comparison="C vs Rest")
    fig = lc.pl.volcano(two, comparison="B vs Rest", return_fig=True)
    assert fig.axes[0].get_title() == "B vs Rest"
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['proba_de'\]"):
        lc.pl.volcano(two.drop(columns="proba_de"))
