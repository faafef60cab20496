"""The outbound address policy (what is refused, in which spellings) and the checked HTTP client over
real loopback sockets: one resolution, connection to the checked address, TLS by name, timeouts."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from casola.certs import make_dev_certs, server_context
from casola.net.outbound import (
    OutboundCallError,
    OutboundClient,
    OutboundError,
    OutboundPolicy,
    OutboundRefused,
    parse_ipv4_literal,
)
from tests.queue.test_webhooks import Receiver

LOOPBACK = OutboundPolicy(["127.0.0.0/8"])
SECRETS = ("us3r", "pa55", "p4th", "t0k3n")

# ----------------------------------------------------------------------------------------------- literals

FORMS = [
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "0177.0.0.1",
    "0177.0.0.01",
    "017700000001",
    "127.1",
    "127.0.1",
    "0x7f.1",
    "0x7f.0.0.0x1",
    "0",
    "00",
    "1.2.3.4",
    "255.255.255.255",
    "1.16777215",
    "1.16777216",
    "256.0.0.1",
    "0x100.0.0.1",
    "4294967295",
    "4294967296",
    "1.2.3.4.5",
    "127.0.0.1.",
    ".127.0.0.1",
    "1..2",
    "0x",
    "08.0.0.1",
    "09",
    "0x7g",
    "1e3",
    "+1",
    "example.com",
    "",
]


@pytest.mark.skipif(sys.platform != "linux", reason="the forms are glibc's")
@pytest.mark.parametrize("host", FORMS)
def test_ipv4_literals_are_read_as_the_c_resolver_reads_them(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        expected = ip_address(infos[0][4][0])
    except (socket.gaierror, UnicodeError):
        expected = None
    assert parse_ipv4_literal(host) == expected


# ------------------------------------------------------------------------------------------------ policy

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.1.2", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.1.2.3", "multicast"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("192.0.0.9", "IETF"),
    ("192.0.2.1", "private"),  # documentation
    ("198.18.0.1", "benchmarking"),
    ("240.0.0.1", "private"),
    ("255.255.255.255", "private"),
    ("2001:db8::1", "private"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "127.0.0.1, a loopback"),
    ("::ffff:10.0.0.1", "10.0.0.1, a private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
    ("64:ff9b::7f00:1", "127.0.0.1, a loopback"),  # NAT64 of loopback
    ("64:ff9b:1::1", "NAT64"),
    ("2002:7f00:1::1", "6to4 for 127.0.0.1"),
    ("2002:a00:1::1", "6to4 for 10.0.0.1"),
    ("2001::1", "IETF"),  # Teredo
    ("100::1", "private"),  # discard-only
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    reason = OutboundPolicy().refusal(ip_address(address))
    assert reason is not None and why in reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert OutboundPolicy().refusal(ip_address(address)) is None


def test_the_allow_list_admits_its_networks_and_their_ipv6_forms() -> None:
    policy = OutboundPolicy(["127.0.0.0/8", "fd12::/16", "10.1.0.0/16"])
    for address in ["127.0.0.1", "127.9.9.9", "::ffff:127.0.0.1", "fd12::5", "10.1.2.3", "64:ff9b::a01:203"]:
        assert policy.refusal(ip_address(address)) is None, address
    for address in ["::1", "10.2.0.1", "fd13::1", "169.254.169.254", "192.168.0.1"]:
        assert policy.refusal(ip_address(address)) is not None, address


@pytest.mark.parametrize("bad", ["nope", "10.0.0.1/8", "127.0.0.0/33", "::1/129", ""])
def test_a_bad_allow_entry_is_an_error_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match="outbound_allow") as err:
        OutboundPolicy(["127.0.0.0/8", bad])
    assert repr(bad) in str(err.value)


# ----------------------------------------------------------------------------------------- submit check

LITERAL_URLS = [
    "http://127.0.0.1/p4th",
    "http://2130706433/p4th",
    "http://0x7f000001:8080/p4th",
    "http://127.1/p4th",
    "http://0x7f.1/p4th",
    "http://0/p4th",
    "http://[::1]/p4th",
    "http://[::ffff:127.0.0.1]/p4th",
    "http://[::ffff:7f00:1]/p4th",
    "http://[fe80::1%25eth0]/p4th",
    "http://169.254.169.254/latest/meta-data",
    "https://10.0.0.1:8443/p4th",
    "http://[64:ff9b::a9fe:a9fe]/p4th",
    "http://localhost:9/p4th",
    "http://LOCALHOST./p4th",
    "http://api.localhost/p4th",
]


@pytest.mark.parametrize("url", LITERAL_URLS)
def test_submit_check_refuses_address_literals_in_every_spelling(url: str) -> None:
    secret = url.replace("://", "://us3r:pa55@") + "?t0k3n=1"
    with pytest.raises(OutboundRefused) as err:
        OutboundPolicy().check_url(secret)
    assert not any(s in str(err.value) for s in SECRETS), str(err.value)
    assert "refused" in str(err.value)


def test_submit_check_passes_names_public_literals_and_allowed_ones() -> None:
    target = OutboundPolicy().check_url("https://us3r:pa55@Hooks.Example.COM/p4th?t0k3n=1")
    assert (target.scheme, target.host, target.port, target.target) == (
        "https",
        "hooks.example.com",
        443,
        b"/p4th?t0k3n=1",
    )
    assert target.auth == ("us3r", "pa55") and target.where == "https://hooks.example.com"
    assert not any(s in repr(target) for s in SECRETS)
    assert OutboundPolicy().check_url("http://8.8.8.8:8080/").netloc == "8.8.8.8:8080"
    assert OutboundPolicy().check_url("http://[2001:4860:4860::8888]/").netloc == "[2001:4860:4860::8888]"
    assert LOOPBACK.check_url("http://2130706433:9/").host == "2130706433"
    assert LOOPBACK.check_url("http://localhost/").host == "localhost"  # 127.0.0.1 is allowed, ::1 is not


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "example.com/hook",
        "http:///x",
        "",
        "http://example.com:99999/p4th",
        "http://example.com:0/p4th",
        "http://0177.0.0.1/p4th",  # httpx refuses the octal spelling outright
        "http://ex\x00ample.com/p4th",
    ],
)
def test_submit_check_refuses_what_is_not_an_http_url(url: str) -> None:
    with pytest.raises(OutboundError) as err:
        OutboundPolicy(["0.0.0.0/0"]).check_url(url + "?t0k3n=1")
    assert not any(s in str(err.value) for s in SECRETS)


# ------------------------------------------------------------------------------------------------ client


class FakeDNS:
    """A resolver with scripted answers per name, counting lookups; literals resolve to themselves."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        script = self.answers.get(host)
        if script is None:
            return [host]
        return script.pop(0) if len(script) > 1 else script[0]


