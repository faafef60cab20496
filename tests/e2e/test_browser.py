"""A real browser calls casola from a page on another origin (DESIGN "Timing users can see"):
headless Chromium (Debian's `chromium`) loads a page from a second local server, whose script calls
`POST /v1/run/echo` with an API key and `X-Casola-Trace: 1`. The preflight must pass, the answer and
its `X-Request-Id` must be readable, and `PerformanceServerTiming` must list casola's stages (it
lists none unless `Timing-Allow-Origin` allows the page). The page reports what it saw back to the
server it came from."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path
from typing import Any

from tests.e2e.chromium import PageSite, chromium_args
from tests.e2e.stack import Stack, run_uvloop
from tests.require import need_program

PAGE = """<!doctype html><html><body><script>
(async () => {
  const out = {};
  try {
    const r = await fetch("%(api)s/v1/run/echo", {
      method: "POST",
      headers: {"Authorization": "Bearer %(key)s", "Content-Type": "application/octet-stream",
                "X-Casola-Trace": "1", "X-Request-Id": "from-the-page-1"},
      body: "hello from another origin",
    });
    out.status = r.status;
    out.body = await r.text();
    out.requestId = r.headers.get("x-request-id");
    out.serverTimingHeader = r.headers.get("server-timing");
    await new Promise(done => setTimeout(done, 200));  // resource entries are added after the body
    const entry = performance.getEntriesByType("resource").find(e => e.name.includes("/v1/run/echo"));
    out.entries = entry ? entry.serverTiming.map(s => ({name: s.name, duration: s.duration})) : null;
  } catch (e) {
    out.error = String(e);
  }
  await fetch("/report", {method: "POST", body: JSON.stringify(out)});
})();
</script></body></html>"""


def test_a_page_on_another_origin_reads_server_timing(tmp_path: Path) -> None:
    binary = need_program("chromium")

    async def main() -> dict[str, Any]:
        site = PageSite()
        origin = await site.start()
        stack = await Stack(tmp_path / "state", ingress={"cors_origins": [origin]}).start()
        await stack.add_worker()
        api = f"http://127.0.0.1:{stack.http_port}"  # another port: another origin
        site.pages["/"] = ("text/html", (PAGE % {"api": api, "key": stack.api_key}).encode())
        proc = await asyncio.create_subprocess_exec(
            *chromium_args(binary, tmp_path / "profile", origin + "/"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(site.report, 45)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            await stack.stop()
            site.close()

    got = run_uvloop(main, timeout=90)
    assert "error" not in got, got  # a refused preflight shows up here as "TypeError: Failed to fetch"
    assert (got["status"], got["body"], got["requestId"]) == (200, "hello from another origin", "from-the-page-1")
    assert got["serverTimingHeader"] and "worker-rtt" in got["serverTimingHeader"]
    names = [e["name"] for e in got["entries"]]
    assert {"ingress", "queue-overhead", "wait", "worker-rtt", "work"} <= set(names), got
    assert all(e["duration"] >= 0 for e in got["entries"])
