"""What may go into an HTTP header the ingress writes (RFC 9110 §5.1, §5.5), checked before it is.

Values that come from outside the ingress (a worker's content type and headers, a job record, a
client's metadata) become header fields only through `field_value` and `field_name`: a CR or LF in
one would end the header line and let its sender write headers, or a whole response, of its own
(response splitting). Visible ASCII, space and tab only: RFC 9110 also admits obs-text (bytes
0x80-0xFF), but says senders SHOULD NOT generate it, and a character outside Latin-1 cannot be
written at all.
"""

from __future__ import annotations

import re
from typing import Final

from casola.wire.meta import is_field_value

__all__ = ["VISIBLE", "BadField", "field_name", "field_value", "value_or"]

VISIBLE: Final = bytes([0x09, *range(0x20, 0x7F)])  # HTAB, SP and VCHAR: `bytes.translate(None, VISIBLE)`
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2


class BadField(ValueError):
    """A header name or value that must not be written; the message says which and why."""


def field_value(value: str, what: str) -> bytes:
    """`value` as the bytes of a header field value.

    Args:
        value: the text, e.g. a content type a worker sent.
        what: what it is, for the error message ("the answer's content type").

    Raises:
        BadField: a character other than visible ASCII, space or tab.
    """
    if not is_field_value(value):
        raise BadField(f"{what} has a character not allowed in an HTTP header: {value[:80]!r}")
    return value.encode("ascii")


def field_name(name: str) -> bytes:
    """`name` as a lower-case header field name.

    Raises:
        BadField: not an RFC 9110 token.
    """
    if _TOKEN.fullmatch(name) is None:
        raise BadField(f"header name {name[:80]!r} is not a token")
    return name.lower().encode("ascii")


def value_or(value: str, fallback: bytes) -> bytes:
    """`value` as a header field value, or `fallback` when it is empty or cannot be one (a job
    record stored before values were checked, say). Raises nothing."""
    if not value or not is_field_value(value):
        return fallback
    return value.encode("ascii")
