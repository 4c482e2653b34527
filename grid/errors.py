"""The whole exception hierarchy of grid.

Every error grid raises on purpose is a ``GridError``. A message says what
happened, why, and what to do next.
"""

from __future__ import annotations

import concurrent.futures


class GridError(Exception):
    """Root of every error grid raises on purpose."""


class ConfigError(GridError, ValueError):
    """The configuration is invalid: names the key, the source and what is allowed."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        parts = []
        if key is not None:
            parts.append(f"config key {key!r}")
        if source is not None:
            parts.append(f"in {source}")
        prefix = (" ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + message)


class ProtocolError(GridError):
    """A peer sent bytes that are not grid's protocol (bad magic, oversize, garbage)."""


class HandshakeError(GridError):
    """Authentication failed: wrong secret, other cluster id, timeout, or a bad message."""


class TransportError(GridError, ConnectionError):
    """A connection could not be made or was lost."""


class ConnectionClosed(TransportError):
    """The connection is closed; ``by_peer`` says whether the other side or we closed it."""

    def __init__(self, message: str, *, by_peer: bool = True):
        self.by_peer = by_peer
        super().__init__(message)


class JoinError(GridError):
    """This member could not join or form a cluster (say which member was required, and why)."""


class DiscoveryError(GridError):
    """A discovery method failed in a way the user must fix (unreadable registry, bad AWS setup)."""


class SecurityError(GridError):
    """An operation is refused for safety (e.g. binding a public interface without a secret)."""


class NotConnected(GridError):
    """The cluster handle is closed or has no member to talk to."""


class RemoteError(GridError):
    """An operation failed on a remote member; the remote traceback is the ``__cause__``."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process; attached as its ``__cause__``."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class BrokenGrid(GridError, concurrent.futures.BrokenExecutor):
    """The executor can no longer run work (its cluster is gone)."""


class WorkerCrashed(BrokenGrid):
    """A task killed every member it ran on: names the task, exit code or signal and last log lines."""


class CodeNotAllowed(GridError, PermissionError):
    """The member refuses cluster-wide code because it runs with ``allow_code = false``."""


class SomeMembersFailed(GridError):
    """A cluster-wide call failed on some members; the others' results are kept.

    ``results`` maps each member that succeeded to its result; ``errors`` maps each
    member that failed to its exception (the remote traceback is its ``__cause__``).
    """

    def __init__(self, message: str, *, results: dict, errors: dict):
        self.results = results
        self.errors = errors
        super().__init__(message)


class ServiceNotFound(GridError, LookupError):
    """No member offers the named service; the message lists the names that exist."""
