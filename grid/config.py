"""Configuration: the ``Config`` dataclass, where it is looked up, and its validation.

Lookup order (first found wins, no merging): explicit argument -> ``./grid.toml``
-> ``~/.grid/grid.toml`` -> the ``GRID`` environment variable (a join method
name, a path to a config file, or inline JSON) -> defaults.

A ``Config`` is validated whenever it is built (``__post_init__``), so every
instance in the program is a valid one. Errors are ``ConfigError``s naming the
key (dotted for nested tables, e.g. ``multicast.port``), the source and what is
allowed. Relative paths in a config file (``members = {path = ...}``,
``secret_file``, ``[tls]``) are relative to that file's folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .address import (  # noqa: F401 - re-exported: config is where callers have found them
    _ADDRESS_FORMS,
    DEFAULT_PORT,
    _describe,
    _host_problem,
    _ipv4_pattern_ranges,
    _is_ip,
    _is_ipv6,
    format_address,
    is_loopback,
    parse_address,
    trusted_interface_matches,
)
from .errors import ConfigError, SecurityError

log = logging.getLogger("grid.config")

JOIN_METHODS = ("multicast", "tcp", "aws")
CONFIG_FILE_NAME = "grid.toml"
GRID_ENV = "GRID"
SECRET_ENV = "GRID_SECRET"
ENV_SOURCE = "GRID environment variable"
MAX_ID_LENGTH = 255

_GRID_FORMS = (
    "accepted forms: a join method (multicast, tcp or aws), a path to a config file "
    "(.toml or .json), or inline JSON starting with '{' "
    """(e.g. GRID='{"join": "tcp", "members": ["10.0.0.3"]}')"""
)
_SECRET_HOWTO = (
    'set a cluster secret with `secret = "..."` in grid.toml, the GRID_SECRET '
    'environment variable, or `secret_file = "/path/to/file"`'
)


@dataclass
class MulticastConfig:
    group: str = "224.2.2.3"
    port: int = 54327
    ttl: int = 32
    timeout_seconds: float = 2.0
    trusted_interfaces: list[str] = field(default_factory=list)


@dataclass
class AwsConfig:
    region: str | None = None
    tag_key: str | None = None
    tag_value: str | None = None
    security_group_name: str | None = None
    endpoint_url: str | None = None


@dataclass
class TlsConfig:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


@dataclass
class MembersPath:
    """``members = {path = P}``: a registry folder (P is a directory) or a members file."""

    path: str


@dataclass
class Config:
    id: str = "dev"
    join: str = "multicast"
    members: list[str] | MembersPath | None = None
    required: str | None = None
    register_on_join: bool = True
    port: int = DEFAULT_PORT
    interface: str | None = None
    secret: str | None = field(default=None, repr=False)  # kept out of logs and tracebacks
    secret_file: str | None = None
    insecure: bool = False
    multicast: MulticastConfig = field(default_factory=MulticastConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    tls: TlsConfig | None = None
    heartbeat_interval: float = 1.0
    failure_timeout: float = 10.0
    join_timeout: float = 2.0
    handshake_timeout: float = 5.0
    backup_count: int = 1
    partitions: int = 271
    workers: int | None = None
    allow_code: bool = True
    imports: list[str] = field(default_factory=list)  # modules a member imports before it joins (services)
    # Where this config came from; not a setting, so two equal settings compare equal.
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        self._normalize(self._error_source())
        _validate(self, self._error_source())

    # -- building

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<dict>", *,
                     base_dir: str | os.PathLike | None = None) -> Config:
        """Build and validate a Config from a dict (a parsed TOML or JSON document).

        Args:
            data: the settings; ``multicast``, ``aws`` and ``tls`` are nested dicts;
                ``members`` is a list of addresses or ``{"path": P}`` (``members_path = P``
                is accepted as a shorthand).
            source: where ``data`` came from, named in errors and kept in ``source``.
            base_dir: folder that relative paths are relative to (a config file's folder).

        Returns:
            The validated Config.

        Raises:
            ConfigError: an unknown key, a wrong type or a value that is not allowed.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table of settings, got {_describe(data)}", source=source)
        _reject_unknown_keys(data, _TOP_LEVEL_KEYS, "", source)
        base = os.fspath(base_dir) if base_dir is not None else None
        settings: dict[str, Any] = {}
        for name, value in data.items():
            if name in ("members", "members_path"):
                continue
            if name in _TABLES and value is not None:
                value = _build_table(_TABLES[name], value, name, source, base)
            elif name == "secret_file":
                value = _resolve_path(value, base)
            settings[name] = value
        if "members" in data or "members_path" in data:
            settings["members"] = _members_from(data, source, base)
        return cls(**settings, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, source: str | None = None) -> Config:
        """Read a config file: TOML for ``.toml``, JSON for ``.json``, else TOML then JSON.

        Args:
            path: the file; ``~`` is expanded.
            source: how to name the file in errors (default: its path).

        Returns:
            The validated Config, with ``source`` naming the file.

        Raises:
            ConfigError: the file is unreadable, does not parse (with line and column
                when known) or holds an invalid setting.
        """
        file = Path(os.path.expanduser(os.fspath(path)))
        label = source or str(file)
        try:
            raw = file.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError("the config file does not exist; check the path", source=label) from exc
        except OSError as exc:
            raise ConfigError(f"cannot read the config file: {exc.strerror or exc}; check that it is a "
                              "readable file", source=label) from exc
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"the file is not UTF-8 text (bad byte at offset {exc.start}); save it as "
                              "UTF-8", source=label) from exc
        data = _parse_document(text, file.suffix.lower(), label)
        return cls.from_mapping(data, label, base_dir=os.path.abspath(file.parent))

    def to_mapping(self) -> dict[str, Any]:
        """The settings as a plain dict that ``from_mapping`` turns back into an equal Config.

        None values and ``source`` are left out; the result can be written as TOML or JSON.
        """
        result: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "source" or value is None:
                continue
            if isinstance(value, MembersPath):
                value = {"path": value.path}
            elif dataclasses.is_dataclass(value):
                value = {key: copy.copy(inner) for key, inner in dataclasses.asdict(value).items()
                         if inner is not None}
            elif isinstance(value, list):
                value = list(value)
            result[item.name] = value
        return result

    def replace(self, **changes: Any) -> Config:
        """A validated copy with ``changes`` applied (``source`` is kept unless changed).

        A dict for ``multicast``, ``aws`` or ``tls`` changes only the keys it names
        (``replace(multicast={"port": 5000})`` keeps the group); ``members`` may be
        ``{"path": P}``.

        Raises:
            ConfigError: an unknown field or an invalid value.
        """
        label = f"Config.replace() of the config from {self.source}"
        _reject_unknown_keys(changes, _FIELD_NAMES, "", label)
        new = copy.deepcopy(self)
        for name, value in changes.items():
            current = getattr(new, name)
            if name in _TABLES and isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                _reject_unknown_keys(value, _field_names(_TABLES[name]), name + ".", label)
                value = dataclasses.replace(current, **value)
            setattr(new, name, value)
        new._normalize(label)
        _validate(new, label)
        return new

    def validate(self) -> None:
        """Check every setting again (after a change by assignment).

        Raises:
            ConfigError: naming the first key that is not allowed.
        """
        self._normalize(self._error_source())
        _validate(self, self._error_source())

    # -- using

    def resolved_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The cluster secret: ``secret``, else ``secret_file``'s text, else ``GRID_SECRET``.

        Args:
            environ: the environment to read ``GRID_SECRET`` from (default ``os.environ``).

        Returns:
            The secret, or None when none is configured.

        Raises:
            ConfigError: ``secret_file`` cannot be read or is empty.
        """
        if self.secret:
            return self.secret
        if self.secret_file:
            try:
                text = Path(self.secret_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"cannot read the secret file {self.secret_file}: {why}; make it a "
                                  "readable UTF-8 file holding the secret, or set `secret` or GRID_SECRET "
                                  "instead", key="secret_file", source=self._error_source()) from exc
            if not text:
                raise ConfigError(f"the secret file {self.secret_file} is empty; write the cluster "
                                  "secret into it", key="secret_file", source=self._error_source())
            return text
        environ = os.environ if environ is None else environ
        return environ.get(SECRET_ENV) or None

    def bind_host(self, environ: Mapping[str, str] | None = None) -> str:
        """The interface to bind: ``interface``, else 0.0.0.0 with a secret, else 127.0.0.1.

        Args:
            environ: the environment for ``GRID_SECRET`` (default ``os.environ``).

        Returns:
            The host to bind.

        Raises:
            SecurityError: a non-loopback interface without a secret and without ``insecure``.
            ConfigError: ``secret_file`` cannot be read.
        """
        secret = self.resolved_secret(environ)
        if not self.interface:
            return "0.0.0.0" if secret else "127.0.0.1"
        if secret or self.insecure or is_loopback(self.interface):
            return self.interface
        raise SecurityError(
            f"refusing to bind interface {self.interface!r} (from {self.source}) without a cluster "
            "secret: anyone who can reach it could join the cluster and run code on it. To fix it, "
            f"{_SECRET_HOWTO}; or bind loopback only (interface = \"127.0.0.1\"); or, on a network "
            "you trust completely, set `insecure = true`."
        )

    def effective_workers(self) -> int:
        """``workers``, else the number of CPUs this process may use, else 1."""
        if self.workers:
            return self.workers
        try:
            return len(os.sched_getaffinity(0)) or 1
        except (AttributeError, OSError):
            return os.cpu_count() or 1

    # -- internals

    def _error_source(self) -> str:
        # A Config built in code keeps source="defaults", but its values are not the defaults.
        return "Config(...) arguments" if self.source == "defaults" else self.source

    def _normalize(self, label: str) -> None:
        """Accept dicts for tables, ints for float fields, tuples for lists; expand ``~`` in paths."""
        for name, cls in _TABLES.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _build_table(cls, value, name, label, None))
        if isinstance(self.members, (Mapping, tuple)):
            self.members = _members_from({"members": self.members}, label, None)
        if isinstance(self.members, MembersPath) and isinstance(self.members.path, str):
            self.members = MembersPath(_resolve_path(self.members.path, None))
        for owner, name in _FLOAT_FIELDS:
            target = self.multicast if owner == "multicast" else self
            value = getattr(target, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(target, name, float(value))
        self.secret_file = _resolve_path(self.secret_file, None)
        if isinstance(self.tls, TlsConfig):
            for name in ("cert", "key", "ca"):
                setattr(self.tls, name, _resolve_path(getattr(self.tls, name), None))


_TABLES: dict[str, type] = {"multicast": MulticastConfig, "aws": AwsConfig, "tls": TlsConfig}
_FIELD_NAMES = [item.name for item in dataclasses.fields(Config)]
_TOP_LEVEL_KEYS = [name for name in _FIELD_NAMES if name != "source"] + ["members_path"]
_FLOAT_FIELDS = [("config", "heartbeat_interval"), ("config", "failure_timeout"),
                 ("config", "join_timeout"), ("config", "handshake_timeout"),
                 ("multicast", "timeout_seconds")]


# ---------------------------------------------------------------- from_mapping helpers


def _reject_unknown_keys(data: Mapping, known: list[str], prefix: str, source: str) -> None:
    for key in data:
        if isinstance(key, str) and key in known:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"setting names must be strings, got {_describe(key)}", key=prefix.rstrip(".")
                              or None, source=source)
        hint = ""
        table, dot, inner = key.partition(".")
        if not prefix and dot and table in _TABLES:
            hint = f"; write it as a nested table: {{{table!r}: {{{inner!r}: ...}}}} or [{table}] in TOML."
        elif not prefix and (tables := [name for name, cls in _TABLES.items() if key in _field_names(cls)]):
            hint = f"; did you mean {tables[0]}.{key} (the key {key!r} inside the [{tables[0]}] table)?"
        elif close := (difflib.get_close_matches(key, known, n=1)
                       or [name for name in known if key.startswith(name) or name.startswith(key)]):
            hint = f"; did you mean {prefix + close[0]!r}?"
        where = f"in [{prefix.rstrip('.')}]" if prefix else "at the top level"
        raise ConfigError(f"unknown key{hint or '.'} Allowed keys {where}: {', '.join(known)}",
                          key=prefix + key, source=source)


def _field_names(cls: type) -> list[str]:
    return [item.name for item in dataclasses.fields(cls)]


def _build_table(cls: type, value: Any, name: str, source: str, base_dir: str | None) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a table of settings, got {_describe(value)}", key=name, source=source)
    _reject_unknown_keys(value, _field_names(cls), name + ".", source)
    settings = dict(value)
    if cls is TlsConfig:
        settings = {key: _resolve_path(inner, base_dir) for key, inner in settings.items()}
    if isinstance(settings.get("trusted_interfaces"), (list, tuple)):
        settings["trusted_interfaces"] = list(settings["trusted_interfaces"])
    return cls(**settings)


def _members_from(data: Mapping, source: str, base_dir: str | None) -> Any:
    """``members`` as a list of addresses or a MembersPath (checked later by ``_validate``)."""
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
        raise ConfigError(f"expected a non-empty path string, got {_describe(path)}", key="members.path",
                          source=source)
    return MembersPath(_resolve_path(path, base_dir))


_BOTH_MEMBER_FORMS = (
    "members are found from a list of addresses OR from a path (a registry folder or a members file), "
    "not both; keep one: members = [\"10.0.0.3\", ...] or members = {path = \"/shared/registry/\"}"
)


def _resolve_path(value: Any, base_dir: str | None) -> Any:
    if not isinstance(value, str) or not value:
        return value
    path = os.path.expanduser(value)
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return path


def _parse_document(text: str, suffix: str, label: str) -> Any:
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=label) from exc
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                              source=label) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as toml_exc:
        try:
            return json.loads(text)
        except json.JSONDecodeError as json_exc:
            raise ConfigError(
                f"neither valid TOML ({toml_exc}) nor valid JSON (line {json_exc.lineno}, column "
                f"{json_exc.colno}: {json_exc.msg}); name the file .toml or .json for one precise error",
                source=label) from json_exc


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
            raise self.fail(key, f"expected a string, got {_describe(value, hide=hide)}")
        if not value.strip():
            raise self.fail(key, "the value is empty; give a value or leave the key out")

    def boolean(self, value: Any, key: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_describe(value)}")

    def integer(self, value: Any, key: str, low: int, high: int | None, allowed: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {_describe(value)}; allowed: {allowed}")
        if value < low or (high is not None and value > high):
            raise self.fail(key, f"{value} is out of range; allowed: {allowed}")

    def seconds(self, value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number of seconds, got {_describe(value)}")
        if not (math.isfinite(value) and value > 0):
            raise self.fail(key, f"{value} is not allowed; allowed: a positive number of seconds")

    def host(self, value: Any, key: str) -> None:
        self.string(value, key)
        if not _is_ip(value) and _host_problem(value):
            hint = "; set the port with `port`, not in the interface" if ":" in value else ""
            raise self.fail(key, f"{value!r} is not an IP address or host name; allowed: a host without a "
                                 f"port, e.g. 127.0.0.1, 0.0.0.0, ::1 or myhost.example{hint}")

    def instance(self, value: Any, cls: type, key: str) -> None:
        if not isinstance(value, cls):
            raise self.fail(key, f"expected a table ({cls.__name__}), got {_describe(value)}")


def _validate_imports(imports: Any, check: _Checker) -> None:
    if not isinstance(imports, list):
        raise check.fail("imports", f"expected a list of module names, got {_describe(imports)}; "
                                    "allowed: imports = [\"mymodule\", \"package.module\"]")
    for name in imports:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise check.fail("imports", f"{name!r} is not a module name; allowed: dotted Python names such "
                                        "as \"package.module\"")


def _validate(config: Config, source: str) -> None:
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
        shown = repr(config.join) if isinstance(config.join, str) else _describe(config.join)
        raise check.fail("join", f"{shown} is not a join method; {hint}allowed: "
                                 f"{', '.join(JOIN_METHODS)}")
    _validate_members(config.members, check)
    if config.required is not None:
        check.string(config.required, "required")
        parse_address(config.required, key="required", source=source)
    for name in ("register_on_join", "insecure", "allow_code"):
        check.boolean(getattr(config, name), name)
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
    check.integer(config.backup_count, "backup_count", 0, None, "an integer >= 0")
    check.integer(config.partitions, "partitions", 1, None, "an integer >= 1")
    if config.workers is not None:
        check.integer(config.workers, "workers", 1, None, "an integer >= 1, or leave it out for one per CPU")
    if not isinstance(config.source, str):
        raise check.fail("source", f"expected a string naming where the config came from, got "
                                   f"{_describe(config.source)}")


def _validate_members(members: Any, check: _Checker) -> None:
    if members is None:
        return
    if isinstance(members, MembersPath):
        check.string(members.path, "members.path")
        return
    if not isinstance(members, list):
        raise check.fail("members", f"expected a list of addresses or a table {{path = ...}}, got "
                                    f"{_describe(members)}")
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
                                                         f"{_describe(multicast.trusted_interfaces)}")
    for pattern in multicast.trusted_interfaces:
        check.string(pattern, "multicast.trusted_interfaces")
        if not _is_trusted_pattern(pattern):
            raise check.fail("multicast.trusted_interfaces", f"{pattern!r} is not allowed; allowed: an IP "
                             "address, a network like 10.0.0.0/8, or an IPv4 pattern like 10.0.1.* or "
                             "192.168.1.100-110")


def _is_trusted_pattern(pattern: str) -> bool:
    if "/" in pattern:
        try:
            ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
        return True
    return _is_ip(pattern) or _ipv4_pattern_ranges(pattern) is not None


def _validate_aws(aws: Any, check: _Checker) -> None:
    check.instance(aws, AwsConfig, "aws")
    for name in _field_names(AwsConfig):
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
    for name in _field_names(TlsConfig):
        check.string(getattr(tls, name), f"tls.{name}", optional=True)
    if tls.cert is None:
        given = [name for name in ("key", "ca") if getattr(tls, name) is not None]
        what = f"tls.{' and tls.'.join(given)} {'are' if len(given) > 1 else 'is'} set but" if given else \
            "the [tls] table is empty and"
        raise check.fail("tls.cert", f"{what} tls.cert is missing; mutual TLS needs this member's "
                                     "certificate: set tls.cert (and tls.key unless the cert file holds it)")


# ---------------------------------------------------------------- lookup


def load_config(config: Config | Mapping[str, Any] | str | os.PathLike | None = None, *,
                cwd: str | os.PathLike | None = None, home: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Find the configuration; the first place that has one wins (no merging).

    Order: ``config`` -> ``<cwd>/grid.toml`` -> ``<home>/.grid/grid.toml`` -> the ``GRID``
    environment variable -> defaults.

    Args:
        config: a Config (returned as is), a dict, or a path to a config file (a string
            may also be a join method name or inline JSON, as ``GRID`` may).
        cwd: the launch folder (default: the current directory).
        home: the user's home folder (default: ``Path.home()``).
        environ: the environment to read ``GRID`` from (default: ``os.environ``).

    Returns:
        The validated Config; its ``source`` says where it came from.

    Raises:
        ConfigError: the chosen source is unreadable, malformed or invalid.
    """
    folder = Path(cwd) if cwd is not None else Path.cwd()
    if config is not None:
        return _config_from_argument(config, folder, home)
    candidates = [folder / CONFIG_FILE_NAME]
    home_folder = _home(home)
    if home_folder is not None:
        candidates.append(home_folder / ".grid" / CONFIG_FILE_NAME)
    for candidate in candidates:
        if candidate.exists():
            log.debug("config from %s", candidate)
            return Config.from_file(candidate)
    environ = os.environ if environ is None else environ
    text = environ.get(GRID_ENV, "").strip()
    if text:
        log.debug("config from the %s variable", GRID_ENV)
        return _config_from_text(text, ENV_SOURCE, folder, home)
    log.debug("no config file and no %s variable: using defaults", GRID_ENV)
    return Config()


