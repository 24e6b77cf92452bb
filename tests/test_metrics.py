"""Geometry metrics: the exact neighbour engine and the estimators, compared with DADApy.

DADApy's default path (``Data(coordinates=X)``, ``compute_distances``, scikit-learn's float64
brute force or tree search) is the reference: on the same input our engine must give the same
neighbours, IDs equal to 1e-6 relative and the same ADP assignment.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from replandscape.cli.main import main
from replandscape.errors import UserError
from replandscape.metrics import (
    GeometryParams,
    GeometryResult,
    compute_geometry,
    deduplicate,
    exact_knn,
)
from replandscape.metrics.neighbors import (
    _madvise_switch,
    _page_size,
    duplicate_groups,
    exact_knn_rows,
)

dadapy = pytest.importorskip("dadapy")

# --------------------------------------------------------------------------------------------
# fixtures with known answers


def two_gaussians(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + [10.0, 0.0]])
    return X, np.repeat([0, 1], n)


def uniform_cube(n: int = 3000, d: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d))


def planted_clusters(
    n_per: int = 100, n_clusters: int = 10, dim: int = 256, seed: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per)
    X = centers[labels] + 0.15 * rng.normal(size=(labels.size, dim))
    return X.astype(np.float32), labels


def dadapy_reference(X: np.ndarray, params: GeometryParams) -> dict[str, Any]:
    """The estimators through DADApy's own default path, written out call by call."""
    data = dadapy.Data(coordinates=np.asarray(X, dtype=np.float64), maxk=params.maxk, verbose=False)
    data.compute_distances(maxk=params.maxk)
    twonn = data.compute_id_2NN()[0]
    ids, _, _ = data.return_id_scaling_gride(range_max=params.range_max)
    data.set_id(ids[params.id_scale_index])
    data.compute_density_kNN(k=params.density_k)
    assignment = np.array(data.compute_clustering_ADP(Z=params.Z, halo=False))
    n_clusters = data.N_clusters
    centers, bord = list(data.cluster_centers), np.array(data.log_den_bord)
    halo = np.array(data.compute_clustering_ADP(Z=params.Z, halo=True))
    return {
        "log_den": np.array(data.log_den),
        "centers": centers,
        "log_den_bord": bord,
        "halo": halo,
        "id_twonn": twonn,
        "id_gride": np.asarray(ids),
        "assignment": assignment,
        "n_peaks": n_clusters,
        "core_fraction": float(np.mean(halo != -1)),
        "dist": data.distances,
        "ind": data.dist_indices,
    }


def sklearn_brute(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    X64 = np.asarray(X, dtype=np.float64)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X64)
    return nn.kneighbors(X64)


def assert_close_rel(a: Any, b: Any, rtol: float = 1e-6) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    assert np.all(np.abs(a - b) <= rtol * np.abs(b)), (a, b)


# --------------------------------------------------------------------------------------------
# neighbour engine


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_blas_candidate_writes_products_into_strided_blocks(dtype: type) -> None:
    from replandscape.metrics import blas

    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 70)).astype(dtype)
    candidates = blas._openblas_candidates(dtype)
    # the environment's scipy bundles an OpenBLAS whose cblas the engine can call
    assert any("scipy" in label for label, _ in candidates), candidates
    tol = 1e-12 if dtype == np.float64 else 1e-4
    for label, product in [*candidates, ("chosen", blas.product_nt)]:
        full = np.zeros((300, 300), dtype=dtype)
        product(X[40:130], X[200:290], full[40:130, 200:290])  # rows of a larger matrix
        np.testing.assert_allclose(full[40:130, 200:290], X[40:130] @ X[200:290].T,
                                   rtol=tol, atol=tol, err_msg=label)
        assert np.count_nonzero(full) == 90 * 90, label  # nothing written outside the block
        # column slices (non-contiguous rows) and other dtypes go through numpy
        np.testing.assert_allclose(product(X[:5, ::2], X[:7, ::2], None), X[:5, ::2] @ X[:7, ::2].T,
                                   rtol=tol, atol=tol, err_msg=label)
    assert blas.chosen_library(dtype) in {"numpy matmul", *(label for label, _ in candidates)}


