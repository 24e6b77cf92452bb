"""``replandscape metrics``: the geometry metrics of one array of representations.

    replandscape metrics X.npy [--labels NAME=FILE.npy ...] [--maxk K] [--range-max R] [--z Z]
        [--engine fast|dadapy] [--threads T] [--dendrogram] [--json OUT] [--points OUT.npz]

Prints (or writes to OUT) a JSON object with n_points, n_duplicates, id_twonn, id_gride,
id_gride_ranks, id, n_peaks, core_fraction, peaks (sizes, centres, log-densities, saddles), ari,
overlap, dendrogram, seconds and the parameters used. ``--points`` saves the per-point arrays:
kept_rows (the input row of each analysed point, duplicates removed), assignment,
assignment_halo and log_density. Useful to check one layer by hand; the analysis stage runs the
same function per site.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from replandscape.errors import UserError


def register(subparsers: Any) -> None:
    from replandscape.metrics.geometry import GeometryParams

    defaults = GeometryParams()  # docs/method.md §5 values, in one place
    parser = subparsers.add_parser(
        "metrics",
        help="intrinsic dimension, density peaks, ARI and overlap of one [N, D] .npy array",
        description="Compute the geometry metrics (TwoNN and Gride ID, ADP density peaks, core "
        "fraction, ARI and overlap with labels) of one array of representations.",
    )
    parser.add_argument("array", type=Path, metavar="X.npy", help="[N, D] representations")
    parser.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="a label array of length N (repeatable), e.g. subject=subjects.npy",
    )
    parser.add_argument(
        "--maxk", type=int, default=defaults.maxk, help="neighbours per point (default %(default)s)"
    )
    parser.add_argument(
        "--range-max",
        type=int,
        default=defaults.range_max,
        help="largest neighbour rank of the Gride scaling (default %(default)s)",
    )
    parser.add_argument(
        "--id-scale-index",
        type=int,
        default=defaults.id_scale_index,
        help="Gride scale whose ID feeds the density (default %(default)s)",
    )
    parser.add_argument(
        "--density-k", type=int, default=defaults.density_k, help="kNN density neighbours (default %(default)s)"
    )
    parser.add_argument(
        "--z", type=float, default=defaults.Z, help="ADP merging threshold Z (default %(default)s)"
    )
    parser.add_argument(
        "--overlap-fraction",
        type=float,
        default=defaults.overlap_fraction,
        help="per-class neighbours of the overlap, as a fraction (default %(default)s)",
    )
    parser.add_argument(
        "--engine",
        choices=("fast", "dadapy"),
        default="fast",
        help="nearest neighbours from our exact engine or DADApy's (default fast)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "torch", "cuda", "auto"),
        default="auto",
        help="where the fast engine multiplies matrices (default auto: a CUDA GPU when torch "
        "sees one, else the CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="cap on BLAS/OpenMP threads")
    parser.add_argument("--dendrogram", action="store_true", help="also build the peak dendrogram")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="write the JSON here instead of standard output",
    )
    parser.add_argument(
        "--points",
        type=Path,
        default=None,
        metavar="OUT.npz",
        help="also save the per-point arrays (kept_rows, assignment, assignment_halo, "
        "log_density) here",
    )
    parser.set_defaults(func=run)


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError("file not found", file=str(path), key=what, fix="check the path")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(
            f"not a readable .npy array ({exc})",
            file=str(path),
            key=what,
            fix="save it with numpy.save",
        ) from exc


def _parse_labels(specs: list[str]) -> dict[str, np.ndarray]:
    labels: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise UserError(f"expected NAME=FILE.npy, got {spec!r}", key="--labels")
        if name in labels:
            raise UserError(f"label name {name!r} given twice", key="--labels")
        labels[name] = _load_npy(Path(file), f"labels.{name}")
    return labels


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` in another thread; a later ``import`` of it in this thread
    waits for that one to finish (Python's import lock), and reports any error itself."""

    def load() -> None:
        # an error is raised again by the main thread's own import, with its traceback there
        with contextlib.suppress(BaseException):
            importlib.import_module(module)

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    return thread


def run(args: argparse.Namespace) -> int:
    import scipy.linalg  # noqa: F401  (the engine's BLAS lookup needs it: imported here first)

    from replandscape.allocator import retain_freed_memory
    from replandscape.metrics.geometry import GeometryParams, compute_geometry, params_to_dict

    # Importing dadapy takes seconds (jax, flax, scikit-learn, pandas, matplotlib), and the
    # estimators need it only once the neighbours are found: it loads while this thread reads
    # the arrays and searches. Everything this thread imports before then is imported above, so
    # the two threads never wait on each other's half-imported modules.
    retain_freed_memory()
    _import_in_background("dadapy")

    X = _load_npy(args.array, "X")
    labels = _parse_labels(args.labels)
    params = GeometryParams(
        maxk=args.maxk,
        range_max=args.range_max,
        id_scale_index=args.id_scale_index,
        density_k=args.density_k,
        Z=args.z,
        overlap_fraction=args.overlap_fraction,
        engine=args.engine,
        device=args.device,
        threads=args.threads,
        compute_dendrogram=args.dendrogram,
    )
    try:
        result = compute_geometry(X, labels, params)
    except UserError as exc:
        # name the input file in the one-line message
        raise UserError(str(exc), file=str(args.array)) from exc
    out = result.to_json_dict()
    out["params"] = params_to_dict(params)
    text = json.dumps(out, indent=2)
    from replandscape.atomic import write_npz_atomic, write_text_atomic

    if args.points is not None:
        _write(args.points, lambda: write_npz_atomic(args.points, result.point_arrays()),
               "the per-point arrays")
    if args.json is None:
        sys.stdout.write(text + "\n")
    else:
        _write(args.json, lambda: write_text_atomic(args.json, text + "\n"), "the JSON")
    return 0


def _write(path: Path, write: Callable[[], object], what: str) -> None:
    """Run ``write``; a failure to write ``path`` is one line naming it and what it holds."""
    try:
        write()
    except UserError as exc:  # the atomic writers name the path and the fix already
        raise UserError(f"cannot write {what}: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot write {what} ({exc.strerror})", file=str(path)) from exc
