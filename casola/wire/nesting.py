"""The nesting bound of metadata (SPEC §4.2): arrays and maps at most `MAX_META_DEPTH` deep.

v1's own fields nest two deep (the metadata array, then a map or an array of scalars), and msgspec
refuses anything deeper in them at once. Only array elements a receiver ignores (a newer sender's
trailing fields) may hold deeper values, and msgspec skips those recursively: left alone, how deep
it gets before a `RecursionError` would depend on the interpreter's stack. So metadata with more
elements than its schema has fields is scanned here, without recursion, and anything nested deeper
than the bound is refused like any other invalid metadata. Metadata with fewer container headers
than the bound cannot exceed it and is not scanned (one C-speed byte count).
"""

from __future__ import annotations

from typing import Final

from casola.wire.limits import MAX_META_DEPTH

__all__ = ["nests_too_deep"]

# Header bytes that may open an array or a map: fixmap, fixarray, array16/32, map16/32. Counted
# anywhere in the bytes (inside strings too) this over-counts, which only makes the filter safe.
_OPENERS: Final = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"
# After the type byte: (size of the count, values per count) for array16/32 and map16/32.
_CONTAINER: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
# After the type byte: (size of the length, bytes before the data) for bin, ext and str 8/16/32.
_SIZED: Final = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
}  # fmt: skip
# After the type byte: how many bytes the value takes (nil, bools, numbers, fixext).
_FIXED: Final = {
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8,
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip


def nests_too_deep(raw: memoryview, known_fields: int, limit: int = MAX_META_DEPTH) -> bool:
    """Whether metadata that decoded against a schema of `known_fields` fields breaks the nesting
    bound: it has ignored trailing elements, and an array or map among them sits deeper than `limit`
    (the metadata array itself is depth 1).

    `raw` is one msgpack array the schema's decoder has accepted, so it is well formed; bytes that
    cannot be read anyway count as too deep. Raises nothing.
    """
    first = raw[0]
    if 0x90 <= first <= 0x9F:
        count = first & 0x0F
    elif first in (0xDC, 0xDD):
        count = int.from_bytes(raw[1 : 3 if first == 0xDC else 5], "big")
    else:
        return False  # not an array: the schema's decoder would have refused it
    if count <= known_fields:
        return False
    data = bytes(raw)
    if len(data) - len(data.translate(None, _OPENERS)) <= limit:
        return False  # fewer openers than the bound: nothing can nest deeper than it
    try:
        return _deeper_than(data, limit)
    except (IndexError, KeyError):  # unreadable (0xc1, cut short): not metadata a receiver accepts
        return True


def _deeper_than(data: bytes, limit: int) -> bool:
    """Walk one msgpack value with an explicit stack: `left[i]` is how many values the container
    at depth i still holds (`left[0]` stands for the value itself)."""
    pos, left = 0, [1]
    while left:
        if not left[-1]:
            left.pop()
            continue
        left[-1] -= 1
        b = data[pos]
        pos += 1
        if b < 0x80 or b >= 0xE0:  # positive and negative fixint
            continue
        if b < 0xA0:  # fixmap (two values per entry), fixarray
            n = (b & 0x0F) * (2 if b < 0x90 else 1)
        elif b < 0xC0:  # fixstr
            pos += b & 0x1F
            continue
        elif b in _CONTAINER:
            size, per = _CONTAINER[b]
            n = int.from_bytes(data[pos : pos + size], "big") * per
            pos += size
        elif b in _SIZED:
            size, before = _SIZED[b]
            pos += size + before + int.from_bytes(data[pos : pos + size], "big")
            continue
        else:
            pos += _FIXED[b]
            continue
        if len(left) > limit:  # this container opens at depth len(left)
            return True
        left.append(n)
    return False
