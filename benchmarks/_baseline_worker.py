"""``p2pexec-worker`` as it was before issue 15: py-libp2p's default limits and no gate (the flood baseline)."""

import sys

from libp2p.network.config import ConnectionConfig
from libp2p.transport.tcp.tcp import TCP

import p2pexec.transport.host as host
import p2pexec.transport.libp2p_config as libp2p_config


class _UngatedTCP(TCP):
    def __init__(self, gate: object) -> None:
        super().__init__()


host.GatedTCP = _UngatedTCP  # type: ignore[misc,assignment]
libp2p_config._connection_config = lambda per_peer: ConnectionConfig(max_connections_per_peer=per_peer)  # type: ignore[assignment]
libp2p_config._resource_manager = lambda: None  # type: ignore[assignment,return-value]  # new_host makes its default one

from p2pexec.worker_cli import main as worker_main  # noqa: E402

sys.exit(worker_main())
