"""Circuit shift metrics: rank shift against scipy's Spearman, top-k overlap and the components
that enter or leave the top-k, on hand cases with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from replandscape.errors import UserError
from replandscape.metrics.circuits import (
    CircuitShift,
    EffectMaps,
    circuit_shift,
    compare_maps,
    pairwise_shift,
    rank_shift,
    spearman,
    topk_changes,
    topk_indices,
    topk_overlap,
)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_with_and_without_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    # ties: values rounded to a few levels, ranks averaged as scipy does
    ta, tb = np.round(a), np.round(b * 0.5)
    assert spearman(ta, tb) == pytest.approx(spearmanr(ta.ravel(), tb.ravel()).statistic,
                                             abs=1e-12)
    assert rank_shift(a, b) == pytest.approx(1 - spearmanr(a.ravel(), b.ravel()).statistic,
                                             abs=1e-12)


def test_identical_maps_shift_zero_and_overlap_one() -> None:
    a = np.arange(12.0).reshape(3, 4) - 5.5
    s = circuit_shift(a, a.copy(), k=4)
    assert s.shift == 0.0 and s.spearman == 1.0
    assert s.overlap == 1.0 and s.entered == [] and s.left == []


def test_reversed_ranks_shift_two() -> None:
    a = np.array([0.1, 0.5, 0.9, 1.3, 2.0])
    assert rank_shift(a, -a) == pytest.approx(2.0)
    assert rank_shift(a, a[::-1].copy()) == pytest.approx(2.0)


def test_disjoint_topk_gives_overlap_zero_and_the_right_components() -> None:
    a = np.zeros((2, 3))
    b = np.zeros((2, 3))
    a[0, 0], a[1, 2] = 5.0, -4.0  # top-2 of a by |effect|: (0,0), (1,2)
    b[0, 1], b[1, 0] = 3.0, 2.0  # top-2 of b: (0,1), (1,0)
    assert topk_overlap(a, b, 2) == 0.0
    entered, left = topk_changes(a, b, 2)
    assert entered == [(0, 1), (1, 0)] and left == [(0, 0), (1, 2)]
    s = circuit_shift(a, b, k=2, condition_a="base-0", condition_b="base-4")
    assert s.overlap == 0.0 and s.entered == [(0, 1), (1, 0)] and s.left == [(0, 0), (1, 2)]


def test_abs_and_signed_orderings_differ_on_negative_effects() -> None:
    a = np.array([-9.0, 1.0, 2.0, 0.5])
    assert topk_indices(a, 1, "abs").tolist() == [0]
    assert topk_indices(a, 1, "signed").tolist() == [2]
    b = np.array([-9.0, 1.0, 0.0, 3.0])
    assert topk_overlap(a, b, 1, by="abs") == 1.0
    assert topk_overlap(a, b, 1, by="signed") == 0.0
    # 1-D maps name their components by layer
    assert topk_changes(a, b, 1, by="signed") == ([3], [2])


def test_ties_broken_by_flat_index() -> None:
    a = np.array([1.0, 1.0, 1.0, 0.0])
    assert topk_indices(a, 2).tolist() == [0, 1]


def test_constant_map_has_no_rank_correlation() -> None:
    s = circuit_shift(np.ones(5), np.arange(5.0), k=2, kind="mlp")
    assert math.isnan(s.spearman) and math.isnan(s.shift)
    assert s.to_json()["shift"] is None


def test_pairwise_covers_every_pair_and_kind_and_serialises() -> None:
    rng = np.random.default_rng(0)
    maps = {name: EffectMaps(heads=rng.normal(size=(3, 4)), mlp=rng.normal(size=3))
            for name in ("base-0", "base-8", "ft-100")}
    shifts = pairwise_shift(maps, k=3)
    pairs = {(s.condition_a, s.condition_b, s.kind) for s in shifts}
    assert pairs == {(a, b, kind) for a, b in [("base-0", "base-8"), ("base-0", "ft-100"),
                                               ("base-8", "ft-100")]
                     for kind in ("heads", "mlp")}
    for s in shifts:
        a, b = maps[s.condition_a].maps()[s.kind], maps[s.condition_b].maps()[s.kind]
        assert s.shift == pytest.approx(1 - spearmanr(a.ravel(), b.ravel()).statistic)
        assert s.overlap == topk_overlap(a, b, 3)
    blob = json.loads(json.dumps([s.to_json() for s in shifts]))
    head = next(d for d in blob if d["kind"] == "heads")
    assert all(isinstance(c, list) and len(c) == 2 for c in head["entered"] + head["left"])
    mlp = next(d for d in blob if d["kind"] == "mlp")
    assert all(isinstance(c, int) for c in mlp["entered"] + mlp["left"])


def test_k_is_capped_at_the_map_size_and_checked() -> None:
    s = circuit_shift(np.arange(3.0), np.arange(3.0), k=10, kind="mlp")
    assert isinstance(s, CircuitShift) and s.k == 3 and s.overlap == 1.0
    with pytest.raises(UserError, match="top-k"):
        circuit_shift(np.arange(3.0), np.arange(3.0), k=0)
    with pytest.raises(UserError, match="top-k"):
        topk_overlap(np.arange(3.0), np.arange(3.0), 4)
    with pytest.raises(UserError, match="unknown top-k ordering 'big'"):
        topk_indices(np.arange(3.0), 1, by="big")


def test_mismatched_maps_are_one_line_errors() -> None:
    a = EffectMaps(heads=np.zeros((2, 3)))
    b = EffectMaps(heads=np.zeros((2, 4)))
    with pytest.raises(UserError, match=r"'heads' maps of 'x' and 'y' have shapes \[2, 3\] and "
                                        r"\[2, 4\]") as err:
        compare_maps(a, b, condition_a="x", condition_b="y")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="NaN"):
        circuit_shift(np.array([1.0, np.nan]), np.array([1.0, 2.0]), k=1)
