"""Small simulation cases shared by the multi-device and multi-process tests (no side effects)."""

import jax
import jax.numpy as jnp

from simulators import Cosmology, evolve, linear_field
from simulators.forces import paint_density

# 16 x 16 x 32 tall box (non-cubic mesh), float64 so that sharded and single-device results can be
# compared at round-off level, 3 steps from a = 0.2 to 0.6 (displacements stay inside a 4-cell halo).
BASE = dict(mesh_shape=(16, 16, 32), box_size=(64.0, 64.0, 128.0), a_init=0.2, a_final=0.6,
            n_steps=3, snapshots=(0.4,), dtype="float64")
COSMO = Cosmology.fiducial()


def loss_fn(cfg):
    def loss(omega_c, noise):
        cosmo = Cosmology(Omega_c=omega_c, Omega_b=COSMO.Omega_b, h=COSMO.h, n_s=COSMO.n_s,
                          sigma8=COSMO.sigma8)
        out = evolve(cosmo, cfg, linear_field(cosmo, cfg, noise))
        rho = paint_density(cfg, out.final.disp)
        return jnp.sum(rho**2), (rho, out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