def test_blas_choice_does_not_flip_with_timing_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two libraries round a product differently in its last bits, so the choice must be the
    same in every process: the newest OpenBLAS unless it is clearly (1.5x) slower."""
    import time

    from replandscape.metrics import blas

    plain = blas._numpy_product

    def candidate(pause: float) -> blas.Product:
        def product(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
            time.sleep(pause)
            return plain(a, b, out)

        return product

    def with_pauses(old: float, new: float) -> str:
        monkeypatch.setattr(blas, "_numpy_product", candidate(0.010))
        monkeypatch.setattr(blas, "_openblas_candidates", lambda dtype: [
            ("openblas 0.3.23.dev Haswell (old.so)", candidate(old)),
            ("openblas 0.3.30 SkylakeX (new.so)", candidate(new)),
        ])
        return blas._choose(np.float64)[0]

    # pauses of milliseconds, so that a loaded machine's jitter cannot cross the 1.5x line
    assert with_pauses(0.010, 0.010) == "openblas 0.3.30 SkylakeX (new.so)"
    assert with_pauses(0.010, 0.012) == "openblas 0.3.30 SkylakeX (new.so)"  # within 1.5x
    assert with_pauses(0.0, 0.030) == "openblas 0.3.23.dev Haswell (old.so)"
    assert blas._version("openblas 0.3.23.dev x") == (0, 3, 23, 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_products_summed_over_chunks_add_in_the_blas_as_in_two_steps(dtype: type) -> None:
    """The float32 error bound counts one rounding per chunk when the BLAS adds each chunk's
    product into the sum (beta = 1): the result must be the two-step sum's, bit for bit."""
    from threadpoolctl import threadpool_limits

    from replandscape.metrics import blas
    from replandscape.metrics.neighbors import _product_summed

    found = blas.accumulator(dtype)
    assert found is not None  # the environment's OpenBLAS qualifies
    accumulate = found[1]
    rng = np.random.default_rng(6)
    X = rng.standard_normal((400, 1000)).astype(dtype)  # 1000 columns: a short last chunk
    a, b = X[:150], X[100:330]
    with threadpool_limits(limits=1, user_api="blas"):
        two_step = np.zeros((150, 230), dtype=dtype)
        part = np.empty_like(two_step)
        for m in range(0, 1000, 256):
            accumulate(a[:, m : m + 256], b[:, m : m + 256], part)
            two_step += part
        fused = np.zeros((400, 400), dtype=dtype)
        _product_summed(a, b, fused[:150, 100:330], 256, None, accumulate)
    assert np.array_equal(fused[:150, 100:330], two_step)
    assert np.count_nonzero(fused) == 150 * 230  # nothing written outside the block
    tol = 1e-12 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(two_step, a @ b.T, rtol=tol, atol=tol)


