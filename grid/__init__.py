"""grid: a pure-Python peer-to-peer compute and data grid.

    import grid
    with grid.GridExecutor() as executor:        # no cluster configured: an embedded local one
        print(list(executor.map(lambda x: x * x, range(10))))
    with grid.connect() as cluster:              # or grid.cluster(), the process-wide default
        print(cluster.members())
"""

from .client import Cluster, cluster, connect
from .config import Config, load_config
from .errors import BrokenGrid, GridError, RemoteError, WorkerCrashed
from .executor import GridExecutor, fmap, ufmap
from .membership import Member, MembershipEvent
from .peer import Peer
from .worker import current_member

__all__ = [
    "BrokenGrid", "Cluster", "Config", "GridError", "GridExecutor", "Member", "MembershipEvent", "Peer",
    "RemoteError", "WorkerCrashed", "cluster", "connect", "current_member", "fmap", "load_config", "ufmap",
]
__version__ = "0.1.0"
