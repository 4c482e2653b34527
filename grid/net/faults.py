"""Simulated network faults inside the transport: what ``sim.LocalCluster.partition`` drives.

A Transport holds at most one ``Faults`` (``transport.faults``, None normally). While set:

- ``connect()`` to an address in ``unreachable`` fails at once, as a dial into a split would;
- frames arriving on a link to an ``unreachable`` address, or on a link accepted from a
  member in ``refuse_from``, are dropped. The link stays open, so failure detection meets
  silence, as on a real split (no convenient connection reset).

A symmetric split sets both sets on both sides; "A cannot reach B" sets B in A's
``unreachable`` and A in B's ``refuse_from``: links B dialed to A still work both ways.
Members take the ``sim.faults`` message only when started with ``GRID_SIM_FAULTS=1``
(the simulator sets it), and only from holders of the secret, like every message.
"""

from __future__ import annotations

from .address import format_address

SIM_FAULTS_ENV = "GRID_SIM_FAULTS"


class Faults:
    """What this process cannot dial (``"host:port"`` or a Unix socket path), and the members
    (by ``"host:port"``) whose links to it it ignores."""

    __slots__ = ("unreachable", "refuse_from")

    def __init__(self, unreachable=(), refuse_from=()):
        self.unreachable = frozenset(unreachable)
        self.refuse_from = frozenset(refuse_from)

    def blocks_dial(self, remote) -> bool:
        """True if dialing ``remote`` (a (host, port), or a Unix socket path) must fail."""
        return (remote if isinstance(remote, str) else format_address(tuple(remote))) in self.unreachable

    def drops(self, conn) -> bool:
        """True if frames arriving on ``conn`` are to be dropped."""
        if conn.outbound:
            return self.blocks_dial(conn.remote)
        return conn.peer_info.get("address") in self.refuse_from

    def __repr__(self) -> str:
        return f"<Faults unreachable={sorted(self.unreachable)} refuse_from={sorted(self.refuse_from)}>"