@pytest.mark.parametrize("strategy", ["float32", "float64", "auto"])
@pytest.mark.parametrize(("n", "dim", "k"), [(1200, 64, 100), (400, 300, 150), (150, 8, 149)])
def test_exact_knn_equals_sklearn_float64_brute_force(
    n: int, dim: int, k: int, strategy: str
) -> None:
    rng = np.random.default_rng(n + dim)
    X = (rng.normal(size=(n, dim)) + 5.0).astype(np.float32)  # an offset, as activations have
    info: dict[str, Any] = {}
    dist, ind = exact_knn(X, k, strategy=strategy, info=info)  # type: ignore[arg-type]
    ref_dist, ref_ind = sklearn_brute(X, k)
    assert dist.shape == ind.shape == (n, k + 1)
    assert dist.dtype == np.float64 and ind.dtype == np.int64
    np.testing.assert_array_equal(ind, ref_ind)
    np.testing.assert_array_equal(ind[:, 0], np.arange(n))
    assert np.all(dist[:, 0] == 0.0)
    np.testing.assert_allclose(dist[:, 1:], ref_dist[:, 1:], rtol=1e-12)
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize("strategy", ["float32", "float64"])
@pytest.mark.parametrize("memory_limit_gb", [2.0, 0.0])  # stored symmetric matrix, or not
def test_threads_split_the_work_without_changing_the_result(
    strategy: str, memory_limit_gb: float
) -> None:
    # small blocks: many products, selections and re-ranking blocks, more of them than threads,
    # so threads share the scratch buffers; three threads on any machine
    X, _ = planted_clusters(n_per=90, n_clusters=8, dim=48)
    runs = {}
    for threads in (1, 3):
        info: dict[str, Any] = {}
        runs[threads] = exact_knn(
            X,
            80,
            strategy=strategy,  # type: ignore[arg-type]
            threads=threads,
            block_rows=64,
            memory_limit_gb=memory_limit_gb,
            info=info,
        )
        assert info["workers"] == threads and info["strategy"] == strategy
    np.testing.assert_array_equal(runs[1][1], runs[3][1])
    np.testing.assert_array_equal(runs[1][0], runs[3][0])  # the same float64 arithmetic
    np.testing.assert_array_equal(runs[3][1], sklearn_brute(X, 80)[1])


def test_auto_strategy_takes_float32_only_for_local_neighbourhoods() -> None:
    rng = np.random.default_rng(0)
    # a thin 2-d sheet in 64-d: a block of nearby rows needs few points to re-rank
    sheet = rng.uniform(size=(4000, 2)) @ rng.normal(size=(2, 64))
    sheet = (sheet + 1e-3 * rng.normal(size=sheet.shape)).astype(np.float32)
    info: dict[str, Any] = {}
    _, ind = exact_knn(sheet, 50, info=info)
    assert info["strategy"] == "float32" and info["pilot_union_fraction"] < 0.11
    np.testing.assert_array_equal(ind, sklearn_brute(sheet, 50)[1])
    # clusters smaller than k: every neighbourhood reaches into the others, float64 is cheaper
    X, _ = planted_clusters(n_per=60, n_clusters=10, dim=128)
    info = {}
    exact_knn(X, 100, info=info)
    assert info["strategy"] == "float64"


def test_float32_pass_certifies_rows_and_falls_back_when_it_cannot() -> None:
    X, _ = planted_clusters(n_per=60, n_clusters=10, dim=128)
    ref_dist, ref_ind = sklearn_brute(X, 100)
    info: dict[str, Any] = {}
    _, ind = exact_knn(X, 100, strategy="float32", info=info)
    np.testing.assert_array_equal(ind, ref_ind)
    assert info["strategy"] == "float32" and info["n_fallback_rows"] == 0
    # with no margin the k-th neighbour is the last candidate, so few rows can be certified;
    # those go through the exhaustive float64 fallback and the result is still exact
    info = {}
    _, ind = exact_knn(X, 100, strategy="float32", margin=0, info=info)
    np.testing.assert_array_equal(ind, ref_ind)
    assert info["n_fallback_rows"] > 0


@pytest.mark.parametrize("strategy", ["float32", "float64"])
def test_float32_input_and_its_float64_copy_give_bit_identical_neighbours(strategy: str) -> None:
    # the analysis passes a float32 site on rank 0 and float64 copies on the other ranks of a
    # split search; the shift, hence every distance, must not depend on the dtype
    rng = np.random.default_rng(11)
    X = (rng.normal(size=(700, 96)) * 3.0 + 40.0).astype(np.float32)
    d32, i32 = exact_knn(X, 80, strategy=strategy)  # type: ignore[arg-type]
    d64, i64 = exact_knn(X.astype(np.float64), 80, strategy=strategy)  # type: ignore[arg-type]
    np.testing.assert_array_equal(i32, i64)
    np.testing.assert_array_equal(d32, d64)
    rows = np.arange(0, 700, 7)
    dr, ir = exact_knn_rows(X, rows, 80)
    np.testing.assert_array_equal(ir, i64[rows])
    np.testing.assert_array_equal(dr, d64[rows])
    # huge pages or not, the same numbers
    dh, ih = exact_knn(X, 80, strategy=strategy, huge_pages=True)  # type: ignore[arg-type]
    np.testing.assert_array_equal(ih, i64)
    np.testing.assert_array_equal(dh, d64)