@pytest.mark.asyncio
async def test_a_name_is_resolved_once_and_the_checked_address_is_connected_to() -> None:
    """DNS rebinding: the first answer is allowed loopback and is connected to (the real resolver does
    not know `hook.test`, so no second lookup could have found it); the next answer, link-local, is
    refused before any connection."""
    dns = FakeDNS({"hook.test": [["127.0.0.1"], ["169.254.169.254"]]})
    client = OutboundClient(LOOPBACK, resolver=dns)
    try:
        async with Receiver() as rx:
            url = f"http://hook.test:{rx.port}/p4th?t0k3n=1"
            resp = await client.post(url, b"{}", {"x-test": "1"})
            assert resp.status == 200 and resp.body == b"ok"
            assert dns.lookups == ["hook.test"]
            [got] = rx.requests
            assert got.headers["host"] == f"hook.test:{rx.port}" and got.target == "/p4th?t0k3n=1"
            assert got.headers["x-test"] == "1" and got.headers["content-length"] == "2"
            with pytest.raises(OutboundRefused, match=re.escape("hook.test: refused, 169.254.169.254 is a link-local")):
                await client.post(url, b"{}", {})
            assert len(rx.requests) == 1
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_refused_addresses_of_a_name_are_skipped_and_none_left_is_a_refusal() -> None:
    dns = FakeDNS({"mixed.test": [["10.0.0.1", "127.0.0.1"]], "inside.test": [["10.0.0.1", "::1"]]})
    client = OutboundClient(LOOPBACK, resolver=dns)
    try:
        async with Receiver() as rx:
            assert (await client.post(f"http://mixed.test:{rx.port}/", b"", {})).status == 200
            with pytest.raises(OutboundRefused) as err:
                await client.post(f"http://inside.test:{rx.port}/p4th", b"", {})
            assert err.value.where == "inside.test" and "p4th" not in str(err.value)
            assert len(rx.requests) == 1
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_tls_verifies_and_sends_the_name_while_connecting_to_the_address(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path, ["hook.test"])  # valid for the name only, not for 127.0.0.1
    server = server_context(certs.cert, certs.key)
    seen: list[str | None] = []
    server.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[assignment,misc,return-value]
    trust = ssl.create_default_context(cafile=str(certs.ca))
    client = OutboundClient(LOOPBACK, ssl_context=trust, resolver=FakeDNS({"hook.test": [["127.0.0.1"]]}))
    try:
        async with Receiver(tls=server) as rx:
            resp = await client.post(f"https://hook.test:{rx.port}/p4th", b"{}", {})
            assert resp.status == 200 and seen == ["hook.test"]
            assert rx.requests[0].headers["host"] == f"hook.test:{rx.port}"
            with pytest.raises(OutboundCallError, match="certificate") as err:  # by address: the name is checked
                await client.post(f"https://127.0.0.1:{rx.port}/p4th", b"{}", {})
            assert err.value.args[0].startswith(f"https://127.0.0.1:{rx.port}:") and "p4th" not in str(err.value)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_the_whole_exchange_is_bounded_by_the_timeout() -> None:
    client = OutboundClient(LOOPBACK, timeout=0.3)
    try:
        async with Receiver(["hang"]) as rx:
            started = time.monotonic()
            with pytest.raises(OutboundCallError) as err:
                await client.post(f"http://us3r:pa55@127.0.0.1:{rx.port}/p4th?t0k3n=1", b"{}", {})
            assert time.monotonic() - started < 2.0
            assert str(err.value).startswith(f"http://127.0.0.1:{rx.port}:")
            assert not any(s in str(err.value) for s in SECRETS)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_unresolvable_and_unreachable_hosts_are_call_errors() -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OutboundClient(LOOPBACK, resolver=nxdomain)
    try:
        with pytest.raises(OutboundCallError, match=re.escape("cannot resolve gone.test")):
            await client.post("http://gone.test/p4th", b"", {})
    finally:
        await client.aclose()
    client = OutboundClient(LOOPBACK)
    try:
        with pytest.raises(OutboundCallError, match=re.escape(f"http://127.0.0.1:{port}: ConnectError")):
            await client.post(f"http://127.0.0.1:{port}/p4th", b"", {})
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_a_long_answer_is_read_only_up_to_the_bound() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 1_000_000)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = OutboundClient(LOOPBACK)
    try:
        resp = await client.post(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/", b"", {}, max_response=100)
        assert resp.status == 200 and resp.body == b"x" * 100 and resp.truncated
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


def test_a_bad_outbound_allow_entry_fails_the_config_load(tmp_path: Path) -> None:
    from casola.config import ConfigError, load_config

    path = tmp_path / "casola.toml"
    path.write_text('[queue]\noutbound_allow = ["127.0.0.0/8", "10.0.0.1/8"]\n')
    with pytest.raises(ConfigError, match=re.escape("'10.0.0.1/8' is not a CIDR network")):
        load_config(path)
    path.write_text('[queue]\noutbound_allow = ["127.0.0.0/8", "::1/128"]\n')
    assert load_config(path).queue.outbound_allow == ["127.0.0.0/8", "::1/128"]
