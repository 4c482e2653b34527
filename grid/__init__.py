"""grid: a pure-Python peer-to-peer compute and data grid.

    import grid
    with grid.GridExecutor() as executor:        # no cluster configured: an embedded local one
        print(list(executor.map(lambda x: x * x, range(10))))
    with grid.connect() as cluster:              # or grid.cluster(), the process-wide default
        print(cluster.members())
        cluster.exec_all("def worker(x): return x + 1")   # on every member, and on later joiners
"""

from .client import (
                     Cluster,
                     GridExecutor,
                     cluster,
                     connect,
                     default_executor,
                     deploy,
                     eval_all,
                     exec_all,
                     fmap,
                     freduce,
                     load_all,
                     run_all,
                     ufmap,
)
from .cluster.config import Config, load_config
from .cluster.members import Member, MembershipEvent
from .cluster.partitions import PartitionTable, partition_of
from .code.patches import Patch
from .compute.services import service
from .compute.worker import current_member
from .data.events import EntryEvent
from .data.remote import DataUnavailable
from .data.store import SplitBrainProtection, StaleToken
from .data.sync import FencingToken, LockLost
from .errors import (
                     BrokenGrid,
                     CodeNotAllowed,
                     GridError,
                     RemoteError,
                     ServiceNotFound,
                     SomeMembersFailed,
                     WorkerCrashed,
)
from .peer import Peer
from . import aggregators  # noqa: E402 - grid.aggregators.count() and the rest
from . import jobs  # noqa: E402 - grid.jobs: the legacy job queue

__all__ = [
    "BrokenGrid", "Cluster", "CodeNotAllowed", "Config", "DataUnavailable", "EntryEvent", "FencingToken", "GridError", "GridExecutor", "LockLost", "Member", "MembershipEvent",
    "PartitionTable", "Patch", "Peer", "RemoteError", "ServiceNotFound", "SomeMembersFailed", "SplitBrainProtection", "StaleToken",
    "WorkerCrashed",
    "aggregators", "cluster", "connect", "jobs",
    "current_member", "default_executor", "deploy", "eval_all", "exec_all", "fmap", "freduce", "load_all", "load_config",
    "partition_of", "run_all", "service", "ufmap",
]
__version__ = "0.1.0"