def test_page_size_switch_is_restored() -> None:
    switch = _madvise_switch()
    if switch is None:
        pytest.skip("this numpy has no huge-page switch")
    before = switch(True)
    try:
        with _page_size(False):
            assert switch(False) is False  # off inside (and left off)
        assert switch(True) is True  # restored on exit
    finally:
        switch(before)


def test_geometry_of_float32_input_equals_that_of_its_float64_copy() -> None:
    X, labels = planted_clusters()
    params = GeometryParams(maxk=100)
    a = compute_geometry(X.astype(np.float32), {"subject": labels}, params)
    b = compute_geometry(X.astype(np.float64), {"subject": labels}, params)
    assert a.id_twonn == b.id_twonn and a.id_gride == b.id_gride
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.assignment_halo, b.assignment_halo)
    np.testing.assert_array_equal(a.log_density, b.log_density)
    assert a.ari == b.ari and a.overlap == b.overlap


def test_background_import_leaves_errors_to_the_main_thread() -> None:
    from replandscape.cli.metrics import _import_in_background

    thread = _import_in_background("replandscape_no_such_module")
    thread.join(timeout=30)
    assert not thread.is_alive()  # finished quietly
    with pytest.raises(ModuleNotFoundError):
        __import__("replandscape_no_such_module")
    import sys

    if "wave" in sys.modules:
        pytest.skip("wave is imported already")
    thread = _import_in_background("wave")  # a module nothing here imports
    thread.join(timeout=30)
    assert "wave" in sys.modules


def test_exact_ties_are_ordered_by_index_and_match_sklearn_sets() -> None:
    # a shuffled integer lattice: every distance is computed exactly, many are tied
    grid = np.stack(np.meshgrid(np.arange(15), np.arange(15)), axis=-1).reshape(-1, 2).astype(float)
    X = grid[np.random.default_rng(0).permutation(len(grid))]
    k = 20
    for strategy in ("float32", "float64"):
        dist, ind = exact_knn(X, k, strategy=strategy)  # type: ignore[arg-type]
        ref_dist, ref_ind = sklearn_brute(X, k)
        np.testing.assert_array_equal(dist, ref_dist)  # identical float64 values
        sq = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        for i in range(len(X)):
            expected = np.lexsort((np.arange(len(X)), sq[i]))[: k + 1]
            np.testing.assert_array_equal(ind[i], expected)  # ties by index, lower index wins
            # sklearn orders a tie group arbitrarily (heap + introsort), but holds the same
            # points in every group that lies wholly inside the first k + 1
            last = dist[i, -1]
            inside = dist[i] < last
            assert set(ind[i][inside]) == set(ref_ind[i][ref_dist[i] < last])


def test_duplicates_are_removed_first_and_otherwise_at_distance_zero() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(200, 16))
    X = np.vstack([base, base[[5, 7, 7]], -0.0 * base[:1] + base[:1]])  # 4 duplicate rows
    X = X[rng.permutation(len(X))]
    groups = duplicate_groups(X)
    Xu, kept, n_dup = deduplicate(X)
    assert n_dup == 4 and Xu.shape == (200, 16)
    assert np.all(np.diff(kept) > 0)
    assert len({tuple(r) for r in Xu}) == 200
    # labels follow the kept rows: the first occurrence of each distinct row
    for j, i in enumerate(kept):
        assert groups[i] == i and np.array_equal(Xu[j], X[i])
    # after removal the neighbours equal sklearn's
    dist, ind = exact_knn(Xu, 30)
    np.testing.assert_array_equal(ind, sklearn_brute(Xu, 30)[1])
    # with duplicates left in: the point itself first, its copies next at exactly 0
    dist, ind = exact_knn(X, 30)
    np.testing.assert_array_equal(ind[:, 0], np.arange(len(X)))
    for i in range(len(X)):
        copies = np.flatnonzero((groups == groups[i]) & (np.arange(len(X)) != i))
        np.testing.assert_array_equal(ind[i, 1 : 1 + copies.size], copies)
        assert np.all(dist[i, : 1 + copies.size] == 0.0)
        assert np.all(dist[i, 1 + copies.size :] > 0.0)


