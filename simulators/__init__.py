"""lensbench simulators: a differentiable, distributed particle-mesh N-body code in JAX.

dtype policy: background and growth tables are float64, fields and particles use
``SimConfig.dtype`` (float32 by default, float64 for exact tests). Importing changes no JAX
setting: call ``enable_x64()`` at the start of a program (``simulators.runtime``).

    import simulators
    simulators.enable_x64()
"""

from .config import SimConfig
from .cosmology import Cosmology, growth_table, linear_power
from .forces import paint_density, pm_force
from .grid import DeviceGrid
from .ics import linear_field, lpt_state, white_noise
from .nbody import ParticleState, integrate, step_factors
from .runtime import enable_x64
from .simulation import (
    Evolution, HaloOverflowError, SimResult, evolve, lagrangian_positions, simulate)
from .spectra import power_spectrum

__all__ = [
    "Cosmology", "DeviceGrid", "Evolution", "HaloOverflowError", "ParticleState", "SimConfig",
    "SimResult", "enable_x64", "evolve", "growth_table", "integrate", "lagrangian_positions", "linear_field",
    "linear_power", "lpt_state", "paint_density", "pm_force", "power_spectrum", "simulate",
    "step_factors", "white_noise",
]
