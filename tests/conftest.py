"""Test-session set-up: one persistent XLA compilation cache shared by the whole run.

Much of the suite's time is XLA compiling: the same tiny model in several tests, and every
`lensbench` subprocess (chains in child processes, jax.distributed workers, fake-device workers)
compiling from scratch. A cache directory named in the environment before JAX
is imported is seen by this process and inherited by every subprocess, so each distinct program
(same HLO, options, devices and XLA flags: JAX's cache key) is compiled once per run.

The directory is fresh for every run (removed at the end), so a run never reuses programs compiled
by an older version of the code or of JAX; set JAX_COMPILATION_CACHE_DIR yourself to keep one
across runs. Caching does not change results: a program loaded from the cache is the executable
the compiler produced for the same key.
"""

import os
import shutil
import sys
import tempfile

_OWN_CACHE: str | None = None


def pytest_configure(config):
    global _OWN_CACHE
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    _OWN_CACHE = tempfile.mkdtemp(prefix="lensbench-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    if "jax" in sys.modules:  # imported by a plugin before this ran: tell the live config too
        sys.modules["jax"].config.update("jax_compilation_cache_dir", _OWN_CACHE)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
