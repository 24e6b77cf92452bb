"""Linear probes with known answers: a planted feature is recovered and the control stays at
chance, pure noise stays at chance, parameterized probing finds where the feature is planted,
the scores equal scikit-learn's own cross-validation, and bad input is one line."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from replandscape.errors import UserError
from replandscape.metrics.probes import ProbeParams, parameterized_probe, probe, probe_sites


def planted_classes(n: int = 300, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array(["who", "where", "what"])[rng.integers(0, 3, n)]
    centres = {c: rng.normal(size=d) * 1.5 for c in ("who", "where", "what")}
    return rng.normal(size=(n, d)) + np.stack([centres[c] for c in y]), y


def test_probe_recovers_a_planted_class_and_the_control_stays_at_chance() -> None:
    x, y = planted_classes()
    result = probe(x, y, kind="classification", task="reading", label="question_type")
    assert result.score > 0.9
    assert result.chance == pytest.approx(max(np.mean(y == c) for c in set(y)))
    assert abs(result.control - 1 / 3) < 0.12
    assert result.selectivity == pytest.approx(result.score - result.control)
    assert result.selectivity > 0.5
    assert result.n_classes == 3 and result.n_items == 300 and len(result.fold_scores) == 5
    js = result.to_json_dict()
    assert js["metric"] == "accuracy" and js["score"] == pytest.approx(result.score)


def test_probe_recovers_a_planted_number() -> None:
    rng = np.random.default_rng(1)
    n, d = 400, 128
    y = rng.uniform(-20, 20, n)
    x = rng.normal(size=(n, d)) + np.outer(y, rng.normal(size=d)) * 0.2
    result = probe(x, y, kind="regression", task="regression", label="y")
    assert result.score > 0.9 and result.control < 0.05 and result.selectivity > 0.85
    assert result.chance == 0 and result.n_classes == 0
    assert result.to_json_dict()["metric"] == "r2"


def test_pure_noise_stays_at_chance() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 64))
    classes = np.array(["a", "b"])[rng.integers(0, 2, 300)]
    cls = probe(x, classes, kind="classification", task="t", label="c")
    assert abs(cls.score - 0.5) < 0.1 and abs(cls.selectivity) < 0.15
    reg = probe(x, rng.normal(size=300), kind="regression", task="t", label="y")
    assert reg.score < 0.05 and abs(reg.selectivity) < 0.1


def test_scores_equal_scikit_learn_cross_validation() -> None:
    x, y = planted_classes(n=120, d=20, seed=4)
    x = x + np.random.default_rng(9).normal(scale=3.0, size=x.shape)  # keep it imperfect
    params = ProbeParams(folds=4, seed=11)
    result = probe(x, y, kind="classification", task="t", label="c", params=params)
    predicted = cross_val_predict(
        make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)), x, y,
        cv=StratifiedKFold(4, shuffle=True, random_state=11))
    assert result.score == pytest.approx(np.mean(predicted == y), abs=1e-12)
    assert 0.4 < result.score < 1.0
    target = x[:, 0] * 2 + np.random.default_rng(5).normal(size=120)
    reg = probe(x, target, kind="regression", task="t", label="y", params=params)
    predicted = cross_val_predict(make_pipeline(StandardScaler(), RidgeCV(alphas=params.alphas)),
                                  x, target, cv=KFold(4, shuffle=True, random_state=11))
    r2 = 1 - np.sum((target - predicted) ** 2) / np.sum((target - target.mean()) ** 2)
    assert reg.score == pytest.approx(r2, abs=1e-9)


def test_parameterized_probe_finds_where_the_feature_is_encoded() -> None:
    rng = np.random.default_rng(3)
    slopes = np.repeat([-1, 1, 2], 120)
    xq = rng.integers(0, 21, len(slopes))
    y = slopes * xq + 5
    direction = rng.normal(size=48)
    x = rng.normal(size=(len(y), 48))
    encoded = slopes != -1  # the representation carries y only for the positive slopes
    x[encoded] += np.outer(y[encoded], direction) * 0.3
    out = parameterized_probe(x, y, slopes, kind="regression", task="regression", label="y",
                              parameter_name="slope")
    assert out.bins == ("-1", "1", "2")
    scores = dict(zip(out.bins, (p.score for p in out.probes)))
    assert scores["1"] > 0.9 and scores["2"] > 0.9 and scores["-1"] < 0.1
    assert all(p.n_items == 120 for p in out.probes)
    assert out.to_json_dict()["probes"][0]["label"] == "y|slope=-1"
    binned = parameterized_probe(x, y, xq.astype(float), kind="regression", task="regression",
                                 label="y", parameter_name="x", bins=3)
    assert len(binned.bins) == 3 and sum(p.n_items for p in binned.probes) == len(y)


def test_probe_sites_gives_a_profile() -> None:
    x, y = planted_classes(n=150, d=16)
    noise = np.random.default_rng(0).normal(size=x.shape)
    number = (y == "who").astype(float) * 3 + np.random.default_rng(1).normal(size=150) * 0.1
    out = probe_sites({"layer0": noise, "layer1": x}, {"question_type": list(y), "n": number},
                      task="reading", regression={"n"})
    assert out["layer1"]["question_type"].score > 0.9 > out["layer0"]["question_type"].score
    assert out["layer1"]["n"].kind == "regression" and out["layer1"]["n"].score > 0.8


def test_bad_input_is_one_line_naming_task_and_condition() -> None:
    x, y = planted_classes(n=60, d=8)
    y = y.copy()
    y[:3] = "whom"  # a condition with 3 items, fewer than 5 folds
    with pytest.raises(UserError) as info:
        probe(x, y, kind="classification", task="reading", label="question_type")
    text = str(info.value)
    assert "task 'reading': condition 'whom' of label 'question_type' has 3 items, fewer than " \
           "the probe's 5 folds" in text and "\n" not in text
    slopes = np.array([1] * 57 + [2] * 3)
    with pytest.raises(UserError, match="task 'regression': condition 'slope=2' has 3 items"):
        parameterized_probe(x, np.arange(60.0), slopes, kind="regression", task="regression",
                            label="y", parameter_name="slope")
    with pytest.raises(UserError, match="label 'y' has 4 items, fewer than the probe's 5"):
        probe(x[:4], np.arange(4.0), kind="regression", task="regression", label="y")
    with pytest.raises(UserError, match="59 values of label 'c' for representations of shape"):
        probe(x, y[:59], kind="classification", task="t", label="c")
    with pytest.raises(UserError, match="at least 2 folds"):
        probe(x, y, kind="classification", task="t", label="c", params=ProbeParams(folds=1))
