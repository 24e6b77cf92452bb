"""The neighbour engine's weaker contract (``exact_knn(..., exact_ranks=R, exact_cuts=...)``) and
the geometry analysis that uses it by default: exact where DADApy's estimators read, identical
results to DADApy's default path (docs/method.md §5)."""

from __future__ import annotations

import numpy as np
import pytest

from replandscape.metrics import GeometryParams, compute_geometry, exact_knn
from replandscape.metrics.geometry import _adp_rows_past, _codes, exact_reads

dadapy = pytest.importorskip("dadapy")


def planted(n: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters with a common offset (float32), and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, size=n)
    centres = rng.normal(size=(clusters, d))
    X = centres[labels] + 0.5 * rng.standard_normal((n, d)) + 3.0
    return X.astype(np.float32), labels


def assert_contract(
    X: np.ndarray, k: int, R: int, cuts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    info: dict = {}
    dist, ind = exact_knn(X, k, exact_ranks=R, exact_cuts=cuts, info=info)
    assert info["strategy"] == "float32-ranks"
    ref_d, ref_i = exact_knn(X, k, strategy="float64")
    np.testing.assert_array_equal(ind[:, : R + 1], ref_i[:, : R + 1])
    np.testing.assert_allclose(dist[:, 1 : R + 1], ref_d[:, 1 : R + 1], rtol=1e-12)
    assert (dist[:, 0] == 0).all() and (ind[:, 0] == np.arange(len(X))).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    for cut in cuts:
        for r in range(len(X)):
            c = int(cut[r])
            assert set(ind[r, 1 : c + 1]) == set(ref_i[r, 1 : c + 1]), (r, c)
    # past R: the float32 search's nearest, each row a set of distinct points
    assert all(np.unique(row).size == k + 1 for row in ind)
    np.testing.assert_allclose(np.sort(dist, axis=1), np.sort(ref_d, axis=1), rtol=1e-4)
    return dist, ind


def test_exact_ranks_and_cuts_match_the_float64_search() -> None:
    X, labels = planted(1500, 96, 12, seed=3)
    answers = np.random.default_rng(4).integers(0, 3, size=len(X))
    counts = np.bincount(answers)
    per_row = (0.3 * counts).astype(np.int64)[answers]  # one cut per row, by class
    assert_contract(X, 200, 24, [per_row, np.full(len(X), 9)])


def test_near_ties_that_float32_misorders_stay_exact() -> None:
    """Points on shells around point 0 whose radii differ by ~1e-9 relative, far from the
    origin: float32 products cannot order them, the exact ranks and cut sets must."""
    rng = np.random.default_rng(5)
    n, d = 900, 48
    directions = rng.standard_normal((n - 1, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = 10.0 + np.arange(n - 1) % 300 * 1e-8 + np.repeat(np.arange(3), 300)[: n - 1]
    centre = np.full(d, 40.0)
    X = np.vstack([centre, centre + directions * radii[:, None]])
    # the float32 squared distances from point 0 do not order its shell as float64 does
    exact = ((X[1:] - X[0]) ** 2).sum(axis=1)
    X32 = X.astype(np.float32) - X.astype(np.float32).mean(axis=0)
    approx = (X32[1:] ** 2).sum(1) + (X32[0] ** 2).sum() - 2.0 * (X32[1:] @ X32[0])
    first = np.argsort(exact, kind="stable")[:120]
    assert not np.array_equal(np.argsort(approx, kind="stable")[:120], first)
    dist, ind = assert_contract(X, 350, 64, [np.full(n, 200)])
    np.testing.assert_array_equal(ind[0, 1:65], first[:64] + 1)


def geometry_pair(X: np.ndarray, labels: dict, params: GeometryParams) -> None:
    fast = compute_geometry(X, labels, params)
    exact = compute_geometry(X, labels, params, exact_neighbours=True)
    slow = compute_geometry(
        X, labels, GeometryParams(**{**params.__dict__, "engine": "dadapy"})
    )
    for other in (exact, slow):
        np.testing.assert_array_equal(fast.assignment, other.assignment)
        np.testing.assert_array_equal(fast.assignment_halo, other.assignment_halo)
        assert fast.n_peaks == other.n_peaks and fast.core_fraction == other.core_fraction
        assert fast.ari == other.ari and fast.overlap == other.overlap
        np.testing.assert_allclose(fast.id_gride, other.id_gride, rtol=1e-9)
        np.testing.assert_allclose(fast.id_twonn, other.id_twonn, rtol=1e-9)
        np.testing.assert_allclose(fast.log_density, other.log_density, rtol=1e-9)


def test_geometry_by_default_matches_dadapy() -> None:
    X, labels = planted(1200, 64, 10, seed=6)
    answers = np.random.default_rng(7).integers(0, 4, size=len(X))
    geometry_pair(X, {"subject": labels, "answer": answers}, GeometryParams(maxk=150))


def test_adp_walks_past_the_exact_ranks_are_made_exact() -> None:
    """With R = 4 (range_max 4, density k 4) ADP's walks leave the exact ranks: the check
    finds their rows, and the result still equals DADApy's."""
    X, labels = planted(900, 24, 6, seed=8)
    params = GeometryParams(maxk=60, range_max=4, id_scale_index=1, density_k=4, Z=1.0)
    R, cuts = exact_reads(params, len(X), {"subject": _codes(labels)})
    assert R == 4
    dist, ind = exact_knn(X, 60, exact_ranks=R, exact_cuts=cuts)
    data = dadapy.Data(distances=(dist, ind), maxk=60, verbose=False)
    ids, _, _ = data.return_id_scaling_gride(range_max=4)
    data.set_id(float(ids[1]))
    data.compute_density_kNN(k=4)
    rows = _adp_rows_past(ind, data, 1.0, R, np.zeros(len(X), dtype=bool))
    assert rows is not None and rows.size > 0
    geometry_pair(X, {"subject": labels}, params)


def test_exact_reads_follow_dadapy() -> None:
    params = GeometryParams()
    codes = {"a": np.repeat(np.arange(3), [10, 20, 33])}
    R, cuts = exact_reads(params, 9181, codes)
    assert R == 64  # Gride's 2^int(log2(100)); density k 16 below it
    np.testing.assert_array_equal(np.unique(cuts[0]), [3, 6, 9])
    assert exact_reads(GeometryParams(density_k=80), 9181, codes)[0] == 80


def test_exact_cuts_checked() -> None:
    X, _ = planted(300, 8, 3, seed=9)
    with pytest.raises(ValueError, match="exact_cuts"):
        exact_knn(X, 20, exact_ranks=5, exact_cuts=[21])


def test_an_unknown_dadapy_release_gets_whole_exact_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reads are those of the DADApy releases checked; with another installed the engine
    makes every neighbour list exact instead of trusting them."""
    from replandscape.metrics import geometry

    calls: list[dict] = []

    def spy(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(kwargs)
        return exact_knn(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(geometry, "exact_knn", spy)
    X, labels = planted(600, 32, 5, seed=9)
    params = GeometryParams(maxk=80, range_max=64)
    compute_geometry(X, {"subject": labels}, params)
    assert "exact_ranks" in calls[-1]
    calls.clear()
    monkeypatch.setattr(geometry, "ADP_REPLAY_VERSIONS", ())
    compute_geometry(X, {"subject": labels}, params)
    assert calls and all("exact_ranks" not in c for c in calls)


def test_scratch_memory_is_dropped_where_freed_memory_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process that keeps freed memory (the analysis stage, ``metrics``) drops the stored keys
    and the float32 points when the search is done with them, so that the neighbour lists
    reuse their pages; elsewhere they are kept for the next call. Same neighbours either way,
    and ``distinct=True`` (the caller removed duplicates) changes nothing on distinct rows."""
    from replandscape.metrics import neighbors

    X, labels = planted(1200, 64, 8, seed=11)
    cuts = [np.full(len(X), 40)]
    neighbors.release_workspace()
    monkeypatch.setattr(neighbors, "retaining", lambda: False)
    kept = exact_knn(X, 150, exact_ranks=16, exact_cuts=cuts)
    assert {"lower", "points32"} <= set(neighbors._WORKSPACE)
    neighbors.release_workspace()
    monkeypatch.setattr(neighbors, "retaining", lambda: True)
    dropped = exact_knn(X, 150, exact_ranks=16, exact_cuts=cuts, distinct=True)
    assert not {"lower", "points32"} & set(neighbors._WORKSPACE)
    for a, b in zip(kept, dropped):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("dtype", "packs"), [(np.float32, True), (np.float32, False),
                                              (np.float64, False)])
def test_ordered_selection_is_the_sorted_prefix(
    dtype: type, packs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row's ``n_keep`` smallest keys in increasing order and the next key, as a full sort
    gives them: negative and positive keys, -inf (the point itself), -0.0, many ties (keys on a
    coarse grid); float32 keys also come tie-broken by column (one packed sort)."""
    from replandscape.metrics import neighbors
    from replandscape.metrics.neighbors import _select

    assert neighbors._packs(256, 2**24) and not neighbors._packs(256, 2**24 + 1)
    if not packs:  # keys of float64, or rows and columns too many to pack into 64 bits
        monkeypatch.setattr(neighbors, "_packs", lambda n_rows, n: False)
    rng = np.random.default_rng(8)
    keys = (np.round(rng.standard_normal((300, 5000)) * 40) / 8 + 6.0).astype(dtype)
    keys[np.arange(300), np.arange(300)] = -np.inf
    zeros = np.flatnonzero(keys[5] == 0)
    keys[5, zeros[1::2]] = -0.0  # equal to 0.0: ordered by column among the zeros
    n_keep = 1000
    assert (np.sort(keys[5])[:n_keep] == 0).sum() > 4
    cand, cvals, nxt = _select(keys, n_keep, ordered=True)
    full = np.sort(keys, axis=1)
    np.testing.assert_array_equal(cvals, full[:, :n_keep])
    np.testing.assert_array_equal(nxt, full[:, n_keep])
    np.testing.assert_array_equal(np.take_along_axis(keys, cand, axis=1), cvals)
    assert all(np.unique(row).size == n_keep for row in cand)
    if packs:
        ref = np.array([np.lexsort((np.arange(5000), row))[:n_keep] for row in keys])
        np.testing.assert_array_equal(cand, ref)


def test_a_failing_panel_of_the_key_matrix_stops_the_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Panels wait for the keys that earlier panels store: one that fails must wake them (and the
    search end with its error), never leave them waiting."""
    import threading

    from replandscape.metrics import neighbors

    X, _ = planted(1800, 32, 6, seed=12)  # 4 panels of 512 rows
    real = neighbors._product_summed
    calls = []

    def fails_once(a: np.ndarray, *args: object, **kwargs: object) -> None:
        calls.append(a.shape[0])
        if len(calls) == 2:
            raise MemoryError("no memory for this panel")
        real(a, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(neighbors, "_product_summed", fails_once)
    outcome: list[BaseException] = []

    def search() -> None:
        try:
            exact_knn(X, 100, exact_ranks=8, exact_cuts=[np.full(len(X), 30)], threads=2)
        except BaseException as err:  # noqa: BLE001
            outcome.append(err)

    worker = threading.Thread(target=search, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the search hung waiting for a failed panel"
    assert outcome and isinstance(outcome[0], (MemoryError, RuntimeError)), outcome
