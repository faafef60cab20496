"""The revocation list: which key ids are refused, read from a text file that another process may rewrite.

File format: one kid per line; blank lines and lines starting with `#` are ignored, as is anything after
a `#` on a line. A missing file means nothing is revoked. Writers replace the file atomically (write a
temporary file, then `os.replace`), so a reader sees the old list or the new one, never half of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["RELOAD_INTERVAL_S", "RevocationList", "parse_revocations"]

# How stale the list may get in a running process. One stat() per second keeps the per-request cost a
# float compare while a revocation made by `casola keys revoke` takes effect within about a second
# (nginx's `open_file_cache_valid` defaults to 60 s; we want revocation to bite faster than that).
RELOAD_INTERVAL_S: Final = 1.0

_Signature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino); the inode changes on os.replace
_ABSENT: Final[_Signature] = (-1, -1, -1)


def parse_revocations(text: str) -> frozenset[str]:
    """The kids named in a revocation file's text (comments and blank lines dropped)."""
    kids = set()
    for line in text.splitlines():
        kid = line.split("#", 1)[0].strip()
        if kid:
            kids.add(kid)
    return frozenset(kids)


class RevocationList:
    """The set of revoked kids, kept in step with a file by `reload()` / `maybe_reload(now)`."""

    __slots__ = ("_kids", "_last_check", "_path", "_signature")

    def __init__(self, path: Path | None) -> None:
        """Load `path` now; a path that does not exist yet (or None) means nothing is revoked.

        Raises:
            OSError: the file exists but cannot be read.
            UnicodeDecodeError: the file is not UTF-8.
        """
        self._path = Path(path) if path is not None else None
        self._kids: frozenset[str] = frozenset()
        self._signature = _ABSENT
        self._last_check = float("-inf")
        self.reload()

    @property
    def path(self) -> Path | None:
        return self._path

    def __contains__(self, kid: object) -> bool:
        return kid in self._kids

    def __len__(self) -> int:
        return len(self._kids)

    def reload(self) -> bool:
        """Re-read the file now.

        Returns:
            True if the set of revoked kids changed.

        Raises:
            OSError: the file exists but cannot be read (a missing file is an empty list, not an error).
            UnicodeDecodeError: the file is not UTF-8.
        """
        if self._path is None:
            return False
        try:
            with open(self._path, "rb") as f:
                signature = _signature_of(os.fstat(f.fileno()))
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            signature, text = _ABSENT, ""
        self._signature = signature
        kids = parse_revocations(text)
        changed = kids != self._kids
        self._kids = kids
        return changed

    def refresh(self) -> bool:
        """Stat the file now and reload it if it changed. Returns True if the set changed.

        Raises:
            Nothing: a file that cannot be read keeps the last list.
        """
        if self._path is None:
            return False
        try:
            signature = _signature_of(os.stat(self._path))
        except FileNotFoundError:
            signature = _ABSENT
        except OSError:
            return False
        if signature == self._signature:
            return False
        try:
            return self.reload()
        except (OSError, UnicodeDecodeError):
            return False

    def maybe_reload(self, now: float) -> bool:
        """Stat the file at most once per `RELOAD_INTERVAL_S` of `now`; reload it if it changed.

        Cheap enough to call on every request: between checks it is one float comparison. If `now`
        jumps backwards (a clock step) the file is checked at once rather than after the jump.
        A file that cannot be stat()ed or read keeps the last list that was read; the next check
        (a second later) tries again, so a transient error never fails requests.

        Returns:
            True if the set of revoked kids changed.

        Raises:
            Nothing.
        """
        last = self._last_check
        if last <= now < last + RELOAD_INTERVAL_S or self._path is None:
            return False
        self._last_check = now
        return self.refresh()


def _signature_of(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)
