"""Server-Timing adds up (DESIGN "Timing users can see"): for a whole answer, a streamed one, a slow
upload and a slow first chunk, the top-level stages (upload, ingress, queue-overhead, wait,
worker-rtt) do not overlap and their sum is what the client measured, within a stated tolerance; the
nested ones (work within worker-rtt) stay inside their parent; a streamed answer's header and
trailer agree on what was complete at its first byte.

The client measures with the same clock the server uses (CLOCK_MONOTONIC): from the first byte of
the request written to the first and last byte of the answer read. What the stages cannot include is
the loopback transit both ways, the client's own parsing, and the ingress <-> queue node link (an
in-process link here); TOLERANCE bounds it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.e2e.stack import Stack, run_uvloop, timing

TOP = ("upload", "ingress", "queue-overhead", "wait", "worker-rtt")
TOLERANCE_MS = 5.0  # absolute: loopback transit, the client's parsing, a loaded two-core machine
TOLERANCE_SHARE = 0.03  # and relative to the total


class Measured(NamedTuple):
    header: dict[str, float]
    trailer: dict[str, float]
    first_byte_ms: float  # the answer's first byte, from the request's first byte (client clock)
    total_ms: float  # its last byte


async def _exchange(port: int, head: bytes, pieces: Sequence[bytes], gap: float) -> Measured:
    """Send `head`, then the body `pieces` `gap` seconds apart; read the answer, chunked or not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(head)
    for i, piece in enumerate(pieces):
        if i and gap:
            await asyncio.sleep(gap)
        writer.write(piece)
    first = await reader.readuntil(b"\r\n\r\n")
    t_first = time.perf_counter()
    lines = first.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), first
    fields = dict(line.split(": ", 1) for line in lines[1:] if line)
    fields = {k.lower(): v for k, v in fields.items()}
    trailer: dict[str, float] = {}
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    else:
        while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            await reader.readexactly(size + 2)
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "server-timing":
                trailer = timing(value.strip())
    t_last = time.perf_counter()
    writer.close()
    return Measured(timing(fields["server-timing"]), trailer, (t_first - t0) * 1000, (t_last - t0) * 1000)


def _head(key: str, params: dict[str, str], *, chunked: bool = False, length: int = 0) -> bytes:
    lines = ["POST /v1/run/echo HTTP/1.1", "Host: t", f"Authorization: Bearer {key}", "X-Casola-Trace: 1"]
    lines += [f"X-Casola-Param-{k}: {v}" for k, v in params.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b"0\r\n\r\n"


def _assert_adds_up(stages: dict[str, float], client_ms: float, what: str) -> None:
    assert all(v >= 0 for v in stages.values()), (what, stages)
    assert set(stages) <= {*TOP, "work", "filter", "first-byte"}, stages
    if "first-byte" in stages:  # a streamed answer's mark: the handler's time to its first bytes, within work
        assert stages["first-byte"] <= stages["work"], (what, stages)
    total = sum(stages.get(s, 0.0) for s in TOP)
    slack = TOLERANCE_MS + TOLERANCE_SHARE * client_ms
    # The server cannot have spent longer than the client waited; what it did not count is transit.
    assert total <= client_ms + 0.05, (what, total, client_ms, stages)
    assert client_ms - total <= slack, (what, total, client_ms, stages)
    if "work" in stages:
        assert stages["work"] <= stages["worker-rtt"] + 0.05, (what, stages)


SHAPES = {
    # name: (params, body pieces, gap between them, chunked upload?)
    "whole": ({"delay-ms": "20"}, [os.urandom(64 * 1024)], 0.0, False),
    "streamed": ({"chunks": "4", "chunk-delay-ms": "100"}, [b"abcdefgh"], 0.0, False),
    "slow upload": ({}, [b"one", b"two", b"six"], 0.3, True),
    "slow first chunk": ({"head-first": "1", "delay-ms": "200", "chunks": "2"}, [b"abcd"], 0.0, False),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_stages_add_up_to_what_the_client_measured(tmp_path: Path, shape: str) -> None:
    params, pieces, gap, chunked = SHAPES[shape]

    async def main() -> Measured:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        try:
            body = [_chunk(p) for p in pieces] + [_chunk(b"")] if chunked else pieces
            head = _head(stack.api_key, params, chunked=chunked, length=sum(map(len, pieces)))
            await _exchange(stack.http_port, head, body, gap)  # warm: first-use costs are not the point
            return await _exchange(stack.http_port, head, body, gap)
        finally:
            await stack.stop()

    m: Measured = run_uvloop(main)
    if os.environ.get("CASOLA_SHOW_TIMING"):
        print(f"\n{shape}: first byte {m.first_byte_ms:.3f} ms, last {m.total_ms:.3f} ms")
        print(f"  header  {m.header}\n  trailer {m.trailer}")
    if m.trailer:  # streamed: the header is what was known at the first byte
        _assert_adds_up(m.header, m.first_byte_ms, "header")
        _assert_adds_up(m.trailer, m.total_ms, "trailer")
        assert m.header.get("upload") == m.trailer.get("upload") and m.header["wait"] == m.trailer["wait"]
        assert m.header["ingress"] <= m.trailer["ingress"] + 1.0  # the first chunk's wait is not ours
        assert m.header["worker-rtt"] <= m.trailer["worker-rtt"]
    else:
        _assert_adds_up(m.header, m.total_ms, "header")
    if shape == "slow upload":
        assert 850 <= m.header["upload"] <= 1000 and m.header["ingress"] < 5 and m.header["work"] < 5
    if shape == "slow first chunk":
        assert m.header["ingress"] < 5 and m.header["worker-rtt"] >= 200
    if shape == "streamed":
        assert m.header["worker-rtt"] < 50 <= 300 <= m.trailer["worker-rtt"]
