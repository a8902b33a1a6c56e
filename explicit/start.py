"""A starting field for field-level HMC: data-matched phases, prior-typical amplitude.

Why. The map amplitude goes as σ_8 |z| (exactly in the linear field δ_L ∝ σ_8 z, hence also for
LPT; nearly so after PM steps), and the map depends on (σ_8, z) and (-σ_8, -z) identically at
the linear-field level. Only the white-noise prior, |z|² ~ χ²_N, ties |z| to √N and so fixes σ_8.
A start with the wrong amplitude or random phases therefore sends the sampler along that
degeneracy: a small random field (0.1 N(0, 1)) made NUTS raise σ_8 to 1.4 in a 27k-cell PM run,
and a full prior draw (random phases) flipped it to -0.2, each then crawling with a tiny step.

What. At fixed θ (the start values, the prior mean by default), maximise log p(z | d, θ) over z
with Adam from z = 0 for ``steps`` steps; the maximiser has the data's phases in the modes the
data measure, but (Wiener-filter-like) too little power in the rest, so white noise of the
missing amplitude is added: z0 = z_MAP + s ε, s² = max(0, N - |z_MAP|²) / N, giving |z0|² ≈ N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .model import FIELD_SITE, log_density


def field_start(model, theta_names, *, seed: int = 0, steps: int = 100,
                learning_rate: float = 0.05, field_site: str = FIELD_SITE, init=None,
                progress=None) -> np.ndarray:
    """A start for the latent field (see the module docstring).

    Args:
      model: the numpyro field model (``field_model``).
      theta_names: its parameter sites; θ stays at ``init`` (constrained values by name) or the
        prior means.
      seed: seed of the added white noise.
      steps, learning_rate: Adam iterations (one gradient each) and step size, in units of the
        white-noise field.
      progress: optional callable(step, log p) called every 10 steps.
    Returns: (field shape) float64 numpy array, to pass as ``run_hmc(init={field_site: ...})``.
    """
    import optax

    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    ld = log_density(model, theta_names, field_site=field_site, init=init)
    put = getattr(model, "put", jnp.asarray)
    theta = ld.unconstrain(ld.init_theta)
    z = put(np.zeros(ld.field_shape))

    @jax.jit
    def step(z, opt_state):
        neg, g = jax.value_and_grad(lambda f: ld.potential_fn({**theta, field_site: f}))(z)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(z, updates), opt_state, -neg

    opt = optax.adam(learning_rate)
    opt_state = opt.init(z)
    for i in range(steps):
        z, opt_state, logp = step(z, opt_state)
        if progress is not None and (i % 10 == 9 or i == steps - 1):
            progress(i + 1, float(logp))
    z = np.asarray(z, np.float64)
    n = z.size
    scale = np.sqrt(max(0.0, n - float(np.sum(z ** 2))) / n)
    noise = np.random.default_rng(seed).standard_normal(z.shape)
    return z + scale * noise
