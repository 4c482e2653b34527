"""The list, set and multimap kinds of the store: what their ops read and write in a replica, as data
without IO.

::

    DList / DSet --Op(LIST | SET, name, action, args)--> Replica.execute --> read(...) or write(...)
    a write gives (result, effects); the effects are what the record carries to the backups:
        list: ("list_insert", stamp, index, items) ("list_delete", stamp, start, stop)
              ("list_put", stamp, index, item) ("list_value", stamp, items)
              each sets the list's version to its stamp: (table version, record seq) of the write
        set:  ("set_add", items) ("set_discard", items)
        multimap: ("mm_add", key, value) ("mm_remove", key, value or None for all of the key's)

A list or a set lives wholly in the partition of its name (as a queue does); a multimap's keys
are spread over the partitions as a map's, each with the list of its values. Items are bytes,
pickled by the caller: an owner never unpickles one, so it can do by position what a list does by
position (index, insert, pop, slices, reverse) and by equal bytes what a set does by equal members
(the serialized form, as a map's keys: ``1`` and ``1.0`` are two members). What needs Python's
equality (a list's ``remove``, ``index``, ``sort``) the caller works out on a copy and writes
back only if the list's version is still the one it read (``delete_if_version``,
``replace_if_version``). A version is the stamp of the list's last write, never given twice in a
partition (a new owner's writes carry a newer table version).

An op that the Python structure would refuse raises ``Refused`` naming the error it would raise
(IndexError, ValueError, KeyError) with the message it would give.
"""

from __future__ import annotations

LIST, SET, MULTIMAP = "list", "set", "multimap"

READS = {
    LIST: {"len", "all", "get", "slice"},
    SET: {"len", "contains", "all"},
    MULTIMAP: {"get", "count", "size", "keys", "entries", "contains_entry"},
}
WRITES = {
    LIST: {"append", "extend", "insert", "set", "set_slice", "delete", "delete_slice", "pop", "reverse",
           "delete_if_version", "replace_if_version", "clear", "destroy", "merge"},
    SET: {"add", "add_all", "discard", "discard_all", "retain", "pop", "clear", "destroy", "merge"},
    MULTIMAP: {"put", "remove", "clear", "merge"},
}


class Refused(Exception):
    """An op refused as the Python structure refuses it: the caller raises ``error`` (its name) with this message."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


def empty(kind: str):
    return {"items": [], "version": None} if kind == LIST else {}


def size(kind: str, value) -> int:
    if kind == MULTIMAP:
        return sum(len(values) for values in value.values())
    return len(value["items"]) if kind == LIST else len(value)


def copy(kind: str, value):
    """A copy that shares nothing mutable with ``value`` (a snapshot's, or a restored replica's)."""
    if kind == LIST:
        return {"items": list(value["items"]), "version": value["version"]}
    if kind == MULTIMAP:
        return {key: list(values) for key, values in value.items()}
    return dict(value)


# -- reads ---------------------------------------------------------------------------------------------


def read(kind: str, value, action: str, args: tuple, now: float = 0.0):
    """A read's result (``value`` None: the structure does not exist, which reads as empty)."""
    if value is None:
        value = empty(kind)
    if kind == MULTIMAP:
        if action == "get":
            return list(value.get(args[0], ()))
        if action == "count":
            return len(value.get(args[0], ()))
        if action == "size":
            return size(MULTIMAP, value)
        if action == "keys":
            return list(value)
        if action == "contains_entry":
            return args[1] in value.get(args[0], ())
        return [(key, list(values)) for key, values in value.items()]  # entries
    if kind == SET:
        if action == "len":
            return len(value)
        if action == "contains":
            return args[0] in value
        return list(value)  # all
    items = value["items"]
    if action == "len":
        return len(items)
    if action == "all":
        return items[:], value["version"]
    if action == "get":
        index = args[0]
        if not -len(items) <= index < len(items):
            raise Refused("IndexError", "list index out of range")
        return items[index]
    return items[slice(*args)]  # slice: (start, stop, step)


# -- writes: (result, effects) -------------------------------------------------------------------------


