"""Sampler kernels behind one small interface, and the jitted segment that steps any of them.

A ``Stepper`` knows how to start a chain (NUTS: ``kernel.init``; MCLMC: init and tuning), how to
rebuild its state's structure for a checkpoint (``template``), how to take one step, and what to
record per step. ``make_segment`` scans ``segment`` steps in one jitted call; steps past the end of
the run are skipped (``_run_if``) so that every segment, the last included, reuses one compiled
program (a PM gradient can take minutes to compile).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import NUTS
from numpyro.infer.util import ParamInfo

from experiments.config import MCLMC_INTEGRATORS

from .model import LogDensity
from .settings import HMCSettings

Array = jax.Array

# MCLMC tuning budget split over the stages (fractions of num_warmup): blackjax's step size (stage
# 1) and step size with a diagonal preconditioner (stage 2, plus a third of it again to re-adapt
# the step size), then L from θ's autocorrelation (stage 3, ``MCLMCStepper._tune_L``):
# 0.3 + 0.15 + 0.05 + 0.5 = all of num_warmup. Stage 3 has half: it needs a window many times θ's
# autocorrelation time (100-200 steps per effective sample on quick), while the step size settles
# in ~100 steps. Windows shorter than ~10 autocorrelation times still return an L that is short.
MCLMC_FRACS = (0.3, 0.15, 0.5)
# Stage 3 runs in rounds, each at the L the previous one measured (``MCLMCStepper._tune_L``)
MCLMC_L_ROUNDS = 2
# L per autocorrelation time (in path length) of the slow directions: blackjax's default factor
MCLMC_L_FACTOR = 0.4
# blackjax's step-size predictor: the energy errors are averaged over ~MCLMC_N_EFF steps and
# weighted by how far they are from the target, in units of MCLMC_TRUST (its defaults)
MCLMC_N_EFF = 150
MCLMC_TRUST = 1.5


def _dimension(position: dict) -> int:
    """Number of sampled coordinates (θ and every field cell)."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(position))


def _theta_vector(ld: LogDensity, position: dict) -> Array:
    theta = ld.constrain(position)
    return jnp.stack([jnp.asarray(theta[n], jnp.float64) for n in ld.theta_names])


# Finite-difference step of the θ Hessian, in unconstrained units: well below the conditional
# posterior width of θ at fixed field (~3e-3 in log σ_8 on the quick PM problem), well above the
# float32 noise of the simulated gradient.
HESSIAN_STEP = 1e-3


def theta_inverse_mass(ld: LogDensity, position: dict, *, dense: bool = True) -> Array:
    """Initial inverse mass of the θ block: the inverse of the potential's Hessian in θ at fixed
    field (central differences of the θ gradient, 2d gradients), eigenvalues floored at 1.

    Why: at fixed z the data pin θ far more tightly (σ(log σ_8 | z) ~ 3e-3 on quick) than the
    unit scale numpyro starts from; scaled by the Hessian the θ block starts on the scale of the
    field. (On its own this did not cure the 5e-4 warm-up step sizes seen on quick: their cause
    was κ wiggling in Ω_c, fixed in ``simulators.lightcone``.) The floor keeps directions the
    data do not pin at the unit scale.
    Returns (d, d) (dense) or (d,) (diagonal) float64.
    """
    names = ld.theta_names
    d = len(names)

    def theta_grad(u):
        g = ld.value_and_grad({**position, **{n: jnp.asarray(u[i], jnp.asarray(position[n]).dtype)
                                              for i, n in enumerate(names)}})[1]
        return np.array([float(g[n]) for n in names])

    u0 = np.array([float(position[n]) for n in names])
    hess = np.empty((d, d))
    for i in range(d):
        du = np.zeros(d)
        du[i] = HESSIAN_STEP
        # the gradient is of log p: its negative derivative is the potential's Hessian
        hess[i] = -(theta_grad(u0 + du) - theta_grad(u0 - du)) / (2 * HESSIAN_STEP)
    hess = 0.5 * (hess + hess.T)
    if not np.all(np.isfinite(hess)):
        return jnp.eye(d) if dense else jnp.ones(d)
    if not dense:
        return jnp.asarray(1.0 / np.maximum(np.diag(hess), 1.0))
    lam, vec = np.linalg.eigh(hess)
    return jnp.asarray((vec / np.maximum(lam, 1.0)) @ vec.T)


