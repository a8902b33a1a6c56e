"""Tests for simulators/sources.py: tomographic n(z), shape noise, Born lensing kernels.

References are independent: scipy quad of the Smail n(z), scipy.stats normal CDF for the photo-z
bins, astropy (Tcmb0 = 0, i.e. no radiation like simulators.cosmology) distances for the kernels.
"""

import jax

jax.config.update("jax_enable_x64", True)


import jax.numpy as jnp
import numpy as np
import pytest
from astropy.cosmology import FlatLambdaCDM
from scipy.integrate import quad
from scipy.stats import norm

from simulators.cosmology import C_OVER_H0, Cosmology, background
from simulators.sources import (
    RedshiftBins,
    lensing_efficiency,
    lensing_kernel_single,
    pixel_area_arcmin2,
    shape_noise_sigma,
    smail_nz,
)

FID = Cosmology.fiducial()


@pytest.fixture(scope="module")
def lsst():
    return RedshiftBins.lsst_y10()


def _trapz(y, x):
    return np.sum(0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(x), axis=-1)


def _astropy(cosmo):
    return FlatLambdaCDM(H0=100 * cosmo.h, Om0=cosmo.Omega_m, Tcmb0=0.0)


def _chi_of_z(ac, z, h):  # Mpc/h
    return ac.comoving_distance(z).value * h


# ------------------------------------------------------------------------------------------------
# LSST Y10 bins


def test_lsst_y10_bins(lsst):
    z, nz = lsst.z, lsst.nz
    assert lsst.n_bins == 5 and nz.shape == (5, z.size)
    # normalised by construction with the same trapezoid rule: exact up to rounding
    np.testing.assert_allclose(_trapz(nz, z), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lsst.n_gal, 5.4, rtol=1e-15)
    assert lsst.n_gal_total == pytest.approx(27.0, rel=1e-15)
    assert lsst.sigma_e == 0.26
    assert np.all(np.diff(lsst.mean_z) > 0), lsst.mean_z


def test_lsst_y10_equal_numbers(lsst):
    e = lsst.z_edges
    assert e.shape == (6,) and e[0] == 0.0 and e[-1] == 4.0
    f = lambda x: float(smail_nz(x))
    # adaptive quad of the true-z Smail n(z) truncated to the table [0, 4]; quad errors ~1e-12
    kw = dict(epsabs=0.0, epsrel=1e-12, limit=200)
    total = quad(f, 0.0, 4.0, points=[0.54], **kw)[0]
    fracs = [quad(f, e[i], e[i + 1], **kw)[0] / total for i in range(5)]
    np.testing.assert_allclose(fracs, 0.2, rtol=0, atol=1e-6)


def test_lsst_y10_photoz_form(lsst):
    """n_i = n(z) [Phi((z_hi - z)/s) - Phi((z_lo - z)/s)], s = 0.05 (1+z), outer bins open."""
    z, e = lsst.z, lsst.z_edges
    s = 0.05 * (1 + z)
    n = z**2 * np.exp(-((z / 0.11) ** 0.68))
    lo = [-np.inf, *e[1:-1]]
    hi = [*e[1:-1], np.inf]
    ref = np.stack([n * (norm.cdf((hi[i] - z) / s) - norm.cdf((lo[i] - z) / s)) for i in range(5)])
    ref /= _trapz(ref, z)[:, None]
    np.testing.assert_allclose(lsst.nz, ref, rtol=1e-9, atol=1e-12)


def test_lsst_y10_photoz_overlap(lsst):
    z, e, nz = lsst.z, lsst.z_edges, lsst.nz
    in2 = (z > e[1]) & (z < e[2])
    # photo-z scatter 0.05 (1+z) ~ 0.07 at the first edge (0.45) is a large fraction of bin 1's width:
    # a sizeable part of bin 1 (11%) has true z in bin 2's range; without broadening it would be 0.
    frac_12 = _trapz(np.where(in2, nz[0], 0.0), z)
    assert frac_12 > 0.05, frac_12
    assert np.all(nz[0][in2] > 0)


# ------------------------------------------------------------------------------------------------
# Shape noise


