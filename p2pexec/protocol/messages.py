"""Signed board messages: encoding, verification and filtering, without I/O.

A message is one line of JSON.  The signature covers the canonical encoding
(sorted keys, no spaces, ASCII) of every field but ``sig``, prefixed by a
domain-separation tag, and is checked against the signer's Ed25519 key that
travels in ``key``.  Whether that key may speak for ``from`` is a separate
question answered by a :class:`~p2pexec.keys.Keyring` (see :class:`Inbox`).

The board relays bytes and knows nothing; the pico.sh board does not even
know who sent a line.  So every message names its cluster, carries an id and
an expiry, and receivers drop what is stale, replayed, or not a member's.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ..keys import Identity, Members, valid_username

# The signed envelope's format, not the bodies': a peer of another VERSION drops our lines unread, with no hint
# to anyone, so a change of what bodies carry or mean bumps matching.REVISION instead, which peers explain.
VERSION = 1
MAX_LINE_BYTES = 4096
MAX_LIST_BYTES = 60000  # a "members" line carries the whole signed list
MAX_LIFETIME = 300.0
CLOCK_SKEW = 60.0
# Ids an Inbox remembers at most; past it, new messages are dropped ("seen-full") rather than
# old ids forgotten early, which would let their messages be replayed.  About 25 MB; a member
# would have to send 280 lines a second for the 360 s an id can live to fill it.
MAX_SEEN = 100_000
_SIGN_CONTEXT = b"p2pexec/board-message/v1\n"
_ENVELOPE = ("v", "type", "from", "key", "cluster", "id", "ts", "exp", "sig")

# Fields each message type must carry, with their JSON types.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"role": str},
    "request": {"req": str, "n": int, "py": str},
    "offer": {"req": str, "to": str, "slots": int, "py": str, "peer": str, "addrs": list, "kx": str},
    "accept": {"offer": str, "worker": str, "req": str, "kx": str, "slots": int},
    "withdraw": {"req": str},
    "decline": {"req": str, "to": str, "why": str},  # a worker will not serve this request (why: python, allow)
    "bye": {"role": str},
    "relay": {"addrs": list},  # the cluster owner's word on where its relay is (p2pexec relay OWNER/NAME)
    "members": {"list": str},  # the owner's signed member list (p2pexec invite / remove)
    "joined": {"endorsement": str},  # a friend's new key, signed with their invitation key (p2pexec join)
}


class InvalidMessage(ValueError):
    """A line is not a valid message; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    type: str
    sender: str
    key: bytes
    cluster: str
    id: str
    ts: float
    exp: float
    body: dict[str, Any] = field(default_factory=dict)
    line: bytes = b""

    def __getitem__(self, name: str) -> Any:
        return self.body[name]


_MACHINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
MACHINE_NAME_RULE = "1 to 32 letters, digits, '.', '_' or '-', starting with a letter or digit"


def machine_name(value: Any) -> str:
    """A worker's name for its machine (``--name``), as a peer sent it: kept only if short and plain, so that
    a member's two machines can be told apart in logs and ``status`` without letting escape codes in."""
    return value if isinstance(value, str) and _MACHINE_NAME.fullmatch(value) else ""


def host_machine_name(hostname: str) -> str:
    """This machine's default name: its host name's first label, cut to what :func:`machine_name` keeps."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "", hostname.split(".")[0])[:32]
    return machine_name(plain)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, length: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidMessage("bad-field", "not base64") from None
    if length is not None and len(raw) != length:
        raise InvalidMessage("bad-field", f"expected {length} bytes")
    return raw


def _canonical(fields: dict[str, Any]) -> bytes:
    return _SIGN_CONTEXT + json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def new_id() -> str:
    return os.urandom(12).hex()


def encode(identity: Identity, cluster: str, type: str, body: dict[str, Any], *,
           now: float, ttl: float, msg_id: str | None = None) -> bytes:
    """Sign a message; returns the line without its trailing newline."""
    if type not in SCHEMAS:
        raise ValueError(f"unknown message type {type!r}")
    if not 0 < ttl <= MAX_LIFETIME:
        raise ValueError("ttl out of range")
    clash = set(body) & set(_ENVELOPE)
    if clash:
        raise ValueError(f"body may not set envelope fields {sorted(clash)}")
    fields = dict(body)
    fields.update({
        "v": VERSION, "type": type, "from": identity.user, "key": b64(identity.public_key),
        "cluster": cluster, "id": msg_id or new_id(), "ts": round(now, 3), "exp": round(now + ttl, 3),
    })
    sig = identity.sign(_canonical(fields))
    fields["sig"] = b64(sig)
    line = json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if len(line) > _limit(type):
        raise ValueError(f"message of {len(line)} bytes exceeds {_limit(type)}")
    return line


def _limit(type: str) -> int:
    return MAX_LIST_BYTES if type == "members" else MAX_LINE_BYTES


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` keeps the last of two equal keys; another parser may keep the first."""
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise InvalidMessage("duplicate-key")
    return fields


