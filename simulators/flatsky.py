"""Flat-sky tomographic convergence: Limber C_ell, FFT power estimator, Gaussian and noise maps.

Conventions (shared by every function here, so that they are mutually consistent):
  - Maps are square, (n_bins, npix, npix), covering field_deg x field_deg degrees; the pixel side
    is field_rad / npix and its solid angle A_pix = (field_rad / npix)^2 steradians.
  - Fourier modes: kappa_ell = FFT2(map) * A_pix, ell = 2 pi * (FFT frequency) / (pixel side in
    radians), i.e. ell = 2 pi m / field_rad for integer m (fundamental 2 pi / field_rad).
  - Power: <kappa_ell,i kappa_ell,j^*> = A_field C_ij(|ell|), A_field = field_rad^2 steradians.
  - Tomographic pairs (i <= j) are ordered (0,0), (0,1), ..., (0,n-1), (1,1), ... (``pair_indices``).
Units: ell dimensionless, C_ell in steradians, comoving distances in Mpc/h.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import is_concrete
from .cosmology import Cosmology, background, growth_table, linear_power
from .halofit import nonlinear_power
from .sources import RedshiftBins, lensing_efficiency

Array = jax.Array


def pair_indices(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) numpy int arrays of the n_bins (n_bins + 1) / 2 tomographic pairs with i <= j,
    ordered (0,0), (0,1), ..., (0,n-1), (1,1), ..., (n-1,n-1)."""
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    return np.triu_indices(int(n_bins))


def _n_bins_from_pairs(n_pairs: int) -> int:
    n = int(round((math.sqrt(8 * n_pairs + 1) - 1) / 2))
    if n * (n + 1) // 2 != n_pairs:
        raise ValueError(f"{n_pairs} spectra is not n_bins (n_bins + 1) / 2 for any n_bins")
    return n


# ------------------------------------------------------------------------------------------------
# Limber


def limber_cl(cosmo: Cosmology, bins: RedshiftBins, ell, n_chi: int = 256,
              nonlinear: bool = True, power_filter=None) -> Array:
    """Tomographic convergence power spectra in the Limber approximation (flat sky, Born).

      C_ij(ell) = int_0^chi_max dchi q_i(chi) q_j(chi) / chi^2 P((ell + 1/2) / chi, a(chi)),

    q_i from ``sources.lensing_efficiency``. P is the halofit (Takahashi et al. 2012) nonlinear
    matter power ``halofit.nonlinear_power`` by default, or with nonlinear=False the linear power
    P_lin(k, z=0) D1(a)^2, which underestimates C_ell at ell >~ 200 where nonlinear clustering
    dominates (for the LSST-Y10 bins at ell = 1000, by a factor ~2.6 in the highest-z bin and ~14
    in the lowest).

    The chi grid is fixed in size: n_chi points, uniform in chi over (0, chi(z_max)] with
    z_max = bins.z[-1] (the kernels vanish beyond), integrated with the trapezoid rule plus the
    exactly-zero chi = 0 end point (q ~ chi there, while P(ell/chi) -> 0). Only the end point
    moves with the cosmology, so the result is smooth and jit/grad-friendly.

    Args:
      cosmo: parameters (may be traced).
      bins: RedshiftBins (may be traced).
      ell: (n_ell,) multipoles, > 0.
      n_chi: number of chi nodes (static), >= 16.
      nonlinear: use halofit (default) or linear power (static).
      power_filter: optional k -> factor (h/Mpc in, any shape) multiplying P(k), e.g. the mesh
        smoothing of simulated maps (``lensing.mesh_power_window``).
    Returns: (n_pairs, n_ell) float64 C_ell (steradians), pairs as in ``pair_indices``.
    """
    if not (isinstance(n_chi, (int, np.integer)) and n_chi >= 16):
        raise ValueError(f"n_chi must be an integer >= 16, got {n_chi}")
    if not isinstance(nonlinear, (bool, np.bool_)):
        raise ValueError(f"nonlinear must be a bool (static under jit), got {nonlinear!r}")
    ell = jnp.atleast_1d(jnp.asarray(ell, jnp.float64))
    if ell.ndim != 1:
        raise ValueError(f"ell must be 1-D, got shape {ell.shape}")
    if is_concrete(ell) and not np.all(np.asarray(ell) > 0):
        raise ValueError("ell must be > 0 (Limber is meaningless at ell = 0)")
    bg = background(cosmo)
    z_max = jnp.asarray(bins.z, jnp.float64)[-1]
    chi_max = bg.comoving_distance(1.0 / (1.0 + z_max))
    # Nodes at chi_max * m / n_chi, m = 1..n_chi; the chi = 0 node contributes 0 to the trapezoid.
    u = jnp.arange(1, n_chi + 1, dtype=jnp.float64) / n_chi
    chi = chi_max * u
    weights = (chi_max / n_chi) * jnp.where(u == 1.0, 0.5, 1.0)  # trapezoid, zero-valued left end
    a = bg.a_of_chi(chi)
    q = lensing_efficiency(cosmo, bins, chi, bg=bg)  # (n_bins, n_chi)
    k = (ell[:, None] + 0.5) / chi[None, :]  # (n_ell, n_chi) h/Mpc
    if nonlinear:
        pk = nonlinear_power(cosmo, k, a[None, :])  # halofit parameters once per chi node
    else:
        pk = linear_power(cosmo, k) * (growth_table(cosmo).D1_at(a) ** 2)[None, :]
    if power_filter is not None:
        pk = pk * power_filter(k)
    i, j = pair_indices(q.shape[0])
    kern = q[i] * q[j] * (weights / chi**2)[None, :]  # (n_pairs, n_chi)
    return kern @ pk.T


