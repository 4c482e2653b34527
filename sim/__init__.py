"""sim: the local multi-peer simulator for grid.

Starts N member processes (``python -m grid peer``) on loopback with a fresh
cluster id, secret and temp dir, waits for their ready lines, and breaks them on
purpose: kill, pause/resume, stop, add. See ``LocalCluster``; ``python -m sim up N``
keeps one running for a REPL; ``sim.fixtures`` is a pytest plugin.
"""

from .cluster import JOIN_METHODS, LocalCluster
from .process import PeerProcess, SimError, wait_until

__all__ = ["JOIN_METHODS", "LocalCluster", "PeerProcess", "SimError", "wait_until"]