def test_exact_knn_rejects_bad_arguments() -> None:
    X = np.random.default_rng(0).normal(size=(50, 3))
    with pytest.raises(ValueError):
        exact_knn(X, 50)
    with pytest.raises(ValueError):
        exact_knn(X, 0)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError):
        exact_knn(bad, 5)
    with pytest.raises(ValueError):
        exact_knn(X, 5, device="tpu")  # type: ignore[arg-type]


def test_torch_backend_gives_the_same_neighbours() -> None:
    pytest.importorskip("torch")
    X, _ = planted_clusters(n_per=50, n_clusters=8, dim=64)
    ref = sklearn_brute(X, 60)[1]
    for strategy in ("float32", "float64"):
        _, ind = exact_knn(X, 60, device="torch", strategy=strategy, threads=1)  # type: ignore[arg-type]
        np.testing.assert_array_equal(ind, ref)


@pytest.mark.gpu
def test_cuda_backend_gives_the_same_neighbours() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    X, _ = planted_clusters(n_per=100, n_clusters=10, dim=256)
    _, ind = exact_knn(X, 100, device="cuda", strategy="float32")
    np.testing.assert_array_equal(ind, sklearn_brute(X, 100)[1])


# --------------------------------------------------------------------------------------------
# estimators against DADApy's default path


FIXTURES = {
    "two_gaussians": lambda: two_gaussians(),
    "cube5": lambda: (uniform_cube(), None),
    "planted": lambda: planted_clusters(),
}


@pytest.fixture(scope="module")
def computed() -> dict[str, tuple[np.ndarray, np.ndarray | None, GeometryResult, dict[str, Any]]]:
    params = GeometryParams(maxk=100)
    out = {}
    for name, make in FIXTURES.items():
        X, labels = make()
        lab = {} if labels is None else {"subject": labels}
        out[name] = (X, labels, compute_geometry(X, lab, params), dadapy_reference(X, params))
    return out


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fast_engine_equals_dadapy_default_path(computed: dict[str, Any], name: str) -> None:
    X, _, res, ref = computed[name]
    dist, ind = exact_knn(X, 100)
    np.testing.assert_array_equal(ind, ref["ind"])
    # scikit-learn's |x|^2 + |y|^2 - 2 x.y leaves the self-distance at about 1e-6, not 0
    assert np.all(dist[:, 0] == 0.0) and np.all(ref["dist"][:, 0] < 1e-5)
    np.testing.assert_allclose(dist[:, 1:], ref["dist"][:, 1:], rtol=1e-10)
    assert_close_rel(res.id_twonn, ref["id_twonn"])
    assert_close_rel(res.id_gride, ref["id_gride"])
    assert res.id == res.id_gride[4]
    assert res.id_gride_ranks == (1, 2, 4, 8, 16, 32)
    np.testing.assert_array_equal(res.assignment, ref["assignment"])
    assert res.n_peaks == ref["n_peaks"]
    assert res.core_fraction == ref["core_fraction"]
    np.testing.assert_array_equal(res.assignment_halo, ref["halo"])
    np.testing.assert_allclose(res.log_density, ref["log_den"], rtol=1e-9, atol=1e-12)
    assert res.peaks["centers"] == ref["centers"]
    assert res.peaks["sizes"] == np.bincount(ref["assignment"]).tolist()
    for i, j, value in res.peaks["saddles"]:
        assert value == pytest.approx(ref["log_den_bord"][i, j], rel=1e-9)
    np.testing.assert_array_equal(res.kept_rows, np.arange(len(X)))


