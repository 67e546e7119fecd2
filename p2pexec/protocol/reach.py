"""Reaching peers across home routers: pure rules, no I/O.

Three decisions live here, each testable without a network:

* **Who may use a relay.**  A member binds its libp2p peer id to its SSH
  key with a signed *relay ticket*; the relay serves only peers whose
  ticket verifies against its users or members file.
* **Which addresses a worker tells a client.**  Loopback addresses only to
  a peer in the same network namespace, private ones only to a peer behind
  the same public address (or when neither knows its public address),
  public ones only once something outside dialled them back, and the relay
  circuit whenever there is one.
* **When to dial a worker again.**  Per peer, exponential: a worker that
  cannot be reached costs a few board lines per attempt, not hundreds a
  second.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ..keys import Identity, valid_username

_TICKET_CONTEXT = b"p2pexec/relay-ticket/v1\n"
TICKET_MAX_AGE = 300.0
MAX_TICKET_BYTES = 2048
CIRCUIT = "/p2p-circuit"


class InvalidTicket(ValueError):
    """A relay ticket does not prove membership; the message says why."""


# -- relay tickets ---------------------------------------------------------------------
def _ticket_bytes(fields: dict[str, object]) -> bytes:
    return _TICKET_CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def make_ticket(identity: Identity, peer: str, relay: str, now: float) -> bytes:
    """A signed statement "libp2p peer ``peer`` is member ``identity.user``", for relay ``relay`` only."""
    import base64

    fields: dict[str, object] = {"user": identity.user, "key": base64.b64encode(identity.public_key).decode(),
                                 "peer": peer, "relay": relay, "ts": round(now, 3)}
    fields["sig"] = base64.b64encode(identity.sign(_ticket_bytes(fields))).decode()
    return json.dumps(fields, separators=(",", ":")).encode()


def check_ticket(raw: bytes, *, peer: str, relay: str, allows: Callable[[str, bytes], bool], now: float) -> str:
    """The member a ticket proves, or :class:`InvalidTicket`.

    ``peer`` is the libp2p peer the ticket arrived from (Noise proved it),
    ``relay`` our own peer id: a ticket cannot be replayed by another peer
    or at another relay.
    """
    import base64
    import binascii

    if len(raw) > MAX_TICKET_BYTES:
        raise InvalidTicket("ticket too long")
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidTicket("ticket is not JSON") from None
    if not isinstance(fields, dict) or set(fields) != {"user", "key", "peer", "relay", "ts", "sig"}:
        raise InvalidTicket("ticket has the wrong fields")
    user, ts = fields["user"], fields["ts"]
    if not isinstance(user, str) or not valid_username(user):
        raise InvalidTicket("ticket names no valid user")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise InvalidTicket("ticket has no valid time")
    if fields["peer"] != peer:
        raise InvalidTicket("ticket is for another peer id")
    if fields["relay"] != relay:
        raise InvalidTicket("ticket is for another relay")
    if abs(now - ts) > TICKET_MAX_AGE:
        raise InvalidTicket("ticket expired (is the clock right?)")
    try:
        key = base64.b64decode(fields["key"], validate=True)
        sig = base64.b64decode(fields.pop("sig"), validate=True)
        VerifyKey(key).verify(_ticket_bytes(fields), sig)
    except (binascii.Error, ValueError, TypeError, BadSignatureError):
        raise InvalidTicket("ticket signature does not verify") from None
    if not allows(user, key):
        raise InvalidTicket(f"{user!r} with that key is not a member here")
    return user


# -- addresses -------------------------------------------------------------------------
def split_tcp(addr: str) -> tuple[str, int] | None:
    """(ip, port) of ``/ip4|ip6/IP/tcp/PORT...``; None for anything else (circuits included)."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or CIRCUIT in addr:
        return None
    try:
        ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        return None
    return (parts[2], port) if 0 < port < 65536 else None


