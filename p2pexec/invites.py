"""``p2pexec invite``, ``join`` and ``remove``: one command each for the owner and for a friend.

An invitation code carries everything a friend needs: the board's address
and host key, the cluster, the owner's public key (pinned: only lists it
signed count) and the private half of a one-time invitation key.  The owner
puts the invitation key on the cluster's signed member list; the friend
endorses their own SSH key with it (see :mod:`p2pexec.membership`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from nacl.signing import SigningKey

from .board.address import BoardAddress, known_hosts_name
from .board.client import DEFAULT_KNOWN_HOSTS, connect, exec_command, fingerprint
from .board.registry import INVITE_DAYS
from .config import (Participant, cluster_state_path, config_dir, load_cluster_state, membership_of, resolve,
                     save_cluster_state, saved_clusters, validate_cluster)
from .errors import AuthenticationError, ConfigurationError, P2PExecError
from .keys import Identity, generate_identity_file, load_identity, valid_username
from .membership import INVITE, Entry, MemberList, Membership, endorse
from .protocol import messages
from .protocol.reach import scope

log = logging.getLogger(__name__)

CODE_PREFIX = "p2pexec1:"


@dataclass(frozen=True)
class Invitation:
    """What a code says; :meth:`code` and :meth:`parse` are inverse."""

    board: str  # ssh://FRIEND@HOST:PORT
    host_key: str  # "ssh-ed25519 AAAA..." as the board presents it
    cluster: str
    owner_key: str  # "ssh-ed25519 AAAA..."
    user: str
    seed: bytes  # the invitation key's private half

    def code(self) -> str:
        data = {"b": self.board, "h": self.host_key, "c": self.cluster, "o": self.owner_key, "u": self.user,
                "s": base64.urlsafe_b64encode(self.seed).decode()}
        return CODE_PREFIX + base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()

    @classmethod
    def parse(cls, code: str) -> "Invitation":
        bad = ConfigurationError("this is not a p2pexec invitation code: copy the whole last line that "
                                 "'p2pexec invite' printed")
        if not code.strip().startswith(CODE_PREFIX):
            raise bad
        try:
            data = json.loads(base64.urlsafe_b64decode(code.strip()[len(CODE_PREFIX):]))
            seed = base64.urlsafe_b64decode(data["s"])
            invitation = cls(data["b"], data["h"], validate_cluster(data["c"]), data["o"], data["u"], seed)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad from None
        if len(seed) != 32 or not valid_username(invitation.user) \
                or not all(isinstance(v, str) for v in (invitation.board, invitation.host_key, invitation.owner_key)):
            raise bad
        return invitation


def _next_version(current: MemberList | None) -> int:
    return max((current.version + 1) if current else 1, int(time.time() * 1000))


def _owner_membership(cluster: str, owner: Identity, board: BoardAddress) -> tuple[Membership, dict[str, Any]]:
    """The owner's own cluster file (created at the first invitation), and its live list."""
    state = load_cluster_state(cluster) or {}
    state.update(board=str(BoardAddress(board.host, board.port, owner.user)), user=owner.user,
                 owner_key=owner.openssh_public)
    if owner.path is not None:
        state["identity"] = str(owner.path)
    return membership_of(cluster, state), state


def _command(client: paramiko.SSHClient, command: str, what: str) -> str:
    status, out, err = exec_command(client, command)
    if status != 0:
        if "unknown command" in err:
            raise P2PExecError(f"this board cannot {what} (it is not a p2pexec board, or an older one): {err}. "
                               f"Use a p2pexec board (p2pexec board) or a hand-kept members file (--members)")
        raise P2PExecError(f"the board refused to {what}: {err}")
    return out


def _publish(client: paramiko.SSHClient, topic: str, line: bytes) -> None:
    """Tell members online now (the board keeps the list for those who are not)."""
    transport = client.get_transport()
    assert transport is not None
    channel = transport.open_session(timeout=10)
    try:
        channel.settimeout(10)
        channel.exec_command(f"pub {topic} -b=false -c")
        channel.sendall(line + b"\n")
        channel.shutdown_write()
        channel.recv_exit_status()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        log.warning("could not tell the members online now: %s", exc)
    finally:
        channel.close()


def _catch_up(client: paramiko.SSHClient, membership: Membership) -> None:
    """Start from the board's list, not this machine's copy: another machine of the owner may have changed it."""
    try:
        membership.apply_view(json.loads(_command(client, f"members {membership.cluster}", "keep member lists")))
    except ValueError:
        raise P2PExecError("the board's answer to members was not a member list") from None


