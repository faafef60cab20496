"""The ingress over TCP to several queue nodes: region pins (header and key) and nearest by RTT."""

from __future__ import annotations

from pathlib import Path

from casola.auth import SCOPE_RUN
from casola.ingress.server import Ingress, IngressConfig
from casola.ingress.upstream import QueueNodeSpec, Upstream
from casola.queue.node import QueueConfig, QueueNode
from casola.worker import Echo, WorkerConfig, WorkerRuntime
from tests.e2e.stack import HttpClient, Stack, run_uvloop


def test_requests_follow_region_pins_over_pooled_tcp_links(tmp_path: Path) -> None:
    async def main() -> None:
        keys = Stack(tmp_path).keys  # only for its key store
        verifier = keys.verifier()
        nodes, workers = {}, []
        for region in ("eu", "us"):
            node = QueueNode(QueueConfig(listen="127.0.0.1:0", region=region, node_id=f"q-{region}"), verifier)
            await node.start()
            nodes[region] = node
            wkey = keys.ensure_key("worker-key", "_workers", ["worker"], "tests")
            echo = Echo()
            rt = WorkerRuntime(WorkerConfig(queue=[f"127.0.0.1:{node.port}"], capacity=4), [echo], wkey)
            await rt.start()
            await rt.wait_registered()
            workers.append((rt, echo, region))
        specs = [QueueNodeSpec(address=f"127.0.0.1:{n.port}") for n in nodes.values()]  # regions from HELLO_ACK
        upstream = Upstream(specs, keys.ensure_key("ingress-key", "_system", ["ingress"], "tests"))
        ingress = Ingress(IngressConfig(http="127.0.0.1:0", frames=""), verifier, upstream)
        await upstream.start(wait=5)
        await ingress.start()
        http = await HttpClient.connect(ingress.ports[0])
        _, eu_only = keys.create("dev", [SCOPE_RUN], region="eu")
        _, anywhere = keys.create("dev", [SCOPE_RUN])
        try:
            for region in ("eu", "us", "us", "eu"):
                r = await http.request(
                    "POST", "/v1/run/echo", region.encode(), {"Authorization": f"Bearer {anywhere}", "X-Region": region}
                )
                assert r.status == 200 and r.body == region.encode()
            served = {region: echo.finished for _, echo, region in workers}
            assert served == {"eu": 2, "us": 2}  # each request ran in the region it named
            r = await http.request("POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {eu_only}"})
            assert r.status == 200 and workers[0][1].finished == 3  # the key's pin routes it
            r = await http.request(
                "POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {eu_only}", "X-Region": "us"}
            )
            assert r.status == 403  # a pinned key never leaves its region
            r = await http.request(
                "POST", "/v1/run/echo", b"x", {"Authorization": f"Bearer {anywhere}", "X-Region": "mars"}
            )
            assert r.status == 503 and r.headers["x-should-retry"] == "true"
            r = await http.request("POST", "/v1/run/echo", b"nearest", {"Authorization": f"Bearer {anywhere}"})
            assert r.status == 200  # unpinned: the node with the lowest measured RTT
            health = await http.request("GET", "/healthz")
            assert health.status == 200 and b'"region":"eu"' in health.body and b'"region":"us"' in health.body
        finally:
            await http.close()
            await ingress.stop()
            await upstream.stop()
            for rt, _, _ in workers:
                await rt.stop()
            for node in nodes.values():
                await node.stop()

    run_uvloop(main)
