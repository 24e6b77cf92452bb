"""Contract of the activation files: the one writer and the one reader.

One file per run and condition (``activations/shots5.h5``)::

    /                      attrs: kind, schema_version, complete, n_rows, site_names (JSON),
                                  writer ("shards" | "mpio"), model_name, model_path, model_revision,
                                  condition, shots, checkpoint, checkpoint_step, config (YAML),
                                  config_hash, stage_hash, code_version, created, world_size,
                                  accuracy (JSON: micro, macro, per_subject)
    /rows/question_id      [N] int64     id of the question in its split
    /rows/subject          [N] str
    /rows/answer           [N] int8      correct choice index
    /rows/predicted        [N] int8      argmax over the answer-letter tokens
    /rows/correct          [N] bool
    /rows/n_tokens         [N] int32     prompt length in tokens (BOS included)
    /rows/prompt_sha256    [N] S64
    /rows/prompt           [N] str       the exact prompt text (gzip)
    /sites/<name>          [N, D]        last-token vectors (float16/float32, or bfloat16 bits as
                                         uint16 with attr dtype="bfloat16")

Ranks write their own shard (``<stem>.parts/rank0003.h5``: a contiguous block of rows and a per-row
``done`` mask, flushed after each batch) or, when h5py has MPI and the ranks are MPI ranks, one shared
file through ``driver="mpio"``. Finalising writes the file under a temporary name and renames it:
a reader sees a complete file or none. With shards, ``/sites/*`` are virtual datasets over the
shards; the reader checks that every shard exists and is complete, so a missing shard never reads
back as zeros.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replandscape.errors import UserError

KIND = "replandscape.activations"
SCHEMA_VERSION = 1
SHARD_KIND = "replandscape.activation-shard"
NUMERIC_ROW_FIELDS: dict[str, Any] = {
    "question_id": np.int64, "answer": np.int8, "predicted": np.int8, "correct": np.bool_,
    "n_tokens": np.int32,
}


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


# --------------------------------------------------------------------------------------------
# writing: per-rank shards
# --------------------------------------------------------------------------------------------


def _row_chunks(n: int, dim: int) -> tuple[int, int] | None:
    """Chunks of whole rows, about 1 MiB, so a batch write touches few chunks."""
    if n == 0:
        return None
    return (max(1, min(n, (1 << 20) // max(1, dim * 4))), dim)


def _create_partial_layout(fh: Any, n: int, sites: Sequence[SiteSpec], *, chunked: bool) -> None:
    """The datasets of a file being written: sites, numeric row fields and the per-row done mask
    (uint8, 1 = written) that a resumed run reads."""
    grp = fh.create_group("sites")
    for s in sites:
        ds = grp.create_dataset(s.name, shape=(n, s.dim), dtype=s.h5_dtype,
                                chunks=_row_chunks(n, s.dim) if chunked else None)
        ds.attrs["dtype"] = s.dtype
    rows = fh.create_group("rows")
    for name, dt in NUMERIC_ROW_FIELDS.items():
        rows.create_dataset(name, shape=(n,), dtype=dt)
    fh.create_dataset("done", shape=(n,), dtype=np.uint8)


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


class ShardWriter:
    """One rank's rows [start, stop): created, or reopened to resume, and flushed per batch."""

    def __init__(self, final_path: Path, rank: int, world: int, start: int, stop: int,
                 sites: Sequence[SiteSpec], stage_hash: str) -> None:
        h5py = _h5py()
        self.path = shard_path(final_path, rank)
        self.start, self.stop = start, stop
        self.sites = {s.name: s for s in sites}
        n = stop - start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = None
        if self.path.exists():
            try:
                fh = h5py.File(self.path, "r+")
                same = (fh.attrs.get("stage_hash") == stage_hash
                        and int(fh.attrs["start"]) == start and int(fh.attrs["stop"]) == stop
                        and int(fh.attrs["world_size"]) == world
                        and all(name in fh["sites"] for name in self.sites))
            except (OSError, KeyError):
                same = False  # unreadable after a hard kill: this shard starts again
                if fh is not None:
                    fh.close()
                fh = None
            if fh is not None and not same:
                old_world = int(fh.attrs.get("world_size", -1))
                fh.close()
                if old_world != world and old_world > 0:
                    raise UserError(f"a partial extraction made with {old_world} ranks is here; "
                                    f"this run has {world}", file=str(self.path.parent),
                                    fix=f"resume with {old_world} ranks or delete the folder")
                raise UserError("a partial extraction with a different config is here",
                                file=str(self.path.parent),
                                fix="use another run.output_dir or delete the folder")
            if fh is None:
                self.path.unlink()
        if fh is None:
            fh = h5py.File(self.path, "w")
            fh.attrs.update(kind=SHARD_KIND, schema_version=SCHEMA_VERSION,
                            stage_hash=stage_hash, start=start, stop=stop, rank=rank,
                            world_size=world, complete=False)
            _create_partial_layout(fh, n, sites, chunked=True)
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
        self.fh.attrs["complete"] = bool(self.done_mask().all())
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
    """

    def __init__(self, final_path: Path, comm: Any, n_rows: int, sites: Sequence[SiteSpec],
                 stage_hash: str) -> None:
        h5py = _h5py()
        self.path = final_path.with_name(final_path.stem + ".mpio.h5")
        exists = comm.bcast(self.path.exists() if comm.rank == 0 else None, root=0)
        fh = None
        if exists:
            try:
                fh = h5py.File(self.path, "r+", driver="mpio", comm=comm)
            except OSError:  # damaged by a hard kill mid-flush: start this file again
                comm.Barrier()
                if comm.rank == 0:
                    self.path.unlink()
                comm.Barrier()
        if fh is not None:
            same = (fh.attrs.get("stage_hash") == stage_hash and int(fh.attrs["n_rows"]) == n_rows
                    and all(s.name in fh["sites"] for s in sites))
            if not same:
                fh.close()
                raise UserError("a partial extraction with a different config is here",
                                file=str(self.path),
                                fix="use another run.output_dir or delete the file")
        if fh is None:
            fh = h5py.File(self.path, "w", driver="mpio", comm=comm)
            fh.attrs.update(kind=SHARD_KIND, schema_version=SCHEMA_VERSION, stage_hash=stage_hash,
                            n_rows=n_rows, world_size=comm.size, complete=False)
            # contiguous datasets: HDF5 1.10 writes chunked ones only collectively
            _create_partial_layout(fh, n_rows, sites, chunked=False)
        self.fh = fh
        self.comm = comm

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
        self.fh.close()


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


def _write_rows_and_header(fh: Any, header: Mapping[str, Any], subjects: Sequence[str],
                           prompts: Sequence[str], numeric: Mapping[str, np.ndarray]) -> None:
    import hashlib

    h5py = _h5py()
    rows = fh.create_group("rows")
    for name, dt in NUMERIC_ROW_FIELDS.items():
        rows.create_dataset(name, data=np.asarray(numeric[name], dtype=dt))
    str_dt = h5py.string_dtype()
    rows.create_dataset("subject", data=np.asarray(subjects, dtype=object), dtype=str_dt)
    rows.create_dataset("prompt", data=np.asarray(prompts, dtype=object), dtype=str_dt,
                        compression="gzip" if len(prompts) else None)
    rows.create_dataset("prompt_sha256", data=np.asarray(
        [hashlib.sha256(p.encode()).hexdigest() for p in prompts], dtype="S64"))
    acc = accuracy_summary(subjects, numeric["correct"])
    attrs = dict(header)
    attrs.update(kind=KIND, schema_version=SCHEMA_VERSION, n_rows=len(subjects),
                 accuracy=json.dumps(acc), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for key, value in attrs.items():
        fh.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else (
            "" if value is None else value)
    fh.attrs["complete"] = True


def finalize_shards(final_path: Path, world: int, sites: Sequence[SiteSpec],
                    header: Mapping[str, Any], subjects: Sequence[str],
                    prompts: Sequence[str]) -> Path:
    """Join complete shards into ``final_path`` (virtual site datasets), atomically."""
    h5py = _h5py()
    n = len(subjects)
    numeric = {name: np.zeros(n, dtype=dt) for name, dt in NUMERIC_ROW_FIELDS.items()}
    blocks = []
    for rank in range(world):
        path = shard_path(final_path, rank)
        if not path.exists():
            raise UserError(f"shard of rank {rank} is missing", file=str(path),
                            fix="re-run the extraction to resume it")
        with h5py.File(path, "r") as sh:
            start, stop = int(sh.attrs["start"]), int(sh.attrs["stop"])
            if not bool(np.asarray(sh["done"][:]).all()):
                raise UserError(f"shard of rank {rank} is incomplete", file=str(path),
                                fix="re-run the extraction to resume it")
            for name in numeric:
                numeric[name][start:stop] = sh["rows"][name][:]
            blocks.append((path, start, stop))
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
        _write_rows_and_header(fh, {**header, "writer": "shards",
                                    "shards": json.dumps([[os.path.relpath(p, final_path.parent),
                                                           a, b] for p, a, b in blocks])},
                               subjects, prompts, numeric)
    for path, _, _ in blocks:
        with h5py.File(path, "r+") as sh:
            sh.attrs["complete"] = True
    os.replace(tmp, final_path)
    return final_path


def finalize_mpio(final_path: Path, sites: Sequence[SiteSpec], header: Mapping[str, Any],
                  subjects: Sequence[str], prompts: Sequence[str]) -> Path:
    """Turn the shared MPI-IO file into the final file (rank 0, after all ranks closed it)."""
    h5py = _h5py()
    src = final_path.with_name(final_path.stem + ".mpio.h5")
    with h5py.File(src, "r+") as fh:
        if not bool(np.asarray(fh["done"][:]).all()):
            raise UserError("the shared extraction file is incomplete", file=str(src),
                            fix="re-run the extraction to resume it")
        numeric = {name: fh["rows"][name][:] for name in NUMERIC_ROW_FIELDS}
        del fh["rows"]
        del fh["done"]
        for key in ("stage_hash", "n_rows", "world_size", "complete"):
            if key in fh.attrs:
                del fh.attrs[key]
        _write_rows_and_header(fh, {**header, "writer": "mpio"}, subjects, prompts, numeric)
    os.replace(src, final_path)
    return final_path


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

    def rows(self, name: str) -> np.ndarray:
        if name not in self.fh["rows"]:
            raise UserError(f"no row field '{name}'", file=str(self.path), key=f"rows/{name}",
                            fix="re-run the extraction with this version")
        data = self.fh["rows"][name][:]
        if data.dtype == object:
            return np.asarray([v.decode() if isinstance(v, bytes) else v for v in data],
                              dtype=object)
        return np.asarray(data)

    def site(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The [N, D] float32 array of one site (optionally a subset of rows)."""
        if name not in self.fh["sites"]:
            raise UserError(f"site '{name}' does not exist", file=str(self.path),
                            key=f"sites/{name}",
                            fix=f"use one of {self.site_names[0]}..{self.site_names[-1]}")
        ds = self.fh["sites"][name]
        raw = ds[:] if rows is None else ds[np.sort(rows)]
        if rows is not None:
            raw = raw[np.argsort(np.argsort(rows))]
        return decode_rows(raw, str(ds.attrs.get("dtype", "float32")))

    def close(self) -> None:
        self.fh.close()


@contextmanager
def open_activations(path: str | os.PathLike[str]) -> Iterator[ActivationFile]:
    """Open and check an activation file; refuse partial, foreign or damaged files."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        hint = " (a partial run is present)" if parts_dir(path).exists() or path.with_name(
            path.stem + ".mpio.h5").exists() else ""
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