def _nuts(ld: LogDensity, settings: HMCSettings, inverse_mass: dict | None = None) -> NUTS:
    """numpyro NUTS on the plain potential (not the model: numpyro would otherwise re-run and
    differentiate the model eagerly at every init, compiling each operation separately)."""
    # a list (not False) either way: an initial θ mass is then given as its own block
    dense = [tuple(ld.theta_names)] if settings.dense_theta else []
    return NUTS(potential_fn=ld.potential_fn, dense_mass=dense, inverse_mass_matrix=inverse_mass,
                max_tree_depth=settings.max_tree_depth, target_accept_prob=settings.target_accept)


@dataclass(frozen=True, eq=False)
class NUTSStepper:
    """numpyro NUTS driven step by step; its warm-up adaptation follows ``state.i``, so warm-up
    proceeds segment by segment like sampling. State: numpyro ``HMCState``."""

    model: Callable[[], None]
    ld: LogDensity
    settings: HMCSettings
    kernel: Any

    @classmethod
    def build(cls, model, ld: LogDensity, settings: HMCSettings) -> "NUTSStepper":
        return cls(model, ld, settings, _nuts(ld, settings))

    @property
    def first_sample_row(self) -> int:
        return self.settings.num_warmup

    def start(self, key: Array, position: dict, log=None) -> tuple[Any, int]:
        """Initial state (and gradients spent outside the loop: the start's one and the 2d of the
        θ Hessian that sets the initial θ mass, ``theta_inverse_mass``)."""
        # The initial inverse mass depends on the start, so a NUTS object made for this chain
        # builds the state; the shared kernel (whose step the segment traces) gets its closures
        # from ``template``, as on resume, where the adapted mass comes from the checkpoint.
        theta_mass = theta_inverse_mass(self.ld, position, dense=self.settings.dense_theta)
        first = _nuts(self.ld, self.settings, {tuple(self.ld.theta_names): theta_mass})
        start = self._param_info(position)
        self.kernel.init(key, self.settings.num_warmup, init_params=start)
        state = first.init(key, self.settings.num_warmup, init_params=start)
        return state, 1 + 2 * len(self.ld.theta_names)

    def template(self, key: Array, position: dict) -> Any:
        # init also sets the kernel's closures (warm-up schedule for num_warmup), so it runs on
        # resume too, before the segment function is traced.
        return self.kernel.init(key, self.settings.num_warmup,
                                init_params=self._param_info(position))

    def _param_info(self, position: dict) -> ParamInfo:
        logp, grad = self.ld.value_and_grad(position)
        return ParamInfo(position, -logp, jax.tree.map(jnp.negative, grad))

    def tuned(self, state) -> dict:
        return {}

    def step(self, state, it):
        return self.kernel.sample(state, (), {}), None

    def position(self, state) -> dict:
        return state.z

    def record(self, state, info) -> dict:
        return {"theta": _theta_vector(self.ld, state.z),
                "potential_energy": state.potential_energy,
                "num_grads": state.num_steps.astype(jnp.int64),
                "diverging": state.diverging,
                "accept_prob": state.accept_prob.astype(jnp.float64),
                "step_size": jnp.asarray(state.adapt_state.step_size, jnp.float64),
                "energy_change": jnp.asarray(jnp.nan, jnp.float64)}


