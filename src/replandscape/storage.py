"""Contract of the activation files: the one writer and the one reader.

One file per run and condition (``activations/shots5.h5``)::

    /                      attrs: kind, schema_version, complete, n_rows, site_names (JSON),
                                  writer ("shards" | "mpio"), model_name, model_path, model_revision,
                                  condition, shots, checkpoint, checkpoint_step, config (YAML),
                                  config_hash, stage_hash, code_version, created, world_size,
                                  accuracy (JSON: micro, macro, per_subject),
                                  digest_algorithm ("crc32"), digests (JSON: dataset -> hex),
                                  content_digest (hex)
    /rows/question_id      [N] int64     id of the question in its split
    /rows/subject          [N] str
    /rows/answer           [N] int8      correct choice index
    /rows/predicted        [N] int8      argmax over the answer-letter tokens
    /rows/correct          [N] bool
    /rows/n_tokens         [N] int32     prompt length in tokens (BOS included)
    /rows/prompt_sha256    [N] S64
    /rows/prompt           [N] str       the exact prompt text (gzip)
    /rows/<extra>          [N]           numeric fields or string columns a caller declared
                                         (``extra_fields`` / ``extra_strings``); none for MMLU
    /sites/<name>          [N, D]        last-token vectors (float16/float32, or bfloat16 bits as
                                         uint16 with attr dtype="bfloat16")

Ranks write their own shard (``<stem>.parts/rank0003.h5``: a contiguous block of rows and a per-row
``done`` mask, flushed after each batch) or, when h5py has MPI and the ranks are MPI ranks, one shared
file through ``driver="mpio"``. Finalising writes the file under a temporary name and renames it:
a reader sees a complete file or none. With shards, ``/sites/*`` are virtual datasets over the
shards; the reader checks that every shard exists and is complete, so a missing shard never reads
back as zeros.

Checksums. Every dataset under ``/sites`` and ``/rows`` has a CRC-32 in the ``digests`` attribute,
taken over a small header (dtype and shape) followed by the dataset's bytes in row order
(little-endian; a string as its 8-byte length and its UTF-8 bytes). CRC-32 is the fastest digest in
the standard library (zlib: 2.3 GB/s against 1.0 GB/s for blake2b on the development machine), and
damage detection is all it is for. Each rank digests its own rows when it closes its writer; the
finalisation chains the per-rank values (``crc32_combine``) instead of reading the sites again.
``content_digest`` is a 128-bit blake2b over the sorted ``name=digest`` lines: the file's content
identity. Reading a site or a row field reads the whole dataset and checks its digest; the row
fields of per-rank shards also carry HDF5's fletcher32 filter until they are copied.

A partial file that carries no header of ours (killed before the header was written, or written by
something else) is started again; one whose header names another config is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from replandscape.errors import UserError

KIND = "replandscape.activations"
SCHEMA_VERSION = 2
SHARD_KIND = "replandscape.activation-shard"
NUMERIC_ROW_FIELDS: dict[str, Any] = {
    "question_id": np.int64, "answer": np.int8, "predicted": np.int8, "correct": np.bool_,
    "n_tokens": np.int32,
}
STRING_ROW_FIELDS = ("subject", "prompt", "prompt_sha256")
DIGEST_ALGORITHM = "crc32"
NO_EXTRAS: Mapping[str, Any] = MappingProxyType({})
# computes string columns and header attributes from the gathered numeric row fields (e.g. the
# generated tokens, stored as numbers while ranks write, decoded to text once at finalisation)
Derive = Callable[[Mapping[str, np.ndarray]], tuple[Mapping[str, Sequence[str]], Mapping[str, Any]]]
_DIGEST_BLOCK_BYTES = 64 << 20  # rows read per digest step: bounded memory on 100 GB sites


def _h5py() -> Any:
    import h5py

    return h5py


@dataclass(frozen=True)
class SiteSpec:
    """One stored site: name, width and storage dtype name (float32, float16 or bfloat16)."""

    name: str
    dim: int
    dtype: str

    @property
    def h5_dtype(self) -> Any:
        return np.uint16 if self.dtype == "bfloat16" else np.dtype(self.dtype)


def encode_rows(values: Any, dtype: str) -> np.ndarray:
    """A torch tensor or array of floats -> the array stored for ``dtype``."""
    if dtype == "bfloat16":
        import torch

        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if hasattr(values, "numpy"):
        import torch

        values = values.to(torch.float32).numpy()
    return np.asarray(values, dtype=dtype)


def decode_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float32 (bfloat16 bits widened exactly)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def split_rows(weights: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous row blocks, one per rank, balanced by ``weights`` (tokens); every row once."""
    n = len(weights)
    if world <= 1 or n == 0:
        return [(0, n)] + [(n, n)] * max(0, world - 1)
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    total = cum[-1]
    bounds = [0]
    for r in range(1, world):
        cut = int(np.searchsorted(cum, total * r / world, side="left")) + 1
        bounds.append(min(max(cut, bounds[-1]), n))
    bounds.append(n)
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def row_field_dtypes(extra_fields: Mapping[str, Any] = NO_EXTRAS) -> dict[str, np.dtype]:
    """The numeric row fields of a file: the fixed ones, then the caller's extras.

    Args:
        extra_fields: name -> numpy dtype (bool, integer or float) of each added field.

    Returns:
        name -> dtype, fixed fields first.

    Raises:
        ValueError: an extra name clashes with a stored dataset or a dtype is not numeric.
    """
    out = {name: np.dtype(dt) for name, dt in NUMERIC_ROW_FIELDS.items()}
    for name, dt in extra_fields.items():
        _check_extra_name(name, out)
        dtype = np.dtype(dt)
        if dtype.kind not in "biuf":
            raise ValueError(f"row field '{name}' must be bool, integer or float, not {dtype}; "
                             "declare text as extra_strings")
        out[name] = dtype
    return out


