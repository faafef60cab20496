"""A dialer and an acceptor wired back to back in memory (h11's ConnectionPair, aioquic's client_and_server)."""

from __future__ import annotations

from casola.wire import Connection, Frame, FrameType, HelloAckMeta, HelloMeta, Limits, Side
from casola.wire.events import Event

DEFAULT = Limits()


class Pair:
    def __init__(self, dialer_credit: int = 8, acceptor_credit: int = 8, limits: Limits = DEFAULT,
                 auto_credit: bool = True, now: float = 0.0) -> None:  # fmt: skip
        self.now = now
        self.dialer = Connection(Side.DIALER, now, limits, auto_credit=auto_credit)
        self.acceptor = Connection(Side.ACCEPTOR, now, limits, auto_credit=auto_credit)
        self.dialer_credit, self.acceptor_credit = dialer_credit, acceptor_credit

    def handshake(self) -> Pair:
        self.dialer.send(Frame(FrameType.HELLO, meta=HelloMeta("ingress", credit=self.dialer_credit)))
        self.deliver(self.dialer)
        self.acceptor.send(Frame(FrameType.HELLO_ACK, meta=HelloAckMeta(1, credit=self.acceptor_credit)))
        self.deliver(self.acceptor)
        return self

    def other(self, conn: Connection) -> Connection:
        return self.acceptor if conn is self.dialer else self.dialer

    def deliver(self, sender: Connection) -> list[Event]:
        """Move everything `sender` queued to the other side; returns the events it produced there."""
        data = b"".join(bytes(b) for b in sender.data_to_send())
        return self.other(sender).receive_data(data, self.now) if data else []
