"""Tests for simulators/healpix.py (JAX HEALPix RING pixelization) and simulators/fullsky.py
(full-sky C_ell estimator), against healpy.

Everything runs jitted with nside static, as the simulator uses it. Statistical tests use fixed
seeds (deterministic) with tolerances from the Gaussian sampling error.
"""

import functools
import urllib.error

import jax

jax.config.update("jax_enable_x64", True)

import healpy as hp  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.stats import chi2  # noqa: E402

from simulators import fullsky  # noqa: E402
from simulators.flatsky import pair_indices  # noqa: E402
from simulators.fullsky import bin_cl, cl_estimate_healpix, healpix_pixel_window  # noqa: E402
from simulators.healpix import (  # noqa: E402
    ang2pix_ring,
    check_nside,
    interp_healpix,
    interp_weights_ring,
    interp_weights_ring_ang,
    nside2npix,
    paint_healpix,
    pix2ang_ring,
    pixel_area,
    vec2pix_ring,
)

ang2pix_jit = jax.jit(ang2pix_ring, static_argnums=0)
vec2pix_jit = jax.jit(vec2pix_ring, static_argnums=0)
weights_jit = jax.jit(interp_weights_ring, static_argnums=0)
weights_ang_jit = jax.jit(interp_weights_ring_ang, static_argnums=0)
paint_jit = jax.jit(paint_healpix, static_argnums=0, static_argnames="method")
interp_jit = jax.jit(interp_healpix, static_argnums=0, static_argnames="method")

N_RANDOM = 100_000
NSIDES = [1, 2, 16, 256]


def _random_vectors(rng, n):
    """Isotropic directions with random lengths (vec need not be normalised)."""
    v = rng.normal(size=(n, 3))
    return v * rng.uniform(0.01, 100.0, (n, 1))


def _vec_to_ang(v):
    theta = np.arctan2(np.hypot(v[:, 0], v[:, 1]), v[:, 2])
    return theta, np.mod(np.arctan2(v[:, 1], v[:, 0]), 2 * np.pi)


def _edge_angles(nside):
    """(theta, phi) edge cases: poles, phi = 0 / 2 pi / multiples of pi/2, equator, z = +-2/3, ring
    centres, meridians through pixel corners on the equator and at z = 2/3."""
    zs = np.array([1.0, -1.0, 2 / 3, -2 / 3, 0.0, 1 / 3, -1 / 3, 0.99, -0.99])
    phis = np.array([0.0, 2 * np.pi, np.pi / 2, np.pi, 1.5 * np.pi, 2 * np.pi - 1e-15, 1e-300])
    th = np.repeat(np.arccos(zs), phis.size)
    ph = np.tile(phis, zs.size)
    th = np.concatenate([th, [0.0, np.pi, np.pi / 2, np.pi / 2]])
    ph = np.concatenate([ph, [0.0, 0.0, 0.0, 2 * np.pi]])
    k = np.arange(8 * nside)
    meridians = k * np.pi / (4 * nside)
    th = np.concatenate([th, np.full(k.size, np.pi / 2), np.full(k.size, np.arccos(2 / 3)),
                         np.full(k.size, np.arccos(-2 / 3))])
    ph = np.concatenate([ph, meridians, meridians, meridians])
    # ring centres (all rings), at several phi
    rc_th, _ = hp.pix2ang(nside, _first_pixels_of_rings(nside))
    th = np.concatenate([th, np.repeat(rc_th, 3)])
    ph = np.concatenate([ph, np.tile([0.0, 0.3, 2 * np.pi], rc_th.size)])
    return th, ph


def _first_pixels_of_rings(nside):
    r = np.arange(1, 4 * nside)
    north = np.minimum(r, 4 * nside - r)
    npix = 12 * nside**2
    start = np.where(north < nside, np.where(r == north, 2 * north * (north - 1),
                                             npix - 2 * north * (north + 1)),
                     2 * nside * (nside - 1) + (r - nside) * 4 * nside)
    return start


def _corner_vectors(nside, rng, max_pixels=20_000):
    """Pixel corners and edge midpoints (points exactly on pixel boundaries)."""
    npix = nside2npix(nside)
    pix = np.arange(npix) if npix <= max_pixels else rng.choice(npix, max_pixels, replace=False)
    return hp.boundaries(nside, pix, step=2).transpose(0, 2, 1).reshape(-1, 3)


