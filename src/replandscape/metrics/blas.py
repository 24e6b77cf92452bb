"""The fastest matrix product ``a @ b.T`` among the BLAS libraries loaded in this process.

A Python environment often holds more than one BLAS: numpy's and scipy's wheels each bundle an
OpenBLAS, of different releases. An older OpenBLAS may not recognise a newer CPU and fall back to
generic kernels: on the project's machine (an AVX-512 Xeon) numpy 1.26's OpenBLAS 0.3.23 runs as
"Prescott" at a third of the speed of scipy's OpenBLAS 0.3.30 ("SkylakeX"), which scikit-learn,
and so DADApy's default neighbour search, already uses. The neighbour engine's cost is its
matrix products, so it takes them from whichever library is fastest here.

Candidates are numpy's ``matmul`` and every loaded OpenBLAS whose ``cblas_?gemm`` can be found
(``cblas_dgemm``, ``scipy_cblas_dgemm``, with the ``64_`` suffix of 64-bit-integer builds). A
candidate is called through ctypes, which releases the GIL for the call, so worker threads run
products side by side, and writes straight into a strided block of a larger array. Each is
checked against ``matmul`` and timed once per process and dtype, single-threaded as the engine
calls it; the fastest is kept.

:func:`accumulator` gives ``out += a @ b.T`` in one call (``beta = 1``), with no pass of its own
over ``out``, from a library checked to round it as the product alone and then one addition
into ``out`` would (which OpenBLAS's kernels do: a panel of the sum in registers, then one
fused multiply-add into ``out``).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_PREFIXES = ("", "scipy_")
_SUFFIXES = ("", "64_")

Product = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def _numpy_product(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        return a @ b.T
    return np.matmul(a, b.T, out=out)


def _rows_contiguous(x: np.ndarray) -> bool:
    return x.ndim == 2 and (x.shape[1] <= 1 or x.strides[1] == x.itemsize) and (
        x.strides[0] % x.itemsize == 0 and x.strides[0] >= x.shape[1] * x.itemsize
    )


class _Cblas:
    """``out = a @ b.T`` through one library's ``cblas_?gemm`` (row-major; leading dimensions
    from the arrays' strides)."""

    def __init__(self, fn: Any, int_type: Any, dtype: type) -> None:
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        real = ctypes.c_double if self.dtype == np.float64 else ctypes.c_float
        fn.restype = None
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, int_type, int_type, int_type,
                       real, ctypes.c_void_p, int_type, ctypes.c_void_p, int_type, real,
                       ctypes.c_void_p, int_type]
        self._fn = fn

    def __call__(
        self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, beta: float = 0.0
    ) -> np.ndarray:
        """``out = a @ b.T + beta * out`` (``beta`` 0 or 1; ``out`` required with 1)."""
        m, k = a.shape
        n = b.shape[0]
        if out is None:
            out = np.empty((m, n), dtype=self.dtype)
        usable = (a.dtype == b.dtype == out.dtype == self.dtype and b.shape[1] == k
                  and out.shape == (m, n) and all(map(_rows_contiguous, (a, b, out))))
        if not usable:
            if beta:
                out += _numpy_product(a, b)
                return out
            return _numpy_product(a, b, out)
        if m == 0 or n == 0:
            return out
        if k == 0:
            if not beta:
                out[...] = 0
            return out
        size = self.dtype.itemsize
        self._fn(_ROW_MAJOR, _NO_TRANS, _TRANS, m, n, k, 1.0, a.ctypes.data,
                 max(1, a.strides[0] // size), b.ctypes.data, max(1, b.strides[0] // size), beta,
                 out.ctypes.data, max(1, out.strides[0] // size))
        return out


def _openblas_candidates(dtype: type) -> list[tuple[str, Product]]:
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS, so that it is found below)

    found: list[tuple[str, Product]] = []
    letter = "d" if np.dtype(dtype) == np.float64 else "s"
    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas":
            continue
        try:
            handle = ctypes.CDLL(lib["filepath"])
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                fn = getattr(handle, f"{prefix}cblas_{letter}gemm{suffix}", None)
                config = getattr(handle, f"{prefix}openblas_get_config{suffix}", None)
                if fn is None or config is None:
                    continue
                config.restype = ctypes.c_char_p
                wide = b"USE64BITINT" in (config() or b"")
                label = (f"openblas {lib.get('version')} {lib.get('architecture')} "
                         f"({lib['filepath'].rsplit('/', 1)[-1]})")
                found.append((label, _Cblas(fn, ctypes.c_int64 if wide else ctypes.c_int32, dtype)))
    return found


_CHOSEN: dict[str, tuple[str, Product]] = {}
_LOCK = threading.Lock()  # the engine's worker threads may ask first at the same time


def _choose(dtype: type) -> tuple[str, Product]:
    """Check and time every candidate once (single-threaded, as the engine calls them), on a
    product small enough that a generic kernel's slowness shows in milliseconds: a process's
    first analysis pays this once per dtype (0.12 s for both with four times the size).

    The choice must not flip with timing noise between processes (two libraries round a product
    differently in its last bits): candidates are ranked OpenBLAS builds first, newest first,
    then numpy's ``matmul``, and the first within 1.5 times the fastest time is taken."""
    rng = np.random.default_rng(0)
    a: np.ndarray = rng.standard_normal((192, 512)).astype(dtype)
    b: np.ndarray = rng.standard_normal((192, 512)).astype(dtype)
    tol = 1e-10 if np.dtype(dtype) == np.float64 else 1e-3
    candidates = sorted(_openblas_candidates(dtype), key=lambda c: _version(c[0]), reverse=True)
    candidates.append(("numpy matmul", _numpy_product))
    timed: list[tuple[float, str, Product]] = []
    with threadpool_limits(limits=1, user_api="blas"):
        reference = a @ b.T
        for label, product in candidates:
            try:
                got = product(a, b, np.empty_like(reference))
            except (OSError, ValueError, TypeError):
                continue
            if not np.allclose(got, reference, rtol=tol, atol=tol * 32):
                continue
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                product(a, b, got)
                seconds.append(time.perf_counter() - t0)
            timed.append((min(seconds), label, product))
    fastest = min(t for t, _, _ in timed)  # numpy's matmul always qualifies
    _, label, product = next(c for c in timed if c[0] <= 1.5 * fastest)
    return label, product


def _version(label: str) -> tuple[int, ...]:
    """``(0, 3, 30)`` from a candidate's label ``"openblas 0.3.30 ..."``; () when it has none."""
    parts = label.split()
    digits = parts[1].split(".") if len(parts) > 1 else []
    return tuple(int("".join(ch for ch in d if ch.isdigit()) or 0) for d in digits)


def product_nt(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b.T`` (into ``out`` when given) with the fastest BLAS loaded here, for float32 or
    float64 arrays whose rows are contiguous; anything else goes through numpy."""
    if a.dtype not in (np.float32, np.float64):
        return _numpy_product(a, b, out)
    return _chosen(a.dtype.type)[1](a, b, out)


def chosen_library(dtype: type = np.float64) -> str:
    """Which library :func:`product_nt` uses for ``dtype`` (chosen on first use)."""
    return _chosen(dtype)[0]


def _chosen(dtype: type) -> tuple[str, Product]:
    chosen = _CHOSEN.get(np.dtype(dtype).str)
    if chosen is None:
        with _LOCK:
            chosen = _chosen_unlocked(dtype)
    return chosen


def _chosen_unlocked(dtype: type) -> tuple[str, Product]:
    key = np.dtype(dtype).str
    if key not in _CHOSEN:
        _CHOSEN[key] = _choose(np.dtype(dtype).type)
    return _CHOSEN[key]


_ACCUMULATORS: dict[str, tuple[str, _Cblas] | None] = {}


def _adds_once(product: _Cblas, dtype: type) -> bool:
    """Whether ``product(a, b, out, beta=1)`` gives bit for bit ``out + (a @ b.T)`` as computed by
    ``product`` alone and then added (single-threaded; edge-sized blocks; chunks of 256)."""
    rng = np.random.default_rng(1)
    for m, n in ((300, 260), (1024, 97)):
        a: np.ndarray = rng.standard_normal((m, 768)).astype(dtype)
        b: np.ndarray = rng.standard_normal((n, 768)).astype(dtype)
        start: np.ndarray = rng.standard_normal((m, n)).astype(dtype)
        two_step, fused = start.copy(), start.copy()
        part: np.ndarray = np.empty((m, n), dtype=dtype)
        for c in range(0, 768, 256):
            product(a[:, c : c + 256], b[:, c : c + 256], part)
            two_step += part
            product(a[:, c : c + 256], b[:, c : c + 256], fused, beta=1.0)
        if not np.array_equal(two_step, fused):
            return False
    return True


def accumulator(dtype: type) -> tuple[str, Callable[..., np.ndarray]] | None:
    """``(label, f)`` with ``f(a, b, out, beta=1.0)`` adding ``a @ b.T`` into ``out`` (``beta=0.0``:
    writing it), rows contiguous, in a single call whose rounding is that of the product computed
    alone and then added into ``out`` once (checked, :func:`_adds_once`): so a sum over chunks of
    columns accumulated this way rounds as the two-step sum does, without a pass over ``out`` per
    chunk. The chosen product's library when it qualifies, else any loaded OpenBLAS that does;
    None when none does (then add the products in a second step)."""
    key = np.dtype(dtype).str
    with _LOCK:
        if key not in _ACCUMULATORS:
            chosen = _chosen_unlocked(np.dtype(dtype).type)
            candidates: list[tuple[str, Product]] = [chosen] if isinstance(chosen[1], _Cblas) else []
            candidates += [c for c in _openblas_candidates(dtype) if c[0] != chosen[0]]
            found: tuple[str, _Cblas] | None = None
            with threadpool_limits(limits=1, user_api="blas"):
                for label, product in candidates:
                    if not isinstance(product, _Cblas):
                        continue
                    try:
                        if _adds_once(product, np.dtype(dtype).type):
                            found = (label, product)
                            break
                    except (OSError, ValueError, TypeError):
                        continue
            _ACCUMULATORS[key] = found
        return _ACCUMULATORS[key]
