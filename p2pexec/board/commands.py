"""Parse a board command line (the SSH exec string) in the pico.sh pipe language.

Pure: no I/O, so the server, the tests and any client agree on one grammar.
Flags follow Go's ``flag`` package as pico does (``-x``, ``--x``, ``-x=v``;
booleans take no separate value and ``-x=false`` turns one off; a value flag
takes the next word whatever it looks like), except that flags may come
before or after the topic.  Topics are resolved against the caller here, so
the server only ever sees full ``owner/name`` topics.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..keys import valid_username

PUBLIC = "public"
MAX_TOPIC = 128
_COMPONENT = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")  # no leading "-": not a flag

USAGE = {
    "pipe": "pipe TOPIC [-a USER,...] [-p] [-r] [-c]",
    "sub": "sub TOPIC [-a USER,...] [-p] [-k] [-c]",
    "pub": "pub TOPIC [-a USER,...] [-p] [-b] [-t DURATION] [-c]",
    "ls": "ls",
    "help": "help",
    "user": "user",
    "relay": "relay",
    "invite": "invite OWNER/NAME USER INVITATION-KEY",
    "join": "join OWNER/NAME ENDORSEMENT",
    "members": "members OWNER/NAME [SIGNED-LIST]",
}

HELP = """\
p2pexec board: pico.sh-compatible pubsub over SSH. Commands:
  pipe TOPIC [-a USER,...] [-p] [-r] [-c]
        bidirectional: what you write goes to every other pipe and sub of TOPIC
        -r also receive your own lines
  sub TOPIC [-a USER,...] [-p] [-k] [-c]
        print the lines sent to TOPIC; ends when the last pub leaves
        -k keep listening after publishers leave
  pub TOPIC [-a USER,...] [-p] [-b] [-t DURATION] [-c]
        send stdin to the subscribers of TOPIC
        -b wait for a subscriber first (default; -b=false to not wait)
        -t give up waiting after DURATION (e.g. 5s, 1m30s)
  ls    list your topics
  user  print your user name
  relay print the board's libp2p relay addresses and your address as seen here (JSON)
  invite OWNER/NAME USER KEY   (owner) let USER join once, proving it with the invitation KEY
  join OWNER/NAME ENDORSEMENT  register your key as the invited USER (p2pexec join does this)
  members OWNER/NAME [LIST]    print the cluster's signed member list; its owner sets a new one
  help  this text