def decode(line: bytes, for_user: str | None = None, skip: frozenset[str] = frozenset()) -> Message:
    """Parse a line and check its structure and signature (not its freshness or sender).

    Strict, so that the board's check and every receiver's reading of a line
    cannot differ: UTF-8 only (``json.loads`` of bytes would also take a BOM,
    UTF-16 and UTF-32), nothing around the object, no key twice.  With
    ``for_user``, a line addressed (``to``) to someone else is dropped as
    ``not-for-us`` before its signature is checked: on a broadcast board
    (pico.sh) every participant sees every offer, and checking each one's
    signature would cost every participant time in proportion to the cluster.
    Types in ``skip`` (what this receiver never reads) are dropped the same way.
    """
    if len(line) > MAX_LIST_BYTES:
        raise InvalidMessage("too-long")
    try:
        fields = json.loads(line.decode("utf-8"), object_pairs_hook=_unique_keys)
    except InvalidMessage:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidMessage("not-json") from None
    if not isinstance(fields, dict):
        raise InvalidMessage("not-object")
    if not (line.startswith(b"{") and line.endswith(b"}")):
        raise InvalidMessage("padded")  # JSON allows whitespace around; receivers need not
    if fields.get("v") != VERSION:
        raise InvalidMessage("version", repr(fields.get("v")))
    mtype = fields.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise InvalidMessage("unknown-type")
    schema = SCHEMAS[mtype]
    if len(line) > _limit(mtype):
        raise InvalidMessage("too-long")
    for name, kind in (("from", str), ("key", str), ("cluster", str), ("id", str), ("sig", str)):
        if not isinstance(fields.get(name), kind):
            raise InvalidMessage("bad-envelope", name)
    for name in ("ts", "exp"):
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidMessage("bad-envelope", name)
    for name, expected in schema.items():
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, expected):
            raise InvalidMessage("bad-field", f"{mtype}.{name}")
    if not valid_username(fields["from"]):
        raise InvalidMessage("bad-envelope", "from")
    if (for_user is not None and fields.get("to", for_user) != for_user) or mtype in skip:
        raise InvalidMessage("not-for-us")
    key = unb64(fields["key"], 32)
    sig = unb64(fields.pop("sig"), 64)
    try:
        VerifyKey(key).verify(_canonical(fields), sig)
    except (BadSignatureError, ValueError):
        raise InvalidMessage("bad-signature") from None
    body = {k: v for k, v in fields.items() if k not in _ENVELOPE}
    return Message(type=mtype, sender=fields["from"], key=key, cluster=fields["cluster"],
                   id=fields["id"], ts=float(fields["ts"]), exp=float(fields["exp"]),
                   body=body, line=line)


@dataclass(frozen=True)
class Route:
    """What a board does with one line: ``refusal`` says why it drops it; else it goes to the
    sessions of ``to`` alone when the line is addressed, or to every receiver (a board that knows the
    receivers' roles may narrow that by ``message``, the line as read, see :mod:`p2pexec.board.fanout`)."""

    refusal: str | None = None
    to: str | None = None
    message: Message | None = field(default=None, compare=False, repr=False)


