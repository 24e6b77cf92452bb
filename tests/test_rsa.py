"""RSA with known answers: a planted structure, a null structure, a direct computation, the
permutation test against full enumeration, bad input, and the gain correlation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist

from replandscape.errors import UserError
from replandscape.metrics.rsa import (
    RSAParams,
    alignment_gain_correlation,
    hypothesis_matrices,
    rsa,
    task_hypotheses,
)
from replandscape.tasks import get_task
from replandscape.tasks.generators import regression

SLOPES = (-2, -1, 1, 2, 3)
INTERCEPTS = (-5, 0, 5)


def grid_labels(per_cell: int) -> list[dict[str, object]]:
    """Balanced regression labels: ``per_cell`` items in each (slope, intercept) cell."""
    return [{"slope": a, "intercept": b, "condition": regression.condition_name(a, b)}
            for a in SLOPES for b in INTERCEPTS for _ in range(per_cell)]


def test_planted_structure_gives_correlation_one_and_a_small_p() -> None:
    labels = grid_labels(4)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))  # rows in no particular order
    labels = [labels[i] for i in order]
    # each item is the one-hot code of its slope: after z-scoring, conditions of one slope are
    # identical (cosine 1) and any two slopes have the same cosine -1/4, so the similarity has
    # the ranks of 'same slope' exactly
    x = np.zeros((len(labels), 32))
    for i, lab in enumerate(labels):
        x[i, SLOPES.index(lab["slope"])] = 1.0
    rows, hyps = regression.hypotheses(labels)
    result = rsa(x, [lab["condition"] for lab in labels], hyps, task="regression",
                 params=RSAParams(n_permutations=1000, seed=1))
    assert result.rows == rows and len(rows) == 15 and set(result.n_items) == {4}
    assert result.correlation["same_slope"] == pytest.approx(1.0, abs=1e-12)
    assert result.p_value["same_slope"] < 0.01
    assert result.p_value["same_slope"] == pytest.approx(1 / 1001)
    off = ~np.eye(15, dtype=bool)
    assert np.allclose(result.similarity[off], np.where(hyps["same_slope"][off] == 1, 1, -0.25))
    # the structure says nothing about the intercept
    assert abs(result.correlation["same_intercept"]) < 0.3
    assert result.p_value["same_intercept"] > 0.05
    # per condition, the row of each condition agrees with the hypothesis too
    assert np.allclose(result.row_correlation["same_slope"], 1.0)
    js = result.to_json_dict()
    assert js["correlation"]["same_slope"] == pytest.approx(1.0) and js["n_permutations"] == 1000


def test_planted_structure_survives_noise_and_irrelevant_dimensions() -> None:
    labels = grid_labels(20)
    rng = np.random.default_rng(5)
    slope_codes = rng.normal(size=(len(SLOPES), 256))
    x = np.stack([slope_codes[SLOPES.index(lab["slope"])] for lab in labels])
    x = x + rng.normal(scale=1.0, size=x.shape)
    x = np.hstack([x, rng.normal(scale=3.0, size=(len(x), 512))])  # pure-noise dimensions
    _, hyps = regression.hypotheses(labels)
    result = rsa(x, [lab["condition"] for lab in labels], hyps, task="regression")
    assert result.correlation["same_slope"] > 0.6 and result.p_value["same_slope"] < 0.01
    assert result.p_value["same_intercept"] > 0.01


def test_null_structure_spreads_p_values_over_zero_one() -> None:
    labels = grid_labels(3)
    _, hyps = regression.hypotheses(labels)
    conditions = [lab["condition"] for lab in labels]
    p_values = []
    for seed in range(60):
        x = np.random.default_rng(100 + seed).normal(size=(len(labels), 24))
        result = rsa(x, conditions, hyps, task="regression",
                     params=RSAParams(n_permutations=200, seed=seed))
        p_values.append(result.p_value["near_slope"])
    p = np.asarray(p_values)
    assert p.min() < 0.25 and p.max() > 0.75
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert 0.35 < p.mean() < 0.65


def _direct(x: np.ndarray, conditions: list[str], h: np.ndarray) -> tuple[np.ndarray, float]:
    """The RSA written out: z-score, condition means, cosine, triangles, scipy's Spearman."""
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    names = sorted(set(conditions))
    means = np.array([z[[c == n for c in conditions]].mean(axis=0) for n in names])
    sim = 1 - cdist(means, means, metric="cosine")
    a = [sim[i, j] for i in range(len(names)) for j in range(i + 1, len(names))]
    b = [h[i, j] for i in range(len(names)) for j in range(i + 1, len(names))]
    return sim, float(stats.spearmanr(a, b).statistic)


def test_values_equal_a_direct_computation() -> None:
    rng = np.random.default_rng(7)
    conditions = [f"c{rng.integers(0, 9)}" for _ in range(120)]
    x = rng.normal(size=(120, 40)) + np.array([[int(c[1])] for c in conditions]) * 0.3
    h = rng.normal(size=(9, 9))
    h = h + h.T
    result = rsa(x, conditions, {"h": h}, task="t", params=RSAParams(n_permutations=0))
    sim, rho = _direct(x, conditions, h)
    assert np.allclose(result.similarity, sim, atol=1e-10)
    assert result.correlation["h"] == pytest.approx(rho, abs=1e-12)
    assert math.isnan(result.p_value["h"])
    # row alignment: each row's similarities to the others against the hypothesis row
    for i in range(9):
        keep = np.arange(9) != i
        expected = stats.spearmanr(sim[i, keep], h[i, keep]).statistic
        assert result.row_correlation["h"][i] == pytest.approx(expected, abs=1e-12)
    # the item level: one row per item, no means
    small = x[:30]
    hi = rng.normal(size=(30, 30))
    hi = hi + hi.T
    item = rsa(small, conditions[:30], {"h": hi}, task="t",
               params=RSAParams(level="item", n_permutations=0))
    z = (small - small.mean(axis=0)) / small.std(axis=0)
    direct = 1 - cdist(z, z, metric="cosine")
    assert np.allclose(item.similarity, direct, atol=1e-10)
    iu = np.triu_indices(30, k=1)
    assert item.correlation["h"] == pytest.approx(
        stats.spearmanr(direct[iu], hi[iu]).statistic, abs=1e-12)


