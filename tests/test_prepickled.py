"""Functions pickled by value once (prepare.prepickled): reused only while the pickle would come out the same."""

from __future__ import annotations

import math
import pickle

from p2pexec.prepare import prepare_task, prepickled
from p2pexec.protocol.frames import unpack_parts
from p2pexec.tasks import dump_outcome, load_outcome, load_task
from tests.localpkg import helpers, shapes

LIMIT = 5
TABLE = [1, 2]


def _run(fn, *args, **kwargs):
    payload, values, plain = prepare_task(fn, args, kwargs)
    assert not values
    loaded, a, k = load_task(b"".join(bytes(p) for p in payload))
    return loaded(*a, **k)


def uses_limit(x):
    return x + LIMIT + len([x]) + math.floor(1.5)


def uses_table():
    return list(TABLE)


def calls_helper(x):
    return helper(x)


def helper(x):
    return x * LIMIT


def test_a_changed_global_is_sent_again():
    global LIMIT
    assert _run(uses_limit, 1) == 8
    first = prepickled(uses_limit)
    assert first is not None and prepickled(uses_limit) is first
    LIMIT = 7
    try:
        assert prepickled(uses_limit) is not first
        assert _run(uses_limit, 1) == 10
    finally:
        LIMIT = 5


def test_mutable_globals_are_pickled_every_time():
    assert prepickled(uses_table) is None
    TABLE.append(3)
    try:
        assert _run(uses_table) == [1, 2, 3]
    finally:
        TABLE.pop()


def test_nested_functions_by_value_are_watched_too():
    global helper
    assert _run(calls_helper, 2) == 10
    original = helper
    helper = lambda x: -x  # noqa: E731
    try:
        assert _run(calls_helper, 2) == -2
    finally:
        helper = original


def uses_shapes(side):
    return shapes.area(side), shapes.Square(side).unit(), shapes.log.name


def uses_helpers(x):
    return helpers.scaled(x)


def test_a_module_of_the_users_own_reached_as_an_object_is_pickled_once_while_it_stays_the_same(monkeypatch):
    """Its functions, class, constants and logger go by value with the task: they were pickled again (dill's
    pure-Python pickler, milliseconds) for every submit."""
    assert _run(uses_shapes, 3) == (18, "cm", "tests.localpkg.shapes")
    first = prepickled(uses_shapes)
    assert first is not None and prepickled(uses_shapes) is first
    monkeypatch.setattr(shapes, "SCALE", 3)  # a name of the module bound again
    assert prepickled(uses_shapes) is not first and _run(uses_shapes, 3)[0] == 27
    second = prepickled(uses_shapes)
    monkeypatch.setattr(shapes.Square, "area", lambda self: -1.0)  # a class's method replaced
    assert prepickled(uses_shapes) is not second and _run(uses_shapes, 3)[0] == -1.0
    monkeypatch.setattr(shapes.Square, "kind", ["square"])  # now something in it can change in place
    assert prepickled(uses_shapes) is None


def test_what_only_the_objects_in_a_module_say_is_watched_too(monkeypatch):
    """A static method's function, a logger's name: the same objects, other pickles."""
    first = prepickled(uses_shapes)
    assert first is not None
    static = vars(shapes.Square)["unit"]
    original = static.__func__
    static.__init__(lambda: "mm")  # the same staticmethod object, wrapping another function
    try:
        assert prepickled(uses_shapes) is not first and _run(uses_shapes, 3)[1] == "mm"
    finally:
        static.__init__(original)
    second = prepickled(uses_shapes)
    assert second is not None and prepickled(uses_shapes) is second
    monkeypatch.setattr(shapes.log, "name", "renamed")
    assert prepickled(uses_shapes) is None  # pickled again, which fails: no logger has that name now


def test_a_function_no_one_holds_is_not_kept_by_the_cache():
    """Each entry held its own function: every lambda ever submitted stayed in memory, with its pickle."""
    import gc
    import weakref

    fn = lambda x: shapes.area(x) + LIMIT  # noqa: E731
    assert prepickled(fn) is not None
    gone = weakref.ref(fn)
    del fn
    gc.collect()
    assert gone() is None


def test_a_module_holding_a_lock_is_pickled_every_time():
    assert prepickled(uses_helpers) is None
    assert _run(uses_helpers, 2) == 6


def test_defaults_closures_and_attributes():
    def make(n):
        def add(x, y=1):
            return x + y + n
        return add

    add = make(10)
    assert _run(add, 1) == 12
    add.__defaults__ = (5,)
    assert _run(add, 1) == 16
    add.extra = [1]  # an attribute is pickled with it: no reuse
    assert prepickled(add) is None
    assert _run(add, 1) == 16


def test_each_task_gets_its_own_copy():
    def counting():
        global COUNT
        COUNT = globals().get("COUNT", 0) + 1
        return COUNT

    # each payload unpickles a fresh function with fresh globals, as before
    assert _run(counting) == 1
    assert _run(counting) == 1


def test_plain_arguments_and_builtins_take_the_c_pickler():
    payload, values, plain = prepare_task(math.sqrt, (4,), {})
    assert plain and len(payload) == 2
    assert _run(math.sqrt, 4) == 2.0
    _, _, plain = prepare_task(uses_limit, (object(),), {})
    assert not plain
    _, _, plain = prepare_task(uses_limit, (pickle.PickleBuffer(b"x"),), {})
    assert not plain  # (out of band, as before)
    payload, _, plain = prepare_task(uses_limit, (b"x" * 100_000,), {})
    assert not plain and len(payload) == 3  # big bytes still go out of band


def test_outcomes_of_plain_data():
    for value in (None, [1, "a", {2: (3.5, b"b")}], "x" * 100_000):
        assert load_outcome(b"".join(bytes(p) for p in dump_outcome(True, value, "out", ""))).value == value
    big = b"y" * 100_000
    payload = b"".join(bytes(p) for p in dump_outcome(True, big, "", ""))
    assert len(unpack_parts(payload)) == 2  # the pickle, and the bytes out of band
    assert load_outcome(payload, trusted=False).value == big