def write(kind: str, name: str, value, action: str, args: tuple, stamp: tuple, now: float = 0.0) -> tuple:
    """A write's ``(result, effects)`` (``value`` None: the structure does not exist yet); ``stamp``
    is the write's ``(table version, seq)``, the list's version after it."""
    exists = value is not None
    if value is None:
        value = empty(kind)
    if kind == SET:
        return _SET_WRITES[action](name, value, exists, *args)
    if kind == MULTIMAP:
        return _MULTIMAP_WRITES[action](name, value, *args)
    return _LIST_WRITES[action](_Write(name, stamp), value, exists, *args)


class _Write:
    """A list write's name and stamp, which each of its effects carries."""

    __slots__ = ("name", "stamp")

    def __init__(self, name: str, stamp: tuple):
        self.name, self.stamp = name, stamp

    def effect(self, effect: str, *args) -> tuple:
        return (LIST, self.name, effect, (self.stamp, *args))


def _list_append(w, value, exists, item):
    return None, [w.effect("list_insert", len(value["items"]), (item,))]


def _list_extend(w, value, exists, items):
    return None, ([w.effect("list_insert", len(value["items"]), tuple(items))] if items else [])


def _list_insert(w, value, exists, index, item):
    length = len(value["items"])
    at = max(0, min(length, index + length if index < 0 else index))  # list.insert's clamping
    return None, [w.effect("list_insert", at, (item,))]


def _position(value, index: int, message: str) -> int:
    length = len(value["items"])
    if not -length <= index < length:
        raise Refused("IndexError", message)
    return index + length if index < 0 else index


def _list_set(w, value, exists, index, item):
    at = _position(value, index, "list assignment index out of range")
    return None, [w.effect("list_put", at, item)]


def _list_set_slice(w, value, exists, start, stop, step, items):
    changed = list(value["items"])
    try:
        changed[slice(start, stop, step)] = items
    except ValueError as exc:  # an extended slice of another size
        raise Refused("ValueError", str(exc)) from None
    return None, [w.effect("list_value", tuple(changed))]


def _list_delete(w, value, exists, index):
    at = _position(value, index, "list assignment index out of range")
    return None, [w.effect("list_delete", at, at + 1)]


def _list_delete_slice(w, value, exists, start, stop, step):
    changed = list(value["items"])
    del changed[slice(start, stop, step)]
    if len(changed) == len(value["items"]):
        return None, []
    return None, [w.effect("list_value", tuple(changed))]


def _list_pop(w, value, exists, index=-1):
    if not value["items"]:
        raise Refused("IndexError", "pop from empty list")
    at = _position(value, index, "pop index out of range")
    return value["items"][at], [w.effect("list_delete", at, at + 1)]


def _list_reverse(w, value, exists):
    if len(value["items"]) < 2:
        return None, []
    return None, [w.effect("list_value", tuple(reversed(value["items"])))]


def _list_delete_if_version(w, value, exists, index, version):
    """Delete ``index`` if the list is still at ``version`` (a ``remove`` the caller worked out)."""
    if value["version"] != version:
        return False, []
    at = _position(value, index, "list assignment index out of range")
    return True, [w.effect("list_delete", at, at + 1)]


def _list_replace_if_version(w, value, exists, items, version):
    """Replace every item if the list is still at ``version`` (a ``sort`` the caller worked out)."""
    if value["version"] != version:
        return False, []
    return True, [w.effect("list_value", tuple(items))]


def _list_clear(w, value, exists):
    count = len(value["items"])
    return count, ([w.effect("list_delete", 0, count)] if count else [])


def _list_destroy(w, value, exists):
    return exists, ([(LIST, w.name, "clear", ())] if exists else [])


def _list_merge(w, value, exists, items):
    """After a split healed: the smaller side's items, if this side has no such list."""
    if exists or not items:
        return False, []
    return True, [w.effect("list_value", tuple(items))]


_LIST_WRITES = {"append": _list_append, "extend": _list_extend, "insert": _list_insert, "set": _list_set,
                "set_slice": _list_set_slice, "delete": _list_delete, "delete_slice": _list_delete_slice,
                "pop": _list_pop, "reverse": _list_reverse, "delete_if_version": _list_delete_if_version,
                "replace_if_version": _list_replace_if_version, "clear": _list_clear, "destroy": _list_destroy,
                "merge": _list_merge}


def _set_add(name, value, exists, item):
    if item in value:
        return False, []
    return True, [(SET, name, "set_add", ((item,),))]


def _set_add_all(name, value, exists, items):
    new = tuple(dict.fromkeys(item for item in items if item not in value))
    return len(new), ([(SET, name, "set_add", (new,))] if new else [])


