"""Running work: the executor side (``executor``, ``dispatch``, ``mapping``, ``embedded``) and the
member's task runner (``worker``, ``services``), which speak the task ``protocol``.

Built on ``grid.cluster`` and ``grid.net``; independent of ``grid.code``.
"""
