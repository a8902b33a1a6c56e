"""lensbench simulators: a differentiable, distributed particle-mesh N-body code in JAX.

dtype policy: background and growth tables are float64, so float64 is enabled in JAX on import;
fields and particles use ``SimConfig.dtype`` (float32 by default, float64 for exact tests).
"""

import jax

jax.config.update("jax_enable_x64", True)
# jax 0.10.2's Shardy partitioner fails to compile the gradient of our per-shard painting on some
# device grids (4x1, 2x4: "expected ... GlobalToLocalShape"); GSPMD compiles it and gives results
# equal to the single-device path (tests/test_distributed.py). Where the flag is gone, keep going.
try:
    jax.config.update("jax_use_shardy_partitioner", False)
except (AttributeError, KeyError):  # pragma: no cover - newer jax without the option
    pass

from .config import SimConfig  # noqa: E402
from .cosmology import Cosmology, growth_table, linear_power  # noqa: E402
from .forces import paint_density, pm_force  # noqa: E402
from .grid import DeviceGrid  # noqa: E402
from .ics import linear_field, lpt_state, white_noise  # noqa: E402
from .nbody import ParticleState, integrate, step_factors  # noqa: E402
from .simulation import (  # noqa: E402
    Evolution, HaloOverflowError, SimResult, evolve, lagrangian_positions, simulate)
from .spectra import power_spectrum  # noqa: E402

__all__ = [
    "Cosmology", "DeviceGrid", "Evolution", "HaloOverflowError", "ParticleState", "SimConfig",
    "SimResult", "evolve", "growth_table", "integrate", "lagrangian_positions", "linear_field",
    "linear_power", "lpt_state", "paint_density", "pm_force", "power_spectrum", "simulate",
    "step_factors", "white_noise",
]
