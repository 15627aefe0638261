"""Local networking for multi-process runs on one machine."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free right now on localhost, for torchrun's --master_port / MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
