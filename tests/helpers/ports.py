"""A free TCP port for a test that must name one (``torchrun --master_port``)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now: the one the OS picks for a socket bound to port 0.

    Another process could take it between this call and the caller's bind, but unlike a
    fixed port it is not shared by every run of the test (parallel runs, a port left in
    TIME_WAIT by the previous run, another program's default such as torchrun's 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
