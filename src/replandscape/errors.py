"""The one exception type for errors a user can cause (configs, paths, data).

The CLI prints ``UserError`` as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. The message names the file, the key and the fix, on one line."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 fix: str | None = None) -> None:
        parts = []
        if file:
            parts.append(str(file))
        if key:
            parts.append(key)
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        if fix:
            text = f"{text} (fix: {fix})"
        super().__init__(" ".join(text.split()))
        self.file = file
        self.key = key
        self.fix = fix
