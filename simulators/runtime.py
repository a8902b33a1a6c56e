"""Process-wide JAX settings the simulators need, set where a program starts, never on import.

- float64: the background, growth and σ(R) tables are float64 (fields and particles follow
  ``SimConfig.dtype``). JAX computes in float32 unless ``jax_enable_x64`` is on, and would then
  silently truncate those tables; ``require_x64`` (called where a float64 table is built) turns
  that into an error naming the fix. Programs call ``enable_x64()`` first: the ``lensbench``
  command line does, as do the test suite's ``conftest.py`` and the benchmark scripts.
- partitioner: jax 0.10.2's Shardy partitioner fails to compile the gradient of the per-shard
  painting on some device grids (4x1, 2x4: "expected ... GlobalToLocalShape"); GSPMD compiles it
  and gives results equal to the single-device path (tests/test_distributed.py). A sharded
  ``DeviceGrid`` selects GSPMD when it is made (``use_gspmd_partitioner``); single-device runs
  leave the setting alone.
"""

from __future__ import annotations

import jax


def enable_x64() -> None:
    """Turn on JAX's float64 for this process (before the first simulation)."""
    jax.config.update("jax_enable_x64", True)


def require_x64() -> None:
    """Raise RuntimeError when JAX's float64 is off (see the module docstring)."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "lensbench's cosmology tables need JAX's float64: call simulators.enable_x64() at the "
            "start of the program (or set JAX_ENABLE_X64=1 before JAX is imported)")


def use_gspmd_partitioner() -> None:
    """Compile sharded programs with GSPMD instead of Shardy (module docstring); where the option
    no longer exists, keep going with the default."""
    try:
        jax.config.update("jax_use_shardy_partitioner", False)
    except (AttributeError, KeyError):  # pragma: no cover - newer jax without the option
        pass
