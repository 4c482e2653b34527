"""grid: a pure-Python peer-to-peer compute and data grid.

    import grid
    with grid.connect() as cluster:      # or grid.cluster(), the process-wide default
        print(cluster.members())
"""

from .client import Cluster, cluster, connect
from .config import Config, load_config
from .errors import GridError
from .membership import Member, MembershipEvent
from .peer import Peer

__all__ = ["Cluster", "Config", "GridError", "Member", "MembershipEvent", "Peer", "cluster", "connect", "load_config"]
__version__ = "0.1.0"