@dataclass(frozen=True, eq=False)
class MCLMCStepper:
    """blackjax MCLMC (the isokinetic integrator ``settings.integrator``: velocity Verlet's one
    gradient per step by default), tuned as blackjax's
    ``mclmc_find_L_and_step_size`` tunes it (``tune``). State: {"state": IntegratorState, "params":
    MCLMCAdaptationState, "key": the sampling key, folded with the iteration number per step}."""

    model: Callable[[], None]
    ld: LogDensity
    settings: HMCSettings

    @property
    def kernel(self):
        import blackjax
        from blackjax.mcmc import integrators

        scheme = getattr(integrators, f"isokinetic_{self.settings.integrator}")
        return blackjax.mcmc.mclmc.build_kernel(integrator=scheme)

    @property
    def grads_per_step(self) -> int:
        return MCLMC_INTEGRATORS[self.settings.integrator]

    @property
    def first_sample_row(self) -> int:
        return 0  # tuning happens before the segmented loop

    def tuning_steps(self, n: int | None = None) -> int:
        """Gradient evaluations of ``start`` with n (default num_warmup) tuning steps: init, the θ
        Hessian, blackjax's two stages as it runs them, then the L stage."""
        n = self.settings.num_warmup if n is None else n
        f1, f2, f3 = MCLMC_FRACS
        n2 = round(n * f2)
        n3 = round(n * f3)
        steps = (round(n * f1) + n2 + (round(n2 / 3) if n2 > 1 else 0) + (n3 if n3 >= 2 else 0))
        return 1 + 2 * len(self.ld.theta_names) + self.grads_per_step * steps

    def _init(self, position: dict, key: Array):
        """``blackjax.mcmc.mclmc.init`` (the same state: log p, its gradient, a random unit
        momentum) with the log-density's own compiled gradient, which the θ mass and the start
        share: jitting blackjax's init compiles a second gradient program (~10 s on the test's
        tiny PM model)."""
        from blackjax.mcmc.integrators import IntegratorState

        logp, grad = self.ld.value_and_grad(position)
        return IntegratorState(position, self._unit_vector(key, position), logp, grad)

    @cached_property
    def _unit_vector(self) -> Callable:
        from blackjax.util import generate_unit_vector

        return jax.jit(generate_unit_vector)

    def tune(self, key: Array, state, initial, n: int):
        """(state, params) after n tuning steps from ``initial`` (MCLMCAdaptationState).

        Stages 1-2 are blackjax's ``mclmc_find_L_and_step_size`` (its step-size predictor, its
        NaN handling, its streaming mean and variance for the diagonal preconditioner, the same
        keys), stage 3 is ``_tune_L``, all run as a Python loop over one compiled step
        (``_tuning_step``): blackjax's tuner compiles the kernel, and with it the model's
        gradient, once per stage (three programs: ~35 s of compilation on quick against ~13 s for
        the one step; NOTEBOOK 24). The loop costs microseconds per step on the host.
        """
        from blackjax.adaptation.mclmc_adaptation import MCLMCAdaptationState

        f1, f2, f3 = MCLMC_FRACS
        k12, k3 = jax.random.split(key)
        part1, _ = jax.random.split(k12)  # blackjax's own third stage (key 2) is not used
        n1, n2, n3 = round(n * f1), round(n * f2), round(n * f3)
        dim = _dimension(state.position)
        params = MCLMCAdaptationState(*(jnp.asarray(p, jnp.float64) for p in initial))
        f64 = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731
        yes = jnp.asarray(True)

        def run(state, params, keys, weights):
            adaptive = (f64(0.0), f64(0.0), f64(jnp.inf))
            avg = (f64(0.0), jnp.zeros((2, dim), jnp.float64))
            for k, w in zip(keys, weights):
                state, params, adaptive, avg, _ = self._tuning_step(k, state, params, adaptive,
                                                                    avg, f64(w), yes)
            return state, params, avg[1]

        keys = jax.random.split(part1, n1 + n2 + 1)
        state, params, average = run(state, params, keys[:-1], [0.0] * n1 + [1.0] * n2)
        if n2 > 1:  # stage 2's weighted variances: the diagonal preconditioner, L = sqrt(dim)
            variances = average[1] - jnp.square(average[0])
            params = params._replace(inverse_mass_matrix=variances)
            m = round(n2 / 3)  # the step size re-adapted to it
            state, params, _ = run(state, params, jax.random.split(keys[-1], m), [1.0] * m)
            params = params._replace(L=jnp.sqrt(f64(dim)))
        return self._tune_L(k3, state, params, n3) if n3 >= 2 else (state, params)

    @cached_property
    def _tuning_step(self) -> Callable:
        """jit: (key, state, params, (time, x_average, step_max), (weight total, (2, d) mean of
        x and x²), weight, adapt) → the same after one kernel step. With ``adapt``, blackjax's
        stage-1/2 step (``make_L_step_size_adaptation``: the step size from the energy error's
        weighted mean, a diverging step undone and the maximum step lowered, x and x² averaged
        with weight × success × step size); without, the plain kernel step from ``key``, the
        parameters unchanged (stage 3). Also returns θ after the step (unconstrained)."""
        from blackjax.adaptation.mclmc_adaptation import handle_nans
        from blackjax.util import incremental_value_update
        from jax.flatten_util import ravel_pytree

        decay = (MCLMC_N_EFF - 1.0) / (MCLMC_N_EFF + 1.0)
        target = self.settings.energy_variance

        def step(key, state, params, adaptive, avg, weight, adapt):
            t, x_avg, step_max = adaptive
            k_move, k_nan = jax.random.split(key)
            k_move = jnp.where(adapt, k_move, key)
            nxt, info = self.kernel(k_move, state, self.ld.logdensity, params.inverse_mass_matrix,
                                    params.L, params.step_size)
            ok, kept, new_max, d_e = handle_nans(state, nxt, params.step_size, step_max,
                                                 info.energy_change, info.nonans, k_nan)
            dim = _dimension(state.position)
            xi = jnp.square(d_e) / (dim * target) + 1e-8
            w = jnp.exp(-0.5 * jnp.square(jnp.log(xi) / (6.0 * MCLMC_TRUST)))
            x_avg = decay * x_avg + w * (xi / jnp.power(params.step_size, 6.0))
            t = decay * t + w
            eps = jnp.power(x_avg / t, -1.0 / 6.0)
            eps = (eps < new_max) * eps + (eps > new_max) * new_max
            pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(adapt, u, v), a, b)  # noqa: E731
            state = pick(kept, nxt)
            params = params._replace(step_size=jnp.where(adapt, eps, params.step_size))
            adaptive = pick((t, x_avg, new_max), adaptive)
            x = ravel_pytree(state.position)[0]
            avg = incremental_value_update(jnp.array([x, jnp.square(x)]), avg,
                                           weight=weight * ok * params.step_size)
            # θ in the sampler's (unconstrained) coordinates, where L is a path length
            theta = jnp.stack([jnp.asarray(state.position[n], jnp.float64)
                               for n in self.ld.theta_names])
            return state, params, adaptive, avg, theta

        return jax.jit(step)

    def _tune_L(self, key, state, params, n: int):
        """blackjax's third tuning stage, L = MCLMC_L_FACTOR × step × τ with τ = steps per
        effective sample of the θ sites (mean over θ), run as MCLMC_L_ROUNDS rounds that split
        the n steps, each at the L the previous round found.

        Why rounds: τ depends on L, and a window of w steps measures τ only when w ≫ τ; shorter
        windows over-estimate the ESS, so L comes out short, and a short L raises τ further. On
        quick, 80-step windows gave L ≈ 200 where the chain's own τ at L = 700-1400 gives the
        self-consistent L ≈ 900 (NOTEBOOK 28); the first round moves L from √d towards that fixed
        point, the second measures τ near it. Only θ enters: blackjax keeps all n positions
        (n × the field: 100 × 4 GB for a 1024³ float32 field) and averages the autocorrelation
        time over every dimension, i.e. over field cells, while θ is what mixes slowest and what
        the run is for. The steps are ``_tuning_step``'s plain kernel steps."""
        from blackjax.diagnostics import effective_sample_size

        zero = jnp.asarray(0.0, jnp.float64)
        adaptive, avg = (zero, zero, zero), (zero, jnp.zeros((2, _dimension(state.position))))
        keys = jax.random.split(key, n)
        bounds = np.linspace(0, n, MCLMC_L_ROUNDS + 1).round().astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            trace = []
            for k in keys[lo:hi]:
                state, params, adaptive, avg, theta = self._tuning_step(
                    k, state, params, adaptive, avg, zero, jnp.asarray(False))
                trace.append(theta)
            if hi - lo < 2:  # one step has no autocorrelation
                continue
            # (d,) steps per effective sample; a θ that never moved has ESS 0: no information on L
            tau = (hi - lo) / effective_sample_size(jnp.stack(trace)[None])
            finite = jnp.isfinite(tau)
            params = params._replace(L=jnp.where(
                jnp.any(finite), MCLMC_L_FACTOR * params.step_size * jnp.mean(tau, where=finite),
                params.L))
        return state, params

    def initial_params(self, position: dict):
        """blackjax's starting L = √d and step √d / 4, with a diagonal preconditioner whose θ
        entries come from the Hessian (``theta_inverse_mass``) and field entries are 1. Without
        it, the first tuning steps (step ~40 on the 27k-cell quick field) threw θ out of the
        posterior (Ω_c → 0, σ_8 → 4) before the step size had shrunk, and the chain never came
        back."""
        from blackjax.adaptation.mclmc_adaptation import MCLMCAdaptationState
        from jax.flatten_util import ravel_pytree

        inv = theta_inverse_mass(self.ld, position, dense=False)
        tree = {k: jnp.ones_like(v) for k, v in position.items()}
        tree.update({n: inv[i] for i, n in enumerate(self.ld.theta_names)})
        diag = ravel_pytree(tree)[0].astype(jnp.float64)
        d = jnp.asarray(diag.size, jnp.float64)
        return MCLMCAdaptationState(jnp.sqrt(d), 0.25 * jnp.sqrt(d), inverse_mass_matrix=diag)

    def start(self, key: Array, position: dict, log=None) -> tuple[Any, int]:
        k_init, k_tune, k_sample = jax.random.split(key, 3)
        state = self._init(position, k_init)
        state, params = self.tune(k_tune, state, self.initial_params(position),
                                  self.settings.num_warmup)
        return {"state": state, "params": params, "key": k_sample}, self.tuning_steps()

    def template(self, key: Array, position: dict) -> Any:
        from blackjax.adaptation.mclmc_adaptation import MCLMCAdaptationState

        state = jax.eval_shape(self._init, position, key)
        f64 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float64)  # noqa: E731
        params = MCLMCAdaptationState(f64(), f64(), f64(_dimension(position)))
        return {"state": state, "params": params, "key": jax.ShapeDtypeStruct(key.shape, key.dtype)}

    def tuned(self, st) -> dict:
        return {"L": float(st["params"].L), "step_size": float(st["params"].step_size)}

    def step(self, st, it):
        p = st["params"]
        new, info = self.kernel(jax.random.fold_in(st["key"], it), st["state"], self.ld.logdensity,
                                p.inverse_mass_matrix, p.L, p.step_size)
        return {"state": new, "params": p, "key": st["key"]}, info

    def position(self, st) -> dict:
        return st["state"].position

    def record(self, st, info) -> dict:
        return {"theta": _theta_vector(self.ld, st["state"].position),
                "potential_energy": -st["state"].logdensity.astype(jnp.float64),
                "num_grads": jnp.asarray(self.grads_per_step, jnp.int64),
                "diverging": jnp.logical_not(info.nonans),
                "accept_prob": jnp.asarray(jnp.nan, jnp.float64),
                "step_size": st["params"].step_size,
                "energy_change": jnp.asarray(info.energy_change, jnp.float64)}


