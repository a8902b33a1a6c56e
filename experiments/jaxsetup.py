"""Setting JAX up before it starts: CPU devices for a device grid, the persistent compilation
cache, and ``jax.distributed``.

Devices. A device grid such as ``--pdims 2x2`` or ``simulation.pdims = "2x2"`` needs four devices.
On a CPU-only machine JAX makes several host devices only if told so before its backends start
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, or the equivalent ``jax_num_cpu_devices``
option), so the functions here read device grids without starting a backend (``config.peek_pdims``
reads a configuration file without validating it, ``config.parse_pdims`` option text) and ask for
the devices first. A device count the user chose through ``XLA_FLAGS`` or ``JAX_NUM_CPU_DEVICES``
is left alone; on GPU machines the option has no effect and the GPUs are used.

Compilation cache. ``use_compilation_cache`` (which every ``lensbench`` command calls first) points
JAX's persistent compilation cache at ``$XDG_CACHE_HOME/lensbench/xla/<CPU signature>``
(``~/.cache`` by default; at most 4 GiB, least recently used programs evicted) unless
``JAX_COMPILATION_CACHE_DIR`` is set. A resumed chain, a rerun of ``compare`` or a chain's child
process then loads its compiled programs instead of compiling them again (minutes for the
field-level HMC segment); ``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off. The directory is
per CPU signature (``simulators.cpu``) because a CPU program compiled for one instruction set must
not be loaded on a node with another one sharing the same home directory.

Compiler. ``use_legacy_cpu_emitters`` (also called first by every command) selects XLA's legacy CPU
fusion emitters (``CPU_EMITTER_FLAG``) unless ``XLA_FLAGS`` already chooses: jax 0.10's newer
emitters take about twice as long to compile this project's programs for the same run time
(quick's value-and-gradient: compile 15.9 → 8.5 s, 61.5 → 62.3 ms per gradient, peak memory
1450 → 700 MB; NOTEBOOK 24), and compiling is most of a short run's time: a field-level chain
compiles its gradient in several programs per process.

Float64. ``enable_x64`` (also called first by every command) turns on JAX's float64, which the
cosmology tables need; importing ``simulators`` changes no JAX setting.

Nothing here imports JAX at import time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .config import OptionError, parse_pdims

if TYPE_CHECKING:
    from .config import ExperimentConfig


def _cpu_signature() -> str:
    """``simulators.cpu.cpu_signature()``, computed without importing JAX: that module is loaded
    from its file, because importing it as ``simulators.cpu`` would run ``simulators/__init__``,
    which imports JAX before the cache directory is set (JAX reads it at import)."""
    import importlib.util

    path = Path(importlib.util.find_spec("simulators").origin).with_name("cpu.py")
    spec = importlib.util.spec_from_file_location("_lensbench_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_signature()


def use_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at lensbench's user cache directory (module
    docstring), unless the user chose one (or JAX is already imported in this process: then its
    configuration is the caller's). Only environment variables are set, so JAX is not imported
    here; child processes (``[hmc] processes``) inherit them and share the cache. Programs are
    kept whatever their compile time unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says
    otherwise."""
    if "jax" in sys.modules:
        return
    # JAX only keeps programs that took >= 1 s to compile; the set-up programs of a run (linear
    # field, initial particles, one PM step: 0.05-1 s each) would be compiled anew by every process.
    # Loading a kept program costs milliseconds, so keep them all (also in a directory the user
    # chose, such as the test suite's).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "lensbench" / "xla" / _cpu_signature()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only or missing home: run without the cache
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


# XLA's legacy CPU fusion emitters (module docstring); the test suite compiles with them too
CPU_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
CPU_EMITTER_JAXLIB = "0.10."  # the jaxlib versions it is added for


