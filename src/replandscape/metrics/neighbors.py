"""Exact Euclidean k-nearest neighbours, fast, in DADApy's layout.

DADApy's default path (``Data.compute_distances``) asks scikit-learn for a float64 brute-force
search: ``2 N^2 D`` float64 flops, which dominate the whole geometry analysis. This engine finds
the same neighbours with one of two strategies, both built on blocked matrix products of the
mean-shifted data (``|x|^2 + |y|^2 - 2 x.y``, well conditioned once the mean is removed):

``"float32"``: candidates, then exact re-ranking.
    1. Float32 products (only half of them when the ``N x N`` matrix fits in memory, by the
       symmetry of distances) give each row its ``k + 1 + margin`` smallest squared distances.
    2. The rows are grouped into blocks of nearby rows (a row and its nearest not yet grouped
       candidates); for each block the union of the candidates is gathered and the squared
       distances are recomputed by one float64 product; each row is then sorted by
       (distance, index).
    3. A row is accepted only when its exact ``k``-th distance lies below the smallest distance
       that any left-out point can have, given a bound on the float32 error (four times the
       largest error seen on all candidate pairs, never less than ``sqrt(D)`` float32
       roundings); a row that fails is searched again exhaustively in float64.

``"float64"``: one exhaustive float64 pass, halved by symmetry when the matrix fits in memory,
    then exact selection and ordering.

``"auto"`` (default) estimates both from the candidate sets of the rows nearest to a random
point: the float32 pass costs ``1 / r`` of the float64 one (``r``, the float32 over float64
throughput: about 2 on CPUs, about 1 on GPUs) and the re-ranking about ``4.5 u`` more, ``u``
being the fraction of the points a block of nearby rows needs (gathering them costs as much as
the products). Clustered data with neighbourhoods spread over the whole set (the planted
benchmark, ``u`` about 0.14) favour ``"float64"``; smooth, local neighbourhoods (``u`` below
about 0.11) favour ``"float32"``. Both give the same result.

On the CPU the work is spread over as many threads as the BLAS may use (``threads``, or
threadpoolctl's cap): each thread runs single-threaded products, selections and sorts on its own
blocks of rows, so the steps that a multithreaded BLAS would leave on one core (selecting the
``k`` smallest of each row, ordering them) use every core too.

Conventions are those of ``dadapy.Data(distances=(dist, ind))``: arrays ``[N, k + 1]``, column 0
the point itself at distance exactly 0, float64 Euclidean distances increasing along each row,
int64 indices. Equal distances are ordered by index, and at the ``k``-th rank the lower index
wins. Within a group of exactly equal distances scikit-learn's own order is an artefact of its
heap and introsort (its source notes that it does not break ties by index), so that is the only
place where the two can differ; distinct real-valued points almost never tie. Exact duplicate
rows are at distance exactly 0 from each other, the point itself first; remove them beforehand
with :func:`deduplicate`, as the method requires. (scikit-learn's own distances carry the
rounding of the unshifted formula: about 1e-6 instead of 0 for a point to itself.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from replandscape.allocator import retaining
from replandscape.metrics.blas import accumulator, chosen_library, product_nt

Device = Literal["cpu", "torch", "cuda", "auto"]
Strategy = Literal["auto", "float32", "float64"]

_U32 = float(np.finfo(np.float32).eps) / 2.0  # unit roundoff of float32
_ERROR_SAFETY = 4.0  # the bound is this many times the largest float32 error observed
_RERANK_ROWS = 128  # rows re-ranked together in float64 (their candidate union is gathered)
# Re-ranking costs about _RERANK_COST * u of the float64 strategy, u being the pilot's union
# fraction (measured at N = 14 000, D = 4096, two cores: pilot u = 0.144, re-ranking 0.65 of
# the float64 search; the pilot's block is tighter than the average block, whose union is 0.18).
_RERANK_COST = 4.5
_HASH_COLUMNS = 256  # columns hashed to find duplicate rows, in _HASH_RUNS runs
_HASH_RUNS = 4
# float32 products are summed over chunks of this many columns (a tighter error bound)
_CHUNK_K = 256
_PANEL_ROWS = 512  # rows of each product of the symmetric search (one panel)
_BAND_ROWS = 8  # rows whose cut-band points are multiplied together

# Large scratch arrays are kept between calls: first-touching fresh memory costs about a second
# per GB in some virtual machines (and a few tenths on bare metal), and an analysis calls the
# engine once per layer with the same N. release_workspace() hands the memory back. In a process
# that keeps freed memory anyway, the largest are ordinary arrays instead (see _scratch).
_WORKSPACE: dict[str, np.ndarray] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Scratch memory kept between calls under ``name``."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = _WORKSPACE.get(name)
    if buf is None or buf.size < nbytes:
        _WORKSPACE.pop(name, None)  # free the old one before allocating the new one
        buf = np.empty(nbytes, dtype=np.uint8)
        _WORKSPACE[name] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Scratch memory that is dropped as soon as the caller is done with it, in a process that
    keeps freed memory (:func:`allocator.retaining`): its pages, touched once, then serve the
    arrays allocated after it in the same call (the neighbour lists, the re-ranking's blocks),
    where kept scratch memory would make those touch fresh pages on a first call; and the next
    call finds them in the heap all the same. Elsewhere, kept scratch memory (:func:`_workspace`).
    """
    if retaining():
        return np.empty(shape, dtype=dtype)
    return _workspace(name, shape, dtype)


def release_workspace() -> None:
    """Free the scratch memory that :func:`exact_knn` keeps between calls."""
    _WORKSPACE.clear()


