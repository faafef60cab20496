"""Development TLS certificates (a local CA and a server certificate it signs) and the server's TLS context.

`casola certs dev` and `casola up --tls` call `make_dev_certs`; the ingress calls `server_context` when
`[ingress] tls_cert` and `tls_key` are set. Keys are ECDSA P-256: every TLS stack in use (OpenSSL, curl,
Python's ssl, httpx, browsers) accepts it, which is not yet true of Ed25519 certificates.

A client trusts the server by trusting `ca.pem` (`SSL_CERT_FILE=ca.pem` for Python clients,
`curl --cacert ca.pem`). The CA is kept across runs (a client told to trust it stays trusting) unless
`force` is given or it is close to expiry; the server certificate is reissued when its names change.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from casola.files import write_atomic

__all__ = ["DEFAULT_HOSTS", "DevCerts", "make_dev_certs", "server_context"]

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

CA_DAYS = 3650  # the CA outlives many server certificates, so trust in it lasts
RENEW_DAYS = 30  # a certificate expiring within this is reissued
_BACKDATE = datetime.timedelta(hours=1)  # tolerates a client clock slightly behind ours

_Name = x509.DNSName | x509.IPAddress


class DevCerts(NamedTuple):
    """Where `make_dev_certs` put its files."""

    ca: Path  # the CA certificate: what clients trust
    ca_key: Path  # the CA's private key (0600)
    cert: Path  # the server certificate followed by the CA certificate (the chain a server sends)
    key: Path  # the server's private key (0600)


def make_dev_certs(
    out_dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 825, force: bool = False
) -> DevCerts:
    """Create (or reuse) a local CA and a server certificate for `hosts` in `out_dir`.

    Files: `ca.pem`, `ca-key.pem` (0600), `server.pem` (server certificate, then the CA certificate) and
    `server-key.pem` (0600). A directory that does not exist is created 0700; an existing one keeps its
    mode. Files are replaced atomically (written beside, then renamed).

    The CA is reused unless `force`, a file of it is missing or unreadable, or it expires within
    `RENEW_DAYS`. The server certificate is reused unless the CA was replaced, its names differ from
    `hosts`, its key does not match, or it expires within `RENEW_DAYS` (or half of `days`, if shorter).

    Args:
        out_dir: where the four files go.
        hosts: DNS names and IP addresses the server certificate is valid for (its SubjectAlternativeName).
        days: validity of the server certificate (825: the most Apple's TLS clients accept); the CA is
            valid for `CA_DAYS` or `days`, whichever is longer.
        force: issue a new CA and server certificate even if the current ones are fine.

    Returns:
        The four paths.

    Raises:
        ValueError: `hosts` is empty or names something that is neither a DNS name nor an IP address,
            or `days` is not positive.
        OSError: the directory or a file cannot be created or written.
    """
    names = _names(hosts)
    if days <= 0:
        raise ValueError(f"days must be positive, not {days}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = DevCerts(out_dir / "ca.pem", out_dir / "ca-key.pem", out_dir / "server.pem", out_dir / "server-key.pem")
    now = datetime.datetime.now(datetime.UTC)
    margin = min(datetime.timedelta(days=RENEW_DAYS), datetime.timedelta(days=days) / 2)

    ca = None if force else _load_ca(paths, now + margin)
    new_ca = ca is None
    if ca is None:
        ca = _issue_ca(now, max(days, CA_DAYS))
        write_atomic(paths.ca_key, _key_pem(ca[1]), 0o600)
        write_atomic(paths.ca, ca[0].public_bytes(serialization.Encoding.PEM), 0o644)
    ca_cert, ca_key = ca
    if new_ca or not _server_ok(paths, ca_cert, names, now + margin):
        cert, key = _issue_server(ca_cert, ca_key, names, now, days)
        write_atomic(paths.key, _key_pem(key), 0o600)
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
        write_atomic(paths.cert, chain, 0o644)
    return paths


def server_context(cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """A server-side TLS context for `cert` (PEM, the chain: leaf first) and `key`: TLS 1.2 or newer,
    ALPN `http/1.1`, no client certificates asked for.

    Raises:
        OSError: a file cannot be read (FileNotFoundError, PermissionError).
        ssl.SSLError: the files are not a PEM certificate chain and its matching private key.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (cert, key):
        with open(path, "rb"):  # a clear FileNotFoundError/PermissionError, naming the file
            pass
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except ssl.SSLError as exc:
        raise ssl.SSLError(exc.errno, f"TLS certificate {cert} / key {key}: {exc}") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# -- issuing -------------------------------------------------------------------------------------------


def _names(hosts: Sequence[str]) -> list[_Name]:
    if isinstance(hosts, str):
        hosts = [hosts]
    out: list[_Name] = []
    for host in hosts:
        host = host.strip().strip("[]")
        name: _Name
        try:
            name = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            label = host.lower().rstrip(".")
            if not label or not all(part and _dns_label_ok(part) for part in label.split(".")):
                raise ValueError(f"not a DNS name or IP address: {host!r}") from None
            name = x509.DNSName(label)
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("at least one host name or IP address is needed")
    return out


def _dns_label_ok(part: str) -> bool:
    ok = part == "*" or (len(part) <= 63 and part.isascii() and part.replace("-", "").replace("_", "").isalnum())
    return ok and not part.startswith("-") and not part.endswith("-")


def _issue_ca(now: datetime.datetime, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "casola development"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"casola development CA ({socket.gethostname()[:40]})"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_server(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[_Name], now: datetime.datetime, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    first = names[0].value
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "casola development"),
            x509.NameAttribute(NameOID.COMMON_NAME, str(first)[:64]),
        ]
    )
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


# -- reusing -------------------------------------------------------------------------------------------


def _load_ca(
    paths: DevCerts, valid_until: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA on disk if it is usable until `valid_until`, else None."""
    try:
        cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if cert.not_valid_after_utc <= valid_until:
        return None
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return None
    return cert, key


def _server_ok(paths: DevCerts, ca: x509.Certificate, names: list[_Name], valid_until: datetime.datetime) -> bool:
    """Whether the server certificate on disk is signed by `ca`, names exactly `names`, matches its key
    and is valid until `valid_until`."""
    try:
        certs = x509.load_pem_x509_certificates(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
        cert = certs[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, IndexError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return (
        key.public_key() == cert.public_key()
        and set(san) == set(names)
        and cert.not_valid_after_utc > valid_until
        and certs[1:] == [ca]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
