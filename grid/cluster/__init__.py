"""Who is in the cluster: the ``config``, ``discovery`` of candidates (``multicast`` among them),
the ``members`` list and ``membership`` (the join search in ``joining``).

Built on ``grid.net``; knows nothing of tasks, code or data.
"""