def _set_discard(name, value, exists, item):
    if item not in value:
        return False, []
    return True, [(SET, name, "set_discard", ((item,),))]


def _set_discard_all(name, value, exists, items):
    gone = tuple(dict.fromkeys(item for item in items if item in value))
    return len(gone), ([(SET, name, "set_discard", (gone,))] if gone else [])


def _set_retain(name, value, exists, items):
    keep = set(items)
    gone = tuple(item for item in value if item not in keep)
    return len(gone), ([(SET, name, "set_discard", (gone,))] if gone else [])


def _set_pop(name, value, exists):
    if not value:
        raise Refused("KeyError", "pop from an empty set")
    item = next(iter(value))
    return item, [(SET, name, "set_discard", ((item,),))]


def _set_clear(name, value, exists):
    return len(value), ([(SET, name, "set_discard", (tuple(value),))] if value else [])


def _set_destroy(name, value, exists):
    return exists, ([(SET, name, "clear", ())] if exists else [])


def _set_merge(name, value, exists, items):
    """After a split healed: the smaller side's members this side lacks (put_if_absent, member by member)."""
    return _set_add_all(name, value, exists, items)


_SET_WRITES = {"add": _set_add, "add_all": _set_add_all, "discard": _set_discard, "discard_all": _set_discard_all,
               "retain": _set_retain, "pop": _set_pop, "clear": _set_clear, "destroy": _set_destroy,
               "merge": _set_merge}


def _multimap_put(name, value, key, item):
    return None, [(MULTIMAP, name, "mm_add", (key, item))]


def _multimap_remove(name, value, key, item=None):
    """``item`` None: every value of ``key`` (the list of them); else one value equal to it (True if one was)."""
    values = value.get(key, ())
    if item is None:
        return list(values), ([(MULTIMAP, name, "mm_remove", (key, None))] if values else [])
    if item not in values:
        return False, []
    return True, [(MULTIMAP, name, "mm_remove", (key, item))]


def _multimap_clear(name, value):
    """This partition's part of a multimap cleared: how many values it held."""
    return size(MULTIMAP, value), [(MULTIMAP, name, "mm_remove", (key, None)) for key in value]


def _multimap_merge(name, value, key, items):
    """After a split healed: the smaller side's values of ``key``, if this side has none."""
    if key in value or not items:
        return False, []
    return True, [(MULTIMAP, name, "mm_add", (key, item)) for item in items]


_MULTIMAP_WRITES = {"put": _multimap_put, "remove": _multimap_remove, "clear": _multimap_clear,
                    "merge": _multimap_merge}


# -- effects: applied alike on the owner and the backups --------------------------------------------------


def _list_state(structures: dict, name: str, stamp: tuple) -> list:
    state = structures.setdefault((LIST, name), {"items": [], "version": None})
    state["version"] = stamp
    return state["items"]


def effect_list_insert(structures: dict, name: str, stamp: tuple, index: int, items: tuple) -> None:
    _list_state(structures, name, stamp)[index:index] = items


def effect_list_delete(structures: dict, name: str, stamp: tuple, start: int, stop: int) -> None:
    del _list_state(structures, name, stamp)[start:stop]


def effect_list_put(structures: dict, name: str, stamp: tuple, index: int, item: bytes) -> None:
    _list_state(structures, name, stamp)[index] = item


def effect_list_value(structures: dict, name: str, stamp: tuple, items: tuple) -> None:
    _list_state(structures, name, stamp)[:] = items


def effect_set_add(structures: dict, name: str, items: tuple) -> None:
    members = structures.setdefault((SET, name), {})
    for item in items:
        members[item] = None


def effect_set_discard(structures: dict, name: str, items: tuple) -> None:
    members = structures.get((SET, name))
    if members is not None:
        for item in items:
            members.pop(item, None)


def effect_mm_add(structures: dict, name: str, key: bytes, item: bytes) -> None:
    structures.setdefault((MULTIMAP, name), {}).setdefault(key, []).append(item)


def effect_mm_remove(structures: dict, name: str, key: bytes, item) -> None:
    keys = structures.get((MULTIMAP, name))
    values = keys.get(key) if keys is not None else None
    if values is None:
        return
    if item is None:
        values.clear()
    elif item in values:
        values.remove(item)
    if not values:
        del keys[key]
        if not keys:
            del structures[MULTIMAP, name]
