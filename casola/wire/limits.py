"""Configured limits of one connection's codec (SPEC §8).

Every length the peer sends is checked against these as soon as the fixed header arrives, before any
byte of metadata or payload is waited for (SPEC §2.3). Each default carries its reason.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["DEFAULT_LIMITS", "MAX_CREDIT", "MAX_META_DEPTH", "MAX_STREAM_ID", "Limits"]

MAX_STREAM_ID: Final = 0xFFFF_FFFF  # u32 on the wire; a side that runs out sends GOAWAY and redials
MAX_CREDIT: Final = 0x7FFF_FFFF  # credits held at once; a grant past this is CREDIT_VIOLATION
# How deep arrays and maps may nest in metadata, the metadata array being depth 1 (SPEC §4.2).
# v1's own fields nest 2 deep; protobuf's default recursion limit is 100, serde_json's 128. A fixed
# bound makes every receiver agree on what an ignored element may hold, where a recursive decoder
# would otherwise stop wherever its stack does (msgspec raises RecursionError near Python's 1000).
MAX_META_DEPTH: Final = 32


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-connection limits; all sizes in bytes, all times in seconds.

    Raises:
        ValueError: at construction, when the sizes cannot work together.
    """

    # 16 KiB: metadata is routing facts, not data. gRPC's default metadata cap is 8 KiB, nginx's
    # large header buffer 8 KiB; HELLO with a signed credential and a model list needs a bit more.
    max_meta: int = 16 * 1024
    # 16 MiB per frame, HTTP/2's largest SETTINGS_MAX_FRAME_SIZE; gRPC's default message cap is
    # 4 MiB. Bigger bodies are split into DATA frames, so this bounds one allocation, not a body.
    max_payload: int = 16 * 1024 * 1024
    # Payloads of at least this size get their own buffer and are received straight into it;
    # smaller ones are copied once out of the shared receive buffer (memcpy of 16 KiB is ~1 us).
    inline_max: int = 16 * 1024
    # Shared receive buffer. 64 KiB is what one recv() of a loopback/LAN socket typically returns
    # and what asyncio reads per call; it must hold a full header + max_meta + an inline payload.
    rx_buffer: int = 64 * 1024
    # Concurrently open streams per connection. HTTP/2 recommends >= 100 (nginx uses 128); one
    # ingress->queue connection multiplexes many clients, so 1024.
    max_streams: int = 1024
    # HELLO/HELLO_ACK must complete within this (slowloris-style connects hold no slot forever).
    handshake_timeout: float = 10.0
    # PING cadence. The ingress picks the nearest queue node by RTT, so RTT is measured all the
    # time, not only when idle; one 28-byte frame per second per connection costs nothing.
    ping_interval: float = 1.0
    # No PONG within this: the peer is gone or wedged (TIMEOUT). Generous, because a PONG can queue
    # behind megabytes of payload on a busy link.
    ping_timeout: float = 10.0

    def __post_init__(self) -> None:
        from casola.wire.frames import HEAD_SIZE  # late import: frames imports nothing from here

        if min(self.max_meta, self.max_payload, self.inline_max, self.max_streams) < 1:
            raise ValueError("limits must be positive")
        if self.rx_buffer < HEAD_SIZE + self.max_meta + self.inline_max:
            raise ValueError(
                f"rx_buffer ({self.rx_buffer}) must hold a header, max_meta ({self.max_meta})"
                f" and an inline payload below inline_max ({self.inline_max})"
            )
        if self.max_streams > MAX_CREDIT:
            raise ValueError("max_streams exceeds the credit counter")


DEFAULT_LIMITS: Final = Limits()
