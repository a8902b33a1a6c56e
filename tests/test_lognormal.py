"""The shifted-lognormal flat-sky κ model (``lensing.LognormalLensing``): shift parameters, lower
bound, C_ℓ against Limber, skewness, gradients, and the config switch.

One 10° / 64² setup with three LSST-Y10 bins and 8 realisations (module fixture) serves the map
checks; the gradient check uses a small 5° / 16² two-bin setup.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.config import ConfigError, load_config
from simulators import Cosmology, flatsky
from simulators.cosmology import background
from simulators.lensing import GaussianLensing, LognormalLensing, lognormal_shift
from simulators.lightcone import FlatSky
from simulators.sources import RedshiftBins, lensing_efficiency

COSMO = Cosmology.fiducial()
BINS3 = RedshiftBins.lsst_y10(n_bins=3)
FIELD, NPIX, N_REAL = 10.0, 64, 8
EDGES = np.array([72.0, 150.0, 300.0, 600.0, 1000.0])


@pytest.fixture(scope="module")
def maps():
    """(lambda (3,), lognormal maps (8, 3, 64, 64), Gaussian maps from the same latents)."""
    sky = FlatSky(FIELD, NPIX)
    ln, gs = LognormalLensing(sky, BINS3), GaussianLensing(sky, BINS3)
    latents = [ln.latent(s) for s in range(N_REAL)]
    run_ln, run_gs = jax.jit(ln.kappa), jax.jit(gs.kappa)
    k_ln = np.stack([np.asarray(run_ln(COSMO, z)) for z in latents])
    k_gs = np.stack([np.asarray(run_gs(COSMO, z)) for z in latents])
    return np.asarray(ln.shift(COSMO)), k_ln, k_gs


def test_shift_is_empty_beam_convergence():
    lam = np.asarray(lognormal_shift(COSMO, BINS3))
    # independent: numpy trapezoid on a different (finer) chi grid
    chi_max = float(background(COSMO).comoving_distance(1.0 / (1.0 + BINS3.z[-1])))
    chi = np.linspace(0.0, chi_max, 4001)
    ref = np.trapezoid(np.asarray(lensing_efficiency(COSMO, BINS3, chi)), chi, axis=-1)
    assert lam.shape == (3,)
    assert np.allclose(lam, ref, rtol=1e-5, atol=0), (lam, ref)
    assert np.all((lam > 0.005) & (lam < 0.2)) and np.all(np.diff(lam) > 0), lam


def test_maps_above_empty_beam_bound(maps):
    lam, k_ln, _ = maps
    assert k_ln.shape == (N_REAL, 3, NPIX, NPIX) and k_ln.dtype == np.float64
    assert np.all(np.isfinite(k_ln))
    assert np.all(k_ln > -lam[None, :, None, None])
    # the bound is approached, not just respected trivially: the lowest bin's minimum is < -0.4 λ
    assert k_ln[:, 0].min() < -0.4 * lam[0]
    # mean 0 (the -σ²_g/2): measured |mean| / rms ≤ 0.005; without it the mean would be σ_κ²/(2λ),
    # 0.15 rms in the lowest bin
    mean, rms = k_ln.mean(axis=(0, 2, 3)), k_ln.std(axis=(0, 2, 3))
    assert np.all(np.abs(mean) < 0.03 * rms), (mean, rms)


def test_cl_matches_limber(maps):
    """Mean C_ℓ of 8 realisations vs the Limber model averaged over the same modes.

    Gaussian error of the mean: σ²(C_ij) = (C_ii C_jj + C_ij²) / (n_modes N_real) (n_modes counts
    ±ℓ, i.e. twice the independent complex modes). The lognormal field's connected trispectrum
    adds variance (largest in the lowest-z bin, whose ξ(0)/λ² ≈ 0.09); we allow 4σ. The model's
    own bias (C^g ℓ = 0 mode dropped, clipping) is ≲ 1e-5 relative, far below this.
    """
    _, k_ln, _ = maps
    cls = np.stack([np.asarray(flatsky.cl_estimate(k, FIELD, EDGES)[0]) for k in k_ln])
    mean = cls.mean(axis=0)
    limber = jax.jit(lambda ell: flatsky.limber_cl(COSMO, BINS3, ell))  # jit: faster than eager
    model, _, n_modes = flatsky.binned_model_cl(limber, FIELD, NPIX, EDGES)
    model, n_modes = np.asarray(model), np.asarray(n_modes)
    i, j = flatsky.pair_indices(3)
    auto = {a: p for p, (a, b) in enumerate(zip(i, j)) if a == b}
    var = (model[[auto[a] for a in i]] * model[[auto[b] for b in j]] + model**2) / (n_modes * N_REAL)
    pull = (mean - model) / np.sqrt(var)
    assert np.all(np.abs(pull) < 4.0), (pull, mean / model)


def _skew(x):
    x = x - x.mean()
    return (x**3).mean() / (x**2).mean() ** 1.5


def test_lognormal_skewness(maps):
    lam, k_ln, k_gs = maps
    s_ln = np.array([_skew(k_ln[:, b]) for b in range(3)])
    s_gs = np.array([_skew(k_gs[:, b]) for b in range(3)])
    # shifted lognormal: skewness 3η + η³ with η = σ_κ / λ (≈ 0.93, 0.50, 0.26 here); the pixel
    # sample is correlated (measured within 9%), so allow 15%
    eta = k_ln.std(axis=(0, 2, 3)) / lam
    expect = 3 * eta + eta**3
    assert np.allclose(s_ln, expect, rtol=0.15, atol=0), (s_ln, expect)
    assert np.all(s_ln > 0.2) and np.all(s_ln > s_gs + 0.2), (s_ln, s_gs)
    assert np.all(np.diff(s_ln) < 0), s_ln  # higher-z bins: smaller ξ(0)/λ², more Gaussian


def test_grad_matches_finite_difference():
    bins = RedshiftBins.lsst_y10(n_bins=2)
    model = LognormalLensing(FlatSky(5.0, 16), bins)
    latent = model.latent(3)

    def stat(cosmo, z):
        k = model.kappa(cosmo, z)
        return jnp.sum(k**3) / jnp.sum(k**2) ** 1.5  # skewness-like, sensitive to the lognormal shape

    def f(params, z):
        return stat(dataclasses.replace(COSMO, sigma8=params[0], Omega_c=params[1]), z)

    p0 = jnp.array([COSMO.sigma8, COSMO.Omega_c])
    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # one compilation for grads and differences
    _, (g, gz) = vg(p0, latent)
    g, gz = np.asarray(g), np.asarray(gz)
    eps = 1e-4  # central difference truncation ~ eps^2 f''' ~ 1e-8, roundoff ~ 1e-16 / eps
    fd = np.array([(vg(p0.at[n].add(eps), latent)[0] - vg(p0.at[n].add(-eps), latent)[0]) / (2 * eps)
                   for n in range(2)])
    assert np.all(np.isfinite(g)) and np.all(np.abs(g) > 1e-3), g
    assert np.allclose(g, fd, rtol=1e-4, atol=0), (g, fd)
    assert gz.shape == latent.shape and np.all(np.isfinite(gz)) and np.abs(gz).max() > 0


def test_config_kind_lognormal():
    data = {"simulation": {"kind": "lognormal"}, "maps": {"sky": "flat", "field_deg": 10.0, "npix": 64}}
    model = load_config(data).build_model()
    assert type(model) is LognormalLensing and model.sky == FlatSky(10.0, 64)
    with pytest.raises(ConfigError, match=r"simulation\.kind: 'lognormal' maps need maps\.sky = 'flat'"):
        load_config({"simulation": {"kind": "lognormal"}, "maps": {"sky": "healpix", "nside": 16}})