def test_saddles_join_bordering_peaks_only() -> None:
    # three clusters in a row and one far away: saddles 0-1 and 1-2, none with the far one
    rng = np.random.default_rng(0)
    centres = [[0.0, 0.0], [4.0, 0.0], [8.0, 0.0], [30.0, 30.0]]
    X = np.vstack([rng.normal(size=(300, 2)) + c for c in centres])
    res = compute_geometry(X, {}, GeometryParams(maxk=100))
    assert res.n_peaks == 4
    truth = np.repeat(np.arange(4), 300)
    assert adjusted_rand_score(truth, res.assignment) > 0.9  # the near clusters overlap a little
    # peak p holds mostly points of centre order[p]
    order = [int(np.bincount(truth[res.assignment == p]).argmax()) for p in range(4)]
    pairs = {tuple(sorted((order[i], order[j]))) for i, j, _ in res.peaks["saddles"]}
    assert pairs == {(0, 1), (1, 2)}
    for i, j, value in res.peaks["saddles"]:
        assert value < min(res.peaks["log_density"][i], res.peaks["log_density"][j])
    assert sum(res.peaks["sizes"]) == len(X)
    assert res.log_density.shape == (len(X),) and np.isfinite(res.log_density).all()
    centre_density = res.log_density[res.peaks["centers"]]
    np.testing.assert_array_equal(centre_density, res.peaks["log_density"])


def test_engine_dadapy_gives_the_same_result(computed: dict[str, Any]) -> None:
    X, labels, fast, _ = computed["planted"]
    slow = compute_geometry(X, {"subject": labels}, GeometryParams(maxk=100, engine="dadapy"))
    assert_close_rel(slow.id_gride, fast.id_gride)
    assert_close_rel(slow.id_twonn, fast.id_twonn)
    np.testing.assert_array_equal(slow.assignment, fast.assignment)
    assert slow.ari == fast.ari and slow.overlap == fast.overlap


def test_known_answers(computed: dict[str, Any]) -> None:
    _, labels, res, _ = computed["two_gaussians"]
    assert 1.7 <= res.id_twonn <= 2.3
    assert res.n_peaks == 2
    assert res.ari["subject"] == pytest.approx(1.0)
    # a uniform 5-cube: ID about 5 (the boundary biases small samples slightly low)
    _, _, res, _ = computed["cube5"]
    assert abs(res.id_twonn - 5) / 5 < 0.12
    assert abs(res.id_gride[0] - 5) / 5 < 0.12
    assert res.ari == {} and res.overlap == {}
    # ten planted clusters in D = 256
    _, labels, res, _ = computed["planted"]
    assert res.n_peaks == 10
    assert res.ari["subject"] == pytest.approx(1.0)
    assert res.overlap["subject"] == pytest.approx(1.0)


def test_ari_and_overlap_are_computed_right(computed: dict[str, Any]) -> None:
    X, labels, res, _ = computed["planted"]
    # a coarser and a noisier labelling, so the values are not trivially 1
    coarse = labels // 2
    noisy = labels.copy()
    noisy[::7] = (noisy[::7] + 1) % 10
    got = compute_geometry(X, {"coarse": coarse, "noisy": noisy}, GeometryParams(maxk=100))
    assert got.ari["coarse"] == pytest.approx(adjusted_rand_score(coarse, res.assignment), abs=0)
    assert got.ari["noisy"] == pytest.approx(adjusted_rand_score(noisy, res.assignment), abs=0)
    assert got.ari["noisy"] < 1.0
    # labels may be names rather than codes
    named = compute_geometry(
        X, {"noisy": np.char.add("s", noisy.astype(str))}, GeometryParams(maxk=100)
    )
    assert named.ari["noisy"] == got.ari["noisy"] and named.overlap["noisy"] == got.overlap["noisy"]
    # overlap by hand: per class k = int(0.3 x class size) neighbours, inverse-frequency weights
    _, ind = exact_knn(X, 100)
    for name, lab in (("coarse", coarse), ("noisy", noisy)):
        classes, counts = np.unique(lab, return_counts=True)
        k_of = dict(zip(classes, np.maximum(1, (counts * 0.3).astype(int))))
        w_of = dict(zip(classes, 1.0 / counts))
        per_point = np.array(
            [np.mean(lab[ind[i, 1 : 1 + k_of[lab[i]]]] == lab[i]) for i in range(len(lab))]
        )
        weights = np.array([w_of[c] for c in lab])
        assert got.overlap[name] == pytest.approx(np.average(per_point, weights=weights), rel=1e-12)