# ------------------------------------------------------------------------------------------------
# Fourier grid and binning


def _field_rad(field_deg) -> float:
    try:
        f = float(field_deg)  # static: the Fourier grid depends on it
    except (TypeError, ValueError) as e:
        raise ValueError(f"field_deg must be a number (static under jit), got {field_deg!r}") from e
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"field_deg must be a finite number > 0, got {field_deg}")
    return math.radians(f)


def pixel_area_sr(field_deg: float, npix: int) -> float:
    """Solid angle in steradians of one pixel of a field_deg x field_deg map with npix^2 pixels."""
    return (_field_rad(field_deg) / npix) ** 2


def mode_ell(field_deg: float, npix: int) -> np.ndarray:
    """(npix, npix) |ell| of each FFT2 mode (numpy float64, FFT ordering; 0 at index [0, 0])."""
    if not (isinstance(npix, (int, np.integer)) and npix >= 2):
        raise ValueError(f"npix must be an integer >= 2, got {npix}")
    lx = 2.0 * np.pi * np.fft.fftfreq(npix, d=_field_rad(field_deg) / npix)
    return np.hypot(lx[:, None], lx[None, :])


def scale_mask(field_deg: float, npix: int, ell_min, ell_max) -> np.ndarray:
    """(n_bins, npix, npix) bool, FFT ordering: the modes of bin b with ell_min[b] <= |ℓ| <=
    ell_max[b] (``ell_min``/``ell_max``: (n_bins,) sequences). The mask depends on |ℓ| only, so it
    is even in ℓ and ``apply_scale_mask`` is an orthogonal projector on real maps."""
    lo, hi = np.asarray(ell_min, np.float64), np.asarray(ell_max, np.float64)
    if lo.ndim != 1 or lo.shape != hi.shape:
        raise ValueError(f"ell_min and ell_max must be (n_bins,) sequences of the same length, "
                         f"got shapes {lo.shape} and {hi.shape}")
    ell = mode_ell(field_deg, npix)
    return (ell[None] >= lo[:, None, None]) & (ell[None] <= hi[:, None, None])


