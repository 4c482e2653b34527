"""Who is in the cluster: the ``config`` (with its tables and checks), ``discovery`` of
``candidates`` (``multicast`` among the strategies), the ``members`` list and ``membership``
(the join search in ``joining``).

Built on ``grid.net``; knows nothing of tasks, code or data.
"""