def _set_list(client: paramiko.SSHClient, owner: Identity, membership: Membership, new: MemberList) -> None:
    """Sign ``new`` (keys friends joined with become its own entries), tell the members online, then store it
    on the board (which then enforces it)."""
    new = MemberList(new.cluster, new.version, {
        user: (*entries, *(Entry.ssh(key) for key in membership.joins.get(user, {})
                           if Entry.ssh(key) not in entries))
        for user, entries in new.members.items()})
    signed = new.signed(owner)
    text = signed.to_json()
    _publish(client, membership.cluster, messages.encode(owner, membership.cluster, "members", {"list": text},
                                                         now=time.time(), ttl=60))
    _command(client, f"members {membership.cluster} {base64.b64encode(text.encode()).decode()}",
             "keep member lists")
    if not membership.update(text):
        raise P2PExecError("internal error: the new member list did not verify")


def _owner_only(who: Participant, friend: str, doing: str) -> str:
    """The cluster's owner, who must be the one ``doing`` this, to someone else (the owner is no member
    of their own list: an invitation in their name would let whoever redeems it log in as them)."""
    owner = who.cluster.partition("/")[0]
    if who.identity.user != owner:
        saved = saved_clusters()
        unknown = "" if who.cluster in saved else (
            f". No cluster {who.cluster} is saved on this machine (saved here: {', '.join(saved) or 'none'}): "
            f"check its name. The first invitation creates a cluster")
        raise P2PExecError(f"only {owner} can {doing} {who.cluster}; you are {who.identity.user!r} "
                           f"(pass --user {owner} with {owner}'s key){unknown}")
    if friend == owner:
        raise P2PExecError(f"{owner} owns {who.cluster}: the owner is always in it, and cannot be "
                           "invited or removed")
    return owner


def _only_here(host: str) -> bool:
    """Does ``host`` name this machine alone (loopback), which no friend elsewhere reaches?"""
    if host == "localhost":
        return True
    try:
        return scope(host) == "loopback"
    except ValueError:  # a name
        return False


def invite(cluster: str, friend: str, *, board: str | None = None, identity: str | None = None,
           user: str | None = None, known_hosts: Path = DEFAULT_KNOWN_HOSTS,
           accept_new_host_key: bool = False) -> str:
    """Put ``friend`` on the owner's signed list with a fresh invitation key; returns the code."""
    if not valid_username(friend):
        raise ConfigurationError(f"invalid user name {friend!r}: letters, digits, '_', '.', '-'")
    who = resolve(cluster, board=board, user=user, identity=identity, members_required=False)
    owner = _owner_only(who, friend, "invite to")
    membership, state = _owner_membership(who.cluster, who.identity, who.board)
    seed = os.urandom(32)
    invitation_key = bytes(SigningKey(seed).verify_key)
    client = connect(who.board, who.identity, known_hosts, accept_new_host_key)
    try:
        host_key = client.get_transport().get_remote_server_key()
        _catch_up(client, membership)
        base = membership.list or MemberList(who.cluster, 0, {})
        kept = tuple(e for e in base.members.get(friend, ()) if e.kind != INVITE)  # an older invitation goes
        new = MemberList(who.cluster, _next_version(membership.list),
                         {**base.members, friend: (*kept, Entry(INVITE, invitation_key))})
        _command(client, f"invite {who.cluster} {friend} {base64.b64encode(invitation_key).decode()}",
                 "hold invitations")
        _set_list(client, who.identity, membership, new)
    finally:
        client.close()
    save_cluster_state(who.cluster, state)
    log.info("invited %s to %s; the code is valid once, for 7 days", friend, who.cluster)
    if _only_here(who.board.host):
        log.warning("the code names the board as %s, which only this machine reaches: for friends elsewhere, "
                    "invite with --board ssh://%s@HOST:%d, HOST being a name or address they reach it at",
                    who.board.host, owner, who.board.port)
    return Invitation(str(BoardAddress(who.board.host, who.board.port, friend)),
                      f"{host_key.get_name()} {host_key.get_base64()}", who.cluster, who.identity.openssh_public,
                      friend, seed).code()


def remove(cluster: str, friend: str, *, board: str | None = None, identity: str | None = None,
           user: str | None = None, known_hosts: Path = DEFAULT_KNOWN_HOSTS,
           accept_new_host_key: bool = False) -> None:
    """Take ``friend`` off the list: the board and every member online drop them within moments."""
    who = resolve(cluster, board=board, user=user, identity=identity, members_required=False)
    _owner_only(who, friend, "remove members of")
    membership, state = _owner_membership(who.cluster, who.identity, who.board)
    client = connect(who.board, who.identity, known_hosts, accept_new_host_key)
    try:
        _catch_up(client, membership)
        if membership.list is None or friend not in membership.list.members:
            raise P2PExecError(f"{friend} is not on the member list of {who.cluster} "
                               f"(members: {', '.join(membership.users())})")
        _set_list(client, who.identity, membership, membership.list.without(friend, _next_version(membership.list)))
    finally:
        client.close()
    save_cluster_state(who.cluster, state)


