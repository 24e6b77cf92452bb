"""Geometry of one layer's representations: intrinsic dimension, density peaks, label agreement.

Every estimator is computed by DADApy, the reference implementation; this module only chooses
where the nearest neighbours come from (``engine``): DADApy's own float64 scikit-learn search
(``"dadapy"``) or :func:`replandscape.metrics.neighbors.exact_knn` (``"fast"``), which returns
the same neighbours and hands them to ``dadapy.Data(distances=(dist, ind))``.

Steps (docs/method.md §5): remove exact duplicate rows (the labels follow the kept rows; the
distances are those of the float64 cast), neighbours up to ``maxk``, TwoNN and Gride intrinsic
dimension, kNN density at the Gride ID of index ``id_scale_index``, Advanced Density Peaks once
without halo (peaks, assignment, ARI) and once with halo (core fraction), label neighbourhood
overlap, optionally the dendrogram of the density peaks.

References:
    E. Facco, M. d'Errico, A. Rodriguez, A. Laio. Estimating the intrinsic dimension of datasets
    by a minimal neighborhood information. Scientific Reports 7, 12140 (2017). [TwoNN]

    F. Denti, D. Doimo, A. Laio, A. Mira. The generalized ratios intrinsic dimension estimator.
    Scientific Reports 12, 20005 (2022). [Gride]

    M. d'Errico, E. Facco, A. Laio, A. Rodriguez. Automatic topography of high-dimensional data
    sets by non-parametric density peak clustering. Information Sciences 560, 476-492 (2021). [ADP]

    A. Glielmo, I. Macocco, D. Doimo, et al. DADApy: Distance-based analysis of data-manifolds in
    Python. Patterns 3, 100589 (2022). [the implementation]
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from threadpoolctl import threadpool_limits

from replandscape.errors import UserError
from replandscape.metrics.neighbors import deduplicate, exact_knn, exact_knn_rows

Engine = Literal["fast", "dadapy"]


@dataclass(frozen=True)
class GeometryParams:
    """Parameters of the geometry analysis; defaults are those of the reference method.

    Attributes:
        maxk: neighbours computed per point (the data must have more than ``maxk`` points).
        range_max: largest neighbour rank of the Gride scaling; scales are ranks 1, 2, 4, ...
            against their doubles, ``floor(log2(range_max))`` of them (6 for 100).
        id_scale_index: which Gride scale gives the ID used downstream (4: rank 16 vs 32,
            consistent with ``density_k`` = 16).
        density_k: neighbours of the kNN density estimator.
        Z: merging threshold of Advanced Density Peaks.
        overlap_fraction: per class, the overlap looks at ``int(fraction x class size)``
            neighbours (at least 1).
        dendrogram_min_size: peaks with more points than this enter the dendrogram.
        dendrogram_label_fraction: a leaf is labelled by every label whose count in the peak
            exceeds this fraction of the peak's most frequent label.
        dendrogram_labels: the label array naming the leaves (the first one when absent).
        engine: ``"fast"`` (our exact neighbour engine) or ``"dadapy"`` (DADApy's default
            scikit-learn search); the estimators are DADApy's either way.
        device: device of the fast engine (``"cpu"``, ``"torch"``, ``"cuda"``, or ``"auto"``:
            a CUDA GPU when torch sees one, else the CPU).
        threads: cap on BLAS/OpenMP threads (None leaves them as they are).
        compute_dendrogram: whether to build the dendrogram of the density peaks.
    """

    maxk: int = 1000
    range_max: int = 100
    id_scale_index: int = 4
    density_k: int = 16
    Z: float = 1.6
    overlap_fraction: float = 0.3
    dendrogram_min_size: int = 30
    dendrogram_label_fraction: float = 0.2
    dendrogram_labels: str = "subject"
    engine: Engine = "fast"
    device: str = "auto"
    threads: int | None = None
    compute_dendrogram: bool = False


@dataclass(frozen=True, eq=False)
class GeometryResult:
    """What :func:`compute_geometry` measured on one ``[N, D]`` array.

    Attributes:
        n_points: points analysed (after removing duplicates).
        n_duplicates: exact duplicate rows removed first.
        id_twonn: TwoNN intrinsic dimension (DADApy defaults: linear fit, 90% of the ratios).
        id_gride: Gride intrinsic dimensions, smallest scale first.
        id_gride_ranks: the neighbour rank ``n`` of each Gride scale (``n`` vs ``2n``).
        id: the Gride ID at ``id_scale_index``, used for the density.
        n_peaks: density peaks found by ADP without halo.
        core_fraction: share of points that are not halo (label != -1) in ADP with halo.
        assignment: ADP cluster of each analysed point, without halo (deduplicated order).
        peaks: the density peaks of ADP without halo: ``sizes`` (points per peak),
            ``centers`` (the analysed point at each peak), ``log_density`` (log-density at each
            centre) and ``saddles``, one ``[i, j, log_density]`` per pair of peaks ``i < j``
            that share a border (the saddle point's log-density; pairs without a border are
            left out).
        ari: adjusted Rand index between ``assignment`` and each label array.
        overlap: label neighbourhood overlap of each label array.
        dendrogram: None, or ``linkage`` (scipy's rows as lists), ``leaf_labels`` and
            ``peak_sizes`` of the peaks larger than ``dendrogram_min_size``.
        seconds: wall time of each step.
        kept_rows: the input row of each analysed point (duplicates removed).
        log_density: kNN log-density of each analysed point, at ``id`` and ``density_k``.
        assignment_halo: ADP cluster of each analysed point with halo (-1: halo).
    """

    n_points: int
    n_duplicates: int
    id_twonn: float
    id_gride: tuple[float, ...]
    id_gride_ranks: tuple[int, ...]
    id: float
    n_peaks: int
    core_fraction: float
    assignment: np.ndarray
    peaks: dict[str, Any]
    ari: dict[str, float]
    overlap: dict[str, float]
    dendrogram: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    kept_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    log_density: np.ndarray = field(default_factory=lambda: np.zeros(0))
    assignment_halo: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def point_arrays(self) -> dict[str, np.ndarray]:
        """The per-point arrays (one entry per analysed point), for ``numpy.savez``."""
        return {"kept_rows": np.asarray(self.kept_rows, dtype=np.int64),
                "assignment": np.asarray(self.assignment, dtype=np.int64),
                "assignment_halo": np.asarray(self.assignment_halo, dtype=np.int64),
                "log_density": np.asarray(self.log_density, dtype=np.float64)}

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of the summary (the per-point arrays are in
        :meth:`point_arrays`)."""
        out: dict[str, Any] = {
            "n_points": int(self.n_points),
            "n_duplicates": int(self.n_duplicates),
            "id_twonn": float(self.id_twonn),
            "id_gride": [float(v) for v in self.id_gride],
            "id_gride_ranks": [int(v) for v in self.id_gride_ranks],
            "id": float(self.id),
            "n_peaks": int(self.n_peaks),
            "core_fraction": float(self.core_fraction),
            "peaks": self.peaks,
            "ari": {k: float(v) for k, v in self.ari.items()},
            "overlap": {k: float(v) for k, v in self.overlap.items()},
            "dendrogram": self.dendrogram,
            "seconds": {k: float(v) for k, v in self.seconds.items()},
        }
        return out


def params_to_dict(params: GeometryParams) -> dict[str, Any]:
    """The parameters as a plain dict (for provenance next to results)."""
    return asdict(params)


# --------------------------------------------------------------------------------------------


def _check_params(params: GeometryParams) -> None:
    if params.maxk < 2:
        raise UserError(f"maxk must be at least 2, got {params.maxk}", key="maxk")
    if params.range_max < 2:
        raise UserError(f"range_max must be at least 2, got {params.range_max}", key="range_max")
    if params.range_max > params.maxk:
        # DADApy would silently shrink the Gride range to maxk
        raise UserError(
            f"range_max = {params.range_max} exceeds maxk = {params.maxk}",
            key="range_max",
            fix="lower range_max or raise maxk",
        )
    n_scales = int(math.log2(params.range_max))
    if not 0 <= params.id_scale_index < n_scales:
        raise UserError(
            f"id_scale_index = {params.id_scale_index} but range_max = {params.range_max} gives "
            f"{n_scales} Gride scales",
            key="id_scale_index",
        )
    if not 1 <= params.density_k <= params.maxk:
        raise UserError(f"density_k must be in [1, maxk], got {params.density_k}", key="density_k")
    if params.engine not in ("fast", "dadapy"):
        raise UserError(f"engine must be 'fast' or 'dadapy', got {params.engine!r}", key="engine")
    if not 0.0 < params.overlap_fraction <= 1.0:
        raise UserError("overlap_fraction must be in (0, 1]", key="overlap_fraction")
    if params.device not in ("cpu", "torch", "cuda", "auto"):
        raise UserError(
            f"device must be cpu, torch, cuda or auto, got {params.device!r}", key="device"
        )
    if params.engine == "fast" and params.device in ("torch", "cuda"):
        try:
            import torch
        except ImportError:
            raise UserError(
                f"device {params.device} needs torch, which is not installed",
                key="device",
                fix="use device auto or cpu",
            ) from None
        if params.device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                "device is cuda but torch sees no CUDA GPU",
                key="device",
                fix="use device auto (a GPU when there is one) or cpu",
            )


