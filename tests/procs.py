"""Helpers for tests that start subprocesses (jax.distributed processes on localhost, workers)."""

import socket


def free_port() -> int:
    """A TCP port free on localhost now (for the jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Time limit [s] for a test's subprocess: a guard against hangs, not a speed target. `make test`
# runs two test files at a time on two cores, each with its own subprocesses, so a worker that
# takes 5 minutes alone may take 20 (the whole suite must fit in CI's 90 minutes anyway).
HANG = 2400
