"""End-to-end PM simulation: cosmology + linear field → evolved particles and density."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._adjoint import after_cotangents
from .config import SimConfig
from .cosmology import Cosmology, growth_table
from .forces import paint_density, pm_force_and_density, pm_force_and_density_vjp
from .ics import (linear_field, lpt_coefficients, lpt_combine, lpt_combine_vjp, lpt_mix,
                  lpt_psis, white_noise)
from .nbody import (Observer, ParticleState, Snapshots, integrate, run_steps, start_steps,
                    step_factors)

Array = jax.Array


class HaloOverflowError(ValueError):
    """Particles moved further from their Lagrangian shard than the halo can hold."""


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Evolution:
    """Output of ``evolve``.

    final: particles at ``cfg.a_final``.
    snapshots: {"disp", "mom"} each (n_snapshots, npx, npy, npz, 3), at ``cfg.snapshots``.
    max_displacement: largest |x - q| along the sharded axes over all steps, in mesh cells.
    """

    final: ParticleState
    snapshots: dict
    max_displacement: Array


def evolve(cosmo: Cosmology, cfg: SimConfig, delta_lin: Array,
           progress: Callable[[Array], None] | None = None) -> Evolution:
    """LPT initial conditions at ``cfg.a_init`` then PM integration to ``cfg.a_final``.

    Pure and differentiable in ``cosmo`` and ``delta_lin`` (jit it with ``cfg`` static).

    Args:
      delta_lin: (npx, npy, npz) linear overdensity at z = 0 on the particle grid.
    """
    final, snaps, max_disp = evolve_observed(cosmo, cfg, delta_lin, Snapshots(cfg.snapshot_steps),
                                             progress=progress)
    return Evolution(final, snaps, max_disp)


def evolve_observed(cosmo: Cosmology, cfg: SimConfig, delta_lin: Array, observer: Observer,
                    obs_params=None, progress: Callable[[Array], None] | None = None):
    """``evolve`` with any ``nbody.Observer`` (snapshots, lightcone projection) recording the run.

    Returns (final ParticleState, observations, max displacement in cells along the sharded axes).
    """
    state, factors = initial_particles(cosmo, cfg, delta_lin)
    return integrate(cfg, state, factors, observer, obs_params, progress)


def initial_particles(cosmo: Cosmology, cfg: SimConfig, delta_lin: Array
                      ) -> tuple[ParticleState, Array]:
    """LPT particles at the first step (with their force) and the (n_steps, 3) step factors, from
    one growth table."""
    growth = growth_table(cosmo)
    a_steps = cfg.step_scale_factors
    coefs = lpt_coefficients(cosmo, growth, cfg.lpt_order, a_steps[0]).astype(delta_lin.dtype)
    state = ParticleState(*_lpt_particles(cfg, delta_lin, coefs))
    return state, step_factors(cosmo, growth, a_steps)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lpt_particles(cfg: SimConfig, delta_lin: Array, coefs: Array):
    """(disp, mom, force, density) of the LPT particles: ``lpt_combine`` and the PM force at them.

    Its backward keeps only the linear field and recomputes the rest once the N-body backward has
    delivered the cotangents: autodiff would hold 2LPT's Hessian fields, spectra and the CIC
    read's residuals through the whole N-body backward (with the linear field's, they took the
    64³ gradient's working set to 3.2× the forward's instead of 2.1×: NOTEBOOK 30–31).
    """
    disp, mom = lpt_combine(cfg, delta_lin, coefs)
    return (disp, mom, *pm_force_and_density(cfg, disp))


def _lpt_particles_fwd(cfg, delta_lin, coefs):
    return _lpt_particles(cfg, delta_lin, coefs), (delta_lin, coefs)


def _lpt_particles_bwd(cfg, residuals, cotangents):
    return after_cotangents(partial(_lpt_particles_adjoint, cfg), residuals, cotangents)


def _lpt_particles_adjoint(cfg, residuals, cotangents):
    # inside the conditional the fields' layouts are unknown to the partitioner (jaxdecomp's FFT
    # needs them)
    (delta_lin, coefs), cotangents = residuals, tuple(map(cfg.grid.constrain, cotangents))
    delta_lin = cfg.grid.constrain(delta_lin)
    ct_disp, ct_mom, ct_force, ct_density = cotangents
    psis = lpt_psis(cfg, delta_lin)
    disp, _ = lpt_mix(coefs, psis)
    ct_disp = ct_disp + pm_force_and_density_vjp(cfg, disp, paint_density(cfg, disp), ct_force,
                                                 ct_density)
    return lpt_combine_vjp(cfg, delta_lin, coefs, psis, ct_disp, ct_mom)


_lpt_particles.defvjp(_lpt_particles_fwd, _lpt_particles_bwd)


def check_halo(cfg: SimConfig, max_displacement: float) -> None:
    """Raise ``HaloOverflowError`` if particles moved beyond what the halo supports."""
    allowed = cfg.grid.halo - 1  # CIC reaches one cell beyond the particle's own
    if not cfg.grid.sharded:
        return
    if not math.isfinite(max_displacement):
        raise HaloOverflowError(f"particle displacements are not finite ({max_displacement})")
    if max_displacement > allowed:
        raise HaloOverflowError(
            f"particles moved up to {float(max_displacement):.2f} mesh cells along x/y, but the "
            f"halo of {cfg.grid.halo} cells allows at most {allowed}: the density would be wrong. "
            f"Use DeviceGrid(halo={math.ceil(float(max_displacement)) + 2}) or fewer devices.")


def estimated_bytes(cfg: SimConfig) -> int:
    """Rough working-set estimate of a forward run, bytes: ~20 particle vectors (state, force,
    double-buffering, host copies) and ~10 mesh fields (density, spectrum, 3 force components)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    return int(itemsize * (20 * 3 * cfg.n_particles + 10 * np.prod(cfg.mesh_shape)))