def apply_scale_mask(maps, mask) -> Array:
    """The maps (n_bins, npix, npix) (or a batch (..., n_bins, npix, npix)) keeping only the Fourier
    modes in ``mask`` (``scale_mask``): F⁻¹ (mask · F maps), real, in the maps' dtype. Linear, and
    the same operation on data and model: with white pixel noise of rms σ the filtered residual's
    -|P(d - κ)|² / 2σ² is the exact log-likelihood of the kept modes (up to a constant)."""
    maps = jnp.asarray(maps)
    mask = jnp.asarray(mask)
    return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(maps) * mask)).astype(maps.dtype)


def _bin_modes(values, ell_grid, ell_edges):
    """Average values (..., npix, npix) over modes with ell_edges[b] <= |ell| < ell_edges[b+1].

    Returns (binned (..., n_ell_bins), mean ell (n_ell_bins,), n_modes (n_ell_bins,) int).
    Empty bins give NaN for the averages and 0 modes.
    """
    nb = ell_edges.shape[0] - 1
    flat_ell = ell_grid.reshape(-1)
    idx = jnp.searchsorted(ell_edges, flat_ell, side="right") - 1
    idx = jnp.where((idx >= 0) & (idx < nb), idx, nb)  # out-of-range modes go to a discard bin
    vals = values.reshape(values.shape[:-2] + (-1,))

    def seg(x):
        return jax.ops.segment_sum(x, idx, num_segments=nb + 1)[:nb]

    counts = seg(jnp.ones_like(flat_ell))
    safe = jnp.maximum(counts, 1.0)
    summed = jax.vmap(seg)(vals.reshape(-1, vals.shape[-1])).reshape(vals.shape[:-1] + (nb,))
    empty = counts == 0
    mean_vals = jnp.where(empty, jnp.nan, summed / safe)
    mean_ell = jnp.where(empty, jnp.nan, seg(flat_ell) / safe)
    return mean_vals, mean_ell, counts.astype(jnp.int32)


def _check_edges(ell_edges):
    ell_edges = jnp.asarray(ell_edges, jnp.float64)
    if ell_edges.ndim != 1 or ell_edges.shape[0] < 2:
        raise ValueError(f"ell_edges must be 1-D with >= 2 entries, got shape {ell_edges.shape}")
    if is_concrete(ell_edges) and not np.all(np.diff(np.asarray(ell_edges)) > 0):
        raise ValueError("ell_edges must be strictly increasing")
    return ell_edges


# ------------------------------------------------------------------------------------------------
# Estimator


def cl_estimate(maps, field_deg: float, ell_edges):
    """Binned flat-sky auto and cross power spectra of square maps from their FFTs.

    kappa_ell = FFT2(map) A_pix and C_ij(ell bin) = mean over modes in the bin of
    Re(kappa_ell,i kappa_ell,j^*) / A_field. Both ell and -ell are counted (the full FFT plane), so
    n_modes is about twice the number of independent complex modes. Pure jnp: jit-able with
    field_deg static (NaN checks are skipped for traced maps).

    Args:
      maps: (n_bins, npix, npix) real maps (e.g. convergence), finite.
      field_deg: side of the square field in degrees (> 0).
      ell_edges: (n_ell_bins + 1,) increasing bin edges; a mode is in bin b if
        ell_edges[b] <= |ell| < ell_edges[b + 1].
    Returns: (cl (n_pairs, n_ell_bins) float64 in steradians, pairs as in ``pair_indices``;
      ell_mean (n_ell_bins,) mean |ell| of the modes in each bin; n_modes (n_ell_bins,) int32).
      Empty bins give NaN cl and ell_mean.
    """
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (n_bins, npix, npix), got shape {maps.shape}")
    if maps.shape[1] != maps.shape[2]:
        raise ValueError(f"maps must be square, (n_bins, npix, npix), got shape {maps.shape}")
    if is_concrete(maps) and not bool(jnp.all(jnp.isfinite(maps))):
        raise ValueError("maps contain NaN or inf")
    ell_edges = _check_edges(ell_edges)
    npix = maps.shape[1]
    field = _field_rad(field_deg)
    a_pix = (field / npix) ** 2
    kl = jnp.fft.fft2(maps.astype(jnp.float64)) * a_pix
    i, j = pair_indices(maps.shape[0])
    power = jnp.real(kl[i] * jnp.conj(kl[j])) / field**2  # (n_pairs, npix, npix)
    return _bin_modes(power, jnp.asarray(mode_ell(field_deg, npix)), ell_edges)


