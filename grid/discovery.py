"""Discovery: where to look for other members. It yields candidate addresses and decides nothing.

Membership calls ``candidates()`` on every join attempt and decides who is in. One
strategy is picked from the config by ``make_discovery``:

    members = {path = "dir/"}  -> RegistryFolderDiscovery  (one file per member, named by address)
    members = {path = "file"}  -> MembersFileDiscovery     (newline-separated list kept by someone else)
    join = "multicast"         -> MulticastDiscovery       (signed UDP announcements on a group)
    join = "aws"               -> AwsDiscovery             (EC2 describe_instances, boto3)
    join = "tcp"               -> StaticDiscovery          (the ``members`` list, maybe empty)

An address is a ``(host, port)`` tuple. Registry entry names: ``ip`` for the default
port, ``ip_port`` otherwise; an IPv6 address has its ``:`` replaced by ``-`` (Windows
forbids ``:`` in file names), e.g. ``fe80--1_5702``. Names starting with ``.`` are
temporary files and are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import selectors
import socket
import struct
import sys
import threading
import time
import uuid

from .config import (
    DEFAULT_PORT,
    Config,
    MembersPath,
    MulticastConfig,
    format_address,
    is_loopback,
    parse_address,
    trusted_interface_matches,
)
from .errors import ConfigError, DiscoveryError

logger = logging.getLogger("grid.discovery")

Address = tuple[str, int]

MAX_ANNOUNCEMENT_BYTES = 1024
MEMBER_STATES = ("joining", "member", "client")  # a client only listens and asks
_ANNOUNCEMENT_KEY_CONTEXT = b"grid multicast announcement v1\x00"
_REPLY_MIN_INTERVAL = 0.1  # seconds between two answers to joiners: a joiner storm costs <= 10 datagrams/s
_MAX_DATAGRAMS_PER_WAKE = 64
_LINUX_IP_MULTICAST_ALL = 49  # not exported by the socket module on every Python build


# --- addresses -------------------------------------------------------------------------------

def _parse_member_address(text: str) -> Address:
    """Parse one member address (default port 5701) to canonical form; ValueError (ConfigError) if bad."""
    address = _normalize_address(parse_address(text, DEFAULT_PORT))
    if address[1] == 0:
        raise ValueError(f"{text!r} has port 0, which no member listens on")
    return address


def _parse_port(port_text: str, whole: str) -> int:
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {whole!r}: expected 1-65535")
    return int(port_text)


def _normalize_address(address: Address) -> Address:
    """Canonical form, so one member never appears twice under two spellings."""
    host, port = address
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return host, int(port)


def _unique(addresses, own: Address | None) -> list[Address]:
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
        self._own_address = _normalize_address(own_address)

    def candidates(self) -> list[Address]:
        """Return the addresses worth trying now: fresh, deduplicated, stable order, never our own.

        Raises:
            DiscoveryError: the source cannot be read in a way the user must fix.
        """
        return []

    def member_dead(self, address: Address) -> None:
        """Forget a member found dead (the registry folder prunes its entry; others do nothing)."""

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


# --- tcp: a fixed list ------------------------------------------------------------------------

class StaticDiscovery(Discovery):
    """The ``members`` list of the config, or nobody (a lone member)."""

    def __init__(self, addresses: list[Address], *, join_wait: float):
        super().__init__(join_wait=join_wait)
        self.addresses = _unique((_normalize_address(address) for address in addresses), None)

    def candidates(self) -> list[Address]:
        return _unique(self.addresses, self._own_address)


# --- members file: a list kept by someone else ------------------------------------------------

class MembersFileDiscovery(Discovery):
    """A newline-separated address list (``#`` comments, blank lines allowed), re-read every call."""

    def __init__(self, path: str, *, join_wait: float):
        super().__init__(join_wait=join_wait)
        self.path = os.path.abspath(os.path.expanduser(path))
        self._reported_bad_lines: set[str] = set()

    def start(self, own_address: Address) -> None:
        super().start(own_address)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            logger.info("created empty members file %s: add one member address per line", self.path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DiscoveryError(
                f"cannot create members file {self.path}: {exc.strerror}; "
                "create it yourself or fix the path or permissions of config key 'members'") from exc

    def candidates(self) -> list[Address]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as members_file:
                lines = members_file.read().splitlines()
        except FileNotFoundError:
            logger.debug("members file %s is missing: no candidates", self.path)
            return []
        except OSError as exc:
            raise DiscoveryError(
                f"cannot read members file {self.path}: {exc.strerror}; fix its permissions") from exc
        addresses = []
        for line_number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                addresses.append(_parse_member_address(text))
            except ValueError as exc:
                self._report_bad_line(line_number, text, exc)
        return _unique(addresses, self._own_address)

    def _report_bad_line(self, line_number: int, text: str, exc: ValueError) -> None:
        # Warn once per distinct bad line: candidates() runs on every join attempt.
        log = logger.debug if text in self._reported_bad_lines else logger.warning
        self._reported_bad_lines.add(text)
        log("members file %s line %d skipped: %s", self.path, line_number, exc)


# --- registry folder: one file per member -----------------------------------------------------

def registry_entry_name(address: Address) -> str:
    """Return the registry file name of an IP address: ``ip`` (default port) or ``ip_port``.

    Args:
        address: (host, port) with host an IPv4 or IPv6 literal.

    Returns:
        The file name; an IPv6 address has ``:`` replaced by ``-``.

    Raises:
        ValueError: host is not an IP address.
    """
    host, port = address
    name = str(ipaddress.ip_address(host)).replace(":", "-")
    return name if port == DEFAULT_PORT else f"{name}_{port}"


def parse_registry_entry_name(name: str) -> Address:
    """Return the address a registry file name stands for (the inverse of ``registry_entry_name``).

    Raises:
        ValueError: the name is not a registry entry (a temp file, a note, ...).
    """
    if name.startswith("."):
        raise ValueError("temporary or hidden file")
    host_text, port = name, DEFAULT_PORT
    if "_" in name:
        host_text, port_text = name.rsplit("_", 1)
        port = _parse_port(port_text, name)
    try:
        host = ipaddress.ip_address(host_text)
    except ValueError:
        # IPv6: '-' stands for ':' (but not inside a zone id such as %br-lan).
        address_part, percent, zone = host_text.partition("%")
        host = ipaddress.ip_address(address_part.replace("-", ":") + percent + zone)
        if host.version != 6:
            raise ValueError(f"{name!r} is not an IP address") from None
    return str(host), port


class RegistryFolderDiscovery(Discovery):
    """A shared folder where each member writes one file named by its address, holding its host name."""

    def __init__(self, folder: str, *, register_on_join: bool, join_wait: float):
        super().__init__(join_wait=join_wait)
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.register_on_join = register_on_join
        self._own_entry: str | None = None
        self._reported_junk: set[str] = set()

    def start(self, own_address: Address) -> None:
        super().start(own_address)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise DiscoveryError(
                f"cannot create registry folder {self.folder}: {exc.strerror}; "
                "fix the path or permissions of config key 'members'") from exc
        if self.register_on_join:
            self._write_own_entry()

    def _write_own_entry(self) -> None:
        host, _ = self._own_address
        try:
            if ipaddress.ip_address(host).is_unspecified:
                raise ValueError(host)
            name = registry_entry_name(self._own_address)
        except ValueError:
            raise DiscoveryError(
                f"cannot register {format_address(self._own_address)} in {self.folder}: "
                "the registry needs a reachable IP address; pass the resolved address to start()") from None
        path = os.path.join(self.folder, name)
        temp_path = os.path.join(self.folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(temp_path, "w", encoding="utf-8") as entry:
                entry.write(socket.gethostname() + "\n")
            os.replace(temp_path, path)  # atomic: a reader never sees a half-written entry
        except OSError as exc:
            _remove_quietly(temp_path)
            raise DiscoveryError(
                f"cannot write registry entry {path}: {exc.strerror}; "
                "the folder must be writable by every member (or set register_on_join = false)") from exc
        self._own_entry = path
        logger.info("registered %s in %s", format_address(self._own_address), self.folder)

    def _entries(self) -> list[tuple[str, Address]]:
        try:
            names = sorted(entry.name for entry in os.scandir(self.folder) if entry.is_file())
        except FileNotFoundError:
            logger.debug("registry folder %s is missing: no candidates", self.folder)
            return []
        except OSError as exc:
            raise DiscoveryError(
                f"cannot read registry folder {self.folder}: {exc.strerror}; fix its permissions") from exc
        entries = []
        for name in names:
            try:
                entries.append((name, parse_registry_entry_name(name)))
            except ValueError as exc:
                if name not in self._reported_junk:
                    self._reported_junk.add(name)
                    logger.debug("registry folder %s: ignoring %r (%s)", self.folder, name, exc)
        return entries

    def candidates(self) -> list[Address]:
        return _unique((address for _, address in self._entries()), self._own_address)

    def member_dead(self, address: Address) -> None:
        address = _normalize_address(address)
        if address == self._own_address:
            return
        for name, entry_address in self._entries():
            if entry_address == address:
                # Another member may prune the same entry at the same moment: that is fine.
                if _remove_quietly(os.path.join(self.folder, name)):
                    logger.info("pruned registry entry %s of dead member %s", name, format_address(address))

    def stop(self, *, clean: bool = True) -> None:
        entry, self._own_entry = self._own_entry, None
        if entry is not None and clean:
            _remove_quietly(entry)


def _remove_quietly(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc.strerror)
        return False


# --- multicast --------------------------------------------------------------------------------

def _announcement_key(secret: str | None) -> bytes:
    return hashlib.sha256(_ANNOUNCEMENT_KEY_CONTEXT + (secret or "").encode("utf-8")).digest()


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _sign(fields: dict, key: bytes) -> str:
    return hmac.new(key, _canonical(fields), hashlib.sha256).hexdigest()


def _source_trusted(source_ip: str, patterns: list[str]) -> bool:
    return not patterns or any(trusted_interface_matches(pattern, source_ip) for pattern in patterns)


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
        return _unique(ordered, self._own_address)

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
            address = _parse_member_address(fields["address"])
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


# --- aws --------------------------------------------------------------------------------------

class AwsDiscovery(Discovery):
    """EC2 instances that are running (and tagged / in the security group, when configured)."""

    def __init__(self, aws, *, port: int, join_wait: float):
        super().__init__(join_wait=join_wait)
        try:
            import boto3
        except ImportError:
            raise DiscoveryError(
                "join = 'aws' needs boto3, which is not installed: pip install 'hazelgrid[aws]'") from None
        self._boto3 = boto3
        self.aws = aws
        self.port = port or DEFAULT_PORT
        self._client = None

    def _filters(self) -> list[dict]:
        filters = [{"Name": "instance-state-name", "Values": ["running"]}]
        if self.aws.tag_key and self.aws.tag_value is not None:
            filters.append({"Name": f"tag:{self.aws.tag_key}", "Values": [self.aws.tag_value]})
        elif self.aws.tag_key:
            filters.append({"Name": "tag-key", "Values": [self.aws.tag_key]})
        if self.aws.security_group_name:
            filters.append({"Name": "instance.group-name", "Values": [self.aws.security_group_name]})
        return filters

    def candidates(self) -> list[Address]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

        try:
            if self._client is None:
                session = self._boto3.session.Session(region_name=self.aws.region)
                self._client = session.client("ec2", endpoint_url=self.aws.endpoint_url)
            addresses = []
            for page in self._client.get_paginator("describe_instances").paginate(Filters=self._filters()):
                for reservation in page.get("Reservations", []):
                    for instance in reservation.get("Instances", []):
                        if instance.get("PrivateIpAddress"):
                            addresses.append((instance["PrivateIpAddress"], self.port))
        except NoRegionError as exc:
            raise DiscoveryError("AWS discovery: no region; set aws.region or AWS_DEFAULT_REGION") from exc
        except NoCredentialsError as exc:
            raise DiscoveryError(
                "AWS discovery: no credentials found; configure them for boto3 (environment, "
                "~/.aws/credentials or an instance role)") from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise DiscoveryError(
                f"AWS discovery: EC2 DescribeInstances refused: {error.get('Code')}: {error.get('Message')}; "
                "check the credentials, the region and that they allow ec2:DescribeInstances") from exc
        except BotoCoreError as exc:
            raise DiscoveryError(
                f"AWS discovery failed: {exc}; check aws.region, aws.endpoint_url and network access") from exc
        return _unique((_normalize_address(address) for address in addresses), self._own_address)


# --- choosing a strategy ----------------------------------------------------------------------

def make_discovery(config: Config, *, secret: str | None, cluster_id: str | None = None,
                   member_uuid: str | None = None, clock=time) -> Discovery:
    """Pick the discovery strategy the config asks for.

    A ``members = {path = P}`` wins over ``join``: a directory (or a path ending in "/")
    is a registry folder, anything else a members file.

    Args:
        config: the validated Config.
        secret: the cluster secret; multicast announcements are signed with it (None: unsigned key).
        cluster_id: the cluster namespace; defaults to ``config.id``.
        member_uuid: this member's uuid, announced by multicast; generated when omitted.
        clock: an object with ``monotonic()`` (multicast uses it to age what it heard).

    Returns:
        An unstarted Discovery; call ``start(own_address)`` next.

    Raises:
        ConfigError: an unknown join method or a bad member address.
        DiscoveryError: the method needs something missing (boto3 for aws).
    """
    cluster_id = config.id if cluster_id is None else cluster_id
    members = config.members
    if isinstance(members, MembersPath):
        path = members.path
        if path.endswith(("/", os.sep)) or os.path.isdir(os.path.expanduser(path)):
            return RegistryFolderDiscovery(path, register_on_join=config.register_on_join,
                                           join_wait=config.join_timeout)
        return MembersFileDiscovery(path, join_wait=config.join_timeout)
    if config.join == "multicast":
        if members:
            logger.debug("join = 'multicast': the members list is not used")
        return MulticastDiscovery(config.multicast, cluster_id=cluster_id, secret=secret,
                                  member_uuid=member_uuid, clock=clock)
    if config.join == "aws":
        return AwsDiscovery(config.aws, port=config.port, join_wait=config.join_timeout)
    if config.join == "tcp":
        addresses = [parse_address(text, DEFAULT_PORT, key="members", source=config.source) for text in members or []]
        # Nobody else configured: a lone member, nothing to wait for.
        return StaticDiscovery(addresses, join_wait=config.join_timeout if addresses else 0.0)
    raise ConfigError(f"unknown join method {config.join!r}: expected multicast, tcp or aws",
                      key="join", source=config.source)
