"""The state directory's key material: the signing key, key metadata, revocations and stored node tokens.

Layout of `<state_dir>` (created 0700):

    signing-key.pem   Ed25519 private key, PKCS8 PEM, mode 0600; created on first use
    keys.json         metadata of every key issued: kid, name, tenant, scopes, region, exp, iat, filter,
                      max_priority, max_inflight, revoked.
                      Tokens are never stored here: a token is shown once, when it is created.
    revoked.txt       one revoked kid per line, read by every running `Verifier` (see revocation.py)
    <name>            tokens this deployment issues to itself ("dev-api-key", "worker-key",
                      "ingress-key"), mode 0600, managed by `ensure_key`

Every file is replaced atomically (write a temporary file, then rename), and read-modify-write cycles on
keys.json hold an exclusive `flock` on `.keys.lock`, so concurrent `casola` processes never lose a key.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from casola.auth.revocation import RevocationList, parse_revocations
from casola.auth.tokens import FILTER_POLICIES, AuthError, Claims, Verifier, sign_token
from casola.files import write_atomic

if sys.platform != "win32":
    import fcntl

__all__ = ["KEYS_FILE", "REVOKED_FILE", "SIGNING_KEY_FILE", "KeyStore", "UnknownKeyError"]

SIGNING_KEY_FILE: Final = "signing-key.pem"
KEYS_FILE: Final = "keys.json"
REVOKED_FILE: Final = "revoked.txt"
_LOCK_FILE: Final = ".keys.lock"
_RESERVED: Final = frozenset({SIGNING_KEY_FILE, KEYS_FILE, REVOKED_FILE, _LOCK_FILE, ".", ".."})
_REVOKED_HEADER: Final = "# revoked key ids, one per line; written by `casola keys revoke`\n"

_Records = list[dict[str, object]]  # an alias, because `KeyStore.list` shadows `list` in the class body


class UnknownKeyError(KeyError):
    """No key with this kid is recorded in keys.json."""

    def __init__(self, kid: str) -> None:
        super().__init__(kid)
        self.kid = kid

    def __str__(self) -> str:
        return f"no key with id {self.kid!r} in keys.json"


class KeyStore:
    """Issues, records, revokes and stores API keys under one state directory."""

    __slots__ = ("_signing_key", "_state_dir")

    def __init__(self, state_dir: Path) -> None:
        """Use `state_dir`; nothing is read or created until a method needs it."""
        self._state_dir = Path(state_dir)
        self._signing_key: Ed25519PrivateKey | None = None

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    def signing_key(self) -> Ed25519PrivateKey:
        """The deployment's signing key, loaded from signing-key.pem or created there on first use.

        Raises:
            OSError: the state directory or key file cannot be created or read.
            ValueError: signing-key.pem is not an unencrypted Ed25519 private key in PEM.
        """
        if self._signing_key is None:
            self._signing_key = self._load_or_create_signing_key()
        return self._signing_key

    def public_keys(self) -> list[Ed25519PublicKey]:
        """The keys a verifier trusts: the signing key's public half.

        Raises:
            OSError, ValueError: as `signing_key()`.
        """
        return [self.signing_key().public_key()]

    def verifier(self) -> Verifier:
        """A `Verifier` for this state directory's keys, polling revoked.txt.

        Raises:
            OSError, ValueError: as `signing_key()`; OSError also if revoked.txt cannot be read.
        """
        return Verifier(self.public_keys(), RevocationList(self._state_dir / REVOKED_FILE))

    def create(
        self,
        tenant: str,
        scopes: Sequence[str],
        *,
        region: str = "",
        ttl_s: int = 0,
        name: str = "",
        filter: str = "",
        max_priority: int = 0,
        max_inflight: int = 0,
    ) -> tuple[Claims, str]:
        """Issue a new key and record its metadata (never the token) in keys.json.

        Args:
            tenant: who the key acts for.
            scopes: what it may do, e.g. `(SCOPE_RUN,)`.
            region: pin requests to this region; "" for none.
            ttl_s: lifetime in seconds; 0 never expires.
            name: a label for humans.
            filter: content-filter policy for the key's requests: "off", "race", "block" or "hold"; "" for
                none (each model's policy applies; a model set to "block" is blocked whatever the key says).
            max_priority: the highest request priority the key may ask for (-128..127; lower ones
                are always allowed).
            max_inflight: requests in progress at once for this key; 0: the tenant's limit.

        Returns:
            The claims and the token. The token is shown to the caller once and not kept.

        Raises:
            ValueError: empty tenant or scopes, a negative ttl or max_inflight, max_priority
                outside -128..127, or an unknown filter policy; also a corrupt keys.json.
            OSError: the state directory cannot be written.
        """
        with self._locked():
            return self._create_unlocked(
                tenant,
                scopes,
                region=region,
                ttl_s=ttl_s,
                name=name,
                filter=filter,
                max_priority=max_priority,
                max_inflight=max_inflight,
            )

    def revoke(self, kid: str) -> None:
        """Revoke `kid`: add it to revoked.txt (running verifiers notice within a second) and mark it
        revoked in keys.json. Revoking a revoked key again does nothing more.

        Raises:
            UnknownKeyError: (a KeyError) keys.json has no such kid.
            ValueError: keys.json is corrupt.
            OSError: the state directory cannot be written.
        """
        with self._locked():
            records = self._read_records()
            record = next((r for r in records if r.get("kid") == kid), None)
            if record is None:
                raise UnknownKeyError(kid)
            self._append_revoked(kid)  # enforcement first: a crash after it still leaves the key refused
            record["revoked"] = True
            self._write_records(records)

    def ensure_key(self, filename: str, tenant: str, scopes: Sequence[str], name: str) -> str:
        """The token stored in `<state_dir>/<filename>`, issuing and storing a new one if needed.

        The stored token is kept while it verifies, is neither expired nor revoked, and carries
        `tenant` and every scope in `scopes`; otherwise a new never-expiring key replaces it.

        Raises:
            ValueError: `filename` is not a plain file name or names one of the store's own files;
                bad tenant or scopes as in `create()`.
            OSError: the state directory cannot be read or written.
        """
        if not filename or "/" in filename or os.sep in filename or filename in _RESERVED:
            raise ValueError(f"not a usable key file name: {filename!r}")
        path = self._state_dir / filename
        with self._locked():
            token = self._stored_token(path, tenant, scopes)
            if token is None:
                _claims, token = self._create_unlocked(tenant, scopes, name=name)
                write_atomic(path, (token + "\n").encode("ascii"))
            return token

    def list(self) -> list[dict[str, object]]:
        """Metadata of every key issued, oldest first (copies; changing them changes nothing).

        Raises:
            ValueError: keys.json is corrupt.
            OSError: keys.json exists but cannot be read.
        """
        return [dict(r) for r in self._read_records()]

    # -- internals ---------------------------------------------------------------------------------

    def _create_unlocked(
        self,
        tenant: str,
        scopes: Sequence[str],
        *,
        region: str = "",
        ttl_s: int = 0,
        name: str = "",
        filter: str = "",
        max_priority: int = 0,
        max_inflight: int = 0,
    ) -> tuple[Claims, str]:
        if not tenant:
            raise ValueError("tenant must not be empty")
        if isinstance(scopes, str) or not scopes or not all(isinstance(s, str) and s for s in scopes):
            raise ValueError(f"scopes must be a non-empty sequence of non-empty strings, got {scopes!r}")
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        if filter not in FILTER_POLICIES:
            raise ValueError(f"filter must be one of off, race, block (or empty for none), got {filter!r}")
        if not -128 <= max_priority <= 127:
            raise ValueError(f"max_priority must be -128..127, got {max_priority}")
        if max_inflight < 0:
            raise ValueError(f"max_inflight must be >= 0, got {max_inflight}")
        iat = int(time.time())
        claims = Claims(
            kid="k_" + secrets.token_hex(6),
            tenant=tenant,
            scopes=tuple(dict.fromkeys(scopes)),  # drop duplicates, keep order
            region=region,
            exp=iat + ttl_s if ttl_s else 0,
            iat=iat,
            filter=filter,
            max_priority=max_priority,
            max_inflight=max_inflight,
        )
        token = sign_token(self.signing_key(), claims)
        records = self._read_records()
        records.append(
            {
                "kid": claims.kid,
                "name": name,
                "tenant": claims.tenant,
                "scopes": list(claims.scopes),
                "region": claims.region,
                "exp": claims.exp,
                "iat": claims.iat,
                "filter": claims.filter,
                "max_priority": claims.max_priority,
                "max_inflight": claims.max_inflight,
                "revoked": False,
            }
        )
        self._write_records(records)
        return claims, token

    def _stored_token(self, path: Path, tenant: str, scopes: Sequence[str]) -> str | None:
        try:
            token = path.read_text("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            claims = self.verifier().verify(token, time.time(), scopes[0] if scopes else "")
        except AuthError:
            return None
        if claims.tenant != tenant or not set(scopes) <= set(claims.scopes):
            return None
        return token

    def _load_or_create_signing_key(self) -> Ed25519PrivateKey:
        path = self._state_dir / SIGNING_KEY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._ensure_dir()
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if write_atomic(path, pem, exclusive=True):
                return key
            data = path.read_bytes()  # another process created it first: use theirs
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(loaded).__name__}, not an Ed25519 private key")
        return loaded

    def _read_records(self) -> _Records:
        path = self._state_dir / KEYS_FILE
        try:
            doc = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise ValueError(f"{path} is corrupt: {exc}") from exc
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise ValueError(f"{path} is corrupt: expected {{'keys': [...]}}")
        return keys

    def _write_records(self, records: _Records) -> None:
        text = json.dumps({"version": 1, "keys": records}, indent=2) + "\n"
        write_atomic(self._state_dir / KEYS_FILE, text.encode("utf-8"))

    def _append_revoked(self, kid: str) -> None:
        path = self._state_dir / REVOKED_FILE
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            text = _REVOKED_HEADER
        if kid in parse_revocations(text):
            return
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomic(path, (text + kid + "\n").encode("utf-8"))

    def _ensure_dir(self) -> None:
        if not self._state_dir.is_dir():
            self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._state_dir, 0o700)  # mkdir's mode is filtered by the umask

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the store across processes (not re-entrant)."""
        self._ensure_dir()
        if sys.platform == "win32":
            yield
            return
        fd = os.open(self._state_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