# ------------------------------------------------------------------------------------------------
# nside, areas, pixel centres


def test_nside_checks_and_pixel_area():
    for nside in [1, 2, 16, 256, 8192, 2**29]:
        assert check_nside(nside) == nside
        assert nside2npix(nside) == hp.nside2npix(nside)
        assert pixel_area(nside) == pytest.approx(hp.nside2pixarea(nside), rel=1e-15)
        assert pixel_area(nside) * nside2npix(nside) == pytest.approx(4 * np.pi, rel=1e-15)
    assert check_nside(np.int64(64)) == 64
    for bad in [0, -4, 3, 12, 2**30, 16.0, "16", True, None]:
        with pytest.raises(ValueError, match="nside must be a power of 2"):
            pixel_area(bad)
    with pytest.raises(ValueError, match="nside must be a power of 2"):
        ang2pix_ring(12, 0.5, 0.5)
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda n: pixel_area(n))(16)


@pytest.mark.parametrize("nside", [1, 2, 16, 256])
def test_pix2ang_matches_healpy(nside):
    pix = np.arange(nside2npix(nside))
    th, ph = jax.jit(pix2ang_ring, static_argnums=0)(nside, pix)
    th_ref, ph_ref = hp.pix2ang(nside, pix)
    np.testing.assert_allclose(np.asarray(th), th_ref, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(ph), ph_ref, rtol=0, atol=1e-14)
    # each centre lies in its own pixel
    np.testing.assert_array_equal(np.asarray(ang2pix_jit(nside, th, ph)), pix)


# ------------------------------------------------------------------------------------------------
# ang2pix / vec2pix: exact agreement


@pytest.mark.parametrize("nside", NSIDES)
def test_ang2pix_vec2pix_match_healpy_random(nside):
    rng = np.random.default_rng(nside)
    theta = np.arccos(rng.uniform(-1.0, 1.0, N_RANDOM))
    phi = rng.uniform(-2 * np.pi, 4 * np.pi, N_RANDOM)  # outside [0, 2 pi) too: taken modulo 2 pi
    np.testing.assert_array_equal(np.asarray(ang2pix_jit(nside, theta, phi)),
                                  hp.ang2pix(nside, theta, phi))
    v = _random_vectors(rng, N_RANDOM)
    np.testing.assert_array_equal(np.asarray(vec2pix_jit(nside, v)), hp.vec2pix(nside, *v.T))
    # polar caps at high resolution, where healpy switches to sin(theta) for precision
    th_cap = np.concatenate([rng.uniform(0, 0.15, 5000), np.pi - rng.uniform(0, 0.15, 5000)])
    ph_cap = rng.uniform(0, 2 * np.pi, th_cap.size)
    np.testing.assert_array_equal(np.asarray(ang2pix_jit(nside, th_cap, ph_cap)),
                                  hp.ang2pix(nside, th_cap, ph_cap))
    v_cap = hp.ang2vec(th_cap, ph_cap)
    np.testing.assert_array_equal(np.asarray(vec2pix_jit(nside, v_cap)),
                                  hp.vec2pix(nside, *v_cap.T))


@pytest.mark.parametrize("nside", [2**20, 2**29])
def test_pixels_match_healpy_huge_nside_near_poles(nside):
    rng = np.random.default_rng(7)
    th = np.concatenate([rng.uniform(0, 0.2, 5000), np.pi - rng.uniform(0, 0.2, 5000),
                         np.arccos(rng.uniform(-1, 1, 5000))])
    ph = rng.uniform(0, 2 * np.pi, th.size)
    np.testing.assert_array_equal(np.asarray(ang2pix_jit(nside, th, ph)), hp.ang2pix(nside, th, ph))
    v = hp.ang2vec(th, ph)
    np.testing.assert_array_equal(np.asarray(vec2pix_jit(nside, v)), hp.vec2pix(nside, *v.T))


