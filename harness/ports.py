"""Free TCP ports on this machine (the embedded Ray's GCS, gloo process groups, test servers)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on every interface of this machine now (the OS's pick for a bind to port
    0); Ray's GCS listens on all interfaces, so loopback alone is not enough to check."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
