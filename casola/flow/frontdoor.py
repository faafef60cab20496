"""The engine's way in to the queue node: one in-process link through the node's front door, on
which every step is an ordinary request (DESIGN "Workflows": scheduled in its pool, filtered,
timed, retried before its first byte and refused like a request from outside). Nothing here knows
the queue node's internals: `Connect` is `QueueNode.connect_member`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from casola.client import Client, Stream
from casola.net.link import LinkBase
from casola.wire import Buffer, HelloMeta, RequestMeta

__all__ = ["Connect", "FrontDoor"]

# QueueNode.connect_member: (hello, on_events, on_lost, **dial options) -> a link admitted as `hello.role`
Connect = Callable[..., Awaitable[LinkBase]]


class FrontDoor:
    def __init__(self, connect: Connect, node_id: str) -> None:
        self._connect, self._node_id = connect, node_id
        self._client: Client | None = None

    async def start(self) -> None:
        hello = HelloMeta("ingress", node_id=self._node_id)
        self._client = await Client.over(lambda on_events, on_lost: self._connect(hello, on_events, on_lost))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()

    def open(self, meta: RequestMeta, payload: Buffer, *, end: bool = True) -> Stream:
        """Send one step request (`end=False`: its input goes on in `Stream.send`, a realtime
        session's audio). Raises ConnectionLost, RequestFailed (no stream credit)."""
        assert self._client is not None, "FrontDoor.start() first"
        return self._client.request(meta, payload, end=end)

    def cancel(self, stream: Stream) -> None:
        if self._client is not None:
            self._client.cancel(stream)
