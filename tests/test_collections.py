"""DList, DSet and MultiMap against list, set and a dict of lists (grid.data.dlist, dset, multimap), over
replicas in this process.

Every operation answers as the built-in does, errors included (the same type, and the same message
where list's and set's are fixed text), and the structure equals its model after each step.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from grid.data.dlist import DList
from grid.data.dset import DSet
from grid.data.multimap import MultiMap
from grid.data.store import LIST, LocalBackend, Op, Replica

PARTITIONS = 7
INDEXES = st.integers(-6, 6) | st.booleans()
SLICE_PARTS = st.none() | st.integers(-6, 6)
ITEMS = st.integers(-3, 3) | st.text(max_size=2)


def outcome(fn):
    """``("ok", result)`` or ``("error", type, message)``: what a call did, to compare with the model's."""
    try:
        return ("ok", fn())
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        return ("error", type(exc), str(exc))


class ListLikeAList(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.backend = LocalBackend(PARTITIONS)
        self.dlist, self.model = DList("numbers", self.backend), []

    def same(self, on_dlist, on_list):
        assert outcome(lambda: on_dlist(self.dlist)) == outcome(lambda: on_list(self.model))

    @initialize(items=st.lists(ITEMS, min_size=3, max_size=8))
    def start(self, items):  # (long enough that most positions fall inside the list)
        self.same(lambda l: l.extend(items), lambda l: l.extend(items))

    @rule(item=ITEMS)
    def append(self, item):
        self.same(lambda l: l.append(item), lambda l: l.append(item))

    @rule(items=st.lists(ITEMS, max_size=3))
    def extend(self, items):
        self.same(lambda l: l.extend(items), lambda l: l.extend(items))

    @rule(index=INDEXES, item=ITEMS)
    def insert(self, index, item):
        self.same(lambda l: l.insert(index, item), lambda l: l.insert(index, item))

    @rule(index=INDEXES)
    def getitem(self, index):
        self.same(lambda l: l[index], lambda l: l[index])

    @rule(index=INDEXES, item=ITEMS)
    def setitem(self, index, item):
        self.same(lambda l: l.__setitem__(index, item), lambda l: l.__setitem__(index, item))

    @rule(index=INDEXES)
    def delitem(self, index):
        self.same(lambda l: l.__delitem__(index), lambda l: l.__delitem__(index))

    @rule(start=SLICE_PARTS, stop=SLICE_PARTS, step=SLICE_PARTS)
    def get_slice(self, start, stop, step):
        self.same(lambda l: l[start:stop:step], lambda l: l[start:stop:step])

    @rule(start=SLICE_PARTS, stop=SLICE_PARTS, step=SLICE_PARTS, items=st.lists(ITEMS, max_size=3))
    def set_slice(self, start, stop, step, items):
        self.same(lambda l: l.__setitem__(slice(start, stop, step), items),
                  lambda l: l.__setitem__(slice(start, stop, step), items))

    @rule(start=SLICE_PARTS, stop=SLICE_PARTS, step=SLICE_PARTS)
    def del_slice(self, start, stop, step):
        self.same(lambda l: l.__delitem__(slice(start, stop, step)), lambda l: l.__delitem__(slice(start, stop, step)))

    @rule(index=st.none() | INDEXES)
    def pop(self, index):
        if index is None:
            self.same(lambda l: l.pop(), lambda l: l.pop())
        else:
            self.same(lambda l: l.pop(index), lambda l: l.pop(index))

    @rule(item=ITEMS)
    def remove(self, item):
        self.same(lambda l: l.remove(item), lambda l: l.remove(item))

    @rule(item=ITEMS)
    def index_count_contains(self, item):
        self.same(lambda l: (l.count(item), item in l), lambda l: (l.count(item), item in l))
        self.same(lambda l: l.index(item), lambda l: l.index(item))

    @rule(reverse=st.booleans(), by_text=st.booleans())
    def sort(self, reverse, by_text):
        key = str if by_text else None  # (ints and texts together: a TypeError without a key, as list's)
        before = list(self.model)
        self.same(lambda l: l.sort(key=key, reverse=reverse), lambda l: l.sort(key=key, reverse=reverse))
        if self.model != before and self.dlist == before:  # Beyond list: a sort that fails changes nothing
            self.model[:] = before  # (list's may leave the list half sorted)

    @rule()
    def reverse(self):
        self.same(lambda l: l.reverse(), lambda l: l.reverse())

    @rule()
    def clear(self):
        self.same(lambda l: l.clear(), lambda l: l.clear())

    @invariant()
    def equal(self):
        assert self.dlist == self.model and len(self.dlist) == len(self.model) and list(self.dlist) == self.model


class SetLikeASet(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.backend = LocalBackend(PARTITIONS)
        self.dset, self.model = DSet("members", self.backend), set()

    def same(self, on_dset, on_set):
        assert outcome(lambda: on_dset(self.dset)) == outcome(lambda: on_set(self.model))

    @rule(item=ITEMS)
    def add(self, item):
        self.same(lambda s: s.add(item), lambda s: s.add(item))

    @rule(item=ITEMS)
    def discard_remove(self, item):
        self.same(lambda s: s.discard(item), lambda s: s.discard(item))
        self.same(lambda s: s.remove(item), lambda s: s.remove(item))

    @rule()
    def pop(self):
        popped = outcome(self.dset.pop)
        if popped[0] == "ok":
            self.model.remove(popped[1])
        else:
            assert popped == outcome(self.model.pop)

    @rule(items=st.lists(ITEMS, max_size=4), how=st.sampled_from(["|=", "-=", "&=", "^="]))
    def in_place(self, items, how):
        other = set(items)
        for target in (self.dset, self.model):
            if how == "|=":
                target |= other
            elif how == "-=":
                target -= other
            elif how == "&=":
                target &= other
            else:
                target ^= other

    @rule(items=st.lists(ITEMS, max_size=4))
    def operators(self, items):
        other = set(items)
        for fn in (lambda s: s | other, lambda s: s & other, lambda s: s - other, lambda s: s ^ other,
                   lambda s: other | s, lambda s: other - s,
                   lambda s: s <= other, lambda s: s < other, lambda s: s >= other, lambda s: s > other,
                   lambda s: s == other, lambda s: s != other, lambda s: s.isdisjoint(items),
                   lambda s: s.union(items), lambda s: s.issubset(items)):
            self.same(fn, fn)
        # Beyond set: the operators take any iterable (as MutableSet's), and give plain sets.
        assert (self.dset | items, self.dset - items, items & self.dset) == (
            self.model | other, self.model - other, other & self.model)
        assert type(self.dset | items) is set

    @rule(item=ITEMS)
    def contains(self, item):
        self.same(lambda s: item in s, lambda s: item in s)

    @rule()
    def clear(self):
        self.same(lambda s: s.clear(), lambda s: s.clear())

    @invariant()
    def equal(self):
        assert self.dset == self.model and len(self.dset) == len(self.model) and set(self.dset) == self.model


ListLikeAList.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_a_dlist_behaves_as_a_list = ListLikeAList.TestCase
SetLikeASet.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_a_dset_behaves_as_a_set = SetLikeASet.TestCase


# -- what the model does not reach -------------------------------------------------------------------------


def test_list_errors_are_lists_own():
    dlist = DList("errors", LocalBackend(PARTITIONS))
    with pytest.raises(IndexError, match="pop from empty list"):
        dlist.pop()
    dlist.extend([1, 2])
    with pytest.raises(IndexError, match="list index out of range"):
        dlist[2]
    with pytest.raises(IndexError, match="list assignment index out of range"):
        dlist[-3] = 0
    with pytest.raises(TypeError, match="list indices must be integers or slices, not str"):
        dlist["0"]
    with pytest.raises(ValueError, match="slice step cannot be zero"):
        dlist[::0]
    with pytest.raises(ValueError, match="attempt to assign sequence of size 1 to extended slice of size 2"):
        dlist[::1 - 2] = [9]
    with pytest.raises(ValueError, match="list.remove"):
        dlist.remove(3)
    with pytest.raises(TypeError):  # an item that cannot travel: nothing is sent
        dlist.append(threading.Lock())
    assert dlist == [1, 2] and dlist != [2, 1] and dlist != (1, 2)
    with pytest.raises(TypeError):
        hash(dlist)


def test_set_errors_are_sets_own():
    dset = DSet("errors", LocalBackend(PARTITIONS))
    with pytest.raises(KeyError, match="pop from an empty set"):
        dset.pop()
    with pytest.raises(KeyError):
        dset.remove("missing")
    with pytest.raises(TypeError, match="unhashable"):
        dset.add([1])
    with pytest.raises(TypeError, match="unhashable"):
        [1] in dset  # noqa: B015
    dset.add(1)
    dset.add(1.0)  # (members compare by their serialized form, as a map's keys)
    assert len(dset) == 2


def test_a_remove_and_a_sort_racing_other_writers_apply_to_the_list_they_read():
    """remove and sort work on a copy and write back only if the list did not change since: a write
    that slips in between makes them read again, so nothing is lost and the right item goes."""
    backend = LocalBackend(PARTITIONS)
    dlist, other = DList("raced", backend), DList("raced", backend)
    dlist.extend([3, 1, 2])
    real = backend.execute
    slipped = []

    def execute(partition, op):
        if op.action in ("delete_if_version", "replace_if_version") and not slipped:
            slipped.append(op.action)
            other.insert(0, 0)  # another client writes between the read and the write back
        return real(partition, op)

    backend.execute = execute
    dlist.remove(1)
    assert dlist == [0, 3, 2] and slipped == ["delete_if_version"]
    slipped.clear()
    dlist.sort(reverse=True)
    assert dlist == [3, 2, 0, 0] and slipped == ["replace_if_version"]


def test_a_lists_version_is_never_given_twice_in_a_partition():
    """A version is the stamp of the list's last write, (table version, seq): a list destroyed and
    made again, or written by a new owner, never comes back to a version a caller read before."""
    replica = Replica(0)
    versions = []
    for table_version, action, args in ((1, "append", (b"a",)), (1, "destroy", ()), (1, "append", (b"a",)),
                                        (2, "append", (b"b",))):
        replica.follow(table_version)
        replica.execute(Op(LIST, "l", action, args, f"call-{len(versions)}", table_version))
        versions.append(replica.execute(Op(LIST, "l", "all", (), None, table_version)).result[1])
    assert len(set(versions)) == len(versions)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "insert", "pop", "set", "reverse"]), st.integers(-3, 3)),
                max_size=12))
