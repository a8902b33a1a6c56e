"""Lightcone and Born convergence from PM/LPT simulations: geometry, analytic Born cases, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import simpson

from tests.lightcone_cases import BASE, BINS, CHI_MAX, COSMO, SKY, lightcone, map_loss
from simulators import SimConfig, white_noise
from simulators.cosmology import background
from simulators.lensing import lpt_kappa, born_params
from simulators.lightcone import BornLightcone, FlatSky, HealpixSky, Lightcone, samples_per_step
from simulators.sources import lensing_efficiency

CFG64 = SimConfig(**BASE, dtype="float64")


@pytest.fixture(scope="module")
def pm64():
    """f64 map, gradients w.r.t. (Omega_c, noise), and the jitted loss for finite differences."""
    f = map_loss(CFG64, lightcone())
    noise = white_noise(CFG64, 1)
    (value, kappa), (g_oc, g_noise) = f(COSMO.Omega_c, noise)
    return dict(f=f, noise=noise, value=value, kappa=np.asarray(kappa), g_oc=float(g_oc), g_noise=g_noise)


def _project_static_field(delta, cfg=CFG64, lc=None):
    """Born κ of a time-independent mesh density contrast ``delta`` over the whole lightcone."""
    lc = lc or lightcone()
    params = born_params(COSMO, cfg, BINS, lc.chi_max)
    painter = BornLightcone(cfg, lc, BINS.n_bins, samples_per_step(cfg, lc))
    project = jax.jit(lambda s: painter.project(params, s, delta, delta))
    total = sum(project(s) for s in range(cfg.n_steps))
    return np.asarray(total).T.reshape((BINS.n_bins,) + lc.sky.shape)


_CHI_FINE = np.linspace(0.0, 2000.0, 40001)
_Q_FINE = np.asarray(lensing_efficiency(COSMO, BINS, _CHI_FINE))


def _q_integral(chi_lo, chi_hi):
    """∫ q_i dχ by Simpson on a 0.05 Mpc/h grid of the exact efficiency (independent of the
    painter's 1024-node table and its linear interpolation)."""
    chi = np.linspace(chi_lo, chi_hi, 4001)
    q = np.stack([np.interp(chi, _CHI_FINE, qi) for qi in _Q_FINE])
    return simpson(q, x=chi, axis=1)


def test_uniform_overdensity_gives_kernel_integral():
    """δ = δ₀ everywhere → κ_i = δ₀ ∫₀^χ_max q_i dχ in every pixel (the kernel's integral)."""
    delta0 = 0.5
    kappa = _project_static_field(jnp.full(CFG64.mesh_shape, delta0))
    chi_top = min(float(background(COSMO).comoving_distance(CFG64.a_init)), CHI_MAX)
    want = delta0 * _q_integral(0.0, chi_top)
    assert np.all(want > 0.003)  # the check is not vacuous: a few per cent of convergence
    # midpoint slices of a smooth q: error ~ (Δχ)² q'' / 24 per slice, < 1e-4 relative here
    np.testing.assert_allclose(kappa, want[:, None, None] * np.ones_like(kappa), rtol=2e-4)


def test_born_slab_matches_analytic():
    """A slab of cells z ∈ [i1, i2] with δ₀ (repeated in every box copy along the line of sight):
    κ_i(θ) = δ₀ Σ_copies ∫ q_i dχ over the ray's path through the slab. Trilinear interpolation
    turns the cell slab into a plateau with one-cell linear ramps, equivalent to edges at
    (i1 - ½)Δ and (i2 + ½)Δ up to O(Δ² q''); the slices are ≤ a cell thick, so the midpoint rule
    on the ramps' kinks costs < 1%: tolerance 2%."""
    nz = CFG64.mesh_shape[2]
    dz = CFG64.box_size[2] / nz
    i1, i2 = 20, 31
    delta = np.zeros(CFG64.mesh_shape)
    delta[:, :, i1 : i2 + 1] = 1.0
    kappa = _project_static_field(jnp.asarray(delta))
    lo, hi = (i1 - 0.5) * dz, (i2 + 0.5) * dz
    chi_top = min(float(background(COSMO).comoving_distance(CFG64.a_init)), CHI_MAX)
    for px in [(0, 0), (12, 12), (5, 20)]:
        n = SKY.directions().reshape(SKY.shape + (3,))[px]
        want = np.zeros(BINS.n_bins)
        for copy in range(3):  # copies at z offsets 0, 512, 1024 Mpc/h
            a = (lo + copy * CFG64.box_size[2]) / n[2]
            b = min((hi + copy * CFG64.box_size[2]) / n[2], chi_top)
            if a < b:
                want += _q_integral(a, b)
        np.testing.assert_allclose(kappa[(slice(None),) + px], want, rtol=2e-2)


def test_uniform_lattice_has_no_convergence():
    """Zero initial noise: particles stay on the lattice, whose CIC density is exactly uniform."""
    kappa = lpt_kappa(COSMO, CFG64, lightcone(), BINS, jnp.zeros(CFG64.particle_shape))
    assert float(jnp.max(jnp.abs(kappa))) < 1e-12


def test_mean_kappa_is_within_cosmic_variance(pm64):
    """The map mean fluctuates only by the variance of the field-averaged κ, bounded by the Limber
    σ of the mean over a 4° field with the linear P(k) (the box lacks larger modes, so this is an
    upper bound); a Born-weight or mean-subtraction error of even 10% of ∫q dχ δ would exceed it."""
    from simulators import flatsky

    ell = np.geomspace(1.0, 5000.0, 400)
    cl = np.asarray(flatsky.limber_cl(COSMO, BINS, ell, nonlinear=False))[[0, 2]]
    side = math.radians(SKY.field_deg)
    # variance of the mean over a square: ∫ d²ℓ/(2π)² C(ℓ) |W|², W = sinc(ℓx L/2) sinc(ℓy L/2);
    # the azimuthal average of |W|² is bounded by 1 and decays as (2/(ℓ L))², used here
    window = np.minimum(1.0, (2.0 / (ell * side)) ** 2)
    sigma = np.sqrt(np.trapezoid(ell * cl * window, ell, axis=1) / (2 * np.pi))
    mean = pm64["kappa"].mean(axis=(1, 2))
    assert np.all(np.abs(mean) < 3 * sigma), (mean, sigma)
    assert np.all(pm64["kappa"].std(axis=(1, 2)) > 1e-4)  # and the map is not empty


def test_map_gradient_matches_finite_differences(pm64):
    """f64 central differences with ε = 1e-7: CIC and trilinear weights have kinks, so larger ε
    crosses some of them (measured: 0.6% off at ε = 1e-5, 8e-6 at 1e-7); round-off of the loss
    (~1e-17) is far below ε². Tolerance 1e-3 relative."""
    f, noise = pm64["f"], pm64["noise"]
    eps = 1e-7
    oc = COSMO.Omega_c
    fd = (f(oc + eps, noise)[0][0] - f(oc - eps, noise)[0][0]) / (2 * eps)
    assert abs(float(fd) - pm64["g_oc"]) < 1e-3 * abs(pm64["g_oc"])
    d = jnp.asarray(np.random.default_rng(0).normal(size=noise.shape))
    fd = (f(oc, noise + eps * d)[0][0] - f(oc, noise - eps * d)[0][0]) / (2 * eps)
    ad = float(jnp.vdot(pm64["g_noise"], d))
    assert abs(float(fd) - ad) < 1e-3 * abs(ad)


def test_maps_are_smooth_in_omega_c_at_fixed_field():
    """Fixed radial sample positions make κ(Ω_c) at a fixed initial field smooth on the scales an
    HMC step explores: central differences over ±1e-3 and ±1e-2 in Ω_c agree with the autodiff
    derivative to 1% and 2% (measured 0.2% and 0.7%: the smooth curvature). Samples that followed
    χ(a) through the mesh cells gave 4.5% and 41% (wiggles of period ~1% in Ω_c)."""
    f = map_loss(CFG64, lightcone(randomize=True, seed=5))
    noise = white_noise(CFG64, 1)
    oc = COSMO.Omega_c
    g = float(f(oc, noise)[1][0])
    for eps, tol in ((1e-3, 0.01), (1e-2, 0.02)):
        fd = float(f(oc + eps, noise)[0][0] - f(oc - eps, noise)[0][0]) / (2 * eps)
        assert abs(fd - g) < tol * abs(g), (eps, fd, g)


def test_adjoint_gradient_equals_checkpoint(pm64):
    (_, kappa), (g_oc, g_noise) = map_loss(CFG64.with_(gradient="adjoint"), lightcone())(
        COSMO.Omega_c, pm64["noise"])
    np.testing.assert_allclose(np.asarray(kappa), pm64["kappa"], rtol=0, atol=1e-14)
    assert abs(float(g_oc) - pm64["g_oc"]) < 1e-10 * abs(pm64["g_oc"])
    scale = float(jnp.max(jnp.abs(pm64["g_noise"])))
    assert float(jnp.max(jnp.abs(g_noise - pm64["g_noise"]))) < 1e-10 * scale


def test_lpt_lightcone_tracks_pm(pm64):
    """At z < 0.5 on 8 Mpc/h cells the PM and LPT maps share their large-scale structure."""
    kappa_lpt = np.asarray(lpt_kappa(COSMO, CFG64, lightcone(), BINS, pm64["noise"]))
    for i in range(BINS.n_bins):
        r = np.corrcoef(kappa_lpt[i].ravel(), pm64["kappa"][i].ravel())[0, 1]
        assert r > 0.9, r


def test_randomized_replicas_are_rigid_copies():
    """Each copy is a rigid motion of the periodic box: points inside one copy keep their mutual
    distances (modulo the box) and land inside the box; different seeds give different copies."""
    lc = lightcone(randomize=True, seed=5)
    painter = BornLightcone(CFG64, lc, BINS.n_bins, 4)
    rng = np.random.default_rng(0)
    box = np.asarray(CFG64.box_size)
    obs = lc.observer_position(box)
    # points near the centre of copy (0, 0, 1), and a small offset of each
    centre = np.array([0.0, 0.0, 1.0]) * box + box / 2 - obs
    r = centre + rng.uniform(-20, 20, size=(50, 3))
    step = rng.normal(size=(50, 3))
    x0 = np.asarray(painter._to_box(jnp.asarray(r)))
    x1 = np.asarray(painter._to_box(jnp.asarray(r + step)))
    assert np.all((x0 >= 0) & (x0 < box))
    d = np.abs(x1 - x0)
    d = np.minimum(d, box - d)  # periodic distance
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), np.linalg.norm(step, axis=1), rtol=1e-10)
    other = BornLightcone(CFG64, lightcone(randomize=True, seed=6), BINS.n_bins, 4)
    assert not np.allclose(np.asarray(other._to_box(jnp.asarray(r))), x0)
    plain = BornLightcone(CFG64, lightcone(), BINS.n_bins, 4)
    np.testing.assert_allclose(np.asarray(plain._to_box(jnp.asarray(r))), np.mod(r + obs, box))


