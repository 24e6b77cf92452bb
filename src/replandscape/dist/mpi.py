"""The mpi4py layer: the communicator, dynamic work sharing, thread caps and prompt aborts.

Tasks are handed out through a shared counter in an MPI window (one atomic fetch-and-add per task),
so every rank works and a rank that finishes early takes the next task; no rank sits idle as a
master. A rank that fails prints its error and aborts the whole job, so no rank waits forever in a
collective call.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from replandscape.errors import UserError


def launched_by_mpi() -> bool:
    """True when this process was started by mpiexec/mpirun or srun with an MPI plugin."""
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    return any(k in os.environ for k in keys)


class _SerialComm:
    """A communicator of one, for runs outside MPI (same calls as mpi4py's)."""

    rank = 0
    size = 1

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def Barrier(self) -> None:  # noqa: N802
        pass

    barrier = Barrier

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def world() -> Any:
    """COMM_WORLD when launched by MPI, else a serial stand-in (no MPI initialised)."""
    if not launched_by_mpi():
        return _SerialComm()
    from mpi4py import MPI

    return MPI.COMM_WORLD


@dataclass
class SharedCounter:
    """An integer in rank 0's memory that any rank can fetch-and-increment atomically."""

    comm: Any
    win: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.comm, _SerialComm):
            self._local = 0
            return
        import numpy as np
        from mpi4py import MPI

        size = np.dtype(np.int64).itemsize if self.comm.rank == 0 else 0
        self.win = MPI.Win.Allocate(size, np.dtype(np.int64).itemsize, comm=self.comm)
        if self.comm.rank == 0:
            buf = np.frombuffer(self.win.tomemory(), dtype=np.int64)
            buf[0] = 0
        self.comm.Barrier()

    def next(self) -> int:
        if self.win is None:
            value = self._local
            self._local += 1
            return value
        import numpy as np
        from mpi4py import MPI

        one = np.ones(1, dtype=np.int64)
        got = np.zeros(1, dtype=np.int64)
        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Fetch_and_op(one, got, 0, 0, MPI.SUM)
        self.win.Unlock(0)
        return int(got[0])

    def free(self) -> None:
        if self.win is not None:
            self.win.Free()
            self.win = None


def dynamic_tasks(comm: Any, n_tasks: int) -> Iterator[int]:
    """Yield task indices to this rank until all ``n_tasks`` are taken (each exactly once)."""
    counter = SharedCounter(comm)
    try:
        while True:
            task = counter.next()
            if task >= n_tasks:
                break
            yield task
    finally:
        comm.Barrier()
        counter.free()


def threads_for(cpus_in_affinity: int, slurm_cpus_per_task: int | None, local_ranks: int) -> int:
    """Threads one rank may run: its own CPUs, shared with the ranks whose CPUs overlap its own.

    Args:
        cpus_in_affinity: CPUs this process may run on (``os.sched_getaffinity``).
        slurm_cpus_per_task: ``SLURM_CPUS_PER_TASK`` when set: the task's allocation, which
            bounds the count when the affinity is wider than the allocation (a task plugin that
            does not bind, e.g. ``task/none``).
        local_ranks: ranks on this node whose CPU sets overlap this rank's, itself included
            (1 when every rank is bound to its own CPUs, all ranks of the node when none is).

    Returns:
        At least 1.
    """
    threads = max(1, cpus_in_affinity) // max(1, local_ranks)
    if slurm_cpus_per_task:
        threads = min(threads, slurm_cpus_per_task)
    return max(1, threads)


def _affinity() -> frozenset[int]:
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def _slurm_cpus_per_task() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def ranks_sharing_cpus(comm: Any, cpus: frozenset[int]) -> int:
    """Ranks on this node (``comm``'s shared-memory split) whose CPU sets overlap ``cpus``,
    this rank included. Collective over ``comm``."""
    if isinstance(comm, _SerialComm) or comm.size == 1:
        return 1
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        sets = local.allgather(sorted(cpus))
    finally:
        local.Free()
    return sum(1 for other in sets if cpus.intersection(other))


def threads_per_rank(comm: Any, requested: int | None) -> int:
    """Threads for this rank: ``requested`` when given, else this rank's share of the CPUs it
    may run on (see :func:`threads_for`). Collective over ``comm`` unless ``requested`` is given
    (every rank reads the same config, so all ranks take the same branch).

    Ranks are counted per node, not over the world: 16 ranks on 4 nodes of 8 CPUs each, bound
    to 8 CPUs per task, run 8 threads each, not 8 // 16.
    """
    if requested:
        return requested
    cpus = _affinity()
    return threads_for(len(cpus), _slurm_cpus_per_task(), ranks_sharing_cpus(comm, cpus))


@contextmanager
def abort_on_error(comm: Any, what: str) -> Iterator[None]:
    """Turn any exception on one rank into a printed error and an abort of every rank."""
    try:
        yield
    except UserError as exc:
        if comm.size > 1:  # alone, the CLI prints it; with peers, nobody else will
            print(f"replandscape: error: rank {comm.rank}: {what}: {exc}", file=sys.stderr,
                  flush=True)
            comm.Abort(1)
        raise
    except Exception:
        if comm.size > 1:
            print(f"replandscape: rank {comm.rank} failed in {what}:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise


def row_block(n: int, rank: int, size: int) -> np.ndarray:
    """Contiguous block of rows ``rank`` of ``size`` takes (every row once)."""
    return np.array_split(np.arange(n), size)[rank]


def distributed_knn(comm: Any, X: np.ndarray, k: int, threads: int | None = None,
                    device: str = "cpu") -> Any:
    """Exact neighbours of every row of ``X`` (present on every rank), each rank searching a block
    of rows against all of them; rank 0 gets the joined ``(dist, ind)``, the others None."""
    from replandscape.metrics.neighbors import exact_knn_rows

    rows = row_block(X.shape[0], comm.rank, comm.size)
    part = exact_knn_rows(X, rows, k, threads=threads, device=device)  # type: ignore[arg-type]
    parts = comm.gather(part, root=0)
    if comm.rank != 0:
        return None
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
