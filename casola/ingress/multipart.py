"""multipart/form-data (RFC 7578), sans-I/O: a complete body in, its parts out.

The parts' data are memoryviews into the body, so a file part (the audio of a transcription) goes
upstream without a copy. Only what form posts use is understood: `Content-Disposition: form-data`
with `name` and `filename`, and `Content-Type`; other part headers are ignored.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["MultipartError", "Part", "boundary_of", "parse"]

MAX_PARTS = 256
MAX_PART_HEAD = 8192


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data; the message says where."""


class Part(NamedTuple):
    name: str
    filename: str | None
    content_type: str
    data: memoryview


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart/form-data content type.

    Raises:
        MultipartError: not multipart/form-data, or no usable boundary.
    """
    kind, _, rest = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise MultipartError(f"expected Content-Type multipart/form-data, got {kind.strip() or 'none'!r}")
    for name, value in _params(rest):
        if name == "boundary" and 1 <= len(value) <= 70:
            return value.encode("latin-1")
    raise MultipartError("multipart/form-data without a boundary (1 to 70 characters)")


def parse(body: bytes | bytearray | memoryview, boundary: bytes) -> list[Part]:
    """The parts of `body`, in order.

    Raises:
        MultipartError: a missing delimiter, a part head without its blank line or name, too many parts.
    """
    data = bytes(body) if not isinstance(body, bytes) else body
    view = memoryview(data)
    delim = b"--" + boundary
    start = data.find(delim)
    if start < 0 or (start and data[start - 2 : start] != b"\r\n"):
        raise MultipartError("the body does not start with the boundary")
    pos = start + len(delim)
    parts: list[Part] = []
    sep = b"\r\n" + delim
    while True:
        if data.startswith(b"--", pos):
            return parts  # the close delimiter
        nl = data.find(b"\r\n", pos)  # transport padding may follow a delimiter (RFC 2046 §5.1.1)
        if nl < 0 or data[pos:nl].strip(b" \t"):
            raise MultipartError("garbage after a boundary")
        head_end = data.find(b"\r\n\r\n", nl)
        if head_end < 0 or head_end - nl > MAX_PART_HEAD:
            raise MultipartError("a part's headers do not end (missing blank line)")
        name, filename, ctype = _part_head(data[nl + 2 : head_end])
        body_start = head_end + 4
        end = data.find(sep, body_start)
        if end < 0:
            raise MultipartError(f"part {name!r} is not closed by the boundary")
        if len(parts) >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        parts.append(Part(name, filename, ctype, view[body_start:end]))
        pos = end + len(sep)


def _part_head(raw: bytes) -> tuple[str, str | None, str]:
    name: str | None = None
    filename: str | None = None
    ctype = ""
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        key, colon, value = line.partition(b":")
        if not colon:
            raise MultipartError("a malformed part header line")
        key_l = key.strip().lower()
        text = value.strip().decode("utf-8", "replace")
        if key_l == b"content-disposition":
            kind, _, rest = text.partition(";")
            if kind.strip().lower() != "form-data":
                raise MultipartError(f"part disposition must be form-data, got {kind.strip()!r}")
            for pname, pvalue in _params(rest):
                if pname == "name":
                    name = pvalue
                elif pname == "filename":
                    filename = pvalue
        elif key_l == b"content-type":
            ctype = text
    if name is None:
        raise MultipartError("a part without a name")
    return name, filename, ctype


def _params(text: str) -> list[tuple[str, str]]:
    """`; a=b; c="d \\"e\\""` -> [(a, b), (c, 'd "e')]: parameters with quoted-string values."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t;":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lower()
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            value = "".join(chars)
            i += 1
        else:
            semi = text.find(";", i)
            semi = n if semi < 0 else semi
            value = text[i:semi].strip()
            i = semi
        out.append((key, value))
    return out
