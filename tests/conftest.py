from __future__ import annotations

import pytest

import latentcell as lc


def pytest_runtest_setup(item):
    """Seed torch, numpy and ``random`` before each test and the fixtures it sets up.

    torch draws a random default seed per process, so a model built in a fixture would get
    different initial weights on every run (and tests on trained models would pass or fail
    by luck). Seeding here, before pytest builds the test's fixtures, makes every test and
    every module-scoped model the same on every run and in any selection of tests.
    """
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (the global state, for code that uses it)
    torch.manual_seed(0)


FAST_MODEL = dict(n_latent=8, n_hidden=32, flow_n_hidden=32, flow_n_layers=2, token_dim=4)
FAST_TRAIN = dict(
    max_epochs=8, flow_max_epochs=15, accelerator="cpu", seed=0, enable_progress_bar=False
)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module runs (``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny tensors only add contention on a busy CPU with intra-op threads; module scope, so
    the module's trained fixtures run with it too.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def synthetic():
    return lc.datasets.synthetic_counts(
        n_cells=240, n_genes=40, n_cell_types=3, n_batches=2, seed=1
    )


@pytest.fixture(scope="session")
def trained():
    """A small model with labels, batch and a continuous covariate, trained once."""
    adata = lc.datasets.synthetic_counts(n_cells=300, n_genes=40, seed=0)
    lc.LatentDiffusionModel.setup_anndata(
        adata,
        layer="counts",
        labels_key="cell_type",
        batch_key="batch",
        continuous_covariate_keys=["score"],
    )
    model = lc.LatentDiffusionModel(adata, **FAST_MODEL)
    model.train(**FAST_TRAIN)
    return model
