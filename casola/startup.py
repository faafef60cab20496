"""Starting a role: what its user can fix is told in one line (casola/cli.py prints `casola <role>:
<message>` and exits 1), not as a traceback: an address in use or that does not resolve, a state
directory that cannot be written, a file that cannot be read, a job store that cannot be opened.
The traceback is still logged at debug level (`--log-level debug`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Final, TypeVar

from casola.store.base import StoreError

__all__ = ["StartupError", "explain", "start_or_explain", "state_dir_ready"]

log = logging.getLogger("casola")
T = TypeVar("T")


class StartupError(Exception):
    """A role cannot start for a reason its user can fix (casola/cli.py prints it as one line)."""


# asyncio's and uvloop's bind failure: "error while attempting to bind on address ('::1', 80, 0, 0): ..."
_BIND: Final = re.compile(r"bind on address \('([^']*)', (\d+)")


async def start_or_explain(start: Awaitable[T], *listens: str) -> T:
    """Await `start` (a node's or listener's start) and return what it returns, turning what the
    user can fix into StartupError.

    Raises:
        StartupError: a listener cannot be bound (`listens`: the addresses it binds, for a name that
            does not resolve), a file cannot be read, the job store cannot be opened or is misnamed.
    """
    try:
        return await start
    except OSError as exc:
        log.debug("start failed", exc_info=True)
        raise StartupError(explain(exc, listens)) from exc
    except StoreError as exc:  # an unreachable database, a file it cannot open
        log.debug("start failed", exc_info=True)
        raise StartupError(f"job store: {exc}") from exc
    except ValueError as exc:  # open_store's unknown URL, a webhook key that is not one: they say which
        log.debug("start failed", exc_info=True)
        raise StartupError(str(exc)) from exc


def explain(exc: OSError, listens: Sequence[str]) -> str:
    """One line for an OSError at start: which address could not be bound and why, or which file."""
    reason = (os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else exc.strerror) or str(exc)
    if m := _BIND.search(str(exc)):
        host, port = m.groups()
        return f"cannot listen on {f'[{host}]' if ':' in host else host}:{port}: {reason.lower()}"
    if isinstance(exc, socket.gaierror):  # which of the addresses has a name that does not resolve
        names = [a for a in listens if a and not _is_ip(a.rpartition(":")[0].strip("[]"))] or list(listens)
        return f"cannot listen on {' or '.join(names)}: {(exc.strerror or str(exc)).lower()}"
    if isinstance(exc, ssl.SSLError):  # tls_cert/tls_key not a PEM chain and its key (certs.py names them)
        return exc.strerror or str(exc)
    if exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == ""  # "" binds every address
    return True


def state_dir_ready(state_dir: Path) -> None:
    """Make the state directory (0700) and check that a file can be written in it, before anything
    starts: a role would otherwise fail later with a traceback from whatever wrote first.

    Raises:
        StartupError: it cannot be made or written.
    """
    if state_dir.exists() and not state_dir.is_dir():
        raise StartupError(f"cannot write the state directory {state_dir}: it is not a directory")
    try:
        if not state_dir.is_dir():
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as exc:
        raise StartupError(f"cannot write the state directory {state_dir}: {exc.strerror or exc}") from exc
