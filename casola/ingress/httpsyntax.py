"""Two pieces of HTTP/1.1 syntax that llhttp parses but does not hand over: the authority of an
absolute-form request target, and the size a chunk declares.

- RFC 9112 §3.2.2: a server MUST accept `POST http://host/v1/run/echo HTTP/1.1` and use the target's
  authority instead of the Host field (proxies and some clients send this form).
- A chunk's size line comes before its data; llhttp checks it but only reports the data as it
  arrives, so a client that declares a chunk larger than the body limit and sends it slowly (or
  never) would be found out only at the limit or at the body timeout. `declared_chunk_size` reads the
  size line back from the bytes the parser just took, so the 413 goes out at once.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SIZE_LINE_MAX", "TAIL", "absolute_target", "declared_chunk_size"]

_SCHEMES: Final = (b"http://", b"https://")
SIZE_LINE_MAX: Final = 256  # longer size lines (long chunk extensions) are not read back
TAIL: Final = SIZE_LINE_MAX + 3  # kept of the previous reads: the LF before a size line, it, its CRLF


def absolute_target(url: bytes) -> tuple[bytes, bytes] | None:
    """(authority, origin-form target) of an absolute-form target, or None when `url` is not one.
    `http://h:8000/v1/run/echo?x=1` -> (b"h:8000", b"/v1/run/echo?x=1"); no path -> "/"."""
    if url[:1] == b"/" or not url[:8].lower().startswith(_SCHEMES):
        return None
    rest = url[url.index(b"://") + 3 :]
    end = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    authority, target = rest[:end], rest[end:]
    if b"@" in authority:
        authority = authority.rpartition(b"@")[2]  # RFC 9110 §4.2.4: userinfo is not for servers
    if not target.startswith(b"/"):
        target = b"/" + target
    return authority, target


def declared_chunk_size(before: bytes, data: bytes, taken_after: int) -> int | None:
    """The size the last chunk header in `data` declared, when the parser just took that header and
    then `taken_after` bytes of the chunk's data, which end `data`. `before`: the last TAIL bytes
    read before `data` (a size line, its CRLF included, may be split across reads, down to one byte
    a read). None when it cannot be read back."""
    stop = len(data) - taken_after  # just after the size line's LF
    lo = stop - TAIL
    buf = data[lo:stop] if lo >= 0 else before + data[:stop]  # at most 2 x TAIL bytes copied
    end = len(buf) - 2
    if end < 0 or buf[end:] != b"\r\n":
        return None
    start = buf.rfind(b"\n", 0, end) + 1  # the LF before the line: the head's, or the last chunk's
    if not start:
        return None  # longer than SIZE_LINE_MAX
    digits = buf[start:end].partition(b";")[0].strip(b" \t")
    try:
        return int(digits, 16)
    except ValueError:
        return None