def test_overlap_beyond_maxk_matches_dadapy(computed: dict[str, Any]) -> None:
    # half of a class of 300 is 150 neighbours, more than maxk = 100: the fast engine searches
    # further once, DADApy searches again by itself; both must agree
    X, labels = two_gaussians()
    noisy = labels.copy()
    noisy[::5] = 1 - noisy[::5]
    params = GeometryParams(maxk=100, overlap_fraction=0.5)
    fast = compute_geometry(X, {"noisy": noisy}, params)
    slow = compute_geometry(
        X, {"noisy": noisy}, GeometryParams(maxk=100, overlap_fraction=0.5, engine="dadapy")
    )
    assert 0.5 < fast.overlap["noisy"] < 1.0
    assert fast.overlap["noisy"] == pytest.approx(slow.overlap["noisy"], rel=1e-12)
    np.testing.assert_array_equal(fast.assignment, slow.assignment)
    assert fast.id_gride == pytest.approx(slow.id_gride, rel=1e-6)


def test_labels_follow_deduplicated_rows() -> None:
    X, labels = two_gaussians()
    X2 = np.vstack([X, X[:10]])
    labels2 = np.r_[labels, labels[:10]]
    res = compute_geometry(X2, {"subject": labels2}, GeometryParams(maxk=100))
    assert res.n_points == len(X) and res.n_duplicates == 10
    assert res.assignment.shape == (len(X),)
    assert res.ari["subject"] == pytest.approx(1.0)


def test_dendrogram_of_density_peaks() -> None:
    rng = np.random.default_rng(5)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [30.0, 0.0]])
    sizes = [250, 250, 200]
    X = np.vstack([c + rng.normal(size=(s, 2)) for c, s in zip(centers, sizes)])
    subject = np.repeat([0, 1, 2], sizes)
    subject[:60] = 2  # the first peak mixes two subjects
    res = compute_geometry(
        X,
        {"subject": subject},
        GeometryParams(maxk=100, compute_dendrogram=True),
        label_names={"subject": ["algebra", "biology", "chemistry"]},
    )
    dend = res.dendrogram
    assert dend is not None and res.n_peaks == 3
    assert len(dend["linkage"]) == 2 and all(len(row) == 4 for row in dend["linkage"])
    assert sorted(dend["peak_sizes"]) == sorted(np.bincount(res.assignment).tolist())
    assert sorted(dend["leaf_labels"]) == ["algebra, chemistry", "biology", "chemistry"]
    # the two close peaks merge first, at a lower height than the far one joins
    first, second = dend["linkage"]
    assert first[2] < second[2]
    json.dumps(res.to_json_dict())


def test_assignment_outside_range_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    original = dadapy.Data.compute_clustering_ADP

    def broken(self: Any, Z: float = 1.65, halo: bool = False, v2: bool = False) -> np.ndarray:
        out = original(self, Z=Z, halo=halo, v2=v2)
        out = out.copy()
        out[0] = self.N_clusters  # what DADApy issue 165 produces
        self.cluster_assignment = out
        return out

    monkeypatch.setattr(dadapy.Data, "compute_clustering_ADP", broken)
    X, labels = two_gaussians()
    with pytest.raises(RuntimeError, match="issue 165"):
        compute_geometry(X, {"subject": labels}, GeometryParams(maxk=100))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("identical", "identical"),
        ("too_few", "more than maxk"),
        ("too_few_after_dedup", "duplicates removed"),
        ("label_length", "one per row"),
        ("one_dim", r"\[N, D\]"),
        ("range_max", "range_max"),
    ],
)
def test_bad_input_raises_user_error(case: str, match: str) -> None:
    X, labels = two_gaussians()
    params = GeometryParams(maxk=100)
    lab: dict[str, np.ndarray] = {"subject": labels}
    if case == "nan":
        X[4, 0] = np.nan
    elif case == "inf":
        X[4, 1] = np.inf
    elif case == "identical":
        X = np.ones_like(X)
    elif case == "too_few":
        X, lab = X[:100], {"subject": labels[:100]}
    elif case == "too_few_after_dedup":
        X = np.vstack([X[:90]] * 3)
        lab = {"subject": np.zeros(len(X), dtype=int)}
        params = GeometryParams(maxk=100, overlap_fraction=0.1)
    elif case == "label_length":
        lab = {"subject": labels[:-1]}
    elif case == "one_dim":
        X = X[:, 0]
    elif case == "range_max":
        params = GeometryParams(maxk=100, range_max=200)
    with pytest.raises(UserError, match=match):
        compute_geometry(X, lab, params)


