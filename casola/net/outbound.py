"""Outbound HTTP made on a tenant's behalf (webhooks; later workflow HTTP tools), held to one address
policy (DESIGN "Auth and tenancy": every such call refuses loopback, private and link-local addresses
unless an operator allows them).

A URL a tenant gives is a request for the platform to connect somewhere from inside its network.
`OutboundPolicy` refuses every address that is not globally routable: loopback, private (RFC 1918,
ULA), link-local, multicast, unspecified, reserved, shared (100.64/10), documentation and benchmarking
ranges, and IPv6 addresses that stand for such an IPv4 one (mapped, NAT64, 6to4), unless an
operator's allow-list of CIDR networks covers it. It is applied twice:

- at submit, without DNS (`OutboundPolicy.check_url`): http or https, a host, and a host that is an
  address literal in any form the C resolver reads as one (`2130706433`, `0x7f000001`, `0177.0.0.1`,
  `127.1`, `[::ffff:127.0.0.1]`) or a `localhost` name is checked there and then;
- at connect (`OutboundClient`): the host is resolved once, every address is checked, and the TCP
  connection goes to a checked address, never to a second resolution of the name (no DNS rebinding),
  while TLS SNI, certificate verification and `Host` use the name. No redirects, no proxies.

Errors and logs name `scheme://host:port` only: user info, path and query may carry secrets.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Final

import httpcore
import httpx

from casola import __version__

__all__ = [
    "OutboundCallError",
    "OutboundClient",
    "OutboundError",
    "OutboundPolicy",
    "OutboundRefused",
    "OutboundResponse",
    "OutboundURL",
    "Resolver",
    "parse_ipv4_literal",
    "parse_url",
    "system_resolver",
]

log = logging.getLogger("casola.outbound")

IPAddress = IPv4Address | IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]  # (host, port) -> address strings

# Refused beyond what `ipaddress` flags (Python 3.11 lists only parts of some of these ranges).
_ALSO_REFUSED: Final = tuple(
    (ip_network(net), why)
    for net, why in (
        ("100.64.0.0/10", "shared (carrier-grade NAT, RFC 6598)"),
        ("192.0.0.0/24", "IETF protocol assignment (RFC 6890)"),
        ("192.88.99.0/24", "6to4 relay anycast (RFC 7526)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
        ("2001::/23", "IETF protocol assignment (RFC 2928)"),
    )
)
_NAT64: Final = ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address reached
_DEFAULT_PORT: Final = {"http": 80, "https": 443}
_V4_PART: Final = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")  # inet_aton: hex, octal, decimal
_MAX_ADDRESSES: Final = 8  # of one name, tried in turn (a name with more is not a webhook receiver)
_LOCALHOST: Final = (IPv4Address("127.0.0.1"), IPv6Address("::1"))  # RFC 6761: localhost names


class OutboundError(ValueError):
    """A URL that outbound calls do not take (not http(s), no host, unparsable)."""


class OutboundRefused(OutboundError):
    """The policy refuses every address of a URL's host. `where` is `scheme://host:port` or the host."""

    def __init__(self, where: str, address: str, reason: str) -> None:
        self.where, self.address, self.reason = where, address, reason
        super().__init__(f"{where}: refused, {address} is {reason} (an operator may allow it: outbound_allow)")


class OutboundCallError(Exception):
    """An outbound call failed in transit (resolve, connect, TLS, protocol, timeout); worth retrying.
    The message names the host only."""


