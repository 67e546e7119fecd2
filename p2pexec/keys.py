"""SSH Ed25519 identities and authorized-keys style member files.

A user's identity is their OpenSSH Ed25519 key pair: the same key logs them
into the board (paramiko) and signs their board messages (NaCl).  A members
file names who may take part in a cluster, one key per line::

    alice ssh-ed25519 AAAAC3Nza... alice@laptop
    # comments and blank lines are ignored

The board's users file has the same format, so an owner can share it as is.
paramiko is imported only where a key is loaded or an agent asked: what
merely checks signatures (the protocol's pure core) stays free of SSH.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import SigningKey

from .errors import ConfigurationError

ED25519 = "ssh-ed25519"
_USERNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")

log = logging.getLogger("p2pexec.keys")


def valid_username(name: str) -> bool:
    return 0 < len(name) <= 64 and set(name) <= _USERNAME_CHARS and not name.startswith(("-", "."))


@dataclass(frozen=True)
class Identity:
    """A user name bound to the private key that proves it.

    The key is a file (``signing_key`` and ``path``) or lives in ssh-agent
    (``pkey`` only); ``pkey`` is what logs into the board.
    """

    user: str
    signing_key: SigningKey | None = None
    path: Path | None = None
    pkey: Any = None

    @property
    def public_key(self) -> bytes:
        if self.signing_key is not None:
            return bytes(self.signing_key.verify_key)
        return _parse_blob(self.pkey.asbytes())

    @property
    def openssh_public(self) -> str:
        return openssh_public_line(self.public_key)

    @property
    def where(self) -> str:
        """Where the key is, for messages to the user."""
        if self.path is not None:
            return str(self.path)
        digest = base64.b64encode(hashlib.sha256(self.pkey.asbytes()).digest()).decode().rstrip("=")
        return f"the ssh-agent key SHA256:{digest}"

    def sign(self, data: bytes) -> bytes:
        """A raw 64-byte Ed25519 signature of ``data``."""
        if self.signing_key is not None:
            return self.signing_key.sign(data).signature
        import paramiko

        reply = paramiko.Message(self.pkey.sign_ssh_data(data))
        if reply.get_text() != ED25519:
            raise ConfigurationError("ssh-agent answered with a signature that is not ssh-ed25519")
        return reply.get_binary()


def openssh_public_line(raw: bytes) -> str:
    blob = _ssh_string(ED25519.encode()) + _ssh_string(raw)
    return f"{ED25519} {base64.b64encode(blob).decode()}"


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def parse_openssh_public(keytype: str, b64: str) -> bytes:
    """Return the raw 32-byte Ed25519 key of an ``ssh-ed25519 AAAA...`` pair."""
    if keytype != ED25519:
        raise ValueError(f"unsupported key type {keytype!r}: p2pexec needs ssh-ed25519 keys")
    try:
        blob = base64.b64decode(b64, validate=True)
    except ValueError as exc:
        raise ValueError("key is not valid base64") from exc
    parts = []
    while blob:
        if len(blob) < 4:
            raise ValueError("truncated key blob")
        (n,) = struct.unpack(">I", blob[:4])
        if len(blob) < 4 + n:
            raise ValueError("truncated key blob")
        parts.append(blob[4 : 4 + n])
        blob = blob[4 + n :]
    if len(parts) != 2 or parts[0] != ED25519.encode() or len(parts[1]) != 32:
        raise ValueError("malformed ssh-ed25519 key")
    return parts[1]


def _parse_blob(blob: bytes) -> bytes:
    return parse_openssh_public(ED25519, base64.b64encode(blob).decode())


def generate_identity_file(path: Path, comment: str = "") -> None:
    """Write a new unencrypted OpenSSH Ed25519 key pair (``path`` and ``path.pub``)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    Path(f"{path}.pub").write_text(f"{openssh_public_line(raw)} {comment}".rstrip() + "\n")


