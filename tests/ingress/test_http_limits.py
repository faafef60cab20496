"""HttpProtocol refuses what it must, with the right status and envelope, then closes: head, URL, header
count and body limits, request smuggling, malformed requests, versions and upgrades, and the three
timeouts (idle, head, body). Loopback, under asyncio and uvloop."""

from __future__ import annotations

import asyncio

import pytest

from casola.ingress.http import Exchange, HttpLimits, RequestError
from tests.ingress.test_http import LOOPS, Client, echo, req, run, serving, stream_echo

SMALL = HttpLimits(max_head=2048, max_url=512, max_headers=10, max_body=1000)


async def refused(port: int, data: bytes, status_line: bytes, code: str, *, limits: HttpLimits = SMALL) -> None:
    c = await Client.open(port)
    await c.send(data)
    resp = await c.response()
    assert resp.status_line == status_line
    assert resp.header(b"connection") == b"close"
    err = resp.error()
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["param"] is None
    assert await c.at_eof()
    await c.close()


CASES = {
    "head too large": (
        req(b"GET", b"/", headers=[b"X-Big-%d: %s" % (i, b"v" * 300) for i in range(8)]),
        b"HTTP/1.1 431 Request Header Fields Too Large",
        "headers_too_large",
    ),
    "too many headers": (
        req(b"GET", b"/", headers=[b"X-%d: v" % i for i in range(10)]),  # + Host = 11
        b"HTTP/1.1 431 Request Header Fields Too Large",
        "headers_too_large",
    ),
    "url too long": (req(b"GET", b"/" + b"u" * 600), b"HTTP/1.1 414 Request-URI Too Long", "url_too_long"),
    "content-length over max_body": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n",  # no body sent: refused before it
        b"HTTP/1.1 413 Request Entity Too Large",
        "request_too_large",
    ),
    "huge content-length": (
        b"POST / HTTP/1.1\r\nContent-Length: 9999999999999999999\r\n\r\n",
        b"HTTP/1.1 413 Request Entity Too Large",
        "request_too_large",
    ),
    "CL then TE (smuggling)": (
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 400 Bad Request",
        "bad_request",
    ),
    "TE then CL (smuggling)": (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 400 Bad Request",
        "bad_request",
    ),
    "malformed request line": (b"GARBAGE\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "missing version": (b"GET /\r\nHost: a\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "bare LF": (b"GET / HTTP/1.1\nHost: a\n\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "control char in header": (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "bad content-length": (b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "HTTP/0.9": (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "h2c upgrade": (
        b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
        b"HTTP/1.1 400 Bad Request",
        "bad_request",
    ),
    "websocket upgrade on POST": (
        b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 400 Bad Request",
        "bad_request",
    ),
    "CONNECT": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 400 Bad Request", "bad_request"),
    "expectation other than 100-continue": (
        b"POST / HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 417 Expectation Failed",
        "expectation_failed",
    ),
}


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused_requests(kind: str, case: tuple[bytes, bytes, str]) -> None:
    called: list[Exchange] = []

    def app(ex: Exchange) -> None:
        called.append(ex)
        echo(ex)

    async def main() -> None:
        async with serving(app, SMALL) as srv:
            await refused(srv.port, *case)
        assert called == []  # the app never sees a refused request

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_websocket_upgrade_reaches_the_app_and_a_plain_answer_closes(kind: str) -> None:
    """A WebSocket upgrade GET goes to the app flagged (`ex.upgrade`; it may accept it with
    `switch_protocols`, tests/ingress/test_websocket.py); an app that answers it as a plain request
    ignores the upgrade (RFC 9110 §7.8), and the connection closes: nothing after it is parsed as HTTP."""
    called: list[bytes] = []

    def app(ex: Exchange) -> None:
        called.append(ex.upgrade)
        echo(ex)

    async def main() -> None:
        async with serving(app, SMALL) as srv:
            c = await Client.open(srv.port)
            await c.send(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            resp = await c.response()
            assert resp.status == 200 and resp.header(b"connection") == b"close"
            assert await c.at_eof()
            c = await Client.open(srv.port)
            await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await c.response()).header(b"connection") is None  # a plain GET keeps alive
            await c.close()
        assert called == [b"websocket", b""]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_transfer_encoding_other_than_chunked_is_501(kind: str) -> None:
    async def main() -> None:
        async with serving(echo, SMALL) as srv:
            for te in (b"gzip, chunked", b"gzip"):
                c = await Client.open(srv.port)
                await c.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: " + te + b"\r\n\r\n0\r\n\r\n")
                resp = await c.response()
                assert resp.status_line == b"HTTP/1.1 501 Not Implemented"
                assert resp.error() == {
                    "message": "only Transfer-Encoding: chunked is supported",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_implemented",
                }
                assert await c.at_eof()
                await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_limits_are_inclusive(kind: str) -> None:
    """Exactly at each limit is fine."""
    url = b"/" + b"u" * 511
    headers = [b"X-%d: v" % i for i in range(9)]  # + Host = 10

    async def main() -> None:
        async with serving(echo, SMALL) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", url, b"b" * 1000, headers[:8]))  # + Content-Length = 10 headers
            resp = await c.response()
            assert resp.status == 200 and len(resp.body) == 1000
            await c.send(req(b"GET", b"/", headers=headers))
            assert (await c.response()).status == 200
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_head_too_large_in_pieces_is_431(kind: str) -> None:
    """One header value trickled in over many reads (httptools buffers it whole): the raw count stops it."""

    async def main() -> None:
        async with serving(echo, SMALL) as srv:
            c = await Client.open(srv.port)
            await c.send(b"GET / HTTP/1.1\r\nX-Slow: ")
            for _ in range(40):  # 4000 bytes: over max_head (2048) even if the first read goes uncounted
                await c.send(b"v" * 100)  # the server drains (lingers) after answering: sends never fail
                await asyncio.sleep(0.002)
            resp = await c.response()
            assert resp.status == 431 and resp.error()["code"] == "headers_too_large"
            assert await c.at_eof()
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_chunked_body_over_max_body_is_413_and_close(kind: str) -> None:
    aborts: list[BaseException | None] = []
    got: list[bytes] = []

    def app(ex: Exchange) -> None:
        ex.on_body = got.append
        ex.on_abort = aborts.append
        ex.on_body_end = lambda: ex.respond(200, [], b"unexpected")

    async def main() -> None:
        async with serving(app, SMALL) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n" + b"a" * 600 + b"\r\n")
            await asyncio.sleep(0.01)
            await c.send(b"258\r\n" + b"b" * 600 + b"\r\n0\r\n\r\n")
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 413 Request Entity Too Large"
            assert resp.error()["code"] == "request_too_large" and resp.header(b"connection") == b"close"
            assert await c.at_eof()
            await c.close()
        assert got == [b"a" * 600]
        assert len(aborts) == 1 and isinstance(aborts[0], RequestError) and aborts[0].status == 413

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_malformed_request_behind_a_good_one_is_answered_in_turn(kind: str) -> None:
    async def main() -> None:
        async with serving(echo) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", b"/ok", b"fine") + b"BAD REQUEST LINE\r\n\r\n")
            r1 = await c.response()
            r2 = await c.response()
            assert (r1.status_line, r1.body) == (b"HTTP/1.1 200 OK", b"fine")
            assert r2.status_line == b"HTTP/1.1 400 Bad Request" and r2.header(b"connection") == b"close"
            assert await c.at_eof()
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_idle_keep_alive_connection_is_closed_quietly(kind: str) -> None:
    async def main() -> None:
        async with serving(echo, HttpLimits(idle_timeout=0.2)) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/"))
            assert (await c.response()).status == 200
            t0 = asyncio.get_running_loop().time()
            assert await c.at_eof()  # no bytes, just the close
            waited = asyncio.get_running_loop().time() - t0
            assert 0.15 < waited < 0.6
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_activity_keeps_an_idle_connection_open(kind: str) -> None:
    async def main() -> None:
        async with serving(echo, HttpLimits(idle_timeout=0.2)) as srv:
            c = await Client.open(srv.port)
            for _ in range(4):  # 0.4 s in all, never 0.2 s idle
                await asyncio.sleep(0.1)
                await c.send(req(b"GET", b"/"))
                assert (await c.response()).status == 200
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_head_timeout_is_408(kind: str) -> None:
    async def main() -> None:
        async with serving(echo, HttpLimits(head_timeout=0.2)) as srv:
            c = await Client.open(srv.port)
            t0 = asyncio.get_running_loop().time()
            await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
            await asyncio.sleep(0.1)
            await c.send(b"X-Trickle: 1\r\n")  # bytes do not extend the head deadline
            resp = await c.response()
            assert 0.15 < asyncio.get_running_loop().time() - t0 < 0.6
            assert resp.status_line == b"HTTP/1.1 408 Request Timeout"
            assert resp.error()["code"] == "request_timeout"
            assert await c.at_eof()
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_body_stall_is_408_and_on_abort(kind: str) -> None:
    aborts: list[BaseException | None] = []
    got: list[bytes] = []

    def app(ex: Exchange) -> None:
        ex.on_body = got.append
        ex.on_abort = aborts.append

    async def main() -> None:
        async with serving(app, HttpLimits(body_timeout=0.2)) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            await asyncio.sleep(0.12)
            await c.send(b"def")  # progress: the stall counts from here
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 408 Request Timeout" and resp.error()["code"] == "request_timeout"
            assert await c.at_eof()
            await c.close()
        assert b"".join(got) == b"abcdef"
        assert len(aborts) == 1 and isinstance(aborts[0], RequestError) and aborts[0].status == 408

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_body_stall_after_the_response_started_aborts(kind: str) -> None:
    aborts: list[BaseException | None] = []

    def app(ex: Exchange) -> None:
        stream_echo(ex)
        ex.on_abort = aborts.append

    async def main() -> None:
        async with serving(app, HttpLimits(body_timeout=0.2)) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            raw = await c.rest()  # until the server gives up and closes
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\n3\r\nabc\r\n")
            await c.close()
        assert len(aborts) == 1

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_paused_body_does_not_time_out(kind: str) -> None:
    """A stall the app asked for (pause_body) is not the client's: no 408."""
    holder: list[Exchange] = []

    def app(ex: Exchange) -> None:
        holder.append(ex)
        echo(ex)
        ex.pause_body()

    async def main() -> None:
        async with serving(app, HttpLimits(body_timeout=0.15)) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", b"/", b"0123456789")[:-5])
            await asyncio.sleep(0.35)
            holder[0].resume_body()
            await c.send(b"56789")
            resp = await c.response()
            assert resp.status == 200 and resp.body == b"0123456789"
            await c.close()

    run(kind, main)