@dataclass(frozen=True, slots=True, repr=False)
class OutboundURL:
    """A parsed outbound URL: what is checked is what is connected to (one parse for both)."""

    scheme: str  # "http" or "https"
    host: str  # ASCII (IDNA), lower case; an IPv6 literal without brackets
    port: int
    target: bytes  # path and query, as sent in the request line (never logged)
    auth: tuple[str, str] | None  # user info, sent as Basic authorization (never logged)

    @property
    def where(self) -> str:
        """`scheme://host:port`, the only part of the URL that logs and errors show."""
        return f"{self.scheme}://{self.netloc}"

    @property
    def netloc(self) -> str:
        """The `Host` header: the host, bracketed when IPv6, with the port unless it is the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORT[self.scheme] else f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"OutboundURL({self.where})"


def parse_url(url: str) -> OutboundURL:
    """Parse an outbound URL (no policy check).

    Raises:
        OutboundError: not an http or https URL with a host and a port in 1..65535; the message
            does not repeat the URL.
    """
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:  # httpx's messages name a component, not the URL
        raise OutboundError(f"not a valid URL: {exc}") from None
    if u.scheme not in _DEFAULT_PORT or not u.raw_host:
        raise OutboundError("the URL must be http(s)://host/...")
    port = u.port if u.port is not None else _DEFAULT_PORT[u.scheme]
    if not 0 < port < 65536:
        raise OutboundError(f"{u.scheme}://{u.host}: port {port} is out of range")
    auth = (u.username, u.password) if u.userinfo else None
    return OutboundURL(u.scheme, u.raw_host.decode("ascii"), port, u.raw_path, auth)


def parse_ipv4_literal(host: str) -> IPv4Address | None:
    """`host` read as the C resolver reads an IPv4 literal (inet_aton: 1 to 4 parts, each decimal, `0x`
    hex or `0` octal, the last filling the remaining bytes: `127.1`, `2130706433`), or None when it
    is not one (then the resolver looks it up as a name)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.fullmatch(p) for p in parts):
        return None
    *head, last = [int(p[2:], 16) if p[:2] in ("0x", "0X") else int(p, 8 if p[0] == "0" else 10) for p in parts]
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return IPv4Address(value)


def _literal_addresses(host: str) -> tuple[IPAddress, ...]:
    """The addresses `host` stands for without DNS: an IP literal, or a localhost name; else ()."""
    if ":" in host:
        try:
            return (IPv6Address(host.replace("%25", "%")),)  # httpx keeps a zone id percent-encoded
        except ValueError:
            return ()
    if (v4 := parse_ipv4_literal(host)) is not None:
        return (v4,)
    name = host.removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return _LOCALHOST
    return ()


