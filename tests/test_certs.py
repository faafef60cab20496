"""Development TLS certificates (`casola.certs`, `casola certs dev`) and the ingress over HTTPS: a real
TLS handshake on loopback, trusted and untrusted clients, plain HTTP against the TLS port, and
`casola up --tls` as a real process."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from casola.certs import DevCerts, make_dev_certs, server_context
from casola.cli import main
from casola.client import Client
from casola.config import ConfigError, load_config
from casola.ingress.server import IngressConfig
from tests.e2e.stack import ROOT, HttpClient, Stack, run_uvloop


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _serials(p: DevCerts) -> tuple[int, int]:
    return _certs(p.ca)[0].serial_number, _certs(p.cert)[0].serial_number


def _san(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in san}


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- make_dev_certs ----------------------------------------------------------------------------------


def test_make_dev_certs_writes_a_ca_and_a_server_certificate_it_signs(tmp_path: Path) -> None:
    out = tmp_path / "state" / "certs"
    p = make_dev_certs(out)
    assert p == DevCerts(out / "ca.pem", out / "ca-key.pem", out / "server.pem", out / "server-key.pem")
    assert _mode(out) == 0o700
    assert _mode(p.ca_key) == 0o600 and _mode(p.key) == 0o600
    assert _mode(p.ca) == 0o644 and _mode(p.cert) == 0o644
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary file left behind

    (ca,) = _certs(p.ca)
    server, chained_ca = _certs(p.cert)
    assert chained_ca == ca  # server.pem is the chain: leaf, then the CA

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ca.verify_directly_issued_by(ca)  # self-signed
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    server.verify_directly_issued_by(ca)
    assert _san(server) == {"localhost", "127.0.0.1", "::1"}
    ips = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress
    )
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    key = serialization.load_pem_private_key(p.key.read_bytes(), password=None)
    assert key.public_key() == server.public_key()
    assert server.not_valid_after_utc <= ca.not_valid_after_utc

    # What Python's own TLS stack thinks of the chain: a handshake in memory.
    client = ssl.create_default_context(cafile=p.ca)
    _handshake_in_memory(server_context(p.cert, p.key), client, "localhost")
    _handshake_in_memory(server_context(p.cert, p.key), client, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake_in_memory(server_context(p.cert, p.key), client, "example.com")


def _handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return
    raise AssertionError("handshake did not finish")


def test_make_dev_certs_reuses_then_reissues(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = _serials(make_dev_certs(out))
    assert _serials(make_dev_certs(out)) == first  # reused as they are
    assert _serials(make_dev_certs(out, ["127.0.0.1", "::1", "localhost"])) == first  # same names, any order

    # Other names: a new server certificate from the same CA (clients keep trusting it).
    p = make_dev_certs(out, ["localhost", "casola.test"])
    ca_serial, server_serial = _serials(p)
    assert ca_serial == first[0] and server_serial != first[1]
    assert _san(_certs(p.cert)[0]) == {"localhost", "casola.test"}

    # force: a new CA and a new server certificate.
    forced = _serials(make_dev_certs(out, ["localhost", "casola.test"], force=True))
    assert forced[0] != ca_serial and forced[1] != server_serial

    # A server certificate that expires within the renewal margin is reissued; the CA stays.
    short = _serials(make_dev_certs(out, ["localhost", "casola.test"], days=1, force=True))
    assert _serials(make_dev_certs(out, ["localhost", "casola.test"], days=1)) == short  # margin: half a day
    renewed = _serials(make_dev_certs(out, ["localhost", "casola.test"]))  # margin: 30 days
    assert renewed[0] == short[0] and renewed[1] != short[1]

    # A damaged or mismatched file is replaced rather than served.
    p.key.write_bytes(b"not a key")
    again = _serials(make_dev_certs(out, ["localhost", "casola.test"]))
    assert again[0] == renewed[0] and again[1] != renewed[1]
    p.ca_key.unlink()
    assert _serials(make_dev_certs(out, ["localhost", "casola.test"]))[0] != again[0]


def test_make_dev_certs_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        make_dev_certs(tmp_path, [])
    with pytest.raises(ValueError, match="not a DNS name"):
        make_dev_certs(tmp_path, ["two words"])
    with pytest.raises(ValueError, match="days"):
        make_dev_certs(tmp_path, days=0)
    assert not list(tmp_path.iterdir())


def test_server_context_errors_name_the_files(tmp_path: Path) -> None:
    p = make_dev_certs(tmp_path / "a")
    other = make_dev_certs(tmp_path / "b")
    ctx = server_context(p.cert, p.key)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        server_context(tmp_path / "nope.pem", p.key)
    with pytest.raises(ssl.SSLError, match=r"server-key\.pem"):
        server_context(p.cert, other.key)  # the key of another certificate


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        IngressConfig(tls_cert="server.pem")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ingress]\ntls_key = "server-key.pem"\n')
    with pytest.raises(ConfigError, match="together"):
        load_config(cfg)
    cfg.write_text('[ingress]\ntls_cert = "a.pem"\ntls_key = "b.pem"\n')
    ing = load_config(cfg).ingress
    assert (ing.tls_cert, ing.tls_key) == ("a.pem", "b.pem")


# -- the ingress over TLS ------------------------------------------------------------------------------


async def _https(port: int, ctx: ssl.SSLContext, hostname: str) -> HttpClient:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname, limit=1 << 24), 5
    )
    return HttpClient(reader, writer)


def test_ingress_serves_https(tmp_path: Path) -> None:
    p = make_dev_certs(tmp_path / "certs")
    trusted = ssl.create_default_context(cafile=p.ca)
    trusted.set_alpn_protocols(["h2", "http/1.1"])

    async def main() -> None:
        stack = await Stack(tmp_path / "state", ingress={"tls_cert": str(p.cert), "tls_key": str(p.key)}).start()
        try:
            await stack.add_worker()
            auth = {"Authorization": f"Bearer {stack.api_key}"}
            for hostname in ("localhost", "127.0.0.1"):
                client = await _https(stack.http_port, trusted, hostname)
                try:
                    tls = client.writer.get_extra_info("ssl_object")
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
                    assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: the server speaks HTTP/1.1
                    r = await client.request("GET", "/healthz")
                    assert r.status == 200 and json.loads(r.body)["status"] == "ok"
                    r = await client.request("POST", "/v1/run/echo", b"hello over tls", auth)  # same connection
                    assert (r.status, r.body) == (200, b"hello over tls")
                    big = os.urandom(3 * 1024 * 1024)  # many TLS records each way
                    r = await client.request("POST", "/v1/run/echo", big, auth)
                    assert r.status == 200 and r.body == big
                finally:
                    await client.close()

            # A client that does not trust the CA, or asks for a name the certificate lacks, fails.
            untrusted = ssl.create_default_context()
            with pytest.raises(ssl.SSLCertVerificationError):
                await _https(stack.http_port, untrusted, "localhost")
            with pytest.raises(ssl.SSLCertVerificationError):
                await _https(stack.http_port, trusted, "casola.example")

            # Plain HTTP to the TLS port: the connection ends, no answer, and the server goes on.
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                got = await asyncio.wait_for(reader.read(), 10)
            except ConnectionError:
                got = b""
            assert not got.startswith(b"HTTP/")
            writer.close()
            # The raw-frame listener speaks TLS too: the frame client over TLS gets the same bytes,
            # and one that does not trust the CA is refused before it can send its key.
            frames = await Client.connect(
                f"127.0.0.1:{stack.frames_port}", stack.api_key, ssl=trusted, server_hostname="localhost"
            )
            try:
                res = await frames.run("echo", b"frames over tls")
                assert res.payload == b"frames over tls" and "worker-rtt" in res.timing
            finally:
                await frames.close()
            with pytest.raises(ssl.SSLCertVerificationError):
                await Client.connect(
                    f"127.0.0.1:{stack.frames_port}", stack.api_key, ssl=untrusted, server_hostname="localhost"
                )

            client = await _https(stack.http_port, trusted, "localhost")
            try:
                r = await client.request("POST", "/v1/run/echo", b"still here", auth)
                assert (r.status, r.body) == (200, b"still here")
            finally:
                await client.close()
        finally:
            await stack.stop()

    run_uvloop(main)


def test_a_stalled_tls_handshake_is_dropped_after_head_timeout(tmp_path: Path) -> None:
    p = make_dev_certs(tmp_path / "certs")
    tls = {"tls_cert": str(p.cert), "tls_key": str(p.key), "head_timeout": 0.5}

    async def main() -> None:
        stack = await Stack(tmp_path / "state", ingress=tls).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)  # says nothing
            t0 = time.monotonic()
            try:
                assert await asyncio.wait_for(reader.read(), 10) == b""
            except ConnectionError:
                pass
            assert time.monotonic() - t0 < 5
            writer.close()
        finally:
            await stack.stop()

    run_uvloop(main)


def test_ingress_serves_https_on_the_default_asyncio_loop(tmp_path: Path) -> None:
    p = make_dev_certs(tmp_path / "certs")

    async def main() -> None:
        stack = await Stack(tmp_path / "state", ingress={"tls_cert": str(p.cert), "tls_key": str(p.key)}).start()
        try:
            client = await _https(stack.http_port, ssl.create_default_context(cafile=p.ca), "localhost")
            try:
                r = await client.request("GET", "/healthz")
                assert r.status == 200
            finally:
                await client.close()
        finally:
            await stack.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


# -- the command line ----------------------------------------------------------------------------------


def test_certs_dev_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["certs", "dev", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str((out / "ca.pem").resolve()) in printed
    assert f"SSL_CERT_FILE={(out / 'ca.pem').resolve()}" in printed
    assert f"curl --cacert {(out / 'ca.pem').resolve()} https://localhost:8000/healthz" in printed
    assert {f.name for f in out.iterdir()} == {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem"}
    before = _certs(out / "server.pem")[0].serial_number
    assert main(["certs", "dev", "--out", str(out)]) == 0
    assert _certs(out / "server.pem")[0].serial_number == before
    assert main(["certs", "dev", "--out", str(out), "--force"]) == 0
    assert _certs(out / "server.pem")[0].serial_number != before

    # Default directory: <state-dir>/certs; --host names replace the defaults.
    state = tmp_path / "state"
    assert main(["--state-dir", str(state), "certs", "dev", "--host", "casola.test", "--host", "10.0.0.7"]) == 0
    assert _san(_certs(state / "certs" / "server.pem")[0]) == {"casola.test", "10.0.0.7"}
    capsys.readouterr()
    assert main(["certs", "dev", "--out", str(out), "--host", "bad name"]) == 1
    assert "not a DNS name" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_casola_up_tls(tmp_path: Path) -> None:
    """`casola up --tls` as a user runs it: certificates in <state-dir>/certs, HTTPS, an https:// banner."""
    http, frames, queue = _free_port(), _free_port(), _free_port()
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "casola", "--state-dir", str(state), "up", "--tls"]
    argv += ["--http", f"127.0.0.1:{http}", "--frames", f"127.0.0.1:{frames}", "--queue", f"127.0.0.1:{queue}"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ})
    try:
        end = time.monotonic() + 30
        while not (state / "certs" / "ca.pem").exists() or not (state / "dev-api-key").exists():
            assert proc.poll() is None and time.monotonic() < end, "casola up --tls exited or is slow"
            time.sleep(0.05)
        ctx = ssl.create_default_context(cafile=state / "certs" / "ca.pem")
        key = (state / "dev-api-key").read_text().strip()
        while True:
            assert proc.poll() is None and time.monotonic() < end, "casola up --tls did not answer"
            req = urllib.request.Request(
                f"https://localhost:{http}/v1/run/echo", data=b"tls", headers={"Authorization": f"Bearer {key}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                    assert r.read() == b"tls"
                    break
            except urllib.error.HTTPError as exc:  # 404 (no such model yet) until the worker has registered
                assert exc.code in (404, 503)
            except (urllib.error.URLError, ConnectionError) as exc:
                assert not isinstance(getattr(exc, "reason", None), ssl.SSLCertVerificationError), exc
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    banner = err.decode()
    assert f"https://127.0.0.1:{http}/v1/run/echo" in banner
    assert f"--cacert {state / 'certs' / 'ca.pem'}" in banner
    assert json.loads((state / "endpoints.json").read_text())["http"] == f"https://127.0.0.1:{http}"
