"""A module of the user's own that tasks reach as a module object (``shapes.area(...)``): functions, a class,
constants and a logger, as a real helper module has."""

import logging
import math

log = logging.getLogger(__name__)
SCALE = 2
UNITS = ("cm", "m")


class Square:
    kind = "square"

    def __init__(self, side: float) -> None:
        self.side = side

    def area(self) -> float:
        return self.side * self.side * SCALE

    @property
    def diagonal(self) -> float:
        return self.side * math.sqrt(2)

    @staticmethod
    def unit() -> str:
        return UNITS[0]


def area(side: float) -> float:
    return Square(side).area()
