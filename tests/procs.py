"""Helpers for tests that run `lensbench` commands, in this process (`invoke`) or in a fresh
interpreter (a device count of their own), and jax.distributed processes on localhost."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner, Result

from experiments.jaxsetup import cpu_emitter_flags

REPO = Path(__file__).resolve().parents[1]

# Time limit [s] for a test's subprocess: a guard against hangs, not a speed target. `make test`
# runs two test files at a time on two cores, each with its own subprocesses, so a worker that
# takes 5 minutes alone may take 20 (the whole suite must fit in CI's 90 minutes anyway).
HANG = 2400


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: the legacy CPU fusion emitters that every `lensbench` command
    and the suite's own process use (``experiments.jaxsetup.cpu_emitter_flags``; most of the
    suite's time is XLA compiling), and ``devices`` fake CPU devices if given."""
    count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    return " ".join([*cpu_emitter_flags(), *count])


def set_xla_flags(devices: int | None = None) -> None:
    """``xla_flags`` into this process's environment (a worker, before it imports JAX)."""
    os.environ["XLA_FLAGS"] = xla_flags(devices)


def free_port() -> int:
    """A TCP port free on localhost now (for the jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    """This environment for a `lensbench` subprocess: CPU only, the repository importable, the
    suite's compiler settings, and no device count inherited (the command picks its own from
    --pdims or its configuration)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["XLA_FLAGS"] = xla_flags()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_cli_subprocess(*args, cwd) -> subprocess.CompletedProcess:
    """`lensbench ARGS...` in a fresh interpreter; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "experiments.cli", *map(str, args)], cwd=cwd,
                          env=cli_env(), capture_output=True, text=True, timeout=HANG)


def invoke(*args) -> Result:
    """`lensbench ARGS...` in this process (typer's test runner); output captured, no exit."""
    from experiments import cli  # here, not at import: tests that only start subprocesses skip it

    return CliRunner().invoke(cli.app, [str(a) for a in args])
