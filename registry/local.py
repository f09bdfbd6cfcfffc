"""Small facts about this machine every layer needs (bottom of moea's layers, standard library only)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def moea_home() -> Path:
    """`$MOEA_HOME` or `~/.cache/moea`: base-model cache, default registry and artifact store live here."""
    return Path(os.environ.get("MOEA_HOME") or Path.home() / ".cache" / "moea").expanduser()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