# ------------------------------------------------------------------------------------------------
# Model spectra on the Fourier grid


def _model_on_modes(cl_fn_or_table, ell_grid: np.ndarray, n_pairs_expected: int | None = None):
    """(n_pairs, npix, npix) model C_ell at each mode's |ell| (0 at ell = 0).

    cl_fn_or_table: a callable ell (n,) -> (n_pairs, n), or a table (ell_table (n_l,) > 0
    increasing, cl_pairs (n_pairs, n_l)) interpolated linearly in ln ell. The table must cover all
    non-zero modes: extrapolating silently would give wrong power.
    """
    flat = ell_grid.reshape(-1)
    nonzero = flat > 0
    safe = np.where(nonzero, flat, flat[nonzero].min())  # any valid ell; zeroed below
    if callable(cl_fn_or_table):
        cl = jnp.asarray(cl_fn_or_table(jnp.asarray(safe)), jnp.float64)
        if cl.ndim != 2 or cl.shape[1] != flat.size:
            raise ValueError(f"cl function must return (n_pairs, n_ell), got shape {cl.shape}")
    else:
        try:
            ell_t, cl_t = cl_fn_or_table
        except (TypeError, ValueError) as e:
            raise ValueError("cl_fn_or_table must be a callable or a tuple (ell_table, cl_pairs)") from e
        ell_t = jnp.asarray(ell_t, jnp.float64)
        cl_t = jnp.atleast_2d(jnp.asarray(cl_t, jnp.float64))
        if ell_t.ndim != 1 or ell_t.shape[0] < 2 or cl_t.shape[1:] != ell_t.shape:
            raise ValueError(
                f"need ell_table (n_l,) with n_l >= 2 and cl_pairs (n_pairs, n_l), got "
                f"{ell_t.shape} and {cl_t.shape}")
        if is_concrete(ell_t):
            e = np.asarray(ell_t)
            if not (np.all(e > 0) and np.all(np.diff(e) > 0)):
                raise ValueError("ell_table must be > 0 and strictly increasing")
            lo, hi = safe.min(), safe.max()
            if e[0] > lo * (1 + 1e-12) or e[-1] < hi * (1 - 1e-12):
                raise ValueError(
                    f"ell_table covers [{e[0]:.4g}, {e[-1]:.4g}] but the map modes span "
                    f"[{lo:.4g}, {hi:.4g}]")
        x = jnp.log(jnp.asarray(safe))
        cl = jax.vmap(lambda c: jnp.interp(x, jnp.log(ell_t), c))(cl_t)
    if n_pairs_expected is not None and cl.shape[0] != n_pairs_expected:
        raise ValueError(f"expected {n_pairs_expected} spectra (pairs of bins), got {cl.shape[0]}")
    cl = jnp.where(jnp.asarray(nonzero)[None, :], cl, 0.0)
    return cl.reshape((cl.shape[0],) + ell_grid.shape)


