"""Discovery: where to look for other members. It yields candidate addresses and decides nothing.

Membership calls ``candidates()`` on every join attempt and decides who is in. One
strategy is picked from the config by ``make_discovery``:

    members = {path = "dir/"}  -> RegistryFolderDiscovery  (one file per member, named by address)
    members = {path = "file"}  -> MembersFileDiscovery     (newline-separated list kept by someone else)
    join = "multicast"         -> MulticastDiscovery       (signed UDP announcements: multicast.py)
    join = "aws"               -> AwsDiscovery             (EC2 describe_instances, boto3)
    join = "tcp"               -> StaticDiscovery          (the ``members`` list, maybe empty)

Each is a ``candidates.Discovery``; ``candidates.py`` also holds the address helpers
every strategy shares. An address is a ``(host, port)`` tuple. Registry entry names:
``ip`` for the default port, ``ip_port`` otherwise; an IPv6 address has its ``:``
replaced by ``-`` (Windows forbids ``:`` in file names), e.g. ``fe80--1_5702``. Names
starting with ``.`` are temporary files and are ignored.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import time

from ..errors import ConfigError, DiscoveryError
from ..net.address import DEFAULT_PORT, format_address, parse_address
from .candidates import (
    Address,
    Discovery,
    normalize_address,
    parse_member_address,
    unique_candidates,
)
from .config import Config
from .config_tables import MembersPath
from .multicast import MulticastDiscovery

logger = logging.getLogger("grid.discovery")


# --- addresses -------------------------------------------------------------------------------

def _parse_port(port_text: str, whole: str) -> int:
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {whole!r}: expected 1-65535")
    return int(port_text)


# --- tcp: a fixed list ------------------------------------------------------------------------

class StaticDiscovery(Discovery):
    """The ``members`` list of the config, or nobody (a lone member)."""

    def __init__(self, addresses: list[Address], *, join_wait: float):
        super().__init__(join_wait=join_wait)
        self.addresses = unique_candidates((normalize_address(address) for address in addresses), None)

    def candidates(self) -> list[Address]:
        return unique_candidates(self.addresses, self._own_address)


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
                addresses.append(parse_member_address(text))
            except ValueError as exc:
                self._report_bad_line(line_number, text, exc)
        return unique_candidates(addresses, self._own_address)

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
        self._stopped = False

    def start(self, own_address: Address) -> None:
        super().start(own_address)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise DiscoveryError(
                f"cannot create registry folder {self.folder}: {exc.strerror}; "
                "fix the path or permissions of config key 'members'") from exc
        self._entries()  # a folder this member cannot list is one clear error now, not a stuck join
        if self.register_on_join:
            self._write_own_entry()

    def set_state(self, state: str) -> None:
        super().set_state(state)
        if state == "member":  # joined or rejoined: the master may have pruned the entry meanwhile
            self.refresh()

    def refresh(self) -> None:
        """Write this member's entry again if it is missing (pruned while it was away, or wiped)."""
        if self.register_on_join and self._own_address is not None and not self._stopped and (
                self._own_entry is None or not os.path.exists(self._own_entry)):
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
                f"cannot list registry folder {self.folder}: {exc.strerror}; every member must be able to "
                "read, write and enter it (e.g. chmod 1777 for a shared folder), or change config key "
                "'members'") from exc
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
        return unique_candidates((address for _, address in self._entries()), self._own_address)

    def member_dead(self, address: Address) -> None:
        address = normalize_address(address)
        if address == self._own_address:
            return
        for name, entry_address in self._entries():
            if entry_address == address:
                # Another member may prune the same entry at the same moment: that is fine.
                if _remove_quietly(os.path.join(self.folder, name)):
                    logger.info("pruned registry entry %s of dead member %s", name, format_address(address))

    def stop(self, *, clean: bool = True) -> None:
        self._stopped = True
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
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            NoRegionError,
        )

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
        return unique_candidates((normalize_address(address) for address in addresses), self._own_address)


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
