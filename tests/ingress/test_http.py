"""HttpProtocol over real loopback sockets, under asyncio and uvloop: keep-alive, pipelining, chunked
bodies and trailers, 100-continue, HEAD, handler failures. Raw clients write exact bytes and read
exact responses. The helpers here are shared by the other test_http_*.py files."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import pytest

from casola.ingress.envelope import JSON_CT, error_body
from casola.ingress.http import Exchange, Handler, HttpLimits, HttpProtocol, serve_http
from tests.require import need_module

LOOPS = ["asyncio", "uvloop"]
IO_TIMEOUT = 5.0
DEFAULT_LIMITS = HttpLimits()


def run(kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    """Run `main()` on a fresh asyncio or uvloop loop (closed afterwards); fail on any loop error."""
    if kind == "uvloop":
        uvloop = need_module("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    errors: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.get_loop().set_exception_handler(lambda loop, context: errors.append(context))
        result = runner.run(asyncio.wait_for(main(), 30))
    assert errors == []  # nothing reached the loop's exception handler (a raising protocol callback would)
    return result


class Served(NamedTuple):
    port: int
    transports: list[asyncio.BaseTransport]


@contextlib.asynccontextmanager
async def serving(handler: Handler, limits: HttpLimits = DEFAULT_LIMITS) -> AsyncIterator[Served]:
    """A server on 127.0.0.1:0 whose connections are all closed when the block ends."""
    transports: list[asyncio.BaseTransport] = []

    class Tracked(HttpProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)
            super().connection_made(transport)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Tracked(handler, limits), "127.0.0.1", 0)
    try:
        yield Served(server.sockets[0].getsockname()[1], transports)
    finally:
        server.close()
        await server.wait_closed()
        for t in transports:
            t.abort()
        await asyncio.sleep(0)  # let connection_lost run


class Resp(NamedTuple):
    status_line: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    raw: bytes  # exactly what came off the wire for this response

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    def error(self) -> dict[str, Any]:
        assert self.header(b"content-type") == JSON_CT
        return msgspec.json.decode(self.body)["error"]  # type: ignore[no-any-return]


def _fields(block: bytes) -> list[tuple[bytes, bytes]]:
    lines = [ln for ln in block.split(b"\r\n") if ln]
    return [(n.strip().lower(), v.strip()) for n, v in (ln.split(b":", 1) for ln in lines)]


class Client:
    """A raw HTTP/1.1 client on one connection: exact bytes out, exact responses in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def _read(self, coro: Awaitable[bytes]) -> bytes:
        return await asyncio.wait_for(coro, IO_TIMEOUT)

    async def response(self, *, head: bool = False) -> Resp:
        raw = await self._read(self.r.readuntil(b"\r\n\r\n"))
        status_line, _, rest = raw[:-4].partition(b"\r\n")
        headers = _fields(rest)
        resp = Resp(status_line, headers, b"", [], raw)
        status = resp.status
        if head or status < 200 or status in (204, 304):
            return resp
        if (cl := resp.header(b"content-length")) is not None:
            body = await self._read(self.r.readexactly(int(cl)))
            return resp._replace(body=body, raw=raw + body)
        if resp.header(b"transfer-encoding") == b"chunked":
            return await self._chunked(resp)
        body = await self._read(self.r.read())  # close-delimited
        return resp._replace(body=body, raw=raw + body)

    async def _chunked(self, resp: Resp) -> Resp:
        raw, parts = bytearray(resp.raw), []
        while True:
            line = await self._read(self.r.readuntil(b"\r\n"))
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                break
            data = await self._read(self.r.readexactly(size + 2))
            raw += data
            assert data.endswith(b"\r\n")
            parts.append(data[:-2])
        block = b""
        while (line := await self._read(self.r.readuntil(b"\r\n"))) != b"\r\n":
            block += line
        raw += block + line
        return resp._replace(body=b"".join(parts), trailers=_fields(block), raw=bytes(raw))

    async def rest(self) -> bytes:
        """Everything until the server closes."""
        return await self._read(self.r.read())

    async def head(self) -> bytes:
        """The raw bytes of one response head."""
        return await self._read(self.r.readuntil(b"\r\n\r\n"))

    async def exactly(self, n: int) -> bytes:
        return await self._read(self.r.readexactly(n))

    async def at_eof(self) -> bool:
        """True when the server closed the connection (no more bytes), False if bytes came instead."""
        try:
            return await self._read(self.r.read(1)) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(ConnectionError):
            await self.w.wait_closed()


# -- test apps ----------------------------------------------------------------------------------


