"""Member addresses: parsing, formatting, loopback and trusted-interface checks.

Pure functions on strings; ``config`` validates with them (and words its errors
with ``describe_value``) and every other module formats and compares addresses
with them.
"""

from __future__ import annotations

import ipaddress
import re

from ..errors import ConfigError

DEFAULT_PORT = 5701

_ADDRESS_FORMS = (
    "host, host:port, IPv6 or [IPv6]:port with port 0..65535 "
    "(e.g. 10.0.0.3, 10.0.0.8:5702, host.example:80, [::1]:5701)"
)
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def parse_address(
    text: str, default_port: int = DEFAULT_PORT, *, key: str = "members", source: str | None = None
) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``IPv6`` or ``[IPv6]:port`` into ``(host, port)``.

    Args:
        text: the address as written by the user.
        default_port: the port when ``text`` names none.
        key: the config key named in an error.
        source: where the text came from (a file path, ...), named in an error.

    Returns:
        ``(host, port)``; an IPv6 host is returned without brackets.

    Raises:
        ConfigError: ``text`` is not an address (empty, whitespace, bad port, bad host).
    """

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{text!r} is not an address: {why}; write {_ADDRESS_FORMS}", key=key, source=source)

    if not isinstance(text, str):
        raise ConfigError(f"expected an address string, got {describe_value(text)}; write {_ADDRESS_FORMS}",
                          key=key, source=source)
    if not text:
        raise fail("it is empty")
    if any(char.isspace() for char in text):
        raise fail("it contains whitespace")
    if text.startswith("["):
        host, closing, rest = text[1:].partition("]")
        if not closing:
            raise fail("'[' has no closing ']'")
        if not _is_ipv6(host):
            raise fail(f"{host!r} inside brackets is not an IPv6 address")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise fail("only ':port' may follow ']'")
        return host, _parse_port(rest[1:], fail)
    if text.count(":") > 1:
        if not _is_ipv6(text):
            raise fail("it has several ':' but is not an IPv6 address (to add a port to IPv6, "
                       "use brackets: [::1]:5701)")
        return text, default_port
    host, colon, port_text = text.partition(":")
    if not host:
        raise fail("the host is missing")
    problem = _host_problem(host)
    if problem:
        raise fail(problem)
    return host, (_parse_port(port_text, fail) if colon else default_port)


def format_address(address: tuple[str, int]) -> str:
    """Write ``(host, port)`` as ``host:port``, or ``[host]:port`` for IPv6."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_remote(remote: tuple | str) -> str:
    """A connection's other end, for log and error messages.

    Args:
        remote: a socket's peer address: ``(host, port, ...)`` for TCP, or a Unix socket's
            path (``""`` for the unnamed end of an accepted Unix connection).

    Returns:
        ``"host:port"`` (an IPv6 host without brackets, as the socket reports it), the
        path, or ``"a local Unix socket"`` when the path is empty.
    """
    if isinstance(remote, str):
        return remote or "a local Unix socket"
    return f"{remote[0]}:{remote[1]}"


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (also IPv4-mapped), else False."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def trusted_interface_matches(pattern: str, address: str) -> bool:
    """Whether ``address`` (an IP) matches a ``multicast.trusted_interfaces`` entry.

    Args:
        pattern: an IP address, a network (``10.0.0.0/8``) or an IPv4 pattern whose
            parts may be ``*`` or a range (``10.0.1.*``, ``192.168.1.100-110``).
        address: the IP address of a candidate member.

    Returns:
        True when the address matches; False otherwise or when ``address`` is no IP.
    """
    try:
        ip = ipaddress.ip_address(address)
        if "/" in pattern:
            return ip in ipaddress.ip_network(pattern, strict=False)
        if _is_ip(pattern):
            return ip == ipaddress.ip_address(pattern)
    except ValueError:
        return False
    ranges = _ipv4_pattern_ranges(pattern)
    if ranges is None or ip.version != 4:
        return False
    return all(low <= int(part) <= high for (low, high), part in zip(ranges, str(ip).split(".")))


def is_trusted_interface_pattern(pattern: str) -> bool:
    """Whether ``pattern`` may be a ``multicast.trusted_interfaces`` entry: an IP, a network or an IPv4 pattern."""
    if "/" in pattern:
        try:
            ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
        return True
    return _is_ip(pattern) or _ipv4_pattern_ranges(pattern) is not None


def is_valid_host(text: str) -> bool:
    """Whether ``text`` is an IP address (IPv4 or IPv6) or a valid host name, without a port."""
    return _is_ip(text) or _host_problem(text) is None


def _parse_port(text: str, fail) -> int:
    if not text:
        raise fail("the port after ':' is missing")
    if not (text.isascii() and text.isdigit()):
        raise fail(f"the port {text!r} is not a whole number")
    port = int(text)
    if port > 65535:
        raise fail(f"the port {port} is out of range")
    if port == 0:  # the OS picks a free port when binding; nothing can be reached at port 0
        raise fail("port 0 cannot be connected to (it means 'any free port' when listening, which is "
                   "`port = 0`); give the member's real port, 1 to 65535")
    return port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IPv4 address nor a host name, or None if it is fine."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not a valid IPv4 address"
        return None
    if not _HOSTNAME.fullmatch(host):
        return f"{host!r} is not a valid host name"
    return None


def _ipv4_pattern_ranges(pattern: str) -> list[tuple[int, int]] | None:
    parts = pattern.split(".")
    if len(parts) != 4:
        return None
    ranges = []
    for part in parts:
        bounds = ["0", "255"] if part == "*" else part.split("-")
        if len(bounds) > 2 or not all(bound.isascii() and bound.isdigit() for bound in bounds):
            return None
        low, high = int(bounds[0]), int(bounds[-1])
        if not 0 <= low <= high <= 255:
            return None
        ranges.append((low, high))
    return ranges


def describe_value(value, *, hide: bool = False) -> str:
    """A value for an error message: its kind, and (unless hidden) its repr, cut short."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a table", type(None): "nothing (null)"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    if hide or value is None:
        return kind
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"