def _friend_identity(user: str, identity: str | None) -> tuple[Identity, str]:
    """The key to join with: the one given, else p2pexec's own (created the first time): not the everyday
    ~/.ssh/id_ed25519, which a worker would then keep in memory and sign with (it warns of that)."""
    if identity:
        return load_identity(user, identity), ""
    dedicated = config_dir() / "keys" / "id_ed25519"
    if not dedicated.exists():
        generate_identity_file(dedicated, comment=f"{user} (p2pexec)")
        return load_identity(user, dedicated), f"created a key for p2pexec at {dedicated}"
    return load_identity(user, dedicated), ""


def _pin_host_key(board: BoardAddress, host_key: str, known_hosts: Path) -> None:
    """Record the board's host key from the code, refusing if known_hosts says otherwise."""
    name = known_hosts_name(board)
    kind, _, blob = host_key.partition(" ")
    key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    hosts = paramiko.HostKeys()
    if known_hosts.exists():
        hosts.load(str(known_hosts))
    known = hosts.lookup(name) or {}
    if kind in known:
        if known[kind] != key:
            raise P2PExecError(f"{known_hosts} has another host key for the board {name} than the invitation "
                               f"({fingerprint(key)}): someone may be intercepting, or the board changed its "
                               f"key; remove the old line if you trust the invitation")
        return
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (~/.ssh, as ssh makes it)
    with open(known_hosts, "a") as f:
        f.write(f"{name} {kind} {blob}\n")


def join(code: str, *, identity: str | None = None, known_hosts: Path = DEFAULT_KNOWN_HOSTS) -> list[str]:
    """Join with an invitation code; returns lines that tell the friend what happened and what next."""
    invitation = Invitation.parse(code)
    cluster, user = invitation.cluster, invitation.user
    joined_as = (load_cluster_state(cluster) or {}).get("user")
    if joined_as not in (None, user):
        raise P2PExecError(f"this machine joined {cluster} as {joined_as} already, and this code invites {user}: "
                           f"each friend joins with their own code, on their own machine. To be {user} here "
                           f"instead, remove {cluster_state_path(cluster)} and join again")
    board = BoardAddress.parse(invitation.board)
    me, created = _friend_identity(user, identity)
    known_hosts = Path(known_hosts).expanduser()
    _pin_host_key(board, invitation.host_key, known_hosts)
    endorsement = endorse(invitation.seed, cluster, user, me.public_key)
    spent = (f"this invitation code was used already, or has expired (a code works once, within "
             f"{INVITE_DAYS} days): ask {cluster.partition('/')[0]} for a new one (p2pexec invite {cluster} {user})")
    if joined_as == user:
        spent = (f"you joined {cluster} as {user} before (saved in {cluster_state_path(cluster)}), so there may be "
                 f"nothing to do: p2pexec status {cluster} tells. Otherwise {spent}")
    try:
        client = connect(board, me, known_hosts, cluster=cluster)
    except AuthenticationError:  # only a friend with an open invitation, or one who joined, may log in
        raise P2PExecError(f"the board did not let {user} in: {spent}") from None
    try:
        try:
            answer = _command(client, f"join {cluster} {base64.b64encode(endorsement).decode()}",
                              "accept invitations")
        except P2PExecError as exc:
            if "no open invitation" in str(exc):
                raise P2PExecError(f"the board has no open invitation for {user} to {cluster}: {spent}") from None
            raise
        view = json.loads(answer)
        state: dict[str, Any] = {"board": invitation.board, "user": user, "identity": str(me.path),
                                 "owner_key": invitation.owner_key}
        membership = membership_of(cluster, state)
        membership.on_change = lambda m: None  # saved below, once it is known to hold us
        membership.apply_view(view)
        if not membership.allows(user, me.public_key):
            raise P2PExecError(f"the owner's member list of {cluster} does not vouch for your key: ask "
                               f"{cluster.partition('/')[0]} for a new invitation")
        _publish(client, cluster, messages.encode(me, cluster, "joined", {"endorsement": base64.b64encode(
            endorsement).decode()}, now=time.time(), ttl=60))
    except ValueError:
        raise P2PExecError("the board's answer to join was not a member list") from None
    finally:
        client.close()
    state.update(list=membership.list.to_json() if membership.list else None, joins=membership.joins_json())
    save_cluster_state(cluster, state)
    lines = [created] if created else []
    lines += [f"joined {cluster} as {user} with the key {me.where}; saved in {cluster_state_path(cluster)}",
              f"lend this machine:   p2pexec-worker --cluster {cluster}",
              f"use the cluster:     P2PExecutor(\"{cluster}\")"]
    return lines

