"""Durable, atomic small-file writes for state-directory files (keys, certificates, lists), and
private creation of the files others write (the job store's database).

Written to a fresh temporary file beside the target, fsynced, then renamed over it (or linked, when
the target must not exist yet): a reader sees the old file or the new one, never half of one, and
the file never exists with a wider mode than asked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["create_private", "write_atomic"]


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` atomically with `mode`.

    Returns:
        True; False only when `exclusive` and `path` already existed (it is left untouched).

    Raises:
        OSError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # O_CREAT's mode is narrowed by the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if path exists, unlike rename
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def create_private(path: Path, mode: int = 0o600) -> bool:
    """Create `path` empty with `mode`, unless it exists (then it is left as it is).

    Returns:
        True if this call created it.

    Raises:
        OSError: the file cannot be created (e.g. its directory is missing).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is narrowed by the umask
    finally:
        os.close(fd)
    return True
