"""An async workflow checkpoints each completed step; its queue node SIGKILLed mid-run and restarted
on the same SQLite store, it resumes at the first unfinished step, never from zero (issue 15,
deliverables 5 and 9): the steps that completed before the kill plus those after it are the steps of
the workflow, and no step before the interrupted one runs again."""

from __future__ import annotations

import asyncio
import http.server
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from casola.client import Result
from tests.e2e.procs import Edge, Keys, Poller, Procs, free_port, wait_listening, wait_outcome
from tests.e2e.stack import run_uvloop

STEPS = ("s1", "s2", "s3", "s4")


class StepServer:
    """Each step is an HTTP tool here. The first call of `s3` is held until the test has killed the
    queue node, so the kill falls inside that step; the calls answered are counted per step."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.s3_running = threading.Event()
        self.node_killed = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                step = self.path.strip("/")
                args = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                server.started[step] += 1
                if step == "s3" and server.started[step] == 1:
                    server.s3_running.set()
                    server.node_killed.wait(30)
                    self.close_connection = True
                    return  # its caller is gone: this call never answers
                time.sleep(0.05)
                body = json.dumps({"done": [*args.get("done", []), step]}).encode()
                # Counted before the answer leaves: once written, the node may start the next step
                # (and the test read the counts) before this thread runs again.
                server.answered[step] += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


def _config(path: Path, tool_port: int) -> Path:
    steps = ", ".join(f'{{ name = "{s}", kind = "tool", tool = "{s}" }}' for s in STEPS)
    tools = "\n".join(
        f'[workflows.four.tools.{s}]\nurl = "http://127.0.0.1:{tool_port}/{s}"\nparameters = {{ type = "object" }}\n'
        for s in STEPS
    )
    path.write_text(
        '[queue]\nworker_ping_timeout = 2.0\noutbound_allow = ["127.0.0.1/32"]\n\n'
        "[queue.jobs]\nlease_s = 1.0\nsweep_interval = 0.2\nmax_attempts = 5\n\n"
        f"[workflows.four]\nsteps = [{steps}]\n\n{tools}"
    )
    return path


def test_an_async_workflow_resumes_at_the_first_unfinished_step_after_a_queue_node_sigkill(tmp_path: Path) -> None:
    server = StepServer()

    async def main() -> tuple[Result, dict[str, int], dict[str, int]]:
        keys = Keys(tmp_path)
        procs = Procs(keys)
        port = free_port()
        config = _config(tmp_path / "queue.toml", server.port)

        def start_node() -> subprocess.Popen[bytes]:
            return procs.queue_node(port, store=f"sqlite:///{tmp_path}/jobs.db", config=config, models="echo")

        edge: Edge | None = None
        poller: Poller | None = None
        try:
            node = start_node()
            await wait_listening(port, node)
            edge = await Edge(keys, [f"127.0.0.1:{port}"]).start()
            poller = Poller(edge.frames_port, keys.api_key)
            c = await poller.get()
            job = await c.submit("four", b"{}", content_type="application/json")
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, server.s3_running.wait, 30), "s3 never started"
            before = dict(server.answered)
            node.send_signal(signal.SIGKILL)
            node.wait(10)
            server.node_killed.set()
            node = start_node()
            await wait_listening(port, node)
            out = await wait_outcome(poller, job.request_id, time.monotonic() + 40)
            assert isinstance(out, Result), out
            return out, before, dict(server.answered)
        finally:
            server.node_killed.set()
            if poller is not None:
                await poller.close()
            if edge is not None:
                await edge.stop()
            procs.stop_all()
            server.http.shutdown()

    result, before, after = run_uvloop(main, timeout=120)
    assert json.loads(result.payload) == {"done": list(STEPS)}
    assert before == {"s1": 1, "s2": 1}  # s3 was running when the node died
    ran_after = {s: after.get(s, 0) - before.get(s, 0) for s in STEPS}
    assert ran_after == {"s1": 0, "s2": 0, "s3": 1, "s4": 1}  # resumed at s3, not from zero
    assert sum(before.values()) + sum(ran_after.values()) == len(STEPS)
    assert server.started == {"s1": 1, "s2": 1, "s3": 2, "s4": 1}  # only the interrupted step ran twice
