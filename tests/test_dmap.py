"""DMap's dict behaviour (grid.data.dmap), over replicas in this process (LocalBackend)."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grid.data.dmap import DMap
from grid.data.store import LocalBackend
from grid.net.serialize import SerializationError

EXAMPLES = int(os.environ.get("GRID_HYPOTHESIS_EXAMPLES", "150"))

# Keys a dict and a DMap treat alike: no floats or bools (1, 1.0 and True are one dict key, three DMap keys).
# Few of them, so that a sequence meets the same key again.
keys = st.sampled_from(["a", "ü", -1, (0, "t")])
values = st.sampled_from([None, 0, 7, "x", [1, 2]])
actions = st.one_of(
    st.tuples(st.just("setitem"), keys, values), st.tuples(st.just("delitem"), keys),
    st.tuples(st.just("getitem"), keys), st.tuples(st.just("get"), keys, values),
    st.tuples(st.just("pop"), keys), st.tuples(st.just("pop_default"), keys, values),
    st.tuples(st.just("setdefault"), keys, values), st.tuples(st.just("popitem")),
    st.tuples(st.just("update"), st.dictionaries(keys, values, max_size=3)),
    st.tuples(st.just("contains"), keys), st.tuples(st.just("len")), st.tuples(st.just("clear")),
    st.tuples(st.just("put"), keys, values), st.tuples(st.just("put_if_absent"), keys, values),
    st.tuples(st.just("replace"), keys, values), st.tuples(st.just("put_all"), st.dictionaries(keys, values, max_size=3)),
    st.tuples(st.just("get_all"), st.lists(keys, max_size=4)))


def apply(target, action, *args):
    """Run ``action`` on a dict or a DMap; the outcome, an exception's type included."""
    try:
        if action == "setitem":
            target[args[0]] = args[1]
        elif action == "delitem":
            del target[args[0]]
        elif action == "getitem":
            return target[args[0]]
        elif action == "get":
            return target.get(args[0], args[1])
        elif action == "pop":
            return target.pop(args[0])
        elif action == "pop_default":
            return target.pop(args[0], args[1])
        elif action == "setdefault":
            return target.setdefault(args[0], args[1])
        elif action == "popitem":
            key, value = target.popitem()
            return ("popped", value == target_value(target, key, value))
        elif action == "update":
            target.update(args[0])
        elif action == "contains":
            return args[0] in target
        elif action == "len":
            return len(target)
        elif action == "clear":
            target.clear()
        elif isinstance(target, dict):  # the DMap-only ones, as dict would do them
            return dict_extra(target, action, *args)
        elif action in ("put", "put_if_absent", "replace"):
            return getattr(target, action)(*args)
        elif action == "put_all":
            target.put_all(args[0])
        elif action == "get_all":
            return target.get_all(args[0])
    except KeyError:
        return KeyError
    return None


def target_value(target, key, value):
    return value  # popitem's pair is the map's own: only its shape is compared


def dict_extra(target: dict, action, *args):
    if action == "put":
        old = target.get(args[0])
        target[args[0]] = args[1]
        return old
    if action == "put_if_absent":
        if args[0] in target:
            return target[args[0]]
        target[args[0]] = args[1]
        return None
    if action == "replace":
        if args[0] not in target:
            return None
        old, target[args[0]] = target[args[0]], args[1]
        return old
    if action == "put_all":
        target.update(args[0])
        return None
    return {key: target[key] for key in args[0] if key in target}


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(actions, max_size=30))
def test_a_dmap_does_what_a_dict_does(sequence):
    model, dmap = {}, DMap("m", LocalBackend(partitions=7))
    for action, *args in sequence:
        if action == "popitem" and model:  # which pair comes first differs: take the same one from both
            key, value = dmap.popitem()
            assert model.pop(key) == value
            continue
        assert apply(dmap, action, *args) == apply(model, action, *args), (action, args)
        assert len(dmap) == len(model)
    assert dmap == model and dict(dmap.items()) == model
    assert sorted(map(repr, dmap.keys())) == sorted(map(repr, model.keys()))
    assert sorted(map(repr, dmap.values())) == sorted(map(repr, model.values()))


def test_dict_errors_and_views():
    dmap = DMap("m", LocalBackend(partitions=5))
    with pytest.raises(TypeError, match="unhashable type: 'list'"):
        dmap[[1]] = 2
    with pytest.raises(TypeError, match="unhashable"):
        [1] in dmap  # noqa: B015 - the check is the point
    with pytest.raises(KeyError, match="popitem"):
        dmap.popitem()
    with pytest.raises(KeyError):
        dmap.pop("missing")
    with pytest.raises(SerializationError):
        dmap["lock"] = threading.Lock()
    assert "lock" not in dmap, "a value that cannot travel stores nothing"
    dmap.update([("a", 1)], b=2)
    assert dmap.keys() & {"a", "z"} == {"a"} and len(dmap.items()) == 2 and ("b", 2) in dmap.items()
    assert dmap != {"a": 1} and dmap == {"a": 1, "b": 2} and dmap != [("a", 1)]
    with pytest.raises(TypeError, match="unhashable"):
        hash(dmap)
    with pytest.raises(TypeError, match="non-empty str"):
        DMap("", LocalBackend(partitions=3))


def test_keys_compare_by_serialized_form_unlike_a_dict():
    dmap = DMap("m", LocalBackend(partitions=5))
    dmap[1], dmap[1.0], dmap[True] = "int", "float", "bool"
    assert len(dmap) == 3 and dmap[1] == "int" and dmap[1.0] == "float" and dmap[True] == "bool"


def test_the_atomic_writes_beyond_dict():
    dmap = DMap("m", LocalBackend(partitions=5))
    assert dmap.put("k", 1) is None and dmap.put("k", 2) == 1
    assert dmap.put_if_absent("k", 3) == 2 and dmap["k"] == 2
    assert dmap.replace("absent", 1) is None and "absent" not in dmap
    assert dmap.replace_if_same("k", 1, 5) is False and dmap.replace_if_same("k", 2, 5) is True and dmap["k"] == 5
    assert dmap.remove_if_same("k", 4) is False and dmap.remove_if_same("k", 5) is True and "k" not in dmap
    dmap.set("s", None)
    assert dmap["s"] is None and dmap.get("s", "default") is None, "a stored None is a value, not absence"
    dmap.put_all({i: i * i for i in range(20)})
    assert dmap.get_all([0, 3, 99]) == {0: 0, 3: 9}
