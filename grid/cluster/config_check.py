"""What a valid Config is: building its tables from dicts, and checking every setting.

``config.Config`` calls in here from ``from_mapping``, ``replace`` and
``__post_init__``; nothing here reads files or the environment. Every problem is
a ``ConfigError`` naming the key (dotted for nested tables, e.g. ``multicast.port``),
the source and what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..net.address import (
    describe_value,
    is_trusted_interface_pattern,
    is_valid_host,
    parse_address,
)
from ..net.wire import DEFAULT_MAX_PAYLOAD, MAC_SIZE
from .config_tables import (
    NESTED_TABLES,
    AwsConfig,
    MembersPath,
    MulticastConfig,
    TlsConfig,
    table_keys,
)

JOIN_METHODS = ("multicast", "tcp", "aws")
MAX_ID_LENGTH = 255
MIN_FRAME_LIMIT = 4096  # below this, ordinary control messages would not fit
MAX_FRAME_LIMIT = 2**32 - 1 - MAC_SIZE  # the header's length field is 32 bits and counts the MAC

MERGE_POLICIES = ("put_if_absent", "latest_update")


# ---------------------------------------------------------------- from_mapping helpers


def reject_unknown_keys(data: Mapping, known: list[str], prefix: str, source: str) -> None:
    """Raise a ConfigError, with a did-you-mean hint, for the first key of ``data`` not in ``known``."""
    for key in data:
        if isinstance(key, str) and key in known:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"setting names must be strings, got {describe_value(key)}", key=prefix.rstrip(".")
                              or None, source=source)
        hint = ""
        table, dot, inner = key.partition(".")
        if not prefix and dot and table in NESTED_TABLES:
            hint = f"; write it as a nested table: {{{table!r}: {{{inner!r}: ...}}}} or [{table}] in TOML."
        elif not prefix and (tables := [name for name, cls in NESTED_TABLES.items() if key in table_keys(cls)]):
            hint = f"; did you mean {tables[0]}.{key} (the key {key!r} inside the [{tables[0]}] table)?"
        elif close := (difflib.get_close_matches(key, known, n=1)
                       or [name for name in known if key.startswith(name) or name.startswith(key)]):
            hint = f"; did you mean {prefix + close[0]!r}?"
        where = f"in [{prefix.rstrip('.')}]" if prefix else "at the top level"
        raise ConfigError(f"unknown key{hint or '.'} Allowed keys {where}: {', '.join(known)}",
                          key=prefix + key, source=source)


def build_table(cls: type, value: Any, name: str, source: str, base_dir: str | None) -> Any:
    """The nested table ``cls`` (key ``name``) from a dict; relative ``[tls]`` paths are resolved."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a table of settings, got {describe_value(value)}", key=name, source=source)
    reject_unknown_keys(value, table_keys(cls), name + ".", source)
    settings = dict(value)
    if cls is TlsConfig:
        settings = {key: resolve_path(inner, base_dir) for key, inner in settings.items()}
    if isinstance(settings.get("trusted_interfaces"), (list, tuple)):
        settings["trusted_interfaces"] = list(settings["trusted_interfaces"])
    return cls(**settings)


def members_from(data: Mapping, source: str, base_dir: str | None) -> Any:
    """``members`` as a list of addresses or a MembersPath (checked later by ``validate_config``)."""
    value = data.get("members")
    if "members_path" in data:
        if value is not None:
            raise ConfigError(_BOTH_MEMBER_FORMS, key="members", source=source)
        value = {"path": data["members_path"]}
    if isinstance(value, str):  # "10.0.0.3, 10.0.0.8:5702" is accepted as a list
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, Mapping):
        return value
    extra = [key for key in value if key != "path"]
    if extra and "path" in value:
        raise ConfigError(f"the members table has 'path' and also {', '.join(map(repr, extra))}. "
                          + _BOTH_MEMBER_FORMS, key="members", source=source)
    if extra or "path" not in value:
        found = f" (found {', '.join(map(repr, extra))})" if extra else ""
        raise ConfigError(f'the members table takes only a path{found}: members = {{path = '
                          f'"/shared/registry/"}}; for a list of addresses write members = ["10.0.0.3", ...]',
                          key="members", source=source)
    path = value["path"]
    if not isinstance(path, str) or not path:
        raise ConfigError(f"expected a non-empty path string, got {describe_value(path)}", key="members.path",
                          source=source)
    return MembersPath(resolve_path(path, base_dir))


_BOTH_MEMBER_FORMS = (
    "members are found from a list of addresses OR from a path (a registry folder or a members file), "
    "not both; keep one: members = [\"10.0.0.3\", ...] or members = {path = \"/shared/registry/\"}"
)