def _check_extra_name(name: str, taken: Mapping[str, Any]) -> None:
    if not name or "/" in name or name in taken or name in STRING_ROW_FIELDS or name == "done":
        raise ValueError(f"row field name '{name}' is empty, has '/', or is already stored")


# --------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------


def _is_string_dtype(dtype: Any) -> bool:
    return np.dtype(dtype).kind == "O"


def _digest_seed(dtype: Any, shape: Sequence[int]) -> int:
    """CRC of the dataset's header line: a dataset cut short or retyped cannot keep its digest."""
    tag = "str" if _is_string_dtype(dtype) else np.dtype(dtype).newbyteorder("<").str
    return zlib.crc32(f"{tag}|{json.dumps([int(x) for x in shape])}".encode())


def _digest_bytes(block: np.ndarray) -> Any:
    """The bytes a digest covers for a block of rows (a buffer, not a copy, when it can be)."""
    if block.dtype.kind == "O":
        parts = []
        for value in block.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(len(raw).to_bytes(8, "little"))
            parts.append(raw)
        return b"".join(parts)
    arr = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8)


def crc_rows(ds: Any, start: int, stop: int, crc: int = 0) -> int:
    """CRC-32 of rows [start, stop) of an HDF5 dataset, continued from ``crc``, read in blocks."""
    width = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    step = max(1, _DIGEST_BLOCK_BYTES // max(1, width))
    for a in range(start, stop, step):
        crc = zlib.crc32(_digest_bytes(ds[a:min(stop, a + step)]), crc)
    return crc


def dataset_digest(ds: Any) -> str:
    """The stored digest of a whole dataset, computed by reading it."""
    return f"{crc_rows(ds, 0, ds.shape[0], _digest_seed(ds.dtype, ds.shape)):08x}"


def array_digest(data: np.ndarray, dtype: Any, shape: Sequence[int]) -> str:
    """The digest of a dataset already read into memory (equal to :func:`dataset_digest`)."""
    return f"{zlib.crc32(_digest_bytes(data), _digest_seed(dtype, shape)):08x}"


def content_digest(digests: Mapping[str, str]) -> str:
    """The file's content identity: blake2b-128 over the sorted ``name=digest`` lines."""
    text = "".join(f"{name}={digests[name]}\n" for name in sorted(digests))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


_CRC32_POLY = 0xEDB88320


def _gf2_apply(mat: Sequence[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_compose(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [_gf2_apply(a, col) for col in b]


@functools.lru_cache(maxsize=512)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The linear map that runs a CRC-32 register over ``nbytes`` zero bytes (cached: a file has
    few distinct block lengths)."""
    op = [_CRC32_POLY] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):
        op = _gf2_compose(op, op)  # 2, 4, 8 bits: one byte
    result: list[int] | None = None
    n = nbytes
    while n:
        if n & 1:
            result = op if result is None else _gf2_compose(op, result)
        n >>= 1
        if n:
            op = _gf2_compose(op, op)
    return tuple(result or [1 << k for k in range(32)])


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B), as zlib's ``crc32_combine``."""
    if len2 <= 0:
        return crc1
    return _gf2_apply(_zeros_operator(len2), crc1) ^ crc2


# --------------------------------------------------------------------------------------------
# writing: partial files
# --------------------------------------------------------------------------------------------


def _row_chunks(n: int, dim: int) -> tuple[int, int] | None:
    """Chunks of whole rows, about 1 MiB, so a batch write touches few chunks."""
    if n == 0:
        return None
    return (max(1, min(n, (1 << 20) // max(1, dim * 4))), dim)


def _create_partial_layout(fh: Any, n: int, sites: Sequence[SiteSpec],
                           fields: Mapping[str, np.dtype], *, chunked: bool) -> None:
    """The datasets of a file being written: sites, numeric row fields and the per-row done mask
    (uint8, 1 = written) that a resumed run reads.

    Chunked row fields carry fletcher32 (they are copied, not digested, at finalisation); sites
    do not: their digest covers them end to end, and the filter cut their read rate by a third
    (1.1 against 1.7 GB/s, read and digest, on the development machine).
    """
    grp = fh.create_group("sites")
    for s in sites:
        ds = grp.create_dataset(s.name, shape=(n, s.dim), dtype=s.h5_dtype,
                                chunks=_row_chunks(n, s.dim) if chunked else None)
        ds.attrs["dtype"] = s.dtype
    rows = fh.create_group("rows")
    for name, dt in fields.items():
        rchunks = (n,) if chunked and n else None
        rows.create_dataset(name, shape=(n,), dtype=dt, chunks=rchunks,
                            fletcher32=rchunks is not None)
    fh.create_dataset("done", shape=(n,), dtype=np.uint8)


def _layout_matches(fh: Any, n: int, sites: Sequence[SiteSpec],
                    fields: Mapping[str, np.dtype]) -> bool:
    for s in sites:
        ds = fh["sites"].get(s.name)
        if ds is None or ds.shape != (n, s.dim) or ds.dtype != s.h5_dtype:
            return False
    for name, dt in fields.items():
        ds = fh["rows"].get(name)
        if ds is None or ds.shape != (n,) or ds.dtype != dt:
            return False
    return bool(fh["done"].shape == (n,))


def _partial_state(path: Path, expect: Mapping[str, Any], n: int, sites: Sequence[SiteSpec],
                   fields: Mapping[str, np.dtype]) -> tuple[str, dict[str, Any]]:
    """What to do with a partial file found on disk.

    Returns:
        ("restart", attrs) when it carries no header of ours (a kill before the header was
        written, or another program's file), cannot be read, or lacks part of its layout;
        ("other", attrs) when its header names another config; ("resume", attrs) otherwise.
    """
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as fh:
            attrs = {key: fh.attrs[key] for key in fh.attrs}
            if attrs.get("kind") != SHARD_KIND or "stage_hash" not in attrs:
                return "restart", attrs
            if any(attrs.get(key) != value for key, value in expect.items()):
                return "other", attrs
            return ("resume" if _layout_matches(fh, n, sites, fields) else "restart"), attrs
    except (OSError, KeyError, ValueError, TypeError):
        return "restart", {}


def _write_sorted(fh: Any, positions: np.ndarray, site_values: Mapping[str, np.ndarray],
                  row_values: Mapping[str, np.ndarray]) -> None:
    """Write a batch at ``positions`` of the file's datasets (sorted first: HDF5 selections must
    increase) and mark those rows done."""
    order = np.argsort(positions)
    positions = positions[order]
    for name, values in site_values.items():
        fh["sites"][name][positions] = values[order]
    for name, values in row_values.items():
        fh["rows"][name][positions] = np.asarray(values)[order]
    fh["done"][positions] = 1


def parts_dir(path: Path) -> Path:
    return path.with_name(path.stem + ".parts")


def shard_path(path: Path, rank: int) -> Path:
    return parts_dir(path) / f"rank{rank:04d}.h5"


def mpio_path(path: Path) -> Path:
    return path.with_name(path.stem + ".mpio.h5")


# --------------------------------------------------------------------------------------------
# writing: per-rank shards
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """One rank's rows [start, stop): created, or reopened to resume, and flushed per batch.

    Args:
        final_path: the activation file this shard belongs to.
        rank, world: this rank and the number of ranks.
        start, stop: the rows of this rank.
        sites: the stored sites.
        stage_hash: identity of the config; a shard with another one is refused.
        extra_fields: numeric row fields beyond the fixed ones (name -> numpy dtype).
    """

    def __init__(self, final_path: Path, rank: int, world: int, start: int, stop: int,
                 sites: Sequence[SiteSpec], stage_hash: str,
                 extra_fields: Mapping[str, Any] = NO_EXTRAS) -> None:
        h5py = _h5py()
        self.path = shard_path(final_path, rank)
        self.start, self.stop = start, stop
        self.sites = {s.name: s for s in sites}
        self.fields = row_field_dtypes(extra_fields)
        n = stop - start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            state, attrs = _partial_state(
                self.path, {"stage_hash": stage_hash, "start": start, "stop": stop,
                            "world_size": world}, n, sites, self.fields)
            if state == "other":
                try:
                    old_world = int(attrs.get("world_size", -1))
                except (TypeError, ValueError):
                    old_world = -1
                if old_world != world and old_world > 0:
                    raise UserError(f"a partial extraction made with {old_world} ranks is here; "
                                    f"this run has {world}", file=str(self.path.parent),
                                    fix=f"resume with {old_world} ranks or delete the folder")
                raise UserError("a partial extraction with a different config is here",
                                file=str(self.path.parent),
                                fix="use another run.output_dir or delete the folder")
            if state == "restart":
                self.path.unlink()
        if self.path.exists():
            fh = h5py.File(self.path, "r+")
        else:
            fh = h5py.File(self.path, "w")
            _create_partial_layout(fh, n, sites, self.fields, chunked=True)
            fh.flush()
            # the header goes last: a shard that carries it has its whole layout
            fh.attrs.update(kind=SHARD_KIND, schema_version=SCHEMA_VERSION,
                            stage_hash=stage_hash, start=start, stop=stop, rank=rank,
                            world_size=world, complete=False)
            fh.flush()
        self.fh = fh

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.fh["done"][:], dtype=bool)

    def write(self, rows: np.ndarray, site_values: Mapping[str, np.ndarray],
              row_values: Mapping[str, np.ndarray]) -> None:
        """Write a batch (global row indices, any order) and mark it done, durably."""
        _write_sorted(self.fh, np.asarray(rows, dtype=np.int64) - self.start, site_values,
                      row_values)
        self.fh.flush()

    def close(self) -> None:
        """Close the shard; a complete one first digests its sites (each rank its own block, in
        parallel, so the finalisation only chains the values)."""
        complete = bool(self.done_mask().all())
        if complete:
            for name in self.sites:
                ds = self.fh["sites"][name]
                try:
                    ds.attrs["block_crc"] = crc_rows(ds, 0, ds.shape[0])
                except OSError:
                    self.fh.close()
                    raise UserError(f"sites/{name} of the shard cannot be read back (damaged)",
                                    file=str(self.path),
                                    fix="delete the shard and re-run the extraction") from None
        self.fh.attrs["complete"] = complete
        self.fh.close()


# --------------------------------------------------------------------------------------------
# writing: one shared file through MPI-IO
# --------------------------------------------------------------------------------------------


def mpio_available() -> bool:
    try:
        return bool(_h5py().get_config().mpi)
    except ImportError:
        return False


class MpioWriter:
    """All ranks write their rows into one file opened with ``driver="mpio"``.

    Dataset creation is collective; each rank writes its own rows independently and flushes. The
    ``done`` mask lets a killed run resume. Strings are written at finalisation by rank 0.

    Args:
        final_path: the activation file; the shared file is ``<stem>.mpio.h5`` beside it.
        comm: the mpi4py communicator of the writing ranks.
        n_rows: rows of the whole file.
        sites: the stored sites.
        stage_hash: identity of the config; a file with another one is refused.
        extra_fields: numeric row fields beyond the fixed ones (name -> numpy dtype).
    """

    def __init__(self, final_path: Path, comm: Any, n_rows: int, sites: Sequence[SiteSpec],
                 stage_hash: str, extra_fields: Mapping[str, Any] = NO_EXTRAS) -> None:
        h5py = _h5py()
        self.path = mpio_path(final_path)
        self.comm = comm
        self.n_rows = n_rows
        self.sites = list(sites)
        self.fields = row_field_dtypes(extra_fields)
        state = "create"
        if comm.rank == 0 and self.path.exists():
            # one rank decides, so every rank takes the same path into the collective open
            state = _partial_state(self.path, {"stage_hash": stage_hash, "n_rows": n_rows},
                                   n_rows, sites, self.fields)[0]
        state = comm.bcast(state, root=0)
        if state == "other":
            raise UserError("a partial extraction with a different config is here",
                            file=str(self.path),
                            fix="use another run.output_dir or delete the file")
        if state == "restart":
            if comm.rank == 0:
                self.path.unlink()
            comm.Barrier()
        if state == "resume":
            fh = h5py.File(self.path, "r+", driver="mpio", comm=comm)
        else:
            fh = h5py.File(self.path, "w", driver="mpio", comm=comm)
            # contiguous datasets: HDF5 1.10 writes chunked ones only collectively
            _create_partial_layout(fh, n_rows, sites, self.fields, chunked=False)
            fh.flush()
            # the header goes last: a file that carries it has its whole layout
            fh.attrs.update(kind=SHARD_KIND, schema_version=SCHEMA_VERSION, stage_hash=stage_hash,
                            n_rows=n_rows, world_size=comm.size, complete=False)
            fh.flush()
        self.fh = fh

    def done_rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.fh["done"][start:stop], dtype=bool)

    def write(self, rows: np.ndarray, site_values: Mapping[str, np.ndarray],
              row_values: Mapping[str, np.ndarray]) -> None:
        """Write this rank's batch (possibly empty) and flush; collective: every rank calls it
        the same number of times."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            _write_sorted(self.fh, rows, site_values, row_values)
        self.fh.flush()

    def close(self) -> None:
        """Close the file (collective); when every row is done, each rank then digests an equal
        share of every site's rows and rank 0 records the values for the finalisation."""
        self.fh.close()
        h5py = _h5py()
        comm = self.comm
        lo = self.n_rows * comm.rank // comm.size
        hi = self.n_rows * (comm.rank + 1) // comm.size
        crcs: dict[str, int] | None = None
        try:
            with h5py.File(self.path, "r") as fh:
                if bool(np.asarray(fh["done"][:]).all()):
                    crcs = {s.name: crc_rows(fh["sites"][s.name], lo, hi) for s in self.sites}
        except (OSError, KeyError):
            crcs = None  # the finalisation then digests by reading
        gathered = comm.gather((lo, hi, crcs), root=0)
        if comm.rank == 0 and all(c is not None for _, _, c in gathered):
            with h5py.File(self.path, "r+") as fh:
                for s in self.sites:
                    fh["sites"][s.name].attrs["block_crcs"] = json.dumps(
                        [[a, b, c[s.name]] for a, b, c in gathered])


# --------------------------------------------------------------------------------------------
# finalising
# --------------------------------------------------------------------------------------------


def accuracy_summary(subjects: Sequence[str], correct: np.ndarray) -> dict[str, Any]:
    """Micro accuracy, macro accuracy (mean over subjects) and per-subject accuracy."""
    correct = np.asarray(correct, dtype=bool)
    per: dict[str, float] = {}
    subj = np.asarray(subjects)
    for s in sorted(set(subjects)):
        per[s] = float(correct[subj == s].mean())
    return {"micro": float(correct.mean()) if len(correct) else float("nan"),
            "macro": float(np.mean(list(per.values()))) if per else float("nan"),
            "per_subject": per, "n": int(len(correct))}


def _final_fields(rows_group: Any, extra_fields: Mapping[str, Any],
                  where: Path) -> dict[str, np.dtype]:
    """The numeric row fields to carry into the final file: the declared ones, or, when none are
    declared, every field the partial file holds (so a forgotten declaration loses nothing)."""
    if extra_fields:
        fields = row_field_dtypes(extra_fields)
        missing = [name for name in fields if name not in rows_group]
        if missing:
            raise ValueError(f"{where}: the partial file has no row fields {missing}")
        return fields
    fields = row_field_dtypes()
    for name in rows_group:
        if name not in fields:
            fields[name] = np.dtype(rows_group[name].dtype)
    return fields


def _check_strings(extra_strings: Mapping[str, Sequence[str]], fields: Mapping[str, Any],
                   n: int) -> None:
    for name, values in extra_strings.items():
        _check_extra_name(name, fields)
        if len(values) != n:
            raise ValueError(f"string row column '{name}' has {len(values)} values for {n} rows")


def _finish_file(fh: Any, header: Mapping[str, Any], subjects: Sequence[str],
                 prompts: Sequence[str], numeric: Mapping[str, np.ndarray],
                 fields: Mapping[str, np.dtype], extra_strings: Mapping[str, Sequence[str]],
                 site_crcs: Mapping[str, list[tuple[int, int]]]) -> None:
    """Rows, header and digests of the final file; ``complete`` is set last.

    ``site_crcs``: per site, the (crc, nbytes) of consecutive row blocks computed by the ranks;
    a site without them is digested by reading it.
    """
    h5py = _h5py()
    rows = fh.create_group("rows")
    for name, dt in fields.items():
        rows.create_dataset(name, data=np.asarray(numeric[name], dtype=dt))
    str_dt = h5py.string_dtype()
    rows.create_dataset("subject", data=np.asarray(subjects, dtype=object), dtype=str_dt)
    rows.create_dataset("prompt", data=np.asarray(prompts, dtype=object), dtype=str_dt,
                        compression="gzip" if len(prompts) else None)
    rows.create_dataset("prompt_sha256", data=np.asarray(
        [hashlib.sha256(p.encode()).hexdigest() for p in prompts], dtype="S64"))
    for name, values in extra_strings.items():
        rows.create_dataset(name, data=np.asarray(list(values), dtype=object), dtype=str_dt)
    acc = accuracy_summary(subjects, numeric["correct"])
    attrs = dict(header)
    attrs.update(kind=KIND, schema_version=SCHEMA_VERSION, n_rows=len(subjects),
                 accuracy=json.dumps(acc), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for key, value in attrs.items():
        fh.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else (
            "" if value is None else value)
    digests: dict[str, str] = {}
    for name, ds in fh["sites"].items():
        blocks = site_crcs.get(name)
        if blocks is None:
            digests[f"sites/{name}"] = dataset_digest(ds)
            continue
        crc = _digest_seed(ds.dtype, ds.shape)
        for block_crc, nbytes in blocks:
            crc = crc32_combine(crc, block_crc, nbytes)
        digests[f"sites/{name}"] = f"{crc:08x}"
    for name, ds in rows.items():
        digests[f"rows/{name}"] = dataset_digest(ds)
    fh.attrs["digest_algorithm"] = DIGEST_ALGORITHM
    fh.attrs["digests"] = json.dumps(digests, sort_keys=True)
    fh.attrs["content_digest"] = content_digest(digests)
    fh.attrs["complete"] = True


def finalize_shards(final_path: Path, world: int, sites: Sequence[SiteSpec],
                    header: Mapping[str, Any], subjects: Sequence[str], prompts: Sequence[str],
                    *, extra_fields: Mapping[str, Any] = NO_EXTRAS,
                    extra_strings: Mapping[str, Sequence[str]] = NO_EXTRAS,
                    derive: Derive | None = None) -> Path:
    """Join complete shards into ``final_path`` (virtual site datasets), atomically.

    Args:
        final_path, world, sites: as given to the shard writers.
        header: root attributes (site_names, model, config, stage_hash, ...).
        subjects, prompts: one per row.
        extra_fields: the numeric row fields declared to the writers beyond the fixed ones; when
            empty, every field the shards hold is kept.
        extra_strings: added string row columns (name -> one string per row).
        derive: called with the gathered numeric row fields; returns more string columns and
            more header attributes.
    """
    h5py = _h5py()
    n = len(subjects)
    numeric: dict[str, np.ndarray] = {}
    fields: dict[str, np.dtype] = {}
    site_blocks: dict[str, list[tuple[int, int]] | None] = {s.name: [] for s in sites}
    blocks = []
    for rank in range(world):
        path = shard_path(final_path, rank)
        if not path.exists():
            raise UserError(f"shard of rank {rank} is missing", file=str(path),
                            fix="re-run the extraction to resume it")
        try:
            sh = h5py.File(path, "r")
        except OSError:
            raise UserError(f"shard of rank {rank} cannot be read (damaged)", file=str(path),
                            fix="delete it and re-run the extraction") from None
        with sh:
            start, stop = int(sh.attrs["start"]), int(sh.attrs["stop"])
            if not bool(np.asarray(sh["done"][:]).all()):
                raise UserError(f"shard of rank {rank} is incomplete", file=str(path),
                                fix="re-run the extraction to resume it")
            if rank == 0:
                fields = _final_fields(sh["rows"], extra_fields, path)
                _check_strings(extra_strings, fields, n)
                numeric = {name: np.zeros(n, dtype=dt) for name, dt in fields.items()}
            for name in numeric:
                try:
                    numeric[name][start:stop] = sh["rows"][name][:]
                except OSError:  # fletcher32 failed
                    raise UserError(f"rows/{name} of the shard of rank {rank} is damaged",
                                    file=str(path), fix="delete it and re-run the extraction"
                                    ) from None
            for s in sites:
                ds = sh["sites"][s.name]
                crc, kept = ds.attrs.get("block_crc"), site_blocks[s.name]
                if crc is None or kept is None:
                    site_blocks[s.name] = None
                else:
                    kept.append((int(crc), int(np.prod(ds.shape)) * ds.dtype.itemsize))
            blocks.append((path, start, stop))
    if derive is not None:
        more_strings, more_header = derive(numeric)
        extra_strings = {**extra_strings, **more_strings}
        header = {**header, **more_header}
        _check_strings(extra_strings, fields, n)
    tmp = final_path.with_name(final_path.name + ".tmp")
    with h5py.File(tmp, "w") as fh:
        grp = fh.create_group("sites")
        for s in sites:
            layout = h5py.VirtualLayout(shape=(n, s.dim), dtype=s.h5_dtype)
            for path, start, stop in blocks:
                if stop > start:
                    rel = os.path.relpath(path, final_path.parent)
                    layout[start:stop] = h5py.VirtualSource(rel, f"sites/{s.name}",
                                                            shape=(stop - start, s.dim))
            ds = grp.create_virtual_dataset(s.name, layout, fillvalue=0)
            ds.attrs["dtype"] = s.dtype
        _finish_file(fh, {**header, "writer": "shards",
                          "shards": json.dumps([[os.path.relpath(p, final_path.parent), a, b]
                                                for p, a, b in blocks])},
                     subjects, prompts, numeric, fields, extra_strings,
                     {k: v for k, v in site_blocks.items() if v is not None})
    for path, _, _ in blocks:
        with h5py.File(path, "r+") as sh:
            sh.attrs["complete"] = True
    os.replace(tmp, final_path)
    return final_path


def _mpio_site_blocks(ds: Any, n: int) -> list[tuple[int, int]] | None:
    """The ranks' (crc, nbytes) blocks of a shared-file site, if they cover rows [0, n) in order."""
    raw = ds.attrs.get("block_crcs")
    if raw is None:
        return None
    width = int(ds.shape[1]) * ds.dtype.itemsize
    out, at = [], 0
    for lo, hi, crc in json.loads(raw):
        if lo != at:
            return None
        out.append((int(crc), (hi - lo) * width))
        at = hi
    return out if at == n else None


def finalize_mpio(final_path: Path, sites: Sequence[SiteSpec], header: Mapping[str, Any],
                  subjects: Sequence[str], prompts: Sequence[str], *,
                  extra_fields: Mapping[str, Any] = NO_EXTRAS,
                  extra_strings: Mapping[str, Sequence[str]] = NO_EXTRAS,
                  derive: Derive | None = None) -> Path:
    """Turn the shared MPI-IO file into the final file (rank 0, after all ranks closed it).

    Args: as :func:`finalize_shards`, without ``world``.
    """
    h5py = _h5py()
    src = mpio_path(final_path)
    n = len(subjects)
    with h5py.File(src, "r+") as fh:
        if not bool(np.asarray(fh["done"][:]).all()):
            raise UserError("the shared extraction file is incomplete", file=str(src),
                            fix="re-run the extraction to resume it")
        fields = _final_fields(fh["rows"], extra_fields, src)
        _check_strings(extra_strings, fields, n)
        numeric = {name: fh["rows"][name][:] for name in fields}
        if derive is not None:
            more_strings, more_header = derive(numeric)
            extra_strings = {**extra_strings, **more_strings}
            header = {**header, **more_header}
            _check_strings(extra_strings, fields, n)
        site_blocks = {}
        for s in sites:
            ds = fh["sites"][s.name]
            got = _mpio_site_blocks(ds, n)
            if got is not None:
                site_blocks[s.name] = got
            if "block_crcs" in ds.attrs:
                del ds.attrs["block_crcs"]
        del fh["rows"]
        del fh["done"]
        for key in ("stage_hash", "n_rows", "world_size", "complete"):
            if key in fh.attrs:
                del fh.attrs[key]
        _finish_file(fh, {**header, "writer": "mpio"}, subjects, prompts, numeric, fields,
                     extra_strings, site_blocks)
    os.replace(src, final_path)
    return final_path


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationFile:
    """A complete, checked activation file opened for reading."""

    path: Path
    fh: Any

    @property
    def attrs(self) -> dict[str, Any]:
        out = {}
        for key, value in self.fh.attrs.items():
            out[key] = value.decode() if isinstance(value, bytes) else value
        return out

    @property
    def site_names(self) -> list[str]:
        return list(json.loads(self.fh.attrs["site_names"]))

    @property
    def n_rows(self) -> int:
        return int(self.fh.attrs["n_rows"])

    @property
    def accuracy(self) -> dict[str, Any]:
        return dict(json.loads(self.fh.attrs["accuracy"]))

    @functools.cached_property
    def digests(self) -> dict[str, str]:
        """Dataset path ("sites/x", "rows/y") -> its CRC-32 as 8 hex digits."""
        return dict(json.loads(self.fh.attrs["digests"]))

    @property
    def content_digest(self) -> str:
        """The file's content identity (blake2b-128 over the sorted dataset digests)."""
        return str(self.fh.attrs["content_digest"])

    @property
    def row_fields(self) -> list[str]:
        """Every stored row field, numeric and string (sorted by name)."""
        return sorted(self.fh["rows"].keys())

    def _read_checked(self, key: str) -> np.ndarray:
        """Read a whole dataset and check it against its digest."""
        ds = self.fh[key]
        try:
            data = ds[:]
        except OSError as exc:  # a fletcher32 failure or an unreadable block of a shard
            raise UserError(f"checksum mismatch in {key} (HDF5: {exc}): the file is damaged",
                            file=str(self.path), fix="re-run the extraction") from None
        if array_digest(data, ds.dtype, ds.shape) != self.digests.get(key):
            raise UserError(f"checksum mismatch in {key}: the file is damaged",
                            file=str(self.path), fix="re-run the extraction")
        return np.asarray(data)

    def rows(self, name: str) -> np.ndarray:
        """One row field, whole and checked (strings as str)."""
        if name not in self.fh["rows"]:
            raise UserError(f"no row field '{name}'", file=str(self.path), key=f"rows/{name}",
                            fix="re-run the extraction with this version")
        data = self._read_checked(f"rows/{name}")
        if data.dtype == object:
            return np.asarray([v.decode() if isinstance(v, bytes) else v for v in data],
                              dtype=object)
        return data

    def site(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The [N, D] float32 array of one site (optionally a subset of rows, in their order).

        The whole site is read and checked against its digest before the rows are taken.
        """
        if name not in self.fh["sites"]:
            raise UserError(f"site '{name}' does not exist", file=str(self.path),
                            key=f"sites/{name}",
                            fix=f"use one of {self.site_names[0]}..{self.site_names[-1]}")
        raw = self._read_checked(f"sites/{name}")
        if rows is not None:
            raw = raw[np.asarray(rows, dtype=np.int64)]
        return decode_rows(raw, str(self.fh["sites"][name].attrs.get("dtype", "float32")))

    def verify(self) -> None:
        """Read every dataset and check its digest (one site in memory at a time)."""
        for key in sorted(self.digests):
            self._read_checked(key)

    def close(self) -> None:
        self.fh.close()


def _check_digests(fh: Any, path: Path) -> None:
    """The digest attribute names exactly the stored datasets and agrees with content_digest."""
    digests = json.loads(fh.attrs["digests"])
    stored = {f"sites/{k}" for k in fh["sites"]} | {f"rows/{k}" for k in fh["rows"]}
    if not isinstance(digests, dict) or set(digests) != stored:
        raise UserError("the dataset digests do not name the stored datasets", file=str(path),
                        key="digests", fix="re-run the extraction")
    if content_digest(digests) != fh.attrs.get("content_digest"):
        raise UserError("the content digest does not match the dataset digests",
                        file=str(path), key="content_digest", fix="re-run the extraction")


@contextmanager
def open_activations(path: str | os.PathLike[str]) -> Iterator[ActivationFile]:
    """Open and check an activation file; refuse partial, foreign or damaged files."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        hint = " (a partial run is present)" if parts_dir(path).exists() or mpio_path(
            path).exists() else ""
        raise UserError(f"activation file not found{hint}", file=str(path),
                        fix="run or resume the extraction stage")
    try:
        fh = h5py.File(path, "r")
    except OSError:
        raise UserError("not a readable HDF5 file (truncated or corrupt)", file=str(path),
                        fix="delete it and re-run the extraction") from None
    try:
        if fh.attrs.get("kind") != KIND:
            raise UserError("not a replandscape activation file", file=str(path), key="kind",
                            fix="pass a file written by 'replandscape run extract'")
        version = int(fh.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise UserError(f"schema version {version}, this code reads {SCHEMA_VERSION}",
                            file=str(path), key="schema_version", fix="re-run the extraction")
        if not bool(fh.attrs.get("complete", False)):
            raise UserError("the file is incomplete", file=str(path), key="complete",
                            fix="resume the extraction")
        n = int(fh.attrs["n_rows"])
        if fh.attrs.get("writer") == "shards":
            for rel, start, stop in json.loads(fh.attrs["shards"]):
                shard = path.parent / rel
                if not shard.is_file():
                    raise UserError(f"shard '{rel}' is missing", file=str(path), key="shards",
                                    fix="restore the .parts folder beside the file or re-run "
                                        "the extraction")
                try:
                    with h5py.File(shard, "r") as sh:
                        ok = bool(sh.attrs.get("complete")) and int(sh.attrs["start"]) == start \
                            and int(sh.attrs["stop"]) == stop
                except OSError:
                    ok = False
                if not ok:
                    raise UserError(f"shard '{rel}' is damaged or does not match", file=str(path),
                                    key="shards", fix="re-run the extraction")
        for name in json.loads(fh.attrs["site_names"]):
            if name not in fh["sites"] or fh["sites"][name].shape[0] != n:
                raise UserError(f"site '{name}' is missing or has the wrong length",
                                file=str(path), key=f"sites/{name}", fix="re-run the extraction")
        _check_digests(fh, path)
    except UserError:
        fh.close()
        raise
    except (KeyError, ValueError, OSError) as exc:
        fh.close()
        raise UserError(f"damaged activation file ({exc.__class__.__name__})", file=str(path),
                        fix="delete it and re-run the extraction") from None
    try:
        # virtual datasets resolve relative sources against the reader's working folder too;
        # reading from the file's own folder makes them resolve to the shards beside it
        yield ActivationFile(path=path, fh=fh)
    finally:
        fh.close()
