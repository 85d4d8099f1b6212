import json

import anndata
import pytest

import latentcell as lc
from latentcell.__main__ import main


def test_demo_writes_outputs(tmp_path):
    data = lc.datasets.synthetic_counts(n_cells=200, n_genes=30, seed=2)
    path = tmp_path / "counts.h5ad"
    data.write_h5ad(path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "demo",
                "--data",
                str(path),
                "--layer",
                "counts",
                "--labels-key",
                "cell_type",
                "--out",
                str(out),
                "--max-epochs",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("latentcell", "floor_real_train_vs_test", "vae_normal_prior"):
        assert {"energy", "mmd", "knn_accuracy", "label_accuracy"} <= set(metrics[key])
    gen = anndata.read_h5ad(out / "generated.h5ad")
    assert gen.n_obs == metrics["n_test"]
    assert set(gen.obs["cell_type"]) <= set(data.obs["cell_type"])
    assert (out / "umap.png").stat().st_size > 10_000


def test_demo_bad_labels_key(tmp_path):
    data = lc.datasets.synthetic_counts(n_cells=50, n_genes=10, seed=2)
    path = tmp_path / "counts.h5ad"
    data.write_h5ad(path)
    with pytest.raises(SystemExit, match="not a column"):
        main(["demo", "--data", str(path), "--labels-key", "nope", "--out", str(tmp_path)])


def test_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "latentcell", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--max-epochs" in out.stdout and "--labels-key" in out.stdout
