"""How many bytes a peer has really taken: what was written less what still waits, in the
transport's buffer and in the kernel's send queue.

A slow reader's clock (the HTTP and WebSocket adapters' `send_timeout`) must count from the client's
last bytes taken. The transport's buffer alone does not say: a socket's kernel send buffer grows to
megabytes (TCP autotuning), and while it drains to a client reading 3 MiB/s the transport's buffer
does not move for a second or more, so a client reading all along looked stopped. Linux's SIOCOUTQ
(TIOCOUTQ on a socket) gives the bytes the kernel still holds (unsent and unacknowledged). It is read
only on the slow-reader timer's tick while writing is paused, never per write.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from typing import Final

__all__ = ["kernel_unsent", "taken"]

_OUTQ: Final = getattr(termios, "TIOCOUTQ", 0)
_INT: Final = struct.Struct("i")


def kernel_unsent(fd: int) -> int:
    """Bytes in the socket's kernel send queue (0 where the platform cannot say)."""
    if not _OUTQ or fd < 0:
        return 0
    try:
        (n,) = _INT.unpack(fcntl.ioctl(fd, _OUTQ, b"\0\0\0\0"))
        return int(n)
    except OSError:
        return 0


def taken(written: int, transport: asyncio.Transport, fd: int) -> int:
    """Of `written` bytes, those the peer has taken (over TLS the kernel holds ciphertext, a little
    more than the plaintext written: an underestimate, which only makes the clock stricter)."""
    return written - transport.get_write_buffer_size() - kernel_unsent(fd)
