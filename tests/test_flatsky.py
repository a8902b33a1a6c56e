"""Tests for simulators/flatsky.py: Limber C_ell, FFT estimator, Gaussian and shape-noise maps.

Statistical tests use fixed seeds, so they are deterministic; tolerances are set from the expected
Gaussian sampling error so that a correct code passes with high probability for any seed, while
normalisation or correlation errors (factors of 2, A_pix, missing Cholesky) fail by many sigma.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from simulators.cosmology import Cosmology
from simulators.flatsky import (
    binned_model_cl,
    cl_estimate,
    gaussian_maps,
    limber_cl,
    mode_ell,
    noise_cl,
    pair_indices,
    pixel_area_sr,
    shape_noise_maps,
)
from simulators.sources import RedshiftBins, pixel_area_arcmin2, shape_noise_sigma

FID = Cosmology.fiducial()
FIELD_DEG, NPIX, N_REAL = 10.0, 128, 8
N_BINS = 5
ELL_FUND = 2 * np.pi / np.radians(FIELD_DEG)  # 36
ELL_NYQ = np.pi * NPIX / np.radians(FIELD_DEG)  # 2304
# 11 bins from 2 ell_fund to 0.7 ell_nyq, wide at low ell so that every bin has >= 40 modes: with 8
# realisations the binned estimate is then close to Gaussian (>= 160 independent complex modes).
ELL_EDGES = np.concatenate([[2 * ELL_FUND, 150.0, 260.0], np.linspace(400.0, 0.7 * ELL_NYQ, 9)])

limber_jit = jax.jit(limber_cl, static_argnames="n_chi")


@pytest.fixture(scope="module")
def bins():
    return RedshiftBins.lsst_y10()


@pytest.fixture(scope="module")
def cl_table(bins):
    # covers every non-zero mode of the 128^2 map: fundamental 36 to corner sqrt(2) * 2304 = 3258
    ell = np.geomspace(20.0, 4000.0, 96)
    return ell, np.asarray(limber_jit(FID, bins, ell))


@pytest.fixture(scope="module")
def gauss_spectra(cl_table):
    keys = jax.random.split(jax.random.PRNGKey(1), N_REAL)
    maps = [gaussian_maps(k, cl_table, FIELD_DEG, NPIX, N_BINS) for k in keys]
    est = [cl_estimate(m, FIELD_DEG, ELL_EDGES) for m in maps]
    cl_mean = np.mean([np.asarray(e[0]) for e in est], axis=0)
    model, ell_mean, n_modes = (np.asarray(x) for x in binned_model_cl(cl_table, FIELD_DEG, NPIX, ELL_EDGES))
    return np.stack([np.asarray(m) for m in maps]), cl_mean, model, n_modes


def _bonferroni_z(n_tests, false_alarm=0.01):
    """|z| bound such that n_tests independent normals all pass with probability ~1 - false_alarm."""
    return norm.isf(false_alarm / (2 * n_tests))


# ------------------------------------------------------------------------------------------------
# Gaussian maps + estimator


def test_gaussian_maps_reproduce_input_cl(gauss_spectra):
    maps, cl_mean, model, n_modes = gauss_spectra
    assert maps.shape == (N_REAL, N_BINS, NPIX, NPIX) and np.all(np.isfinite(maps))
    assert np.all(n_modes >= 40)
    i, j = pair_indices(N_BINS)
    p = {(a, b): k for k, (a, b) in enumerate(zip(i, j))}
    cii = np.stack([model[p[(a, a)]] for a in i])
    cjj = np.stack([model[p[(b, b)]] for b in j])
    # Each full-plane mode count n_modes holds n_modes/2 independent complex modes, each with
    # Var Re(k_i k_j*) = (C_ii C_jj + C_ij^2)/2, hence sigma_C = sqrt((C_ii C_jj + C_ij^2) / (n_modes N_real)).
    sigma = np.sqrt((cii * cjj + model**2) / (n_modes * N_REAL))
    z = (cl_mean - model) / sigma
    # 15 pairs x 11 bins = 165 tests; Bonferroni bound at 1% false alarm is |z| < 3.9 (the brief's
    # 3 sigma per point would fail by chance in ~40% of seeds with this many points).
    assert np.max(np.abs(z)) < _bonferroni_z(z.size), np.max(np.abs(z))
    # mean z^2 is 1 for a correct code; correlated pairs widen its spread, so a loose band.
    assert 0.5 < np.mean(z**2) < 2.0, np.mean(z**2)


def test_gaussian_map_variance_normalisation(gauss_spectra, cl_table):
    # Independent of cl_estimate: by Parseval <mean(kappa_i^2)> = sum over all FFT modes C_ii / A_field
    # with Var = 2 sum C_ii^2 / A_field^2 per map (Gaussian, periodic).
    maps = gauss_spectra[0]
    ell_grid = mode_ell(FIELD_DEG, NPIX)
    a_field = np.radians(FIELD_DEG) ** 2
    i, j = pair_indices(N_BINS)
    for b in range(N_BINS):
        p = np.flatnonzero((i == b) & (j == b))[0]
        c = np.where(ell_grid > 0, np.interp(np.log(np.maximum(ell_grid, 1.0)), np.log(cl_table[0]),
                                             cl_table[1][p]), 0.0)
        expect = c.sum() / a_field
        sigma = np.sqrt(2 * (c**2).sum() / N_REAL) / a_field
        measured = np.mean(maps[:, b] ** 2)
        assert abs(measured - expect) < 4 * sigma, (b, measured, expect, sigma)  # 4 sigma, 5 tests
        assert np.allclose(np.mean(maps[:, b], axis=(-2, -1)), 0.0, atol=1e-12 * np.sqrt(expect))


def test_cross_correlation_coefficient(gauss_spectra):
    _, cl_mean, model, n_modes = gauss_spectra
    i, j = pair_indices(N_BINS)

    def r(cl, a, b):
        pa = np.flatnonzero((i == a) & (j == a))[0]
        pb = np.flatnonzero((i == b) & (j == b))[0]
        pab = np.flatnonzero((i == a) & (j == b))[0]
        return cl[pab] / np.sqrt(cl[pa] * cl[pb])

    r_model = r(model, 3, 4)
    assert np.all(r_model > 0.8)
    # Var(r_hat) ~ (1 - r^2)^2 / N_indep with N_indep = n_modes N_real / 2 independent complex modes
    # (each complex mode is two real samples) -> sigma_r = (1 - r^2) / sqrt(n_modes N_real).
    # 11 bins: 4 sigma bound; uncorrelated bins (r ~ 0) would miss by > 100 sigma.
    sigma_r = (1 - r_model**2) / np.sqrt(n_modes * N_REAL)
    assert np.all(np.abs(r(cl_mean, 3, 4) - r_model) < 4 * sigma_r)
    # a weakly correlated pair too, so that only a correct Cholesky (not e.g. all-equal maps) passes
    r_low = r(model, 0, 4)
    assert np.all(r_low < 0.6)
    assert np.all(np.abs(r(cl_mean, 0, 4) - r_low) < 4 * (1 - r_low**2) / np.sqrt(n_modes * N_REAL))


def test_gaussian_maps_rejects_short_table(cl_table):
    ell, cl = cl_table
    with pytest.raises(ValueError, match="ell_table covers"):
        gaussian_maps(jax.random.PRNGKey(0), (ell[ell < 1000], cl[:, ell < 1000]), FIELD_DEG, NPIX, N_BINS)
    with pytest.raises(ValueError, match="15 spectra"):
        gaussian_maps(jax.random.PRNGKey(0), (ell, cl[:10]), FIELD_DEG, NPIX, N_BINS)


# ------------------------------------------------------------------------------------------------
# Shape noise


def test_shape_noise_power(bins):
    a_arcmin2 = pixel_area_arcmin2(FIELD_DEG, NPIX)
    sigma_n = shape_noise_sigma(bins.sigma_e, bins.n_gal, a_arcmin2)  # (5,), ~0.24
    a_sr = pixel_area_sr(FIELD_DEG, NPIX)
    assert np.isclose(a_sr, a_arcmin2 * (np.pi / 180 / 60) ** 2, rtol=1e-12)
    sigma_n = sigma_n * np.array([1.0, 1.0, 1.0, 1.0, 2.0])  # unequal, to test per-bin broadcasting
    maps = shape_noise_maps(jax.random.PRNGKey(7), sigma_n, (N_BINS, NPIX, NPIX))
    assert maps.shape == (N_BINS, NPIX, NPIX)
    cl, _, n_modes = (np.asarray(x) for x in cl_estimate(maps, FIELD_DEG, ELL_EDGES))
    n_cl = np.asarray(noise_cl(sigma_n, a_sr))
    assert np.allclose(n_cl, sigma_n**2 * a_sr, rtol=1e-14)
    i, j = pair_indices(N_BINS)
    expect = np.where((i == j)[:, None], n_cl[i][:, None], 0.0)
    # same sampling formula as above with C_ij = 0 off the diagonal: sigma = sqrt(N_i N_j / n_modes)
    sigma = np.sqrt(n_cl[i][:, None] * n_cl[j][:, None] * (1 + (i == j)[:, None]) / n_modes)
    z = (cl - expect) / sigma
    assert np.max(np.abs(z)) < _bonferroni_z(z.size), np.max(np.abs(z))
    # all ~6000 modes pooled: relative sigma sqrt(2/N) = 1.8% for autos, sqrt(1/N) = 1.3% for crosses
    # (in units of sqrt(N_i N_j)); 4 sigma bounds. A missing A_pix or factor 2 fails by > 50 sigma.
    n_tot = n_modes.sum()
    total = (cl * n_modes).sum(1) / n_tot
    norm_ = np.sqrt(n_cl[i] * n_cl[j])
    assert np.all(np.abs(total[i == j] / n_cl - 1) < 4 * np.sqrt(2 / n_tot))
    assert np.all(np.abs(total[i != j] / norm_[i != j]) < 4 * np.sqrt(1 / n_tot))


# ------------------------------------------------------------------------------------------------
# Limber


def test_limber_cl_properties(bins):
    ell = np.array([30.0, 100.0, 300.0, 1000.0])
    cl = np.asarray(limber_jit(FID, bins, ell))
    i, j = pair_indices(N_BINS)
    assert cl.shape == (15, 4)
    autos = cl[i == j]
    assert np.all(autos > 0)
    assert np.all(np.diff(autos, axis=0) > 0)  # higher-z bins have more lensing at fixed ell
    # Cauchy-Schwarz on the Limber integrand: |C_ij| <= sqrt(C_ii C_jj)
    assert np.all(np.abs(cl) <= np.sqrt(cl[i == j][i] * cl[i == j][j]) * (1 + 1e-12))
    # magnitude: halofit bin-5 convergence at ell = 100; measured 3.9e-5 (3.8e-5 linear; LSST SRD-like)
    d = 100 * 101 * autos[4, 1] / (2 * np.pi)
    assert 1e-5 < d < 1e-4, d
    # integration converged: doubling n_chi changes C by < 0.2% (measured 8e-5 for bin 1 at ell=30)
    cl2 = np.asarray(limber_jit(FID, bins, ell, n_chi=512))
    assert np.allclose(cl2, cl, rtol=2e-3, atol=0)


def test_limber_cl_grad_matches_finite_difference(bins):
    ell = np.array([50.0, 500.0])

    def f(om_c):
        c = Cosmology(Omega_c=om_c, Omega_b=FID.Omega_b, h=FID.h, n_s=FID.n_s, sigma8=FID.sigma8)
        cl = limber_cl(c, bins, ell, n_chi=128)
        return jnp.log(cl[jnp.array([0, 4, 14])]).sum()  # log: comparable weight for all spectra

    g = jax.jit(jax.grad(f))(jnp.asarray(FID.Omega_c))
    ff = jax.jit(f)
    eps = 1e-4  # central difference truncation ~ eps^2 f''' ~ 1e-8, roundoff ~ 1e-16/eps
    fd = (ff(FID.Omega_c + eps) - ff(FID.Omega_c - eps)) / (2 * eps)
    assert np.isfinite(g) and abs(g) > 1.0
    assert np.isclose(g, fd, rtol=1e-4, atol=0), (g, fd)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_cl_estimate_rejects_bad_maps():
    maps = np.zeros((2, 16, 16))
    maps[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cl_estimate(maps, FIELD_DEG, ELL_EDGES)
    with pytest.raises(ValueError, match=r"\(2, 16, 8\)"):
        cl_estimate(np.zeros((2, 16, 8)), FIELD_DEG, ELL_EDGES)
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        cl_estimate(np.zeros((16, 16)), FIELD_DEG, ELL_EDGES)
    with pytest.raises(ValueError, match="increasing"):
        cl_estimate(np.zeros((2, 16, 16)), FIELD_DEG, ELL_EDGES[::-1])
    with pytest.raises(ValueError, match="field_deg"):
        cl_estimate(np.zeros((2, 16, 16)), -1.0, ELL_EDGES)


def test_cl_estimate_jits_and_matches_eager():
    maps = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32))
    eager = cl_estimate(maps, 5.0, ELL_EDGES)
    jitted = jax.jit(cl_estimate, static_argnums=1)(maps, 5.0, ELL_EDGES)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
