"""Progress bars for loops a person waits for, shown on one rank only."""

from __future__ import annotations

from typing import Any


class _Silent:
    """What ranks other than the one that reports get: the same calls, no output."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, *, show: bool, unit: str = "it") -> Any:
    """A tqdm bar when ``show`` (rank 0), else a silent stand-in."""
    if not show:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)
