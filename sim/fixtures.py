"""pytest plugin: the ``local_cluster`` fixture.

Enable it with ``pytest_plugins = ["sim.fixtures"]`` in the root conftest.py
(or ``-p sim.fixtures``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

from .cluster import LocalCluster


@pytest.fixture
def local_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """A factory ``local_cluster(n=3, join="tcp", **kwargs) -> LocalCluster``.

    Each call starts a LocalCluster (keyword arguments as for ``LocalCluster``:
    ``command``, ``startup_timeout``, ``seed`` and config keys); every cluster it
    started is terminated at teardown, even when the test failed.
    """
    started: list[LocalCluster] = []

    def start(n: int = 3, join: str = "tcp", **kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(n, join, **kwargs)
        started.append(cluster)
        return cluster

    yield start
    errors = []
    for cluster in started:
        try:
            cluster.terminate()
        except Exception as error:  # terminate the rest before reporting
            errors.append(error)
    if errors:
        raise errors[0]
