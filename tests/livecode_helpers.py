"""Task functions for tests/test_livecode.py, importable by name on every member.

Members find this module through ``tests`` on their PYTHONPATH (the simulator puts
the checkout there), so these functions travel by reference.
"""

from __future__ import annotations

import importlib.util
import sys

import grid


def whoami(*args, **kwargs) -> tuple:
    """The uuid of the member running this, with the arguments it got."""
    return grid.current_member().uuid, args, kwargs


def can_import(name: str) -> bool:
    """Whether ``name`` (a top-level module) is importable on the member running this."""
    return name in sys.modules or importlib.util.find_spec(name) is not None


def loaded(names) -> list:
    """Which of ``names`` are in ``sys.modules`` on the member running this."""
    return sorted(name for name in names if name in sys.modules)


def fail_on(uuid: str) -> str:
    """Raises LookupError on the member ``uuid``; elsewhere returns the member's uuid."""
    me = grid.current_member().uuid
    if me == uuid:
        raise LookupError(f"failing on purpose on member {uuid}")
    return me
