"""The lock and semaphore kinds of the store: leases held by sessions, as data without IO.

::

    Lock / Semaphore --Op(LOCK | SEMAPHORE, name, action, args)--> Replica.execute(op, now)
    lock:       {"holder": (session, thread) or None, "count": n, "token": t, "expires": wall time}
    semaphore:  {"permits": p, "held": {session: (count, expires)}}
    a write's one effect: ("lock_state", state) or ("semaphore_state", state), the whole new state

A session is one cluster handle (a client's, or a member's own); it renews the leases of what it
holds every third of a lease (``grid.data.sync``). A holder that dies, pauses or is cut off stops
renewing: once its lease runs out (by the owner's wall clock, as a map entry's ttl) the lock is free
and the permits are back. Each acquisition of a lock gets a fencing token: the stamp of its write,
``table version << 40 | seq``, so tokens only grow, through failovers (a new owner's table is newer)
and a destroyed lock made again (the partition's seq goes on): a paused ex-holder's token is older
than its successor's, and a structure that was written with the newer one refuses the older.
"""

from __future__ import annotations

LOCK, SEMAPHORE = "lock", "semaphore"

READS = {
    LOCK: {"state"},
    SEMAPHORE: {"available", "permits"},
}
WRITES = {
    LOCK: {"acquire", "release", "renew", "end_session", "destroy"},
    SEMAPHORE: {"init", "acquire", "release", "renew", "end_session", "destroy"},
}


class Refused(Exception):
    """An op refused as Python's lock or semaphore refuses it: the caller raises ``error`` with this message."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


def size(kind: str, value) -> int:
    """A lock: 1 while held; a semaphore: the permits held."""
    if kind == LOCK:
        return 1 if value["holder"] is not None else 0
    return sum(count for count, _ in value["held"].values())


def copy(kind: str, value):
    return dict(value, held=dict(value["held"])) if kind == SEMAPHORE else dict(value)


def _lock(value) -> dict:
    return value if value is not None else {"holder": None, "count": 0, "token": 0, "expires": 0.0}


def _held(state: dict, now: float):
    """The lock's holder, or None if it is free or its lease ran out."""
    return state["holder"] if state["holder"] is not None and now < state["expires"] else None


def _semaphore(value) -> dict:
    return value if value is not None else {"permits": 0, "held": {}}


def _live(state: dict, now: float) -> dict:
    """``{session: (count, expires)}`` of the holds whose lease has not run out."""
    return {session: hold for session, hold in state["held"].items() if now < hold[1]}


# -- reads -----------------------------------------------------------------------------------------------


def read(kind: str, value, action: str, args: tuple, now: float):
    if kind == LOCK:
        state = _lock(value)
        holder = _held(state, now)
        return (holder, state["count"] if holder else 0, state["token"],
                max(0.0, state["expires"] - now) if holder else 0.0)
    state = _semaphore(value)
    if action == "permits":
        return state["permits"]
    return state["permits"] - sum(count for count, _ in _live(state, now).values())  # available


# -- writes: (result, effects) ---------------------------------------------------------------------------


def write(kind: str, name: str, value, action: str, args: tuple, stamp: tuple, now: float) -> tuple:
    """A write's ``(result, effects)``; ``stamp`` is its ``(table version, seq)``, ``now`` the owner's wall clock."""
    if kind == LOCK:
        if action == "acquire":
            return _lock_acquire(name, _lock(value), now, stamp[0] << 40 | stamp[1], *args)
        return _LOCK_WRITES[action](name, _lock(value), now, *args)
    return _SEMAPHORE_WRITES[action](name, _semaphore(value), now, *args)


def _lock_effect(name: str, state: dict) -> list:
    return [(LOCK, name, "lock_state", (state,))]


def _lock_acquire(name, state, now, token, session, thread, lease, reentrant):
    """``(token, 0.0)`` once acquired; ``(0, seconds)`` while another holds it (until its lease ends)."""
    holder = _held(state, now)
    me = (session, thread)
    if holder is None:
        new = {"holder": me, "count": 1, "token": token, "expires": now + lease}
        return (new["token"], 0.0), _lock_effect(name, new)
    if holder == me and reentrant:
        new = dict(state, count=state["count"] + 1, expires=now + lease)
        return (state["token"], 0.0), _lock_effect(name, new)
    return (0, state["expires"] - now), []


