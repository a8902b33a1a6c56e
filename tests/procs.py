"""Helpers for tests that start jax.distributed processes on localhost."""

import socket


def free_port() -> int:
    """A TCP port free on localhost now (for the jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