def load_identity(user: str, path: str | os.PathLike[str]) -> Identity:
    """Load an OpenSSH Ed25519 private key file for ``user``."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read identity key {path}: {exc.strerror}. "
            "Pass identity=PATH (or --identity) naming your SSH Ed25519 private key; "
            "create one with: ssh-keygen -t ed25519"
        ) from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise ConfigurationError(
            f"identity key {path} is protected by a passphrase; p2pexec needs an unencrypted "
            "key for now (ssh-keygen -t ed25519 -N '' -f KEYFILE creates one)"
        ) from None
    except ValueError as exc:
        raise ConfigurationError(f"identity key {path} is not an OpenSSH private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(
            f"identity key {path} is not an Ed25519 key; create one with: ssh-keygen -t ed25519"
        )
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    import paramiko

    pkey = paramiko.Ed25519Key.from_private_key_file(str(path))
    return Identity(user=user, signing_key=SigningKey(seed), path=path, pkey=pkey)


def agent_identity(user: str, keyring: "Members") -> Identity | None:
    """The ssh-agent's Ed25519 key that ``keyring`` lists for ``user``, if the agent has one."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return None
    import paramiko

    try:
        agent = paramiko.Agent()
        keys = agent.get_keys()
    except (OSError, paramiko.SSHException):
        return None
    for key in keys:
        if key.get_name() == ED25519 and keyring.allows(user, _parse_blob(key.asbytes())):
            return Identity(user=user, pkey=key)
    return None


class Members(Protocol):
    """Anything that says whether a key may speak for a user: a :class:`Keyring`, a watched members
    file, or a cluster's live signed list (:class:`p2pexec.membership.Membership`)."""

    def allows(self, user: str, key: bytes) -> bool: ...


class Keyring:
    """Who is who: user names and the Ed25519 keys allowed to speak for them."""

    def __init__(self, entries: dict[str, set[bytes]] | None = None) -> None:
        self._keys: dict[str, frozenset[bytes]] = {
            u: frozenset(ks) for u, ks in (entries or {}).items()
        }

    @classmethod
    def parse(cls, text: str, source: str = "<members>") -> "Keyring":
        entries: dict[str, set[bytes]] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 3:
                raise ConfigurationError(
                    f"{source}:{lineno}: expected 'NAME ssh-ed25519 BASE64KEY [comment]'"
                )
            name, keytype, b64 = fields[:3]
            if not valid_username(name):
                raise ConfigurationError(f"{source}:{lineno}: invalid user name {name!r}")
            try:
                raw = parse_openssh_public(keytype, b64)
            except ValueError as exc:
                raise ConfigurationError(f"{source}:{lineno}: {exc}") from None
            entries.setdefault(name, set()).add(raw)
        return cls(entries)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Keyring":
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read members file {path}: {exc.strerror}") from None
        return cls.parse(text, str(path))

    def allows(self, user: str, key: bytes) -> bool:
        return key in self._keys.get(user, ())

    def has_user(self, user: str) -> bool:
        return user in self._keys

    def dumps(self) -> str:
        return "".join(
            f"{u} {openssh_public_line(k)}\n" for u in sorted(self._keys) for k in sorted(self._keys[u])
        )


class WatchedKeyring:
    """A users or members file, read again whenever it changes: removing someone takes effect at once.

    A file that became unreadable or malformed keeps the last good list (and says so).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._stamp = self._stat()
        self._keyring = Keyring.load(self.path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def allows(self, user: str, key: bytes) -> bool:
        stamp = self._stat()
        if stamp != self._stamp:
            try:
                self._keyring = Keyring.load(self.path)
            except ConfigurationError as exc:
                log.warning("keeping the previous list: %s", exc)
            self._stamp = stamp
        return self._keyring.allows(user, key)

    def has_user(self, user: str) -> bool:
        self.allows(user, b"")  # (re-reads a changed file)
        return self._keyring.has_user(user)