def check_memory(cfg: SimConfig) -> None:
    """Raise a ValueError, instead of swapping for hours, if a CPU run cannot fit in RAM."""
    if jax.default_backend() != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = estimated_bytes(cfg)
    if need > total:
        raise ValueError(
            f"mesh {cfg.mesh_shape} with {cfg.n_particles} particles needs about {need / 2**30:.0f} GiB "
            f"but this machine has {total / 2**30:.0f} GiB of memory; use a smaller mesh or more devices")


def lagrangian_positions(cfg: SimConfig) -> np.ndarray:
    """Lagrangian grid positions q, shape (npx, npy, npz, 3), Mpc/h."""
    axes = [np.arange(n) * (length / n) for n, length in zip(cfg.particle_shape, cfg.box_size)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


@dataclass(frozen=True)
class SimResult:
    """A finished simulation (host-side convenience; use ``evolve`` inside differentiable code).

    positions: (npx, npy, npz, 3) Mpc/h, wrapped into the box.  velocities: peculiar velocities
    a dx/dt in km/s.  momenta: the integrator's p = a³E dx/da (Mpc/h, H0 = 1), so that
    velocities = 100 km/s × p / a.  density: 1 + δ on the mesh.  linear: δ_L at z = 0.
    snapshots: {a: (positions, velocities, density)} at ``cfg.snapshots``.
    """

    cfg: SimConfig
    positions: np.ndarray
    velocities: np.ndarray
    momenta: np.ndarray
    density: np.ndarray
    linear: np.ndarray
    snapshots: dict
    max_displacement: float


# ``simulate`` runs as a few programs, each compiled once per configuration and, having no host
# callback, kept by JAX's persistent compilation cache for later processes (the CLI enables it): the
# linear field (transfer function, sigma_8 normalisation and FFTs in one program instead of ~100
# eagerly compiled operations), the initial particles, one PM step (``nbody.take_step``) and the
# painting. Arithmetic is that of ``evolve``.
_linear_field_jit = jax.jit(linear_field, static_argnums=1)
_density_jit = jax.jit(paint_density, static_argnums=0)


@partial(jax.jit, static_argnums=(1, 2))
def _start_jit(cosmo: Cosmology, cfg: SimConfig, observer: Observer, delta_lin: Array):
    """``evolve``'s set-up (growth table, LPT particles, step factors) and the step carry."""
    state, factors = initial_particles(cosmo, cfg, delta_lin)
    return start_steps(cfg, state, observer), factors


def _evolve_stepwise(cosmo: Cosmology, cfg: SimConfig, delta_lin: Array,
                     progress: Callable[[int], None] | None) -> Evolution:
    """``evolve`` run step by step from the host, with ``progress(steps_done)`` after each step."""
    observer = Snapshots(cfg.snapshot_steps)
    carry, factors = _start_jit(cosmo, cfg, observer, delta_lin)
    final, snaps, max_disp = run_steps(cfg, observer, carry, factors, None, progress)
    return Evolution(final, snaps, max_disp)


def simulate(cosmo: Cosmology, cfg: SimConfig, *, seed: int = 0, linear=None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Run a simulation from a seed, or from a user-supplied linear field at z = 0.

    Args:
      seed: white-noise seed (same field on any device grid).
      linear: optional (npx, npy, npz) linear overdensity at z = 0 (as JaxPM/pmwd take it).
      progress: optional callable, called with the number of steps done after each step.
    Raises:
      ValueError on a wrong-shaped or non-finite ``linear``; HaloOverflowError if the sharded
      halo was too small for the particle displacements.
    """
    check_memory(cfg)
    if linear is None:
        delta = _linear_field_jit(cosmo, cfg, white_noise(cfg, seed))
    else:
        linear = np.asarray(linear)
        if linear.shape != cfg.particle_shape:
            raise ValueError(f"linear field has shape {linear.shape}, expected the particle grid "
                             f"{cfg.particle_shape}")
        if not np.all(np.isfinite(linear)):
            raise ValueError("linear field contains NaN or inf values")
        delta = cfg.grid.put(linear.astype(cfg.dtype))
    out = _evolve_stepwise(cosmo, cfg, delta, progress)
    check_halo(cfg, float(out.max_displacement))
    q = lagrangian_positions(cfg)
    box = np.asarray(cfg.box_size)
    to_pos = lambda d: np.mod(q + np.asarray(d, np.float64), box)  # noqa: E731
    # v = a dx/dt = a² H dx/da = H0 p / a, and H0 × (1 Mpc/h) = 100 km/s
    to_vel = lambda p, a: 100.0 * np.asarray(p) / a  # noqa: E731
    snaps = {a: (to_pos(out.snapshots["disp"][i]), to_vel(out.snapshots["mom"][i], a),
                 np.asarray(_density_jit(cfg, out.snapshots["disp"][i])))
             for i, a in enumerate(cfg.snapshots)}
    return SimResult(
        cfg=cfg,
        positions=to_pos(out.final.disp),
        velocities=to_vel(out.final.mom, cfg.a_final),
        momenta=np.asarray(out.final.mom),
        density=np.asarray(_density_jit(cfg, out.final.disp)),
        linear=np.asarray(delta),
        snapshots=snaps,
        max_displacement=float(out.max_displacement),
    )
