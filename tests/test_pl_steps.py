import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import latentcell as lc


def _curve():
    rows = []
    for method, steps, per_step in (("euler", (1, 2, 4, 8, 16, 50), 1), ("midpoint", (4, 50), 2)):
        for n in steps:
            rows.append(
                {
                    "method": method,
                    "n_steps": n,
                    "n_evals": n * per_step,
                    "energy": 1.0 / n + 0.4,
                    "knn_accuracy": 0.5 + 0.2 / n,
                    "label_accuracy": 0.9 - 0.1 / n,
                    "seconds": 0.01 * n * per_step,
                    "cells_per_s": 1000.0 / (n * per_step),
                }
            )
    return rows


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_one_line_per_method_on_log_x():
    curve = _curve()
    ax = lc.pl.steps_quality(curve, metric="energy", show=False)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["euler", "midpoint"]
    assert ax.get_xscale() == "log"
    assert ax.get_ylabel() == "energy"
    assert ax.get_xlabel() == "network evaluations"
    euler = ax.get_lines()[0]
    np.testing.assert_array_equal(euler.get_xdata(), [1, 2, 4, 8, 16, 50])
    np.testing.assert_allclose(euler.get_ydata(), [1.0 / n + 0.4 for n in (1, 2, 4, 8, 16, 50)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["euler", "midpoint"]


def test_dataframe_input_steps_axis_and_sorting():
    frame = pd.DataFrame(_curve()).sample(frac=1.0, random_state=0)  # shuffled rows
    ax = lc.pl.steps_quality(frame, metric="knn_accuracy", x="n_steps", show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"euler", "midpoint"}
    np.testing.assert_array_equal(lines["midpoint"].get_xdata(), [4, 50])
    np.testing.assert_array_equal(lines["euler"].get_xdata(), [1, 2, 4, 8, 16, 50])
    assert ax.get_xlabel() == "solver steps"
    assert ax.get_ylabel() == "knn_accuracy"


def test_without_method_column_draws_one_line():
    curve = [{k: v for k, v in r.items() if k != "method"} for r in _curve()[:6]]
    ax = lc.pl.steps_quality(curve, metric="label_accuracy", show=False)
    assert [line.get_label() for line in ax.get_lines()] == ["label_accuracy"]


def test_null_value_and_band():
    ax = lc.pl.steps_quality(_curve(), null=0.41, null_label="floor", show=False)
    null = [line for line in ax.get_lines() if line.get_label() == "floor"]
    assert len(null) == 1
    np.testing.assert_allclose(null[0].get_ydata(), [0.41, 0.41])
    assert not ax.patches  # a plain number draws no band

    ax = lc.pl.steps_quality(_curve(), null=(0.2, 0.05), show=False)
    assert "real vs real" in [line.get_label() for line in ax.get_lines()]
    assert len(ax.patches) == 1
    band = ax.patches[0].get_path().transformed(ax.patches[0].get_patch_transform())
    ys = band.vertices[:, 1]
    np.testing.assert_allclose([ys.min(), ys.max()], [0.15, 0.25])


def test_null_from_real_vs_real_null_dict():
    null = {"energy_mean": 0.3, "energy_std": 0.02, "knn_accuracy_mean": 0.5}
    ax = lc.pl.steps_quality(_curve(), metric="knn_accuracy", null=null, show=False)
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "real vs real")
    np.testing.assert_allclose(line.get_ydata(), [0.5, 0.5])
    with pytest.raises(ValueError, match="label_accuracy_mean"):
        lc.pl.steps_quality(_curve(), metric="label_accuracy", null=null, show=False)


def test_throughput_on_secondary_axis():
    ax = lc.pl.steps_quality(_curve(), throughput="cells_per_s", show=False)
    twin = ax.latentcell_throughput_ax
    assert twin.get_yscale() == "log"
    assert [line.get_label() for line in twin.get_lines()] == [
        "euler (cells_per_s)",
        "midpoint (cells_per_s)",
    ]
    assert len(ax.get_legend().get_texts()) == 4
    assert len(ax.figure.axes) == 2


def test_draws_into_given_axes():
    _, axes = plt.subplots(1, 2)
    out = lc.pl.steps_quality(_curve(), ax=axes[1], show=False)
    assert out is axes[1]
    assert not axes[0].get_lines()


def test_show_returns_none():
    assert lc.pl.steps_quality(_curve(), show=True) is None


def test_missing_metric_column():
    with pytest.raises(ValueError, match="metric column 'mmd' not found"):
        lc.pl.steps_quality(_curve(), metric="mmd", show=False)


def test_missing_x_and_throughput_columns():
    curve = [{k: v for k, v in r.items() if k != "n_evals"} for r in _curve()]
    with pytest.raises(ValueError, match="x column 'n_evals' not found"):
        lc.pl.steps_quality(curve, show=False)
    with pytest.raises(ValueError, match="throughput column 'gpu_mib' not found"):
        lc.pl.steps_quality(_curve(), throughput="gpu_mib", show=False)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "euler"}, "list of dicts"),
        ([], "empty"),
        ([1, 2], "list of dicts"),
    ],
)
def test_bad_curve(bad, match):
    with pytest.raises(ValueError, match=match):
        lc.pl.steps_quality(bad, show=False)


def test_bad_x_values_and_null():
    curve = _curve()
    curve[0]["n_evals"] = 0
    with pytest.raises(ValueError, match="positive"):
        lc.pl.steps_quality(curve, show=False)
    with pytest.raises(ValueError, match="mean, std"):
        lc.pl.steps_quality(_curve(), null=(1.0, 2.0, 3.0), show=False)
    with pytest.raises(ValueError, match="non-negative std"):
        lc.pl.steps_quality(_curve(), null=(1.0, -1.0), show=False)