def cpu_emitter_flags() -> list[str]:
    """``[CPU_EMITTER_FLAG]`` on jaxlib ``CPU_EMITTER_JAXLIB``, else ``[]``: a later jaxlib may not
    know the flag, and XLA stops at unknown flags."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        known = version("jaxlib").startswith(CPU_EMITTER_JAXLIB)
    except PackageNotFoundError:
        known = False
    return [CPU_EMITTER_FLAG] if known else []


def use_legacy_cpu_emitters() -> None:
    """Add ``cpu_emitter_flags()`` to ``XLA_FLAGS`` (module docstring) unless the flags already name
    ``xla_cpu_use_fusion_emitters`` (the user's choice). XLA reads the variable when its first
    backend starts, so call this before any JAX computation; child processes inherit it. On GPU
    it only concerns programs compiled for the host."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" not in flags:
        os.environ["XLA_FLAGS"] = " ".join([flags, *cpu_emitter_flags()]).strip()


def enable_x64() -> None:
    """JAX's float64, which the cosmology tables need (``simulators.runtime``), for this process
    and the processes it starts. Only the environment is set when JAX is not loaded yet (it reads
    ``JAX_ENABLE_X64`` at import), so the device and log settings here can still follow."""
    os.environ["JAX_ENABLE_X64"] = "1"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_enable_x64", True)


def request_cpu_devices(n: int) -> None:
    """Ask JAX for ``n`` host devices; must run before any JAX backend starts (module docstring)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
            or "JAX_NUM_CPU_DEVICES" in os.environ:
        return  # the user chose a device count
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        # Backends already started in this process (JAX was used before the command ran): keep
        # what exists; DeviceGrid explains if that is too few devices.
        pass


def hide_partitioner_warnings() -> None:
    """jax 0.10's GSPMD partitioner (which simulators selects) logs a deprecation warning for every
    compiled sharded function: keep XLA's C++ log to errors, unless the user chose a level. XLA
    reads the level when JAX loads, so this acts only before JAX is first imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_devices_for(pdims: tuple[int, int]) -> None:
    """Ask for the px * py host devices of the device grid ``pdims`` = (px, py); nothing for 1x1."""
    px, py = pdims
    if px * py > 1:
        hide_partitioner_warnings()
        request_cpu_devices(px * py)


def device_grid(config, changes: dict) -> tuple[int, int]:
    """The device grid (px, py) of a config file or shipped name with ``--set`` changes (a dict
    from ``config.parse_overrides``), read without JAX. OptionError for a malformed
    ``simulation.pdims`` change; a malformed one in the file is left to ``load_config``."""
    from .config import peek_pdims

    pdims = changes.get("simulation.pdims")
    return parse_pdims(pdims) if isinstance(pdims, str) else peek_pdims(config)


def configured(config, overrides=()) -> ExperimentConfig:
    """The configuration ``config`` (a name, a path or an ``ExperimentConfig``) with ``--set``
    overrides (``KEY=VALUE`` strings); for a name or path, its CPU devices are asked for before
    loading it starts JAX."""
    from .config import ExperimentConfig, load_config, parse_overrides

    changes = parse_overrides(overrides or ())
    if not isinstance(config, ExperimentConfig):
        cpu_devices_for(device_grid(config, changes))
        config = load_config(config)
    return config.with_(**changes) if changes else config


def start_distributed(pdims: tuple[int, int], coordinator: Optional[str],
                      num_processes: Optional[int], process_id: Optional[int]) -> None:
    """``jax.distributed.initialize`` before any JAX backend starts, for one of several processes
    that share the device grid ``pdims``. With all of coordinator (``HOST:PORT`` of process 0),
    num_processes and process_id given, each process gets its share of the pdims devices on CPU
    (collectives through gloo); with none, JAX detects the cluster (SLURM, Open MPI, ...).
    OptionError for a partial set, a process id out of range or a grid that does not split evenly
    over the processes."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise OptionError("give all of --coordinator, --num-processes and --process-id, "
                          "or none (cluster auto-detection)")
    if all(given):
        if process_id >= num_processes:
            raise OptionError(f"--process-id {process_id} must be below --num-processes "
                              f"{num_processes}")
        px, py = pdims
        if (px * py) % num_processes:
            raise OptionError(f"the device grid {px}x{py} does not split evenly over "
                              f"{num_processes} processes")
        cpu_devices_for((px * py // num_processes, 1))
    hide_partitioner_warnings()
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
