"""A free local TCP port, for a process group's master or a launcher's rendezvous."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it); another process may still take it first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