def _check_input(
    X: np.ndarray, labels: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise UserError(
            f"representations must be a non-empty [N, D] array, got shape {X.shape}", key="X"
        )
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise UserError(f"representations must be numeric, got dtype {X.dtype}", key="X")
    # Floats stay in their own precision: the neighbour engine computes in float64 block by
    # block, and a float64 copy of a whole site (300 MB at N = 9181, D = 4096) would only cost
    # its allocation, its first touch and its copy. Integers become float64.
    Xf = X if np.issubdtype(X.dtype, np.floating) else np.asarray(X, dtype=np.float64)
    # block by block: one pass in cache, no N x D mask to allocate
    step = max(1, 2**18 // Xf.shape[1])
    if not all(np.isfinite(Xf[s : s + step]).all() for s in range(0, Xf.shape[0], step)):
        bad = int((~np.isfinite(Xf).all(axis=1)).sum())
        raise UserError(
            f"{bad} rows contain NaN or infinite values", key="X", fix="drop or repair those rows"
        )
    checked: dict[str, np.ndarray] = {}
    for name, lab in labels.items():
        arr = np.asarray(lab)
        if arr.ndim != 1 or arr.shape[0] != Xf.shape[0]:
            raise UserError(
                f"label array has shape {arr.shape}, expected ({Xf.shape[0]},) (one per row)",
                key=f"labels.{name}",
            )
        checked[name] = arr
    return Xf, checked


def _check_assignment(assignment: np.ndarray, n_clusters: int, what: str) -> None:
    """Fail loudly on labels outside [-1, N_clusters) (DADApy issue 165)."""
    a = np.asarray(assignment)
    if a.size and (a.min() < -1 or a.max() >= n_clusters):
        raise RuntimeError(
            f"DADApy ADP ({what}) returned cluster labels in [{a.min()}, {a.max()}] with "
            f"N_clusters = {n_clusters}; labels must lie in [-1, N_clusters) (DADApy issue 165)"
        )


def _peaks(data: Any, Z: float) -> dict[str, Any]:
    """Sizes, centres, log-densities and saddles of the peaks of the last ADP run of ``data``.

    DADApy stores the saddle log-densities in an ``N_clusters x N_clusters`` matrix shifted by
    ``min(log_den - Z log_den_err) - 1``: pairs that share no border hold exactly that shift
    (zero before it), real saddles lie at least one above it, the diagonal one below.
    """
    log_den = np.asarray(data.log_den, dtype=np.float64)
    shift = float(np.min(log_den - Z * np.asarray(data.log_den_err, dtype=np.float64))) - 1.0
    bord = np.asarray(data.log_den_bord, dtype=np.float64)
    centers = [int(c) for c in data.cluster_centers]
    i, j = np.nonzero(np.triu(bord - shift > 0.5, k=1))
    return {"sizes": [len(c) for c in data.cluster_indices], "centers": centers,
            "log_density": [float(log_den[c]) for c in centers],
            "saddles": [[int(a), int(b), float(bord[a, b])] for a, b in zip(i, j)]}


def _codes(values: np.ndarray) -> np.ndarray:
    """Integer codes of arbitrary label values (DADApy's overlap casts labels to int)."""
    _, inverse = np.unique(values, return_inverse=True)
    return inverse.ravel().astype(np.int64)


def _dendrogram(
    cluster_indices: Sequence[Sequence[int]],
    centers: Sequence[int],
    log_den: np.ndarray,
    saddle: np.ndarray,
    leaf_values: np.ndarray | None,
    names: Sequence[str] | None,
    params: GeometryParams,
) -> dict[str, Any]:
    """Weighted-linkage dendrogram of the large density peaks (d'Errico et al. 2021).

    The dissimilarity of two peaks is the highest peak log-density minus the log-density of
    their saddle point.
    """
    from scipy.cluster.hierarchy import linkage

    sizes = np.array([len(c) for c in cluster_indices], dtype=np.int64)
    keep = np.flatnonzero(sizes > params.dendrogram_min_size)
    peaks = log_den[np.asarray(centers, dtype=np.int64)[keep]]
    sub = np.asarray(saddle, dtype=np.float64)[np.ix_(keep, keep)]
    leaf_labels: list[str] = []
    for p in keep:
        if leaf_values is None:
            leaf_labels.append(f"peak {int(p)}")
            continue
        counts = Counter(leaf_values[np.asarray(cluster_indices[p], dtype=np.int64)].tolist())
        top = max(counts.values())
        chosen = sorted(
            (v for v, c in counts.items() if c > params.dendrogram_label_fraction * top),
            key=lambda v: (-counts[v], str(v)),
        )
        leaf_labels.append(", ".join(_label_name(v, names) for v in chosen))
    link: list[list[float]] = []
    if keep.size >= 2:
        fmax = float(peaks.max())
        iu = np.triu_indices(keep.size, k=1)
        condensed = fmax - sub[iu]
        link = linkage(condensed, method="weighted").tolist()
    return {"linkage": link, "leaf_labels": leaf_labels, "peak_sizes": sizes[keep].tolist()}


def _label_name(value: Any, names: Sequence[str] | None) -> str:
    if names is not None and isinstance(value, (int, np.integer)) and 0 <= int(value) < len(names):
        return str(names[int(value)])
    return str(value)


# the DADApy releases whose reads exact_reads and _adp_rows_past follow (checked against their
# source); with any other, the fast engine makes its whole neighbour lists exact
ADP_REPLAY_VERSIONS = ("0.3.4",)


def _reads_known() -> bool:
    """Whether the installed DADApy is one whose reads this module follows."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dadapy") in ADP_REPLAY_VERSIONS
    except PackageNotFoundError:
        return False


def exact_reads(
    params: GeometryParams, n_points: int, codes: Mapping[str, np.ndarray]
) -> tuple[int, list[np.ndarray]]:
    """What DADApy's estimators read of the neighbour lists, as called by
    :func:`compute_geometry` (dadapy 0.3): ``(R, cuts)``.

    ``R``, the deepest rank whose distance or position is read: TwoNN reads ranks 1 and 2;
    Gride the ranks ``2^i``, ``i <= int(log(min(N, range_max), 2))``; the kNN density rank
    ``density_k``, which it sets as every point's ``kstar``; ADP the order of ranks
    ``1 .. kstar`` (centres, the first neighbour in another cluster) and, past them, walks
    along rows that :func:`_adp_rows_past` checks. ``cuts``, one per label array: the label
    overlap reads the set of the first ``max(1, int(class size x fraction))`` neighbours of
    each point, per its class.
    """
    max_step = int(math.log(min(n_points, params.range_max), 2))  # as DADApy computes it
    R = max(2, 2**max_step, params.density_k)
    cuts = []
    for c in codes.values():
        counts = np.bincount(c)
        per_class = np.maximum(1, (counts * params.overlap_fraction).astype(np.int64))
        cuts.append(per_class[c])
    return R, cuts


def _adp_rows_past(
    ind: np.ndarray, data: Any, Z: float, R: int, exact_row: np.ndarray
) -> np.ndarray | None:
    """Rows whose order past rank ``R`` DADApy's ADP (``compute_clustering_ADP``, Cython,
    dadapy 0.3) reads, among those not yet exact (``exact_row``); None when the check cannot
    tell (then every row must be exact).

    ADP reads, with ``g = log_den_c - log_den_err`` as it computes it: ranks ``1 .. kstar`` of
    every row (centres, and the first neighbour ``p2`` of ``p1`` in another preliminary
    cluster); in the preliminary assignment, the row of each non-centre point up to its first
    neighbour already assigned (a surviving centre or a point of higher ``g``), which can lie
    past ``kstar`` for removed centres; at the borders, the row of ``p2`` up to ``p1`` or the
    first point of ``p1``'s cluster. The walks that end within rank ``R`` read only exact
    ranks; the rows of the others are returned (the preliminary walks first, as the
    assignment that the border walks depend on follows from them). A walk that ends nowhere
    (DADApy's fallback through the removed centres) returns None.
    """
    N = ind.shape[0]
    kstar = np.asarray(data.kstar, dtype=np.int64)
    if kstar.min() != kstar.max() or int(kstar[0]) > R:
        return None
    kd = int(kstar[0])
    log_den = np.asarray(data.log_den)
    log_den_err = np.asarray(data.log_den_err)
    log_den_min = np.min(log_den - Z * log_den_err)
    g = (log_den - log_den_min + 1) - log_den_err  # as DADApy's compute_clustering_ADP
    nb = ind[:, 1 : kd + 1]
    center0 = ~(g[:, None] < g[nb]).any(axis=1)
    hits = center0[nb] & (g[:, None] > g[nb])
    center = center0.copy()
    center[nb[hits]] = False
    pos = np.empty(N, dtype=np.int64)
    pos[np.argsort(-g)] = np.arange(N)
    # preliminary assignment: each non-centre row up to its first assigned neighbour
    head = ind[:, 1 : R + 1]
    assigned = center[head] | (pos[head] < pos[:, None])
    found = assigned.any(axis=1)
    stop = np.where(found, assigned.argmax(axis=1) + 1, -1)
    stop[center] = 0
    past = np.flatnonzero((stop < 0) & ~exact_row)
    if past.size:
        return past
    for r in np.flatnonzero(stop < 0):  # exact rows: their whole row is readable
        row = ind[r, 1:]
        ok = center[row] | (pos[row] < pos[r])
        if not ok.any():
            return None
        stop[r] = int(ok.argmax()) + 1
    parent = ind[np.arange(N), stop]  # the point itself for centres
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    cluster = parent  # the centre each point joins: equal exactly when ADP's ids are equal
    # borders: p1 (not a centre) with a neighbour p2 of another cluster within kstar
    p1 = np.flatnonzero(~center)
    other = cluster[nb[p1]] != cluster[p1, None]
    p1 = p1[other.any(axis=1)]
    if not p1.size:
        return np.zeros(0, dtype=np.int64)
    p2 = nb[p1, other[other.any(axis=1)].argmax(axis=1)]
    walk = ind[p2, 1 : R + 1]
    ends = ((walk == p1[:, None]) | (cluster[walk] == cluster[p1, None])).any(axis=1)
    return np.unique(p2[~ends & ~exact_row[p2]])


def compute_geometry(
    X: np.ndarray,
    labels: Mapping[str, np.ndarray],
    params: GeometryParams,
    *,
    label_names: Mapping[str, Sequence[str]] | None = None,
    neighbours: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
    exact_neighbours: bool = False,
) -> GeometryResult:
    """All geometry metrics of one ``[N, D]`` array of representations.

    Args:
        X: representations, one row per prompt (any numeric dtype; analysed in float64).
        labels: label arrays of length N by name (for example ``subject`` and ``answer``);
            ARI and overlap are reported for each.
        params: the analysis parameters.
        label_names: optional names of integer label codes, by label name, used for the
            dendrogram's leaves.
        neighbours: optional ``(X_unique, k) -> (dist, ind)`` used instead of
            :func:`exact_knn` by the fast engine (the MPI layer passes a search split over ranks
            by row blocks); it must return what :func:`exact_knn` would.
        exact_neighbours: make the fast engine's whole neighbour lists exact. By default it
            makes exact only what DADApy's estimators read (:func:`exact_reads`: the first
            ``R`` ranks, the overlap's per-class sets; ADP's walks past rank ``R`` checked by
            :func:`_adp_rows_past`, and their rows searched exactly): the results are the same,
            the search about half as costly (docs/method.md §5).

    Returns:
        The :class:`GeometryResult`.

    Raises:
        UserError: non-finite or non-numeric values, all rows identical, no more than ``maxk``
            distinct rows, label arrays of the wrong length, inconsistent parameters.
        RuntimeError: DADApy returned cluster labels outside ``[-1, N_clusters)``.
    """
    t_total = time.perf_counter()
    seconds: dict[str, float] = {}
    _check_params(params)
    Xf, raw_labels = _check_input(X, labels)

    t0 = time.perf_counter()
    Xu, kept, n_duplicates = deduplicate(Xf)
    kept_labels = {name: lab[kept] for name, lab in raw_labels.items()}
    N = Xu.shape[0]
    seconds["deduplicate"] = time.perf_counter() - t0
    if N == 1:
        raise UserError(f"all {Xf.shape[0]} rows are identical", key="X")
    if params.maxk >= N:
        raise UserError(
            f"{N} distinct points (of {Xf.shape[0]}, {n_duplicates} duplicates removed) but the "
            f"analysis needs more than maxk = {params.maxk}",
            key="maxk",
            fix="use more points or a smaller maxk",
        )
    codes = {name: _codes(lab) for name, lab in kept_labels.items()}
    # the overlap looks at int(fraction x class size) neighbours, which may exceed maxk
    k_overlap = max(
        (max(1, int(np.bincount(c).max() * params.overlap_fraction)) for c in codes.values()),
        default=1,
    )

    limits = threadpool_limits(limits=params.threads) if params.threads is not None else None
    try:
        t0 = time.perf_counter()
        if params.engine == "fast":
            # one search serves both: a prefix of a (distance, index)-sorted list is the shorter list
            k_search = max(params.maxk, k_overlap)
            R, cuts = exact_reads(params, N, codes)

            def exact_search() -> tuple[np.ndarray, np.ndarray]:
                """Every neighbour list exact (Xu has no duplicate rows)."""
                return exact_knn(
                    Xu, k_search, threads=params.threads, device=params.device,  # type: ignore[arg-type]
                    distinct=True,
                )

            partial = (neighbours is None and not exact_neighbours and k_search > R
                       and _reads_known())
            if neighbours is not None:
                dist, ind = neighbours(Xu, k_search)
            elif partial:
                search_info: dict[str, Any] = {}
                dist, ind = exact_knn(
                    Xu, k_search, threads=params.threads, device=params.device,  # type: ignore[arg-type]
                    exact_ranks=R, exact_cuts=[np.minimum(c, k_search) for c in cuts],
                    info=search_info, distinct=True,
                )
                partial = search_info.get("strategy") == "float32-ranks"
            else:
                dist, ind = exact_search()
            # imported only now: importing dadapy takes seconds (it loads jax), which a caller
            # may have started in another thread while the search ran (``replandscape metrics``)
            from dadapy import Data

            m = params.maxk + 1
            exact_row = np.zeros(N, dtype=bool)
            while partial:
                # ADP's walks past the exact ranks: their rows made exact, until none is left
                # (the density ADP starts from reads only exact ranks)
                scratch = Data(distances=(dist[:, :m], ind[:, :m]), maxk=params.maxk, verbose=False)
                ids_, _, _ = scratch.return_id_scaling_gride(range_max=params.range_max)
                scratch.set_id(float(ids_[params.id_scale_index]))
                scratch.compute_density_kNN(k=params.density_k)
                rows = _adp_rows_past(ind[:, :m], scratch, params.Z, R, exact_row)
                if rows is None:  # not decidable: every row exact
                    dist, ind = exact_search()
                    break
                if not rows.size:
                    break
                d_rows, i_rows = exact_knn_rows(
                    Xu, rows, k_search, threads=params.threads, device=params.device  # type: ignore[arg-type]
                )
                dist[rows], ind[rows] = d_rows, i_rows
                exact_row[rows] = True
            data = Data(
                distances=(np.ascontiguousarray(dist[:, :m]), np.ascontiguousarray(ind[:, :m])),
                maxk=params.maxk,
                verbose=False,
            )
            overlap_data = (
                data
                if k_search == params.maxk
                else Data(distances=(dist, ind), maxk=k_search, verbose=False)
            )
        else:
            from dadapy import Data

            data = Data(coordinates=np.asarray(Xu, dtype=np.float64), maxk=params.maxk, verbose=False)
            data.compute_distances(maxk=params.maxk)
            overlap_data = data  # DADApy searches again itself when the overlap needs more
        seconds["neighbours"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        id_twonn = float(data.compute_id_2NN()[0])
        # range_max <= maxk < N was checked, so DADApy uses all requested scales
        ids, _, _ = data.return_id_scaling_gride(range_max=params.range_max)
        id_gride = tuple(float(v) for v in ids)
        ranks = tuple(2**i for i in range(len(id_gride)))
        chosen_id = id_gride[params.id_scale_index]
        seconds["intrinsic_dimension"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        data.set_id(chosen_id)
        data.compute_density_kNN(k=params.density_k)
        seconds["density"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        assignment = np.array(data.compute_clustering_ADP(Z=params.Z, halo=False), dtype=np.int64)
        n_peaks = int(data.N_clusters)
        _check_assignment(assignment, n_peaks, "without halo")
        peaks = _peaks(data, params.Z)
        # what the dendrogram needs beyond ``peaks``; the halo run below replaces DADApy's state
        peak_state = (
            [list(c) for c in data.cluster_indices],
            np.array(data.log_den_bord, dtype=np.float64),
        )
        with_halo = np.array(data.compute_clustering_ADP(Z=params.Z, halo=True), dtype=np.int64)
        _check_assignment(with_halo, int(data.N_clusters), "with halo")
        core_fraction = float(np.mean(with_halo != -1))
        seconds["clustering"] = time.perf_counter() - t0

        from sklearn.metrics import adjusted_rand_score

        t0 = time.perf_counter()
        ari = {
            name: float(adjusted_rand_score(lab, assignment)) for name, lab in kept_labels.items()
        }
        seconds["ari"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        overlap = {
            name: float(
                overlap_data.return_label_overlap(c, class_fraction=params.overlap_fraction)
            )
            for name, c in codes.items()
        }
        seconds["overlap"] = time.perf_counter() - t0

        dendrogram = None
        if params.compute_dendrogram:
            t0 = time.perf_counter()
            key = (
                params.dendrogram_labels
                if params.dendrogram_labels in kept_labels
                else next(iter(kept_labels), None)
            )
            names = label_names.get(key) if (label_names is not None and key is not None) else None
            dendrogram = _dendrogram(
                peak_state[0],
                peaks["centers"],
                np.asarray(data.log_den),
                peak_state[1],
                kept_labels[key] if key is not None else None,
                names,
                params,
            )
            seconds["dendrogram"] = time.perf_counter() - t0
    finally:
        if limits is not None:
            limits.restore_original_limits()

    seconds["total"] = time.perf_counter() - t_total
    return GeometryResult(
        n_points=N,
        n_duplicates=n_duplicates,
        id_twonn=id_twonn,
        id_gride=id_gride,
        id_gride_ranks=ranks,
        id=chosen_id,
        n_peaks=n_peaks,
        core_fraction=core_fraction,
        assignment=assignment,
        peaks=peaks,
        ari=ari,
        overlap=overlap,
        dendrogram=dendrogram,
        seconds=seconds,
        kept_rows=np.asarray(kept, dtype=np.int64),
        log_density=np.array(data.log_den, dtype=np.float64),
        assignment_halo=with_halo,
    )
