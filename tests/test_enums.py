"""Enum classes of the user's own code (a script, a notebook, a local module) travel by value and come home
as the client's own members, as they do with ProcessPoolExecutor."""

from __future__ import annotations

import enum
import io
import pickle
import signal
import warnings

import dill
import pytest

from p2pexec.tasks import PROTOCOL, TaskPickler

pytestmark = pytest.mark.timeout(120)


class Colour(enum.Enum):
    RED = 1
    GREEN = 2
    CRIMSON = 1  # an alias

    @property
    def warm(self) -> bool:
        return self in (Colour.RED,)

    def describe(self) -> str:
        return f"{self.name.lower()} ({self.value})"

    @classmethod
    def _missing_(cls, value):
        return cls.GREEN if value == "g" else None


class Unit(enum.Enum):
    GRAM = "g"
    KILO = "kg"
    __names = {"g": "gram"}  # a private class attribute: not a member, not a method

    def long_name(self) -> str:
        return self.__names.get(self.value, "?")


Unit.FACTORS = {"g": 1, "kg": 1000}  # set on the class after it was made


class Planet(enum.Enum):
    EARTH = (5.97e24, 6.37e6)

    def __init__(self, mass: float, radius: float) -> None:
        self.mass = mass
        self.radius = radius


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(str, enum.Enum):
    READ = "r"


class Perm(enum.Flag):
    R = 4
    W = 2


def _sent(obj):
    """``obj`` as a task process gets it: pickled by the task pickler, then loaded by dill."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dill warned "recursive self-references" and named the class instead
        TaskPickler(buf, protocol=PROTOCOL, recurse=True).dump(obj)
    return dill.loads(buf.getvalue())


def test_an_enum_class_travels_by_value_with_its_members_methods_and_aliases():
    copy = _sent(Colour)
    assert copy is not Colour and copy.__qualname__ == "Colour" and copy.__module__ == __name__
    assert [m.name for m in copy] == ["RED", "GREEN"] and copy.CRIMSON is copy.RED
    assert copy.RED.warm and not copy.GREEN.warm  # the property refers to the copy, found in the pickle's memo
    assert copy.GREEN.describe() == "green (2)" and copy("g") is copy.GREEN


def test_mixins_flags_and_members_with_attributes_travel():
    planet, level, mode, perm = _sent((Planet, Level, Mode, Perm))
    assert planet.EARTH.mass == 5.97e24 and planet.EARTH.radius == 6.37e6
    assert level.HIGH > level.LOW and level.HIGH == 2 and isinstance(level.LOW, int)
    assert mode.READ == "r" and mode("r") is mode.READ
    assert (perm.R | perm.W).value == 6 and perm.R in perm(6)


def test_a_member_and_a_function_using_the_class_travel_together():
    member, fn = _sent((Colour.GREEN, lambda c: c.describe()))
    assert type(member).__qualname__ == "Colour" and fn(member) == "green (2)"


def test_a_rebuilt_class_goes_back_by_name_to_the_original():
    copy = _sent(Colour)
    assert pickle.loads(_dumps(copy.RED)) is Colour.RED
    assert pickle.loads(_dumps(_sent(Perm)(6))) == Perm.R | Perm.W


def test_installed_enums_are_still_named():
    data = _dumps(signal.Signals.SIGTERM)
    assert b"make_enum" not in data and pickle.loads(data) is signal.Signals.SIGTERM


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    TaskPickler(buf, protocol=PROTOCOL, recurse=True).dump(obj)
    return buf.getvalue()


def describe_all(colour: Colour, level: Level) -> tuple[str, Level, Perm]:
    return colour.describe(), Level(level + 1), Perm.R | Perm.W


def test_enums_of_user_code_work_on_workers_and_come_home_as_the_clients_members(executor):
    described, level, perm = executor.submit(describe_all, Colour.RED, Level.LOW).result(timeout=60)
    assert described == "red (1)" and level is Level.HIGH and perm == Perm.R | Perm.W
    assert list(executor.map(Colour, [1, 2, "g"])) == [Colour.RED, Colour.GREEN, Colour.GREEN]
    assert executor.submit(lambda: Planet.EARTH.radius).result(timeout=60) == 6.37e6


def test_class_attributes_that_are_not_methods_travel_too():
    unit = _sent(Unit)
    assert unit.GRAM.long_name() == "gram" and unit.FACTORS["kg"] == 1000 and [m.name for m in unit] == ["GRAM", "KILO"]


def raise_with(colour: Colour) -> None:
    raise KeyError(colour)


def test_an_exception_carrying_a_member_comes_back_as_itself(executor):
    with pytest.raises(KeyError) as raised:
        executor.submit(raise_with, Colour.GREEN).result(timeout=60)
    assert raised.value.args == (Colour.GREEN,) and raised.value.args[0] is Colour.GREEN