def test_a_backup_that_applies_the_records_holds_the_owners_list(steps):
    owner, backup = Replica(0), Replica(0)
    for number, (action, index) in enumerate(steps):
        args = {"append": (b"%d" % number,), "insert": (index, b"%d" % number), "pop": (index,),
                "set": (index, b"x"), "reverse": ()}[action]
        try:
            outcome_ = owner.execute(Op(LIST, "l", action, args, f"call-{number}"))
        except Exception:  # noqa: BLE001 - refused: nothing to apply
            continue
        if outcome_.record is not None:
            backup.replicate(outcome_.record)
    assert backup.snapshot()["structures"] == owner.snapshot()["structures"]
    restored = Replica.restore(owner.snapshot())
    assert restored.snapshot()["structures"] == owner.snapshot()["structures"]


# -- MultiMap ------------------------------------------------------------------------------------------------


class MultiMapLikeADictOfLists(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.mm, self.model = MultiMap("mm", LocalBackend(PARTITIONS)), {}

    @rule(key=ITEMS, value=ITEMS)
    def put(self, key, value):
        self.mm.put(key, value)
        self.model.setdefault(key, []).append(value)

    @rule(key=ITEMS)
    def remove_all(self, key):
        assert self.mm.remove(key) == self.model.pop(key, [])

    @rule(key=ITEMS, value=ITEMS)
    def remove_one(self, key, value):
        values = self.model.get(key, [])
        assert self.mm.remove(key, value) == (value in values)
        if value in values:
            values.remove(value)
            if not values:
                del self.model[key]

    @rule(key=ITEMS, value=ITEMS)
    def reads(self, key, value):
        assert self.mm.get(key) == self.model.get(key, [])
        assert self.mm.value_count(key) == len(self.model.get(key, []))
        assert (key in self.mm) == (key in self.model)
        assert self.mm.contains_entry(key, value) == (value in self.model.get(key, []))

    @rule()
    def clear(self):
        self.mm.clear()
        self.model.clear()

    @invariant()
    def equal(self):
        assert len(self.mm) == sum(map(len, self.model.values()))
        assert sorted(map(repr, self.mm.keys())) == sorted(map(repr, self.model))
        assert sorted(map(repr, self.mm.values())) == sorted(repr(v) for vs in self.model.values() for v in vs)
        assert {repr(k): v for k, v in self.mm.items()} == {repr(k): v for k, v in self.model.items()}


MultiMapLikeADictOfLists.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                                      suppress_health_check=[HealthCheck.too_slow])
test_a_multimap_behaves_as_a_dict_of_lists = MultiMapLikeADictOfLists.TestCase


def test_a_multimaps_keys_spread_over_the_partitions_and_an_unhashable_key_is_refused():
    backend = LocalBackend(PARTITIONS)
    mm = MultiMap("spread", backend)
    for key in range(40):
        mm.put(key, key)
    assert len({partition for partition, replica in backend._replicas.items() if replica.structures()}) > 1
    with pytest.raises(TypeError, match="unhashable"):
        mm.put([1], 2)
    with pytest.raises(TypeError):  # a value that cannot travel: nothing is sent
        mm.put(1, threading.Lock())
    assert len(mm) == 40
