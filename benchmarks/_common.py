"""What every benchmark script shares: how it judges a target, where its results go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def verdict(ok: bool) -> str:
    """What a benchmark says of a target it measured."""
    return "pass" if ok else "falls short"


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


def serve_on_libp2p(conn: Any, handler: Any) -> None:
    """Serve ``handler`` on a new p2pexec libp2p host (a baseline's server, in a process of its own): its
    peer id and addresses go to ``conn``, and it runs until ``conn`` says stop."""
    import trio

    from p2pexec.transport.host import Libp2pHost

    async def main() -> None:
        async with Libp2pHost().running() as host:
            host.set_handler(handler)
            conn.send((host.peer_id, host.addrs))
            await trio.to_thread.run_sync(conn.recv)  # until told to stop

    trio.run(main)
