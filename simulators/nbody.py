"""FastPM kick-drift-kick integration with growth-corrected factors and a reverse-time adjoint.

State: displacements x - q and momenta p = a³E dx/da (Mpc/h, time in 1/H0), plus the force at the
current positions (cached so each step costs one force evaluation). In linear theory
p = G_f Ψ and F = D₁ Ψ with G_f = a³E dD₁/da, so the factors

    kick  a₀→a₁ with force at a_r:   ΔG_f / D₁(a_r)
    drift a₀→a₁ with momentum at a_h: ΔD₁ / G_f(a_h)

reproduce linear growth exactly whatever the step size (Feng et al. 2016).

Observers record things during the integration (snapshots here; lightcone shells later). An
observer's ``update`` must be additive, ``obs + g(...)``, with g independent of ``obs``: then
the reverse adjoint can back-propagate through it without storing the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .config import SimConfig
from .cosmology import Cosmology, E, GrowthTable
from .forces import pm_force_and_density, pm_force_and_density_vjp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ParticleState:
    """Particles on the Lagrangian grid, each array (npx, npy, npz, 3), and the mesh density they
    paint.

    disp: displacement x - q, Mpc/h.  mom: p = a³E dx/da, Mpc/h (H0 = 1).
    force: F = -∇∇⁻²δ at x, Mpc/h (evaluated at the state's time).
    density: 1 + δ on the force mesh (``forces.paint_density`` of disp, grid layout), the one the
      force came from: observers read it instead of painting the particles again, and in the
      adjoint its cotangent joins the force's before the paint is transposed once.
    """

    disp: Array
    mom: Array
    force: Array
    density: Array


class Observer(Protocol):
    def init(self, state: ParticleState) -> Any: ...

    def update(self, params: Any, step: Array, a0: Array, a1: Array, before: ParticleState,
               after: ParticleState, obs: Any) -> Any: ...


@dataclass(frozen=True)
class Snapshots:
    """Records (disp, mom) after the steps listed in ``steps`` (index into the step boundaries)."""

    steps: tuple[int, ...]

    def init(self, state: ParticleState):
        zeros = jnp.zeros((len(self.steps),) + state.disp.shape, state.disp.dtype)
        obs = {"disp": zeros, "mom": zeros}
        for slot, s in enumerate(self.steps):  # snapshots at a_init are the initial state
            if s == 0:
                obs = {k: v.at[slot].set(getattr(state, k)) for k, v in obs.items()}
        return obs

    def update(self, params, step, a0, a1, before, after, obs):
        if not self.steps:
            return obs
        slot_of = np.full(max(self.steps, default=0) + 1, -1)
        for slot, s in enumerate(self.steps):
            if s > 0:
                slot_of[s] = slot
        slot = jnp.asarray(slot_of)[jnp.minimum(step + 1, len(slot_of) - 1)]
        keep = (step + 1 < len(slot_of)) & (slot >= 0)
        slot = jnp.maximum(slot, 0)
        return {k: v.at[slot].add(jnp.where(keep, getattr(after, k), 0)) for k, v in obs.items()}


def step_factors(cosmo: Cosmology, growth: GrowthTable, a_steps) -> Array:
    """FastPM (kick₁, drift, kick₂) factors of each step, shape (n_steps, 3), float64."""
    a = jnp.asarray(a_steps, jnp.float64)
    n = a.shape[0]
    ah = 0.5 * (a[:-1] + a[1:])
    # D₁ and G_f once, at the step boundaries and midpoints together: evaluated per use (ten table
    # look-ups) they made this the largest piece of a simulation's set-up program to trace
    x = jnp.concatenate([a, ah])
    d1_x = growth.D1_at(x)
    g_x = x**2 * E(cosmo, x) * growth.f1_at(x) * d1_x  # G_f = a³E dD₁/da
    d1, g, gh = d1_x[:n], g_x[:n], g_x[n:]
    kick1 = (gh - g[:-1]) / d1[:-1]
    drift = (d1[1:] - d1[:-1]) / gh
    kick2 = (g[1:] - gh) / d1[1:]
    return jnp.stack([kick1, drift, kick2], axis=-1)


def kdk(cfg: SimConfig, state: ParticleState, factors: Array,
        known: tuple[Array, Array] | None = None) -> ParticleState:
    """One kick-drift-kick step; ``factors`` = (kick₁, drift, kick₂). ``known``: the (force,
    density) at the step's end, already computed (the adjoint's backward pass has them in the
    later state), used instead of computing them again, with the same gradient."""
    k1, dr, k2 = (factors[i].astype(state.disp.dtype) for i in range(3))
    mom = state.mom + k1 * state.force
    disp = state.disp + dr * mom
    if known is None:
        force, density = pm_force_and_density(cfg, disp)
    else:
        force, density = _known_force(cfg, disp, *known)
    return ParticleState(disp, mom + k2 * force, force, density)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _known_force(cfg: SimConfig, disp: Array, force: Array, density: Array):
    """(force, density) = ``pm_force_and_density(cfg, disp)``, computed before; the gradient is
    that function's (``pm_force_and_density_vjp``), as pmwd's ``force_adj``."""
    return force, density


def _known_force_fwd(cfg, disp, force, density):
    return (force, density), (disp, density)


def _known_force_bwd(cfg, res, ct):
    disp, density = res
    ct_disp = pm_force_and_density_vjp(cfg, disp, density, *ct)
    # the given values are constants of the step being differentiated (the force has disp's shape)
    return ct_disp, jnp.zeros_like(disp), jnp.zeros_like(density)


_known_force.defvjp(_known_force_fwd, _known_force_bwd)


def kdk_reverse(cfg: SimConfig, state: ParticleState, factors: Array) -> ParticleState:
    """Exact inverse of ``kdk`` (up to round-off): steps back from a₁ to a₀."""
    k1, dr, k2 = (factors[i].astype(state.disp.dtype) for i in range(3))
    mom = state.mom - k2 * state.force
    disp = state.disp - dr * mom
    force, density = pm_force_and_density(cfg, disp)
    return ParticleState(disp, mom - k1 * force, force, density)


def _max_displacement_cells(cfg: SimConfig, disp: Array) -> Array:
    """Largest |displacement| along the sharded axes (x, y), in mesh cells (0 on one device)."""
    if not cfg.grid.sharded:
        return jnp.zeros((), disp.dtype)
    cell = jnp.asarray(cfg.cell_size[:2], disp.dtype)
    return jnp.max(jnp.abs(disp[..., :2]) / cell)


def _step(cfg, observer, progress, a_steps, factors, obs_params, carry, i):
    state, obs, max_disp = carry
    if progress is not None:
        jax.debug.callback(progress, i + 1)
    new = kdk(cfg, state, factors[i])
    obs = observer.update(obs_params, i, a_steps[i], a_steps[i + 1], state, new, obs)
    max_disp = jnp.maximum(max_disp, jax.lax.stop_gradient(_max_displacement_cells(cfg, new.disp)))
    return (new, obs, max_disp), None


def _initial_carry(cfg, state, obs):
    """The loop carry before the first step: (state, observations, max displacement so far)."""
    return state, obs, jax.lax.stop_gradient(_max_displacement_cells(cfg, state.disp))


def _scan(cfg, observer, progress, state, obs, factors, obs_params, remat):
    a_steps = jnp.asarray(cfg.step_scale_factors)
    step = partial(_step, cfg, observer, progress, a_steps, factors, obs_params)
    if remat:
        step = jax.checkpoint(step)
    carry = _initial_carry(cfg, state, obs)
    (state, obs, max_disp), _ = jax.lax.scan(step, carry, jnp.arange(factors.shape[0]))
    return state, obs, max_disp


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _integrate_adjoint(cfg, observer, progress, state, obs, factors, obs_params):
    return _scan(cfg, observer, progress, state, obs, factors, obs_params, remat=False)


def _adjoint_fwd(cfg, observer, progress, state, obs, factors, obs_params):
    out = _scan(cfg, observer, progress, state, obs, factors, obs_params, remat=False)
    final, obs_final, _ = out
    return out, (final, obs_final, factors, obs_params)


def _adjoint_bwd(cfg, observer, progress, residuals, cotangents):
    """Integrate backward in time, re-creating each state from the next one, so memory does not
    grow with the number of steps; at each step pull the cotangents through ``kdk`` (+ observer)."""
    final, obs_final, factors, obs_params = residuals
    ct_state, ct_obs, _ = cotangents
    a_steps = jnp.asarray(cfg.step_scale_factors)

    def forward_step(i, known, state, facs, params):
        new = kdk(cfg, state, facs[i], known)
        # additive observer: its value in ``obs`` does not matter, only g's dependence
        obs = observer.update(params, i, a_steps[i], a_steps[i + 1], state, new, obs_final)
        return new, obs

    def back(carry, i):
        state_next, ct_s, ct_f, ct_p = carry
        state = kdk_reverse(cfg, state_next, factors[i])
        known = (state_next.force, state_next.density)  # not recomputed: only its gradient is
        _, vjp = jax.vjp(partial(forward_step, i, known), state, factors, obs_params)
        ct_s, ct_f_i, ct_p_i = vjp((ct_s, ct_obs))
        ct_f = ct_f + ct_f_i
        ct_p = jax.tree.map(jnp.add, ct_p, ct_p_i)
        return (state, ct_s, ct_f, ct_p), None

    zeros_p = jax.tree.map(jnp.zeros_like, obs_params)
    init = (final, ct_state, jnp.zeros_like(factors), zeros_p)
    (_, ct_state0, ct_factors, ct_params), _ = jax.lax.scan(
        back, init, jnp.arange(factors.shape[0]), reverse=True)
    return ct_state0, ct_obs, ct_factors, ct_params


_integrate_adjoint.defvjp(_adjoint_fwd, _adjoint_bwd)


def integrate(cfg: SimConfig, state: ParticleState, factors: Array, observer: Observer | None = None,
              obs_params: Any = None, progress: Callable[[Array], None] | None = None):
    """Evolve particles through all steps of ``cfg``.

    Args:
      state: initial particles at ``cfg.step_scale_factors[0]``.
      factors: (n_steps, 3) from ``step_factors``.
      observer: optional recorder (e.g. ``Snapshots``); ``obs_params`` are its differentiable inputs.
      progress: optional host callback called with the number of steps done.
    Returns:
      (final state, observations, max displacement in cells along the sharded axes).
    Gradients follow ``cfg.gradient``: "checkpoint" rematerialises each step; "adjoint" re-integrates
    backward in time with memory independent of the number of steps.
    """
    observer = observer or Snapshots(())
    obs = observer.init(state)
    if cfg.gradient == "adjoint":
        return _integrate_adjoint(cfg, observer, progress, state, obs, factors, obs_params)
    return _scan(cfg, observer, progress, state, obs, factors, obs_params, remat=True)


# ---- forward-only integration, one compiled program per step --------------------------------------
#
# A program with a host callback (the ``progress`` of ``integrate``) is never written to JAX's
# persistent compilation cache: the callback is baked into it. Host-side runs that show progress
# (``simulators.simulate``) therefore step from Python instead: ``start_steps`` and ``take_step``
# are callback-free programs, compiled once per configuration and served by the cache in later
# processes, and the caller reports progress between steps. The arithmetic is ``integrate``'s
# forward pass (the same ``_step``), so the results equal it; there is no gradient path here.


def start_steps(cfg: SimConfig, state: ParticleState, observer: Observer):
    """The carry ``take_step`` advances: (state, observations, max displacement in cells)."""
    return _initial_carry(cfg, state, observer.init(state))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def take_step(cfg: SimConfig, observer: Observer, carry, factors: Array, obs_params, i: Array):
    """Step ``i`` (a traced integer: one program for every step) of ``integrate``'s forward pass.

    ``observer`` must be hashable (static). The carry is donated: its buffers are reused for the
    result, so memory stays that of one state as in ``integrate``'s loop.
    """
    a_steps = jnp.asarray(cfg.step_scale_factors)
    carry, _ = _step(cfg, observer, None, a_steps, factors, obs_params, carry, i)
    return carry


def run_steps(cfg: SimConfig, observer: Observer, carry, factors: Array, obs_params,
              progress: Callable[[int], None] | None = None):
    """Every step of ``integrate``'s forward pass from the host (``take_step``), calling
    ``progress(steps_done)`` after each; returns the final carry."""
    for i in range(factors.shape[0]):
        # int64, the type of the step index in ``integrate``'s scan (x64 is on)
        carry = take_step(cfg, observer, carry, factors, obs_params, np.int64(i))
        if progress is not None:
            jax.block_until_ready(carry)  # report steps done, not steps queued
            progress(i + 1)
    return carry
