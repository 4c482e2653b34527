"""Distributed data: partition replicas on the members (``store``), and, to come, their replication,
migration and the structures on them (map, queue, counter).

Built on ``grid.cluster`` (the partition table) and ``grid.net``; independent of ``grid.compute``
and ``grid.code``.
"""
