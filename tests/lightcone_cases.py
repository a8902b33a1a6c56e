"""Small lightcone cases shared by the lightcone tests and the multi-device worker (no side effects)."""

import jax
import jax.numpy as jnp
import numpy as np

from simulators import Cosmology
from simulators.lensing import pm_kappa
from simulators.lightcone import FlatSky, Lightcone
from simulators.sources import RedshiftBins

COSMO = Cosmology.fiducial()

# Two Gaussian source bins at z ~ 0.3 and 0.5 (chi ~ 850 and 1330 Mpc/h): a 128 x 128 x 512 Mpc/h
# box is replicated 3 times along the line of sight, and a 4 degree field (93 Mpc/h wide at
# chi = 1330) fits in one box transversally. 8 Mpc/h cells, 6 steps from a = 0.3.
_Z = np.linspace(0.0, 0.8, 161)
BINS = RedshiftBins.from_arrays(
    _Z, np.stack([np.exp(-0.5 * ((_Z - zc) / 0.06) ** 2) for zc in (0.3, 0.5)]), 10.0, 0.26)
BASE = dict(mesh_shape=(16, 16, 64), box_size=(128.0, 128.0, 512.0), a_init=0.3, n_steps=6)
SKY = FlatSky(4.0, 24)
CHI_MAX = 1500.0


def lightcone(**kw):
    return Lightcone(SKY, CHI_MAX, **kw)


def with_omega_c(omega_c):
    return Cosmology(Omega_c=omega_c, Omega_b=COSMO.Omega_b, h=COSMO.h, n_s=COSMO.n_s,
                     sigma8=COSMO.sigma8)


def map_loss(cfg, lc):
    """jit(value_and_grad) of L = Σ κ² w (fixed random weights w) w.r.t. (Omega_c, noise)."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(BINS.n_bins,) + lc.sky.shape))

    def loss(omega_c, noise):
        kappa, _ = pm_kappa(with_omega_c(omega_c), cfg, lc, BINS, noise)
        return jnp.sum(w * kappa) + 10 * jnp.sum(kappa**2), kappa

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