# --------------------------------------------------------------------------------------------
# command line


def test_cli_writes_json(tmp_path: Any) -> None:
    X, labels = two_gaussians()
    np.save(tmp_path / "X.npy", X.astype(np.float32))
    np.save(tmp_path / "subject.npy", labels)
    np.save(tmp_path / "answer.npy", np.arange(len(labels)) % 4)
    out = tmp_path / "out" / "m.json"
    rc = main(
        [
            "metrics",
            str(tmp_path / "X.npy"),
            "--labels",
            f"subject={tmp_path / 'subject.npy'}",
            "--labels",
            f"answer={tmp_path / 'answer.npy'}",
            "--maxk",
            "100",
            "--json",
            str(out),
            "--points",
            str(tmp_path / "points.npz"),
        ]
    )
    assert rc == 0
    got = json.loads(out.read_text())
    for key in (
        "n_points",
        "n_duplicates",
        "id_twonn",
        "id_gride",
        "id",
        "n_peaks",
        "core_fraction",
        "ari",
        "overlap",
    ):
        assert key in got
    assert got["n_points"] == len(X) and len(got["id_gride"]) == 6
    assert got["n_peaks"] == 2 and set(got["ari"]) == {"subject", "answer"}
    assert got["ari"]["subject"] == pytest.approx(1.0)
    assert math.isfinite(got["id"])
    assert len(got["peaks"]["sizes"]) == 2 and sum(got["peaks"]["sizes"]) == len(X)
    points = np.load(tmp_path / "points.npz")
    assert set(points.files) == {"kept_rows", "assignment", "assignment_halo", "log_density"}
    np.testing.assert_array_equal(points["kept_rows"], np.arange(len(X)))
    assert adjusted_rand_score(labels, points["assignment"]) == pytest.approx(1.0)
    assert np.mean(points["assignment_halo"] != -1) == pytest.approx(got["core_fraction"])


@pytest.mark.parametrize(
    "case",
    ["missing", "not_npy", "label_length", "too_few", "bad_label_spec", "no_gpu", "points_dir"],
)
def test_cli_bad_input_exits_1_with_one_line(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    X, labels = two_gaussians()
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "subject.npy", labels)
    argv = ["metrics", str(tmp_path / "X.npy"), "--maxk", "100"]
    if case == "missing":
        argv[1] = str(tmp_path / "nope.npy")
    elif case == "not_npy":
        (tmp_path / "bad.npy").write_text("not an array")
        argv[1] = str(tmp_path / "bad.npy")
    elif case == "label_length":
        np.save(tmp_path / "short.npy", labels[:-3])
        argv += ["--labels", f"subject={tmp_path / 'short.npy'}"]
    elif case == "too_few":
        argv[3] = "1000"
    elif case == "bad_label_spec":
        argv += ["--labels", "subject"]
    elif case == "no_gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        argv += ["--device", "cuda"]
    elif case == "points_dir":  # the --points path is a folder: nothing can be written there
        (tmp_path / "taken.npz").mkdir()
        argv += ["--points", str(tmp_path / "taken.npz")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("replandscape: error:")
    if case == "points_dir":
        assert "taken.npz" in err[0] and "per-point arrays" in err[0]