def binned_model_cl(cl_fn_or_table, field_deg: float, npix: int, ell_edges):
    """Model C_ell averaged over the same FFT modes that ``cl_estimate`` uses for each bin.

    Args: cl_fn_or_table as in ``gaussian_maps``; field_deg, npix: the map geometry; ell_edges as in
      ``cl_estimate``.
    Returns: (cl (n_pairs, n_ell_bins), ell_mean (n_ell_bins,), n_modes (n_ell_bins,)).
    """
    ell_grid = mode_ell(field_deg, npix)
    model = _model_on_modes(cl_fn_or_table, ell_grid)
    return _bin_modes(model, jnp.asarray(ell_grid), _check_edges(ell_edges))


# ------------------------------------------------------------------------------------------------
# Map generation


def gaussian_maps(key, cl_fn_or_table, field_deg: float, npix: int, n_bins: int) -> Array:
    """Gaussian random maps with the given auto and cross power spectra, consistent with ``cl_estimate``.

    Real-space unit white noise w_i (one field per bin) is Fourier transformed, each mode is
    multiplied by the Cholesky factor L(|ell|) of the n_bins x n_bins matrix C_ij(|ell|) and by
    1/sqrt(A_pix), and transformed back. L depends on |ell| only, so the product stays Hermitian and
    the inverse FFT is real; <|FFT2 w|^2> = npix^2 gives <kappa_i kappa_j^*> = A_field C_ij. The
    ell = 0 mode (map mean) is set to zero.

    Args:
      key: jax PRNG key.
      cl_fn_or_table: callable ell (n,) -> (n_pairs, n) C_ell, or a table (ell_table (n_l,),
        cl_pairs (n_pairs, n_l)) interpolated linearly in ln ell; the table must span all non-zero
        modes, 2 pi / field_rad .. sqrt(2) pi npix / field_rad. Pairs ordered as ``pair_indices``.
      field_deg: side of the square field in degrees (> 0).
      npix: pixels per side (static).
      n_bins: number of tomographic bins (static).
    Returns: (n_bins, npix, npix) float64 maps.
    Raises ValueError for bad geometry, a table not covering the modes, a wrong number of spectra,
    or (when concrete) a C(ell) matrix that is not positive definite.
    """
    white = jax.random.normal(key, (n_bins, npix, npix), jnp.float64)
    return gaussian_maps_from_white(white, cl_fn_or_table, field_deg, npix)


def gaussian_maps_from_white(white, cl_fn_or_table, field_deg: float, npix: int) -> Array:
    """``gaussian_maps`` driven by a given white-noise field (the latent of field-level inference).

    Args: white: (n_bins, npix, npix) unit white noise; the rest as in ``gaussian_maps``.
    Returns: (n_bins, npix, npix) float64 maps, linear in ``white`` and differentiable in the C_ell.
    """
    white = jnp.asarray(white, jnp.float64)
    if white.ndim != 3 or white.shape[1:] != (npix, npix):
        raise ValueError(f"white noise must have shape (n_bins, {npix}, {npix}), got {white.shape}")
    i, _ = pair_indices(white.shape[0])
    ell_grid = mode_ell(field_deg, npix)
    model = _model_on_modes(cl_fn_or_table, ell_grid, n_pairs_expected=len(i))  # (n_pairs, N, N)
    return _colour_white(white, model, field_deg, npix)


def _pair_matrix(model):
    """(n_pairs, N, N) pair spectra -> (N, N, n_bins, n_bins) symmetric matrices."""
    n_bins = _n_bins_from_pairs(model.shape[0])
    i, j = pair_indices(n_bins)
    cmat = jnp.zeros(model.shape[1:] + (n_bins, n_bins), jnp.float64)
    cmat = cmat.at[:, :, i, j].set(jnp.moveaxis(model, 0, -1))
    return cmat.at[:, :, j, i].set(jnp.moveaxis(model, 0, -1))


