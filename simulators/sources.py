"""Weak-lensing source sample (tomographic n(z), shape noise) and the Born lensing kernel.

Units: redshift dimensionless, comoving distances in Mpc/h, lensing kernels in h/Mpc (so that
kappa = int q(chi) delta(chi) dchi is dimensionless), galaxy densities in gal/arcmin^2, areas in
arcmin^2. Redshift tables are float64 numpy arrays (JAX needs float64 on: ``simulators.enable_x64()``).

Born approximation (flat sky, flat universe):
  kappa_i(theta) = int_0^inf dchi q_i(chi) delta(chi theta, chi),
  q_i(chi) = (3/2) Omega_m (H0/c)^2 chi / a(chi) int_chi^inf dchi_s n_i(chi_s) (chi_s - chi) / chi_s.
The inner integral is done in redshift, n(z) dz = n(chi) dchi, so n_i never needs re-gridding in chi.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammainc, ndtr

from .cosmology import C_OVER_H0, Background, Cosmology, background

Array = jax.Array

H0_OVER_C = 1.0 / C_OVER_H0  # h/Mpc

# Default redshift table: 0 <= z <= 4 in steps of 0.002. The LSST Y10 Smail n(z) (peak at
# z ~ 0.54) is resolved with ~270 points per unit of its width, so trapezoid normalisation and
# kernel integrals are accurate to well below 1e-5; 0.4% of the (untruncated) galaxies lie beyond
# z = 4 and are dropped, i.e. n(z) is defined as truncated at the end of the table.
Z_MAX_DEFAULT = 4.0
N_Z_DEFAULT = 2001


def _xp(*args):
    """jnp if any argument is a jax array (possibly traced), else numpy (keeps tables float64 numpy)."""
    return jnp if any(isinstance(a, jax.Array) for a in args) else np


def _trapz(y, x, xp=np):
    """Trapezoid integral of y (..., n) over x (n,) along the last axis."""
    return xp.sum(0.5 * (y[..., 1:] + y[..., :-1]) * (x[1:] - x[:-1]), axis=-1)


# ------------------------------------------------------------------------------------------------
# Redshift distributions


def smail_nz(z, z0: float = 0.11, alpha: float = 0.68):
    """Unnormalised Smail et al. redshift distribution n(z) = z^2 exp[-(z/z0)^alpha].

    Args: z: redshifts, any shape (numpy or jax; jax in gives jax out); z0, alpha: shape
      parameters (defaults: LSST DESC SRD Y10 sources).
    Returns: n(z), same shape as z, float64; zero for z <= 0.
    """
    xp = _xp(z, z0, alpha)
    z = xp.asarray(z, dtype=xp.float64)
    zp = xp.maximum(z, 0.0)  # n = 0 below z = 0 (and no NaN from a negative base ** alpha)
    return zp**2 * xp.exp(-((zp / z0) ** alpha))


def smail_cdf(z, z0: float = 0.11, alpha: float = 0.68):
    """Fraction of the untruncated Smail n(z) below z: P(3/alpha, (z/z0)^alpha) (regularised gamma).

    With u = (z/z0)^alpha, z^2 dz = (z0^3/alpha) u^(3/alpha - 1) du. z: any shape; returns float64 numpy.
    """
    z = np.maximum(np.asarray(z, dtype=np.float64), 0.0)
    return np.asarray(gammainc(3.0 / alpha, (z / z0) ** alpha), dtype=np.float64)


def smail_equal_number_edges(n_bins: int = 5, z0: float = 0.11, alpha: float = 0.68,
                             z_max: float = Z_MAX_DEFAULT) -> np.ndarray:
    """Redshift edges splitting the Smail n(z), truncated to [0, z_max], into equal galaxy numbers.

    Uses the exact cumulative distribution (``smail_cdf``), inverted by bisection to ~1e-15 in z.
    Returns: (n_bins + 1,) float64 numpy array, first 0 and last z_max.
    """
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    if not z_max > 0:
        raise ValueError(f"z_max must be > 0, got {z_max}")
    total = smail_cdf(z_max, z0, alpha)
    targets = total * np.arange(1, n_bins) / n_bins
    lo, hi = np.zeros_like(targets), np.full_like(targets, z_max)
    for _ in range(64):  # bisection: the interval halves each step, 4 * 2^-64 is far below 1e-12
        mid = 0.5 * (lo + hi)
        below = smail_cdf(mid, z0, alpha) < targets
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.concatenate([[0.0], 0.5 * (lo + hi), [z_max]])


def photoz_bin_nz(z, nz_true, z_lo, z_hi, sigma_z0: float = 0.05):
    """True-z distribution of galaxies whose Gaussian photo-z lies in [z_lo, z_hi).

    n_i(z) = n(z) int_{z_lo}^{z_hi} dz_ph p(z_ph | z) = n(z) [Phi((z_hi - z)/s) - Phi((z_lo - z)/s)],
    s = sigma_z0 (1 + z). z_lo = -inf / z_hi = +inf give open outer bins. Unnormalised.
    Args: z: (n_z,) redshifts; nz_true: (n_z,) true n(z); z_lo, z_hi: photo-z edges.
    Returns: (n_z,) float64 numpy.
    """
    z = np.asarray(z, dtype=np.float64)
    s = sigma_z0 * (1.0 + z)
    w = np.asarray(ndtr((z_hi - z) / s) - ndtr((z_lo - z) / s), dtype=np.float64)
    return np.asarray(nz_true, dtype=np.float64) * w


# ------------------------------------------------------------------------------------------------
# Source sample


def _concrete(v) -> bool:
    """True for Python/NumPy values, which are validated; jax arrays (tracers, pytree rebuilds) are not."""
    return v is not None and not isinstance(v, jax.Array)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RedshiftBins:
    """Tomographic source sample on a shared redshift table (all fields are pytree leaves).

    Attributes:
      z: (n_z,) redshifts, strictly increasing, >= 0, float64.
      nz: (n_bins, n_z) true-redshift distributions n_i(z), >= 0, each normalised to int n_i dz = 1
        (trapezoid on z, checked to 1e-6).
      n_gal: (n_bins,) effective galaxy density per bin in gal/arcmin^2, > 0.
      sigma_e: shape noise per component (dimensionless), scalar > 0.
      z_edges: optional (n_bins + 1,) photo-z bin edges (informational; None when unknown).
    Python/NumPy inputs are converted to float64 numpy and validated; jax arrays are not validated.
    Build from unnormalised arrays with ``from_arrays``.
    """

    z: np.ndarray
    nz: np.ndarray
    n_gal: np.ndarray
    sigma_e: float
    z_edges: np.ndarray | None = None

    def __post_init__(self):
        leaves = (self.z, self.nz, self.n_gal, self.sigma_e)
        if not all(_concrete(v) for v in leaves):
            return
        for name in ("z", "nz", "n_gal", "sigma_e"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.isfinite(v)):
                raise ValueError(f"RedshiftBins.{name} must be finite")
            object.__setattr__(self, name, v)
        z, nz, n_gal = self.z, self.nz, self.n_gal
        if z.ndim != 1 or z.size < 2:
            raise ValueError(f"RedshiftBins.z must be 1-D with >= 2 points, got shape {z.shape}")
        if np.any(np.diff(z) <= 0):
            raise ValueError("RedshiftBins.z must be strictly increasing")
        if z[0] < 0:
            raise ValueError(f"RedshiftBins.z must be >= 0, got z[0] = {z[0]}")
        if nz.ndim != 2 or nz.shape[1] != z.size or nz.shape[0] < 1:
            raise ValueError(f"RedshiftBins.nz must have shape (n_bins, {z.size}), got {nz.shape}")
        if np.any(nz < 0):
            raise ValueError("RedshiftBins.nz must be >= 0")
        norms = _trapz(nz, z)
        if not np.allclose(norms, 1.0, rtol=0, atol=1e-6):
            raise ValueError(f"RedshiftBins.nz must integrate to 1 over z (use from_arrays), got {norms}")
        if n_gal.shape != (nz.shape[0],) or np.any(n_gal <= 0):
            raise ValueError(f"RedshiftBins.n_gal must be ({nz.shape[0]},) positive values, got {n_gal}")
        if self.sigma_e.ndim != 0 or self.sigma_e <= 0:
            raise ValueError(f"RedshiftBins.sigma_e must be a scalar > 0, got {self.sigma_e}")
        if _concrete(self.z_edges):
            e = np.asarray(self.z_edges, dtype=np.float64)
            if e.shape != (nz.shape[0] + 1,) or np.any(np.diff(e) <= 0):
                raise ValueError(f"RedshiftBins.z_edges must be ({nz.shape[0] + 1},) increasing, got {e}")
            object.__setattr__(self, "z_edges", e)

    @property
    def n_bins(self) -> int:
        return self.nz.shape[0]

    @property
    def n_gal_total(self):
        """Total galaxy density over all bins, gal/arcmin^2."""
        return self.n_gal.sum()

    @property
    def mean_z(self):
        """(n_bins,) mean true redshift of each bin."""
        return _trapz(self.nz * self.z, self.z, _xp(self.z, self.nz))

    @classmethod
    def from_arrays(cls, z, nz, n_gal, sigma_e: float, z_edges=None) -> RedshiftBins:
        """Bins from unnormalised n_i(z): z (n_z,), nz (n_bins, n_z) or (n_z,), n_gal scalar (same for
        every bin) or (n_bins,) in gal/arcmin^2. Each n_i is normalised to int n_i dz = 1."""
        z = np.asarray(z, dtype=np.float64)
        nz = np.atleast_2d(np.asarray(nz, dtype=np.float64))
        if nz.ndim != 2 or nz.shape[-1] != z.shape[-1]:
            raise ValueError(f"nz must have shape (n_bins, {z.shape[-1]}), got {nz.shape}")
        norms = _trapz(nz, z)
        if not np.all(np.isfinite(norms) & (norms > 0)):
            raise ValueError(f"each n_i(z) must have a positive finite integral, got {norms}")
        n_gal = np.broadcast_to(np.asarray(n_gal, dtype=np.float64), (nz.shape[0],)).copy()
        return cls(z=z, nz=nz / norms[:, None], n_gal=n_gal, sigma_e=sigma_e, z_edges=z_edges)

    @classmethod
    def lsst_y10(cls, n_bins: int = 5, z0: float = 0.11, alpha: float = 0.68, sigma_z0: float = 0.05,
                 n_gal_total: float = 27.0, sigma_e: float = 0.26, z=None) -> RedshiftBins:
        """LSST DESC SRD Y10 sources: Smail n(z) (z0 = 0.11, alpha = 0.68) cut into n_bins with equal
        galaxy numbers in true z (edges from the exact cumulative of n(z) truncated at z[-1]), each
        bin broadened by a Gaussian photo-z error sigma_z = sigma_z0 (1 + z):
          n_i(z) = n(z) [Phi((z_hi - z)/sigma_z) - Phi((z_lo - z)/sigma_z)],
        with the outer bins open (z_lo = -inf for the first, z_hi = +inf for the last) so that every
        galaxy lands in exactly one bin. n_gal = n_gal_total / n_bins per bin (27 -> 5.4 gal/arcmin^2),
        sigma_e = 0.26. z: optional (n_z,) table (default 0..4 with 2001 points).
        """
        z = np.linspace(0.0, Z_MAX_DEFAULT, N_Z_DEFAULT) if z is None else np.asarray(z, np.float64)
        edges = smail_equal_number_edges(n_bins, z0, alpha, z_max=float(z[-1]))
        lo = np.concatenate([[-np.inf], edges[1:-1]])
        hi = np.concatenate([edges[1:-1], [np.inf]])
        n_true = smail_nz(z, z0, alpha)
        nz = np.stack([photoz_bin_nz(z, n_true, lo[i], hi[i], sigma_z0) for i in range(n_bins)])
        return cls.from_arrays(z, nz, n_gal_total / n_bins, sigma_e, z_edges=edges)

    @classmethod
    def from_files(cls, paths, n_gal_per_bin, sigma_e: float) -> RedshiftBins:
        """Bins from one two-column text file (z, n(z)) per bin (``np.loadtxt`` format, '#' comments).

        z must be strictly increasing and >= 0, n finite and >= 0 with a positive integral. Files with
        different z columns are interpolated linearly onto the sorted union of all z values (n = 0
        outside a file's range). n_gal_per_bin: scalar or (n_bins,) in gal/arcmin^2.
        Raises FileNotFoundError / ValueError naming the file and the problem.
        """
        paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not paths:
            raise ValueError("from_files needs at least one file")
        tables = [_read_nz_file(p) for p in paths]
        z_all = tables[0][0]
        if not all(t[0].shape == z_all.shape and np.array_equal(t[0], z_all) for t in tables):
            z_all = np.unique(np.concatenate([t[0] for t in tables]))
        nz = np.stack([np.interp(z_all, zf, nf, left=0.0, right=0.0) for zf, nf in tables])
        n_gal = np.asarray(n_gal_per_bin, dtype=np.float64)
        if n_gal.ndim != 0 and n_gal.shape != (len(paths),):
            raise ValueError(f"n_gal_per_bin must be a scalar or have {len(paths)} entries, got {n_gal.shape}")
        return cls.from_arrays(z_all, nz, n_gal, sigma_e)


def _read_nz_file(path: str):
    """(z, n) float64 arrays from a two-column text file, validated; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"n(z) file not found: {path}")
    try:
        data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: cannot parse as numbers ({e})") from e
    if data.shape[1] != 2:
        raise ValueError(f"{path}: expected 2 columns (z, n), got {data.shape[1]}")
    if data.shape[0] < 2:
        raise ValueError(f"{path}: need at least 2 rows, got {data.shape[0]}")
    z, n = data[:, 0], data[:, 1]
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: contains NaN or inf")
    if np.any(np.diff(z) <= 0):
        raise ValueError(f"{path}: z column must be strictly increasing")
    if z[0] < 0:
        raise ValueError(f"{path}: z must be >= 0, got {z[0]}")
    if np.any(n < 0):
        raise ValueError(f"{path}: n(z) must be >= 0 (negative at z = {z[n < 0][0]})")
    if not _trapz(n, z) > 0:
        raise ValueError(f"{path}: n(z) integrates to zero")
    return z, n


