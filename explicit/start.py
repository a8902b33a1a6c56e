"""A starting field for field-level HMC: a draw from (approximately) p(z | d, θ₀).

Why. The map amplitude goes as σ_8 |z| (exactly in the linear field δ_L ∝ σ_8 z, hence also for
LPT; nearly so after PM steps), and the map depends on (σ_8, z) and (-σ_8, -z) identically at
the linear-field level. Only the white-noise prior, |z|² ~ χ²_N, ties |z| to √N and so fixes σ_8.
A start with the wrong amplitude sends the sampler along that degeneracy: a small random field
(0.1 N(0, 1)) made NUTS raise σ_8 to 1.4 in a 27k-cell PM run, and a full prior draw (random
phases) flipped it to -0.2. The MAP field plus white noise up to |z|² = N (the previous start)
has the right total amplitude but noise on top of the data-matched modes too, so the maps carry
too much power and NUTS dropped σ_8 to 0.34 in its first warm-up iteration.

What ("perturb, then optimise"). At fixed θ₀ (the start values, the prior mean by default), draw
ε ~ N(0, I) on the field and n' ~ N(0, σ_n²) on the pixels and maximise

    -½ |z - ε|² - ½ Σ_pix (d + n' - κ(θ₀, z))² / σ_n²

with Adam from z = ε. For a κ linear in z (Gaussian field, and nearly the LPT/PM maps on the
scales the data resolve) the maximiser is an exact draw from p(z | d, θ₀): the data-measured modes
follow the data, the rest keep the prior's white noise, and |z|² is χ²-typical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import to_host
from .model import FIELD_SITE, log_density


def field_start(model, theta_names, *, seed: int = 0, steps: int = 100,
                learning_rate: float = 0.05, field_site: str = FIELD_SITE, init=None,
                progress=None) -> np.ndarray:
    """A start for the latent field (see the module docstring).

    Args:
      model: the numpyro field model (``field_model``: its ``data``, ``sigma_n`` and ``mask`` are
        perturbed).
      theta_names: its parameter sites; θ stays at ``init`` (constrained values by name) or the
        prior means.
      seed: seed of the perturbations: ε = jax.random.normal(jax.random.key(seed), field shape)
        on the field (drawn block by block where the field is split), n' from
        numpy.random.default_rng(seed) on the pixels.
      steps, learning_rate: Adam iterations (one gradient each) and step size, in units of the
        white-noise field.
      progress: optional callable(step, objective) called every 10 steps.
    Returns: (field shape) float64 numpy array, to pass as ``run_hmc(init={field_site: ...})``;
    where the model's field is split over jax.distributed processes, this process's pieces of it
    (``checkpoint.LocalShards``, float64): the field is never gathered.
    """
    import dataclasses

    import optax

    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    for attr in ("data", "sigma_n", "mask"):
        if not hasattr(model, attr):
            raise ValueError(f"model must be an explicit.field_model (it has no {attr!r})")
    rng = np.random.default_rng(seed)
    data = np.asarray(model.data)
    sigma = np.asarray(model.sigma_n).reshape((-1,) + (1,) * (data.ndim - 1))
    perturbed = dataclasses.replace(
        model, data=jnp.asarray(data + sigma * rng.standard_normal(data.shape)))
    ld = log_density(perturbed, theta_names, field_site=field_site, init=init)
    eps = ld.white_noise(jax.random.key(seed))  # drawn where it lives, split like the field
    theta = ld.unconstrain(ld.init_theta)

    def objective(f, eps):  # -potential is log N(f; 0, I) + log L; + f·ε makes the prior N(ε, I)
        return -ld.potential_fn({**theta, field_site: f}) + jnp.vdot(f, eps)

    @jax.jit
    def step(z, opt_state, eps):  # ε an argument: jit may not close over a multi-process array
        val, g = jax.value_and_grad(objective)(z, eps)
        updates, opt_state = opt.update(jax.tree.map(jnp.negative, g), opt_state)
        return optax.apply_updates(z, updates), opt_state, val

    opt = optax.adam(learning_rate)
    z = eps
    opt_state = opt.init(z)
    for i in range(steps):
        z, opt_state, val = step(z, opt_state, eps)
        if progress is not None and (i % 10 == 9 or i == steps - 1):
            progress(i + 1, float(val))
    return to_host(jnp.asarray(z, jnp.float64))  # split over processes: this process's pieces
