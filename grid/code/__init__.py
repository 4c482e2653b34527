"""Cluster-wide code: the replicated patch log (``livecode``), what a patch is (``patches``) and
the member's remote console (``console``).

Built on ``grid.cluster`` and ``grid.net``; independent of ``grid.compute``.
"""