def test_shape_noise_lsst_y10():
    a_pix = pixel_area_arcmin2(10.0, 256)  # (600'/256)^2 = (2.34')^2
    assert a_pix == pytest.approx(2.34375**2, rel=1e-15)
    sig = shape_noise_sigma(0.26, 5.4, a_pix)
    assert abs(sig - 0.0477) < 5e-4, sig
    assert float(shape_noise_sigma(jnp.asarray(0.26), 5.4, a_pix)) == pytest.approx(sig, rel=1e-14)


# ------------------------------------------------------------------------------------------------
# from_files


def _write(path, arr, fmt="%.17g"):
    np.savetxt(path, arr, fmt=fmt)
    return path


def test_from_files_roundtrip(tmp_path):
    z = np.linspace(0.0, 3.0, 301)
    nz = np.stack([np.exp(-0.5 * ((z - m) / 0.2) ** 2) for m in (0.5, 1.0, 1.5)])
    nz /= _trapz(nz, z)[:, None]
    paths = [_write(tmp_path / f"bin{i}.txt", np.column_stack([z, nz[i]])) for i in range(3)]
    bins = RedshiftBins.from_files(paths, [1.0, 2.0, 3.0], 0.3)
    np.testing.assert_array_equal(bins.z, z)  # %.17g round-trips float64 exactly
    np.testing.assert_allclose(bins.nz, nz, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(bins.n_gal, [1.0, 2.0, 3.0])
    assert bins.sigma_e == 0.3
    # unnormalised input is normalised; differing z columns go onto the union grid
    p_a = _write(tmp_path / "a.txt", np.column_stack([z, 7.0 * nz[0]]))
    p_b = _write(tmp_path / "b.txt", np.column_stack([z[::2], nz[1][::2]]))
    bins2 = RedshiftBins.from_files([p_a, p_b], 5.0, 0.26)
    np.testing.assert_array_equal(bins2.z, z)
    np.testing.assert_allclose(bins2.nz[0], nz[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(_trapz(bins2.nz, bins2.z), 1.0, rtol=1e-13)


@pytest.mark.parametrize("kind,exc,msg", [
    ("missing", FileNotFoundError, "not found"),
    ("nan", ValueError, "NaN"),
    ("negative", ValueError, ">= 0"),
    ("nonincreasing", ValueError, "strictly increasing"),
    ("columns", ValueError, "2 columns"),
    ("text", ValueError, "cannot parse"),
])
def test_from_files_bad(tmp_path, kind, exc, msg):
    z = np.linspace(0.0, 2.0, 11)
    n = np.exp(-((z - 1.0) ** 2))
    good = _write(tmp_path / "good.txt", np.column_stack([z, n]))
    bad = tmp_path / f"bad_{kind}.txt"
    if kind == "nan":
        n2 = n.copy(); n2[3] = np.nan
        _write(bad, np.column_stack([z, n2]))
    elif kind == "negative":
        n2 = n.copy(); n2[4] = -0.1
        _write(bad, np.column_stack([z, n2]))
    elif kind == "nonincreasing":
        z2 = z.copy(); z2[5] = z2[4]
        _write(bad, np.column_stack([z2, n]))
    elif kind == "columns":
        _write(bad, np.column_stack([z, n, n]))
    elif kind == "text":
        bad.write_text("0.0 1.0\n0.5 abc\n")
    with pytest.raises(exc, match=msg) as info:
        RedshiftBins.from_files([good, bad], 5.4, 0.26)
    assert str(bad) in str(info.value)


def test_redshift_bins_validation():
    z = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="integrate to 1"):
        RedshiftBins(z=z, nz=np.ones((1, 5)) * 2.0, n_gal=np.ones(1), sigma_e=0.26)
    with pytest.raises(ValueError, match="n_gal"):
        RedshiftBins(z=z, nz=np.ones((1, 5)), n_gal=np.ones(2), sigma_e=0.26)
    with pytest.raises(ValueError, match="shape"):
        RedshiftBins(z=z, nz=np.ones((1, 4)), n_gal=np.ones(1), sigma_e=0.26)


# ------------------------------------------------------------------------------------------------
# Born kernels


def _quad_kernel_integral(cosmo, z1, z2, z_s):
    """int_{chi(z1)}^{chi(z2)} q(chi) dchi for a source plane at z_s, as a quad in z with astropy
    distances: dchi = c/H0 dz / E(z), q = 1.5 Om (H0/c)^2 chi (1+z) (1 - chi/chi_s)."""
    ac, h, om = _astropy(cosmo), cosmo.h, cosmo.Omega_m
    chi_s = _chi_of_z(ac, z_s, h)

    def f(z):
        chi = _chi_of_z(ac, z, h)
        return 1.5 * om / C_OVER_H0 * chi * (1 + z) * (1 - chi / chi_s) / ac.efunc(z)

    return quad(f, z1, z2, epsabs=0.0, epsrel=1e-10)[0]


def test_single_plane_kernel_integral():
    z_s = 1.0
    bg = background(FID)
    chi_s = float(bg.comoving_distance(1 / (1 + z_s)))
    # astropy vs the JAX table: distances agree to ~1e-7 (table cubic interpolation)
    assert chi_s == pytest.approx(_chi_of_z(_astropy(FID), z_s, FID.h), rel=1e-6)
    chi = np.linspace(0.0, chi_s, 20001)
    q = np.asarray(lensing_kernel_single(FID, chi, chi_s, bg))
    # trapezoid with 2e4 intervals on a smooth integrand: relative error ~1e-9, so 1e-4 tests the
    # formula (a missing (1+z) or Omega_m factor is an O(1) change)
    ref = _quad_kernel_integral(FID, 0.0, z_s, z_s)
    assert _trapz(q, chi) == pytest.approx(ref, rel=1e-4)
    assert np.all(np.asarray(lensing_kernel_single(FID, [chi_s, 1.5 * chi_s], chi_s, bg)) == 0.0)


def test_born_convergence_slab():
    """Uniform overdensity delta between chi1 and chi2: kappa = delta int_{chi1}^{chi2} q dchi,
    (a) as a Born sum over thin lens planes (midpoint rule, as a ray-tracer would) and
    (b) as a scipy quad in redshift with astropy distances."""
    delta, z1, z2, z_s = 0.3, 0.3, 0.6, 1.0
    bg = background(FID)
    chi1, chi2, chi_s = (float(bg.comoving_distance(1 / (1 + z))) for z in (z1, z2, z_s))
    n_planes = 400
    edges = np.linspace(chi1, chi2, n_planes + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])
    kappa_planes = delta * np.sum(np.asarray(lensing_kernel_single(FID, mid, chi_s, bg)) * np.diff(edges))
    kappa_quad = delta * _quad_kernel_integral(FID, z1, z2, z_s)
    # midpoint error ~ (width/n)^2 q''/24 relative ~1e-6; table distances ~1e-7
    assert kappa_planes == pytest.approx(kappa_quad, rel=1e-4)
    assert 0.005 < kappa_quad < 0.05  # sanity: percent-level convergence for delta = 0.3

    # same slab seen by each LSST bin (bin 1 has many sources inside the slab, testing the cut at
    # chi_s = chi): q_i from lensing_efficiency vs a numpy/astropy double integral
    bins = RedshiftBins.lsst_y10()
    q = np.asarray(lensing_efficiency(FID, bins, mid, bg))
    ac = _astropy(FID)
    zs = bins.z[1:]  # skip z = 0 (n = 0 there, chi = 0)
    chi_zs = _chi_of_z(ac, zs, FID.h)
    z_mid = np.interp(mid, chi_zs, zs)
    w = np.clip(1 - mid[:, None] / chi_zs[None, :], 0, None)
    inner = np.stack([_trapz(bins.nz[i, 1:] * w, zs) for i in range(5)])  # (5, n_planes)
    q_ref = 1.5 * FID.Omega_m / C_OVER_H0**2 * mid * (1 + z_mid) * inner
    kappa_bins = delta * np.sum(q * np.diff(edges), axis=1)
    # same trapezoid z table, different distance code and a(chi) by linear interpolation (dz = 0.002)
    np.testing.assert_allclose(kappa_bins, delta * np.sum(q_ref * np.diff(edges), axis=1), rtol=1e-4)
    assert np.all(np.diff(kappa_bins) > 0)  # more distant bins are lensed more by the same slab


def test_narrow_nz_approaches_single_plane():
    z_s, sig = 1.0, 0.005
    z = np.linspace(z_s - 10 * sig, z_s + 10 * sig, 2001)
    bins = RedshiftBins.from_arrays(z, np.exp(-0.5 * ((z - z_s) / sig) ** 2), 1.0, 0.26)
    bg = background(FID)
    chi_s = float(bg.comoving_distance(1 / (1 + z_s)))
    chi = np.linspace(1.0, 0.95 * chi_s, 200)
    q = np.asarray(lensing_efficiency(FID, bins, chi, bg))[0]
    q1 = np.asarray(lensing_kernel_single(FID, chi, chi_s, bg))
    # the source-distance spread (~0.4% of chi_s) enters only at second order in q, so the two
    # agree far better than the 1% asked for away from chi_s
    np.testing.assert_allclose(q, q1, rtol=1e-2)
    # nothing lenses sources in front of it: zero behind the narrow source shell (z_s + 10 sigma)
    chi_far = np.linspace(float(bg.comoving_distance(1 / (1 + z[-1]))), 2 * chi_s, 50)
    assert np.all(np.asarray(lensing_efficiency(FID, bins, chi_far, bg)) == 0.0)


def test_lensing_efficiency_grad_omega_c(lsst):
    chi = jnp.linspace(10.0, 4000.0, 64)

    @jax.jit
    def f(oc):
        c = Cosmology(Omega_c=oc, Omega_b=FID.Omega_b, h=FID.h, n_s=FID.n_s, sigma8=FID.sigma8)
        return jnp.sum(lensing_efficiency(c, lsst, chi))

    # eps = 1e-5: the trapezoid of max(0, 1 - chi/chi(z_j)) is piecewise smooth, with kinks where
    # chi(z_j) crosses an output chi; at eps = 1e-4 such crossings add ~3e-5 to the FD quotient,
    # at 1e-5 FD matches the gradient to ~1e-11 here (f64 rounding ~1e-16/eps is negligible).
    oc, eps = FID.Omega_c, 1e-5
    g = float(jax.grad(f)(oc))
    fd = (float(f(oc + eps)) - float(f(oc - eps))) / (2 * eps)
    assert np.isfinite(g) and g > 0
    assert g == pytest.approx(fd, rel=1e-5)


def test_lensing_efficiency_equals_the_direct_double_sum(lsst):
    # lensing_efficiency sums the sources behind each chi with tail sums; here the plain
    # (n_chi, n_z) sum of the same trapezoid weights, at unsorted chi that include source
    # distances themselves (where the dropped term is exactly 0) and points beyond all sources.
    # Same terms in another order: float64 round-off over ~2000 terms, ~1e-13 relative.
    bg = background(FID)
    z = np.asarray(lsst.z)
    chi_z = np.asarray(bg.comoving_distance(1 / (1 + z)))
    rng = np.random.default_rng(3)
    chi = np.concatenate([rng.uniform(0, 1.2 * chi_z[-1], 200), chi_z[rng.integers(1, len(z), 20)]])
    rng.shuffle(chi)
    dz = np.diff(z)
    tw = 0.5 * (np.append(dz, 0) + np.insert(dz, 0, 0))
    w = np.where(chi_z[None, 1:] > 0, np.clip(1 - chi[:, None] / chi_z[None, 1:], 0, None), 0)
    g = (np.asarray(lsst.nz)[:, 1:] * tw[1:]) @ w.T
    a = np.asarray(bg.a_of_chi(jnp.asarray(chi)))
    ref = 1.5 * FID.Omega_m / C_OVER_H0**2 * (chi / a) * g
    q = np.asarray(lensing_efficiency(FID, lsst, chi, bg))
    np.testing.assert_allclose(q, ref, rtol=1e-11, atol=1e-12 * np.abs(ref).max())