# Documentation and benchmarking ranges count as private to ``ipaddress``; they are
# what RFC examples and the NAT lab use for public hosts, so they count as public here.
_TEST_PUBLIC = tuple(ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
                                                       "198.18.0.0/15"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def scope(ip: str) -> str:
    """``loopback``, ``private`` (LAN, link-local, CGNAT, unspecified) or ``public``."""
    address = ipaddress.ip_address(ip)
    if address.is_loopback:
        return "loopback"
    if any(address in net for net in _TEST_PUBLIC):
        return "public"
    if address.is_private or address.is_link_local or address.is_unspecified or address in _CGNAT:
        return "private"
    return "public"


@dataclass(frozen=True)
class NetView:
    """Where a peer sits: its network namespace and, if a relay told it, its public IP."""

    netid: str = ""
    public_ip: str | None = None

    def to_json(self) -> dict[str, str]:
        return {"net": self.netid, **({"ip": self.public_ip} if self.public_ip else {})}

    @classmethod
    def from_json(cls, body: dict[str, object]) -> "NetView | None":
        netid, ip = body.get("net"), body.get("ip")
        if not isinstance(netid, str) or len(netid) > 64:
            return None
        if ip is not None and (not isinstance(ip, str) or split_tcp(f"/ip4/{ip}/tcp/1") is None
                               and split_tcp(f"/ip6/{ip}/tcp/1") is None):
            return None
        return cls(netid, ip if isinstance(ip, str) else None)


@dataclass(frozen=True)
class Reachability:
    """What a worker learned about itself: verified public addresses and relay circuits."""

    public: tuple[str, ...] = ()   # addresses a relay dialled back on a fresh connection
    circuits: tuple[str, ...] = ()  # .../p2p/RELAY/p2p-circuit addresses we hold a reservation on
    checked: bool = False           # a relay answered: ``public`` is a verdict, not ignorance
    public_ip: str | None = None    # our address as the relay saw it

    @property
    def kind(self) -> str:
        """For ``status``: ``public``, ``nat`` (relayed, maybe punched), ``unreachable`` or ``unknown``.

        (The worker says ``relay-only`` once a lease stayed relayed: only use tells that.)
        """
        if self.public:
            return "public"
        if self.circuits:
            return "nat"
        return "unreachable" if self.checked else "unknown"


def addrs_for(local: Iterable[str], mine: NetView, reach: Reachability, theirs: NetView | None) -> list[str]:
    """The addresses to give a peer at ``theirs``: only those it can use, best first."""
    same_net = theirs is not None and bool(mine.netid) and theirs.netid == mine.netid
    same_nat = (theirs is not None and mine.public_ip is not None and theirs.public_ip == mine.public_ip)
    nat_unknown = theirs is None or mine.public_ip is None or theirs.public_ip is None
    out: list[str] = []
    for addr in local:
        tcp = split_tcp(addr)
        if tcp is None:
            continue
        kind = scope(tcp[0])
        if kind == "loopback":
            keep = same_net
        elif kind == "private":
            keep = same_net or same_nat or (nat_unknown and not reach.checked)
        else:
            keep = not reach.checked or addr in reach.public
        if keep and addr not in out:
            out.append(addr)
    out.extend(a for a in reach.public if a not in out)
    if not same_net:
        out.extend(a for a in reach.circuits if a not in out)
    order = {"loopback": 0, "private": 1, "public": 2}
    return sorted(out, key=lambda a: 3 if CIRCUIT in a else order[scope(split_tcp(a)[0])])  # type: ignore[index]


def announced_relays(sender: str, cluster: str, addrs: object) -> list[str]:
    """Relay addresses from a ``relay`` message, if its sender owns the cluster (anyone else is ignored)."""
    if sender != cluster.partition("/")[0] or not isinstance(addrs, list):
        return []
    return [a for a in addrs[:4] if isinstance(a, str) and len(a) < 256
            and a.startswith(("/ip4/", "/ip6/", "/dns")) and "/p2p/" in a and CIRCUIT not in a]


def direct_and_relayed(addrs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a worker's addresses into those to dial directly and relay circuits."""
    direct = [a for a in addrs if split_tcp(a) is not None]
    relayed = [a for a in addrs if CIRCUIT in a]
    return direct, relayed


# -- dialing again -----------------------------------------------------------------------
@dataclass
class _Attempts:
    failures: int = 0
    retry_at: float = -math.inf


@dataclass
class DialBackoff:
    """Per-peer exponential backoff for dials that failed.

    ``first`` seconds after the first failure, doubling up to ``cap``.  A
    success forgets the peer.  ``announce`` is True exactly once per peer
    between successes, so its failure is logged as a WARNING once, not on
    every attempt.
    """

    first: float = 2.0
    cap: float = 60.0
    _peers: dict[str, _Attempts] = field(default_factory=dict)

    def ready(self, peer: str, now: float) -> bool:
        entry = self._peers.get(peer)
        return entry is None or now >= entry.retry_at

    def failed(self, peer: str, now: float) -> tuple[float, bool]:
        """Record a failure; returns (seconds until the next attempt, announce it?)."""
        entry = self._peers.setdefault(peer, _Attempts())
        entry.failures += 1
        delay = min(self.cap, self.first * 2 ** (entry.failures - 1))
        entry.retry_at = now + delay
        return delay, entry.failures == 1

    def succeeded(self, peer: str) -> bool:
        """Forget a peer; True if it had failed before (worth an INFO line)."""
        return self._peers.pop(peer, None) is not None

    def failures(self, peer: str) -> int:
        entry = self._peers.get(peer)
        return entry.failures if entry else 0
