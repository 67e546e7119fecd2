"""A cluster's member list as its owner's signed word, and invitations that need no second trip.

Pure: no I/O.  The owner signs the list (name -> keys) with a version
number; everyone pins the owner's key when they join and accepts only a
newer list signed by it.  An invitation puts a fresh *invitation key* on
the list in place of the friend's real key, and hands its private half to
the friend in the invitation code.  The friend signs their own SSH key with
it (an *endorsement*) when they join, so that every member can check the
new key at once, even while the owner is offline.  The owner's next list
names the joined keys directly (``p2pexec invite`` and ``remove`` do), so a
later invitation to the same friend does not lock their first key out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, List

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .keys import Identity, openssh_public_line, parse_openssh_public, valid_username
from .protocol.messages import b64, unb64

_LIST_CONTEXT = b"p2pexec/member-list/v1\n"
_JOIN_CONTEXT = b"p2pexec/join/v1\n"
INVITE = "invite"  # a list entry "invite BASE64": the public half of an invitation key


@dataclass(frozen=True)
class Entry:
    """One key a member may use: their own (``ssh-ed25519``) or an invitation's (``invite``)."""

    kind: str
    key: bytes

    def text(self) -> str:
        return openssh_public_line(self.key) if self.kind == "ssh" else f"{INVITE} {b64(self.key)}"

    @classmethod
    def parse(cls, text: str) -> "Entry":
        kind, _, value = text.partition(" ")
        if kind == INVITE:
            return cls(INVITE, unb64(value, 32))
        return cls("ssh", parse_openssh_public(kind, value.split(" ")[0]))

    @classmethod
    def ssh(cls, key: bytes) -> "Entry":
        return cls("ssh", key)


@dataclass(frozen=True)
class MemberList:
    """Who may take part in ``cluster`` (besides its owner), as the owner signed it."""

    cluster: str
    version: int
    members: Mapping[str, tuple[Entry, ...]]
    signature: bytes = b""

    def _signed_bytes(self) -> bytes:
        body = {"cluster": self.cluster, "version": self.version,
                "members": {u: sorted(e.text() for e in es) for u, es in sorted(self.members.items())}}
        return _LIST_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, owner: Identity) -> "MemberList":
        return MemberList(self.cluster, self.version, self.members, owner.sign(self._signed_bytes()))

    def verify(self, owner_key: bytes) -> bool:
        try:
            VerifyKey(owner_key).verify(self._signed_bytes(), self.signature)
        except (BadSignatureError, ValueError):
            return False
        return True

    def to_json(self) -> str:
        return json.dumps({"cluster": self.cluster, "version": self.version, "sig": b64(self.signature),
                           "members": {u: [e.text() for e in es] for u, es in sorted(self.members.items())}},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "MemberList":
        """Parse (not verify); raises ValueError on anything malformed."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("cluster"), str) \
                or type(data.get("version")) is not int or not isinstance(data.get("members"), dict):
            raise ValueError("not a member list")
        members: dict[str, tuple[Entry, ...]] = {}
        for user, entries in data["members"].items():
            if not valid_username(user) or not isinstance(entries, list) \
                    or not all(isinstance(e, str) for e in entries):
                raise ValueError(f"bad member entry {user!r}")
            members[user] = tuple(Entry.parse(e) for e in entries)
        return cls(data["cluster"], data["version"], members, unb64(str(data.get("sig", "")), 64))

    def without(self, user: str, version: int) -> "MemberList":
        return MemberList(self.cluster, version, {u: es for u, es in self.members.items() if u != user})


def endorsement_bytes(cluster: str, user: str, key: bytes) -> bytes:
    return _JOIN_CONTEXT + f"{cluster}\n{user}\n".encode() + key


def endorse(invitation_seed: bytes, cluster: str, user: str, key: bytes) -> bytes:
    """The friend's proof, made with the invitation's private key, that ``key`` is theirs."""
    return SigningKey(invitation_seed).sign(endorsement_bytes(cluster, user, key)).signature


def endorsed(invitation_key: bytes, cluster: str, user: str, key: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(invitation_key).verify(endorsement_bytes(cluster, user, key), signature)
    except (BadSignatureError, ValueError):
        return False
    return True


@dataclass
class Membership:
    """The live member list of one cluster: what :class:`~p2pexec.protocol.messages.Inbox` asks.

    ``allows(user, key)`` holds for the owner's pinned key, for keys the
    list names, and for keys endorsed by one of the user's invitation keys.
    ``on_change`` (e.g. saving a local copy) runs after every change.
    """

    cluster: str
    owner_key: bytes
    list: MemberList | None = None
    joins: dict[str, dict[bytes, bytes]] = field(default_factory=dict)  # user -> key -> endorsement
    on_change: Callable[["Membership"], None] = lambda m: None

    @property
    def owner(self) -> str:
        return self.cluster.partition("/")[0]

    def allows(self, user: str, key: bytes) -> bool:
        if user == self.owner:
            return key == self.owner_key
        entries = self.list.members.get(user, ()) if self.list else ()
        if any(e.kind == "ssh" and e.key == key for e in entries):
            return True
        signature = self.joins.get(user, {}).get(key)
        return signature is not None and self._vouched(user, key, signature)

    def _vouched(self, user: str, key: bytes, signature: bytes) -> bool:
        """One of the user's invitation keys on the list endorsed ``key``."""
        entries = self.list.members.get(user, ()) if self.list else ()
        return any(e.kind == INVITE and endorsed(e.key, self.cluster, user, key, signature) for e in entries)

    def users(self) -> List[str]:  # (``list`` is the attribute here)
        return sorted({self.owner, *(self.list.members if self.list else ())})

    def update(self, text: str) -> bool:
        """Take a newer list if the owner signed it; False (and nothing changes) otherwise."""
        try:
            new = MemberList.from_json(text)
        except (ValueError, TypeError):
            return False
        if new.cluster != self.cluster or not new.verify(self.owner_key) \
                or (self.list is not None and new.version <= self.list.version):
            return False
        self.list = new
        self.joins = {u: ks for u, ks in self.joins.items() if u in new.members}
        self.on_change(self)
        return True

    def admit(self, user: str, key: bytes, signature: bytes) -> bool:
        """Record a friend's endorsed key if an invitation key on the list vouches for it."""
        if self.joins.get(user, {}).get(key) == signature:
            return True
        if not self._vouched(user, key, signature):
            return False
        self.joins.setdefault(user, {})[key] = signature
        self.on_change(self)
        return True

    def joins_json(self) -> dict[str, dict[str, str]]:
        return {u: {b64(k): b64(s) for k, s in ks.items()} for u, ks in self.joins.items()}

    def apply_view(self, view: Any) -> None:
        """Take what a board's ``members`` command answers: the signed list, then the joined keys."""
        if isinstance(view, dict):
            if isinstance(view.get("list"), str):
                self.update(view["list"])
            self.add_joins(view.get("joins"))

    def add_joins(self, joins: Any) -> None:
        """Admit every valid endorsement of a ``joins_json()`` mapping (from the board or a file)."""
        if not isinstance(joins, dict):
            return
        for user, keys in joins.items():
            if isinstance(user, str) and isinstance(keys, dict):
                for key, signature in keys.items():
                    try:
                        self.admit(user, unb64(key, 32), unb64(signature, 64))
                    except ValueError:
                        continue