# ------------------------------------------------------------------------------------------------
# Noise


def shape_noise_sigma(sigma_e, n_gal_arcmin2, pixel_area_arcmin2):
    """Per-pixel shape-noise rms of the shear/convergence, sigma_e / sqrt(n_gal A_pix).

    Args: sigma_e: per-component ellipticity dispersion; n_gal_arcmin2: galaxy density in
      gal/arcmin^2; pixel_area_arcmin2: pixel solid angle in arcmin^2 (scalars or broadcastable arrays).
    Returns: dimensionless rms, broadcast shape.
    """
    xp = _xp(sigma_e, n_gal_arcmin2, pixel_area_arcmin2)
    return sigma_e / xp.sqrt(xp.asarray(n_gal_arcmin2) * xp.asarray(pixel_area_arcmin2))


def pixel_area_arcmin2(field_deg: float, n_pix: int) -> float:
    """Area in arcmin^2 of one pixel of a square field_deg x field_deg map with n_pix^2 pixels."""
    return (60.0 * field_deg / n_pix) ** 2


# ------------------------------------------------------------------------------------------------
# Born lensing kernels


def _prefactor(cosmo: Cosmology):
    return 1.5 * jnp.asarray(cosmo.Omega_m, jnp.float64) * H0_OVER_C**2  # (h/Mpc)^2


