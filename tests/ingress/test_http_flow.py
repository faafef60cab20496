"""HttpProtocol flow control and disconnects, loopback under asyncio and uvloop: an 8 MiB body streamed
through with pause_body/resume_body and drain, bodies buffered until the app listens, on_abort exactly
once when the client goes away, writes after that ignored, half-closed clients still answered."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from casola.ingress.http import Exchange, HttpLimits
from tests.ingress.test_http import LOOPS, Client, echo, req, run, serving

PATTERN = bytes(range(256)) * 32768  # 8 MiB
BACKPRESSURE = HttpLimits(write_high=64 * 1024, write_low=16 * 1024)


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("style", ["writing_paused", "drain_each_chunk"])
def test_8mib_body_streams_through_with_backpressure(kind: str, style: str) -> None:
    stats = {"pauses": 0, "chunks": 0}
    tasks: set[asyncio.Task[None]] = set()

    def app(ex: Exchange) -> None:
        async def resume() -> None:
            await ex.drain()
            ex.resume_body()

        def body(chunk: bytes) -> None:
            stats["chunks"] += 1
            ex.write(chunk)
            if style == "drain_each_chunk" or ex.writing_paused:
                stats["pauses"] += ex.writing_paused
                ex.pause_body()
                task = asyncio.get_running_loop().create_task(resume())
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        ex.start(200, [(b"Content-Type", b"application/octet-stream")])
        ex.on_body = body
        ex.on_body_end = ex.end

    async def main() -> None:
        async with serving(app, BACKPRESSURE) as srv:
            c = await Client.open(srv.port)

            async def upload() -> None:
                c.w.write(b"POST /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(PATTERN))
                view = memoryview(PATTERN)
                for i in range(0, len(PATTERN), 65536):
                    c.w.write(view[i : i + 65536])
                    await c.w.drain()

            up = asyncio.create_task(upload())
            await asyncio.sleep(0.2)  # read nothing yet: the server's write buffer fills, the app pauses
            resp = await c.response()
            await up
            assert resp.status == 200 and resp.header(b"transfer-encoding") == b"chunked"
            assert len(resp.body) == len(PATTERN) and resp.body == PATTERN
            await c.send(req(b"GET", b"/after"))  # the connection is still good
            assert (await c.response()).status == 200
            await c.close()
        assert stats["pauses"] > 0 and not tasks

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_body_is_buffered_until_the_app_sets_on_body_later(kind: str) -> None:
    def app(ex: Exchange) -> None:
        async def later() -> None:
            await asyncio.sleep(0.05)  # the whole body has arrived meanwhile
            assert ex.body_complete
            echo(ex)

        asyncio.get_running_loop().create_task(later())

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
            resp = await c.response()
            assert resp.body == b"abcd"
            await c.close()

    run(kind, main)


def _rst(c: Client) -> None:
    sock = c.w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.w.transport.abort()


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("how", ["reset", "fin"])
def test_client_gone_mid_body_calls_on_abort_once(kind: str, how: str) -> None:
    aborts: list[BaseException | None] = []
    calls: list[bytes] = []
    gone = asyncio.Event()

    def app(ex: Exchange) -> None:
        calls.append(ex.path)

        def on_abort(exc: BaseException | None) -> None:
            aborts.append(exc)
            ex.write(b"late")  # the app may race: ignored, never raises
            ex.end()
            ex.respond(200, [], b"x")
            gone.set()

        ex.on_body = lambda chunk: None
        ex.on_abort = on_abort

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(b"POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\npartial")
            await asyncio.sleep(0.05)
            if how == "reset":
                _rst(c)
            else:
                c.w.write_eof()
            await asyncio.wait_for(gone.wait(), 2)
            await asyncio.sleep(0.05)
            await c.close()
        assert calls == [b"/a"] and len(aborts) == 1
        if how == "fin":
            assert aborts[0] is None  # a clean close
        else:
            assert aborts[0] is None or isinstance(aborts[0], ConnectionError)

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_client_gone_while_streaming_aborts_once_and_drain_raises(kind: str) -> None:
    aborts: list[BaseException | None] = []
    drain_error: list[BaseException] = []
    calls: list[bytes] = []
    done = asyncio.Event()

    def app(ex: Exchange) -> None:
        calls.append(ex.path)
        ex.on_abort = aborts.append

        async def stream() -> None:
            ex.start(200, [])
            try:
                while True:  # an endless token stream; the client leaves
                    ex.write(b"token ")
                    await ex.drain()
                    await asyncio.sleep(0.005)
            except ConnectionError as exc:
                drain_error.append(exc)
            ex.write(b"ignored")
            ex.end()
            done.set()

        asyncio.get_running_loop().create_task(stream())

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/stream") + req(b"GET", b"/queued") + req(b"GET", b"/queued2"))
            assert (await c.head()).startswith(b"HTTP/1.1 200 OK")
            await c.exactly(8)
            _rst(c)
            await asyncio.wait_for(done.wait(), 2)
            await c.close()
        assert calls == [b"/stream"]  # the queued requests never started: nothing called for them
        assert len(aborts) == 1 and len(drain_error) == 1

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_on_abort_set_after_the_loss_still_fires_once(kind: str) -> None:
    aborts: list[BaseException | None] = []
    done = asyncio.Event()

    def app(ex: Exchange) -> None:
        async def later() -> None:
            await asyncio.sleep(0.1)
            ex.on_abort = aborts.append
            ex.on_abort = aborts.append  # a second listener is not called again
            done.set()

        asyncio.get_running_loop().create_task(later())

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/"))
            await asyncio.sleep(0.02)
            _rst(c)
            await asyncio.wait_for(done.wait(), 2)
            await c.close()
        assert len(aborts) == 1

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_client_eof_is_a_disconnect(kind: str) -> None:
    """A FIN from the client means it is gone: the request being answered is aborted (the GPU work can
    stop), queued ones are dropped, nothing more is written."""
    aborts: list[BaseException | None] = []
    calls: list[bytes] = []

    def app(ex: Exchange) -> None:
        calls.append(ex.path)
        if ex.path == b"/now":
            echo(ex)  # answered within the read: out before the EOF is seen
            return
        ex.on_abort = aborts.append
        asyncio.get_running_loop().call_later(0.05, echo, ex)

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"POST", b"/now", b"one") + req(b"POST", b"/slow", b"two") + req(b"GET", b"/queued"))
            c.w.write_eof()
            resp = await c.response()
            assert resp.body == b"one"
            assert await c.at_eof()  # nothing for /slow, even after its handler answers
            await asyncio.sleep(0.1)
            await c.close()
        assert calls == [b"/now", b"/slow"] and aborts == [None]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_pipelined_bodies_are_buffered_beyond_the_read_pause_mark(kind: str) -> None:
    """Two 1.5 MiB bodies queued behind a slow response: reading pauses, then everything arrives."""
    big = b"z" * (1536 * 1024)
    release = asyncio.Event()

    def app(ex: Exchange) -> None:
        if ex.path == b"/slow":

            async def later() -> None:
                await release.wait()
                ex.respond(200, [], b"slow")

            asyncio.get_running_loop().create_task(later())
        else:
            echo(ex)

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            c.w.write(req(b"GET", b"/slow") + req(b"POST", b"/a", big) + req(b"POST", b"/b", big))
            await asyncio.sleep(0.1)
            release.set()
            bodies = [(await c.response()).body for _ in range(3)]
            assert bodies == [b"slow", big, big]
            await c.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_writer_blocked_in_drain_fails_when_the_client_goes(kind: str) -> None:
    outcome: list[BaseException] = []
    blocked = asyncio.Event()
    done = asyncio.Event()

    def app(ex: Exchange) -> None:
        async def flood() -> None:
            ex.start(200, [])
            try:
                while True:
                    ex.write(b"x" * 65536)
                    if ex.writing_paused:
                        blocked.set()
                    await ex.drain()
            except ConnectionError as exc:
                outcome.append(exc)
            done.set()

        asyncio.get_running_loop().create_task(flood())

    async def main() -> None:
        async with serving(app, BACKPRESSURE) as srv:
            c = await Client.open(srv.port)
            await c.send(req(b"GET", b"/flood"))  # and never read
            await asyncio.wait_for(blocked.wait(), 2)
            await asyncio.sleep(0.05)
            _rst(c)
            await asyncio.wait_for(done.wait(), 2)
            await c.close()
        assert len(outcome) == 1

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_unread_bodies_do_not_accumulate_across_requests(kind: str) -> None:
    """Bodies the app never asks for are dropped with their exchange, not counted forever."""

    def app(ex: Exchange) -> None:
        async def answer() -> None:
            while not ex.body_complete:
                await asyncio.sleep(0.001)
            ex.respond(200, [], b"ignored your %d bytes" % int(ex.header(b"content-length") or 0))

        asyncio.get_running_loop().create_task(answer())

    async def main() -> None:
        async with serving(app) as srv:
            c = await Client.open(srv.port)
            for _ in range(24):  # 2.4 MiB in all: over the 1 MiB read-pause mark if it were never released
                await c.send(req(b"POST", b"/", b"q" * 102400))
                resp = await c.response()
                assert resp.body == b"ignored your 102400 bytes" and resp.header(b"connection") is None
            await c.close()

    run(kind, main)