def resolve_path(value: Any, base_dir: str | None) -> Any:
    """A path setting with ``~`` expanded and made relative to ``base_dir``; other values unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = os.path.expanduser(value)
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return path


# ---------------------------------------------------------------- validation


class _Checker:
    """Type and range checks that raise ConfigError naming the key and the source."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key=key, source=self.source)

    def string(self, value: Any, key: str, *, optional: bool = False, hide: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {describe_value(value, hide=hide)}")
        if not value.strip():
            raise self.fail(key, "the value is empty; give a value or leave the key out")

    def boolean(self, value: Any, key: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {describe_value(value)}")

    def integer(self, value: Any, key: str, low: int, high: int | None, allowed: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {describe_value(value)}; allowed: {allowed}")
        if value < low or (high is not None and value > high):
            raise self.fail(key, f"{value} is out of range; allowed: {allowed}")

    def seconds(self, value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number of seconds, got {describe_value(value)}")
        if not (math.isfinite(value) and value > 0):
            raise self.fail(key, f"{value} is not allowed; allowed: a positive number of seconds")

    def host(self, value: Any, key: str) -> None:
        self.string(value, key)
        if not is_valid_host(value):
            hint = "; set the port with `port`, not in the interface" if ":" in value else ""
            raise self.fail(key, f"{value!r} is not an IP address or host name; allowed: a host without a "
                                 f"port, e.g. 127.0.0.1, 0.0.0.0, ::1 or myhost.example{hint}")

    def instance(self, value: Any, cls: type, key: str) -> None:
        if not isinstance(value, cls):
            raise self.fail(key, f"expected a table ({cls.__name__}), got {describe_value(value)}")


def _validate_imports(imports: Any, check: _Checker) -> None:
    if not isinstance(imports, list):
        raise check.fail("imports", f"expected a list of module names, got {describe_value(imports)}; "
                                    "allowed: imports = [\"mymodule\", \"package.module\"]")
    for name in imports:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise check.fail("imports", f"{name!r} is not a module name; allowed: dotted Python names such "
                                        "as \"package.module\"")


def validate_config(config: Any, source: str) -> None:
    """Check every setting of ``config`` (a ``config.Config``); raise a ConfigError naming the first bad key."""
    check = _Checker(source)
    if isinstance(config.id, str) and not config.id.strip():
        raise check.fail("id", "the cluster id is empty; allowed: a name such as 'dev' that all members "
                               "of one cluster share")
    check.string(config.id, "id")
    if len(config.id) > MAX_ID_LENGTH:
        raise check.fail("id", f"the cluster id has {len(config.id)} characters; allowed: at most "
                               f"{MAX_ID_LENGTH}")
    if not isinstance(config.join, str) or config.join not in JOIN_METHODS:
        close = difflib.get_close_matches(str(config.join), JOIN_METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        shown = repr(config.join) if isinstance(config.join, str) else describe_value(config.join)
        raise check.fail("join", f"{shown} is not a join method; {hint}allowed: "
                                 f"{', '.join(JOIN_METHODS)}")
    _validate_members(config.members, check)
    if config.required is not None:
        check.string(config.required, "required")
        parse_address(config.required, key="required", source=source)
    for name in ("register_on_join", "insecure", "allow_code", "data", "dashboard"):
        check.boolean(getattr(config, name), name)
    check.integer(config.dashboard_port, "dashboard_port", 0, 65535, "0..65535 (0 lets the OS choose a free port)")
    _validate_imports(config.imports, check)
    check.integer(config.port, "port", 0, 65535, "0..65535 (0 lets the OS choose a free port)")
    if config.interface is not None:
        check.host(config.interface, "interface")
    check.string(config.secret, "secret", optional=True, hide=True)
    check.string(config.secret_file, "secret_file", optional=True)
    if config.secret is not None and config.secret_file is not None:
        raise check.fail("secret", "both secret and secret_file are set; keep one (the secret in the "
                                   "config, or the path of a file holding it)")
    _validate_multicast(config.multicast, check)
    _validate_aws(config.aws, check)
    _validate_tls(config.tls, check)
    for name in ("heartbeat_interval", "failure_timeout", "join_timeout", "handshake_timeout"):
        check.seconds(getattr(config, name), name)
    if config.heartbeat_interval >= config.failure_timeout:
        raise check.fail("heartbeat_interval", f"{config.heartbeat_interval} s is not shorter than "
                         f"failure_timeout ({config.failure_timeout} s); allowed: heartbeat_interval < "
                         "failure_timeout, so a member sends several heartbeats before it is declared dead")
    check.integer(config.max_frame_bytes, "max_frame_bytes", MIN_FRAME_LIMIT, MAX_FRAME_LIMIT,
                  f"an integer number of bytes from {MIN_FRAME_LIMIT} to {MAX_FRAME_LIMIT} (default "
                  f"{DEFAULT_MAX_PAYLOAD}, 512 MiB): the largest frame a link accepts after the handshake")
    check.integer(config.backup_count, "backup_count", 0, 6, "an integer from 0 to 6 (backups per partition)")
    check.integer(config.partitions, "partitions", 1, None, "an integer >= 1")
    check.integer(config.split_brain_protection, "split_brain_protection", 0, None,
                  "an integer >= 0: with N > 0, writes fail on a side of the cluster with fewer than N members "
                  "(0: off)")
    if config.merge_policy not in MERGE_POLICIES:
        raise check.fail("merge_policy", f"{config.merge_policy!r} is not a merge policy; allowed: "
                         f"{' or '.join(MERGE_POLICIES)} (after a split heals, the smaller side's entries are "
                         "set where the key is absent, or where theirs were written later)")
    if config.workers is not None:
        check.integer(config.workers, "workers", 1, None, "an integer >= 1, or leave it out for one per CPU")
    check.integer(config.task_processes, "task_processes", 0, 256,
                  "0..256 (0 runs tasks in the member's threads; N runs them in N child processes)")
    if not isinstance(config.source, str):
        raise check.fail("source", f"expected a string naming where the config came from, got "
                                   f"{describe_value(config.source)}")


def _validate_members(members: Any, check: _Checker) -> None:
    if members is None:
        return
    if isinstance(members, MembersPath):
        check.string(members.path, "members.path")
        return
    if not isinstance(members, list):
        raise check.fail("members", f"expected a list of addresses or a table {{path = ...}}, got "
                                    f"{describe_value(members)}")
    for address in members:
        parse_address(address, key="members", source=check.source)


def _validate_multicast(multicast: Any, check: _Checker) -> None:
    check.instance(multicast, MulticastConfig, "multicast")
    check.string(multicast.group, "multicast.group")
    try:
        group = ipaddress.IPv4Address(multicast.group)
    except ValueError:
        group = None
    if group is None or not group.is_multicast:
        raise check.fail("multicast.group", f"{multicast.group!r} is not an IPv4 multicast address; "
                                            "allowed: 224.0.0.0 to 239.255.255.255, e.g. 224.2.2.3")
    check.integer(multicast.port, "multicast.port", 1, 65535, "1..65535 (every member must use the same one)")
    check.integer(multicast.ttl, "multicast.ttl", 0, 255, "0..255 (0 keeps packets on this host)")
    check.seconds(multicast.timeout_seconds, "multicast.timeout_seconds")
    if not isinstance(multicast.trusted_interfaces, list):
        raise check.fail("multicast.trusted_interfaces", f"expected a list, got "
                                                         f"{describe_value(multicast.trusted_interfaces)}")
    for pattern in multicast.trusted_interfaces:
        check.string(pattern, "multicast.trusted_interfaces")
        if not is_trusted_interface_pattern(pattern):
            raise check.fail("multicast.trusted_interfaces", f"{pattern!r} is not allowed; allowed: an IP "
                             "address, a network like 10.0.0.0/8, or an IPv4 pattern like 10.0.1.* or "
                             "192.168.1.100-110")


def _validate_aws(aws: Any, check: _Checker) -> None:
    check.instance(aws, AwsConfig, "aws")
    for name in table_keys(AwsConfig):
        check.string(getattr(aws, name), f"aws.{name}", optional=True)
    if aws.tag_value is not None and aws.tag_key is None:
        raise check.fail("aws.tag_value", "tag_value is set without tag_key; set aws.tag_key to the tag's "
                                          "name too")
    if aws.endpoint_url is not None and not aws.endpoint_url.startswith(("http://", "https://")):
        raise check.fail("aws.endpoint_url", f"{aws.endpoint_url!r} is not allowed; allowed: an http:// or "
                                             "https:// URL")


def _validate_tls(tls: Any, check: _Checker) -> None:
    if tls is None:
        return
    check.instance(tls, TlsConfig, "tls")
    for name in table_keys(TlsConfig):
        check.string(getattr(tls, name), f"tls.{name}", optional=True)
    if tls.cert is None:
        given = [name for name in ("key", "ca") if getattr(tls, name) is not None]
        what = f"tls.{' and tls.'.join(given)} {'are' if len(given) > 1 else 'is'} set but" if given else \
            "the [tls] table is empty and"
        raise check.fail("tls.cert", f"{what} tls.cert is missing; mutual TLS needs this member's "
                                     "certificate: set tls.cert (and tls.key unless the cert file holds it)")
