"""Output folders and file-system errors a user can cause.

Every stage writes under ``run.output_dir`` (and a few caches elsewhere). When the file system
refuses (the path is a file, lies under a file, is on a read-only mount, has no permission, the
disk is full), the user should read one line naming the path and what to change, not an
``OSError`` traceback; :func:`fs_error` builds that line and :func:`ensure_dir` applies it to the
creation of a folder. :mod:`replandscape.atomic` uses the same conversion for every file it
writes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from replandscape.errors import UserError

# errno values that describe the machine or the user's paths, never a bug in this suite: the CLI
# turns them into one line even when they come from a writer that does not use this module
ENVIRONMENT_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                errno.EPERM})


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder (why ENOTDIR happened)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def fs_error(exc: OSError, path: str | os.PathLike[str], *, key: str | None = None,
             folder: bool = False) -> UserError:
    """The one-line :class:`UserError` for a file-system error met while writing ``path``.

    Args:
        exc: the error the operating system raised.
        path: the file or folder being written or created.
        key: the config key that chose ``path`` (e.g. ``run.output_dir``), named in the fix.
        folder: whether ``path`` is meant to be a folder (changes the wording only).

    Returns:
        The error to raise (``raise fs_error(...) from None``).
    """
    p = Path(path)
    what = "folder" if folder else "file"
    choose = f"choose another {key}" if key else "choose another location"
    code = exc.errno
    if code == errno.EEXIST or (folder and p.exists() and not p.is_dir()):
        message = "is a file, not a folder" if folder else "already exists and is in the way"
        fix = f"move that file away or {choose}"
    elif code == errno.ENOTDIR:
        blocker = _file_ancestor(p)
        message = (f"'{blocker}' is a file, so no {what} can be made under it" if blocker
                   else "a part of this path is not a folder")
        fix = f"move that file away or {choose}"
    elif code == errno.EISDIR:
        message = "is a folder where a file must be written"
        fix = f"move that folder away or {choose}"
    elif code == errno.EROFS:
        message = "is on a read-only file system"
        fix = f"{choose} on a writable file system, e.g. scratch or home"
    elif code in (errno.EACCES, errno.EPERM):
        message = f"no permission to write '{_nearest_existing(p)}'"
        fix = f"{choose} that you can write, or change the folder's permissions"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        message = ("the disk is full" if code == errno.ENOSPC else "the disk quota is exceeded") \
            + " while writing here"
        fix = f"free space or quota there, or {choose}"
    elif code == errno.ENAMETOOLONG:
        message = "the path is too long"
        fix = f"{choose} with a shorter path"
    elif code == errno.ENOENT:
        message = f"cannot be created: {exc.strerror or 'no such file or folder'}"
        fix = f"{choose} on a writable file system"
    else:
        message = f"cannot be written: {exc.strerror or exc}"
        fix = f"check the file system or {choose}"
    return UserError(message, file=str(p), key=key, fix=fix)


def ensure_dir(path: str | os.PathLike[str], key: str | None = "run.output_dir") -> Path:
    """Create the folder ``path`` (and its parents) or raise a one-line :class:`UserError`.

    The folder must also be writable: an existing folder on a read-only mount passes ``mkdir``
    but would fail at the first file, after work was spent.

    Args:
        path: the folder to create.
        key: the config key that chose it, named in the error (``None`` when no key did).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: the folder cannot be created or written.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fs_error(exc, p, key=key, folder=True) from None
    # os.access reports EROFS even to root, whose permission bits are otherwise bypassed
    if not os.access(p, os.W_OK | os.X_OK):
        try:  # ask the file system why, so the line says read-only or permission
            probe = os.open(p / f".replandscape-write-test.{os.getpid()}",
                            os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise fs_error(exc, p, key=key, folder=True) from None
        os.close(probe)
        os.unlink(p / f".replandscape-write-test.{os.getpid()}")
    return p


def environment_error(exc: OSError) -> UserError | None:
    """The one-line error for an ``OSError`` that only the machine or the user's paths can cause
    (read-only, full, quota, permission), raised by code that did not convert it itself (e.g. a
    library writing HDF5); ``None`` for any other error, which may be a bug and keeps its
    traceback."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    fixes = {errno.EROFS: "choose an output location on a writable file system",
             errno.ENOSPC: "free space there or choose another output location",
             errno.EDQUOT: "free quota there or choose another output location"}
    fix = fixes.get(exc.errno or 0, "check the permissions, or choose a location you can use")
    return UserError(exc.strerror or str(exc), file=exc.filename and str(exc.filename),
                     fix=fix)
