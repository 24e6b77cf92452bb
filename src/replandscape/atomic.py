"""Files written whole or not at all: a reader (or a resumed run) never sees half of one."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from replandscape.outputs import ensure_dir, fs_error


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, rename it over
    ``path``. The temporary name is unique, so ranks or jobs writing the same file cannot mix.

    Raises:
        UserError: the file system refused (read-only, full, no permission, a file or folder in
            the way); whatever ``path`` held before is left as it was.
    """
    path = Path(path)
    ensure_dir(path.parent, key=None)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise fs_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise fs_error(exc, path) from None
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_npz_atomic(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """:func:`write_bytes_atomic` of ``arrays`` as a compressed ``.npz`` (``numpy.load`` reads
    it)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue())
