"""Headless Chromium (Debian's `chromium`) as the browser tests run it, and the local site that
serves it the test's page and takes back what the page saw."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from casola.ingress.http import Exchange, serve_http


def chromium_args(binary: str, profile: Path, url: str, *extra: str) -> list[str]:
    """The command line: headless, no first-run noise, a fresh profile; `extra` flags before the URL."""
    return [
        binary,
        "--headless=new",
        "--no-sandbox",  # root in CI; the sandbox needs an unprivileged user
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        *extra,
        f"--user-data-dir={profile}",
        url,
    ]


class PageSite:
    """A second local server (another origin than the ingress): GET answers from `pages` (path ->
    content type and body, filled in before the browser asks; the query is ignored), and the page's
    `POST /report` of a JSON object resolves `report`."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[str, bytes]] = {}
        self.report: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Serve on a free loopback port; the site's origin."""
        self._server = await serve_http(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _serve(self, ex: Exchange) -> None:
        path = ex.path.split(b"?")[0].decode()
        if path == "/report":
            chunks: list[bytes] = []
            ex.on_body = chunks.append

            def done() -> None:
                if not self.report.done():
                    self.report.set_result(json.loads(b"".join(chunks)))
                ex.respond(204, [])

            ex.on_body_end = done
        elif path in self.pages:
            kind, body = self.pages[path]
            ex.respond(200, [(b"content-type", kind.encode() + b"; charset=utf-8")], body)
        else:
            ex.respond(404, [(b"content-type", b"text/plain")], b"not found")
