"""Tests for simulators/fullsky.py (full-sky C_ell estimator, pixel window, nside check), against
healpy.

Statistical tests use fixed seeds (deterministic) with tolerances from the Gaussian sampling error.
"""

import urllib.error

import healpy as hp
import numpy as np
import pytest
from scipy.stats import chi2

from simulators import fullsky
from simulators.flatsky import pair_indices
from simulators.fullsky import bin_cl, check_nside, cl_estimate_healpix, healpix_pixel_window


def test_check_nside_accepts_exactly_healpy_nsides():
    """Powers of 2 up to 2^29 (int64 pixel indices), as Python or numpy integers; nothing else."""
    for nside in [1, 2, 16, 256, 8192, 2**29]:
        assert check_nside(nside) == nside
    assert type(check_nside(np.int64(64))) is int and check_nside(np.int64(64)) == 64
    for nside in range(1, 300):
        if hp.isnsideok(nside, nest=True):
            assert check_nside(nside) == nside
        else:
            with pytest.raises(ValueError, match="nside must be a power of 2"):
                check_nside(nside)
    for bad in [0, -4, 3, 12, 2**30, 16.0, "16", True, None]:
        with pytest.raises(ValueError, match="nside must be a power of 2"):
            check_nside(bad)


# ------------------------------------------------------------------------------------------------
# Full-sky C_ell

NSIDE_CL = 64
LMAX_CL = 3 * NSIDE_CL - 1
ELL = np.arange(LMAX_CL + 1)
CL_MODEL = 1e-9 / (ELL + 10.0)
# HEALPix quadrature is accurate to ~1e-4 below 2 nside (power is lost above): bins up to 128
EDGES_CL = np.arange(2, 2 * NSIDE_CL + 1, 9)


def _synfast(cl, seed):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return hp.synfast(cl, NSIDE_CL, lmax=LMAX_CL)
    finally:
        np.random.set_state(state)


def _bin_reference(cl_ell, edges):
    """Straightforward per-bin loop: (2 ell + 1)-weighted mean over integer ell in [lo, hi)."""
    out, ell_mean, n_modes = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ell = np.arange(int(np.ceil(lo)), int(np.ceil(hi)))
        wgt = 2 * ell + 1
        out.append(np.sum(wgt * cl_ell[..., ell], -1) / wgt.sum())
        ell_mean.append(np.sum(wgt * ell) / wgt.sum())
        n_modes.append(wgt.sum())
    return np.stack(out, -1), np.array(ell_mean), np.array(n_modes)


def test_cl_estimate_matches_anafast_and_binning():
    rng = np.random.default_rng(31)
    maps = rng.normal(size=(3, 12 * 16**2))
    edges = np.array([0, 1, 2.5, 7, 20, 48])  # non-integer edge: ell = 2 goes to [1, 2.5)
    cl, ell_mean, n_modes = cl_estimate_healpix(maps, edges)
    i, j = pair_indices(3)
    assert cl.shape == (6, 5) and ell_mean.shape == (5,) and n_modes.shape == (5,)
    ref = np.stack([hp.anafast(maps[a], map2=maps[b], lmax=47, pol=False) for a, b in zip(i, j)])
    ref_b, ref_mean, ref_modes = _bin_reference(ref, edges)
    np.testing.assert_allclose(cl, ref_b, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ell_mean, ref_mean, rtol=1e-14)
    np.testing.assert_array_equal(n_modes, ref_modes)
    np.testing.assert_array_equal(n_modes, [1, 3 + 5, 7 + 9 + 11 + 13, 20**2 - 7**2, 48**2 - 20**2])
    np.testing.assert_allclose(ell_mean[:2], [0.0, (3 * 1 + 5 * 2) / 8])
    # explicit lmax; empty bin -> NaN
    cl2, em2, nm2 = cl_estimate_healpix(maps[:1], [3.2, 3.5, 10], lmax=9)
    assert np.isnan(cl2[0, 0]) and np.isnan(em2[0]) and nm2[0] == 0
    ref2 = hp.anafast(maps[0], lmax=9, pol=False)
    assert cl2[0, 1] == pytest.approx(np.sum((2 * ELL[4:10] + 1) * ref2[4:10]) / nm2[1], rel=1e-12)
    # a single (npix,) map is one bin
    np.testing.assert_allclose(cl_estimate_healpix(maps[0], edges)[0], cl[:1], rtol=1e-14)


def test_cl_estimate_recovers_synfast_spectrum():
    m = _synfast(CL_MODEL, seed=1)
    cl, ell_mean, n_modes = cl_estimate_healpix(m[None, :], EDGES_CL, lmax=LMAX_CL)
    model, model_ell, model_modes = _bin_reference(CL_MODEL, EDGES_CL)
    np.testing.assert_array_equal(n_modes, model_modes)
    np.testing.assert_allclose(ell_mean, model_ell, rtol=1e-14)
    # Gaussian sampling error of a (2 ell + 1)-weighted mean of C_l, each with variance
    # 2 C_l^2 / (2l+1): var = sum (2l+1) 2 C_l^2 / n_modes^2 (~ 2 C^2 / n_modes)
    var = _bin_reference(2 * CL_MODEL**2, EDGES_CL)[0] / n_modes
    z = (cl[0] - model) / np.sqrt(var)
    assert np.all(np.abs(z) < 4), z
    assert chi2.sf(np.sum(z**2), z.size) > 1e-3, z
    # a factor-of-2 normalisation error would fail badly
    assert np.all(np.abs(cl[0] / model - 1) < 0.25)