def route(line: bytes, user: str, key: bytes, cluster: str | None) -> Route:
    """Whether and to whom a board relays ``line`` from a session of ``user`` with ``key``.

    ``line`` must be exactly what receivers will hand to :func:`decode` (the
    board splits lines on newline as they do), so whatever passes here they
    read as it was read here.  On a cluster's topic (``cluster`` given) only
    that cluster's messages pass; on other topics lines that are not messages
    pass too (pico.sh users pipe plain text there, and receivers drop them).
    """
    try:
        msg = decode(line)
    except InvalidMessage:
        return Route("not-a-message" if cluster is not None else None)
    if msg.sender != user or msg.key != key:
        return Route("bad-sender")
    if cluster is not None and msg.cluster != cluster:
        return Route("other-cluster")
    to = msg.body.get("to")
    return Route(to=to if isinstance(to, str) else None, message=msg)


class SeenIds:
    """The ids of accepted messages until they expire, in constant time per id, amortised.

    Ids are kept in buckets by the second they expire in; a heap orders the
    buckets, of which there are at most about MAX_LIFETIME + CLOCK_SKEW
    (exp is checked against now first), so each id costs one dict insert,
    one list append and, once its second has passed, one delete.
    """

    def __init__(self, limit: int = MAX_SEEN) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._expiry: dict[str, float] = {}
        self._buckets: dict[int, list[str]] = {}  # ceil(exp) -> ids expiring in that second
        self._heap: list[int] = []  # the keys of _buckets

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._expiry

    def prune(self, now: float) -> None:
        """Forget the ids of every second that has passed (ids live up to a second past exp)."""
        while self._heap and self._heap[0] <= now:
            for msg_id in self._buckets.pop(heapq.heappop(self._heap)):
                del self._expiry[msg_id]

    def add(self, msg_id: str, exp: float) -> bool:
        """Remember ``msg_id`` until ``exp``; False if full (call :meth:`prune` first)."""
        if len(self._expiry) >= self.limit:
            return False
        self._expiry[msg_id] = exp
        key = math.ceil(exp)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            heapq.heappush(self._heap, key)
        bucket.append(msg_id)
        return True


class Inbox:
    """Filters raw board lines down to fresh, unreplayed messages from members.

    Pure: the caller passes the current time.  Drops are counted by reason
    in :attr:`dropped` so tests and ``status`` can see them.  With a live
    :class:`~p2pexec.membership.Membership` as keyring, ``members`` and
    ``joined`` messages update it here and go no further.  At most
    ``max_seen`` unexpired ids are remembered; a flood past that is dropped
    as ``seen-full``.
    """

    def __init__(self, cluster: str, keyring: Members, max_seen: int = MAX_SEEN, me: str | None = None,
                 skip: frozenset[str] = frozenset()) -> None:
        self.cluster = cluster
        self.keyring = keyring
        self.me, self.skip = me, skip  # lines addressed to others, and types we never read: dropped unread
        self.dropped: Counter[str] = Counter()
        self._seen = SeenIds(max_seen)
        self._latest = -math.inf  # the latest time seen: ids forgotten then must stay expired if the clock steps back

    def receive(self, line: bytes, now: float) -> Message | None:
        try:
            msg = self._check(line, now)
        except InvalidMessage as exc:
            self.dropped[exc.reason] += 1
            return None
        return msg

    def _check(self, line: bytes, now: float) -> Message:
        msg = decode(line, self.me, self.skip)
        if msg.cluster != self.cluster:
            raise InvalidMessage("other-cluster")
        if msg.type == "joined" and hasattr(self.keyring, "admit"):
            self.keyring.admit(msg.sender, msg.key, unb64(msg["endorsement"], 64))
        if not self.keyring.allows(msg.sender, msg.key):
            raise InvalidMessage("not-a-member")
        self._latest = max(self._latest, now)
        if msg.exp <= self._latest or msg.ts > now + CLOCK_SKEW or msg.exp - msg.ts > MAX_LIFETIME:
            raise InvalidMessage("expired")
        self._seen.prune(self._latest)
        if msg.id in self._seen:
            raise InvalidMessage("replayed")
        if not self._seen.add(msg.id, msg.exp):
            raise InvalidMessage("seen-full")
        if msg.type in ("members", "joined"):
            if msg.type == "members" and hasattr(self.keyring, "update"):
                self.keyring.update(msg["list"])  # only the owner's newer, signed list takes
            raise InvalidMessage("membership")  # handled: not for the scheduler or the worker
        return msg
