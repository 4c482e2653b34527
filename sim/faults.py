"""Network splits for a LocalCluster, made inside each peer's transport (no root, no iptables).

    LocalCluster.partition([0, 1], [2]) / block([2], [0]) / heal()
        │ which peer cannot reach which: a set of (source, target) index pairs
        v
    FaultControl ── an authenticated link (the cluster's secret) ──> peer i: "sim.faults"
                    {"unreachable": [addresses i cannot dial],
                     "refuse_from": [members whose links to i it ignores]}

A peer takes ``sim.faults`` only when the simulator started it (``GRID_SIM_FAULTS=1``); what
the transport then does is in ``grid/net/faults.py``: dials fail, frames on cut links are
dropped, so the members meet silence as on a real split. The control link is a client's,
never cut. Peers added after a split are not part of it.
"""

from __future__ import annotations

from .process import SimError, format_address


def faults_by_peer(blocked: set[tuple[int, int]], addresses: dict[int, tuple[str, int]]) -> dict[int, dict]:
    """``{peer index: sim.faults body}`` for the (source, target) pairs in ``blocked``."""
    bodies = {}
    for index in addresses:
        unreachable = sorted(format_address(addresses[t]) for s, t in blocked if s == index and t in addresses)
        refuse_from = sorted(format_address(addresses[s]) for s, t in blocked if t == index and s in addresses)
        bodies[index] = {"unreachable": unreachable, "refuse_from": refuse_from} if unreachable or refuse_from \
            else None
    return bodies


def partition_pairs(groups, live: list[int]) -> set[tuple[int, int]]:
    """Every (source, target) pair of peers in different ``groups``; every live peer must be in one."""
    seen: dict[int, int] = {}
    for number, group in enumerate(groups):
        for index in group:
            if index in seen:
                raise SimError(f"peer {index} is in two groups of the partition")
            seen[index] = number
    missing = sorted(set(live) - set(seen))
    if missing:
        raise SimError(f"live peers {missing} are in no group; name every live peer in partition()")
    return {(a, b) for a in seen for b in seen if seen[a] != seen[b]}


class FaultControl:
    """Sends each peer its part of a split over one authenticated client link per peer."""

    def __init__(self, *, cluster_id: str, secret: str, timeout: float):
        self._cluster_id = cluster_id
        self._secret = secret
        self._timeout = timeout
        self._transport = None

    def apply(self, address: tuple[str, int], body: dict | None) -> None:
        """Tell the peer at ``address`` what it cannot reach (None: nothing)."""
        from grid.net import (
            messaging,  # lazily, like LocalCluster.connect: sim itself needs no grid
        )
        from grid.net.transport import Transport

        if self._transport is None:
            self._transport = Transport(cluster_id=self._cluster_id, secret=self._secret,
                                        info={"role": "sim"}, name="sim-faults-io")
        conn = self._transport.connect(tuple(address)).result(self._timeout)
        try:
            if messaging.request(conn, "sim.faults", body).result(self._timeout) is not True:
                raise SimError(f"peer at {format_address(address)} did not take the fault settings")
        finally:
            conn.close("fault settings sent")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
