"""Turning Python objects into payloads and back (pickle protocol 5).

Only ever called on authenticated connections: nothing is unpickled before
the handshake has succeeded.
"""

from __future__ import annotations

import pickle

PROTOCOL = 5


def dumps(obj) -> bytes:
    """Pickle ``obj`` for the wire."""
    return pickle.dumps(obj, protocol=PROTOCOL)


def loads(data):
    """Unpickle a payload received on an authenticated connection."""
    return pickle.loads(data)