def test_bad_lightcones_are_rejected():
    with pytest.raises(ValueError, match="nside must be a power of 2"):
        HealpixSky(12)
    with pytest.raises(ValueError, match="field_deg"):
        FlatSky(-1.0, 32)
    with pytest.raises(ValueError, match="chi_max"):
        Lightcone(SKY, -5.0)
    with pytest.raises(ValueError, match="observer"):
        Lightcone(SKY, 100.0, observer=(1.0, 2.0)).observer_position(CFG64.box_size)
    from simulators.lensing import PMLensing

    with pytest.raises(ValueError, match="outside the box"):
        PMLensing(CFG64, Lightcone(SKY, 100.0, observer=(-10.0, 0.0, 0.0)), BINS)
    with pytest.raises(ValueError, match="slices_per_step must be an integer >= 2"):
        Lightcone(SKY, 100.0, slices_per_step=1)
    with pytest.raises(ValueError, match="window_margin must be a number >= 1"):
        Lightcone(SKY, 100.0, window_margin=0.9)


def test_steps_thicker_than_the_radial_window_are_caught():
    """The window spans window_margin x the fiducial thickest step, so the fiducial ratio is
    1/margin exactly. On a 8000 Mpc/h cone from a = 0.3, Omega_c = 0.01 (H(z) lower at z > 1) has a
    step 1.48x the fiducial one: beyond the default 1.25 window, inside a 2.0 one. simulate_maps
    refuses it before simulating and names the remedy."""
    import dataclasses

    from simulators import Cosmology
    from simulators.lensing import PMLensing, simulate_maps
    from simulators.lightcone import check_step_window, step_window_ratio

    deep = Lightcone(SKY, 8000.0)
    fid = Cosmology.fiducial()
    assert float(step_window_ratio(fid, CFG64, deep)) == pytest.approx(1 / 1.25, rel=1e-12)
    low = dataclasses.replace(fid, Omega_c=0.01)
    ratio = float(step_window_ratio(low, CFG64, deep))
    assert 1.4 < ratio < 1.6, ratio
    wide = Lightcone(SKY, 8000.0, window_margin=2.0)
    assert float(step_window_ratio(low, CFG64, wide)) == pytest.approx(ratio * 1.25 / 2.0, rel=1e-12)
    check_step_window(low, CFG64, wide)  # covered: no error
    # the wider window is read by the painter: more samples at the same (<= 1 cell) spacing
    assert samples_per_step(CFG64, wide) > samples_per_step(CFG64, deep)
    with pytest.raises(ValueError, match=r"window_margin >= 1\.[5-9]"):
        simulate_maps(PMLensing(CFG64, deep, BINS), low, seed=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_wrap_is_mod(dtype):
    """The ray samples' periodic wrap (floor-based: XLA's CPU remainder is an fmod call per
    element) equals ``jnp.mod`` bit for bit on 3M random points for integer box lengths, within
    4 ulps of x (the error of x - ⌊x/L⌋L) or one period for others, and on points at and one ulp
    either side of multiples of the box it gives jnp.mod's value or the same point one period
    away (0 for box), always inside [0, box]."""
    from simulators.lightcone import _wrap

    box = jnp.asarray([400.0, 400.0, 4000.0], dtype)
    x = jax.random.uniform(jax.random.key(0), (1 << 20, 3), dtype, -30000.0, 30000.0)
    np.testing.assert_array_equal(np.asarray(_wrap(x, box)), np.asarray(jnp.mod(x, box)))
    # a box that is no integer: within a few ulps of x, or one period away
    odd = jnp.asarray([333.3, 333.3, 1234.567], dtype)
    ours, ref = _wrap(x, odd), jnp.mod(x, odd)
    d = jnp.abs(ours - ref)
    tol = 4 * jnp.finfo(dtype).eps * jnp.abs(x)
    assert bool(jnp.all((d <= tol) | (jnp.abs(d - odd) <= tol)))
    assert bool(jnp.all((ours >= 0) & (ours <= odd)))
    k = jnp.arange(-50, 50, dtype=dtype)[:, None] * box
    edge = jnp.concatenate([k, jnp.nextafter(k, k + 1), jnp.nextafter(k, k - 1)])
    ours, ref = _wrap(edge, box), jnp.mod(edge, box)
    d = jnp.abs(ours - ref)
    assert bool(jnp.all((d == 0) | (d == box)))
    assert bool(jnp.all((ours >= 0) & (ours <= box)))
