"""Test-session set-up: JAX's float64, one persistent XLA compilation cache for the whole run, and
the slowest files scheduled first.

Most of the suite's time is XLA compiling tiny programs, for this process and for every
subprocess (chains in child processes, jax.distributed workers, fake-device workers). A cache
directory named in the environment before JAX is imported is seen by this process and inherited
by every subprocess, so each distinct program (same HLO, options, devices and XLA flags: JAX's
cache key) is compiled once per run, however short its compilation. Programs with host
callbacks (the simulator's progress bar, the C_ℓ sampler's gradient counter) are never cached.
The directory is fresh for every run (removed at the end), so a run never reuses programs
compiled by an older version of the code or of JAX; set
JAX_COMPILATION_CACHE_DIR yourself to keep one across runs. A program loaded from the cache is the
executable the compiler produced for the same key.

`make test` (and so CI) leaves out the tests marked slow; `make test-slow` runs them. Each is a
check of a path whose parts, or whose property on another problem, the rest of the suite proves,
and each costs a minute or more of compilation on the 2-core machine:
- the field-level sampler over two jax.distributed processes: test_cli_hmc's two tests (~5 min of
  CPU; chains in child processes, and one run over two processes through the command line, equal
  to the one-process run) and test_explicit's two-process NUTS killed and resumed (~1.5 min).
  In `make test`: the per-chain equality and resume in-process (test_explicit), the per-process
  pieces of a split array written and joined back (test_explicit), two jax.distributed processes
  equal to one for the simulator (test_multiprocess), sharded == single-device values and
  gradients (test_explicit, test_distributed).
- test_explicit's sharded MCLMC chain (~2 min): MCLMC's tuning through the sharded lightcone. The
  sharded log density and gradient it differentiates are checked in `make test`; MCLMC itself is
  checked against exact posteriors there (test_explicit, test_samplers).
- test_explicit's NUTS against the exact posterior of a 1-parameter 8x8 Gaussian-field problem
  (~1 min): the same known-answer check of field-level NUTS runs in `make test` on a 2-parameter
  problem through the whole compare pipeline (test_compare::
  test_methods_agree_with_the_exact_posterior: means, widths and C2ST against the exact draws).
- test_distributed's 1x2 device grid and its lightcone on 4x1 (~1 min): `make test` keeps a grid
  with one device along an axis (4x1) and one split along both (2x4, and 2x2 for the lightcone).

Every process of the suite compiles with XLA's legacy CPU emitters, as every command does
(``experiments.jaxsetup.use_legacy_cpu_emitters`` here, ``tests/procs.xla_flags`` for
subprocesses): about twice as fast to compile, which is most of the suite's time.
"""

import os
import shutil
import sys
import tempfile

_OWN_CACHE: str | None = None

# Files started first, longest first (each ~20-200 s in a `make test` run with nothing else
# running, from the measured durations). `make test` runs two files at a time; a long file
# started last would run alone at the end while the other core idles, and xdist's own order (most
# tests first, or here the alphabetical one) may start these last.
SLOW_FILES = ("test_explicit.py", "test_compare.py", "test_distributed.py", "test_pipeline.py",
              "test_nbody.py", "test_lensing_maps.py", "test_generate.py", "test_cli.py",
              "test_cl_baseline.py", "test_lightcone.py", "test_efficiency.py")


def pytest_configure(config):
    global _OWN_CACHE
    # float64 for the cosmology tables (simulators.runtime), here and in every subprocess
    from experiments.jaxsetup import enable_x64, use_legacy_cpu_emitters

    enable_x64()
    # the commands' compiler settings (module docstring), here and in every subprocess
    use_legacy_cpu_emitters()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    _OWN_CACHE = tempfile.mkdtemp(prefix="lensbench-test-xla-")
    # Every program, not only those compiling for over a second (JAX's default): the many small
    # ones (cosmology tables, map set-up) are otherwise compiled again by each xdist worker and
    # each subprocess (7 % of the CLI/generate/lightcone files' time, measured).
    settings = {"jax_compilation_cache_dir": _OWN_CACHE,
                "jax_persistent_cache_min_compile_time_secs": 0}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        if "jax" in sys.modules:  # imported by a plugin before this ran: tell the live config too
            sys.modules["jax"].config.update(name, value)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order within and among the other files is kept