def test_permutation_p_value_matches_full_enumeration() -> None:
    rng = np.random.default_rng(3)
    conditions = [f"c{i % 5}" for i in range(50)]
    x = rng.normal(size=(50, 12))
    h = np.array([[0, 3, 1, 2, 0], [3, 0, 2, 1, 1], [1, 2, 0, 3, 2], [2, 1, 3, 0, 1],
                  [0, 1, 2, 1, 0]], dtype=float)
    sim, observed = _direct(x, conditions, h)
    iu = np.triu_indices(5, k=1)
    perms = [stats.spearmanr(sim[np.ix_(p, p)][iu], h[iu]).statistic
             for p in map(list, itertools.permutations(range(5)))]
    exact = np.mean(np.asarray(perms) >= observed - 1e-12)
    result = rsa(x, conditions, {"h": h}, task="t", params=RSAParams(n_permutations=6000))
    assert result.correlation["h"] == pytest.approx(observed, abs=1e-12)
    assert result.p_value["h"] == pytest.approx(exact, abs=0.02)
    assert result.null_mean["h"] == pytest.approx(np.mean(perms), abs=0.02)
    again = rsa(x, conditions, {"h": h}, task="t", params=RSAParams(n_permutations=6000))
    assert again.p_value == result.p_value  # seeded


def test_bad_input_is_one_line_naming_task_and_condition() -> None:
    labels = grid_labels(2)
    conditions = [lab["condition"] for lab in labels]
    x = np.random.default_rng(0).normal(size=(len(labels), 8))
    cases = [
        ({"h": np.zeros((4, 4))}, conditions, "hypothesis 'h' is 4x4 but there are 15 rows "
                                              "(slope=-1,intercept=-5"),
        ({"h": np.triu(np.arange(225.0).reshape(15, 15))}, conditions,
         "hypothesis 'h' is not symmetric: entry ('slope=-1,intercept=-5', "
         "'slope=-1,intercept=0')"),
        ({"h": np.ones((15, 15))}, conditions, "hypothesis 'h' is the same for every pair"),
        ({"h": np.eye(2)}, ["a", "b"] * 15, "RSA needs at least 3 conditions, got 2 (a, b)"),
    ]
    for hyps, conds, message in cases:
        with pytest.raises(UserError) as info:
            rsa(x[:len(conds)], conds, hyps, task="regression")
        text = str(info.value)
        assert "task 'regression'" in text and message in text and "\n" not in text
    with pytest.raises(UserError, match="task 'regression': 3 condition labels"):
        rsa(x, conditions[:3], {}, task="regression")
    with pytest.raises(UserError, match="unknown RSA level 'cell'"):
        rsa(x, conditions, {}, task="regression", params=RSAParams(level="cell"))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="task 'parity' declares no hypotheses"):
        task_hypotheses("parity")
    assert set(task_hypotheses("reading")) == {"same_answer", "same_name", "same_question_type"}


def test_hypotheses_of_generated_items_feed_the_rsa() -> None:
    spec = get_task("regression")
    got = [spec.generate("test", v, i, 0) for v in spec.variants for i in range(150)]
    rows, hyps = hypothesis_matrices(task_hypotheses("regression"), [i.labels for i in got],
                                     task="regression")
    x = np.random.default_rng(1).normal(size=(len(got), 16))
    result = rsa(x, [i.labels["condition"] for i in got], hyps, task="regression",
                 params=RSAParams(n_permutations=50))
    assert result.rows == rows and sum(result.n_items) == len(got)
    assert set(result.correlation) == {"same_slope", "same_intercept", "near_slope"}


def test_alignment_gain_correlation_per_layer() -> None:
    gain = [0.1, 0.3, 0.2, 0.5, 0.4]
    layers = np.array([[1, 3, 2, 5, 4], [5, 3, 4, 1, 2], [2, 9, 1, 8, 7], [1, 1, 1, 1, 1]],
                      dtype=float)
    out = alignment_gain_correlation(gain, layers, task="reading")
    assert out.n == 5
    assert out.pearson[0] == pytest.approx(1.0) and out.spearman[0] == pytest.approx(1.0)
    assert out.pearson[1] == pytest.approx(-1.0) and out.spearman[1] == pytest.approx(-1.0)
    assert out.pearson[2] == pytest.approx(stats.pearsonr(gain, layers[2]).statistic)
    assert out.spearman[2] == pytest.approx(stats.spearmanr(gain, layers[2]).statistic)
    assert out.spearman_p[2] == pytest.approx(stats.spearmanr(gain, layers[2]).pvalue)
    assert math.isnan(out.pearson[3]) and out.to_json_dict()["spearman"][3] is None
    one = alignment_gain_correlation(gain, layers[2])
    assert one.pearson == (out.pearson[2],)
    with pytest.raises(UserError, match="task 'reading': 5 gains but alignment changes"):
        alignment_gain_correlation(gain, layers[:, :4], task="reading")
    with pytest.raises(UserError, match="needs at least 3 conditions, got 2"):
        alignment_gain_correlation([0.1, 0.2], [[1.0, 2.0]], task="reading")
