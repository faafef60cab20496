"""HTTP/1.1 syntax the parser leaves to us: absolute-form request targets (RFC 9112 §3.2.2) and a
chunk whose declared size is beyond the body limit (413 at once, not after the body timeout).
Loopback, under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import time

import pytest

from casola.ingress.http import Exchange, HttpLimits
from tests.ingress.test_http import LOOPS, Client, echo, run, serving

LIMITS = HttpLimits(max_body=1000, body_timeout=20.0)


def host_echo(ex: Exchange) -> None:
    """Answer with the target and the Host the app was given."""
    target = ex.path + (b"?" + ex.query if ex.query else b"")
    ex.respond(200, [(b"x-target", target), (b"x-host", ex.header(b"host") or b"-")], b"")


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize(
    ("target", "path", "host"),
    [
        (b"http://api.example:8000/v1/run/echo?x=1", b"/v1/run/echo?x=1", b"api.example:8000"),
        (b"HTTPS://api.example/v1/run/echo", b"/v1/run/echo", b"api.example"),
        (b"http://api.example", b"/", b"api.example"),
        (b"http://api.example?q", b"/?q", b"api.example"),
        (b"http://user:pw@api.example/p", b"/p", b"api.example"),
    ],
)
def test_an_absolute_form_target_is_served_with_its_authority_as_host(
    kind: str, target: bytes, path: bytes, host: bytes
) -> None:
    async def main() -> None:
        async with serving(host_echo) as s:
            c = await Client.open(s.port)
            await c.send(b"GET " + target + b" HTTP/1.1\r\nHost: ignored.example\r\n\r\n")
            resp = await c.response()
            assert resp.status == 200
            assert (resp.header(b"x-target"), resp.header(b"x-host")) == (path, host)
            await c.close()

    run(kind, main)


async def _refused_at_once(port: int, pieces: list[bytes]) -> float:
    """Send `pieces` (one write each, a moment apart); return how long the 413 took after the last."""
    c = await Client.open(port)
    for piece in pieces:
        await c.send(piece)
        await asyncio.sleep(0.02)
    t0 = time.monotonic()
    resp = await c.response()
    took = time.monotonic() - t0
    assert resp.status == 413 and resp.error()["code"] == "request_too_large"
    assert await c.at_eof()
    await c.close()
    return took


HEAD = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([HEAD + b"ffffffff\r\n"], id="declared, no data"),
        pytest.param([HEAD + b"3e9\r\n" + b"x" * 10], id="1001 declared, 10 sent"),
        pytest.param([HEAD + b"3e9;name=value\r\nxyz"], id="with an extension"),
        pytest.param([HEAD, b"3e", b"9\r\n"], id="size line split across reads"),
        pytest.param(
            [HEAD + b"1f4\r\n" + b"x" * 500 + b"\r\n", b"1f5\r\n" + b"y"], id="second chunk crosses the limit"
        ),
    ],
)
def test_a_chunk_declared_beyond_the_body_limit_is_refused_at_once(kind: str, pieces: list[bytes]) -> None:
    async def main() -> None:
        async with serving(echo, LIMITS) as s:
            assert await _refused_at_once(s.port, pieces) < 2.0  # not the 20 s body timeout

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_chunks_up_to_the_limit_still_arrive_whole(kind: str) -> None:
    async def main() -> None:
        async with serving(echo, LIMITS) as s:
            c = await Client.open(s.port)
            body = b"1f4\r\n" + b"a" * 500 + b"\r\n" + b"1f4;ext\r\n" + b"b" * 500 + b"\r\n0\r\n\r\n"
            for i in range(0, len(body), 7):  # size lines cut anywhere
                await c.send((HEAD if i == 0 else b"") + body[i : i + 7])
            resp = await c.response()
            assert resp.status == 200 and resp.body == b"a" * 500 + b"b" * 500
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_size_line_sent_a_byte_at_a_time_is_read_back(kind: str) -> None:
    async def main() -> None:
        async with serving(echo, LIMITS) as s:
            pieces = [HEAD] + [bytes([c]) for c in b"3e9;ext=1\r\n"]  # CR and LF in reads of their own
            assert await _refused_at_once(s.port, pieces) < 2.0

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_absolute_form_target_without_a_host_is_refused(kind: str) -> None:
    async def main() -> None:
        async with serving(host_echo) as s:
            c = await Client.open(s.port)
            await c.send(b"GET http:///v1/run/echo HTTP/1.1\r\nHost: h\r\n\r\n")
            resp = await c.response()
            assert resp.status == 400 and resp.error()["code"] == "bad_request"
            await c.close()

    run(kind, main)