def _home(home: str | os.PathLike | None) -> Path | None:
    if home is not None:
        return Path(home)
    try:
        return Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def _config_from_argument(config: Any, folder: Path, home: Any) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return Config.from_mapping(config, "<dict>")
    if isinstance(config, str):
        return _config_from_text(config, "config argument", folder, home)
    if isinstance(config, os.PathLike):
        return Config.from_file(_locate(os.fspath(config), folder, home))
    raise ConfigError(f"expected a Config, a dict or a path to a config file, got {_describe(config)}",
                      source="config argument")


def _config_from_text(text: str, origin: str, folder: Path, home: Any) -> Config:
    """Read ``GRID`` (or a string argument): a join method, inline JSON or a file path."""
    value = text.strip()
    if value.lower() in JOIN_METHODS:
        return Config(join=value.lower(), source=origin)
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{value[:40]!r} starts with '{{' but is not valid JSON (column {exc.colno}: "
                              f"{exc.msg}); {_GRID_FORMS}", source=origin) from exc
        return Config.from_mapping(data, origin, base_dir=folder)
    path = _locate(value, folder, home)
    if path.exists():
        return Config.from_file(path, source=f"{path} (named by the {origin})")
    if os.sep in value or "/" in value or value.startswith(("~", ".")) or path.suffix in (".toml", ".json"):
        raise ConfigError(f"names the config file {path}, which does not exist; {_GRID_FORMS}", source=origin)
    close = difflib.get_close_matches(value.lower(), JOIN_METHODS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{value[:40]!r} is not a join method, an existing config file or inline JSON; "
                      f"{hint}{_GRID_FORMS}", source=origin)


def _locate(text: str, folder: Path, home: Any) -> Path:
    if text == "~" or text.startswith("~/"):
        home_folder = _home(home)
        if home_folder is not None:
            text = str(home_folder / text[2:])
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else folder / path
