"""Multicast discovery: members find each other through signed announcements on a UDP group.

Every member sends a small JSON datagram to the multicast group (``multicast.group``:
``multicast.port``) and listens for the others'. An announcement carries the cluster
id, the sender's uuid, its address and its state (joining, member or client), and an
HMAC-SHA256 over all of that keyed by the cluster secret; a datagram with a bad mac,
another cluster id, an untrusted source or over ``MAX_ANNOUNCEMENT_BYTES`` is dropped.

    listener thread "grid-multicast"
        every interval -> announce this member
        datagram in    -> check size, source, mac, cluster -> remember (address, state)
                          joiner heard -> answer at once (at most every _REPLY_MIN_INTERVAL)
    candidates()       <- whoever was heard within heard_window: members first, then joiners

Deviation: this file opens its own UDP socket (``transport.py`` owns the TCP data path).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import selectors
import socket
import struct
import sys
import threading
import time
import uuid

from ..errors import ConfigError, DiscoveryError
from ..net.address import format_address, is_loopback, trusted_interface_matches
from .candidates import (
    MEMBER_STATES,
    Address,
    Discovery,
    parse_member_address,
    unique_candidates,
)
from .config_tables import MulticastConfig

# A child of "grid.discovery": logging set up for discovery still covers multicast.
logger = logging.getLogger("grid.discovery.multicast")

MAX_ANNOUNCEMENT_BYTES = 1024
_ANNOUNCEMENT_KEY_CONTEXT = b"grid multicast announcement v1\x00"
_REPLY_MIN_INTERVAL = 0.1  # seconds between two answers to joiners: a joiner storm costs <= 10 datagrams/s
_MAX_DATAGRAMS_PER_WAKE = 64
_LINUX_IP_MULTICAST_ALL = 49  # not exported by the socket module on every Python build


# --- announcements ----------------------------------------------------------------------------

def _announcement_key(secret: str | None) -> bytes:
    return hashlib.sha256(_ANNOUNCEMENT_KEY_CONTEXT + (secret or "").encode("utf-8")).digest()


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _sign(fields: dict, key: bytes) -> str:
    return hmac.new(key, _canonical(fields), hashlib.sha256).hexdigest()


def _source_trusted(source_ip: str, patterns: list[str]) -> bool:
    return not patterns or any(trusted_interface_matches(pattern, source_ip) for pattern in patterns)


# --- the group socket -------------------------------------------------------------------------

def _multicast_interface(host: str) -> str:
    """The IPv4 interface to join and send on: our own address, or INADDR_ANY for 0.0.0.0 or a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.version == 4:
        return str(address)
    if is_loopback(host):  # "localhost" or ::1: stay on loopback, never the default interface
        return "127.0.0.1"
    logger.debug("multicast: %r is not an IPv4 address, using the default interface", host)
    return "0.0.0.0"