# MAMS warm-up, in fractions of num_warmup: MCLMC's tuning (unadjusted, cheap: it brings the chain
# to the typical set and sets L and the diagonal preconditioner), dual averaging of the adjusted
# kernel's step size at that L, then the L stage (``MAMSStepper._lengthen``); the rest of
# num_warmup.
MAMS_FRACS = (0.5, 0.3)


def _mams_grads(info) -> Array:
    """Gradient evaluations of one MAMS transition (int64). Its trajectories use the isokinetic
    McLachlan integrator (the MAMS paper's: at equal cost its energy error is smaller than
    velocity Verlet's in high dimension, which is what the acceptance test sees), whose gradients
    per step ``MCLMC_INTEGRATORS`` states."""
    return MCLMC_INTEGRATORS["mclachlan"] * info.num_integration_steps.astype(jnp.int64)
# Step sizes the adaptation may reach, relative to L: at least 2 and at most 1024 integration steps
# per trajectory on average. At 1 step the trajectory is a Langevin step and MAMS a random walk
# (on gaussian_check the step then grew to L, acceptance stayed ~0.9 and two chains had ESS 1);
# blackjax's own tuner keeps 2 for the same reason (its issue #940). The cap keeps an unlucky
# warm-up from making one iteration unboundedly long.
MAMS_MIN_STEPS, MAMS_MAX_STEPS = 2, 1024
# MAMS trajectory length per MCLMC L. MCLMC's L (MCLMC_L_FACTOR × the path length per effective θ
# sample) suits its partial momentum refresh; MAMS refreshes fully once per trajectory, which must
# then span the path length of one effective sample: the L stage's starting point. On the 13-d
# linear-Gaussian toy of the tests, without the L stage: 144 gradients per effective θ sample at
# factor 1, 27 at 2.5, 16 at 5; at 2.5 with the L stage, 17 (with MCLMC's L stage of 1 round over
# a fifth of the warm-up, as it was then).
MAMS_L_FACTOR = 1.0 / MCLMC_L_FACTOR
# The L stage lengthens trajectories that are still diffusive for θ: with τ adjusted draws per
# effective θ sample, L grows by √τ (in the ballistic regime ESS per draw goes as L²), at most by
# this factor, and never shrinks.
MAMS_L_GROWTH = 4.0


