"""Board client: URLs, ~/.ssh/config aliases, keys from ssh-agent, reconnects."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading

import paramiko
import pytest

from p2pexec.board.address import BoardAddress
from p2pexec.board.client import connect
from p2pexec.errors import AuthenticationError, BoardBusyError, BoardError, ConfigurationError
from p2pexec.keys import generate_identity_file, load_identity

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("url, expected", [
    ("ssh://alice@board.example.org:2222", BoardAddress("board.example.org", 2222, "alice")),
    ("board.example.org", BoardAddress("board.example.org", 22, None)),
    ("bob@10.0.0.1", BoardAddress("10.0.0.1", 22, "bob")),
    ("127.0.0.1:2222", BoardAddress("127.0.0.1", 2222, None)),
    ("ssh://[::1]:2200", BoardAddress("::1", 2200, None)),
])
def test_board_urls(url, expected):
    assert BoardAddress.parse(url) == expected
    assert BoardAddress.parse(str(expected)) == expected


@pytest.mark.parametrize("url", ["http://x", "ssh://", "host:99999", "host:abc", "ssh//bob@127.0.0.1:2222",
                                 "ssh://bob@board/x:22", "bo ard", "ssh://-oProxyCommand=x"])
def test_bad_board_urls(url):
    with pytest.raises(BoardError):
        BoardAddress.parse(url)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("P2PEXEC_IDENTITY", raising=False)
    return home


def test_host_alias_from_ssh_config(cluster, empty_home):
    port = cluster.board.rsplit(":", 1)[1]
    (empty_home / ".ssh" / "config").write_text(
        f"Host myboard\n    HostName 127.0.0.1\n    Port {port}\n    User alice\n"
        f"    IdentityFile {cluster.identity}\n")
    with cluster.executor(board="myboard", identity=None) as ex:
        assert ex.submit(divmod, 7, 2).result() == (3, 1)


def test_no_key_anywhere_says_how_to_make_one(cluster, empty_home):
    with pytest.raises(ConfigurationError, match="ssh-keygen -t ed25519"):
        cluster.executor(identity=None)


@pytest.fixture
def agent(tmp_path, monkeypatch):
    if not shutil.which("ssh-agent"):
        pytest.fail("ssh-agent (openssh-client) is required; .ci/run installs it")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        assert "SSH_AUTH_SOCK" in proc.stdout.readline()  # printed once the socket listens
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def test_key_from_ssh_agent(cluster, empty_home, agent):
    subprocess.run(["ssh-add", "-q", cluster.identity], check=True, timeout=30,
                   env=dict(os.environ, SSH_AUTH_SOCK=str(agent)))
    with cluster.executor(identity=None) as ex:
        assert ex._board.identity.path is None  # signed and logged in through the agent
        assert ex.submit(pow, 3, 3).result() == 27


class _SlowLogin(paramiko.ServerInterface):
    """An SSH server that takes a login longer than the client waits (as a flooded board does), or refuses it."""

    def __init__(self, release: threading.Event, refuse: bool) -> None:
        self.release, self.refuse = release, refuse

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if not self.refuse:
            self.release.wait(30)  # until the test is done with it
        return paramiko.AUTH_FAILED


@pytest.mark.parametrize("refuse", [False, True], ids=["slow-login", "refused-key"])
def test_a_login_that_runs_out_of_time_is_a_busy_board_not_a_refused_key(tmp_path, refuse):
    """A busy board that does not finish a login in time gets another try; only a refused key means 'ask for an
    invitation' (paramiko raises the same exception for both)."""
    generate_identity_file(tmp_path / "id")
    identity = load_identity("alice", tmp_path / "id")
    release = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            transport = paramiko.Transport(conn)
            transport.add_server_key(paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id")))
            transport.start_server(server=_SlowLogin(release, refuse))
            release.wait(30)
            transport.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with pytest.raises(AuthenticationError if refuse else BoardBusyError):
                connect(BoardAddress("127.0.0.1", port, "alice"), identity, known_hosts=tmp_path / "known_hosts",
                        accept_new_host_key=True, timeout=1.0)
        finally:
            release.set()
            server.join(30)