def _clip_modes(model, ell_grid):
    """Per-mode spectra (n_pairs, N, N) with negative eigenvalues of each n_bins x n_bins C(mode)
    raised to a tiny positive floor (1e-12 of that mode's largest |eigenvalue|), for spectra that
    are only approximately positive definite (e.g. the lognormal C^g from an FFT of ln(1 + xi)).
    The ell = 0 mode is set to 0."""
    n_bins = _n_bins_from_pairs(model.shape[0])
    i, j = pair_indices(n_bins)
    zero = jnp.asarray(ell_grid == 0)[:, :, None, None]
    # ell = 0 gets a non-degenerate stand-in so that the eigh derivative stays finite.
    cmat = jnp.where(zero, jnp.diag(jnp.arange(1.0, n_bins + 1.0)), _pair_matrix(model))
    w, v = jnp.linalg.eigh(cmat)
    w = jnp.maximum(w, 1e-12 * jnp.max(jnp.abs(w), axis=-1, keepdims=True))
    cmat = jnp.where(zero, 0.0, jnp.einsum("...ak,...k,...bk->...ab", v, w, v))
    return jnp.moveaxis(cmat[:, :, i, j], -1, 0)


def _colour_white(white, model, field_deg: float, npix: int) -> Array:
    """Colour white noise (n_bins, N, N) with per-mode spectra ``model`` (n_pairs, N, N) on the FFT
    grid (even under ell -> -ell, so the maps stay real): each mode is multiplied by the Cholesky
    factor of C_ij(mode) and by 1/sqrt(A_pix); the ell = 0 mode is dropped."""
    n_bins = white.shape[0]
    ell_grid = mode_ell(field_deg, npix)
    cmat = _pair_matrix(model)
    zero = jnp.asarray(ell_grid == 0)[:, :, None, None]
    # The ell = 0 matrix is all zero, which Cholesky can't factor: use the identity, then drop it.
    chol = jnp.linalg.cholesky(jnp.where(zero, jnp.eye(n_bins), cmat))
    chol = jnp.where(zero, 0.0, chol)
    if is_concrete(chol) and not bool(jnp.all(jnp.isfinite(chol))):
        bad = np.argwhere(~np.all(np.isfinite(np.asarray(chol)), axis=(-2, -1)))[0]
        raise ValueError(f"C(ell) matrix is not positive definite at ell = {ell_grid[tuple(bad)]:.4g}")
    a_pix = pixel_area_sr(field_deg, npix)
    wk = jnp.fft.fft2(white)
    kk = jnp.einsum("xyab,bxy->axy", chol, wk) / math.sqrt(a_pix)
    return jnp.real(jnp.fft.ifft2(kk))


# ------------------------------------------------------------------------------------------------
# Shape noise


def shape_noise_maps(key, sigma_n, shape) -> Array:
    """Independent Gaussian pixel noise with rms sigma_n per bin.

    Args: key: jax PRNG key; sigma_n: per-pixel rms, scalar or (n_bins,) (e.g.
      ``sources.shape_noise_sigma``); shape: (n_bins, npix, npix).
    Returns: float64 array of the given shape.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (n_bins, npix, npix), got {shape}")
    sigma = jnp.asarray(sigma_n, jnp.float64)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != shape[0]):
        raise ValueError(f"sigma_n must be a scalar or ({shape[0]},), got shape {sigma.shape}")
    if is_concrete(sigma) and not np.all(np.asarray(sigma) >= 0):
        raise ValueError(f"sigma_n must be >= 0, got {sigma_n}")
    sigma = jnp.broadcast_to(sigma, (shape[0],))
    return jax.random.normal(key, shape, jnp.float64) * sigma[:, None, None]


def noise_cl(sigma_n, pixel_area_sr):
    """Flat power spectrum of white pixel noise, sigma_n^2 A_pix (steradians).

    Args: sigma_n: per-pixel rms (scalar or array); pixel_area_sr: pixel solid angle in steradians.
    Returns: same (broadcast) shape as sigma_n.
    """
    return jnp.asarray(sigma_n, jnp.float64) ** 2 * pixel_area_sr