def mams_step_factor(dim: int, energy_variance: float, target_accept: float) -> float:
    """Where MAMS's step-size adaptation starts, relative to MCLMC's tuned step.

    MCLMC tunes its step so that the energy error per step has variance ``energy_variance`` per
    dimension; an adjusted chain needs the whole error small: with ΔE ~ N(σ²/2, σ²) the mean
    acceptance is 2Φ(−σ/2), so ``target_accept`` asks for σ² = (2Φ⁻¹(target_accept / 2))². The
    error variance goes as step⁴, hence the factor (σ² / (dim · energy_variance))^¼. On the
    27,648-cell quick field at 0.8 this is ~0.37: adaptation started from MCLMC's own step spent
    its first trajectories (and most of a warm-up) far too coarse. Dual averaging corrects the rest
    (the error also grows along a trajectory)."""
    from scipy.stats import norm

    sigma2 = (2.0 * norm.ppf(target_accept / 2.0)) ** 2
    return float((sigma2 / (dim * energy_variance)) ** 0.25)


@dataclass(frozen=True, eq=False)
class MAMSStepper:
    """Metropolis-adjusted microcanonical HMC (Robnik et al. 2025; blackjax
    ``adjusted_mclmc_dynamic``): isokinetic McLachlan trajectories of a random number of steps
    (uniform, mean L / step size), full momentum refresh, and a Metropolis test, so the chain is
    unbiased at any step size. Warm-up: MCLMC's tuning (``MCLMCStepper``) for L, the step size
    and the diagonal preconditioner, dual averaging of the step size towards ``target_accept``,
    then longer trajectories where θ still moves diffusively (``_lengthen``). State: {"state": DynamicHMCState, "params": MCLMCAdaptationState, "key"}."""

    model: Callable[[], None]
    ld: LogDensity
    settings: HMCSettings

    @cached_property
    def mclmc(self) -> MCLMCStepper:
        return MCLMCStepper(self.model, self.ld, self.settings)

    @cached_property
    def kernel(self):
        from blackjax.mcmc import adjusted_mclmc_dynamic as amd
        from blackjax.mcmc.integrators import isokinetic_mclachlan

        return amd.build_kernel(
            integration_steps_fn=amd.make_random_trajectory_length_fn(True),
            integrator=isokinetic_mclachlan)

    @property
    def first_sample_row(self) -> int:
        return 0

    def _n_warmup(self) -> tuple[int, int, int]:
        n = self.settings.num_warmup
        n1, n2 = (round(n * f) for f in MAMS_FRACS)
        return n1, n2, n - n1 - n2

    def _move(self, key, state, params):
        """One adjusted transition at ``params``; returns (state, info)."""
        return self.kernel(key, state, self.ld.logdensity, params.step_size,
                           inverse_mass_matrix=params.inverse_mass_matrix,
                           integration_steps_params=(params.L / params.step_size,))

    @cached_property
    def _adapt(self) -> Callable:
        """jit: (key, state, params, n) → (state, params, gradients spent): n dual-averaging steps
        of the step size at fixed L (n static)."""
        from blackjax.adaptation.step_size import dual_averaging_adaptation

        init_da, update_da, _ = dual_averaging_adaptation(target=self.settings.target_accept)

        def adapt(key, state, params, n):
            low, high = params.L / MAMS_MAX_STEPS, params.L / MAMS_MIN_STEPS

            def body(carry, k):
                st, da, grads = carry
                eps = jnp.clip(jnp.exp(da.log_step_size), low, high)
                st, info = self._move(k, st, params._replace(step_size=eps))
                acc = jnp.where(jnp.isfinite(info.acceptance_rate), info.acceptance_rate, 0.0)
                grads = grads + _mams_grads(info)
                return (st, update_da(da, acc), grads), None

            carry = (state, init_da(params.step_size), jnp.asarray(0, jnp.int64))
            (state, da, grads), _ = jax.lax.scan(body, carry, jax.random.split(key, n))
            eps = jnp.clip(jnp.exp(da.log_step_size_avg), low, high)
            return state, params._replace(step_size=jnp.asarray(eps, jnp.float64)), grads

        return jax.jit(adapt, static_argnums=3)

    @cached_property
    def _lengthen(self) -> Callable:
        """jit: (key, state, params, n) → (state, params, gradients spent): n adjusted steps at
        ``params``, then L × clip(√τ, 1, MAMS_L_GROWTH), τ the adjusted draws per effective sample
        of the slowest θ over those steps (n static)."""
        from blackjax.diagnostics import effective_sample_size

        def lengthen(key, state, params, n):
            def body(carry, k):
                st, grads = carry
                st, info = self._move(k, st, params)
                grads = grads + _mams_grads(info)
                return (st, grads), _theta_vector(self.ld, st.position)

            (state, grads), trace = jax.lax.scan(body, (state, jnp.asarray(0, jnp.int64)),
                                                 jax.random.split(key, n))
            tau = n / effective_sample_size(trace[None])
            tau = jnp.max(jnp.where(jnp.isfinite(tau), tau, 1.0))
            growth = jnp.clip(jnp.sqrt(tau), 1.0, MAMS_L_GROWTH)
            return state, params._replace(L=params.L * growth), grads

        return jax.jit(lengthen, static_argnums=3)

    def start(self, key: Array, position: dict, log=None) -> tuple[Any, int]:
        """Warm-up in three stages (MCLMC tuning, step-size adaptation, L stage); ``log``, if
        given, is called with one line after each: the stages are long single calls."""
        from blackjax.mcmc.dynamic_hmc import DynamicHMCState

        k_init, k_tune, k_adapt, k_len, k_arg, k_sample = jax.random.split(key, 6)
        n1, n2, n3 = self._n_warmup()
        mc = self.mclmc
        t0 = time.perf_counter()

        def report(stage, n, g, p, then=""):
            if log is not None:
                log(f"{stage}: {n} steps, {g} gradients, {time.perf_counter() - t0:.0f} s so far; "
                    f"L {float(p.L):.4g}, step {float(p.step_size):.4g} "
                    f"({float(p.L / p.step_size):.1f} steps per trajectory){then}")

        st = mc._init(position, k_init)
        st, tuned = mc.tune(k_tune, st, mc.initial_params(position), n1)
        factor = min(1.0, mams_step_factor(_dimension(position), self.settings.energy_variance,
                                           self.settings.target_accept))
        params = tuned._replace(L=MAMS_L_FACTOR * tuned.L, step_size=tuned.step_size * factor)
        state = DynamicHMCState(st.position, st.logdensity, st.logdensity_grad, k_arg)
        grads = mc.tuning_steps(n1)
        report("MCLMC tuning", n1, grads, tuned,
               f"; MAMS starts at L {float(params.L):.4g}, step {float(params.step_size):.4g}")
        if n2 > 0:
            state, params, g = self._adapt(k_adapt, state, params, n2)
            grads += int(g)
            report("step-size adaptation", n2, int(g), params)
        if n3 >= 10:  # fewer draws say nothing about the autocorrelation
            state, params, g = self._lengthen(k_len, state, params, n3)
            grads += int(g)
            report("L stage", n3, int(g), params)
        return {"state": state, "params": params, "key": k_sample}, grads

    def template(self, key: Array, position: dict) -> Any:
        from blackjax.mcmc.dynamic_hmc import DynamicHMCState

        t = self.mclmc.template(key, position)
        st = t["state"]
        state = DynamicHMCState(st.position, st.logdensity, st.logdensity_grad, t["key"])
        return {**t, "state": state}

    def tuned(self, st) -> dict:
        p = st["params"]
        return {"L": float(p.L), "step_size": float(p.step_size),
                "mean_steps": float(p.L / p.step_size)}

    def step(self, st, it):
        new, info = self._move(jax.random.fold_in(st["key"], it), st["state"], st["params"])
        return {**st, "state": new}, info

    def position(self, st) -> dict:
        return st["state"].position

    def record(self, st, info) -> dict:
        return {"theta": _theta_vector(self.ld, st["state"].position),
                "potential_energy": -st["state"].logdensity.astype(jnp.float64),
                "num_grads": _mams_grads(info),
                "diverging": info.is_divergent,
                "accept_prob": jnp.asarray(info.acceptance_rate, jnp.float64),
                "step_size": st["params"].step_size,
                "energy_change": jnp.asarray(jnp.nan, jnp.float64)}


