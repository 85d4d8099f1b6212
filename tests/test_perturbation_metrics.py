from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.metrics._perturbation import (
    delta_pearson,
    discrimination_score,
    perturbation_energy,
    r2_mean_expression,
    score_perturbation,
    top_de_genes,
)

N_GENES = 30
SHIFTED = ["g03", "g07", "g11", "g19", "g25"]

# --------------------------------------------------------------------------- helpers


def _gene_names(n: int = N_GENES) -> list[str]:
    return [f"g{j:02d}" for j in range(n)]


def _base_rates(n: int = N_GENES) -> np.ndarray:
    return np.random.default_rng(123).gamma(2.0, 2.0, size=n) + 0.5


def _poisson_adata(rates: np.ndarray, n_cells: int, seed: int, sparse: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.broadcast_to(rates, (n_cells, len(rates)))).astype(np.float32)
    x = sp.csr_matrix(counts) if sparse else counts
    obs = pd.DataFrame(index=[f"s{seed}_c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=_gene_names(len(rates)))
    return ad.AnnData(X=x, obs=obs, var=var)


def _perturbed_rates(shifted: list[str] = SHIFTED, factor: float = 6.0) -> np.ndarray:
    rates = _base_rates().copy()
    names = _gene_names()
    for i, g in enumerate(shifted):
        j = names.index(g)
        rates[j] = rates[j] * factor if i % 2 == 0 else rates[j] / factor
    return rates


def _exact_adata(log_means: list[float], names: list[str] | None = None) -> ad.AnnData:
    """Two cells whose log1p(CP10k) values are ``log_means -/+ 0.5`` on the named genes.

    Every cell has 1e4 total counts (a "filler" gene takes the rest), so CP10k equals the counts
    and the per-gene mean of log1p(CP10k) is exactly ``log_means``.
    """
    names = names or ["a", "b", "c", "d"]
    m = np.asarray(log_means, dtype=np.float64)
    cells = np.vstack([np.expm1(m - 0.5), np.expm1(m + 0.5)])
    filler = 1e4 - cells.sum(axis=1, keepdims=True)
    x = np.hstack([cells, filler])
    var = pd.DataFrame(index=[*names, "filler"])
    obs = pd.DataFrame(index=[f"c{i}" for i in range(2)])
    return ad.AnnData(X=x, obs=obs, var=var)


@pytest.fixture(scope="module")
def data() -> dict[str, ad.AnnData]:
    base = _base_rates()
    pert = _perturbed_rates()
    return {
        "control": _poisson_adata(base, 120, seed=1),
        "control2": _poisson_adata(base, 120, seed=2),
        "true": _poisson_adata(pert, 120, seed=3),
        "noisy": _poisson_adata(pert, 120, seed=4),
    }


# --------------------------------------------------------------------------- hand-computed


def test_r2_hand_computed_shift():
    true = _exact_adata([1.0, 2.0, 3.0, 4.0])
    pred = _exact_adata([2.0, 3.0, 4.0, 5.0])
    out = r2_mean_expression(pred, true, genes=["a", "b", "c", "d"])
    # Perfectly correlated, but offset by 1: SS_res = 4, SS_tot = 5.
    assert out["r2_pearson"] == pytest.approx(1.0)
    assert out["r2_score"] == pytest.approx(1.0 - 4.0 / 5.0)
    assert out["n_genes"] == 4


def test_r2_hand_computed_reversed():
    true = _exact_adata([1.0, 2.0, 3.0, 4.0])
    pred = _exact_adata([4.0, 3.0, 2.0, 1.0])
    out = r2_mean_expression(pred, true, genes=["a", "b", "c", "d"])
    # Pearson = -1 so its square is 1; SS_res = 9 + 1 + 1 + 9 = 20, SS_tot = 5.
    assert out["r2_pearson"] == pytest.approx(1.0)
    assert out["r2_score"] == pytest.approx(1.0 - 20.0 / 5.0)


def test_delta_pearson_hand_computed():
    control = _exact_adata([1.0, 1.0, 1.0, 1.0])
    true = _exact_adata([1.0, 2.0, 3.0, 4.0])
    pred = _exact_adata([2.0, 2.0, 2.0, 5.0])
    # True change [0, 1, 2, 3], predicted change [1, 1, 1, 4]:
    # centred [-1.5, -.5, .5, 1.5] and [-.75, -.75, -.75, 2.25]; dot 4.5; norms^2 5 and 6.75.
    value = delta_pearson(pred, true, control, genes=["a", "b", "c", "d"])
    assert value == pytest.approx(4.5 / math.sqrt(5.0 * 6.75))
    assert value == pytest.approx(math.sqrt(0.6))


def test_delta_pearson_constant_change_is_nan():
    control = _exact_adata([1.0, 2.0, 3.0, 4.0])
    true = _exact_adata([1.0, 3.0, 2.0, 4.0])
    assert math.isnan(delta_pearson(control, true, control, genes=["a", "b", "c", "d"]))


def test_top_de_genes_ties_broken_by_name():
    names = ["z", "y", "x", "w"]
    control = _exact_adata([2.0, 2.0, 2.0, 2.0], names)
    true = _exact_adata([3.0, 1.0, 3.0, 2.0], names)  # |diff| = 1, 1, 1, 0
    assert top_de_genes(control, true, k=3) == ["x", "y", "z"]
    true2 = _exact_adata([2.5, 5.0, 2.0, 3.0], names)  # |diff| = .5, 3, 0, 1
    assert top_de_genes(control, true2, k=3) == ["y", "w", "z"]


# --------------------------------------------------------------------------- synthetic counts


def test_perfect_prediction(data):
    true, control = data["true"], data["control"]
    r2 = r2_mean_expression(true, true)
    assert r2["r2_pearson"] == pytest.approx(1.0)
    assert r2["r2_score"] == pytest.approx(1.0)
    assert r2["n_genes"] == N_GENES
    assert delta_pearson(true, true, control) == pytest.approx(1.0)
    e_self = perturbation_energy(true, true, n_comps=10)
    e_replicate = perturbation_energy(data["noisy"], true, n_comps=10)
    assert e_self == pytest.approx(0.0, abs=1e-8)
    assert e_self <= e_replicate


def test_score_perturbation_keys_and_perfect(data):
    out = score_perturbation(data["true"], data["true"], data["control"], k=5, n_comps=10)
    assert set(out) == {
        "r2_pearson_all",
        "r2_score_all",
        "r2_pearson_top5",
        "r2_score_top5",
        "delta_pearson_all",
        "delta_pearson_top5",
        "energy",
        "n_pred",
        "n_true",
        "k",
    }
    for key in ["r2_pearson_all", "r2_score_all", "r2_pearson_top5", "r2_score_top5"]:
        assert out[key] == pytest.approx(1.0)
    assert out["delta_pearson_all"] == pytest.approx(1.0)
    assert out["delta_pearson_top5"] == pytest.approx(1.0)
    assert out["energy"] == pytest.approx(0.0, abs=1e-8)
    assert (out["n_pred"], out["n_true"], out["k"]) == (120, 120, 5)


def test_control_prediction_scores_worse_than_noisy_correct(data):
    true, control = data["true"], data["control"]
    good = score_perturbation(data["noisy"], true, control, k=5, n_comps=10)
    bad = score_perturbation(data["control2"], true, control, k=5, n_comps=10)
    for key in ["r2_pearson_all", "r2_score_all", "r2_score_top5", "delta_pearson_all"]:
        assert good[key] > bad[key], key
    assert good["delta_pearson_all"] > 0.9
    assert good["energy"] < bad["energy"]


def test_top_de_genes_recovers_shifted(data):
    top = top_de_genes(data["control"], data["true"], k=len(SHIFTED))
    assert set(top) == set(SHIFTED)
    everything = top_de_genes(data["control"], data["true"], k=1000)
    assert sorted(everything) == _gene_names()


def test_energy_caps_components():
    true = _poisson_adata(_perturbed_rates(), 4, seed=5)
    pred = _poisson_adata(_perturbed_rates(), 6, seed=6)
    assert perturbation_energy(pred, true, n_comps=30) >= 0.0


def test_discrimination_score():
    names = _gene_names()
    groups = {f"p{i}": names[5 * i : 5 * i + 5] for i in range(4)}
    trues, preds = {}, {}
    for i, (p, genes) in enumerate(groups.items()):
        rates = _perturbed_rates(genes, factor=8.0)
        trues[p] = _poisson_adata(rates, 60, seed=10 + i)
        preds[p] = _poisson_adata(rates, 60, seed=20 + i)
    good = discrimination_score(preds, trues)
    assert good["mean"] == 0.0
    assert good["per_perturbation"] == {p: 0.0 for p in groups}
    swapped = dict(preds)
    swapped["p0"], swapped["p1"] = preds["p1"], preds["p0"]
    bad = discrimination_score(swapped, trues)
    assert bad["mean"] > good["mean"]
    assert bad["per_perturbation"]["p0"] > 0.0
    assert bad["per_perturbation"]["p1"] > 0.0
    assert bad["per_perturbation"]["p2"] == 0.0
    # Rank is normalised by n - 1: at most 1.
    assert all(0.0 <= v <= 1.0 for v in bad["per_perturbation"].values())


# --------------------------------------------------------------------------- robustness


def test_inputs_unchanged_and_sparse_matches_dense(data):
    true = _poisson_adata(_perturbed_rates(), 50, seed=30, sparse=True)
    pred = _poisson_adata(_perturbed_rates(), 50, seed=31, sparse=True)
    control = _poisson_adata(_base_rates(), 50, seed=32, sparse=True)
    snapshots = [(a, a.X.copy(), a.obs.copy(), a.var.copy()) for a in (true, pred, control)]
    sparse_out = score_perturbation(pred, true, control, k=5, n_comps=5)
    top_de_genes(control, true, k=5)
    discrimination_score({"p": pred, "q": control}, {"p": true, "q": control})
    for a, x, obs, var in snapshots:
        assert (a.X != x).nnz == 0
        pd.testing.assert_frame_equal(a.obs, obs)
        pd.testing.assert_frame_equal(a.var, var)
    dense = [
        ad.AnnData(X=a.X.toarray(), obs=a.obs.copy(), var=a.var.copy())
        for a in (pred, true, control)
    ]
    dense_out = score_perturbation(*dense, k=5, n_comps=5)
    for key, value in sparse_out.items():
        assert dense_out[key] == pytest.approx(value), key


def test_gene_order_and_extra_genes_ignored(data):
    true, control = data["true"], data["control"]
    pred = data["noisy"]
    reordered = pred[:, pred.var_names[::-1]].copy()
    extra = ad.AnnData(
        X=np.hstack([reordered.X, np.full((reordered.n_obs, 1), 50.0, dtype=np.float32)]),
        obs=reordered.obs.copy(),
        var=pd.DataFrame(index=[*reordered.var_names, "extra_gene"]),
    )
    base = score_perturbation(pred, true, control, k=5, n_comps=10)
    # Library sizes are computed over the genes of ``true`` only.
    other = score_perturbation(extra, true, control, k=5, n_comps=10)
    for key, value in base.items():
        assert other[key] == pytest.approx(value), key


def test_missing_genes_raise(data):
    true, control = data["true"], data["control"]
    pred = data["noisy"][:, [g for g in _gene_names() if g != "g04"]].copy()
    with pytest.raises(ValueError, match="missing from pred: g04"):
        r2_mean_expression(pred, true)
    with pytest.raises(ValueError, match="g04"):
        delta_pearson(pred, true, control)
    with pytest.raises(ValueError, match="g04"):
        perturbation_energy(pred, true)
    with pytest.raises(ValueError, match="g04"):
        score_perturbation(pred, true, control)
    with pytest.raises(ValueError, match="missing from control: g04"):
        top_de_genes(pred, true)
    with pytest.raises(ValueError, match="g04"):
        discrimination_score({"a": pred, "b": true}, {"a": true, "b": true})
    with pytest.raises(ValueError, match="not_a_gene"):
        r2_mean_expression(true, true, genes=["g00", "not_a_gene"])


def test_invalid_arguments(data):
    true, control = data["true"], data["control"]
    with pytest.raises(ValueError, match="same perturbations"):
        discrimination_score({"a": true}, {"b": true})
    with pytest.raises(ValueError, match="at least 2 perturbations"):
        discrimination_score({"a": true}, {"a": true})
    with pytest.raises(ValueError, match="k must be"):
        top_de_genes(control, true, k=0)
    with pytest.raises(ValueError, match="n_comps"):
        perturbation_energy(true, true, n_comps=0)
    with pytest.raises(ValueError, match="no cells"):
        r2_mean_expression(true[:0].copy(), true)
