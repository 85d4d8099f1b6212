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
