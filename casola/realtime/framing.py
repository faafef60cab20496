"""How a realtime session's messages travel on its one stream (docs/realtime.md, "Messages"): each
WebSocket message is one DATA payload, a tag byte then the message's bytes unchanged."""

from __future__ import annotations

from typing import Final

__all__ = ["CONTENT_TYPE", "TAG_BINARY", "TAG_TEXT"]

# The REQUEST's content type: its DATA payloads are tagged messages, not one body.
CONTENT_TYPE: Final = "application/x-casola-realtime"
TAG_TEXT: Final = 0x01  # UTF-8 JSON, a control event
TAG_BINARY: Final = 0x02  # raw bytes: audio
