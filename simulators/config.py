"""Static configuration of a particle-mesh simulation (hashable: safe as a jit static argument)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .grid import DeviceGrid

GRADIENT_MODES = ("checkpoint", "adjoint")
DTYPES = ("float32", "float64")
# Largest number of time steps; a typo such as --steps 100000000 is refused at once (it would run
# for hours and exhaust memory). experiments.config.MAX_STEPS is the same number for configurations.
MAX_STEPS = 10_000


def _triple(value, name, cast):
    if np.ndim(value) == 0:
        value = (value,) * 3
    value = tuple(cast(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be one number or three, got {value!r}")
    return value


@dataclass(frozen=True)
class SimConfig:
    """Particle-mesh simulation setup.

    Attributes:
      mesh_shape: force mesh cells (nx, ny, nz); an int means a cube. Need not be cubic.
      box_size: box side lengths (Lx, Ly, Lz) in Mpc/h; a float means a cube.
      mesh_factor: force-mesh cells per particle spacing along each axis (integer >= 1); the
        particle (Lagrangian) grid is ``mesh_shape // mesh_factor``. White noise and the linear
        field live on the particle grid.
      a_init, a_final, n_steps: time steps uniform in the scale factor a.
      steps: explicit increasing scale factors of the step boundaries (overrides the three above).
      snapshots: scale factors at which to record particles; they are merged into the steps.
      lpt_order: 1 or 2, order of Lagrangian perturbation theory for the initial conditions.
      deconvolve: divide the force by the CIC window of painting and reading.
      gradient: "checkpoint" (autodiff, rematerialising each step) or "adjoint" (reverse
        time integration; memory independent of the number of steps).
      dtype: field and particle dtype; background tables are always float64.
      grid: the device grid fields are split over.
    """

    mesh_shape: tuple[int, int, int]
    box_size: tuple[float, float, float]
    mesh_factor: int = 1
    a_init: float = 0.1
    a_final: float = 1.0
    n_steps: int = 10
    steps: tuple[float, ...] | None = None
    snapshots: tuple[float, ...] = ()
    lpt_order: int = 2
    deconvolve: bool = False
    gradient: str = "checkpoint"
    dtype: str = "float32"
    grid: DeviceGrid = field(default_factory=DeviceGrid)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("mesh_shape", _triple(self.mesh_shape, "mesh_shape", int))
        set_("box_size", _triple(self.box_size, "box_size", float))
        if min(self.mesh_shape) < 2:
            raise ValueError(f"mesh_shape must be >= 2 cells per axis, got {self.mesh_shape}")
        if not all(math.isfinite(b) and b > 0 for b in self.box_size):
            raise ValueError(f"box_size must be positive (Mpc/h), got {self.box_size}")
        if int(self.mesh_factor) != self.mesh_factor or self.mesh_factor < 1:
            raise ValueError(f"mesh_factor must be an integer >= 1, got {self.mesh_factor}")
        set_("mesh_factor", int(self.mesh_factor))
        if any(n % self.mesh_factor for n in self.mesh_shape):
            raise ValueError(
                f"mesh_shape {self.mesh_shape} must be divisible by mesh_factor {self.mesh_factor}")
        if self.deconvolve and self.mesh_factor > 1:
            raise ValueError(
                "deconvolve=True needs mesh_factor=1: with a mesh finer than the particle lattice "
                "the CIC deconvolution amplifies the lattice's aliased sidebands near the mesh Nyquist")
        if self.steps is not None:
            steps = tuple(float(a) for a in self.steps)
            if len(steps) < 2 or any(b <= a for a, b in zip(steps, steps[1:])):
                raise ValueError(f"steps must be >= 2 strictly increasing scale factors, got {steps}")
            set_("steps", steps)
            set_("a_init", steps[0])
            set_("a_final", steps[-1])
            set_("n_steps", len(steps) - 1)
        if not 0 < self.a_init < self.a_final:
            raise ValueError(f"need 0 < a_init < a_final, got a_init={self.a_init}, a_final={self.a_final}")
        if self.a_final > 1.0 + 1e-12:
            raise ValueError(f"a_final must be <= 1 (growth tables end today), got {self.a_final}")
        if int(self.n_steps) < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if int(self.n_steps) > MAX_STEPS:
            raise ValueError(f"n_steps must be <= {MAX_STEPS} (lensbench's limit: PM lensing runs "
                             f"use 5-100 steps), got {self.n_steps}")
        snaps = tuple(sorted(float(a) for a in self.snapshots))
        for a in snaps:
            if not self.a_init <= a <= self.a_final:
                raise ValueError(f"snapshot a={a} lies outside [a_init, a_final] = [{self.a_init}, {self.a_final}]")
        set_("snapshots", snaps)
        if self.lpt_order not in (1, 2):
            raise ValueError(f"lpt_order must be 1 or 2, got {self.lpt_order}")
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {self.gradient!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self.grid.check_shape(self.mesh_shape, "mesh")
        self.grid.check_shape(self.particle_shape, "particle grid")

    # ---- derived ----------------------------------------------------------------------------
    @property
    def particle_shape(self) -> tuple[int, int, int]:
        return tuple(n // self.mesh_factor for n in self.mesh_shape)

    @property
    def n_particles(self) -> int:
        return int(np.prod(self.particle_shape))

    @property
    def cell_size(self) -> np.ndarray:
        """Force-mesh cell size per axis, Mpc/h, shape (3,)."""
        return np.asarray(self.box_size) / np.asarray(self.mesh_shape)

    @property
    def step_scale_factors(self) -> np.ndarray:
        """Step boundaries in a, shape (n + 1,), float64, with snapshot times merged in."""
        steps = np.asarray(self.steps) if self.steps is not None else np.linspace(
            self.a_init, self.a_final, self.n_steps + 1)
        return np.unique(np.concatenate([steps, np.asarray(self.snapshots, float)]))

    @property
    def snapshot_steps(self) -> tuple[int, ...]:
        """Index (into ``step_scale_factors``) of each snapshot."""
        a = self.step_scale_factors
        return tuple(int(np.argmin(np.abs(a - s))) for s in self.snapshots)

    def with_(self, **changes) -> "SimConfig":
        """A copy with some fields changed (re-validated)."""
        from dataclasses import replace

        return replace(self, **changes)