@pytest.mark.parametrize("nside", NSIDES)
def test_pixels_match_healpy_edge_cases(nside):
    th, ph = _edge_angles(nside)
    np.testing.assert_array_equal(np.asarray(ang2pix_jit(nside, th, ph)), hp.ang2pix(nside, th, ph))
    axes = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0],
                     [np.sqrt(5) / 3, 0, 2 / 3], [np.sqrt(5) / 3, 0, -2 / 3], [0, 0, 3.0],
                     [0, 0, -0.5], [1e-300, 0, 1], [-1, -1e-300, 0], [3, 4, 0]], float)
    # points exactly on pixel boundaries: corners and edge midpoints of the pixels
    v = np.concatenate([axes, hp.ang2vec(th, ph), _corner_vectors(nside, np.random.default_rng(0))])
    np.testing.assert_array_equal(np.asarray(vec2pix_jit(nside, v)), hp.vec2pix(nside, *v.T))
    tc, pc = hp.vec2ang(_corner_vectors(nside, np.random.default_rng(1)))
    np.testing.assert_array_equal(np.asarray(ang2pix_jit(nside, tc, pc)), hp.ang2pix(nside, tc, pc))


def test_pixel_input_errors():
    with pytest.raises(ValueError, match="theta"):
        ang2pix_ring(4, np.array([0.1, 3.2]), 0.0)
    with pytest.raises(ValueError, match="theta"):
        ang2pix_ring(4, np.nan, 0.0)
    with pytest.raises(ValueError, match="zero vector"):
        vec2pix_ring(4, np.array([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        vec2pix_ring(4, np.array([np.nan, 0, 1.0]))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        vec2pix_ring(4, np.ones((5, 2)))


# ------------------------------------------------------------------------------------------------
# Interpolation weights


@pytest.mark.parametrize("nside", NSIDES)
def test_interp_weights_match_healpy(nside):
    rng = np.random.default_rng(100 + nside)
    v = _random_vectors(rng, N_RANDOM)
    near = rng.uniform(0, 0.3 / nside, 4000)  # north of the first / south of the last ring
    th_cap = np.concatenate([near[:2000], np.pi - near[2000:]])
    v = np.concatenate([v, 2.5 * hp.ang2vec(th_cap, rng.uniform(0, 2 * np.pi, th_cap.size))])
    theta, phi = _vec_to_ang(v)
    pix_ref, w_ref = hp.get_interp_weights(nside, theta, phi)  # (4, N) each
    pix, w = weights_jit(nside, v)
    pix, w = np.asarray(pix), np.asarray(w)
    assert pix.shape == (v.shape[0], 4) and w.shape == (v.shape[0], 4)
    np.testing.assert_array_equal(pix, pix_ref.T)
    # ring colatitudes agree to ~1 ulp; the theta weight divides by the ring spacing ~ 1 / nside
    np.testing.assert_allclose(w, w_ref.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-14)
    assert w.min() >= 0.0
    pix_a, w_a = weights_ang_jit(nside, theta, phi)
    np.testing.assert_array_equal(np.asarray(pix_a), pix_ref.T)
    np.testing.assert_allclose(np.asarray(w_a), w_ref.T, rtol=0, atol=1e-12)


def _sparse(pix, w, tol=1e-10):
    """{pixel: summed weight} without (near-)zero weights: the interpolation operator's row."""
    out = {}
    for p, x in zip(pix, w):
        out[int(p)] = out.get(int(p), 0.0) + float(x)
    return {p: x for p, x in out.items() if abs(x) > tol}


@pytest.mark.parametrize("nside", NSIDES)
def test_interp_weights_edge_cases(nside):
    th, ph = _edge_angles(nside)
    pix_ref, w_ref = hp.get_interp_weights(nside, th, ph)
    pix, w = weights_ang_jit(nside, th, ph)
    pix, w = np.asarray(pix), np.asarray(w)
    # Exactly on a ring, healpy and we may pick a different neighbouring ring, with weight 0:
    # compare the operator rows (pixel -> weight, zero weights dropped) rather than the 4-tuples.
    for k in range(th.size):
        a, b = _sparse(pix[k], w[k]), _sparse(pix_ref[:, k], w_ref[:, k])
        assert a.keys() == b.keys(), (th[k], ph[k], a, b)
        np.testing.assert_allclose([a[p] for p in a], [b[p] for p in a], rtol=0, atol=1e-12)
    # the poles: mean of the first / last ring
    npix = nside2npix(nside)
    for pole, ring in [(0.0, [0, 1, 2, 3]), (np.pi, list(range(npix - 4, npix)))]:
        for k in np.flatnonzero(th == pole):
            assert sorted(pix[k]) == ring
            np.testing.assert_allclose(w[k], 0.25, atol=1e-15)
    # through vectors, same operator rows
    pv, wv = weights_jit(nside, hp.ang2vec(th, ph))
    for k in range(th.size):
        a, b = _sparse(np.asarray(pv)[k], np.asarray(wv)[k]), _sparse(pix[k], w[k])
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[p] for p in a], [b[p] for p in a], rtol=0, atol=1e-12)


def test_interp_matches_healpy_get_interp_val():
    nside = 16
    rng = np.random.default_rng(5)
    m = rng.normal(size=(2, nside2npix(nside)))
    v = _random_vectors(rng, 2000)
    theta, phi = _vec_to_ang(v)
    got = np.asarray(interp_jit(nside, m, v))
    assert got.shape == (2000, 2)
    for c in range(2):
        np.testing.assert_allclose(got[:, c], hp.get_interp_val(m[c], theta, phi),
                                   rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(interp_jit(nside, m[0], v)), got[:, 0],
                               rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(interp_jit(nside, m[0], v, method="ngp")),
                                  m[0][hp.vec2pix(nside, *v.T)])


def test_interp_weights_gradient_matches_finite_differences():
    nside = 8
    rng = np.random.default_rng(11)
    m = jnp.asarray(rng.normal(size=nside2npix(nside)))
    # 64 random directions, then 2 on the polar axis (gradient only checked finite there)
    v = np.concatenate([_random_vectors(rng, 64) / 10.0, [[0.0, 0.0, 1.0], [0.0, 0.0, -2.0]]])

    def f(x):  # interpolated value at one direction
        pix, w = interp_weights_ring(nside, x)
        return jnp.sum(w * m[pix])

    grad = np.asarray(jax.jit(jax.vmap(jax.grad(f)))(v))
    f_b = jax.jit(jax.vmap(f))
    pix_b = jax.jit(jax.vmap(lambda x: interp_weights_ring(nside, x)[0]))
    h = 1e-6
    n_checked = 0
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        scale = np.linalg.norm(v, axis=1, keepdims=True) * e  # relative step
        fd = (np.asarray(f_b(v + scale)) - np.asarray(f_b(v - scale))) / (2 * scale[:, d])
        same_cell = np.all(np.asarray(pix_b(v + scale)) == np.asarray(pix_b(v - scale)), axis=1)
        same_cell[64:] = False
        n_checked += same_cell.sum()
        tol = 1e-6 * np.abs(grad).max()
        np.testing.assert_allclose(grad[same_cell, d], fd[same_cell], rtol=1e-5, atol=tol)
    assert n_checked > 0.9 * 3 * 64
    assert np.abs(grad).max() > 0.1  # not trivially zero
    # only the direction matters: the gradient is orthogonal to vec
    np.testing.assert_allclose(np.sum(grad[:64] * v[:64], axis=1), 0.0,
                               atol=1e-9 * np.abs(grad).max())
    assert np.all(np.isfinite(grad[64:]))  # finite on the polar axis


# ------------------------------------------------------------------------------------------------
# Painting


@pytest.mark.parametrize("method", ["bilinear", "ngp"])
def test_paint_conserves_sum(method):
    nside = 32
    rng = np.random.default_rng(21)
    v = _random_vectors(rng, 20_000)
    vals = rng.uniform(0.5, 2.0, 20_000)
    m = np.asarray(paint_jit(nside, v, vals, method=method))
    assert m.shape == (nside2npix(nside),)
    assert m.sum() == pytest.approx(vals.sum(), rel=1e-12)
    vals_c = rng.normal(size=(20_000, 3))
    mc = np.asarray(paint_jit(nside, v, vals_c, method=method))
    assert mc.shape == (3, nside2npix(nside))
    np.testing.assert_allclose(mc.sum(1), vals_c.sum(0), rtol=1e-12, atol=1e-9)
    # channels are painted independently, in the (C, npix) layout
    np.testing.assert_allclose(mc[1], np.asarray(paint_jit(nside, v, vals_c[:, 1], method=method)),
                               rtol=1e-12, atol=1e-12)
    if method == "ngp":
        np.testing.assert_allclose(
            m, np.bincount(hp.vec2pix(nside, *v.T), weights=vals, minlength=m.size), rtol=1e-12)
    else:  # bilinear spreads each point over the 4 healpy interpolation pixels
        theta, phi = _vec_to_ang(v[:2000])
        pix_ref, w_ref = hp.get_interp_weights(nside, theta, phi)
        ref = np.bincount(pix_ref.ravel(), weights=(w_ref * vals[:2000]).ravel(), minlength=m.size)
        np.testing.assert_allclose(np.asarray(paint_jit(nside, v[:2000], vals[:2000])), ref,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "ngp"])
