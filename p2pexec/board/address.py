"""Where a board is, as members write it: parsed and checked before anything connects (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BoardError
from ..keys import valid_username


@dataclass(frozen=True)
class BoardAddress:
    """Where a board is: ``ssh://user@host:port``, ``user@host``, ``host:port`` or ``host``."""

    host: str
    port: int = 22
    user: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BoardAddress":
        rest = url.strip()
        if "://" in rest:
            scheme, rest = rest.split("://", 1)
            if scheme != "ssh":
                raise BoardError(f"board URL {url!r}: only ssh:// boards are supported")
        rest = rest.rstrip("/")
        user = None
        if "@" in rest:
            user, rest = rest.rsplit("@", 1)
        port = 22
        if rest.startswith("["):  # [::1]:2222
            host, _, tail = rest[1:].partition("]")
            if tail.startswith(":"):
                port = _port(tail[1:], url)
        elif rest.count(":") == 1:
            rest, port_text = rest.split(":")
            host, port = rest, _port(port_text, url)
        else:
            host = rest
        if not host:
            raise BoardError(f"board URL {url!r} names no host")
        if user is not None and not valid_username(user):
            hint = " (did you mean ssh://...?)" if "/" in user else ""
            raise BoardError(f"board URL {url!r}: {user!r} is not a user name{hint}")
        if not set(host) <= _HOST_CHARS or host.startswith(("-", ".")):
            raise BoardError(f"board URL {url!r}: {host!r} is not a host name, an IP address or a ~/.ssh/config Host")
        return cls(host=host, port=port, user=user or None)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}:{self.port}"


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%")  # (: and % in IPv6)


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BoardError(f"board URL {url!r} has an invalid port {text!r}")
    return int(text)


def known_hosts_name(address: BoardAddress) -> str:
    return address.host if address.port == 22 else f"[{address.host}]:{address.port}"