def _special(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is, or None when it is globally routable."""
    for test, why in (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, IPv6Address) and ip.is_site_local, "site-local"),
    ):
        if test:
            return f"a {why} address"
    for net, why in _ALSO_REFUSED:
        if ip.version == net.version and ip in net:
            return f"a {why} address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None


class OutboundPolicy:
    """Which addresses outbound calls may connect to: the globally routable ones, plus the operator's
    `allow` networks (CIDR, e.g. "127.0.0.0/8", "::1/128", "10.1.0.0/16")."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        """Parse the allow-list.

        Raises:
            ValueError: an entry of `allow` is not a CIDR network (the message names it).
        """
        self.allow = tuple(_network(text) for text in allow)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why `ip` may not be connected to ("a loopback address", ...), or None when it may."""
        if any(ip.version == net.version and ip in net for net in self.allow):
            return None
        if isinstance(ip, IPv6Address):
            v4 = ip.ipv4_mapped or (IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
            if v4 is not None:  # reaches v4 itself: v4's verdict, allow-list included
                why = self.refusal(v4)
                return None if why is None else f"{v4}, {why}"
            if ip.sixtofour is not None and (why := self.refusal(ip.sixtofour)) is not None:
                return f"6to4 for {ip.sixtofour}, {why}"
        return _special(ip)

    def check_url(self, url: str) -> OutboundURL:
        """The submit-time check, without DNS: parse `url` and check a host that is an address literal
        (any form the C resolver accepts) or a localhost name. Other names are checked at connect.

        Raises:
            OutboundRefused: the host is an address (or localhost) the policy refuses.
            OutboundError: not an http(s) URL with a host (the message does not repeat the URL).
        """
        target = parse_url(url)
        found = _literal_addresses(target.host)
        refused = [(ip, why) for ip in found if (why := self.refusal(ip)) is not None]
        if found and len(refused) == len(found):  # localhost: refused only if both of its forms are
            ip, why = refused[0]
            raise OutboundRefused(target.where, str(ip), why)
        return target


def _network(text: str) -> IPv4Network | IPv6Network:
    try:
        return ip_network(text.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"outbound_allow: {text!r} is not a CIDR network ({exc})") from None


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system resolver (getaddrinfo, in the loop's executor).

    Raises:
        OSError: resolution failed (socket.gaierror).
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend that resolves once, checks, and connects to a checked address."""

    def __init__(self, policy: OutboundPolicy, resolver: Resolver) -> None:
        self._policy, self._resolve = policy, resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):  # resolving counts against the connect timeout
                addresses = await self._checked(host, port)
                # each address gets its share, so one that drops SYNs (broken IPv6) leaves time for the next
                share = None if timeout is None else timeout / len(addresses)
                return await self._connect(addresses, port, share, local_address, socket_options)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection within {timeout:g} s") from None

    async def _checked(self, host: str, port: int) -> list[str]:
        try:
            found = list(dict.fromkeys(await self._resolve(host, port)))  # unique, resolver's order
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        ok: list[tuple[str, str | None]] = []
        refused: list[tuple[str, str | None]] = []
        for text in found:
            try:
                why = self._policy.refusal(ip_address(text))
            except ValueError:
                why = "not an IP address"
            (ok if why is None else refused).append((text, why))
        if refused:
            log.debug("%s: skipping refused addresses %s", host, ", ".join(t for t, _ in refused))
        if not ok:
            if not refused:
                raise httpcore.ConnectError(f"{host} has no address")
            raise OutboundRefused(host, refused[0][0], str(refused[0][1]))
        return [text for text, _ in ok[:_MAX_ADDRESSES]]

    async def _connect(
        self, addresses: list[str], port: int, share: float | None, local_address: str | None, socket_options: object
    ) -> httpcore.AsyncNetworkStream:
        failure: Exception | None = None
        for address in addresses:  # an IP literal: the inner backend connects without resolving
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=share,
                    local_address=local_address,
                    socket_options=socket_options,  # type: ignore[arg-type]
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: object = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("outbound calls use TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes  # at most `max_response` bytes of it
    truncated: bool  # the body was longer (the rest was not read)


_TRANSIT_ERRORS: Final = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    httpcore.UnsupportedProtocol,
    OSError,  # ssl.SSLError among them
)


class OutboundClient:
    """HTTP/1.1 POSTs to URLs the policy allows, over a keep-alive pool of at most `max_connections`.

    Each call must finish (connect, send, status line, headers and the body up to `max_response`)
    within `timeout`, connecting (resolving included) within `connect_timeout`. Redirects are not
    followed; no proxy is used. User info in the URL becomes Basic authorization.
    """

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_connections: int = 16,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = f"casola-outbound/{__version__}",
        resolver: Resolver = system_resolver,
    ) -> None:
        self.policy, self.timeout, self.user_agent = policy, timeout, user_agent
        self.connect_timeout = min(connect_timeout, timeout)
        self._pool = httpcore.AsyncConnectionPool(
            # built once: httpcore would load the CA files again for every connection
            ssl_context=ssl_context or httpcore.default_ssl_context(),  # system store + certifi
            max_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=_CheckedBackend(policy, resolver),
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def post(
        self, url: str | OutboundURL, body: bytes, headers: Mapping[str, str], *, max_response: int = 65536
    ) -> OutboundResponse:
        """POST `body` to `url` (a str is checked with `policy.check_url` first).

        Raises:
            OutboundError: `url` is not an http(s) URL.
            OutboundRefused: the policy refuses the host's address(es), at submit or at connect.
            OutboundCallError: resolving, connecting, TLS, the exchange failed, or `timeout` passed.
        """
        target = url if isinstance(url, OutboundURL) else self.policy.check_url(url)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(target, self._headers(target, body, headers), body, max_response)
        except TimeoutError:
            raise OutboundCallError(f"{target.where}: no answer within {self.timeout:g} s") from None
        except _TRANSIT_ERRORS as exc:
            raise OutboundCallError(f"{target.where}: {type(exc).__name__}: {exc or 'no detail'}") from exc

    def _headers(self, target: OutboundURL, body: bytes, extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        out = [(b"Host", target.netloc.encode("ascii")), (b"User-Agent", self.user_agent.encode())]
        out.append((b"Content-Length", str(len(body)).encode()))
        if target.auth is not None:
            user, password = target.auth
            out.append((b"Authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode())))
        out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        return out

    async def _exchange(
        self, target: OutboundURL, headers: list[tuple[bytes, bytes]], body: bytes, max_response: int
    ) -> OutboundResponse:
        url = httpcore.URL(scheme=target.scheme, host=target.host, port=target.port, target=target.target)
        t = self.timeout
        timeouts = {"connect": self.connect_timeout, "read": t, "write": t, "pool": t}
        async with self._pool.stream(
            b"POST", url, headers=headers, content=body, extensions={"timeout": timeouts}
        ) as r:
            chunks: list[bytes] = []
            size = 0
            async for chunk in r.aiter_stream():
                chunks.append(chunk)
                size += len(chunk)
                if size > max_response:  # stop reading: the connection is closed, not reused
                    break
            fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in r.headers}
            return OutboundResponse(r.status, fields, b"".join(chunks)[:max_response], size > max_response)