def _open_multicast_socket(group: str, port: int, interface: str, ttl: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        # Many members on one host share the group port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            except OSError:
                pass
        if sys.platform.startswith("linux"):
            # Without this, Linux delivers every group joined by any socket of the host on this port.
            try:
                sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MULTICAST_ALL", _LINUX_IP_MULTICAST_ALL), 0)
            except OSError:
                pass
        sock.bind(("", port))
        membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise DiscoveryError(
            f"cannot use multicast group {group}:{port} on interface {interface}: {exc.strerror or exc}; "
            "check that the interface supports multicast and the port is free, "
            "or use join = 'tcp' or members = {path = ...}") from exc
    return sock


# --- the strategy -----------------------------------------------------------------------------

class MulticastDiscovery(Discovery):
    """Members announce themselves on a UDP multicast group with HMAC-signed JSON datagrams.

    A listener thread ("grid-multicast") records who it heard, announces this member
    every ``joining_interval`` (while joining) or ``member_interval`` (once a member),
    and answers a joiner's announcement at once. ``candidates()`` lists whoever was
    heard recently: members first, then joiners, each in the order first heard.
    """

    def __init__(self, multicast: MulticastConfig, *, cluster_id: str, secret: str | None,
                 member_uuid: str | None = None, clock=time,
                 joining_interval: float = 0.25, member_interval: float = 1.0):
        super().__init__(join_wait=multicast.timeout_seconds)
        try:
            if not ipaddress.IPv4Address(multicast.group).is_multicast:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{multicast.group!r} is not an IPv4 multicast address (224.0.0.0/4)",
                              key="multicast.group") from None
        self.group, self.port, self.ttl = multicast.group, multicast.port, multicast.ttl
        self.cluster_id = cluster_id
        self.member_uuid = member_uuid or uuid.uuid4().hex
        self.joining_interval, self.member_interval = joining_interval, member_interval
        self._trusted = list(multicast.trusted_interfaces)  # validated by Config
        self._key = _announcement_key(secret)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = "joining"
        self._heard: dict[Address, tuple[float, str]] = {}  # address -> (monotonic time, state)
        self._own_text = ""
        self._sock: socket.socket | None = None
        self._wake_reader: socket.socket | None = None
        self._wake_writer: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._announce_now = False
        self._last_sent = self._last_reply = float("-inf")
        self.datagrams_sent = 0  # counters, for logs and tests
        self.datagrams_accepted = 0
        self.datagrams_ignored = 0

    @property
    def heard_window(self) -> float:
        """Seconds an announcement keeps its sender a candidate."""
        return max(3 * self.member_interval, 3.0)

    def start(self, own_address: Address) -> None:
        if self._thread is not None or self._stopping:
            raise DiscoveryError("this MulticastDiscovery was already started; make a new one")
        super().start(own_address)
        self._own_text = format_address(self._own_address)
        if len(self._announcement()) > MAX_ANNOUNCEMENT_BYTES:
            raise DiscoveryError(
                f"multicast announcement exceeds {MAX_ANNOUNCEMENT_BYTES} bytes: shorten the cluster id")
        self._sock = _open_multicast_socket(
            self.group, self.port, _multicast_interface(self._own_address[0]), self.ttl)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="grid-multicast")
        self._thread.start()

    def set_state(self, state: str) -> None:
        super().set_state(state)
        with self._lock:
            changed, self._state = state != self._state, state
            self._announce_now = self._announce_now or changed
        if changed:
            self._wake()

    def candidates(self) -> list[Address]:
        now = self._clock.monotonic()
        with self._lock:
            fresh = [(address, state) for address, (heard_at, state) in self._heard.items()
                     if now - heard_at <= self.heard_window]
        ordered = [a for a, s in fresh if s == "member"] + [a for a, s in fresh if s != "member"]
        return unique_candidates(ordered, self._own_address)

    def stop(self, *, clean: bool = True) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._thread is not None:
            self._wake()
            self._thread.join()
        for sock in (self._sock, self._wake_reader, self._wake_writer):
            if sock is not None:
                sock.close()

    # The listener thread -------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (AttributeError, BlockingIOError, OSError):
            pass  # not started, or already woken (buffer full)

    def _interval(self) -> float:
        return self.member_interval if self._state == "member" else self.joining_interval

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ, "datagram")
        selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        next_announce = self._clock.monotonic()
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    announce_now, self._announce_now = self._announce_now, False
                if announce_now or self._clock.monotonic() >= next_announce:
                    self._send_announcement()
                    next_announce = self._clock.monotonic() + self._interval()
                timeout = min(max(next_announce - self._clock.monotonic(), 0.0), self._interval())
                for key, _ in selector.select(timeout):
                    if key.data == "wake":
                        self._drain_wake()
                    else:
                        self._receive_datagrams()
        except Exception:
            logger.exception("multicast listener failed; this member no longer hears announcements")
        finally:
            selector.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(256):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _receive_datagrams(self) -> None:
        for _ in range(_MAX_DATAGRAMS_PER_WAKE):
            try:
                data, (source_ip, _) = self._sock.recvfrom(MAX_ANNOUNCEMENT_BYTES * 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error surfacing on the socket: not fatal
                logger.debug("multicast receive failed: %s", exc)
                return
            self._handle_datagram(data, source_ip)

    def _announcement(self) -> bytes:
        fields = {"v": 1, "cluster": self.cluster_id, "uuid": self.member_uuid,
                  "address": self._own_text, "state": self._state, "nonce": secrets.token_hex(8)}
        fields["mac"] = _sign(fields, self._key)
        return _canonical(fields)

    def _send_announcement(self) -> None:
        self._last_sent = self._clock.monotonic()
        try:
            self._sock.sendto(self._announcement(), (self.group, self.port))
            self.datagrams_sent += 1
        except OSError as exc:
            logger.warning("multicast announcement to %s:%d failed: %s", self.group, self.port, exc)

    def _ignore(self, source_ip: str, reason: str) -> None:
        self.datagrams_ignored += 1
        logger.debug("multicast: ignored a datagram from %s: %s", source_ip, reason)

    def _handle_datagram(self, data: bytes, source_ip: str) -> None:
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            return self._ignore(source_ip, f"{len(data)} bytes, over the {MAX_ANNOUNCEMENT_BYTES} byte cap")
        if not _source_trusted(source_ip, self._trusted):
            return self._ignore(source_ip, "source not in multicast.trusted_interfaces")
        try:
            fields = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            return self._ignore(source_ip, "not JSON")
        if not isinstance(fields, dict) or not isinstance(fields.get("mac"), str):
            return self._ignore(source_ip, "no mac")
        mac = fields.pop("mac")
        if not hmac.compare_digest(mac.encode("ascii", "replace"), _sign(fields, self._key).encode("ascii")):
            return self._ignore(source_ip, "bad mac (another secret?)")
        if fields.get("v") != 1 or fields.get("state") not in MEMBER_STATES \
                or not isinstance(fields.get("uuid"), str) or not isinstance(fields.get("address"), str):
            return self._ignore(source_ip, "unknown version or malformed fields")
        if fields.get("cluster") != self.cluster_id:
            return self._ignore(source_ip, f"another cluster id {fields.get('cluster')!r}")
        if fields["uuid"] == self.member_uuid:
            return  # our own announcement, looped back
        if fields["state"] == "client":
            if self._state == "member" and self._should_answer(self._clock.monotonic()):
                self._last_reply = self._clock.monotonic()
                self._send_announcement()
            return  # a client is never a join candidate
        try:
            address = parse_member_address(fields["address"])
        except ValueError:
            return self._ignore(source_ip, f"bad address {fields['address']!r}")
        now = self._clock.monotonic()
        with self._lock:
            expired = [a for a, (heard_at, _) in self._heard.items() if now - heard_at > self.heard_window]
            for stale in expired:
                del self._heard[stale]
            self._heard[address] = (now, fields["state"])  # an update keeps the first-heard position
            self.datagrams_accepted += 1
        if fields["state"] == "joining" and self._should_answer(now):
            self._last_reply = now
            self._send_announcement()

    def _should_answer(self, now: float) -> bool:
        # A member answers joiners at most every _REPLY_MIN_INTERVAL. A joiner answers only if it
        # was silent that long, so two joiners never answer each other's answers in a loop.
        if self._state == "member":
            return now - self._last_reply >= _REPLY_MIN_INTERVAL
        if self._state == "client":
            return False
        return now - self._last_sent >= _REPLY_MIN_INTERVAL
