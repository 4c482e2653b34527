"""The nested tables of a Config: ``[multicast]``, ``[aws]``, ``[tls]``, and ``members = {path = P}``.

Plain dataclasses with their defaults, and no rules: ``config_check`` builds them
from dicts and validates them; ``config.Config`` holds them. ``NESTED_TABLES`` and
``table_keys`` say which tables a Config has and which keys each accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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


# Config field name -> the dataclass of that nested table.
NESTED_TABLES: dict[str, type] = {"multicast": MulticastConfig, "aws": AwsConfig, "tls": TlsConfig}


def table_keys(table: type) -> list[str]:
    """The keys a nested table accepts: the field names of its dataclass, in order."""
    return [item.name for item in dataclasses.fields(table)]
