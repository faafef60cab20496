"""Who may connect to a queue node, and for how long (SPEC §6.3; DESIGN "Auth and tenancy").

A HELLO is checked against its credential and the role it claims: a worker key registers workers,
a node key connects ingresses, and the node's own in-process links (the model classifier's) carry a
secret that only this process knows. Members of the node's own process that act like any peer
(the workflow engine: a worker serving the workflows, and a client whose step requests are
filtered and scheduled like an ingress's) carry a second secret. The keys of connected peers
stay watched: one revoked or expired ends its link (GOAWAY `UNAUTHENTICATED`) within a second, a
worker being deregistered as it goes like any worker that is lost.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Literal

from casola.auth import SCOPE_INGRESS, SCOPE_WORKER, AuthError, Claims, CredentialWatch, Verifier
from casola.net.handshake import Refused
from casola.net.link import LinkBase
from casola.net.memlink import MemoryEnd
from casola.wire import ErrorCode, HelloMeta

__all__ = ["Gate", "PeerKind"]

log = logging.getLogger("casola.queue")

PeerKind = Literal["worker", "ingress", "internal"]


class Gate:
    def __init__(self, verifier: Verifier | None) -> None:
        self._verifier = verifier
        self.internal_secret = secrets.token_urlsafe(32)  # the node's own in-process links (classifier)
        self.member_secret = secrets.token_urlsafe(32)  # in-process peers treated like any other (workflows)
        self._watch = CredentialWatch(verifier) if verifier is not None else None
        self._watched: dict[LinkBase, int] = {}

    def admit(self, link: LinkBase, hello: HelloMeta) -> PeerKind:
        """What the dialer of `link` may be, from its HELLO; its key is watched from now on.

        Raises:
            Refused: a bad credential (UNAUTHENTICATED), or one that may not act in the role it
                claims, or a role a queue node does not take (FORBIDDEN_ROLE); a worker that
                serves no model (BAD_META).
        """
        member = isinstance(link, MemoryEnd) and hello.credential == self.member_secret
        if hello.role == "worker":
            kind: PeerKind = "worker"
            claims = None if member else self._authenticate(hello, SCOPE_WORKER)
            if not hello.models:
                raise Refused(ErrorCode.BAD_META, "a worker must serve at least one model")
        elif hello.role == "ingress":
            if hello.credential == self.internal_secret and isinstance(link, MemoryEnd):
                return "internal"  # the node's own: not authenticated, not filtered
            kind, claims = "ingress", None if member else self._authenticate(hello, SCOPE_INGRESS)
        else:
            raise Refused(ErrorCode.FORBIDDEN_ROLE, f"role {hello.role!r} may not connect to a queue node")
        if claims is not None and self._watch is not None:
            self._watched[link] = self._watch.add(claims, lambda err: _unauthenticated(link, kind, err))
        return kind

    def forget(self, link: LinkBase) -> None:
        """The link is gone: stop watching its key."""
        handle = self._watched.pop(link, 0)
        if handle and self._watch is not None:
            self._watch.remove(handle)

    def start(self) -> None:
        if self._watch is not None:
            self._watch.start()

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.stop()

    def _authenticate(self, hello: HelloMeta, scope: str) -> Claims | None:
        if self._verifier is None:
            return None
        try:
            return self._verifier.verify(hello.credential, time.time(), scope)  # expiry is wall-clock
        except AuthError as exc:
            code = ErrorCode.FORBIDDEN_ROLE if exc.status == 403 else ErrorCode.UNAUTHENTICATED
            raise Refused(code, exc.message) from exc


def _unauthenticated(link: LinkBase, kind: PeerKind, err: AuthError) -> None:
    """A connected peer's key was revoked or expired: end its link now."""
    log.warning("%s %s: %s; closing its link", kind, link.peername, err.message)
    link.terminate(ErrorCode.UNAUTHENTICATED, err.message)