def echo(ex: Exchange) -> None:
    """Collect the body, answer it back with a Content-Length; X-Echo names the request."""
    chunks: list[bytes] = []
    target = ex.method + b" " + ex.path + (b"?" + ex.query if ex.query else b"")
    ex.on_body = chunks.append
    ex.on_body_end = lambda: ex.respond(200, [(b"Content-Type", b"text/plain"), (b"X-Echo", target)], b"".join(chunks))


def stream_echo(ex: Exchange) -> None:
    """Answer at once with a chunked body, one chunk per request chunk, and an X-Bytes trailer."""
    n = 0

    def body(chunk: bytes) -> None:
        nonlocal n
        n += len(chunk)
        ex.write(chunk)

    ex.start(200, [(b"Content-Type", b"text/plain")], trailers=[b"X-Bytes"])
    ex.on_body = body
    ex.on_body_end = lambda: ex.end([(b"X-Bytes", b"%d" % n)])


def reject(ex: Exchange) -> None:
    """Refuse before reading anything (as auth does)."""
    ex.send_error(401, "missing API key", "invalid_request_error", "invalid_api_key")


def req(method: bytes, target: bytes, body: bytes = b"", headers: Sequence[bytes] = ()) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: test", *headers]
    if body or method in (b"POST", b"PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


DATE = re.compile(rb"Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")

# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LOOPS)
def test_exact_response_bytes(kind: str) -> None:
    async def main() -> None:
        async with serving(echo) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST /v1/run/echo?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            resp = await c.response()
            assert DATE.sub(b"Date: *\r\n", resp.raw) == (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Echo: POST /v1/run/echo?x=1\r\n"
                b"Content-Length: 5\r\nServer: casola\r\nDate: *\r\n\r\nhello"
            )
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_keep_alive_several_requests_and_parsed_head(kind: str) -> None:
    seen: list[tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], bytes | None]] = []

    def app(ex: Exchange) -> None:
        seen.append((ex.method, ex.path, ex.query, ex.headers, ex.header(b"x-multi")))
        assert 0 <= time.perf_counter() - ex.t_start < 0.5  # the monotonic clock, sub-ms precise
        echo(ex)

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(b"GET /a?q=1&r=2 HTTP/1.1\r\nHost: h\r\nX-Multi: one  \r\nx-multi: two\r\n\r\n")
            r1 = await c.response()
            await c.send(req(b"POST", b"/b", b"x" * 1000))
            r2 = await c.response()
            await c.send(req(b"POST", b"/c"))
            r3 = await c.response()
            assert [r.status_line for r in (r1, r2, r3)] == [b"HTTP/1.1 200 OK"] * 3
            assert (r1.body, r2.body, r3.body) == (b"", b"x" * 1000, b"")
            assert r1.header(b"connection") is None and r1.header(b"content-length") == b"0"
            (server_side,) = srv.transports
            sock = server_side.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert server_side.get_write_buffer_limits() == (256 * 1024, 1024 * 1024)  # type: ignore[attr-defined]
            await c.close()
        assert seen[0] == (
            b"GET",
            b"/a",
            b"q=1&r=2",
            [(b"host", b"h"), (b"x-multi", b"one"), (b"x-multi", b"two")],
            b"one",
        )
        assert [s[:3] for s in seen[1:]] == [(b"POST", b"/b", b""), (b"POST", b"/c", b"")]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_connection_close_is_honoured(kind: str) -> None:
    async def main() -> None:
        async with serving(echo) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/", headers=[b"Connection: close"]) + req(b"GET", b"/never"))
            resp = await c.response()
            assert resp.status == 200 and resp.header(b"connection") == b"close"
            assert await c.at_eof()  # the pipelined second request is dropped
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_http10_closes_unless_keep_alive(kind: str) -> None:
    async def main() -> None:
        async with serving(echo) as srv:
            c = await Client.open(srv.port)
            await c.send(b"GET /old HTTP/1.0\r\n\r\n")
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 200 OK" and resp.header(b"connection") == b"close"
            assert await c.at_eof()
            await c.close()
            c = await Client.open(srv.port)
            for _ in range(2):
                await c.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                resp = await c.response()
                assert resp.status == 200 and resp.header(b"connection") == b"keep-alive"
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_http10_streamed_response_is_close_delimited(kind: str) -> None:
    async def main() -> None:
        async with serving(stream_echo) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc")
            resp = await c.response()
            assert resp.header(b"transfer-encoding") is None and resp.header(b"connection") == b"close"
            assert resp.body == b"abc"
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("n", [2, 10])
def test_pipelined_requests_are_answered_in_order(kind: str, n: int) -> None:
    events: list[tuple[str, int]] = []

    def app(ex: Exchange) -> None:
        i = int(ex.path[1:])
        events.append(("call", i))
        chunks: list[bytes] = []

        def finish() -> None:
            events.append(("end", i))
            ex.respond(200, [], ex.path + b":" + b"".join(chunks))

        ex.on_body = chunks.append
        # later requests would finish first if they were started early
        ex.on_body_end = lambda: asyncio.get_running_loop().call_later(0.002 * (n - i), finish)

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(b"".join(req(b"POST", b"/%d" % i, b"body-%d" % i) for i in range(n)))
            bodies = [(await c.response()).body for _ in range(n)]
            assert bodies == [b"/%d:body-%d" % (i, i) for i in range(n)]
            await c.close()
        assert events == [(e, i) for i in range(n) for e in ("call", "end")]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_pipelining_beyond_max_pipeline_pauses_and_resumes(kind: str) -> None:
    release = asyncio.Event()

    def app(ex: Exchange) -> None:
        async def later() -> None:
            await release.wait()
            echo(ex)

        asyncio.get_running_loop().create_task(later())

    async def main() -> None:
        async with serving(app, HttpLimits(max_pipeline=2)) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", b"/0", b"b0") + req(b"POST", b"/1", b"b1"))
            await asyncio.sleep(0.05)
            (server_side,) = srv.transports
            assert server_side.is_reading()  # one queued behind the one being answered
            await c.send(req(b"POST", b"/2", b"b2"))
            await asyncio.sleep(0.05)
            assert not server_side.is_reading()  # two queued: reading pauses
            for i in range(3, 6):
                c.w.write(req(b"POST", b"/%d" % i, b"b%d" % i))
            release.set()
            bodies = [(await c.response()).body for _ in range(6)]
            assert bodies == [b"b%d" % i for i in range(6)]
            assert server_side.is_reading()
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_request_sent_byte_by_byte(kind: str) -> None:
    async def main() -> None:
        async with serving(echo) as srv:
            c = await Client.open(srv.port)
            data = req(b"POST", b"/slow?x=y", b"0123456789", [b"X-Long: " + b"v" * 50])
            for i in range(len(data)):
                await c.send(data[i : i + 1])
            resp = await c.response()
            assert resp.body == b"0123456789" and resp.header(b"x-echo") == b"POST /slow?x=y"
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_chunked_request_in_chunked_response_out_with_trailers(kind: str) -> None:
    async def main() -> None:
        async with serving(stream_echo) as srv:
            c = await Client.open(srv.port)
            await c.send(
                b"POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Req-Trailer: t\r\n\r\n"
            )
            resp = await c.response()
            head, _, body = resp.raw.partition(b"\r\n\r\n")
            assert DATE.sub(b"", head + b"\r\n") == (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: X-Bytes\r\nServer: casola\r\n"
            )
            assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Bytes: 11\r\n\r\n"
            assert resp.body == b"hello world" and resp.trailers == [(b"x-bytes", b"11")]
            await c.send(req(b"POST", b"/again", b"ok"))  # still alive afterwards
            assert (await c.response()).body == b"ok"
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_trailers_only_handler_and_empty_writes(kind: str) -> None:
    def app(ex: Exchange) -> None:
        ex.start(200, [], trailers=[b"X-A", b"X-B"])
        ex.write(b"")  # must not end the body
        ex.write(bytearray(b"ab"))
        ex.write(memoryview(b"c" * 5000))  # above the join threshold: writelines
        ex.end([(b"X-A", b"1"), (b"X-B", b"2")])

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/t"))
            resp = await c.response()
            assert resp.header(b"trailer") == b"X-A, X-B"
            assert resp.body == b"ab" + b"c" * 5000
            assert resp.raw.endswith(b"2\r\nab\r\n1388\r\n" + b"c" * 5000 + b"\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\n")
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_100_continue_sent_once(kind: str) -> None:
    async def main() -> None:
        async with serving(echo) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            assert await c.exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
            await c.send(b"hel")
            await asyncio.sleep(0.02)
            await c.send(b"lo")
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 200 OK" and resp.body == b"hello"
            await c.send(req(b"GET", b"/n"))
            assert (await c.response()).status == 200
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_100_continue_not_sent_when_the_app_rejects_first(kind: str) -> None:
    async def main() -> None:
        async with serving(reject) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 100000\r\n\r\n")
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 401 Unauthorized"
            assert resp.header(b"connection") == b"close"
            assert resp.error() == {
                "message": "missing API key",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
            assert await c.at_eof()  # never reads the unbounded body to keep alive
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_100_continue_not_sent_when_the_app_started_its_response(kind: str) -> None:
    async def main() -> None:
        async with serving(stream_echo) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            head = await c.head()
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
            await c.send(b"ok")
            assert await c.rest() == b"2\r\nok\r\n0\r\nX-Bytes: 2\r\n\r\n"
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_early_answer_keeps_alive_when_the_body_came_in_the_same_read(kind: str) -> None:
    async def main() -> None:
        async with serving(reject) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", b"/x", b"y" * 100) + req(b"GET", b"/z"))
            r1, r2 = await c.response(), await c.response()
            assert r1.status == r2.status == 401 and r1.header(b"connection") is None
            await c.send(req(b"GET", b"/again"))  # still open
            assert (await c.response()).status == 401
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_head_request_gets_length_but_no_body(kind: str) -> None:
    def app(ex: Exchange) -> None:
        ex.respond(200, [(b"Content-Type", b"text/plain")], b"hello world")

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"HEAD", b"/h"))
            resp = await c.response(head=True)
            assert resp.header(b"content-length") == b"11" and resp.raw.endswith(b"\r\n\r\n")
            await c.send(req(b"GET", b"/g"))  # nothing stray before the next response
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 200 OK" and resp.body == b"hello world"
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_204_has_no_length_and_no_body(kind: str) -> None:
    def app(ex: Exchange) -> None:
        ex.respond(204, [(b"X-A", b"1")], b"ignored")

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"DELETE", b"/x") + req(b"GET", b"/y"))
            for _ in range(2):
                resp = await c.response()
                assert resp.status_line == b"HTTP/1.1 204 No Content"
                assert resp.header(b"content-length") is None and resp.header(b"transfer-encoding") is None
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_handler_exception_answers_500_and_keeps_the_connection(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def app(ex: Exchange) -> None:
        if ex.path == b"/boom":
            raise RuntimeError("bug")
        echo(ex)

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/boom"))
            resp = await c.response()
            assert resp.status_line == b"HTTP/1.1 500 Internal Server Error"
            assert resp.error()["type"] == "server_error"
            await c.send(req(b"GET", b"/fine"))
            assert (await c.response()).status == 200
            await c.close()

    with caplog.at_level("ERROR", logger="casola.ingress"):
        run(kind, main)
    assert any("bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("value", [b"a\r\nx-injected: 1", b"a\nb", b"a\rb", b"a\x00b", b"a\x7fb"])
def test_a_header_with_control_bytes_is_never_written(kind: str, value: bytes) -> None:
    """The last guard against response splitting: respond()/start() refuse the head, write nothing,
    and the exchange can still answer (here the handler's own error path: a 500)."""
    refused: list[BaseException] = []

    def app(ex: Exchange) -> None:
        try:
            ex.respond(200, [(b"x-a", value)], b"body")
        except ValueError as exc:
            refused.append(exc)
            raise

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/"))
            resp = await c.response()
            assert resp.status == 500 and resp.header(b"x-injected") is None and resp.header(b"x-a") is None
            await c.close()

    run(kind, main)
    assert len(refused) == 1


@pytest.mark.parametrize("kind", LOOPS)
def test_exception_after_start_aborts_the_response(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def app(ex: Exchange) -> None:
        ex.start(200, [])
        ex.write(b"partial")

        def fail(chunk: bytes) -> None:
            raise ValueError("mid-stream bug")

        ex.on_body = fail

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", b"/", b"x"))
            raw = await c.rest()  # until the server closes
            assert raw.endswith(b"\r\n\r\n7\r\npartial\r\n")  # truncated: no last chunk
            await c.close()

    with caplog.at_level("ERROR", logger="casola.ingress"):
        run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_app_abort_truncates_and_ignores_later_calls(kind: str) -> None:
    def app(ex: Exchange) -> None:
        ex.start(200, [])
        ex.write(b"abc")
        ex.abort()
        ex.write(b"more")  # ignored, never raises
        ex.end()
        ex.abort()
        assert not ex.finished

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/") + req(b"GET", b"/dropped"))
            raw = await c.rest()
            assert raw.endswith(b"\r\n\r\n3\r\nabc\r\n") and raw.count(b"HTTP/1.1") == 1
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_serve_http_on_port_zero(kind: str) -> None:
    async def main() -> None:
        server = await serve_http(echo, "127.0.0.1", 0, server_header=b"")
        try:
            c = await Client.open(server.sockets[0].getsockname()[1])
            await c.send(req(b"GET", b"/p"))
            resp = await c.response()
            assert resp.status == 200 and resp.header(b"server") is None and resp.header(b"date") is not None
            await c.close()
        finally:
            server.close()
            await server.wait_closed()

    run(kind, main)


def test_error_body_has_openai_shape() -> None:
    assert error_body("m", "t") == b'{"error":{"message":"m","type":"t","param":null,"code":null}}'
    assert msgspec.json.decode(error_body("m", "t", "c", "p")) == {
        "error": {"message": "m", "type": "t", "param": "p", "code": "c"}
    }


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="write_low"):
        HttpLimits(write_high=1, write_low=2)
    with pytest.raises(ValueError, match="timeouts"):
        HttpLimits(idle_timeout=0)
