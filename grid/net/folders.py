"""Private temp folders that a process owns, and the sweep of those a killed owner left behind.

An embedded cluster's folder (configs, logs) and a member's Unix-socket folder are
removed by ``close()``; an owner killed with SIGKILL cannot. Each folder holds an
``owner`` file with its creator's pid, and making a new folder of the same kind
first removes the ones whose owner is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

log = logging.getLogger("grid.folders")

_OWNER_FILE = "owner"


def private_folder(prefix: str) -> str:
    """A new folder ``<tmp>/<prefix>XXXX`` (mode 0700) owned by this process; old abandoned ones go first."""
    sweep_abandoned(prefix)
    folder = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(folder, _OWNER_FILE), "w", encoding="ascii") as owner:
        owner.write(str(os.getpid()))
    return folder


def sweep_abandoned(prefix: str, *, directory: str | None = None) -> list[str]:
    """Remove the folders named ``prefix*`` in ``directory`` whose owning process is gone; returns them.

    A folder without an owner file is left alone: it is being made right now, or an
    older grid made it and may still use it.
    """
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        names = [name for name in os.listdir(directory) if name.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(directory, name)
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d folders left by processes that were killed: %s", len(removed), ", ".join(removed))
    return removed


def _abandoned(folder: str) -> bool:
    try:
        if not os.path.isdir(folder) or os.lstat(folder).st_uid != os.getuid():
            return False  # not ours to judge
        with open(os.path.join(folder, _OWNER_FILE), encoding="ascii") as owner:
            pid = int(owner.read().strip())
    except (OSError, ValueError):
        return False
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
