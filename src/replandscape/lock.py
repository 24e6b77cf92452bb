"""One live run per output folder and stage.

Two runs writing the same stage into the same folder (a resubmitted job while the first still
runs, a ``run`` typed by hand beside a queued job) would interleave checkpoints and results. A
stage therefore holds ``folder/.STAGE.lock`` for as long as it writes there.

The lock is an ``fcntl.flock`` on an open file descriptor, not the file's existence: the kernel
(or the file system's lock manager) drops it when the holding process exits for any reason,
``SIGKILL`` and out-of-memory kills included, so a lock left behind by a dead process never blocks
the next run. The file itself only carries JSON ``{host, pid, started, stage}`` so that a refused
run can say who holds the folder.

The output folder usually lives on a shared file system, so ``flock`` must be honoured across
nodes there: it is on Lustre mounted with ``-o flock``, on GPFS/Spectrum Scale, and on NFSv4
(where ``flock`` is emulated with byte-range locks held by the server). On Lustre mounted with
``localflock`` a lock is only seen by processes on the same node, and with ``noflock`` it fails;
the latter is reported as a :class:`~replandscape.errors.UserError`. If the node of a holder
dies, the server may keep its lock until it evicts that client; deleting the lock file then frees
the folder (the next run creates and locks a new file).

Take the lock in one process per run (the launcher, or rank 0 of a distributed job): a second
descriptor on the same file, even in the same process, is refused like any other holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from replandscape.errors import UserError

__all__ = ["lock_path", "rank0_stage_lock", "read_holder", "stage_lock"]

# Tries to get a lock whose file another process unlinks (releases) between our open and our
# flock; each retry sees a newer file, so a few tries are plenty.
_MAX_TRIES = 20


def lock_path(folder: Path, stage: str) -> Path:
    """The lock file of ``stage`` in ``folder``."""
    return Path(folder) / f".{stage}.lock"


def read_holder(path: Path) -> dict[str, object] | None:
    """The holder record in lock file ``path``, or ``None`` when it is absent or not yet written
    (a holder writes it just after taking the lock)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict[str, object] | None) -> str:
    if holder is None:
        return "by a process that has not yet written its record"
    started = holder.get("started")
    since = (time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started))
             if isinstance(started, int | float) else "an unknown time")
    return (f"by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"since {since}")


@contextlib.contextmanager
def stage_lock(folder: Path, stage: str) -> Iterator[None]:
    """Hold the lock of ``stage`` in ``folder`` for the body of the ``with``.

    Args:
        folder: The output folder the stage writes into (created if missing).
        stage: The stage name; the lock file is ``folder/.{stage}.lock``.

    Raises:
        UserError: Another live process holds the lock (the one line names its host, its pid
            and since when, and the fix), or the file system does not support ``flock``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder, stage)
    fd = _acquire(path, stage)
    try:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "stage": stage}
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        yield
    finally:
        # Unlink while still holding the lock, then close: a process that opened the old file
        # in between sees, after its own flock, that the path no longer names its file, and
        # retries on a new one (see _acquire), so two holders can never coexist.
        with contextlib.suppress(FileNotFoundError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _acquire(path: Path, stage: str) -> int:
    for _ in range(_MAX_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"stage {stage!r} is already running on this output folder, held "
                    f"{_describe(read_holder(path))}",
                    file=str(path),
                    fix=("wait for that run to finish; if that process is gone (its node died), "
                         f"delete {path}")) from None
            raise UserError(
                f"cannot lock the output folder for stage {stage!r}: the file system refuses "
                f"flock ({os.strerror(exc.errno or 0)})",
                file=str(path),
                fix=("put the output folder on a file system with flock enabled (Lustre "
                     "'-o flock', GPFS, NFSv4) or a node-local disk")) from None
        if _same_file(fd, path):
            return fd
        # The previous holder released (unlinked) the file between our open and our flock.
        os.close(fd)
    raise UserError(f"could not take the lock for stage {stage!r} after {_MAX_TRIES} tries: "
                    "other runs keep taking and releasing it", file=str(path),
                    fix="run one job per output folder and stage at a time")


@contextlib.contextmanager
def rank0_stage_lock(folder: Path, stage: str) -> Iterator[None]:
    """:func:`stage_lock` for a run of several torch ranks: rank 0 creates the folder and holds
    the lock, and every rank learns whether it got it (all raise the same one line if not), so
    no rank starts alone.

    Raises:
        UserError: As :func:`stage_lock`, on every rank.
    """
    from replandscape.dist import torchdist
    from replandscape.outputs import ensure_dir

    with contextlib.ExitStack() as stack:
        problem: str | None = None
        if torchdist.rank_info().is_main:
            try:
                stack.enter_context(stage_lock(ensure_dir(folder), stage))
            except UserError as exc:
                problem = str(exc)
        problem = torchdist.broadcast_object(problem)
        if problem is not None:
            raise UserError(problem)
        yield
