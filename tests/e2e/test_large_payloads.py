"""Bodies beyond one frame cross every hop in both directions (SPEC §8), and a peer's small frame
limit is its own business: it never costs other tenants their requests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from casola.auth import SCOPE_RUN
from casola.client import Client, RequestFailed
from casola.wire import ErrorCode, Limits
from tests.e2e.stack import HttpClient, Stack, run_uvloop

MIB = 1024 * 1024
SMALL = Limits(max_payload=1024)  # the smallest frame limit SPEC §8 allows a peer to advertise


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("size", [20 * MIB, 64 * MIB])
def test_bodies_up_to_the_ingress_limit_round_trip_byte_identical(tmp_path: Path, size: int) -> None:
    """Above the 16 MiB frame limit, in both directions, one piece (respond) or streamed (chunks)."""

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker()
        http = await HttpClient.connect(stack.http_port)
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        body = os.urandom(size)
        try:
            for headers in ({}, {"X-Casola-Param-Chunks": "3"}):
                r = await http.request("POST", "/v1/run/echo", body, {**_auth(stack.api_key), **headers})
                assert r.status == 200 and r.complete
                assert r.body == body
            for params in ({}, {"chunks": 3}):
                res = await client.run("echo", body, params=params)
                assert res.payload == body
        finally:
            await client.close()
            await http.close()
            await stack.stop()

    run_uvloop(main, timeout=120)


def test_a_body_over_the_limit_is_refused_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await Stack(tmp_path, ingress={"max_body": 4 * MIB}).start()
        await stack.add_worker()
        client = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key)
        try:
            with pytest.raises(RequestFailed) as err:
                await asyncio.wait_for(client.run("echo", os.urandom(5 * MIB)), 5)
            assert err.value.code == ErrorCode.PAYLOAD_TOO_LARGE
            assert (await client.run("echo", b"still here")).payload == b"still here"
        finally:
            await client.close()
            await stack.stop()

    run_uvloop(main)


def test_peers_with_a_1024_byte_frame_limit_are_served_and_hurt_no_one(tmp_path: Path) -> None:
    """A worker and a frame client advertising max_payload 1,024: their bodies go in 1 KiB frames,
    while another tenant's concurrent requests over HTTP and frames all succeed."""

    async def main() -> None:
        stack = await Stack(tmp_path).start()
        await stack.add_worker(capacity=16, limits=SMALL)
        other_key = stack.keys.ensure_key("other-key", "other", [SCOPE_RUN], "tests")
        small = await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key, limits=SMALL)
        other = await Client.connect(f"127.0.0.1:{stack.frames_port}", other_key)
        http = await HttpClient.connect(stack.http_port)
        try:
            body = os.urandom(MIB + 5)

            async def small_ones() -> None:
                for params in ({}, {"chunks": 2}):
                    assert (await small.run("echo", body, params=params)).payload == body

            async def others() -> int:
                ok = 0
                for i in range(40):
                    payload = os.urandom(2048 + i)
                    assert (await other.run("echo", payload)).payload == payload
                    r = await http.request("POST", "/v1/run/echo", payload, _auth(other_key))
                    assert (r.status, r.body) == (200, payload)
                    ok += 2
                return ok

            _, ok = await asyncio.gather(small_ones(), others())
            assert ok == 80
        finally:
            for c in (small, other):
                await c.close()
            await http.close()
            await stack.stop()

    run_uvloop(main, timeout=120)