def test_paint_is_adjoint_of_interp(method):
    nside = 16
    rng = np.random.default_rng(22)
    v = _random_vectors(rng, 3000)
    vals = rng.normal(size=(3000, 2))
    m = rng.normal(size=(2, nside2npix(nside)))
    lhs = np.sum(m * np.asarray(paint_jit(nside, v, vals, method=method)))  # <m, P v>
    rhs = np.sum(np.asarray(interp_jit(nside, m, v, method=method)) * vals)  # <I m, v>
    assert lhs == pytest.approx(rhs, rel=1e-12)
    assert abs(lhs) > 1.0


def test_paint_gradients():
    nside = 8
    rng = np.random.default_rng(23)
    v = _random_vectors(rng, 40)
    vals = rng.uniform(0.5, 2.0, 40)
    m = rng.normal(size=nside2npix(nside))

    def loss(x, y, method="bilinear"):
        return jnp.sum(m * paint_healpix(nside, x, y, method=method))

    g_vec, g_val = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, vals)
    # d/dvalues = interpolation of m (adjoint)
    np.testing.assert_allclose(np.asarray(g_val), np.asarray(interp_jit(nside, m, v)),
                               rtol=1e-12, atol=1e-12)
    # d/dvec = values * gradient of the interpolant
    g_interp = jax.jit(jax.vmap(jax.grad(lambda x: interp_healpix(nside, m, x[None])[0])))(v)
    np.testing.assert_allclose(np.asarray(g_vec), np.asarray(g_interp) * vals[:, None],
                               rtol=1e-10, atol=1e-12)
    # and against finite differences of the loss, one coordinate of one point at a time
    loss_j = jax.jit(loss)
    for k, d in [(0, 0), (3, 1), (17, 2), (31, 0)]:
        h = 1e-6 * np.linalg.norm(v[k])
        e = np.zeros_like(v)
        e[k, d] = h
        fd = (float(loss_j(v + e, vals)) - float(loss_j(v - e, vals))) / (2 * h)
        assert float(g_vec[k, d]) == pytest.approx(fd, rel=1e-5, abs=1e-8)
    # ngp: differentiable in the values, zero gradient in vec
    g_vec_ngp, g_val_ngp = jax.jit(jax.grad(functools.partial(loss, method="ngp"),
                                            argnums=(0, 1)))(v, vals)
    np.testing.assert_array_equal(np.asarray(g_vec_ngp), 0.0)
    np.testing.assert_array_equal(np.asarray(g_val_ngp), m[hp.vec2pix(nside, *v.T)])


def test_paint_input_errors():
    v = np.ones((5, 3))
    with pytest.raises(ValueError, match="method"):
        paint_healpix(4, v, np.ones(5), method="cic")
    with pytest.raises(ValueError, match="values must have shape"):
        paint_healpix(4, v, np.ones(4))
    with pytest.raises(ValueError, match="values must have shape"):
        paint_healpix(4, v, np.ones((5, 2, 2)))
    with pytest.raises(ValueError, match="zero vector"):
        paint_healpix(4, np.zeros((5, 3)), np.ones(5))
    with pytest.raises(ValueError, match="maps must have shape"):
        interp_healpix(4, np.ones(100), v)


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


def test_jit_with_static_nside_partial():
    nside = 4
    f = jax.jit(functools.partial(paint_healpix, nside, method="bilinear"))
    v = _random_vectors(np.random.default_rng(0), 10)
    np.testing.assert_allclose(np.asarray(f(v, np.ones(10))).sum(), 10.0, rtol=1e-14)
    g = jax.jit(functools.partial(vec2pix_ring, nside))
    np.testing.assert_array_equal(np.asarray(g(v)), hp.vec2pix(nside, *v.T))