def make_stepper(model, ld: LogDensity, settings: HMCSettings):
    if settings.sampler == "nuts":
        return NUTSStepper.build(model, ld, settings)
    if settings.sampler == "mams":
        return MAMSStepper(model, ld, settings)
    return MCLMCStepper(model, ld, settings)


def keep_capacity(settings: HMCSettings) -> int:
    """Most field samples any segment can keep (0 when thin_field is 0)."""
    if settings.thin_field == 0:
        return 0
    return math.ceil(settings.segment / settings.thin_field)


def _run_if(pred, f, x):
    """f(x) if pred else x, as a while loop run 0 or 1 times. Not lax.cond: on XLA CPU a cond
    around a cheap-step kernel (MCLMC) made each step ~5x slower (0.56 → 2.7 ms on the 8x8
    Gaussian-field model), and a cond around the field buffer may copy it every step."""
    return jax.lax.while_loop(lambda c: c[1] < pred.astype(jnp.int32),
                              lambda c: (f(c[0]), c[1] + 1), (x, jnp.int32(0)))[0]


def make_segment(stepper, settings: HMCSettings, field_dtype) -> Callable:
    """jit: (state, its (L,), active (L,), keep (L,), slot (L,)) → (state, records, fields).

    L = settings.segment. Inactive steps leave the state alone and cost nothing (their records are
    garbage, for the caller to drop). Kept steps write the field (cast to ``field_dtype``) into
    slot ``slot`` of a (keep_capacity, *field_shape) buffer, so only thinned fields leave the device.
    """
    ld = stepper.ld
    n_keep = keep_capacity(settings)

    def segment(state, its, active, keep, slot):
        _, info_shape = jax.eval_shape(stepper.step, state, its[0])
        no_info = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), info_shape)

        def body(carry, xs):
            s, buf = carry
            it, act, kp, sl = xs
            s, info = _run_if(act, lambda c: stepper.step(c[0], it), (s, no_info))
            if n_keep:
                field = ld.to_model(stepper.position(s))[ld.field_site].astype(field_dtype)
                buf = _run_if(kp, lambda b: jax.lax.dynamic_update_index_in_dim(b, field, sl, 0), buf)
            return (s, buf), stepper.record(s, info)

        buf = jnp.zeros((n_keep,) + ld.field_shape, field_dtype) if n_keep else None
        (state, buf), records = jax.lax.scan(body, (state, buf), (its, active, keep, slot))
        return state, records, buf

    return jax.jit(segment)
