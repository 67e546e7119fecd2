"""What the hub answers: the actions the SSH server carries out after a call, and why a session is refused.

They live apart from :mod:`.hub` because both sides speak them: the hub's
pieces (:mod:`.topics`, :mod:`.routing`) return them, and the server
(:mod:`.server`) matches on them, outside its lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)  # how the server names a connection


@dataclass(frozen=True)
class End:
    """End session ``session`` now with ``status`` and ``message`` on its stderr."""

    session: int
    status: int
    message: str | None


@dataclass(frozen=True)
class EndOutput:
    """Session ``session`` (a plain sub whose last publisher left) gets no more lines: end it once its
    queued lines are written."""

    session: int


@dataclass(frozen=True)
class HangUp(Generic[C]):
    """Connection ``conn`` lost its key: end its sessions (``access revoked``) and hang up."""

    conn: C


@dataclass(frozen=True)
class Persist:
    """``what`` (``"clusters"``: the access lists; ``"registry"``: :class:`.Registry`) changed: save it."""

    what: str


Action = End | EndOutput | HangUp | Persist


class Refused(Exception):
    """A session may not start; ``str(exc)`` goes to the client's stderr.  ``actions``: still to be
    done (an access list set on the way in)."""

    def __init__(self, message: str, actions: Iterable[Action] = ()) -> None:
        super().__init__(message)
        self.actions = list(actions)


@dataclass(frozen=True)
class Relay:
    """What becomes of one line: the sessions it goes to, in the order of :attr:`to`, or why it goes nowhere.

    ``refusal`` is set (and counted in ``dropped``) when policy drops the line; ``end`` when the sender
    broke its rate limit and must be ended with that message.
    """

    to: tuple[int, ...] = ()
    refusal: str | None = None
    end: End | None = None
