"""Differentiable HEALPix pixelization (RING scheme) in pure JAX.

Implemented from the HEALPix paper (Gorski et al. 2005, ApJ 622, 759), sections 4 and 5, and
validated against healpy (tests/test_healpix.py): ``ang2pix_ring`` and ``vec2pix_ring`` give the
same pixels as ``healpy.ang2pix`` / ``healpy.vec2pix``, ``interp_weights_ring`` the same 4 pixels
and weights as ``healpy.get_interp_weights``.

Conventions:
  - nside is a positive power of 2 (<= 2^29), a static Python int: under jax.jit mark it static
    (``static_argnums`` / ``functools.partial``). npix = 12 nside^2.
  - Directions: theta is the colatitude in radians, [0, pi] (0 = north pole, +z); phi the longitude
    in radians (any real value, taken modulo 2 pi). A direction vector vec (..., 3) is Cartesian
    (x, y, z) and need not be normalised (only its direction is used; it must be non-zero).
  - RING ordering: 4 nside - 1 iso-latitude rings numbered 1 .. 4 nside - 1 from north to south;
    pixels are numbered ring by ring from the north pole, eastwards (increasing phi) from phi ~ 0
    in each ring.
  - Pixel indices are int64 (jax x64 is enabled when the ``simulators`` package is imported);
    angles and weights float64.

Bit-exact pixels: a point exactly on a pixel boundary (e.g. a pixel corner) lands in the same
pixel as in healpy only if every float64 operation rounds as in healpy. Under jit, XLA would fuse
multiply-adds into FMAs and rewrite 1/sqrt and divisions by constants; ``_rounded``, ``_sqrt``
and ``_divide`` block those rewrites. Verified on CPU (tests); on GPU, points within an ulp of a
boundary have not been checked.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import is_concrete

Array = jax.Array

NSIDE_MAX = 2**29  # largest nside whose pixel indices fit in int64 (as in healpy)


def check_nside(nside) -> int:
    """Return nside as an int; ValueError unless it is a positive power of 2 <= 2^29 (static)."""
    if isinstance(nside, jax.core.Tracer):
        raise ValueError("nside must be a static Python int (mark it static under jax.jit)")
    if isinstance(nside, (bool, np.bool_)) or not isinstance(nside, (int, np.integer)):
        raise ValueError(f"nside must be a power of 2 (an integer 1, 2, 4, ...), got {nside!r}")
    n = int(nside)
    if n < 1 or (n & (n - 1)) != 0 or n > NSIDE_MAX:
        raise ValueError(f"nside must be a power of 2 between 1 and 2^29, got {n}")
    return n


def nside2npix(nside) -> int:
    """Number of pixels, 12 nside^2."""
    n = check_nside(nside)
    return 12 * n * n


def pixel_area(nside) -> float:
    """Solid angle of one pixel in steradians: 4 pi / (12 nside^2) (all pixels have equal area)."""
    return 4.0 * math.pi / nside2npix(nside)


# ------------------------------------------------------------------------------------------------
# Coordinates


def _fmodulo(v, m):
    """v mod m in [0, m) (floating point, exact: uses fmod), with -0-like results mapped to 0."""
    r_pos = jnp.where(v < m, v, jnp.fmod(v, m))
    r_neg = jnp.fmod(v, m) + m
    r_neg = jnp.where(r_neg == m, 0.0, r_neg)
    return jnp.where(v >= 0, r_pos, r_neg)


def _rounded(x):
    """x, rounded to float64 before any later add (the value is unchanged for finite x).

    XLA lets LLVM contract a multiply feeding an add into one fused multiply-add (FMA), which
    rounds once instead of twice. For points exactly on a pixel boundary that flips the pixel
    relative to healpy; putting the product behind a select stops the contraction.
    """
    return jnp.where(jnp.isfinite(x), x, jnp.inf)


def _sqrt(x):
    """sqrt(x) that XLA may not merge into a following division: x / sqrt(y) would become
    x * rsqrt(y), rounded differently from healpy."""
    return jax.lax.optimization_barrier(jnp.sqrt(x))


def _divide(x, c: float):
    """x / c correctly rounded: XLA would turn a division by the constant c into a multiplication
    by its rounded reciprocal."""
    return x / jax.lax.optimization_barrier(jnp.full_like(x, c))


def _check_vec(vec):
    """vec as float64 (..., 3); when concrete, ValueError for NaN/inf or zero vectors."""
    vec = jnp.asarray(vec, jnp.float64)
    if vec.ndim < 1 or vec.shape[-1] != 3:
        raise ValueError(f"vec must have shape (..., 3), got {vec.shape}")
    if is_concrete(vec):
        v = np.asarray(vec)
        if not np.all(np.isfinite(v)):
            raise ValueError("vec contains NaN or inf")
        if np.any(np.all(v == 0, axis=-1)):
            raise ValueError("vec contains a zero vector (no direction)")
    return vec


def _vec_to_loc(vec):
    """Unnormalised vec (..., 3) -> (z, phi, sin theta, theta), differentiable away from the poles.

    z = cos(theta) = vz / |v|, phi = atan2(vy, vx) in (-pi, pi] (0 on the polar axis),
    theta = atan2(sqrt(vx^2 + vy^2), vz). Gradients stay finite on the polar axis.
    """
    vec = _check_vec(vec)
    x, y, z = vec[..., 0], vec[..., 1], vec[..., 2]
    rho2 = _rounded(x * x) + _rounded(y * y)
    off_axis = rho2 > 0
    rho2_safe = jnp.where(off_axis, rho2, 1.0)
    rho = jnp.where(off_axis, jnp.sqrt(rho2_safe), 0.0)
    inv_len = 1.0 / _sqrt(rho2 + _rounded(z * z))
    nz = z * inv_len
    phi = jnp.where(off_axis, jnp.arctan2(jnp.where(off_axis, y, 0.0), jnp.where(off_axis, x, 1.0)),
                    0.0)
    theta = jnp.arctan2(rho, z)
    return nz, phi, rho * inv_len, theta


def _check_theta(theta):
    theta = jnp.asarray(theta, jnp.float64)
    if is_concrete(theta):
        t = np.asarray(theta)
        if not np.all((t >= 0) & (t <= np.pi)):
            raise ValueError("theta must be in [0, pi] radians (and not NaN)")
    return jnp.clip(theta, 0.0, jnp.pi)


# ------------------------------------------------------------------------------------------------
# Pixel index of a direction (Gorski et al. 2005, section 4)


def _loc2pix(nside: int, z, phi, sth, use_sth):
    """RING pixel of the direction (z = cos theta, phi); sth = sin theta is used near the poles
    (where use_sth) for precision: there 1 - |z| loses digits."""
    n = nside
    npix = 12 * n * n
    za = jnp.abs(z)
    tt = _fmodulo(phi * (2.0 / math.pi), 4.0)  # phi in units of pi/2, [0, 4)

    # Equatorial belt |z| <= 2/3: the pixel boundaries are the lines phi/(pi/2) -/+ 3z/4 = const.
    t1 = n * (0.5 + tt)
    t2 = _rounded(n * z * 0.75)
    jp = jnp.floor(t1 - t2).astype(jnp.int64)  # index of the ascending edge line
    jm = jnp.floor(t1 + t2).astype(jnp.int64)  # index of the descending edge line
    ring = n + 1 + jp - jm  # 1 .. 2n + 1, counted from the ring at z = 2/3
    odd = 1 - (ring & 1)
    ip = ((jp + jm - n + odd + 1) // 2) % (4 * n)
    pix_eq = 2 * n * (n - 1) + (ring - 1) * (4 * n) + ip

    # Polar caps |z| > 2/3: ring number from the nearest pole ~ n sqrt(3 (1 - |z|)).
    tp = tt - jnp.floor(tt)
    near_pole = use_sth & (za >= 0.99)
    dist = jnp.where(near_pole, n * sth / _sqrt(_divide(1.0 + za, 3.0)),
                     n * jnp.sqrt(3.0 * (1.0 - za)))
    jp = jnp.floor(tp * dist).astype(jnp.int64)
    jm = jnp.floor((1.0 - tp) * dist).astype(jnp.int64)
    ring = jp + jm + 1  # 1 .. n
    ip = jnp.floor(tt * ring).astype(jnp.int64) % (4 * ring)
    pix_polar = jnp.where(z > 0, 2 * ring * (ring - 1) + ip, npix - 2 * ring * (ring + 1) + ip)

    return jnp.where(za <= 2.0 / 3.0, pix_eq, pix_polar)


def ang2pix_ring(nside: int, theta, phi) -> Array:
    """RING pixel index containing each direction (theta, phi).

    Args:
      nside: HEALPix resolution, a power of 2 (static).
      theta: (...) colatitude in radians, [0, pi]. Out-of-range or NaN values raise ValueError
        when concrete; under jit they are clipped into [0, pi].
      phi: (...) longitude in radians (any real; taken modulo 2 pi). Broadcast against theta.
    Returns: (...) int64 pixel indices in [0, 12 nside^2); equal to ``healpy.ang2pix(nside, theta,
      phi)``. Not differentiable (integer output).
    """
    n = check_nside(nside)
    theta = _check_theta(theta)
    phi = jnp.asarray(phi, jnp.float64)
    theta, phi = jnp.broadcast_arrays(theta, phi)
    # near the poles use sin(theta), more precise than sqrt(1 - cos theta); thresholds as healpy's
    use_sth = (theta < 0.01) | (theta > 3.14159 - 0.01)
    return _loc2pix(n, jnp.cos(theta), phi, jnp.sin(theta), use_sth)


def vec2pix_ring(nside: int, vec) -> Array:
    """RING pixel index containing each direction vector.

    Args:
      nside: HEALPix resolution, a power of 2 (static).
      vec: (..., 3) Cartesian direction vectors, not necessarily normalised, non-zero.
    Returns: (...) int64 pixel indices; equal to ``healpy.vec2pix(nside, x, y, z)``.
    """
    n = check_nside(nside)
    z, phi, sth, _ = _vec_to_loc(vec)
    return _loc2pix(n, z, phi, sth, jnp.abs(z) > 0.99)


def pix2ang_ring(nside: int, pix) -> tuple[Array, Array]:
    """(theta, phi) in radians of the centres of RING pixels pix (...) (inverse of ang2pix_ring)."""
    n = check_nside(nside)
    npix = 12 * n * n
    pix = jnp.asarray(pix, jnp.int64)
    if is_concrete(pix) and not np.all((np.asarray(pix) >= 0) & (np.asarray(pix) < npix)):
        raise ValueError(f"pixel indices must be in [0, {npix})")
    ncap = 2 * n * (n - 1)
    # north cap: pix = 2 r (r - 1) + k, k < 4 r  =>  r = floor((1 + sqrt(1 + 2 pix)) / 2)
    r_n = jnp.floor(0.5 * (1.0 + jnp.sqrt(1.0 + 2.0 * pix))).astype(jnp.int64)
    r_n = r_n - (2 * r_n * (r_n - 1) > pix) + (2 * (r_n + 1) * r_n <= pix)  # guard rounding
    k_n = pix - 2 * r_n * (r_n - 1)
    # south cap, mirrored
    q = npix - 1 - pix
    r_s = jnp.floor(0.5 * (1.0 + jnp.sqrt(1.0 + 2.0 * q))).astype(jnp.int64)
    r_s = r_s - (2 * r_s * (r_s - 1) > q) + (2 * (r_s + 1) * r_s <= q)
    k_s = 4 * r_s - 1 - (q - 2 * r_s * (r_s - 1))
    # equatorial belt
    r_e = (pix - ncap) // (4 * n) + n
    k_e = (pix - ncap) % (4 * n)
    ring = jnp.where(pix < ncap, r_n, jnp.where(pix >= npix - ncap, 4 * n - r_s, r_e))
    k = jnp.where(pix < ncap, k_n, jnp.where(pix >= npix - ncap, k_s, k_e))
    _, nr, theta, shift = _ring_info(n, ring)
    phi = (k + 0.5 * shift) * (2.0 * math.pi / nr)
    return theta, phi


# ------------------------------------------------------------------------------------------------
# Bilinear interpolation weights


def _ring_info(n: int, ring):
    """For RING ring numbers (1 .. 4n - 1): (first pixel, pixels in ring, ring colatitude theta,
    shift) where pixel k of the ring is centred at phi = (k + shift / 2) 2 pi / pixels-in-ring."""
    npix = 12 * n * n
    north = jnp.minimum(ring, 4 * n - ring)  # ring number counted from the nearest pole
    in_cap = north < n
    # cap ring r: z = 1 - r^2 / (3 n^2), i.e. sin(theta / 2) = r / (sqrt(6) n)
    theta_cap = 2.0 * jnp.arcsin(north / (math.sqrt(6.0) * n))
    # equatorial ring r: z = 4/3 - 2 r / (3 n)
    theta_eq = jnp.arccos(jnp.clip((2 * n - north) * (2.0 / (3.0 * n)), -1.0, 1.0))
    theta_n = jnp.where(in_cap, theta_cap, theta_eq)
    theta = jnp.where(ring == north, theta_n, math.pi - theta_n)
    nr = jnp.where(in_cap, 4 * north, 4 * n)
    start_eq = 2 * n * (n - 1) + (ring - n) * (4 * n)
    start = jnp.where(in_cap, jnp.where(ring == north, 2 * north * (north - 1),
                                        npix - 2 * north * (north + 1)), start_eq)
    shift = jnp.where(in_cap, 1, ((ring - n) % 2 == 0).astype(jnp.int64))
    return start, nr, theta, shift


def _ring_above(n: int, z):
    """Number of the ring at or just north of z (0 north of the first ring)."""
    za = jnp.abs(z)
    eq = jnp.floor(n * (2.0 - 1.5 * z)).astype(jnp.int64)
    r = jnp.floor(n * jnp.sqrt(3.0 * (1.0 - za))).astype(jnp.int64)
    return jnp.where(za <= 2.0 / 3.0, eq, jnp.where(z > 0, r, 4 * n - r - 1))


def _phi_neighbours(n: int, ring, phi):
    """The two pixels of `ring` whose centres bracket phi, and the linear weights in phi."""
    start, nr, _, shift = _ring_info(n, jnp.clip(ring, 1, 4 * n - 1))
    dphi = 2.0 * math.pi / nr
    u = phi / dphi - 0.5 * shift
    i1 = jnp.floor(u).astype(jnp.int64)
    w1 = (phi - (i1 + 0.5 * shift) * dphi) / dphi  # in [0, 1)
    i2 = i1 + 1
    i1 = i1 % nr
    i2 = i2 % nr
    return jnp.stack([start + i1, start + i2], -1), jnp.stack([1.0 - w1, w1], -1)


def _interp_zphi(n: int, z, theta, phi):
    """4 pixels and bilinear weights (linear in theta between the rings, in phi along each ring)."""
    npix = 12 * n * n
    phi = _fmodulo(phi, 2.0 * math.pi)
    r1 = _ring_above(n, z)
    r2 = r1 + 1
    p_up, w_up = _phi_neighbours(n, r1, phi)
    p_dn, w_dn = _phi_neighbours(n, r2, phi)
    _, _, theta1, _ = _ring_info(n, jnp.clip(r1, 1, 4 * n - 1))
    _, _, theta2, _ = _ring_info(n, jnp.clip(r2, 1, 4 * n - 1))
    north_cap = r1 == 0  # above the first ring: interpolate towards the pole
    south_cap = r2 == 4 * n
    theta1 = jnp.where(north_cap, 0.0, theta1)
    theta2 = jnp.where(south_cap, math.pi, theta2)
    t = ((theta - theta1) / (theta2 - theta1))[..., None]

    # General case: the 2 + 2 neighbours on the rings above and below.
    w_gen = jnp.concatenate([w_up * (1.0 - t), w_dn * t], -1)
    # North of ring 1: the pole value is the mean of ring 1's 4 pixels, so the (1 - t) share goes
    # equally to them; the rows "above" are ring 1's other two pixels (across the pole).
    quarter_n = 0.25 * (1.0 - t)
    w_north = jnp.concatenate([jnp.broadcast_to(quarter_n, w_dn.shape), w_dn * t + quarter_n], -1)
    p_north = jnp.concatenate([(p_dn + 2) % 4, p_dn], -1)
    # South of the last ring, mirrored.
    quarter_s = 0.25 * t
    w_south = jnp.concatenate(
        [w_up * (1.0 - t) + quarter_s, jnp.broadcast_to(quarter_s, w_up.shape)], -1)
    p_south = jnp.concatenate([p_up, (p_up + 2) % 4 + npix - 4], -1)

    pix = jnp.where(north_cap[..., None], p_north,
                    jnp.where(south_cap[..., None], p_south, jnp.concatenate([p_up, p_dn], -1)))
    w = jnp.where(north_cap[..., None], w_north, jnp.where(south_cap[..., None], w_south, w_gen))
    return pix, w


def interp_weights_ring(nside: int, vec) -> tuple[Array, Array]:
    """Bilinear interpolation pixels and weights of RING maps at directions vec.

    The value at a direction is sum_k w[..., k] map[pix[..., k]]: linear in phi between the two
    nearest pixel centres on the rings just north (k = 0, 1) and just south (k = 2, 3) of the point,
    then linear in theta between the two rings. North of the first ring (south of the last), the
    pole is given the mean of the 4 pixels of that ring: k = 0, 1 are then the ring's other two
    pixels, across the pole. Same pixels, order and weights as ``healpy.get_interp_weights`` (which
    returns them transposed, (4, ...)).

    Args:
      nside: HEALPix resolution, power of 2 (static).
      vec: (..., 3) direction vectors (need not be normalised, must be non-zero).
    Returns: (pix (..., 4) int64, w (..., 4) float64), weights >= 0 summing to 1. The weights are
      differentiable w.r.t. vec (continuous across pixel and ring boundaries; the gradient is not
      defined exactly on the polar axis, where it is returned finite).
    """
    n = check_nside(nside)
    z, phi, _, theta = _vec_to_loc(vec)
    return _interp_zphi(n, z, theta, phi)


def interp_weights_ring_ang(nside: int, theta, phi) -> tuple[Array, Array]:
    """``interp_weights_ring`` for directions given as colatitude theta and longitude phi (radians,
    broadcast together): the same convention as ``healpy.get_interp_weights(nside, theta, phi)``."""
    n = check_nside(nside)
    theta = _check_theta(theta)
    theta, phi = jnp.broadcast_arrays(theta, jnp.asarray(phi, jnp.float64))
    return _interp_zphi(n, jnp.cos(theta), theta, phi)


# ------------------------------------------------------------------------------------------------
# Painting (deposit) and interpolation (gather)

_METHODS = ("bilinear", "ngp")


def _flat_points(vec, values):
    values = jnp.asarray(values)
    lead = vec.shape[:-1]
    if values.shape == lead:
        channels = None
    elif values.ndim == len(lead) + 1 and values.shape[:-1] == lead:
        channels = values.shape[-1]
    else:
        raise ValueError(f"values must have shape {lead} or {lead} + (C,) to match vec "
                         f"{vec.shape}, got {values.shape}")
    m = math.prod(lead)
    vals = values.reshape((m,) if channels is None else (m, channels))
    return vec.reshape(m, 3), vals, channels


def _point_pixels(n: int, vec, method: str):
    """(pix (N, K), w (N, K)) deposit pattern of each point: K = 4 for bilinear, 1 for ngp."""
    if method == "bilinear":
        return interp_weights_ring(n, vec)
    if method == "ngp":
        pix = vec2pix_ring(n, vec)[:, None]
        return pix, jnp.ones(pix.shape, jnp.float64)
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _paint(n, vec, vals, method):
    pix, w = _point_pixels(n, vec, method)
    npix = 12 * n * n
    if vals.ndim == 1:
        contrib = (w * vals[:, None]).reshape(-1)
        return jnp.zeros(npix, contrib.dtype).at[pix.reshape(-1)].add(contrib)
    contrib = (w[:, :, None] * vals[:, None, :]).reshape(-1, vals.shape[1])  # (N K, C)
    return jnp.zeros((vals.shape[1], npix), contrib.dtype).at[:, pix.reshape(-1)].add(contrib.T)


def paint_healpix(nside: int, vec, values, method: str = "bilinear") -> Array:
    """Deposit point values onto a RING HEALPix map (sum of values per pixel, not a density).

    bilinear: each point adds w_k * value to its 4 ``interp_weights_ring`` pixels, i.e. painting is
      the transpose (adjoint) of bilinear interpolation, and the total sum is conserved exactly
      (the weights sum to 1). Differentiable w.r.t. values and vec.
    ngp: each point adds its value to the pixel containing it (``vec2pix_ring``). Differentiable
      w.r.t. values only (the gradient w.r.t. vec is zero).
    Divide by ``pixel_area(nside)`` for a density per steradian.

    Args:
      nside: HEALPix resolution, power of 2 (static).
      vec: (..., 3) direction vectors of the points (need not be normalised).
      values: (...) one value per point, or (..., C) C channels per point (e.g. tomographic bins).
      method: "bilinear" or "ngp" (static).
    Returns: (12 nside^2,) map for scalar values; (C, 12 nside^2) maps, one per channel, for
      (..., C) values (channel-first, like the (n_bins, npix) maps of ``simulators.fullsky``).
    """
    n = check_nside(nside)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    vec, vals, _ = _flat_points(_check_vec(vec), values)
    return _paint(n, vec, vals, method)


def interp_healpix(nside: int, maps, vec, method: str = "bilinear") -> Array:
    """Read RING maps at directions vec: the adjoint of ``paint_healpix`` with the same method.

    Args:
      nside: HEALPix resolution, power of 2 (static).
      maps: (12 nside^2,) or (C, 12 nside^2) RING maps.
      vec: (..., 3) direction vectors.
      method: "bilinear" (``interp_weights_ring``, as ``healpy.get_interp_val``) or "ngp" (value of
        the pixel containing the point).
    Returns: (...) values for a single map, (..., C) for C maps.
    """
    n = check_nside(nside)
    npix = 12 * n * n
    maps = jnp.asarray(maps)
    if maps.shape[-1] != npix or maps.ndim not in (1, 2):
        raise ValueError(f"maps must have shape ({npix},) or (C, {npix}) for nside {n}, "
                         f"got {maps.shape}")
    vec = _check_vec(vec)
    lead = vec.shape[:-1]
    pix, w = _point_pixels(n, vec.reshape(-1, 3), method)
    if maps.ndim == 1:
        return jnp.sum(w * maps[pix], -1).reshape(lead)
    out = jnp.sum(w[None] * maps[:, pix], -1)  # (C, N)
    return out.T.reshape(lead + (maps.shape[0],))
