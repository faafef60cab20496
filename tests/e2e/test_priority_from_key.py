"""A request's priority comes from its key, not its caller (`casola keys create --max-priority`): a
caller may ask for up to its key's maximum, and any lower priority, on every surface."""

from __future__ import annotations

from pathlib import Path

import pytest

from casola.auth import SCOPE_RUN
from casola.client import Client, RequestFailed
from casola.wire import ErrorCode
from tests.e2e.stack import HttpClient, run_uvloop
from tests.e2e.test_jobs import jobs_stack


def test_frames_refuse_a_priority_above_the_keys_maximum(tmp_path: Path) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        await stack.add_worker()
        _, premium = stack.keys.create("gold", [SCOPE_RUN], max_priority=10)
        try:
            async with await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key) as plain:
                calls = (lambda p: plain.submit("echo", b"", priority=p), lambda p: plain.run("echo", b"", priority=p))
                for call in calls:
                    with pytest.raises(RequestFailed) as err:
                        await call(127)
                    assert err.value.code == ErrorCode.PERMISSION_DENIED and "maximum (0)" in err.value.message
                    await call(0)
                    await call(-128)  # lower is always allowed
            async with await Client.connect(f"127.0.0.1:{stack.frames_port}", premium) as gold:
                assert (await gold.submit("echo", b"x", priority=10)).status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
                with pytest.raises(RequestFailed) as err:
                    await gold.submit("echo", b"x", priority=11)
                assert err.value.code == ErrorCode.PERMISSION_DENIED
        finally:
            await stack.stop()

    run_uvloop(main)


@pytest.mark.parametrize("async_", [False, True])
def test_http_takes_x_casola_priority_up_to_the_keys_maximum(tmp_path: Path, async_: bool) -> None:
    async def main() -> None:
        stack = await jobs_stack(tmp_path).start()
        await stack.add_worker()
        _, premium = stack.keys.create("gold", [SCOPE_RUN], max_priority=5)
        http = await HttpClient.connect(stack.http_port)
        ok = 202 if async_ else 200
        extra = {"X-Casola-Async": "1"} if async_ else {}
        try:
            for key, priority, status in (
                (stack.api_key, "5", 403), (stack.api_key, "0", ok), (stack.api_key, "-3", ok),
                (premium, "5", ok), (premium, "6", 403), (premium, "128", 400), (premium, "x", 400),
            ):  # fmt: skip
                headers = {"Authorization": f"Bearer {key}", "X-Casola-Priority": priority, **extra}
                r = await http.request("POST", "/v1/run/echo", b"x", headers)
                assert r.status == status, (priority, r.body)
                if status == 403:
                    assert b"permission_denied" in r.body
        finally:
            await http.close()
            await stack.stop()

    run_uvloop(main)