def test_cl_estimate_cross_spectra_of_correlated_maps():
    # m0 = a, m1 = r a + s b with a, b independent and of spectrum C: C00 = C11 = C, C01 = r C
    r, s = 0.6, 0.8
    a, b = _synfast(CL_MODEL, seed=2), _synfast(CL_MODEL, seed=3)
    maps = np.stack([a, r * a + s * b])
    cl, _, n_modes = cl_estimate_healpix(maps, EDGES_CL, lmax=LMAX_CL)
    model = _bin_reference(CL_MODEL, EDGES_CL)[0]
    c_true = {(0, 0): 1.0, (0, 1): r, (1, 1): r * r + s * s}
    inv_modes = 1.0 / n_modes
    for p, (i, j) in enumerate(zip(*pair_indices(2))):
        cij = c_true[(i, j)]
        cii, cjj = c_true[(i, i)], c_true[(j, j)]
        # var of C_ij at one ell: (C_ii C_jj + C_ij^2) C_l^2 / (2l+1); binned as for the autos
        var = _bin_reference((cii * cjj + cij**2) * CL_MODEL**2, EDGES_CL)[0] * inv_modes
        z = (cl[p] - cij * model) / np.sqrt(var)
        assert np.all(np.abs(z) < 4), ((i, j), z)
        assert chi2.sf(np.sum(z**2), z.size) > 1e-3, ((i, j), z)
    # the cross spectrum is healpy's anafast(map1, map2=...)
    ref = hp.anafast(maps[0], map2=maps[1], lmax=LMAX_CL, pol=False)
    np.testing.assert_allclose(cl[1], _bin_reference(ref, EDGES_CL)[0], rtol=1e-12)
    # and really correlated: 0.6 of the auto spectrum, not 0 (as a wrong pair order would give for
    # independent maps) nor the auto spectrum
    assert np.mean(cl[1] / cl[0]) == pytest.approx(r, abs=0.05)


def test_cl_estimate_input_errors():
    good = np.zeros((2, 12 * 4**2))
    with pytest.raises(ValueError, match="NaN"):
        bad = good.copy()
        bad[1, 5] = np.nan
        cl_estimate_healpix(bad, [0, 5])
    with pytest.raises(ValueError, match="not 12 nside"):
        cl_estimate_healpix(np.zeros((2, 100)), [0, 5])
    with pytest.raises(ValueError, match="power of 2"):
        cl_estimate_healpix(np.zeros((2, 12 * 3**2)), [0, 5])
    with pytest.raises(ValueError, match="shape"):
        cl_estimate_healpix(np.zeros((2, 2, 12 * 4**2)), [0, 5])
    with pytest.raises(ValueError, match=r"\[0, lmax \+ 1\]"):
        cl_estimate_healpix(good, [0, 13])  # default lmax = 11
    with pytest.raises(ValueError, match=r"\[0, lmax \+ 1\]"):
        cl_estimate_healpix(good, [-1, 5])
    with pytest.raises(ValueError, match=r"\[0, lmax \+ 1\]"):
        cl_estimate_healpix(good, [0, 8], lmax=6)
    with pytest.raises(ValueError, match="increasing"):
        cl_estimate_healpix(good, [0, 5, 5])
    with pytest.raises(ValueError, match="2 entries"):
        cl_estimate_healpix(good, [3])
    with pytest.raises(ValueError, match="lmax"):
        cl_estimate_healpix(good, [0, 5], lmax=-1)
    with pytest.raises(ValueError, match="lmax"):
        cl_estimate_healpix(good, [0, 5], lmax=5.5)
    cl_estimate_healpix(good, [0, 12])  # edges up to lmax + 1 are fine


def test_bin_cl_shapes():
    cl = np.arange(20.0)[None].repeat(2, 0)
    binned, ell_mean, n_modes = bin_cl(cl, [0, 10, 20])
    np.testing.assert_allclose(binned[0], ell_mean)  # C_ell = ell
    assert n_modes.tolist() == [100, 300]


# ------------------------------------------------------------------------------------------------
# Pixel window


def _write_pixwin_file(folder, nside, values):
    from astropy.io import fits

    sub = folder / "pixel_window_functions"
    sub.mkdir(exist_ok=True)
    cols = [fits.Column(name="TEMPERATURE", format="D", array=values),
            fits.Column(name="POLARIZATION", format="D", array=values**2)]
    fits.BinTableHDU.from_columns(cols).writeto(sub / f"pixel_window_n{nside:04d}.fits")


def test_healpix_pixel_window_reads_healpy_file(tmp_path):
    nside = 16
    table = np.cos(np.arange(4 * nside + 1) / (4.0 * nside))  # any distinct values
    _write_pixwin_file(tmp_path, nside, table)
    ell = np.array([[0, 5], [64, 17]])
    got = healpix_pixel_window(nside, ell, datapath=str(tmp_path))
    assert got.shape == (2, 2)
    np.testing.assert_array_equal(got, table[ell])
    np.testing.assert_array_equal(healpix_pixel_window(nside, [3.0], datapath=str(tmp_path)),
                                  table[[3]])
    with pytest.raises(ValueError, match="stops at ell = 64"):
        healpix_pixel_window(nside, [65], datapath=str(tmp_path))
    with pytest.raises(ValueError, match="non-negative integers"):
        healpix_pixel_window(nside, [2.5], datapath=str(tmp_path))
    with pytest.raises(ValueError, match="non-negative integers"):
        healpix_pixel_window(nside, [-1], datapath=str(tmp_path))
    with pytest.raises(ValueError, match="power of 2"):
        healpix_pixel_window(12, [1])


def test_healpix_pixel_window_offline_error(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fullsky.hp, "pixwin", no_network)
    with pytest.raises(RuntimeError, match="datapath"):
        healpix_pixel_window(16, [1, 2])