def lensing_kernel_single(cosmo: Cosmology, chi, chi_s, bg: Background | None = None) -> Array:
    """Born kernel of a single source plane at comoving distance chi_s [Mpc/h]:
    q(chi) = (3/2) Omega_m (H0/c)^2 chi / a(chi) (1 - chi/chi_s) for chi < chi_s, 0 beyond.

    Args: cosmo; chi: comoving distances [Mpc/h], any shape; chi_s: scalar or broadcastable;
      bg: optional precomputed ``background(cosmo)``.
    Returns: q in h/Mpc, broadcast shape, float64. jit/grad-safe.
    """
    bg = background(cosmo) if bg is None else bg
    chi = jnp.asarray(chi, jnp.float64)
    chi_s = jnp.asarray(chi_s, jnp.float64)
    return _prefactor(cosmo) * chi / bg.a_of_chi(chi) * jnp.maximum(1.0 - chi / chi_s, 0.0)


def lensing_efficiency(cosmo: Cosmology, bins: RedshiftBins, chi, bg: Background | None = None) -> Array:
    """Born lensing efficiency of each tomographic bin.

    q_i(chi) = (3/2) Omega_m (H0/c)^2 chi/a(chi) int dz n_i(z) max(0, 1 - chi/chi(z)),
    i.e. the chi_s integral written in redshift (n(z) dz = n(chi) dchi), trapezoid on bins.z.
    Args: cosmo (may be traced); bins: RedshiftBins (may be traced); chi: (n_chi,) comoving
      distances [Mpc/h]; bg: optional precomputed ``background(cosmo)`` (must reach z = bins.z[-1]).
    Returns: (n_bins, n_chi) float64 in h/Mpc. jit-able, differentiable w.r.t. cosmo and n_i.
    """
    bg = background(cosmo) if bg is None else bg
    z = jnp.asarray(bins.z, jnp.float64)
    nz = jnp.asarray(bins.nz, jnp.float64)
    chi = jnp.atleast_1d(jnp.asarray(chi, jnp.float64))
    chi_z = bg.comoving_distance(1.0 / (1.0 + z))  # (n_z,), increasing with z
    # chi(z = 0) = 0: the source can't be behind any lens, weight 0; safe denominator for grad.
    pos = chi_z > 0
    # trapezoid weights on the (possibly non-uniform) z table
    dz = z[1:] - z[:-1]
    tw = 0.5 * (jnp.concatenate([dz, jnp.zeros(1)]) + jnp.concatenate([jnp.zeros(1), dz]))
    c = jnp.where(pos, nz * tw, 0.0)  # (n_bins, n_z)
    inv = 1.0 / jnp.where(pos, chi_z, 1.0)  # multiplies c, which is 0 where not pos
    # sum_j c_j max(0, 1 - chi/chi_j) = A(chi) - chi B(chi), A and B the sums of c_j and c_j/chi_j
    # over the sources behind chi: tail sums (accumulated from the far end, so no cancellation of
    # a total) read at the first chi_j > chi. O(n_z + n_chi) instead of an (n_chi, n_z) product;
    # where chi crosses a chi_j the dropped term is 0, so the gradient is that of the product.
    def tail(x):
        return jnp.concatenate([jnp.cumsum(x[:, ::-1], axis=1)[:, ::-1],
                                jnp.zeros((x.shape[0], 1))], axis=1)

    first = jnp.searchsorted(chi_z, chi, side="right")  # (n_chi,) in [0, n_z]
    g = tail(c)[:, first] - chi[None, :] * tail(c * inv)[:, first]  # (n_bins, n_chi)
    return _prefactor(cosmo) * (chi / bg.a_of_chi(chi))[None, :] * g
