"""Finding a cluster to join, or forming one: the joiner's side of the join protocol.

::

    membership thread, state JOINING, every _JOIN_RETRY s: _join_attempt
      ask each candidate (discovery, plus `required`) "who"    -> _ask_candidates
      some are members: join the largest cluster's master      -> _try_join
        (with `required`: only its cluster; wait while it is still joining)
      none are: the lowest address among the joining forms it  -> _become_first_member
        (alone: only after discovery.join_wait; anyone, once the lowest
        has not formed it within 4 * join_wait + 2 s)
      `required` unreachable after join_wait                   -> _fail_join (JoinError)
      nobody answered but some refused the handshake (another
        secret or cluster id), after join_wait                 -> _fail_join (JoinError)

A joiner that was refused never forms a second cluster under the same id: that would
hide a wrong secret behind a cluster that seems to work. One that heard nobody at all
starts alone, as before.

``Joiner`` is ``membership.Membership``'s base class and changes no state itself.
Membership owns the attributes it uses (``me``, ``transport``, ``discovery``,
``required``, ``clock``, ``_links``, ``_probes``, ``_join_started``, ``_last_reasons``,
``_refusals``, ``_merge_target``, ``_joined``, ``_join_error``, ``_stop``) and the transitions a join ends in, next to
its state table: ``_enter_cluster`` (JOINING -> MEMBER), or STOPPED once ``_fail_join``
has stopped its thread. The master's side (admitting a joiner) is ``Membership._admit``.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from ..errors import DiscoveryError, JoinError
from ..net import messaging
from ..net.address import format_address
from ..net.security import HandshakeFailed
from .members import Member

log = logging.getLogger("grid.membership")  # one logger for all of membership, whichever file logs

_ATTEMPT_TIMEOUT = 1.0  # how long one join attempt waits for candidates to answer


class Joiner:
    """Membership's join search; runs on the membership thread only (see the module docstring)."""

    def _join_attempt(self) -> None:
        elapsed = self.clock.monotonic() - self._join_started
        try:
            found = self.discovery.candidates()
        except DiscoveryError as exc:  # e.g. a registry folder that became unreadable: say so once
            self._discovery_failed(exc)
            found = []
        candidates = [address for address in found if address != self.me.address]
        target = self._merge_target  # a larger cluster this one merges into, seen or not by discovery
        if target is not None and target != self.me.address and target not in candidates:
            candidates.append(target)
        required = self.required
        if required is not None and required != self.me.address and required not in candidates:
            candidates.append(required)
        replies = self._ask_candidates(candidates)
        joined = [reply for reply in replies if reply["state"] == "member" and reply.get("master")]
        if required is not None and required != self.me.address:
            required_reply = next((r for r in replies if tuple(r["address"]) == required), None)
            if required_reply is None:
                if elapsed >= self.discovery.join_wait:
                    reason = self._last_reasons.get(required, "it did not answer")
                    self._fail_join(JoinError(
                        f"the required member {format_address(required)} could not be reached ({reason}); "
                        "no cluster forms without it: start it first, or remove `required` from the config"))
                return
            if required_reply["state"] != "member":
                return  # the required member forms the cluster; wait for it
            joined = [required_reply]
        if joined:
            best = min(joined, key=lambda r: (-r["size"], tuple(r["master"])))
            self._try_join(tuple(best["master"]))
            return
        refusals = {address: why for address, why in self._refusals.items() if address in candidates}
        if not replies and refusals and elapsed >= self.discovery.join_wait:
            refused = "; ".join(f"{format_address(address)}: {why}" for address, why in sorted(refusals.items()))
            self._fail_join(JoinError(
                f"the members found refused this one ({refused}); it does not start a second cluster "
                f"named {self.transport.cluster_id!r}: give it the same `secret` (or GRID_SECRET) and `id` as the "
                "running members"))
            return
        contenders = [self.me.address] + [tuple(r["address"]) for r in replies if r["state"] == "joining"]
        leader = self.me.address if required == self.me.address else min(contenders)
        alone = len(contenders) == 1
        if leader == self.me.address:
            if not alone or elapsed >= self.discovery.join_wait or required == self.me.address:
                self._become_first_member()
        elif elapsed >= 4 * self.discovery.join_wait + 2:
            log.warning("member %s should have formed the cluster but has not; forming it here",
                        format_address(leader))
            self._become_first_member()

    def _ask_candidates(self, candidates) -> list[dict]:
        connects = {address: self._connect(address) for address in candidates}
        deadline = self.clock.monotonic() + _ATTEMPT_TIMEOUT
        requests = {}
        for address, future in connects.items():
            try:
                conn = future.result(max(0.0, deadline - self.clock.monotonic()))
            except Exception as exc:
                self._last_reasons[address] = str(exc) or type(exc).__name__
                if isinstance(exc, HandshakeFailed):  # it answered, and said no: another secret or cluster id
                    self._refusals[address] = exc.reason
                continue
            self._refusals.pop(address, None)
            requests[address] = (conn, messaging.request(conn, "who", None))
        replies = []
        for address, (conn, future) in requests.items():
            try:
                reply = future.result(max(0.05, deadline - self.clock.monotonic()))
            except Exception as exc:
                self._last_reasons[address] = str(exc) or type(exc).__name__
                continue
            if reply.get("uuid") == self.me.uuid:
                continue
            replies.append(reply)
        return replies

    def _connect(self, address) -> Future:
        """A connection for probing ``address`` while joining, reused across attempts."""
        address = tuple(address)
        future = self._probes.get(address)
        if future is not None and (not future.done() or (future.exception() is None and future.result().is_open)):
            return future
        future = self._probes[address] = self.transport.connect(address)
        return future

    def _close_probes(self, keep=None) -> None:
        for future in self._probes.values():
            if future.done() and future.exception() is None and future.result() is not keep:
                future.result().close("join probe no longer needed")
            elif not future.done():
                future.cancel()
        self._probes.clear()

    def _try_join(self, master_address) -> None:
        try:
            conn = self._connect(master_address).result(_ATTEMPT_TIMEOUT + 1)
            reply = messaging.request(conn, "join", {"member": self.me.to_wire()}).result(_ATTEMPT_TIMEOUT + 1)
        except Exception as exc:
            log.debug("join via %s failed: %s", format_address(master_address), exc)
            return
        if not reply.get("ok"):
            log.debug("join via %s refused: %s", format_address(master_address), reply)
            conn.close("join refused")
            return
        members = tuple(Member.from_wire(m) for m in reply["members"])
        master = members[0]
        self._links[master.uuid] = conn
        self._close_probes(keep=conn)
        self._enter_cluster(reply["version"], members, reply.get("partitions"))

    def _become_first_member(self) -> None:
        log.info("no cluster found: %s starts a new one as its master", self.me)
        self._close_probes()
        self._enter_cluster(1, (self.me,))

    def _fail_join(self, error: JoinError) -> None:
        log.error("%s", error)
        self._join_error = error
        self._joined.set()
        self._stop = True