Common flags: -a the members who may join (owner only; persisted),
-p public topic (public/TOPIC, open to every user), -c no status text.
A bare TOPIC means YOU/TOPIC; name another user's topic as OWNER/TOPIC.
Lines are relayed whole; -x=false turns a boolean flag off.
"""

# flag -> takes a value; which flags each command accepts.
_VALUE_FLAGS = frozenset({"a", "t"})
_FLAGS: dict[str, frozenset[str]] = {
    "pipe": frozenset("aprc"),
    "sub": frozenset("apkc"),
    "pub": frozenset("apbtc"),
    "ls": frozenset(),
    "help": frozenset(),
    "user": frozenset(),
    "relay": frozenset(),
    "invite": frozenset(),
    "join": frozenset(),
    "members": frozenset(),
}
_ARGS = {"invite": (2, 2), "join": (1, 1), "members": (0, 1)}  # words after the topic: (fewest, most)
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_UNITS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"),
          "μs": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": Decimal(1),
          "m": Decimal(60), "h": Decimal(3600)}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_MAX_SECONDS = Decimal(2**63 - 1) * Decimal("1e-9")  # Go's time.Duration range


class CommandError(ValueError):
    """The command line is unknown or malformed; ``str(exc)`` is for the user."""


@dataclass(frozen=True)
class Command:
    """One parsed board command, with its topic resolved to ``owner/name``."""

    name: str
    topic: str | None = None
    access: tuple[str, ...] | None = None
    replay: bool = False            # pipe -r: receive my own lines too
    keep: bool = False              # sub -k: stay after the publishers leave
    block: bool = True              # pub -b: wait for a subscriber first
    timeout: float | None = None    # pub -t: seconds to wait for one
    clean: bool = False             # -c: no status text
    args: tuple[str, ...] = ()      # words after the topic (invite, join, members)

    @property
    def owner(self) -> str | None:
        return self.topic.split("/", 1)[0] if self.topic else None

    @property
    def public(self) -> bool:
        return self.owner == PUBLIC

    def to_line(self) -> str:
        """A command line that parses back to this command (for any caller)."""
        words = [self.name]
        if self.topic is not None:
            words.append(self.topic)
        words += [shlex.quote(a) for a in self.args]
        if self.access is not None:
            words += ["-a", shlex.quote(",".join(self.access))]
        if self.replay:
            words.append("-r")
        if self.keep:
            words.append("-k")
        if not self.block:
            words.append("-b=false")
        if self.timeout is not None:
            words += ["-t", format_duration(self.timeout)]
        if self.clean:
            words.append("-c")
        return " ".join(words)


def parse(line: str, caller: str) -> Command:
    """Parse ``line`` as typed by user ``caller``; raise CommandError if it is not valid."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise CommandError(f"cannot parse command: {exc}") from None
    if not words:
        raise CommandError("missing command; run 'help' for usage")
    name, args = words[0], words[1:]
    if name not in _FLAGS:
        raise CommandError(f"unknown command {name!r}; commands: {', '.join(_FLAGS)}")
    allowed = _FLAGS[name]
    usage = f"usage: {USAGE[name]}"
    values: dict[str, str | bool] = {}
    positional: list[str] = []
    it = iter(args)
    for word in it:
        if word == "--":
            positional += list(it)
            break
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        flag, eq, value = word.lstrip("-").partition("=")
        if word.startswith("---") or flag not in allowed:
            raise CommandError(f"unknown flag {word.partition('=')[0]!r} for {name}; {usage}")
        if flag in _VALUE_FLAGS:
            if not eq:
                value = next(it, None)  # type: ignore[assignment]
                if value is None:
                    raise CommandError(f"flag -{flag} needs a value; {usage}")
            values[flag] = value
        elif not eq:
            values[flag] = True
        elif value in _TRUE or value in _FALSE:
            values[flag] = value in _TRUE
        else:
            raise CommandError(f"flag -{flag} takes true or false, not {value!r}")
    if name in ("ls", "help", "user", "relay"):
        if positional:
            raise CommandError(f"{name} takes no arguments; {usage}")
        return Command(name)
    if not positional:
        raise CommandError(f"missing topic; {usage}")
    fewest, most = _ARGS.get(name, (0, 0))
    if len(positional) > 1 + most:
        raise CommandError(f"unexpected argument {positional[1 + most]!r}; {usage}")
    if len(positional) < 1 + fewest:
        raise CommandError(f"missing arguments; {usage}")
    topic = resolve_topic(positional[0], caller, public=bool(values.get("p", False)))
    if name in _ARGS:
        if topic.startswith(PUBLIC + "/"):
            raise CommandError(f"{name} needs a cluster OWNER/NAME, not a public topic")
        return Command(name, topic, args=tuple(positional[1:]))
    access = None
    if "a" in values:
        if topic.startswith(PUBLIC + "/"):
            raise CommandError("public topics are open to every user and have no access list")
        access = parse_access(str(values["a"]))
    timeout = parse_duration(str(values["t"])) if "t" in values else None
    return Command(name, topic, access,
                   replay=bool(values.get("r", False)), keep=bool(values.get("k", False)),
                   block=bool(values.get("b", True)), timeout=timeout,
                   clean=bool(values.get("c", False)))


def resolve_topic(topic: str, caller: str, public: bool = False) -> str:
    """``T`` -> ``caller/T``, ``owner/T`` stays, with ``public`` ``T`` -> ``public/T``."""
    if "/" not in topic:
        topic = f"{PUBLIC if public else caller}/{topic}"
    elif public and not topic.startswith(PUBLIC + "/"):
        raise CommandError(f"-p names a public topic: give a bare name, not {topic!r}")
    if not valid_topic(topic):
        raise CommandError(
            f"invalid topic {topic!r}: expected OWNER/NAME of letters, digits, '_', '.', '-' "
            "not starting with '-' "
            f"(at most {MAX_TOPIC} characters)")
    return topic


def valid_topic(topic: str) -> bool:
    parts = topic.split("/")
    return (len(topic) <= MAX_TOPIC and len(parts) == 2 and valid_username(parts[0])
            and _COMPONENT.fullmatch(parts[1]) is not None and parts[1] not in (".", ".."))


def parse_access(text: str) -> tuple[str, ...]:
    """``alice,bob`` -> ``("alice", "bob")``: user names only, deduplicated, in order."""
    names: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if not valid_username(name):
            raise CommandError(f"invalid user name {name!r} in -a (the board knows users by name)")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_duration(text: str) -> float:
    """Seconds in a Go duration such as ``5s``, ``1m30s``, ``250ms`` (or ``0``)."""
    bad = CommandError(f"invalid duration {text!r} for -t: use e.g. 5s, 1m30s, 250ms")
    if text == "0":
        return 0.0
    pos, total = 0, Decimal(0)
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match or match.group(1) in ("", "."):
            raise bad
        try:
            total += Decimal(match.group(1)) * _UNITS[match.group(2)]
        except InvalidOperation:
            raise bad from None
        pos = match.end()
    if pos == 0:
        raise bad
    if total > _MAX_SECONDS:
        raise CommandError(f"duration {text!r} is too long")
    return float(total)


def format_duration(seconds: float) -> str:
    """Inverse of :func:`parse_duration`: exact for every finite float it returns."""
    text = repr(float(seconds))
    if "e" in text or "n" in text:
        text = format(Decimal(seconds), "f")
    return text.removesuffix(".0") + "s"
