"""When to answer an observer (``p2pexec status``): pure, shared by workers and clients.

An observer's hello asks every node to say hello back; answers are
rate-limited so that a status loop, or a member who sends observer hellos
in a loop, cannot make the whole cluster flood the board.
"""

from __future__ import annotations

from .messages import Message

ANSWER_AT_MOST_EVERY = 0.5


class AnswerObservers:
    def __init__(self) -> None:
        self._last = -1e9

    def due(self, msg: Message, now: float) -> bool:
        """Answer this message with a hello now (``now``: a monotonic clock)?"""
        if msg.type != "hello" or msg.body.get("role") != "observer":
            return False
        if now - self._last < ANSWER_AT_MOST_EVERY:
            return False
        self._last = now
        return True