def _lock_release(name, state, now, session, thread):
    """True once released (a reentrant lock: when its count is back to 0)."""
    if state["holder"] != (session, thread):
        raise Refused("RuntimeError", "release unlocked lock" if state["holder"] is None
                      else "cannot release un-acquired lock")
    if _held(state, now) is None:
        raise Refused("LockLost", f"the lease on lock {name!r} ran out before this release (its holder "
                                  "stopped renewing it: paused or cut off): another may have held it since")
    if state["count"] > 1:
        return False, _lock_effect(name, dict(state, count=state["count"] - 1))
    return True, _lock_effect(name, dict(state, holder=None, count=0))


def _lock_renew(name, state, now, session, lease):
    """Whether the lease of ``session``'s hold is renewed (False: it holds nothing here any more)."""
    holder = _held(state, now)
    if holder is None or holder[0] != session:
        return False, []
    return True, _lock_effect(name, dict(state, expires=now + lease))


def _lock_end_session(name, state, now, session):
    """The session closed: what it holds is released."""
    if state["holder"] is None or state["holder"][0] != session:
        return False, []
    return True, _lock_effect(name, dict(state, holder=None, count=0))


def _lock_destroy(name, state, now):
    return True, [(LOCK, name, "clear", ())]


_LOCK_WRITES = {"release": _lock_release, "renew": _lock_renew,
                "end_session": _lock_end_session, "destroy": _lock_destroy}


def _semaphore_effect(name: str, state: dict) -> list:
    return [(SEMAPHORE, name, "semaphore_state", (state,))]


def _semaphore_init(name, state, now, permits):
    """Set the permits if the semaphore has none yet (the first ``get_semaphore`` decides); the permits."""
    if state["permits"] or state["held"]:
        return state["permits"], []
    return permits, _semaphore_effect(name, {"permits": permits, "held": {}})


def _semaphore_acquire(name, state, now, session, count, lease):
    """``(True, 0.0)`` once ``count`` permits are this session's; ``(False, seconds)`` until a lease may end."""
    live = _live(state, now)
    if state["permits"] - sum(held for held, _ in live.values()) >= count:
        mine = live.get(session, (0, 0.0))[0] + count
        live = {s: (held, now + lease if s == session else expires) for s, (held, expires) in live.items()}
        live[session] = (mine, now + lease)
        return (True, 0.0), _semaphore_effect(name, {"permits": state["permits"], "held": live})
    return (False, min((expires - now for _, expires in live.values()), default=0.0)), []


def _semaphore_release(name, state, now, session, count):
    live = _live(state, now)
    mine = live.get(session, (0, 0.0))[0]
    if count > mine:
        raise Refused("ValueError", "Semaphore released too many times")
    live = dict(live)
    if mine == count:
        del live[session]
    else:
        live[session] = (mine - count, live[session][1])
    return True, _semaphore_effect(name, {"permits": state["permits"], "held": live})


def _semaphore_renew(name, state, now, session, lease):
    live = _live(state, now)
    if session not in live:
        return False, []
    live = dict(live)
    live[session] = (live[session][0], now + lease)
    return True, _semaphore_effect(name, {"permits": state["permits"], "held": live})


def _semaphore_end_session(name, state, now, session):
    if session not in state["held"]:
        return False, []
    held = {s: hold for s, hold in state["held"].items() if s != session}
    return True, _semaphore_effect(name, {"permits": state["permits"], "held": held})


def _semaphore_destroy(name, state, now):
    return True, [(SEMAPHORE, name, "clear", ())]


_SEMAPHORE_WRITES = {"init": _semaphore_init, "acquire": _semaphore_acquire, "release": _semaphore_release,
                     "renew": _semaphore_renew, "end_session": _semaphore_end_session,
                     "destroy": _semaphore_destroy}


# -- effects ------------------------------------------------------------------------------------------------


def effect_lock_state(structures: dict, name: str, state: dict) -> None:
    structures[LOCK, name] = dict(state)


def effect_semaphore_state(structures: dict, name: str, state: dict) -> None:
    structures[SEMAPHORE, name] = dict(state, held=dict(state["held"]))