def _madvise_switch() -> Callable[[bool], bool] | None:
    """numpy's switch for asking the kernel for transparent huge pages on large arrays (private
    API, present since numpy 1.20; None where it is missing)."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(name, fromlist=["_set_madvise_hugepage"])
        except ImportError:
            continue
        switch = getattr(module, "_set_madvise_hugepage", None)
        if switch is not None:
            return switch  # type: ignore[no-any-return]
    return None


@contextlib.contextmanager
def _page_size(huge: bool) -> Iterator[None]:
    """Large arrays allocated inside get huge pages (numpy's default on Linux) or not.

    On the project's virtual machine, first-touching huge pages that the host has reclaimed
    costs about 3.6 s per GB, against 0.55 s per GB for small pages (512 MB: 1.84 s against
    0.28 s; huge pages freed a moment ago cost 0.3 s per GB): the engine's scratch memory
    (about 1 GB at N = 9181, D = 4096) made the first call of a fresh process seconds slower.
    """
    switch = _madvise_switch()
    if switch is None:
        yield
        return
    before = switch(huge)  # returns the previous setting
    try:
        yield
    finally:
        switch(before)


# --------------------------------------------------------------------------------------------
# duplicates


def _void_rows(X: np.ndarray) -> np.ndarray:
    """One opaque value per row, equal exactly when the rows are equal as numbers."""
    Xc = np.ascontiguousarray(X, dtype=np.float64) + 0.0  # + 0.0 turns -0.0 into 0.0
    return Xc.view(np.dtype((np.void, Xc.dtype.itemsize * Xc.shape[1]))).ravel()


def duplicate_groups(X: np.ndarray) -> np.ndarray:
    """Label the rows of ``X`` so that exactly identical rows share a label.

    The label of a row is the index of the first row identical to it, so ``labels == arange(N)``
    when there are no duplicates. Rows are first bucketed by an exact integer hash of the bit
    patterns of a few columns; only buckets with more than one row are compared in full.
    """
    X = np.asarray(X)
    N, D = X.shape
    labels = np.arange(N, dtype=np.int64)
    if N < 2:
        return labels
    # a few runs of contiguous columns spread over the row: a row's hashed values lie on a few
    # cache lines (256 scattered columns touched every cache line of X: 0.045 s at N = 9181,
    # D = 4096, against 0.01 s)
    runs = min(_HASH_RUNS, max(1, D // (_HASH_COLUMNS // _HASH_RUNS)))
    width = min(D // runs, _HASH_COLUMNS // _HASH_RUNS)
    firsts = np.linspace(0, D - width, runs).astype(np.int64)
    cols = np.unique((firsts[:, None] + np.arange(width)[None, :]).ravel())
    weights = np.random.default_rng(20240917).integers(1, 2**63, size=cols.size, dtype=np.uint64)
    weights |= np.uint64(1)
    hashes = np.empty(N, dtype=np.uint64)
    step = 1024  # rows at a time: the temporaries stay in cache and need no fresh memory
    for s in range(0, N, step):
        bits = (X[s : s + step, cols].astype(np.float64) + 0.0).view(np.uint64)
        with np.errstate(over="ignore"):
            hashes[s : s + step] = (bits * weights).sum(axis=1, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    ends = np.r_[starts[1:], N]
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        members = np.sort(order[s:e])
        _, first, inverse = np.unique(
            _void_rows(X[members]), return_index=True, return_inverse=True
        )
        labels[members] = members[first[inverse.ravel()]]
    return labels


def deduplicate(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Remove exact duplicate rows, keeping the first occurrence of each, in the original order.

    Args:
        X: ``[N, D]`` array.

    Returns:
        ``(X_unique, kept_index, n_duplicates)``: the kept rows (``X`` itself when none is
        removed), their indices in ``X`` (increasing, so labels follow as
        ``labels[kept_index]``) and how many rows were removed.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {X.shape}")
    labels = duplicate_groups(X)
    kept = np.flatnonzero(labels == np.arange(X.shape[0])).astype(np.int64)
    if kept.size == X.shape[0]:
        return X, kept, 0  # nothing to remove: no copy of a possibly large array
    return X[kept], kept, int(X.shape[0] - kept.size)


def _shift(X: np.ndarray, workers: int = 1) -> np.ndarray:
    """The float32-rounded column mean that the engine subtracts, in float64.

    Rows are cast to float64 block by block and summed in a fixed order, so the value depends
    only on the numbers in ``X``, not on its dtype: a float32 array and its float64 copy (the
    analysis's other ranks hold the copy) get the same shift, hence bit-identical distances. A
    float32 shift keeps ``x - shift`` exact in float64 for float32-valued data. The blocks' sums
    may come from ``workers`` threads: they are added in block order all the same.
    """
    N, D = X.shape
    step = max(1, (8 * 2**20) // (8 * D))
    sums = _run_parallel(
        lambda s: np.asarray(X[s : s + step], dtype=np.float64).sum(axis=0),
        range(0, N, step), workers,
    )
    total = np.zeros(D, dtype=np.float64)
    for part in sums:
        total += part
    return (total / N).astype(np.float32).astype(np.float64)


# --------------------------------------------------------------------------------------------
# ordering helpers


def _order_rows(keys: np.ndarray, cols: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` smallest ``keys`` of each row, ordered by (key, ``cols``)."""
    width = keys.shape[1]
    if m < width:
        part = np.argpartition(keys, m, axis=1)[:, : m + 1]  # one more, to see ties at rank m
        part = np.take_along_axis(
            part, np.argsort(np.take_along_axis(keys, part, axis=1), axis=1), axis=1
        )
    else:
        part = np.argsort(keys, axis=1)
    sorted_keys = np.take_along_axis(keys, part, axis=1)
    # argsort does not order equal keys by column, and a tie across rank m may hide a lower
    # column outside the partition (then the key at rank m repeats): redo those few rows
    tied = (sorted_keys[:, 1:] == sorted_keys[:, :-1]).any(axis=1)
    out = part[:, :m].copy()
    for r in np.flatnonzero(tied):
        out[r] = np.lexsort((cols[r], keys[r]))[:m]
    return out


def _select(
    keys: np.ndarray, n_keep: int, ordered: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_keep`` smallest entries of each row (in increasing order with ``ordered``) and the
    next value of each row (inf where the row has no more).

    A threshold from a strided sample of the columns keeps a small superset of the wanted
    entries (about 1.3 times as many), gathered through one flat index into a narrow block and
    partitioned there (sorted, with ``ordered``); rows where the sample guessed too low are done
    in full. This costs about half of an ``argpartition`` of the whole rows (a third, ordered,
    of what sorting them would).
    """
    n_rows, N = keys.shape
    target = n_keep + 1

    def first(block: np.ndarray) -> np.ndarray:
        """Column order of each row's ``target`` smallest (the last one the next value)."""
        if ordered or block.shape[1] <= n_keep:
            return np.argsort(block, axis=1)[:, :target]
        return np.argpartition(block, n_keep, axis=1)[:, :target]

    cand = np.empty((n_rows, n_keep), dtype=np.int64)
    cvals = np.empty((n_rows, n_keep), dtype=keys.dtype)
    nxt = np.full(n_rows, np.inf, dtype=keys.dtype)

    def keep(rows: Any, block: np.ndarray, cols: np.ndarray | None) -> None:
        order = first(block)
        picked = order[:, :n_keep]
        cand[rows] = picked if cols is None else np.take_along_axis(cols, picked, axis=1)
        cvals[rows] = np.take_along_axis(block, picked, axis=1)
        if order.shape[1] == target:
            nxt[rows] = np.take_along_axis(block, order[:, n_keep:target], axis=1)[:, 0]

    if (4 if ordered else 10) * target > N:  # a threshold would keep too much to save anything
        keep(slice(None), keys, None)
        return cand, cvals, nxt
    stride = max(1, target // (128 if ordered else 64))
    sample = keys[:, ::stride]
    expected = target / stride  # rank of the wanted boundary within the sample
    rank = min(sample.shape[1] - 1, int(math.ceil(1.1 * expected + 2.0 * math.sqrt(expected))) + 1)
    # a sort of the sample costs half of a partition (numpy sorts floats with SIMD kernels)
    threshold = np.sort(sample, axis=1)[:, rank]
    mask = keys <= threshold[:, None]
    counts = np.count_nonzero(mask, axis=1)
    bad = np.flatnonzero(counts < target)
    if bad.size:
        mask[bad] = False
        counts[bad] = 0
    good = np.flatnonzero(counts)
    if good.size and ordered and keys.dtype == np.float32 and _packs(n_rows, N):
        _keep_sorted(keys, mask, counts, good, n_keep, cand, cvals, nxt)
    elif good.size:
        flat = np.flatnonzero(mask)
        width = int(counts.max())
        # each kept entry's place in the padded block, row * width + its rank in the row: one
        # flat index, several times faster than a scatter by (row, slot) pairs
        row_start = np.arange(n_rows, dtype=np.int64)
        place = np.arange(flat.size, dtype=np.int64)
        place += np.repeat(row_start * width - (np.cumsum(counts) - counts), counts)
        padded = np.full(n_rows * width, np.inf, dtype=keys.dtype)
        padded_cols = np.zeros(n_rows * width, dtype=np.int64)
        padded[place] = keys.ravel()[flat]
        flat -= np.repeat(row_start * N, counts)  # now the column of each kept entry
        padded_cols[place] = flat
        keep(good, padded.reshape(n_rows, width)[good],
             padded_cols.reshape(n_rows, width)[good])
    if bad.size:
        keep(bad, keys[bad], None)
    return cand, cvals, nxt


def _bits(n: int) -> int:
    """Bits that hold 0 .. n - 1."""
    return max(1, int(n - 1).bit_length())


def _packs(n_rows: int, N: int) -> bool:
    """Whether :func:`_keep_sorted` can pack (row, float32 key, column) into 64 bits."""
    return _bits(n_rows) + 32 + _bits(N) <= 64


def _keep_sorted(
    keys: np.ndarray,
    mask: np.ndarray,
    counts: np.ndarray,
    good: np.ndarray,
    n_keep: int,
    cand: np.ndarray,
    cvals: np.ndarray,
    nxt: np.ndarray,
) -> None:
    """:func:`_select`'s ordered path for float32 keys, where rows and columns fit the integers
    (:func:`_packs`): each kept entry packed into one 64-bit integer, its row above its key's
    bits (mapped so that integer order is float order) above its column, and all sorted at once.
    One sort orders each row by (key, column); keys and columns are unpacked from the sorted
    integers, where sorting the keys and gathering both by the sort's order cost about 1.5
    times as much (0.88 against 0.58 CPU seconds for N = 9181 rows)."""
    n_rows, N = keys.shape
    flat = np.flatnonzero(mask)
    kept = keys.ravel()[flat]
    kept += 0.0  # -0.0 becomes 0.0: equal keys, one integer
    bits = kept.view(np.uint32)
    # to integer order: a non-negative float's sign bit set, a negative float's bits flipped
    flip = bits.view(np.int32) >> 31  # -1 where negative, else 0
    flip |= np.int32(-(2**31))
    bits ^= flip.view(np.uint32)
    row_start = np.arange(n_rows, dtype=np.int64)
    col_bits = _bits(N)
    # (row, key, column) in one integer each: one sort of them all orders every row
    flat -= np.repeat(row_start * N, counts)  # now the column of each kept entry
    packed = bits.astype(np.uint64)
    packed <<= np.uint64(col_bits)
    packed |= flat.view(np.uint64)
    packed |= np.repeat(row_start.view(np.uint64) << np.uint64(32 + col_bits), counts)
    packed.sort()
    first = (np.cumsum(counts) - counts)[good]
    block = packed[first[:, None] + np.arange(n_keep + 1)[None, :]]
    cols = np.bitwise_and(block[:, :n_keep], np.uint64((1 << col_bits) - 1)).view(np.int64)
    top = (block >> np.uint64(col_bits)).astype(np.uint32)  # the key's bits (the row's dropped)
    flip = ~(top.view(np.int32) >> 31)  # -1 where the sign bit is clear (a negative float)
    flip |= np.int32(-(2**31))
    vals = np.bitwise_xor(top, flip.view(np.uint32)).view(np.float32)
    if good.size == n_rows:
        cand[...], cvals[...], nxt[...] = cols, vals[:, :n_keep], vals[:, n_keep]
    else:
        cand[good], cvals[good], nxt[good] = cols, vals[:, :n_keep], vals[:, n_keep]


def _rank_blocks(cand: np.ndarray, reach: int, size: int) -> list[np.ndarray]:
    """Blocks of rows for the exact first ranks: a row not yet placed opens a block, which
    grows by the unplaced points among the ``reach`` nearest candidates of its members, layer
    by layer, up to ``size`` rows. A block thus stays within one neighbourhood, and the union of
    its rows' first ranks (what its one product covers) stays close to the block itself. Small
    blocks are not merged: a merged block's product would cover the union of unrelated
    neighbourhoods for every row."""

    def grow(seed: int, placed: np.ndarray) -> np.ndarray:
        members = [np.array([seed])]
        frontier = members[0]
        count = 1
        while frontier.size and count < size:
            near = np.unique(cand[frontier, 1 : reach + 1])
            new = near[~placed[near]][: size - count]
            placed[new] = True
            members.append(new)
            count += new.size
            frontier = new
        return np.concatenate(members)

    return _seeded_blocks(cand.shape[0], grow)


def _seeded_blocks(
    N: int, grow: Callable[[int, np.ndarray], np.ndarray]
) -> list[np.ndarray]:
    """Rows ``0 .. N - 1`` covered greedily: each row not yet placed seeds a block, which
    ``grow(seed, placed)`` returns (the seed among its members) after marking its members in
    ``placed``."""
    placed = np.zeros(N, dtype=bool)
    blocks: list[np.ndarray] = []
    for seed in range(N):
        if placed[seed]:
            continue
        placed[seed] = True
        blocks.append(grow(seed, placed))
    return blocks


def _product_summed(
    a: np.ndarray,
    b: np.ndarray,
    out: np.ndarray,
    chunk: int | None,
    scratch: np.ndarray | None,
    accumulate: Callable[..., np.ndarray] | None = None,
) -> None:
    """``out[...] = a @ b.T`` with the sum over columns cut into products of ``chunk`` columns,
    added in order in ``out``'s precision: each term of a dot product then meets at most
    ``chunk + ceil(D / chunk) - 1`` roundings, whatever order the BLAS sums each chunk in (see
    :func:`_float32_error_bound`). With ``accumulate`` (:func:`blas.accumulator`) each chunk's
    product is added into ``out`` by the BLAS call itself (``beta = 1``, checked to round as the
    product alone then one addition: the same values, without a pass over ``out`` per chunk);
    otherwise it goes to ``scratch`` (at least ``out``'s shape, rows contiguous) and is added."""
    D = a.shape[1]
    if chunk is None or chunk >= D or (scratch is None and accumulate is None):
        product_nt(a, b, out)
        return
    if accumulate is not None:
        for m in range(0, D, chunk):
            accumulate(a[:, m : m + chunk], b[:, m : m + chunk], out, beta=1.0 if m else 0.0)
        return
    assert scratch is not None
    product_nt(a[:, :chunk], b[:, :chunk], out)
    part = scratch[: out.shape[0], : out.shape[1]]
    for m in range(chunk, D, chunk):
        product_nt(a[:, m : m + chunk], b[:, m : m + chunk], part)
        out += part


def _neighbourhood_blocks(cand: np.ndarray, ckey: np.ndarray, size: int) -> list[np.ndarray]:
    """Group the rows into blocks of nearby rows, whose candidate sets overlap most.

    Greedy cover: a row not yet placed opens a block with itself and its nearest unplaced
    candidates (up to ``size`` rows, all within a small ball), so the union of the block's
    candidates stays close to one neighbourhood. Small leftover blocks are merged, which costs
    nothing in products and saves calls.
    """

    def grow(seed: int, placed: np.ndarray) -> np.ndarray:
        nearest = cand[seed][np.argsort(ckey[seed], kind="stable")]
        # the seed, just placed, is its own nearest candidate: it leads the block
        members = nearest[(~placed[nearest]) | (nearest == seed)][:size]
        placed[members] = True
        return members

    blocks = _seeded_blocks(cand.shape[0], grow)
    merged: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    n_pending = 0
    for block in blocks:
        if block.size >= size // 2:
            merged.append(block)
            continue
        pending.append(block)
        n_pending += block.size
        if n_pending >= size // 2:
            merged.append(np.concatenate(pending))
            pending, n_pending = [], 0
    if pending:
        merged.append(np.concatenate(pending))
    return merged


# --------------------------------------------------------------------------------------------
# back ends: where the matrix products run


class _Backend(Protocol):
    name: str
    float64_speed_ratio: float  # float32 over float64 matrix-product throughput
    symmetric: bool  # whether ``smallest`` can get every key from half the products

    def smallest(
        self,
        X: np.ndarray,
        sq: np.ndarray,
        n_keep: int,
        block_rows: int,
        symmetric: bool,
        workers: int = 1,
        chunk_k: int | None = None,
        ordered: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def gram(
        self,
        X: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray | None,
        buffer: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def limit_threads(self, threads: int | None) -> contextlib.AbstractContextManager[None]: ...


def _take_smallest(
    keys: np.ndarray, i0: int, n_keep: int, ordered: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows ``i0 ...`` of the key matrix: the point itself, the other smallest keys, and the
    next key of each row (the smallest key left out). ``ordered``: the kept keys sorted, the
    point itself first."""
    n_rows = keys.shape[0]
    rows = np.arange(n_rows)
    self_cols = np.arange(i0, i0 + n_rows)
    saved = keys[rows, self_cols].copy()
    keys[rows, self_cols] = -np.inf
    cand, cvals, nxt = _select(keys, n_keep, ordered)
    keys[rows, self_cols] = saved
    r, c = np.nonzero(cand == self_cols[:, None])
    cvals[r, c] = saved[r]
    return cand, cvals, nxt


def _symmetric_select(
    X: np.ndarray,
    panels_of: int,
    chunk: int,
    workers: int,
    chunk_k: int | None,
    accumulate: Callable[..., np.ndarray] | None,
    select: Callable[[np.ndarray, int], None],
    seconds: dict[str, float],
) -> None:
    """Every row's keys from half the products, each row block handed to ``select`` whole.

    The rows go in panels of ``panels_of``; a panel is multiplied by every row from its first
    on (one product, 5-10% faster than square blocks), into a buffer of full rows. What lies
    right of the panel's diagonal block is, transposed, the left part of the later panels'
    rows: it is stored (about half of the ``N x N`` products in all), and each panel, once
    every earlier panel has stored its part, completes its rows from them and selects. Storing
    the whole matrix instead first-touched 60% more fresh memory on a process's first call
    (322 MB against 206 MB at N = 9181: tenths of a second on a virtual machine whose host
    hands memory back). Panels are taken in order, so a panel waits only for panels already
    running (briefly: see the first panel's height); one that fails wakes the panels waiting on
    it, which then fail too.
    """
    N = X.shape[0]
    dtype = X.dtype.type
    # the first panel half as tall: with two workers, panels that start together wait for each
    # other (the later one finishes its product first); half a panel out of phase, they do not
    first = max(1, panels_of // 2)
    starts = [0, *range(first, N, panels_of)]
    ends = [*starts[1:], N]
    sizes = [(N - i1) * (i1 - i0) for i0, i1 in zip(starts, ends)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    stored_all = _scratch("lower", (int(offsets[-1]),), dtype)
    stored = [
        stored_all[offsets[a] : offsets[a + 1]].reshape(N - ends[a], ends[a] - starts[a])
        for a in range(len(starts))
    ]
    ready = [threading.Event() for _ in starts]
    failed: list[int] = []
    rows = _BufferPool("panel", (panels_of, N), dtype, workers)
    tiles = (
        _BufferPool("tile", (panels_of, N), dtype, workers)
        if chunk_k is not None and accumulate is None
        else None
    )
    spent = {"products": 0.0, "selection": 0.0, "waits": 0.0}
    lock = threading.Lock()

    def run(a: int) -> None:
        i0, i1 = starts[a], ends[a]
        t0 = time.perf_counter()
        with rows.take() as buf, contextlib.ExitStack() as stack:
            keys = buf[: i1 - i0]
            try:
                scratch = stack.enter_context(tiles.take()) if tiles is not None else None
                _product_summed(X[i0:i1], X[i0:], keys[:, i0:], chunk_k, scratch, accumulate)
                _copy_transposed(keys[:, i1:], stored[a])
            except BaseException:
                failed.append(a)
                raise
            finally:
                ready[a].set()
            t1 = time.perf_counter()
            for p in range(a):
                ready[p].wait()
                if failed:
                    raise RuntimeError(f"panel {failed[0]} of the key matrix failed")
                keys[:, starts[p] : ends[p]] = stored[p][i0 - ends[p] : i1 - ends[p]]
            t2 = time.perf_counter()
            for c0 in range(0, i1 - i0, chunk):
                select(keys[c0 : c0 + chunk], i0 + c0)
        t3 = time.perf_counter()
        with lock:
            spent["products"] += t1 - t0
            spent["waits"] += t2 - t1
            spent["selection"] += t3 - t2

    _run_parallel(run, range(len(starts)), workers)
    # thread seconds over the workers: the wall time each part would take alone
    seconds.update({name: value / max(1, workers) for name, value in spent.items()})


def _copy_transposed(src: np.ndarray, dst: np.ndarray, tile: int = 256) -> None:
    """``dst[...] = src.T``, tile by tile so that the transposition stays in cache (about 2.5
    times faster than one strided pass over a large block)."""
    rows, cols = src.shape
    for s in range(0, rows, tile):
        for t in range(0, cols, tile):
            np.copyto(dst[t : t + tile, s : s + tile], src[s : s + tile, t : t + tile].T)


def _blas_threads() -> int:
    """Threads the BLAS would use now (a threadpoolctl cap included)."""
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(1, max(counts, default=1))


def _run_parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(item) for item in items]`` on ``workers`` threads, each with a single BLAS thread.

    The work items are large numpy operations (matrix products, partitions, sorts, element-wise
    passes), which release the GIL, so threads run them on separate cores. Outside the matrix
    products this is what keeps every core busy: a multithreaded BLAS alone leaves the
    selection and sorting steps on one core. Items are taken in order as threads free up.

    The BLAS runs single-threaded even with one worker: a multithreaded BLAS may round a small
    product differently, and the result must not depend on how many threads computed it.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))


class _BufferPool:
    """One scratch array per concurrent worker, taken and given back around each work item."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: type, count: int) -> None:
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for w in range(count):
            self._free.put(_workspace(f"{name}{w}", shape, dtype))

    @contextlib.contextmanager
    def take(self) -> Iterator[np.ndarray]:
        buf = self._free.get()
        try:
            yield buf
        finally:
            self._free.put(buf)


class _NumpyBackend:
    """Matrix products on the CPU through the fastest BLAS loaded in the process
    (:mod:`replandscape.metrics.blas`), spread over threads; threads capped with threadpoolctl."""

    name = "numpy"
    seconds: dict[str, float]  # the last call's products and selection, when stored apart
    float64_speed_ratio = 2.0  # OpenBLAS on AVX-512 and AVX2 CPUs: 1.6-2.1 measured
    symmetric = True  # computes half of a stored distance matrix

    def smallest(
        self,
        X: np.ndarray,
        sq: np.ndarray,
        n_keep: int,
        block_rows: int,
        symmetric: bool,
        workers: int = 1,
        chunk_k: int | None = None,
        ordered: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row, the ``n_keep`` smallest keys ``|x_j|^2 - 2 x_i.x_j`` (the row's own
        ``|x_i|^2`` left out), in the precision of ``X``.

        The keys are formed as ``|x_j|^2 / 2 - x_i.x_j`` and doubled at the end: halving and
        doubling are exact, so the values are those of the direct formula, for one pass over
        the products instead of two. ``chunk_k``: the products are summed over chunks of that
        many columns (:func:`_product_summed`); ``ordered``: each row's kept keys sorted, the
        point itself first.
        """
        self.seconds = {}
        N = X.shape[0]
        dtype = X.dtype.type
        half_sq = (sq * 0.5).astype(dtype)[None, :]
        # fresh arrays rather than kept scratch memory: freed after the call, their pages serve
        # the estimators' own allocations that follow (faulting in pages the process never had
        # costs about 2 s per GB on some virtual machines; see replandscape.allocator)
        cand = np.empty((N, n_keep), dtype=np.int64)
        ckey = np.empty((N, n_keep), dtype=dtype)
        nxt = np.full(N, np.inf, dtype=X.dtype)
        starts = list(range(0, N, block_rows))
        # selection runs on chunks of rows small enough to stay in cache (256 rows: 0.9 s against
        # 1.1-1.25 s with 1024 at N = 14 000), enough of them to keep every worker busy
        chunk = max(16, min(256, -(-N // (4 * workers))))
        found = accumulator(dtype) if chunk_k is not None else None
        accumulate = found[1] if found is not None else None

        def select(keys: np.ndarray, i0: int) -> None:
            """``keys`` holds ``x_i.x_j`` for rows ``i0 ...``; turned into keys in place."""
            np.subtract(half_sq, keys, out=keys)
            i1 = i0 + keys.shape[0]
            if n_keep < N:
                cand[i0:i1], ckey[i0:i1], nxt[i0:i1] = _take_smallest(keys, i0, n_keep, ordered)
            else:
                cand[i0:i1] = np.arange(N)
                ckey[i0:i1] = keys

        if symmetric:
            _symmetric_select(
                X, panels_of=min(block_rows, _PANEL_ROWS), chunk=chunk, workers=workers,
                chunk_k=chunk_k, accumulate=accumulate, select=select, seconds=self.seconds,
            )
        else:
            buffers = _BufferPool("keys", (block_rows, N), dtype, workers)
            parts = (
                _BufferPool("part", (block_rows, block_rows), dtype, workers)
                if chunk_k is not None and accumulate is None
                else None
            )

            def block(i0: int) -> None:
                i1 = min(i0 + block_rows, N)
                with buffers.take() as buf, contextlib.ExitStack() as stack:
                    keys = buf[: i1 - i0]
                    if chunk_k is None:
                        product_nt(X[i0:i1], X, keys)
                    else:
                        scratch = stack.enter_context(parts.take()) if parts is not None else None
                        for j0 in starts:
                            j1 = min(j0 + block_rows, N)
                            _product_summed(
                                X[i0:i1], X[j0:j1], keys[:, j0:j1], chunk_k, scratch, accumulate
                            )
                    select(keys, i0)

            _run_parallel(block, starts, workers)
        ckey *= 2.0
        nxt *= 2.0
        return cand, ckey, nxt

    def gram(
        self,
        X: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray | None,
        buffer: np.ndarray | None = None,
    ) -> np.ndarray:
        """``X[rows] @ X[cols].T``; the gathered ``X[cols]`` goes into ``buffer`` when given
        (reused scratch memory instead of a fresh array per call)."""
        if cols is None:
            right = X
        elif buffer is None:
            right = X[cols]
        else:
            right = np.take(X, cols, axis=0, out=buffer[: cols.size])
        return product_nt(X[rows], right)

    @contextlib.contextmanager
    def limit_threads(self, threads: int | None) -> Iterator[None]:
        if threads is None:
            yield
        else:
            with threadpool_limits(limits=threads):
                yield


class _TorchBackend:
    """Matrix products and top-k through torch, on a CUDA device or on the CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"
        # GPUs run float64 about as fast as (non-TF32) float32
        self.float64_speed_ratio = 1.0 if self.device.type == "cuda" else 1.8
        self.symmetric = False
        self._on_device: tuple[int, Any] | None = None

    def _tensor(self, X: np.ndarray) -> Any:
        if self._on_device is None or self._on_device[0] != id(X):
            self._on_device = None  # free the previous copy first
            self._on_device = (id(X), self.torch.from_numpy(X).to(self.device))
        return self._on_device[1]

    def smallest(
        self,
        X: np.ndarray,
        sq: np.ndarray,
        n_keep: int,
        block_rows: int,
        symmetric: bool,
        workers: int = 1,
        chunk_k: int | None = None,
        ordered: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # torch spreads its products and top-k over its own threads; ``workers`` is unused; its
        # top-k is sorted already; ``chunk_k`` is not supported (the engine uses this back end
        # only for fully exact searches)
        torch = self.torch
        Xt = self._tensor(X)
        N = X.shape[0]
        sq_t = torch.from_numpy(sq).to(self.device)
        cand = np.empty((N, n_keep), dtype=np.int64)
        ckey = np.empty((N, n_keep), dtype=X.dtype)
        nxt = np.full(N, np.inf, dtype=X.dtype)
        take = min(n_keep + 1, N)
        for i0 in range(0, N, block_rows):
            i1 = min(i0 + block_rows, N)
            keys = torch.addmm(sq_t[None, :], Xt[i0:i1], Xt.T, beta=1.0, alpha=-2.0)
            rows = torch.arange(i1 - i0, device=self.device)
            self_cols = rows + i0
            saved = keys[rows, self_cols].clone()
            keys[rows, self_cols] = -torch.inf
            vals, idx = torch.topk(keys, take, dim=1, largest=False, sorted=True)
            vals = torch.where(idx == self_cols[:, None], saved[:, None].expand_as(vals), vals)
            cand[i0:i1] = idx[:, :n_keep].cpu().numpy()
            ckey[i0:i1] = vals[:, :n_keep].cpu().numpy()
            if take > n_keep:
                nxt[i0:i1] = vals[:, n_keep].cpu().numpy()
        return cand, ckey, nxt

    def gram(
        self,
        X: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray | None,
        buffer: np.ndarray | None = None,
    ) -> np.ndarray:
        Xt = self._tensor(X)
        left = Xt[self.torch.from_numpy(rows).to(self.device)]
        right = Xt if cols is None else Xt[self.torch.from_numpy(cols).to(self.device)]
        return (left @ right.T).cpu().numpy()

    @contextlib.contextmanager
    def limit_threads(self, threads: int | None) -> Iterator[None]:
        if threads is None:
            yield
            return
        before = self.torch.get_num_threads()
        self.torch.set_num_threads(threads)
        try:
            with threadpool_limits(limits=threads):
                yield
        finally:
            self.torch.set_num_threads(before)


def _make_backend(device: str) -> _Backend:
    if device == "cpu":
        return _NumpyBackend()
    if device not in ("torch", "cuda", "auto"):
        raise ValueError(f"device must be one of cpu, torch, cuda, auto; got {device!r}")
    if device == "auto" and "torch" not in sys.modules and not os.path.exists("/dev/nvidiactl"):
        return _NumpyBackend()  # no NVIDIA driver: not worth importing torch to ask
    try:
        import torch
    except ImportError as exc:
        if device == "auto":
            return _NumpyBackend()
        raise ValueError(f"device={device!r} needs torch, which is not installed") from exc
    if device == "auto":
        return _TorchBackend("cuda") if torch.cuda.is_available() else _NumpyBackend()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return _TorchBackend("cuda" if device == "cuda" else "cpu")


# --------------------------------------------------------------------------------------------
# the engine


def exact_knn(
    X: np.ndarray,
    k: int,
    *,
    block_rows: int = 1024,
    threads: int | None = None,
    device: Device = "cpu",
    strategy: Strategy = "auto",
    margin: int | None = None,
    memory_limit_gb: float = 2.0,
    keep_workspace: bool = True,
    huge_pages: bool = False,
    exact_ranks: int | None = None,
    exact_cuts: Sequence[int | np.ndarray] = (),
    info: MutableMapping[str, Any] | None = None,
    distinct: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row of ``X``, as an exact float64 search finds them
    (by default; ``exact_ranks`` asks for less).

    Args:
        X: ``[N, D]`` finite array of any float type; distances are those of its float64 cast.
        k: neighbours per point, ``1 <= k <= N - 1``.
        block_rows: rows per block of matrix products.
        threads: cap on BLAS, OpenMP and torch threads during the call (None: leave them).
        device: ``"cpu"`` (the fastest BLAS loaded, see :mod:`replandscape.metrics.blas`),
            ``"torch"`` (torch on the CPU), ``"cuda"`` (torch on the GPU) or ``"auto"`` (CUDA
            when torch sees one, else the CPU).
        strategy: ``"float32"`` (float32 candidates, float64 re-ranking), ``"float64"`` (one
            exhaustive float64 pass) or ``"auto"`` (the cheaper of the two, estimated from the
            candidate sets of a few hundred rows; see the module docstring).
        margin: float32 candidates kept per row beyond ``k + 1`` (default ``max(32, k // 20)``);
            a larger margin only makes the exhaustive fallback rarer.
        memory_limit_gb: when a full ``N x N`` matrix of keys fits in this much memory, each
            pair's product is computed once, by symmetry, and the half that later rows need is
            stored (about half that matrix, see :func:`_symmetric_select`); otherwise the
            threads' blocks of keys and re-ranking buffers are sized to stay within it.
        keep_workspace: keep the large scratch arrays (the stored keys or the threads' blocks
            of keys, the re-ranking buffers, the shifted points) for the next call, which skips
            the cost of first-touching fresh memory; at most twice ``memory_limit_gb`` plus
            ``12 N D`` bytes stay allocated until :func:`release_workspace`. In a process that
            keeps freed memory (:func:`replandscape.allocator.retain_freed_memory`) the largest
            are dropped instead as soon as they are used (their pages stay in the process).
            The engine is therefore not re-entrant across calling threads (it runs its own
            threads inside).
        huge_pages: let numpy ask for transparent huge pages for the large arrays allocated
            during the call (its default on Linux). Off by default: on virtual machines whose
            host reclaims freed memory, first-touching huge pages costs several times more than
            small pages (see :func:`_page_size`); results are the same either way.
        exact_ranks: if given (``R``), a weaker contract that costs about half: only the first
            ``R`` neighbours of each row are exact (indices, float64 distances and order, as
            without it); past rank ``R`` the columns hold the float32 search's nearest
            candidates in its order, with distances from float32 products (a few 1e-5 of the
            distance at most, never below the previous column); except that for each cut
            ``c`` of ``exact_cuts`` the first ``c`` columns hold exactly the set of the ``c``
            nearest points (their order past ``R`` still the float32 one). Guaranteed, not
            statistical: the float32 error has a worst-case bound
            (:func:`_float32_error_bound`), candidates within twice the bound of a boundary get
            float64 values, and rows whose candidate list is too short are searched in full.
            Used on the CPU back end when it pays (``strategy`` auto or float32, ``R < k``,
            ``N`` above twice the candidate count); otherwise the search is fully exact, which
            meets the contract too. ``info["strategy"]`` says which ran (``"float32-ranks"``).
        exact_cuts: with ``exact_ranks``: cuts ``c <= k``, each an int or one value per row
            (the overlap's ``int(fraction x class size)`` of the row's class).
        info: if given, filled with the back end, the strategy, the candidate count, the
            float32 error bound, the rows that needed the fallback and timings in seconds.
        distinct: the caller vouches that no two rows of ``X`` are equal (as
            :func:`deduplicate` leaves them), which saves looking for duplicates.

    Returns:
        ``(dist, ind)``, both ``[N, k + 1]``: float64 Euclidean distances and int64 indices,
        column 0 being the point itself at distance 0.

    Raises:
        ValueError: if ``X`` is not a finite non-empty 2-d array or ``k`` is out of range.
    """
    t_start = time.perf_counter()
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-d array, got shape {X.shape}")
    N, D = X.shape
    k = int(k)
    if not 1 <= k <= N - 1:
        raise ValueError(f"k must be between 1 and N - 1 = {N - 1}, got {k}")
    if strategy not in ("auto", "float32", "float64"):
        raise ValueError(f"strategy must be auto, float32 or float64; got {strategy!r}")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    cuts: list[np.ndarray] = []
    if exact_ranks is not None:
        exact_ranks = int(exact_ranks)
        if exact_ranks < 1:
            raise ValueError(f"exact_ranks must be at least 1, got {exact_ranks}")
        for cut in exact_cuts:
            arr = np.broadcast_to(np.asarray(cut, dtype=np.int64), (N,))
            if arr.size and (arr.min() < 1 or arr.max() > k):
                raise ValueError(f"exact_cuts must lie in [1, k = {k}]")
            cuts.append(np.ascontiguousarray(arr))
    with _page_size(huge_pages):
        return _exact_knn(
            X, k, block_rows, threads, device, strategy, margin, memory_limit_gb,
            keep_workspace, info, t_start, exact_ranks, cuts, distinct,
        )


def _check_squares(X: np.ndarray, sq64: np.ndarray) -> None:
    """Refuse points whose squared norms (after the shift) are not finite, saying why."""
    if not np.isfinite(sq64).all():
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values")
        raise ValueError("X has values too large to square in float64")


def _exact_knn(
    X: np.ndarray,
    k: int,
    block_rows: int,
    threads: int | None,
    device: Device,
    strategy: Strategy,
    margin: int | None,
    memory_limit_gb: float,
    keep_workspace: bool,
    info: MutableMapping[str, Any] | None,
    t_start: float,
    exact_ranks: int | None = None,
    cuts: Sequence[np.ndarray] = (),
    distinct: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_knn` once its arguments are checked."""
    N, D = X.shape
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if margin is None:
        margin = max(32, k // 20)
    n_cand = min(N, k + 1 + int(margin))
    backend = _make_backend(device)
    if (
        exact_ranks is not None
        and exact_ranks < k
        and strategy in ("auto", "float32")
        and backend.name == "numpy"
        and 2 * n_cand < N
    ):
        return _exact_knn_ranks(
            X, k, n_cand, exact_ranks, cuts, backend, block_rows, threads, memory_limit_gb,
            keep_workspace, info, t_start, distinct,
        )

    t0 = time.perf_counter()
    # Translation leaves distances unchanged and keeps |x|^2 + |y|^2 - 2 x.y well conditioned;
    # a float32 shift keeps x - shift exact for float32-valued data.
    shift = _shift(X)
    Xc = _workspace("points", (N, D), np.float64)
    np.subtract(X, shift, out=Xc, casting="unsafe")
    sq64 = np.einsum("ij,ij->i", Xc, Xc)
    _check_squares(X, sq64)
    groups = np.arange(N) if distinct else duplicate_groups(X)
    timings["prepare"] = time.perf_counter() - t0

    fits = memory_limit_gb * 2**30 >= N * N * 8
    dist_sq = np.empty((N, k + 1), dtype=np.float64)
    ind = np.empty((N, k + 1), dtype=np.int64)
    with backend.limit_threads(threads):
        workers = _blas_threads() if backend.name == "numpy" else 1
        extra["workers"] = workers
        if backend.name == "numpy":
            extra["blas"] = chosen_library(np.float64)
        if not fits:
            # without a stored matrix each thread holds [block_rows, N] keys: keep them in budget
            block_rows = max(16, min(block_rows, int(memory_limit_gb * 2**30) // (8 * N * workers)))
        if strategy == "auto":
            t0 = time.perf_counter()
            # costs in units of the float64 strategy with its matrix stored
            halves = backend.symmetric
            cost64 = 1.0 if fits and halves else 2.0
            fits32 = memory_limit_gb * 2**30 >= N * N * 4
            base32 = (1.0 if fits32 and halves else 2.0) / backend.float64_speed_ratio
            if 2 * n_cand >= N or base32 + _RERANK_COST * n_cand / N >= cost64:
                strategy = "float64"  # even a union of one candidate set would cost too much
            else:
                union = _pilot_union_fraction(Xc, sq64, n_cand)
                strategy = "float32" if base32 + _RERANK_COST * union < cost64 else "float64"
                extra["pilot_union_fraction"] = union
            timings["choose_strategy"] = time.perf_counter() - t0
        extra["strategy"] = strategy
        if strategy == "float64":
            t0 = time.perf_counter()
            _search_float64(
                backend,
                Xc,
                sq64,
                groups,
                k,
                block_rows,
                fits and backend.symmetric,
                dist_sq,
                ind,
                workers,
                timings,
            )
            timings["search_float64"] = time.perf_counter() - t0
        else:
            X32 = _workspace("points32", (N, D), np.float32)
            X32[...] = Xc
            _search_float32(
                backend,
                Xc,
                X32,
                sq64,
                groups,
                k,
                n_cand,
                block_rows,
                memory_limit_gb * 2**30 >= N * N * 4,
                memory_limit_gb * 2**30,
                dist_sq,
                ind,
                workers,
                timings,
                extra,
            )

    return _finish(dist_sq, ind, backend, keep_workspace, info, timings, extra, t_start)


def _finish(
    dist_sq: np.ndarray,
    ind: np.ndarray,
    backend: _Backend,
    keep_workspace: bool,
    info: MutableMapping[str, Any] | None,
    timings: dict[str, float],
    extra: dict[str, Any],
    t_start: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The end of every search: the workspace released (unless kept), distances from their
    squares in place, and the timings and settings reported into ``info``."""
    if not keep_workspace:
        release_workspace()
    dist = np.sqrt(dist_sq, out=dist_sq)
    if info is not None:
        timings["total"] = time.perf_counter() - t_start
        info.update(backend=backend.name, seconds=timings, **extra)
    return dist, ind


def _shift_rows(
    X: np.ndarray, shift: np.ndarray, sq64: np.ndarray, out: np.ndarray, step: int, start: int
) -> None:
    """Rows ``start .. start + step`` of ``X - shift``, formed in float64: their squared norms
    into ``sq64``, the rows into ``out`` in its precision."""
    rows = slice(start, start + step)
    block = np.subtract(X[rows], shift, dtype=np.float64)
    sq64[rows] = np.einsum("ij,ij->i", block, block)
    out[rows] = block


def _exact_knn_ranks(
    X: np.ndarray,
    k: int,
    n_cand: int,
    ranks: int,
    cuts: Sequence[np.ndarray],
    backend: _Backend,
    block_rows: int,
    threads: int | None,
    memory_limit_gb: float,
    keep_workspace: bool,
    info: MutableMapping[str, Any] | None,
    t_start: float,
    distinct: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_knn` with ``exact_ranks`` (see :func:`_search_partial`)."""
    N, D = X.shape
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {"strategy": "float32-ranks"}
    with backend.limit_threads(threads):
        workers = _blas_threads()
        extra.update(workers=workers, blas=chosen_library(np.float32))
        t0 = time.perf_counter()
        shift = _shift(X, workers)
        # the shifted points are needed only in float32 (and in float64 for a few rows at a time)
        X32 = _scratch("points32", (N, D), np.float32)
        sq64 = np.empty(N, dtype=np.float64)
        step = max(1, (4 * 2**20) // (8 * D))
        _run_parallel(
            functools.partial(_shift_rows, X, shift, sq64, X32, step), range(0, N, step), workers
        )
        _check_squares(X, sq64)
        groups = np.arange(N) if distinct else duplicate_groups(X)
        timings["prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cand, ckey, nxt = backend.smallest(
            X32, sq64.astype(np.float32), n_cand, block_rows,
            memory_limit_gb * 2**30 >= N * N * 4, workers, chunk_k=_CHUNK_K, ordered=True,
        )
        timings["candidates_float32"] = time.perf_counter() - t0
        timings.update(getattr(backend, "seconds", {}))
        del X32  # allocated after it, the neighbour lists reuse its pages (see _scratch)
        dist_sq = np.empty((N, k + 1), dtype=np.float64)
        ind = np.empty((N, k + 1), dtype=np.int64)
        failed = _search_partial(
            X, shift, cand, ckey, nxt, sq64, groups, k, ranks, cuts, dist_sq, ind, workers,
            timings, extra,
        )
        t0 = time.perf_counter()
        if failed.size:
            Xc = _workspace("points", (N, D), np.float64)
            np.subtract(X, shift, out=Xc, casting="unsafe")
            _exhaustive_rows(backend, Xc, failed, sq64, groups, k, dist_sq, ind, block_rows, workers)
        timings["fallback_float64"] = time.perf_counter() - t0
    return _finish(dist_sq, ind, backend, keep_workspace, info, timings, extra, t_start)


def exact_knn_rows(
    X: np.ndarray,
    rows: np.ndarray,
    k: int,
    *,
    block_rows: int = 1024,
    threads: int | None = None,
    device: Device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours of some rows of ``X`` only (against all of ``X``), exactly as
    :func:`exact_knn` orders them: ranks that each take a block of rows and join their blocks get
    the whole-array result, for sites too large for one rank.

    Returns:
        ``(dist, ind)`` of shape ``[len(rows), k + 1]``.
    """
    X = np.asarray(X)
    N, D = X.shape
    if not 1 <= k <= N - 1:
        raise ValueError(f"k must be between 1 and N - 1 = {N - 1}, got {k}")
    rows = np.asarray(rows, dtype=np.int64)
    with _page_size(False):  # as exact_knn does by default
        return _exact_knn_rows(X, rows, k, block_rows, threads, device)


def _exact_knn_rows(
    X: np.ndarray, rows: np.ndarray, k: int, block_rows: int, threads: int | None, device: Device
) -> tuple[np.ndarray, np.ndarray]:
    N = X.shape[0]
    # the same shift as exact_knn, so the float64 arithmetic is the same
    shift = _shift(X)
    Xc = np.subtract(X, shift, dtype=np.float64)
    sq64 = np.einsum("ij,ij->i", Xc, Xc)
    if not np.isfinite(sq64).all():
        raise ValueError("X contains NaN or infinite values")
    groups = duplicate_groups(X)
    backend = _make_backend(device)
    dist_sq = np.empty((N, k + 1), dtype=np.float64)
    ind = np.empty((N, k + 1), dtype=np.int64)
    with backend.limit_threads(threads):
        if rows.size:
            workers = _blas_threads() if backend.name == "numpy" else 1
            _exhaustive_rows(backend, Xc, rows, sq64, groups, k, dist_sq, ind, block_rows, workers)
    return np.sqrt(dist_sq[rows]), ind[rows]


def _pilot_union_fraction(Xc: np.ndarray, sq64: np.ndarray, n_cand: int) -> float:
    """Fraction of all points that re-ranking one block of nearby rows needs: the union of the
    candidate sets of the rows nearest to a random point."""
    N = Xc.shape[0]
    seed_row = int(np.random.default_rng(0).integers(N))
    keys = sq64 - 2.0 * (Xc @ Xc[seed_row])
    block = np.argsort(keys)[:_RERANK_ROWS]
    g = product_nt(Xc[block], Xc)
    g *= -2.0
    g += sq64[None, :]
    part = np.argpartition(g, n_cand - 1, axis=1)[:, :n_cand]
    return float(np.unique(part).size / N)


def _finish_rows(
    exact: np.ndarray,
    cols: np.ndarray,
    rows: np.ndarray,
    groups: np.ndarray,
    has_duplicates: bool,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Order exact squared distances of some rows: the point itself first, its duplicates at 0,
    then by (distance, index). ``cols`` and ``rows`` are original indices."""
    np.maximum(exact, 0.0, out=exact)
    if has_duplicates:
        exact[groups[cols] == groups[rows, None]] = 0.0
    exact[cols == rows[:, None]] = -1.0
    pick = _order_rows(exact, cols, k + 1)
    sel = np.take_along_axis(exact, pick, axis=1)
    sel[:, 0] = 0.0
    return sel, np.take_along_axis(cols, pick, axis=1)


def _row_chunks(N: int, workers: int, largest: int = 512) -> list[slice]:
    """Contiguous slices of ``range(N)``, several per worker."""
    step = max(16, min(largest, -(-N // (4 * workers))))
    return [slice(s, min(s + step, N)) for s in range(0, N, step)]


def _search_float64(
    backend: _Backend,
    Xc: np.ndarray,
    sq64: np.ndarray,
    groups: np.ndarray,
    k: int,
    block_rows: int,
    symmetric: bool,
    dist_sq: np.ndarray,
    ind: np.ndarray,
    workers: int,
    timings: dict[str, float],
) -> None:
    """One exhaustive float64 pass (symmetric when the matrix fits), then exact ordering."""
    N = Xc.shape[0]
    has_duplicates = bool((groups != np.arange(N)).any())
    keep = min(N, k + 1)
    t0 = time.perf_counter()
    cand, ckey, nxt = backend.smallest(Xc, sq64, keep, block_rows, symmetric, workers)
    timings["products_and_selection"] = time.perf_counter() - t0
    timings.update(getattr(backend, "seconds", {}))

    t0 = time.perf_counter()

    def finish(rows: slice) -> None:
        exact = sq64[rows, None] + ckey[rows]
        ids = np.arange(rows.start, rows.stop)
        dist_sq[rows], ind[rows] = _finish_rows(exact, cand[rows], ids, groups, has_duplicates, k)

    _run_parallel(finish, _row_chunks(N, workers), workers)
    # a left-out point whose distance equals the k-th one may have the lower index: redo those
    tie = np.flatnonzero(sq64 + nxt <= dist_sq[:, -1])
    if tie.size:
        _exhaustive_rows(backend, Xc, tie, sq64, groups, k, dist_sq, ind, block_rows, workers)
    timings["ordering"] = time.perf_counter() - t0


def _search_float32(
    backend: _Backend,
    Xc: np.ndarray,
    X32: np.ndarray,
    sq64: np.ndarray,
    groups: np.ndarray,
    k: int,
    n_cand: int,
    block_rows: int,
    symmetric: bool,
    memory_limit: float,
    dist_sq: np.ndarray,
    ind: np.ndarray,
    workers: int,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> None:
    """Float32 candidates, float64 re-ranking by blocks of nearby rows, certification."""
    N, D = Xc.shape
    has_duplicates = bool((groups != np.arange(N)).any())
    t0 = time.perf_counter()
    cand, ckey, nxt = backend.smallest(
        X32, sq64.astype(np.float32), n_cand, block_rows, symmetric, workers
    )
    timings["candidates_float32"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    blocks = _neighbourhood_blocks(cand, ckey, _RERANK_ROWS)
    timings["grouping"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    kth = np.empty(N, dtype=np.float64)
    # a block's union of candidates is at most all points; gathered into one buffer per worker
    widest = min(N, _RERANK_ROWS * n_cand)
    # each re-ranking thread holds one gather buffer (up to a copy of all points): as many
    # threads as the memory budget allows
    rerank_workers = max(1, min(workers, int(memory_limit // (widest * D * 8))))
    gathered = _BufferPool("gathered", (widest, D), np.float64, rerank_workers)

    def rerank(rows: np.ndarray) -> tuple[float, int]:
        rc = cand[rows]
        marker = np.zeros(N, dtype=bool)
        marker[rc.ravel()] = True
        union = np.flatnonzero(marker)
        slot = np.empty(N, dtype=np.int64)
        slot[union] = np.arange(union.size)
        with gathered.take() as buf:
            dots = np.take_along_axis(backend.gram(Xc, rows, union, buf), slot[rc], axis=1)
        exact = sq64[rows, None] + sq64[rc] - 2.0 * dots
        # the float32 error on these pairs, relative to the scale (|x|^2 + |y|^2) / 2
        scale = 0.5 * (sq64[rows, None] + sq64[rc])
        err = np.abs(sq64[rows, None] + ckey[rows] - exact)
        err[rc == rows[:, None]] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(scale > 0, err / scale, 0.0)
        sel, nb = _finish_rows(exact, rc, rows, groups, has_duplicates, k)
        dist_sq[rows] = sel
        ind[rows] = nb
        kth[rows] = sel[:, -1]
        return float(rel.max()), rows.size * union.size

    outcomes = _run_parallel(rerank, blocks, rerank_workers)
    eps_seen = max((e for e, _ in outcomes), default=0.0)
    pairs = sum(n for _, n in outcomes)
    timings["rerank_float64"] = time.perf_counter() - t0

    # Accept a row when no left-out point can come as close as its k-th neighbour: every
    # left-out point has a float32 key >= nxt, hence d^2 >= |x_i|^2 + nxt - E_i.
    t0 = time.perf_counter()
    eps_bound = max(_ERROR_SAFETY * eps_seen, math.sqrt(D) * _U32)
    lowest = sq64 + nxt.astype(np.float64) - eps_bound * 0.5 * (sq64 + sq64.max())
    failed = np.flatnonzero(~(kth < lowest))
    if failed.size:
        _exhaustive_rows(backend, Xc, failed, sq64, groups, k, dist_sq, ind, block_rows, workers)
    timings["fallback_float64"] = time.perf_counter() - t0
    extra.update(
        n_candidates=int(n_cand),
        error_bound=float(eps_bound),
        n_fallback_rows=int(failed.size),
        rerank_pairs_per_candidate=pairs / float(N * n_cand),
    )


def _float32_error_bound(sq64: np.ndarray, D: int, chunk: int | None) -> np.ndarray:
    """Per row ``i``, a bound on ``|a_ij - d2_ij|`` over every ``j``: ``a_ij`` the squared distance
    that the float32 keys give (``|x_i|^2 + key_ij``, see :meth:`_NumpyBackend.smallest`), ``d2_ij``
    the one an exact float64 search computes; ``x`` are the shifted points.

    Worst-case (not statistical) rounding analysis. Each dot product of the float32 points is a
    sum of ``D`` products that, summed over chunks of ``chunk`` columns (:func:`_product_summed`:
    each chunk summed in whatever order the BLAS takes, then added once to the running sum, by
    a second step or by the BLAS call itself where :func:`blas.accumulator` checked that it
    rounds so), meets at most ``h = chunk + ceil(D / chunk) - 1`` roundings,
    hence an error below ``gamma_h sum_k |x_ik x_jk| <= gamma_h |x_i| |x_j|`` (Cauchy-Schwarz),
    ``gamma_h = h u / (1 - h u)``, ``u = 2^-24``. Rounding the points to float32 adds
    ``(2u + u^2) |x_i| |x_j|``, rounding ``|x_j|^2 / 2`` and the key's subtraction ``u |x_j|^2``
    and ``u |key|``; the key is doubled. The float64 side (``|x|^2`` and the exact search's own
    products, ``D + 4`` roundings at ``2^-53``) is bounded by ``4 gamma64 (|x_i| + M)^2``, ``M``
    being the largest norm, which also stands for ``|x_j|``.
    """
    u = float(np.finfo(np.float32).eps) / 2.0
    u64 = float(np.finfo(np.float64).eps) / 2.0
    h = D if chunk is None or chunk >= D else chunk + -(-D // chunk) - 1
    if h * u >= 0.01:
        raise ValueError(f"dimension {D} too large for the float32 error bound")
    gamma = h * u / (1.0 - h * u)
    gamma64 = (D + 4) * u64 / (1.0 - (D + 4) * u64)
    norms = np.sqrt(np.maximum(sq64, 0.0))
    M = float(norms.max())
    bound = (
        2.0 * (gamma + 3.0 * u) * (1.0 + 4.0 * u) * norms * M
        + 2.0 * u * (1.0 + u) * (1.0 + gamma64) * M * M
        + 4.0 * gamma64 * (norms + M) ** 2
    )
    return bound * (1.0 + 1e-6)


def _shifted(X: np.ndarray, shift: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``X[idx] - shift`` in float64: the same numbers as the float64 search's shifted rows
    (cast, then shifted in place: faster than one pass of mixed types)."""
    rows = np.take(X, idx, axis=0).astype(np.float64, copy=False)  # a new array, never X
    rows -= shift
    return rows


def _search_partial(
    X: np.ndarray,
    shift: np.ndarray,
    cand: np.ndarray,
    ckey: np.ndarray,
    nxt: np.ndarray,
    sq64: np.ndarray,
    groups: np.ndarray,
    k: int,
    ranks: int,
    cuts: Sequence[np.ndarray],
    dist_sq: np.ndarray,
    ind: np.ndarray,
    workers: int,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> np.ndarray:
    """From the float32 candidates (``backend.smallest`` with ``chunk_k=_CHUNK_K, ordered=True``
    on the shifted points): exact float64 values and order for the first ``ranks`` neighbours;
    the exact set of the first ``c`` neighbours at each cut ``c`` (one per row in each array of
    ``cuts``); float32 values past ``ranks``. Returns the rows that the float32 candidates cannot
    settle (a candidate list too short for a cut's margin): the caller searches them in full.

    With ``E_i`` the error bound of row ``i`` (:func:`_float32_error_bound`) and ``a`` its
    float32 squared distances sorted increasingly (``a_0`` the point itself):

    * every point with float64 squared distance at most the ``r``-th one has ``a <= a_r + 2 E_i``
      (``r`` points have ``a <= a_r``, so the ``r``-th distance is at most ``a_r + E_i``); those
      candidates get float64 values, by one product per block of nearby rows over the union of
      their candidates, and are ordered by (distance, index);
    * at a cut ``c``, points with ``a < a_c - 2 E_i`` are closer than the ``c``-th float64
      distance (at most ``c - 1`` points have ``a < a_c``, so that distance is at least
      ``a_c - E_i``), points with ``a > a_c + 2 E_i`` farther; the few in between get float64
      values and the closest by (distance, index) fill the set;
    * a row whose smallest left-out float32 value is not above a margin's upper end is returned.
    """
    N, D = X.shape
    n_cand = cand.shape[1]
    has_duplicates = bool((groups != np.arange(N)).any())
    if not (cand[:, 0] == np.arange(N)).all():
        raise RuntimeError("float32 candidates: a row does not start with its own point")

    t0 = time.perf_counter()
    bound = _float32_error_bound(sq64, D, _CHUNK_K)
    left_out = sq64 + nxt.astype(np.float64)  # every left-out point has a >= this
    live = [c for c in cuts if (c > ranks).any()]
    band_r = np.empty(N, dtype=np.int64)  # candidates 1 .. band_r get exact values for the ranks
    lo = np.zeros((len(live), N), dtype=np.int64)
    hi = np.zeros((len(live), N), dtype=np.int64)
    unsafe = np.zeros(N, dtype=bool)

    def margins(rows: slice) -> None:
        a = sq64[rows, None] + ckey[rows, 1:]
        e2 = 2.0 * bound[rows]
        top = a[:, ranks - 1] + e2
        band_r[rows] = (a <= top[:, None]).sum(axis=1)
        bad = left_out[rows] <= top
        for c, cut in enumerate(live):
            kc = np.maximum(cut[rows], ranks)
            at = np.take_along_axis(a, (kc - 1)[:, None], axis=1)[:, 0]
            lo[c, rows] = 1 + (a < (at - e2)[:, None]).sum(axis=1)
            hi[c, rows] = (a <= (at + e2)[:, None]).sum(axis=1)
            bad |= left_out[rows] <= at + e2
        unsafe[rows] = bad

    _run_parallel(margins, _row_chunks(N, workers), workers)
    timings["margins"] = time.perf_counter() - t0

    # exact first ranks, by blocks of nearby rows sharing one product over their candidates
    t0 = time.perf_counter()
    exact_pos = np.empty((N, ranks + 1), dtype=np.int64)  # candidate positions, exact order
    exact_d2 = np.empty((N, ranks + 1), dtype=np.float64)
    blocks = _rank_blocks(cand, ranks, 2 * _RERANK_ROWS)
    pair_counts: list[int] = []

    def exact_ranks(rows: np.ndarray) -> int:
        width = int(band_r[rows].max()) + 1
        cols = cand[rows, :width]
        valid = np.arange(width)[None, :] <= band_r[rows, None]
        # the block's rows first (each row's band starts with itself), so that the product's
        # left side is a view of its right side rather than a gathered copy
        found = np.unique(cols[valid])
        mine = np.zeros(N, dtype=bool)
        mine[rows] = True
        union = np.concatenate([rows, found[~mine[found]]])
        slot = np.zeros(N, dtype=np.int64)  # columns outside the band read slot 0, then inf
        slot[union] = np.arange(union.size)
        right = _shifted(X, shift, union)
        dots = product_nt(right[: rows.size], right)
        dots = np.take_along_axis(dots, slot[cols], axis=1)
        exact = sq64[rows, None] + sq64[cols] - 2.0 * dots
        np.maximum(exact, 0.0, out=exact)
        if has_duplicates:
            exact[groups[cols] == groups[rows, None]] = 0.0
        exact[:, 0] = -1.0  # the point itself first
        exact[~valid] = np.inf
        pick = _order_rows(exact, cols, ranks + 1)
        exact_pos[rows] = pick
        sel = np.take_along_axis(exact, pick, axis=1)
        sel[:, 0] = 0.0
        exact_d2[rows] = sel
        return int(rows.size * union.size)

    pair_counts = _run_parallel(exact_ranks, blocks, workers)
    timings["exact_ranks"] = time.perf_counter() - t0

    # cut sets, then each row in its final order
    t0 = time.perf_counter()
    band_sizes: list[int] = []

    def assemble(rows: slice) -> int:
        n = rows.stop - rows.start
        ids = np.arange(rows.start, rows.stop)
        # the order key of each candidate: -1 itself, 0 the exact first ranks, c the smallest
        # cut whose set holds it, k + 1 the others; a stable sort keeps the float32 order within
        group: np.ndarray = np.full((n, n_cand), k + 1, dtype=np.int16 if k < 32000 else np.int64)
        group[:, 0] = -1
        np.put_along_axis(group, exact_pos[rows, 1:], 0, axis=1)
        n_band = 0
        for c, cut in enumerate(live):
            kc = cut[rows]
            first, last = lo[c, rows], hi[c, rows]
            use = (kc > ranks) & ~unsafe[rows]
            # sure members: positions 1 .. first - 1
            sure = np.arange(n_cand)[None, :] < np.where(use, first, 0)[:, None]
            sure[:, 0] = False
            group[sure] = np.minimum(group[sure], np.repeat(kc, sure.sum(axis=1)).astype(group.dtype))
            width = int((last - first + 1)[use].max(initial=0))
            if width == 0:
                continue
            pos = first[:, None] + np.arange(width)[None, :]
            valid = (pos <= last[:, None]) & use[:, None]
            pos = np.minimum(pos, n_cand - 1)
            r_loc, w_loc = np.nonzero(valid)
            cols = cand[rows][r_loc, pos[r_loc, w_loc]]
            d2 = np.full((n, width), np.inf)
            dots = np.empty(r_loc.size)
            # a few rows at a time: their band points gathered and shifted (float64, as the
            # exact search holds them), the rows themselves shifted (they are contiguous), one
            # product of the two (a few times more multiplications than the pairs need, at the
            # BLAS's speed: what costs is gathering the band points, each a random row of X),
            # the pairs read from it
            bounds = np.searchsorted(r_loc, np.arange(0, n + _BAND_ROWS, _BAND_ROWS))
            most = int(np.diff(bounds).max())
            right = np.empty((most, D), dtype=np.float64)
            left = np.empty((_BAND_ROWS, D), dtype=np.float64)
            for b0, b1 in zip(bounds[:-1], bounds[1:]):
                if b1 == b0:
                    continue
                m = int(b1 - b0)
                r0, r1 = int(r_loc[b0]), int(r_loc[b1 - 1]) + 1
                np.subtract(X[rows.start + r0 : rows.start + r1], shift, out=left[: r1 - r0])
                right[:m] = X[cols[b0:b1]]  # cast, then shift: faster than one mixed-type pass
                right[:m] -= shift
                block = product_nt(left[: r1 - r0], right[:m])
                dots[b0:b1] = block[r_loc[b0:b1] - r0, np.arange(m)]
            vals = sq64[ids[r_loc]] + sq64[cols] - 2.0 * dots
            np.maximum(vals, 0.0, out=vals)
            if has_duplicates:
                vals[groups[cols] == groups[ids[r_loc]]] = 0.0
            d2[r_loc, w_loc] = vals
            band_cols = np.take_along_axis(cand[rows], pos, axis=1)
            order = np.lexsort((band_cols, d2), axis=1)
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(width)[None, :].repeat(n, axis=0), axis=1)
            need = kc - (first - 1)
            chosen = valid & (rank < need[:, None])
            r_c, w_c = np.nonzero(chosen)
            p_c = pos[r_c, w_c]
            group[r_c, p_c] = np.minimum(group[r_c, p_c], kc[r_c].astype(group.dtype))
            n_band += int(valid.sum())
        # a stable sort by group; most rows are in order already (the float32 order misplaces
        # a point across rank R or a cut only near a tie): those are copied as they are
        # (values: |x_i|^2 + the float32 key, in float64, written straight into the output)
        ind[rows] = cand[rows, : k + 1]
        approx = dist_sq[rows]
        approx[...] = ckey[rows, : k + 1]
        approx += sq64[rows, None]
        moved = np.flatnonzero((group[:, 1:] < group[:, :-1]).any(axis=1))
        if moved.size:
            order = np.argsort(group[moved], axis=1, kind="stable")[:, : k + 1]
            at = rows.start + moved
            ind[at] = np.take_along_axis(cand[at], order, axis=1)
            approx[moved] = np.take_along_axis(ckey[at], order, axis=1)
            approx[moved] += sq64[at, None]
        # the exact first ranks in their exact order; float32 values after them, never below
        ind[rows, : ranks + 1] = np.take_along_axis(cand[rows], exact_pos[rows], axis=1)
        approx[:, : ranks + 1] = exact_d2[rows]
        np.maximum.accumulate(approx[:, ranks:], axis=1, out=approx[:, ranks:])
        return n_band

    band_sizes = _run_parallel(assemble, _row_chunks(N, workers), workers)
    timings["cut_sets"] = time.perf_counter() - t0
    failed = np.flatnonzero(unsafe)
    extra.update(
        n_candidates=int(n_cand),
        exact_ranks=int(ranks),
        error_bound_median=float(np.median(bound)),
        exact_rank_pairs_per_row=sum(pair_counts) / float(N),
        cut_band_pairs_per_row=sum(band_sizes) / float(N),
        n_fallback_rows=int(failed.size),
    )
    return failed


def _exhaustive_rows(
    backend: _Backend,
    Xc: np.ndarray,
    rows_all: np.ndarray,
    sq64: np.ndarray,
    groups: np.ndarray,
    k: int,
    dist_sq: np.ndarray,
    ind: np.ndarray,
    block_rows: int,
    workers: int = 1,
) -> None:
    """Plain float64 search of some rows against all points, with exact ties by index."""
    N = sq64.shape[0]
    has_duplicates = bool((groups != np.arange(N)).any())
    step = max(1, min(block_rows, (256 * 2**20) // (8 * N * workers)))

    def search(s: int) -> None:
        rows = rows_all[s : s + step]
        exact = sq64[rows, None] + sq64[None, :] - 2.0 * backend.gram(Xc, rows, None)
        sel, nb = _finish_rows(
            exact, np.broadcast_to(np.arange(N), exact.shape), rows, groups, has_duplicates, k
        )
        dist_sq[rows] = sel
        ind[rows] = nb

    _run_parallel(search, range(0, rows_all.size, step), workers)
