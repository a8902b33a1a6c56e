"""κ maps against theory: PM C_ℓ vs Limber + halofit, full sky vs flat sky, the map models' interface.

The PM C_ℓ check uses a 64 × 64 × 256 mesh over 256 × 256 × 1024 Mpc/h (4 Mpc/h cells, CIC-
compensated force), three LSST-Y10 bins, a 10° field and three seeds. The theory includes the mesh
window (CIC painting + trilinear reading, ``lensing.mesh_power_window``). Measured with
experiments/validation/cl_pm_vs_theory.py (4 seeds, 128² pixels, --deconvolve), the ratio to that
theory of the two higher-z bins' spectra is 0.83–1.16 for 72 ≤ ℓ ≤ 750, and 0.89–1.23 for the
lowest bin (z ≈ 0.4, whose kernel reaches scales the mesh doesn't resolve) up to ℓ ≈ 500. Here
(3 seeds, 64² pixels, ℓ bins [72, 200) and [200, 500)) all six spectra measured 0.94–1.08.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simulators import Cosmology, SimConfig, flatsky, white_noise
from simulators.cosmology import background
from simulators.lensing import (GaussianLensing, LPTLensing, PMLensing, mesh_power_window,
                                mesh_power_window_direct, noise_sigma, pm_kappa, simulate_maps)
from simulators.lightcone import FlatSky, HealpixSky, Lightcone
from simulators.sources import RedshiftBins

COSMO = Cosmology.fiducial()
BINS3 = RedshiftBins.lsst_y10(n_bins=3)
FIELD, NPIX = 10.0, 64
CFG = SimConfig(mesh_shape=(64, 64, 256), box_size=(256.0, 256.0, 1024.0), a_init=0.1, n_steps=12,
                deconvolve=True)
# two broad ℓ bins between twice the fundamental (72) and 500
EDGES = np.array([72.0, 200.0, 500.0])
SEEDS = 3


@pytest.mark.parametrize("cell", [(8.33, 8.33, 20.8), (6.25, 5.0, 15.6), (1.5, 1.5, 3.0)])
def test_mesh_window_table_equals_the_direct_average(cell):
    """The tabulated window (cubic Hermite in ln k) against the direct azimuthal average of
    sinc⁸ products, value and d/dln k, over k in [1e-4, 100] h/Mpc: within 1e-9 and 1e-6
    absolute (the window is ≤ 1; measured 2e-11 and 2e-8: interpolation error at a ln k step of
    0.0045). A wrong derivative table or node spacing errs by ≥ 1e-4."""
    table, direct = mesh_power_window(cell), mesh_power_window_direct(cell)
    k = jnp.asarray(np.exp(np.random.default_rng(1).uniform(np.log(1e-4), np.log(100.0), 4000)))
    np.testing.assert_allclose(np.asarray(table(k)), np.asarray(direct(k)), rtol=0, atol=1e-9)
    dlnk = lambda f: np.asarray(jax.vmap(jax.grad(f))(k) * k)  # noqa: E731
    np.testing.assert_allclose(dlnk(table), dlnk(direct), rtol=0, atol=1e-6)
    assert float(table(1e-7)) == pytest.approx(1.0, abs=1e-8) and float(table(1e5)) < 1e-30


@pytest.fixture(scope="module")
def pm_spectra():
    chi_max = float(background(COSMO).comoving_distance(1.0 / (1.0 + BINS3.z[-1])))
    run = jax.jit(lambda n, lc: pm_kappa(COSMO, CFG, lc, BINS3, n)[0], static_argnums=1)
    cls = []
    for seed in range(SEEDS):
        lc = Lightcone(FlatSky(FIELD, NPIX), chi_max, randomize=True, seed=seed)
        kappa = run(white_noise(CFG, seed), lc)
        cl, ell, n_modes = flatsky.cl_estimate(kappa, FIELD, EDGES)
        cls.append(np.asarray(cl))
    window = mesh_power_window(CFG.cell_size)
    theory = flatsky.binned_model_cl(lambda l: flatsky.limber_cl(COSMO, BINS3, l, power_filter=window),
                                     FIELD, NPIX, EDGES)[0]
    return np.mean(cls, axis=0), np.asarray(theory), np.asarray(n_modes)


def test_pm_cl_matches_limber_halofit(pm_spectra):
    """Auto and cross spectra of the two higher-z bins within 15% plus twice the Gaussian sampling
    error of the 3-seed mean (sqrt(2 / independent modes): 24% and 10% in the two ℓ bins), so
    0.39 and 0.25. A wrong Born weight, kernel, or window would be off by far more (without the
    window the ratio is ~0.7 at ℓ ~ 140 and ~0.3 at ℓ ~ 350)."""
    cl, theory, n_modes = pm_spectra
    sigma = np.sqrt(2.0 / (0.5 * n_modes * SEEDS))
    i, j = flatsky.pair_indices(3)
    for p in np.flatnonzero(i >= 1):
        ratio = cl[p] / theory[p]
        assert np.all(np.abs(ratio - 1) < 0.15 + 2 * sigma), (i[p], j[p], ratio)


def test_pm_cross_spectra_sign_and_correlation(pm_spectra):
    """Every cross-spectrum is positive (all bins trace the same foreground mass) and the
    correlation coefficient r_ij = C_ij / sqrt(C_ii C_jj) matches the theory's within 0.1 (r is
    insensitive to the overall sample-variance amplitude that limits the test above)."""
    cl, theory, _ = pm_spectra
    i, j = flatsky.pair_indices(3)
    auto = {a: p for p, (a, b) in enumerate(zip(i, j)) if a == b}
    for p, (a, b) in enumerate(zip(i, j)):
        if a == b:
            continue
        assert np.all(cl[p] > 0)
        r = cl[p] / np.sqrt(cl[auto[a]] * cl[auto[b]])
        r_th = theory[p] / np.sqrt(theory[auto[a]] * theory[auto[b]])
        assert np.all(np.abs(r - r_th) < 0.1), (a, b, r, r_th)


def test_full_sky_and_flat_sky_agree_on_matching_scales():
    """The same simulation seen on the full HEALPix sphere (nside 64) and on a 20° flat patch
    (same observer, at the box centre, four patches seen through differently randomised replicas):
    binned C_ℓ agree within the patches' sampling error (3σ: 53% and 31%) at 40 ≤ ℓ < 120, scales
    both resolve (ℓ < 2 nside, above twice the patch's fundamental). The estimators' conventions
    are compared tightly on Gaussian maps in ``test_full_and_flat_estimators_agree_on_gaussian_maps``."""
    bins = RedshiftBins.from_arrays(np.linspace(0, 1.2, 241),
                                    np.exp(-0.5 * ((np.linspace(0, 1.2, 241) - 0.6) / 0.1) ** 2),
                                    10.0, 0.26)
    cfg = SimConfig(mesh_shape=(32, 32, 32), box_size=(256.0,) * 3, a_init=0.3, n_steps=6,
                    deconvolve=True)
    chi_max = float(background(COSMO).comoving_distance(1.0 / 2.2))
    noise = white_noise(cfg, 0)
    run = jax.jit(lambda lc: pm_kappa(COSMO, cfg, lc, bins, noise)[0], static_argnums=0)
    full = np.asarray(run(Lightcone(HealpixSky(64), chi_max, randomize=True, seed=2)))
    from simulators.fullsky import cl_estimate_healpix

    edges = np.array([40.0, 70.0, 120.0])
    cl_full = np.asarray(cl_estimate_healpix(full, edges)[0])[0]
    # four views of the box: the random replica transforms differ with the lightcone seed
    cl_flat = []
    for seed in range(4):
        flat = run(Lightcone(FlatSky(20.0, 64), chi_max, observer=(128.0, 128.0, 128.0),
                             randomize=True, seed=10 + seed))
        cl, _, n_modes = flatsky.cl_estimate(flat, 20.0, edges)
        cl_flat.append(np.asarray(cl)[0])
    sigma = np.sqrt(2.0 / (0.5 * np.asarray(n_modes) * 4))
    ratio = np.mean(cl_flat, axis=0) / cl_full
    assert np.all(np.abs(ratio - 1) < 3 * sigma), (ratio, sigma)
    # the full-sky mean is the monopole of a zero-mean field seen over 4π: tiny
    assert abs(full.mean()) < 0.05 * full.std()


def test_uniform_overdensity_on_the_full_sky():
    """HEALPix analogue of the flat-sky kernel test: the full-sky projection of a uniform δ is the
    same ∫ q dχ in every one of the 12 nside² pixels (no pixel is missed or counted twice)."""
    from simulators.lensing import born_params
    from simulators.lightcone import BornLightcone, samples_per_step

    cfg = SimConfig(mesh_shape=(16, 16, 16), box_size=(200.0,) * 3, a_init=0.4, n_steps=3,
                    dtype="float64")
    lc = Lightcone(HealpixSky(8), 900.0, randomize=True)
    params = born_params(COSMO, cfg, BINS3, lc.chi_max)
    painter = BornLightcone(cfg, lc, 3, samples_per_step(cfg, lc))
    delta = jnp.full(cfg.mesh_shape, 0.3)
    total = sum(painter.project(params, s, delta, delta) for s in range(cfg.n_steps))
    assert total.shape == (12 * 64, 3)
    np.testing.assert_allclose(total, np.broadcast_to(total[0], total.shape), rtol=1e-12)
    w = jnp.ones(params.q.shape[1]).at[0].set(0.5).at[-1].set(0.5)
    want = 0.3 * np.asarray(params.q @ w * params.chi_step)  # trapezoid on the painter's table
    np.testing.assert_allclose(np.asarray(total[0]), want, rtol=1e-3)


def test_map_models_share_one_interface():
    """PM, LPT and Gaussian models: latent → (n_bins, *sky.shape) maps; simulate_maps adds shape
    noise with rms σ_e / sqrt(n_gal A_pix) (10°, 256² pixels, LSST-Y10: 0.048 per bin)."""
    bins = RedshiftBins.lsst_y10()
    sigma = noise_sigma(bins, FlatSky(10.0, 256))
    np.testing.assert_allclose(sigma, 0.26 / math.sqrt(5.4 * (600.0 / 256) ** 2), rtol=1e-12)
    assert abs(sigma[0] - 0.048) < 0.0005

    sky = FlatSky(4.0, 16)
    small = RedshiftBins.from_arrays(np.linspace(0, 1, 101), np.exp(-((np.linspace(0, 1, 101) - 0.5) / 0.1) ** 2),
                                     20.0, 0.3)
    cfg = SimConfig(mesh_shape=(16, 16, 32), box_size=(128.0, 128.0, 512.0), a_init=0.3, n_steps=3)
    lc = Lightcone(sky, 1300.0)
    for model in (PMLensing(cfg, lc, small), LPTLensing(cfg, lc, small), GaussianLensing(sky, small)):
        latent = model.latent(4)
        assert latent.shape == model.latent_shape
        maps = simulate_maps(model, COSMO, seed=4)
        assert maps.kappa.shape == (1, 16, 16) and np.all(np.isfinite(maps.kappa))
        resid = maps.kappa_noisy - maps.kappa
        want = noise_sigma(small, sky)[0]
        # 256 pixels: the sample rms of Gaussian noise is within 5 × want / sqrt(2 × 256) of want
        assert abs(resid.std() - want) < 5 * want / math.sqrt(512)
        assert float(np.std(maps.kappa)) > 0
    with pytest.raises(ValueError, match="flat-sky only"):
        GaussianLensing(HealpixSky(8), small)


def test_gaussian_model_reproduces_limber_cl():
    """GaussianLensing draws maps whose C_ℓ averages to the binned Limber theory (8 realisations:
    the mean of the ratio over four ℓ bins is within 4 standard errors of 1)."""
    sky = FlatSky(10.0, 64)
    model = GaussianLensing(sky, BINS3)
    edges = np.geomspace(72, 1000, 5)
    kappa_fn = jax.jit(model.kappa)
    cls = [np.asarray(flatsky.cl_estimate(kappa_fn(COSMO, model.latent(s)), 10.0, edges)[0])
           for s in range(8)]
    theory = np.asarray(flatsky.binned_model_cl(lambda l: flatsky.limber_cl(COSMO, BINS3, l),
                                                10.0, 64, edges)[0])
    n_modes = np.asarray(flatsky.cl_estimate(kappa_fn(COSMO, model.latent(0)), 10.0, edges)[2])
    sigma = np.sqrt(2.0 / (0.5 * n_modes * 8))
    ratio = np.mean(cls, axis=0) / theory
    for p in range(ratio.shape[0]):
        assert np.all(np.abs(ratio[p] - 1) < 4 * sigma), (p, ratio[p], sigma)


def test_full_and_flat_estimators_agree_on_gaussian_maps():
    """Same input C_ℓ (Limber, first of three LSST-Y10 bins), full-sky synfast maps at
    nside 256 and flat 20° Gaussian maps: both estimators return the binned input, so they agree
    with each other, at 50 ≤ ℓ < 400 within 4σ of their combined sampling errors."""
    import healpy

    ell = np.arange(1, 2001, dtype=float)
    cl_all = np.asarray(flatsky.limber_cl(COSMO, BINS3, ell))
    full_in = np.concatenate([[0.0], cl_all[0, :767]])  # C_0 = 0, up to lmax = 3 nside - 1
    edges = np.array([50.0, 100.0, 200.0, 400.0])
    np.random.seed(1)
    from simulators.fullsky import cl_estimate_healpix

    full = healpy.synfast(full_in, 256, lmax=767)
    cl_full, _, n_full = (np.asarray(x) for x in cl_estimate_healpix(full[None], edges))
    table = (ell, cl_all)
    flat_cls = []
    for s in range(6):
        maps = flatsky.gaussian_maps(jax.random.key(s), table, 20.0, 128, 3)
        cl, _, n_flat = flatsky.cl_estimate(maps, 20.0, edges)
        flat_cls.append(np.asarray(cl)[0])
    sigma = np.sqrt(2.0 / np.asarray(n_full) + 2.0 / (0.5 * np.asarray(n_flat) * 6))
    ratio = np.mean(flat_cls, axis=0) / cl_full[0]
    assert np.all(np.abs(ratio - 1) < 4 * sigma), (ratio, sigma)


def test_partial_sky_traces_only_the_disc():
    """A HEALPix disc: the traced pixels are healpy's query_disc, the maps keep the full-sky shape
    with κ = 0 and no shape noise outside, and inside equal the full-sky maps of the same run."""
    import healpy

    cfg = SimConfig(mesh_shape=(16, 16, 16), box_size=(200.0,) * 3, a_init=0.4, n_steps=3)
    small = RedshiftBins.from_arrays(np.linspace(0, 1, 101),
                                     np.exp(-((np.linspace(0, 1, 101) - 0.4) / 0.1) ** 2), 20.0, 0.3)
    disc = HealpixSky(16, disc=(30.0, 45.0, 20.0))
    want = healpy.query_disc(16, healpy.ang2vec(30.0, 45.0, lonlat=True), math.radians(20.0))
    np.testing.assert_array_equal(disc.pixels, np.sort(want))
    part = simulate_maps(PMLensing(cfg, Lightcone(disc, 900.0), small), COSMO, seed=1)
    full = simulate_maps(PMLensing(cfg, Lightcone(HealpixSky(16), 900.0), small), COSMO, seed=1)
    outside = ~disc.footprint()
    assert part.kappa.shape == (1, 12 * 16**2) and outside.sum() > 0
    assert np.all(part.kappa[:, outside] == 0) and np.all(part.kappa_noisy[:, outside] == 0)
    # float32 rays summed in another order (other ray counts, other fusion): round-off relative to
    # the map's scale, not to each pixel (2.4e-9 on a pixel of 4e-5 seen on one CPU); a wrong pixel
    # or disc mapping differs by the map's scale (~1e-3)
    scale = np.max(np.abs(full.kappa))
    np.testing.assert_allclose(part.kappa[:, ~outside], full.kappa[:, ~outside], rtol=1e-5,
                               atol=1e-5 * scale)
    assert np.std(part.kappa_noisy[:, ~outside] - part.kappa[:, ~outside]) > 0
    with pytest.raises(ValueError, match="disc"):
        HealpixSky(16, disc=(0.0, 100.0, 5.0))
