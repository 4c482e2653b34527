"""Candidate members: their addresses, and the ``Discovery`` interface that yields them.

Every discovery strategy (``discovery.py``'s, and ``multicast.MulticastDiscovery``)
subclasses ``Discovery`` and lists candidates with the helpers here, so one member
never appears twice under two spellings and a member never finds itself.
An address is a ``(host, port)`` tuple.
"""

from __future__ import annotations

import ipaddress

from ..net.address import DEFAULT_PORT, parse_address

Address = tuple[str, int]

MEMBER_STATES = ("joining", "member", "client")  # a client only listens and asks


# --- addresses -------------------------------------------------------------------------------

def parse_member_address(text: str) -> Address:
    """Parse one member address (default port 5701) to canonical form; ValueError (ConfigError) if bad."""
    address = normalize_address(parse_address(text, DEFAULT_PORT))
    if address[1] == 0:
        raise ValueError(f"{text!r} has port 0, which no member listens on")
    return address


def normalize_address(address: Address) -> Address:
    """Canonical form, so one member never appears twice under two spellings."""
    host, port = address
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return host, int(port)


def unique_candidates(addresses, own: Address | None) -> list[Address]:
    """Deduplicate keeping first-seen order and drop this member's own address."""
    seen: dict[Address, None] = {}
    for address in addresses:
        if address != own:
            seen.setdefault(address, None)
    return list(seen)


# --- the base class ---------------------------------------------------------------------------

class Discovery:
    """Yields candidate member addresses; membership decides who is in.

    Attributes:
        join_wait: seconds a joiner that finds nobody keeps trying before it starts alone.
    """

    def __init__(self, *, join_wait: float):
        self.join_wait = join_wait
        self._own_address: Address | None = None

    def start(self, own_address: Address) -> None:
        """Begin discovering (and, where the strategy does so, announce this member).

        Args:
            own_address: this member's reachable (host, port), already resolved (never 0.0.0.0).

        Raises:
            DiscoveryError: the strategy cannot start (unwritable registry, no multicast, ...).
        """
        self._own_address = normalize_address(own_address)

    def candidates(self) -> list[Address]:
        """Return the addresses worth trying now: fresh, deduplicated, stable order, never our own.

        Raises:
            DiscoveryError: the source cannot be read in a way the user must fix.
        """
        return []

    def member_dead(self, address: Address) -> None:
        """Forget a member found dead (the registry folder prunes its entry; others do nothing)."""

    def refresh(self) -> None:
        """Called now and then by a member: put back what it published if that went missing.

        Raises:
            DiscoveryError: it cannot (the caller logs it once and goes on).
        """

    def set_state(self, state: str) -> None:
        """Tell discovery this process is ``"joining"``, a ``"member"`` or a ``"client"``.

        Multicast announces it; a client is answered by members but is never a candidate.
        """
        if state not in MEMBER_STATES:
            raise ValueError(f"unknown member state {state!r}: expected one of {MEMBER_STATES}")

    def stop(self, *, clean: bool = True) -> None:
        """Stop discovering. Idempotent.

        Args:
            clean: a clean leave (the registry folder removes this member's entry); False keeps it.
        """

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop(clean=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} own={self._own_address}>"
