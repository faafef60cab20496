"""A slow reader's progress counts the bytes the kernel still holds for it (casola.net.sendqueue):
over TCP, what sits in the socket's send queue has not been taken by the peer."""

from __future__ import annotations

import socket
import sys

import pytest

from casola.net.sendqueue import kernel_unsent


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is Linux's")
def test_the_kernel_send_queue_holds_what_the_peer_has_not_taken() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        client.setblocking(False)
        sent = 0
        try:
            while sent < 8 << 20:
                sent += client.send(b"x" * 65536)
        except BlockingIOError:
            pass  # the kernel holds all it will
        held = kernel_unsent(client.fileno())
        assert 0 < held <= sent
        peer.settimeout(2)
        got = 0
        while got < 256 * 1024:
            got += len(peer.recv(65536))
        assert kernel_unsent(client.fileno()) < held  # the peer took some: the queue shrank
        assert kernel_unsent(-1) == 0
    finally:
        for s in (client, peer, server):
            s.close()
