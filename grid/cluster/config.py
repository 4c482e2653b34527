"""Configuration: the ``Config`` dataclass, reading it from a file, and where it is looked up.

Lookup order (first found wins, no merging): explicit argument -> ``./grid.toml``
-> ``~/.grid/grid.toml`` -> the ``GRID`` environment variable (a join method
name, a path to a config file, or inline JSON) -> defaults.

A ``Config`` is validated whenever it is built (``__post_init__``), so every
instance in the program is a valid one. Errors are ``ConfigError``s naming the
key (dotted for nested tables, e.g. ``multicast.port``), the source and what is
allowed. Relative paths in a config file (``members = {path = ...}``,
``secret_file``, ``[tls]``) are relative to that file's folder.

The config is three files: this one (the ``Config`` dataclass, files and lookup);
``config_tables``, the nested tables (``MulticastConfig``, ``AwsConfig``, ``TlsConfig``,
``MembersPath``); and ``config_check``, the rules (``JOIN_METHODS``, ``MAX_ID_LENGTH``)
and the building of tables from dicts. Callers import each name from the file that
defines it, and addresses (``parse_address``, ``DEFAULT_PORT``, ...) from ``grid.net.address``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SecurityError
from ..net.address import DEFAULT_PORT, describe_value, is_loopback
from ..net.wire import DEFAULT_MAX_PAYLOAD
from .config_check import (
    JOIN_METHODS,
    build_table,
    members_from,
    reject_unknown_keys,
    resolve_path,
    validate_config,
)
from .config_tables import (
    NESTED_TABLES,
    AwsConfig,
    MembersPath,
    MulticastConfig,
    TlsConfig,
    table_keys,
)

log = logging.getLogger("grid.config")

CONFIG_FILE_NAME = "grid.toml"
GRID_ENV = "GRID"
SECRET_ENV = "GRID_SECRET"
ENV_SOURCE = "GRID environment variable"

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
    max_frame_bytes: int = DEFAULT_MAX_PAYLOAD  # largest frame a link takes after the handshake (512 MiB)
    backup_count: int = 1
    partitions: int = 271
    workers: int | None = None
    task_processes: int = 0  # run tasks in this many child processes of the member (0: in its threads)
    allow_code: bool = True
    data: bool = True  # false: a lite member, which computes but holds no partitions of the data
    split_brain_protection: int = 0  # N > 0: writes fail on a side of fewer than N members
    merge_policy: str = "put_if_absent"  # after a split heals, how the smaller side's data joins: or "latest_update"
    dashboard: bool = False  # true: the member serves the dashboard (python -m grid dashboard) itself
    dashboard_port: int = 8701  # ... on this port of its interface (0: any free one)
    imports: list[str] = field(default_factory=list)  # modules a member imports before it joins (services)
    # Where this config came from; not a setting, so two equal settings compare equal.
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        self._normalize(self._error_source())
        validate_config(self, self._error_source())

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
            raise ConfigError(f"expected a table of settings, got {describe_value(data)}", source=source)
        reject_unknown_keys(data, _TOP_LEVEL_KEYS, "", source)
        base = os.fspath(base_dir) if base_dir is not None else None
        settings: dict[str, Any] = {}
        for name, value in data.items():
            if name in ("members", "members_path"):
                continue
            if name in NESTED_TABLES and value is not None:
                value = build_table(NESTED_TABLES[name], value, name, source, base)
            elif name == "secret_file":
                value = resolve_path(value, base)
            settings[name] = value
        if "members" in data or "members_path" in data:
            settings["members"] = members_from(data, source, base)
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
        ``{"path": P}``. A new ``source`` (e.g. "the flag --port 99999") is what
        errors name, as a file's path is for a file.

        Raises:
            ConfigError: an unknown field or an invalid value.
        """
        given_source = changes.get("source")
        label = given_source if isinstance(given_source, str) else f"Config.replace() of the config from {self.source}"
        reject_unknown_keys(changes, _FIELD_NAMES, "", label)
        new = copy.deepcopy(self)
        for name, value in changes.items():
            current = getattr(new, name)
            if name in NESTED_TABLES and isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                reject_unknown_keys(value, table_keys(NESTED_TABLES[name]), name + ".", label)
                value = dataclasses.replace(current, **value)
            setattr(new, name, value)
        new._normalize(label)
        validate_config(new, label)
        return new

    def validate(self) -> None:
        """Check every setting again (after a change by assignment).

        Raises:
            ConfigError: naming the first key that is not allowed.
        """
        self._normalize(self._error_source())
        validate_config(self, self._error_source())

    # -- using

    def resolved_secret(self, environ: Mapping[str, str] | None = None, *, owner_only: bool = True) -> str | None:
        """The cluster secret: ``secret``, else ``secret_file``'s text, else ``GRID_SECRET``.

        Args:
            environ: the environment to read ``GRID_SECRET`` from (default ``os.environ``).
            owner_only: refuse a ``secret_file`` that group or others may access, as ssh
                refuses a loose key file: whether it is named in a config file, by a flag or
                in code (False only to read one regardless, e.g. to say what it holds).

        Returns:
            The secret, or None when none is configured.

        Raises:
            ConfigError: ``secret_file`` cannot be read or is empty (or, with ``owner_only``,
                is open to group or others).
        """
        if self.secret:
            return self.secret
        if self.secret_file:
            if owner_only:
                self._check_owner_only(self.secret_file)
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

    def _check_owner_only(self, path: str) -> None:
        """Raise a ConfigError if group or others may access the file at ``path`` (a missing file is
        left to the read that follows, which says so)."""
        if os.name != "posix":  # no owner/group/other mode bits to go by
            return
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return
        if mode & 0o077:
            raise ConfigError(f"the secret file {path} is open to group or others (mode {mode:04o}): whoever "
                              "can read it can join the cluster and run code on its members; make it yours "
                              f"only with `chmod 600 {path}`", key="secret_file", source=self._error_source())

    def _error_source(self) -> str:
        # A Config built in code keeps source="defaults", but its values are not the defaults.
        return "Config(...) arguments" if self.source == "defaults" else self.source

    def _normalize(self, label: str) -> None:
        """Accept dicts for tables, ints for float fields, tuples for lists; expand ``~`` in paths."""
        for name, cls in NESTED_TABLES.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, build_table(cls, value, name, label, None))
        if isinstance(self.members, (Mapping, tuple)):
            self.members = members_from({"members": self.members}, label, None)
        if isinstance(self.members, MembersPath) and isinstance(self.members.path, str):
            self.members = MembersPath(resolve_path(self.members.path, None))
        for owner, name in _FLOAT_FIELDS:
            target = self.multicast if owner == "multicast" else self
            value = getattr(target, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(target, name, float(value))
        self.secret_file = resolve_path(self.secret_file, None)
        if isinstance(self.tls, TlsConfig):
            for name in ("cert", "key", "ca"):
                setattr(self.tls, name, resolve_path(getattr(self.tls, name), None))


_FIELD_NAMES = [item.name for item in dataclasses.fields(Config)]
_TOP_LEVEL_KEYS = [name for name in _FIELD_NAMES if name != "source"] + ["members_path"]
_FLOAT_FIELDS = [("config", "heartbeat_interval"), ("config", "failure_timeout"),
                 ("config", "join_timeout"), ("config", "handshake_timeout"),
                 ("multicast", "timeout_seconds")]



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
    raise ConfigError(f"expected a Config, a dict or a path to a config file, got {describe_value(config)}",
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
