"""Power-spectrum (C_ℓ) baseline: analytic likelihood of binned tomographic C_ℓ, sampled with NUTS.

The classic two-point analysis that field-level and simulation-based inference are compared with.

Data vector
  The binned auto and cross spectra (all pairs i <= j, ordered as ``flatsky.pair_indices``) of the
  noisy κ maps, from ``flatsky.cl_estimate``, flattened pair-major: entry p * n_ell + b is pair p,
  ℓ bin b (``data_vector_layout`` / ``data_vector_names``). Length k = n_pairs * n_ell.

Likelihood
  mean(θ) = binned Limber theory (halofit) averaged over exactly the FFT modes the estimator uses
  in each bin (``flatsky.binned_model_cl``), plus the white shape-noise power σ_n,i² A_pix on the
  auto spectra. An optional ``power_filter`` (e.g. ``lensing.mesh_power_window(cell)``) multiplies
  P(k) for data from the PM simulator. The covariance is fixed (fiducial): either the analytic
  Gaussian covariance (``gaussian_covariance``: exact for Gaussian maps, no sampling noise; it
  omits the non-Gaussian terms of PM maps), used as N(d | mean(θ), C) with ``n_cov = None``, or
  estimated from n_cov simulations (``fiducial_data_vectors``, ``estimate_covariance``):
    - "gaussian": N(d | mean(θ), S / h), the Hartlap et al. (2007) debiased precision
      h S⁻¹ with h = (n_cov - k - 2) / (n_cov - 1);
    - "sellentin_heavens": the Sellentin & Heavens (2016) marginal over the unknown true
      covariance, p(d | θ, S) = c̄ |S|^(-1/2) [1 + χ² / (n_cov - 1)]^(-n_cov / 2),
      χ² = (d - μ)ᵀ S⁻¹ (d - μ), c̄ = Γ(n/2) / [(π (n-1))^(k/2) Γ((n-k)/2)]. This is exactly a
      multivariate Student-t with ν = n_cov - k degrees of freedom and scale matrix
      S (n_cov - 1) / (n_cov - k), which is how it is evaluated (numpyro ``MultivariateStudentT``).
    - "wishart" (analytic covariance only): the exact likelihood of the band powers of a Gaussian
      field with white noise when the spectra are constant inside each ℓ bin. Bin b's estimate
      Ĉ_b (n_bins × n_bins, the data's entries of bin b) averages Re(κ_ℓ κ_ℓ^†) over its n_b FFT
      modes, ℓ and −ℓ both counted; a complex mode pair holds two independent real Gaussian
      vectors of covariance M_b = mean_b(θ) and a self-conjugate mode one, so n_b Ĉ_b ~
      Wishart(M_b, ν = n_b) exactly, bins independent:
        ln p = Σ_b −(ν/2)[tr(M_b⁻¹ Ĉ_b) + ln det M_b] + ((ν − p − 1)/2) ln det(ν Ĉ_b)
               − (ν p / 2) ln 2 − ln Γ_p(ν/2) + (p(p + 1)/2) ln ν,
      p the bins kept in ℓ bin b (scale cuts keep whole blocks), the last term the Jacobian from
      ν Ĉ_b to the data's entries. Its covariance depends on θ, so it keeps the information the
      fixed-covariance Gaussian loses where the posterior lies away from [cosmology]; with one
      distinct |ℓ| per bin it is ``explicit.exact``'s likelihood up to a constant.
      ``cov`` (the analytic Gaussian covariance, its local Gaussian approximation at the
      fiducial) only sets NUTS's initial mass matrix (``fisher``).
  S is the unbiased sample covariance (ddof = 1). The Gaussian and Student-t are built from a
  Cholesky factor only (numpyro >= 0.15 accepts exactly one of covariance / precision / scale_tril).

Sampling
  ``ClLikelihood.model(data)`` is a numpyro model (θ from ``prior.sample_sites()``, the cosmology
  from ``prior.cosmology(θ, base)``); ``sample_cl_posterior`` runs NUTS on it and reports
  divergences, ESS, r̂, wall time and the number of gradient evaluations.

Units: ℓ dimensionless, C_ℓ in steradians. Everything here needs float64 (``simulators`` enables it).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from simulators import flatsky
from simulators.cosmology import Cosmology
from simulators.lensing import add_shape_noise, noise_sigma
from simulators.sources import RedshiftBins

__all__ = [
    "ClLikelihood", "CovarianceEstimate", "LIKELIHOODS", "cl_data_vector", "cl_likelihood_for_model",
    "data_vector_layout", "data_vector_names", "estimate_covariance", "fiducial_data_vectors",
    "analytic_covariance", "gaussian_covariance", "hartlap_factor", "sample_cl_posterior", "scale_cut_keep",
    "sellentin_heavens_scale",
]

LIKELIHOODS = ("gaussian", "sellentin_heavens", "wishart")


# ------------------------------------------------------------------------------------------------
# Data vector


def cl_data_vector(maps, field_deg: float, ell_edges) -> jax.Array:
    """Flattened binned tomographic C_ℓ of one map set or a batch of them.

    Args:
      maps: (n_bins, npix, npix) or (n, n_bins, npix, npix) real maps (noisy κ).
      field_deg: side of the square field in degrees (static under jit).
      ell_edges: (n_ell + 1,) increasing ℓ bin edges (``flatsky.cl_estimate`` convention).
    Returns: (n_pairs * n_ell,) or (n, n_pairs * n_ell) float64, entry p * n_ell + b = pair p
      (``flatsky.pair_indices`` order), ℓ bin b. jit- and vmap-friendly.
    """
    maps = jnp.asarray(maps)
    if maps.ndim == 3:
        cl, _, _ = flatsky.cl_estimate(maps, field_deg, ell_edges)
        return cl.reshape(-1)
    if maps.ndim == 4:
        return jax.vmap(lambda m: cl_data_vector(m, field_deg, ell_edges))(maps)
    raise ValueError(f"maps must have shape (n_bins, npix, npix) or (n, n_bins, npix, npix), "
                     f"got {maps.shape}")


def data_vector_layout(n_bins: int, n_ell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin i, bin j, ℓ bin b) of each data-vector entry, three (n_pairs * n_ell,) int arrays."""
    if not (isinstance(n_ell, (int, np.integer)) and n_ell >= 1):
        raise ValueError(f"n_ell must be a positive integer, got {n_ell}")
    i, j = flatsky.pair_indices(n_bins)
    return (np.repeat(i, n_ell), np.repeat(j, n_ell), np.tile(np.arange(n_ell), len(i)))


def data_vector_names(n_bins: int, n_ell: int) -> tuple[str, ...]:
    """Labels "C_i,j[b]" of the data-vector entries, in data-vector order."""
    return tuple(f"C_{a},{b}[{e}]" for a, b, e in zip(*data_vector_layout(n_bins, n_ell)))


# ------------------------------------------------------------------------------------------------
# Covariance


def _check_n_sims(n_sims: int, n_data: int):
    if not (isinstance(n_data, (int, np.integer)) and n_data >= 1):
        raise ValueError(f"n_data must be a positive integer, got {n_data}")
    if not (isinstance(n_sims, (int, np.integer)) and n_sims > n_data + 2):
        raise ValueError(
            f"covariance from {n_sims} simulations of a {n_data}-entry data vector: need "
            f"n_sims > n_data + 2 = {n_data + 2} for an invertible covariance with a positive "
            f"Hartlap factor (and many more for a precise one)")


def hartlap_factor(n_sims: int, n_data: int) -> float:
    """Hartlap et al. (2007) debiasing factor (n_sims - n_data - 2) / (n_sims - 1) of the inverse
    sample covariance. Raises ValueError (naming both numbers) when n_sims <= n_data + 2."""
    _check_n_sims(n_sims, n_data)
    return (n_sims - n_data - 2) / (n_sims - 1)


@dataclass(frozen=True, eq=False)
class CovarianceEstimate:
    """Sample covariance of n_sims simulated data vectors (host numpy, float64).

    Attributes: mean (k,); cov (k, k) unbiased sample covariance S (ddof = 1); n_sims; hartlap:
    (n_sims - k - 2) / (n_sims - 1).
    """

    mean: np.ndarray
    cov: np.ndarray
    n_sims: int
    hartlap: float

    @property
    def n_data(self) -> int:
        return self.cov.shape[0]

    @property
    def precision(self) -> np.ndarray:
        """Hartlap-debiased precision h S⁻¹ (k, k)."""
        return self.hartlap * np.linalg.inv(self.cov)

    @property
    def debiased_cov(self) -> np.ndarray:
        """S / h, the covariance whose inverse is the debiased precision."""
        return self.cov / self.hartlap


def estimate_covariance(data_vectors) -> CovarianceEstimate:
    """Sample mean and covariance of simulated data vectors (n_sims, k), plus the Hartlap factor.

    Raises ValueError when n_sims <= k + 2 (naming both), when the vectors are not finite, or when
    the sample covariance is not positive definite.
    """
    x = np.asarray(data_vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"data_vectors must have shape (n_sims, n_data), got {x.shape}")
    n, k = x.shape
    h = hartlap_factor(n, k)
    if not np.all(np.isfinite(x)):
        raise ValueError("the simulated data vectors contain NaN or inf (an empty ell bin?)")
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False, ddof=1).reshape(k, k)
    cov = 0.5 * (cov + cov.T)
    _cholesky(cov, "the sample covariance")
    return CovarianceEstimate(mean=mean, cov=cov, n_sims=n, hartlap=h)


def _cholesky(cov: np.ndarray, what: str) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError(f"{what} is not positive definite") from None


def sellentin_heavens_scale(cov: np.ndarray, n_sims: int) -> tuple[float, np.ndarray]:
    """(ν, Σ) of the multivariate Student-t that equals the Sellentin & Heavens likelihood:
    ν = n_sims - k, Σ = S (n_sims - 1) / (n_sims - k)."""
    k = cov.shape[0]
    _check_n_sims(n_sims, k)
    nu = float(n_sims - k)
    return nu, np.asarray(cov) * (n_sims - 1) / nu


def _bin_modes_matrix(field_deg: float, npix: int, edges: np.ndarray):
    """The estimator's Fourier modes per bin (flatsky conventions: bin b holds the FFT modes with
    edges[b] <= |ell| < edges[b + 1], both ell and -ell counted): (distinct |ell| (n_u,),
    counts (n_ell, n_u) of modes at each distinct |ell| in each bin)."""
    n_ell = edges.size - 1
    flat = flatsky.mode_ell(field_deg, npix).reshape(-1)
    b = np.searchsorted(edges, flat, side="right") - 1
    used = (b >= 0) & (b < n_ell)
    ell_unique, inverse = np.unique(flat[used], return_inverse=True)
    counts = np.zeros((n_ell, ell_unique.size))
    np.add.at(counts, (b[used], inverse), 1.0)
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"ell bins {empty.tolist()} contain no Fourier mode of a {field_deg} deg / "
                         f"{npix}^2 map (edges {np.round(edges, 1).tolist()}): use fewer or "
                         f"linearly spaced bins")
    return ell_unique, counts


def gaussian_covariance(cl_pairs, counts, noise) -> np.ndarray:
    """Analytic covariance of the binned C_ℓ data vector of Gaussian maps with white shape noise.

    Each FFT mode ℓ of a Gaussian field with spectra C_ab(|ℓ|) (noise included) contributes
    Re(κ_a κ_b*) with Cov[Re(κ_a κ_b*), Re(κ_c κ_d*)] = (C_ac C_bd + C_ad C_bc) / 2 for a complex
    mode, counted twice (ℓ and −ℓ are both in the estimator's mean), and C_ac C_bd + C_ad C_bc for
    the real (self-conjugate) modes, counted once: either way
    Cov[Ĉ_ab(b), Ĉ_cd(b)] = Σ_{ℓ in b} (C_ac C_bd + C_ad C_bc)(ℓ) / n_b², and bins are independent.

    Args:
      cl_pairs: (n_pairs, n_u) signal C_ℓ at the distinct mode |ℓ| (``flatsky.pair_indices`` order).
      counts: (n_ell, n_u) modes per bin at each distinct |ℓ| (``_bin_modes_matrix``).
      noise: (n_bins,) shape-noise power per mode σ_n² A_pix.
    Returns: (k, k) covariance, k = n_pairs * n_ell, ordered as the data vector (pair-major).
    """
    cl_pairs = np.asarray(cl_pairs, np.float64)
    counts = np.asarray(counts, np.float64)
    n_pairs, n_u = cl_pairs.shape
    n_bins = int(round((np.sqrt(8 * n_pairs + 1) - 1) / 2))
    i, j = flatsky.pair_indices(n_bins)
    full = np.zeros((n_bins, n_bins, n_u))
    full[i, j] = cl_pairs
    full[j, i] = cl_pairs
    full[np.arange(n_bins), np.arange(n_bins)] += np.asarray(noise, np.float64)[:, None]
    # (C_ac C_bd + C_ad C_bc) for every pair of pairs p = (a, b), q = (c, d), at each |ℓ|
    prod = (full[i[:, None], i[None, :]] * full[j[:, None], j[None, :]]
            + full[i[:, None], j[None, :]] * full[j[:, None], i[None, :]])  # (n_pairs, n_pairs, n_u)
    n_b = counts.sum(axis=1)
    per_bin = np.einsum("pqu,bu->pqb", prod, counts) / n_b**2  # (n_pairs, n_pairs, n_ell)
    n_ell = counts.shape[0]
    cov = np.zeros((n_pairs, n_ell, n_pairs, n_ell))
    cov[:, np.arange(n_ell), :, np.arange(n_ell)] = per_bin.transpose(2, 0, 1)
    return cov.reshape(n_pairs * n_ell, n_pairs * n_ell)


def analytic_covariance(bins: RedshiftBins, fiducial: Cosmology, field_deg: float, npix: int,
                        ell_edges, sigma_n, *, power_filter=None, n_chi: int = 256,
                        nonlinear: bool = True) -> np.ndarray:
    """``gaussian_covariance`` of the binned C_ℓ of flat-sky maps: Limber C_ℓ at the fiducial
    cosmology (``flatsky.limber_cl`` with these settings) at every distinct mode |ℓ| of the
    estimator, white shape noise of rms ``sigma_n`` (n_bins,) per pixel. (k, k) float64."""
    edges = np.asarray(ell_edges, np.float64)
    ell_unique, counts = _bin_modes_matrix(float(field_deg), int(npix), edges)
    # one compiled call: evaluated eagerly, the Limber/halofit graph compiles op by op (~10 s)
    cl = jax.jit(lambda c, ell: flatsky.limber_cl(c, bins, ell, n_chi=n_chi, nonlinear=nonlinear,
                                                  power_filter=power_filter))(
        fiducial, jnp.asarray(ell_unique))
    noise = (np.broadcast_to(np.asarray(sigma_n, np.float64), (bins.n_bins,)) ** 2
             * flatsky.pixel_area_sr(float(field_deg), int(npix)))
    return gaussian_covariance(np.asarray(cl), counts, noise)


# ------------------------------------------------------------------------------------------------
# Fiducial simulations


def _dv_one(model, field_deg, edges, cosmo, sigma_n, seed):
    key = jax.random.key(seed)
    kappa = model.kappa(cosmo, model.latent(key))
    noisy = add_shape_noise(jax.random.fold_in(key, 1), kappa, sigma_n)
    return cl_data_vector(noisy, field_deg, jnp.asarray(edges))


_dv_batch = jax.jit(jax.vmap(_dv_one, in_axes=(None, None, None, None, None, 0)),
                    static_argnums=(0, 1, 2))


def fiducial_data_vectors(model, cosmo: Cosmology, sigma_n, field_deg: float, ell_edges, n: int,
                          seed: int = 0, batch: int = 16) -> np.ndarray:
    """Data vectors of n noisy realisations of a map model at one cosmology (covariance sims).

    Realisation r uses seed s = seed + r exactly as ``lensing.simulate_maps(model, cosmo, s)`` does:
    latent ``model.latent(jax.random.key(s))``, shape noise of rms sigma_n per bin from the
    independent key ``fold_in(key(s), 1)`` (flat-sky maps: no footprint mask). Realisations are run
    ``batch`` at a time (jit + vmap over seeds; the last batch is padded, so one compilation).

    Args:
      model: any map model with ``latent(key)`` and ``kappa(cosmo, latent)`` (``GaussianLensing``,
        ``LognormalLensing``, ``PMLensing``, ...), hashable (it is static under jit).
      cosmo: the (fiducial) cosmology.
      sigma_n: (n_bins,) per-pixel shape-noise rms (``lensing.noise_sigma``), or a scalar.
      field_deg, ell_edges: as ``cl_data_vector``.
      n: number of realisations (>= 1); seed: first seed; batch: realisations per call.
    Returns: (n, n_pairs * n_ell) float64 numpy array.
    """
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n}")
    if not (isinstance(batch, (int, np.integer)) and batch >= 1):
        raise ValueError(f"batch must be a positive integer, got {batch}")
    batch = int(min(batch, n))
    n_padded = -(-n // batch) * batch
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed and seed + n_padded <= 2**31):
        raise ValueError(f"seed must be an integer with 0 <= seed and seed + n <= 2^31, got {seed}")
    edges = tuple(float(e) for e in np.asarray(ell_edges, np.float64))
    field_deg = float(field_deg)
    n_bins = model.bins.n_bins
    sigma = np.asarray(sigma_n, np.float64)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape != (n_bins,)):
        raise ValueError(f"sigma_n must be a scalar or ({n_bins},), got shape {sigma.shape}")
    sigma_n = jnp.asarray(np.broadcast_to(sigma, (n_bins,)))
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        seeds = np.arange(seed + start, seed + start + batch, dtype=np.int32)  # padded to batch
        dv = _dv_batch(model, field_deg, edges, cosmo, sigma_n, jnp.asarray(seeds))
        out.append(np.asarray(dv)[:m])
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------------------
# Likelihood


@dataclass(frozen=True, eq=False)
class _WishartBlocks:
    """Where the kept data entries sit in the per-ℓ-bin matrices of the Wishart likelihood.

    ell_bin, row, col: (n_data,) int, entry e is element (row, col) = (col, row) of ℓ bin
    ell_bin's (n_bins, n_bins) matrix. dof: (n_ell,) ν (modes per bin); kept: (n_ell,) p (bins
    kept in each ℓ bin, 0 for an ℓ bin without data); const: (n_ell,) the θ- and data-independent
    terms −(ν p / 2) ln 2 − ln Γ_p(ν/2) + (p(p + 1)/2) ln ν + ((ν − p − 1)/2) p ln ν (0 where
    p = 0). Rows and columns of bins not kept are the identity in both matrices.
    """

    n_bins: int
    n_ell: int
    ell_bin: np.ndarray
    row: np.ndarray
    col: np.ndarray
    dof: np.ndarray
    kept: np.ndarray
    const: np.ndarray


def _wishart_blocks(n_bins: int, n_ell: int, selected: np.ndarray, n_modes: np.ndarray
                    ) -> _WishartBlocks:
    """``_WishartBlocks`` of the kept entries ``selected`` (indices into the pair-major data
    vector). Raises ValueError when an ℓ bin keeps an incomplete set of pairs (the Wishart needs
    whole blocks: every pair of its kept bins) or has fewer modes than kept bins (singular)."""
    from scipy.special import multigammaln

    i, j, b = (a[selected] for a in data_vector_layout(n_bins, n_ell))
    dof = np.asarray(n_modes, np.float64)
    kept = np.zeros(n_ell, int)
    const = np.zeros(n_ell)
    for e in range(n_ell):
        bins = np.union1d(i[b == e], j[b == e])
        p = bins.size
        if p == 0:
            continue
        if np.count_nonzero(b == e) != p * (p + 1) // 2:
            raise ValueError(f"the Wishart likelihood needs every pair of the bins kept in an ell "
                             f"bin; ell bin {e} keeps {np.count_nonzero(b == e)} of the "
                             f"{p * (p + 1) // 2} pairs of bins {bins.tolist()}")
        nu = dof[e]
        if nu < p:
            raise ValueError(f"ell bin {e} holds {int(nu)} Fourier modes for {p} tomographic bins: "
                             f"its band-power matrix is singular; use wider ell bins")
        kept[e] = p
        const[e] = (-0.5 * nu * p * np.log(2.0) - multigammaln(0.5 * nu, p)
                    + 0.5 * p * (p + 1) * np.log(nu) + 0.5 * (nu - p - 1) * p * np.log(nu))
    arrays = dict(ell_bin=b, row=i, col=j, dof=dof, kept=kept, const=const)
    for a in arrays.values():
        a.setflags(write=False)
    return _WishartBlocks(n_bins=n_bins, n_ell=n_ell, **arrays)


def _block_matrices(blocks: _WishartBlocks, x) -> jax.Array:
    """(..., n_ell, n_bins, n_bins) symmetric matrices holding the kept entries x (..., n_data),
    the identity in the rows and columns of bins not kept."""
    x = jnp.asarray(x, jnp.float64)
    eye = jnp.broadcast_to(jnp.eye(blocks.n_bins), x.shape[:-1] + (blocks.n_ell, blocks.n_bins,
                                                                    blocks.n_bins))
    b, r, c = (jnp.asarray(a) for a in (blocks.ell_bin, blocks.row, blocks.col))
    return eye.at[..., b, r, c].set(x).at[..., b, c, r].set(x)


def _logdet(chol) -> jax.Array:
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def wishart_log_prob(blocks: _WishartBlocks, mean, data) -> jax.Array:
    """ln p(data | mean) of the "wishart" likelihood (module docstring) for the kept entries:
    mean, data (..., n_data). NaN where a data block is not positive definite."""
    m = _block_matrices(blocks, mean)
    c = _block_matrices(blocks, data)
    chol_m = jnp.linalg.cholesky(m)
    quad = jnp.trace(jax.scipy.linalg.cho_solve((chol_m, True), c), axis1=-2, axis2=-1)
    nu, p = jnp.asarray(blocks.dof), jnp.asarray(blocks.kept)
    # the identity rows add n_bins - p to the trace and nothing to either log-determinant
    per_bin = (-0.5 * nu * (quad - (blocks.n_bins - p) + _logdet(chol_m))
               + 0.5 * (nu - p - 1) * _logdet(jnp.linalg.cholesky(c)) + jnp.asarray(blocks.const))
    return jnp.sum(jnp.where(p > 0, per_bin, 0.0), axis=-1)


@functools.cache
def _band_power_wishart():
    """The numpyro distribution class of the "wishart" likelihood, made once (numpyro registers
    every Distribution subclass as a pytree node; importing numpyro is left to first use)."""
    import numpyro.distributions as dist

    class BandPowerWishart(dist.Distribution):
        """The kept data entries given their mean ``loc`` (..., n_data): ``wishart_log_prob``,
        and draws of ν Gaussian vectors of covariance M_b per ℓ bin averaged into Ĉ_b."""

        support = dist.constraints.real_vector
        pytree_data_fields = ("loc",)
        pytree_aux_fields = ("blocks",)

        def __init__(self, loc, blocks: _WishartBlocks):
            self.loc = jnp.asarray(loc, jnp.float64)
            self.blocks = blocks
            super().__init__(batch_shape=self.loc.shape[:-1], event_shape=self.loc.shape[-1:])

        def log_prob(self, value):
            return wishart_log_prob(self.blocks, self.loc, value)

        def sample(self, key, sample_shape=()):
            blocks = self.blocks
            shape = sample_shape + self.batch_shape
            chol = jnp.linalg.cholesky(_block_matrices(blocks, self.loc))
            rows, cols = jnp.asarray(blocks.row), jnp.asarray(blocks.col)
            out = jnp.zeros(shape + self.event_shape, jnp.float64)
            for e in np.flatnonzero(blocks.kept):
                nu = int(blocks.dof[e])
                u = jax.random.normal(jax.random.fold_in(key, int(e)),
                                      shape + (nu, blocks.n_bins), jnp.float64)
                v = jnp.einsum("...ij,...nj->...ni", chol[..., e, :, :], u)
                chat = jnp.einsum("...ni,...nj->...ij", v, v) / nu
                out = jnp.where(jnp.asarray(blocks.ell_bin == e), chat[..., rows, cols], out)
            return out

    return BandPowerWishart


def _static_array(x) -> np.ndarray:
    a = np.array(x, dtype=np.float64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)  # compared by identity: hashable, usable as a jit-static argument
class ClLikelihood:
    """Analytic likelihood of the binned tomographic C_ℓ data vector (see the module docstring).

    Attributes:
      bins: the tomographic source sample (``RedshiftBins``).
      field_deg, npix: map geometry (square flat-sky field).
      ell_edges: (n_ell + 1,) ℓ bin edges.
      sigma_n: (n_bins,) per-pixel shape-noise rms of the maps (``lensing.noise_sigma``).
      cov: (k, k) covariance of the data vector at the fiducial cosmology: the sample
        covariance S of n_cov simulations, or the analytic one (``gaussian_covariance``).
      n_cov: number of simulations S was estimated from; None for an analytic covariance (no
        Hartlap factor; "gaussian" likelihood only).
      prior: ``experiments.priors.Prior`` over θ; base: ``Cosmology`` supplying the other parameters.
      kind: "gaussian" (Hartlap-debiased), "sellentin_heavens" (t-distribution) or "wishart"
        (the band powers' exact distribution for Gaussian maps; analytic covariance only).
      power_filter: optional k -> factor multiplying P(k) (e.g. ``lensing.mesh_power_window``).
      n_chi, nonlinear: passed to ``flatsky.limber_cl``. The cost of a likelihood gradient grows
        with n_chi (halofit is set up once per χ node): n_chi = 64 is ~3x cheaper than the default
        256 and changes the binned C_ℓ by ~1e-3 relative, well below the sample variance of
        any bin of a small field.
      keep: optional (n_pairs · n_ell,) bool over the flattened data vector (scale cuts,
        ``scale_cut_keep``): only these entries enter the likelihood (their block of ``cov``, the
        Hartlap factor of their number). ``mean`` still returns the whole vector.
    Derived (read-only): n_data (entries kept), n_pairs, n_ell, n_modes, ell_mean, noise_vector, hartlap, df,
    scale_tril (the Cholesky factor the distribution is built from), ell_unique, mode_weights,
    ell_needed and needed_weights (the distinct |ℓ| of the kept ℓ bins and their columns of
    mode_weights: what the likelihood evaluates).
    """

    bins: RedshiftBins
    field_deg: float
    npix: int
    ell_edges: np.ndarray
    sigma_n: np.ndarray
    cov: np.ndarray = field(repr=False)
    n_cov: int | None
    prior: object
    base: Cosmology
    kind: str = "gaussian"
    power_filter: Callable | None = None
    n_chi: int = 256
    nonlinear: bool = True
    keep: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in LIKELIHOODS:
            raise ValueError(f"kind must be one of {LIKELIHOODS}, got {self.kind!r}")
        object.__setattr__(self, "field_deg", float(self.field_deg))
        if not (isinstance(self.npix, (int, np.integer)) and self.npix >= 2):
            raise ValueError(f"npix must be an integer >= 2, got {self.npix}")
        object.__setattr__(self, "npix", int(self.npix))
        edges = _static_array(self.ell_edges)
        if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError(f"ell_edges must be 1-D, increasing, with >= 2 entries, got {edges}")
        object.__setattr__(self, "ell_edges", edges)
        n_bins = self.bins.n_bins
        sigma = _static_array(np.broadcast_to(np.asarray(self.sigma_n, np.float64), (n_bins,)))
        if not np.all(np.isfinite(sigma) & (sigma >= 0)):
            raise ValueError(f"sigma_n must be finite and >= 0, got {self.sigma_n}")
        object.__setattr__(self, "sigma_n", sigma)
        i, j = flatsky.pair_indices(n_bins)
        n_ell = edges.size - 1
        k = len(i) * n_ell
        cov = _static_array(self.cov)
        if cov.shape != (k, k):
            raise ValueError(f"cov must be ({k}, {k}) for {len(i)} spectra x {n_ell} ell bins, "
                             f"got {cov.shape}")
        if not np.all(np.isfinite(cov)):
            raise ValueError("cov contains NaN or inf")
        object.__setattr__(self, "cov", cov)
        sel = np.arange(k)
        if self.keep is not None:
            keep = np.array(self.keep, bool)
            if keep.shape != (k,) or not keep.any():
                raise ValueError(f"keep must be a ({k},) bool array selecting at least one entry")
            sel = np.flatnonzero(keep)
            keep.setflags(write=False)
            object.__setattr__(self, "keep", keep)
        sel.setflags(write=False)
        object.__setattr__(self, "selected", sel)
        n_total, k = k, sel.size
        cov = cov[np.ix_(sel, sel)]
        if self.kind == "wishart" and self.n_cov is not None:
            raise ValueError("the Wishart likelihood is that of Gaussian maps, whose covariance is "
                             "analytic: it takes no simulated covariance (n_cov must be None)")
        if self.n_cov is None:  # an analytic covariance: known, not estimated
            if self.kind == "sellentin_heavens":
                raise ValueError("the Sellentin-Heavens likelihood needs a simulated covariance "
                                 "(n_cov); an analytic covariance has no sampling noise")
            h = 1.0
        else:
            object.__setattr__(self, "n_cov", int(self.n_cov))
            h = hartlap_factor(self.n_cov, k)
        if self.kind in ("gaussian", "wishart"):
            df, tril = None, _cholesky(cov / h, "the covariance")
        else:
            df, scale = sellentin_heavens_scale(cov, self.n_cov)
            tril = _cholesky(scale, "the covariance")
        # The estimator's modes (static numpy): bin b holds the FFT modes with
        # edges[b] <= |ell| < edges[b + 1] (flatsky conventions); its model value is the mean of
        # Limber C(|ell|) over them, i.e. W (n_ell, n_unique) @ C(distinct |ell|).
        if edges[0] <= 0:
            raise ValueError(f"ell_edges[0] must be > 0 (the ell = 0 mode is the map mean), got {edges[0]}")
        ell_unique, counts = _bin_modes_matrix(self.field_deg, self.npix, edges)
        n_modes = counts.sum(axis=1).astype(int)
        weights = counts / n_modes[:, None]
        ell_mean = weights @ ell_unique
        noise = np.zeros((len(i), n_ell))
        a_pix = flatsky.pixel_area_sr(self.field_deg, self.npix)
        noise[i == j] = (sigma**2 * a_pix)[:, None]
        # the distinct |ell| that the kept entries' ell bins average over: the likelihood needs
        # Limber at these only (scale cuts drop the high-ell bins, most of the distinct modes)
        needed = np.flatnonzero(weights[np.unique(sel % n_ell)].any(axis=0))
        derived = dict(
            n_data=k, n_total=n_total, n_pairs=len(i), n_ell=n_ell, hartlap=h, df=df,
            scale_tril=jnp.asarray(tril), n_modes=n_modes, ell_mean=_static_array(ell_mean),
            noise_vector=_static_array(noise.reshape(-1)), ell_unique=_static_array(ell_unique),
            mode_weights=_static_array(weights), ell_needed=_static_array(ell_unique[needed]),
            needed_weights=_static_array(weights[:, needed]))
        if self.kind == "wishart":
            derived["wishart"] = _wishart_blocks(n_bins, n_ell, sel, n_modes)
        for name, value in derived.items():  # not fields: plain read-only-by-convention attributes
            object.__setattr__(self, name, value)
        # The theory is jitted on its own: numpyro evaluates the model eagerly while initialising
        # (tracing, first potential and gradient), and op-by-op dispatch of the Limber/halofit
        # graph and its gradient costs ~30 s there; as one jitted call it is compiled once (plus
        # once for its derivative), and eager ``mean``/``log_likelihood``/``jax.grad`` calls
        # reuse it. Inside other traces (NUTS, user jit/vmap/grad) the nested jit is inlined.
        object.__setattr__(self, "_theory_jit", jax.jit(self.theory_cl))
        object.__setattr__(self, "_kept_theory_jit", jax.jit(self._kept_theory))

    # ---- theory ------------------------------------------------------------------------------
    def cosmology(self, theta) -> Cosmology:
        """The cosmology of θ (``prior.cosmology(theta, base)``)."""
        # float64, never weakly typed: the jitted theory then compiles once for every caller
        return self.prior.cosmology(jnp.asarray(theta, jnp.float64), self.base)

    def limber(self, cosmo: Cosmology, ell) -> jax.Array:
        """(n_pairs, n_ell) Limber C_ℓ with this likelihood's settings (``flatsky.limber_cl``)."""
        return flatsky.limber_cl(cosmo, self.bins, ell, n_chi=self.n_chi, nonlinear=self.nonlinear,
                                 power_filter=self.power_filter)

    def theory_cl(self, cosmo: Cosmology) -> jax.Array:
        """(n_pairs, n_ell) noise-free Limber C_ℓ averaged over the estimator's FFT modes in each
        bin: the same numbers as ``flatsky.binned_model_cl(self.limber(cosmo, .), field_deg, npix,
        ell_edges)``, computed as Limber at each distinct mode |ℓ| (``ell_unique``) times the
        static mode-count matrix ``mode_weights`` (3x cheaper to differentiate than the
        segment sums over the full FFT grid)."""
        return self.limber(cosmo, self.ell_unique) @ jnp.asarray(self.mode_weights).T

    def _kept_theory(self, cosmo: Cosmology) -> jax.Array:
        """(n_data,) the kept entries of ``theory_cl`` (noise-free), from Limber at
        ``ell_needed`` only: the other distinct modes have weight 0 in every kept ℓ bin."""
        cl = self.limber(cosmo, self.ell_needed) @ jnp.asarray(self.needed_weights).T
        return self._kept(cl.reshape(-1))

    def theory_cl_reference(self, cosmo: Cosmology) -> jax.Array:
        """``theory_cl`` through ``flatsky.binned_model_cl`` on the full FFT grid (slow; checks)."""
        return flatsky.binned_model_cl(lambda ell: self.limber(cosmo, ell), self.field_deg,
                                       self.npix, self.ell_edges)[0]

    def mean(self, theta) -> jax.Array:
        """(k,) expected data vector at θ: binned theory + shape-noise power on the autos."""
        cl = self._theory_jit(self.cosmology(theta))
        return cl.reshape(-1) + jnp.asarray(self.noise_vector)

    # ---- likelihood --------------------------------------------------------------------------
    def _kept(self, x):
        """The kept entries (``keep``) of a whole data vector (k,) or batch (..., k)."""
        x = jnp.asarray(x, jnp.float64)
        return x if self.n_data == self.n_total else x[..., jnp.asarray(self.selected)]

    def kept_mean(self, theta) -> jax.Array:
        """(n_data,) the kept entries of ``mean(θ)``, at a fraction of its cost where scale cuts
        drop the high-ℓ bins (``_kept_theory``)."""
        cl = self._kept_theory_jit(self.cosmology(theta))
        return cl + self._kept(self.noise_vector)

    def distribution(self, mean):
        """The numpyro distribution of the kept data entries given the whole mean vector."""
        return self._kept_distribution(self._kept(mean))

    def _kept_distribution(self, mean):
        import numpyro.distributions as dist

        if self.kind == "wishart":
            return _band_power_wishart()(mean, self.wishart)
        if self.kind == "gaussian":
            return dist.MultivariateNormal(loc=mean, scale_tril=self.scale_tril)
        return dist.MultivariateStudentT(df=self.df, loc=mean, scale_tril=self.scale_tril)

    def log_likelihood(self, theta, data) -> jax.Array:
        """log p(data | θ) of the kept entries (normalised; jit/grad-able in θ); data: the whole
        (k,) vector."""
        return self._kept_distribution(self.kept_mean(theta)).log_prob(self._kept(data))

    def log_posterior(self, theta, data) -> jax.Array:
        """log p(data | θ) + log prior(θ) (unnormalised posterior)."""
        return self.log_likelihood(theta, data) + self.prior.log_prob(theta)

    def model(self, data=None, tap=None):
        """numpyro model: θ ~ prior (one site per parameter name), data ~ likelihood. ``tap``: an
        identity on θ (d,) that the sampler wraps around it (its gradient counter)."""
        import numpyro

        theta = self.prior.sample_sites()
        if tap is not None:
            theta = tap(theta)
        numpyro.sample("data", self._kept_distribution(self.kept_mean(theta)),
                       obs=None if data is None else self._kept(data))

    def fisher(self, theta, rel_step: float = 1e-3) -> np.ndarray:
        """(d, d) Fisher matrix Jᵀ P J at θ, J = d mean / dθ by central differences of ``mean``
        (steps rel_step x prior std; reuses the compiled theory), P the precision the likelihood
        uses ((L Lᵀ)⁻¹ of ``scale_tril``: the Hartlap one for "gaussian", the t scale matrix's
        inverse for "sellentin_heavens", the analytic covariance's for "wishart": its Fisher
        information at the fiducial when the spectra are constant inside each ℓ bin, close
        enough otherwise for what this is used for, NUTS's initial mass matrix)."""
        theta = np.asarray(theta, np.float64)
        steps = rel_step * np.asarray(self.prior.std, np.float64)
        cols = []
        for a in range(theta.size):
            dt = np.zeros_like(theta)
            dt[a] = steps[a]
            hi = np.asarray(self.mean(theta + dt))
            lo = np.asarray(self.mean(theta - dt))
            cols.append((hi - lo) / (2 * steps[a]))
        jac = np.stack(cols, axis=-1)[self.selected]  # (kept, d)
        tril = np.asarray(self.scale_tril)
        w = np.linalg.solve(tril, jac)  # L⁻¹ J
        return w.T @ w

    def init_values(self) -> dict:
        """{name: value} of the base cosmology's parameters (the NUTS starting point)."""
        return {n: float(getattr(self.base, n)) for n in self.prior.names}

    def summary(self) -> dict:
        return {"kind": self.kind, "n_cov": self.n_cov, "n_data": self.n_data,
                "hartlap": self.hartlap, "df": self.df, "n_modes": self.n_modes.tolist(),
                "ell_mean": self.ell_mean.tolist()}


class ClGridPosterior:
    """The posterior of a ``ClLikelihood`` tabulated on one fixed grid of θ for many data vectors:
    the theory is computed once per grid node, after which each data vector costs only the
    likelihood's algebra. It is the analytic C_ℓ baseline's own posterior without MCMC, for
    calibration over simulations (``estimators.calibration.calibrate`` takes it like an sbi
    posterior: ``sample_batched``).

    The grid: n_grid cells per parameter over the prior's mean ± k_sigma std, clipped to its
    support; n_grid None puts ``CELLS_PER_STD`` cells in the posterior σ that the Fisher matrix
    at the base cosmology predicts (``fisher`` plus the prior's precision), the narrowest
    parameter's, at most ``MAX_N_GRID`` (the cost is n_grid^d theory evaluations, a few ms
    each). A posterior narrower than ``ZOOM_BELOW`` cells (the posteriors' widths change across
    the prior: at high σ_8 they are several times narrower) is tabulated again on a local grid
    of ``N_LOCAL`` cells per parameter over its mean ± ``LOCAL_SIGMA`` std on the coarse grid
    (new theory evaluations; the result is kept for later calls with the same data, as
    calibration's SBC and TARP make). ``posterior(data)``'s ``diagnostics["cells_per_std"]``
    says how fine the grid it used is (≥ 5 keeps the jittered draws' widths within 0.2 % of the
    tabulated density's); below ``MIN_CELLS_PER_STD`` even after that, it refuses.
    """

    MIN_CELLS_PER_STD = 3.0
    CELLS_PER_STD = 8.0
    ZOOM_BELOW = 5.0
    MAX_N_GRID = 384
    N_LOCAL = 48  # over ±4σ: 6 cells per σ; the mass beyond ±4σ is ~1e-4
    LOCAL_SIGMA = 4.0

    def __init__(self, like: ClLikelihood, n_grid: int | None = None, k_sigma: float = 5.0,
                 batch: int = 64):
        if (n_grid is not None and int(n_grid) < 8) or not k_sigma > 0:
            raise ValueError(f"need n_grid >= 8 and k_sigma > 0, got {n_grid}, {k_sigma}")
        prior = like.prior
        self.like = like
        self.names = tuple(prior.names)
        self.box = np.stack([np.maximum(prior.mean - k_sigma * prior.std, prior.low),
                             np.minimum(prior.mean + k_sigma * prior.std, prior.high)], -1)
        if n_grid is None:
            theta0 = np.array([like.init_values()[n] for n in prior.names])
            cov = np.linalg.inv(like.fisher(theta0) + np.diag(1 / np.asarray(prior.std) ** 2))
            cells = (self.box[:, 1] - self.box[:, 0]) / np.sqrt(np.diag(cov)) * self.CELLS_PER_STD
            n_grid = int(np.clip(np.ceil(cells.max()), 32, self.MAX_N_GRID))
        self.n_grid = int(n_grid)
        self._batch = int(batch)
        self._mean_fn = jax.jit(jax.vmap(like.kept_mean))
        self._ll = jax.jit(jax.vmap(lambda m, xk: like._kept_distribution(m).log_prob(xk),
                                    in_axes=(0, None)))
        self._log_prior_fn = lambda t: np.asarray(prior.log_prob(jnp.asarray(t)))
        self.n_local = 0  # posteriors tabulated again on a local grid
        self._local = {}  # data bytes -> that posterior
        self.axes, self.means, self.log_prior = self._tabulate(self.box, self.n_grid)

    def _tabulate(self, box: np.ndarray, n: int):
        """(cell-centre axes, kept means (N, n_data), ln π on the grid) of n cells per axis."""
        axes = tuple(a + (np.arange(n) + 0.5) * (b - a) / n for a, b in box)
        grids = np.meshgrid(*axes, indexing="ij")
        nodes = np.stack([g.reshape(-1) for g in grids], axis=-1)
        pad = (-len(nodes)) % self._batch
        x = np.concatenate([nodes, np.repeat(nodes[:1], pad, axis=0)])
        means = np.concatenate([np.asarray(self._mean_fn(jnp.asarray(x[i:i + self._batch])))
                                for i in range(0, len(x), self._batch)])[:len(nodes)]
        return axes, means, self._log_prior_fn(nodes).reshape(grids[0].shape)

    @property
    def nodes(self) -> np.ndarray:
        """(N, d) the coarse grid's cell centres, in the order of ``log_likelihood``'s cells."""
        return np.stack([g.reshape(-1) for g in np.meshgrid(*self.axes, indexing="ij")], -1)

    def _log_like(self, means, shape, data) -> np.ndarray:
        xk = self.like._kept(jnp.asarray(np.asarray(data, np.float64)))
        ll = np.asarray(self._ll(jnp.asarray(means), xk))
        bad = ~np.all(np.isfinite(means), axis=1)  # unphysical nodes: no theory, no likelihood
        return np.where(bad, -np.inf, ll).reshape(shape)

    def log_likelihood(self, data) -> np.ndarray:
        """ln L on the coarse grid (its shape) of one whole (k,) data vector; -inf where the
        theory is not finite (unphysical nodes)."""
        return self._log_like(self.means, self.log_prior.shape, data)

    def posterior(self, data):
        """``explicit.exact.GridPosterior`` of one whole (k,) data vector."""
        from explicit.exact import tabulated_posterior

        data = np.asarray(data, np.float64)
        key = data.tobytes()
        if key in self._local:
            return self._local[key]
        post = tabulated_posterior(self.names, self.axes, self.log_likelihood(data),
                                   self.log_prior, self._log_prior_fn)
        if post.diagnostics["cells_per_std"] < self.ZOOM_BELOW:
            half = self.LOCAL_SIGMA * post.std
            box = np.stack([np.maximum(post.mean - half, self.box[:, 0]),
                            np.minimum(post.mean + half, self.box[:, 1])], -1)
            axes, means, lp = self._tabulate(box, self.N_LOCAL)
            post = tabulated_posterior(self.names, axes, self._log_like(means, lp.shape, data), lp,
                                       self._log_prior_fn)
            self.n_local += 1
            self._local[key] = post
        if post.diagnostics["cells_per_std"] < self.MIN_CELLS_PER_STD:
            raise ValueError(f"a posterior narrower than the grid resolves "
                             f"({post.diagnostics['cells_per_std']:.1f} cells per std, need "
                             f">= {self.MIN_CELLS_PER_STD:g}): raise n_grid")
        return post

    def sample_batched(self, sample_shape, x, show_progress_bars: bool = False):
        """(n, m, d) float32 torch draws for each of the m data vectors x (m, k), sbi's interface;
        seeded from torch's global generator (as sbi's posteriors are)."""
        import torch

        (n,) = tuple(sample_shape)
        out = np.empty((n, len(x), len(self.names)), np.float32)
        for i, xi in enumerate(np.asarray(x, np.float64)):
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            out[:, i] = self.posterior(xi).sample(seed, n)
        return torch.from_numpy(out)


def scale_cut_keep(n_bins: int, ell_edges, scales) -> np.ndarray | None:
    """(n_pairs · n_ell,) bool over the flattened C_ℓ data vector (pair-major, ``pair_indices``
    order): ℓ bin b of pair (i, j) is kept when it lies inside both bins' ranges, [max(lo_i, lo_j),
    min(hi_i, hi_j)] ∋ [edges[b], edges[b + 1]]. None when ``scales`` is None.
    scales: (ell_min (n_bins,), ell_max (n_bins,))."""
    if scales is None:
        return None
    edges = np.asarray(ell_edges, np.float64)
    lo, hi = (np.asarray(v, np.float64) for v in scales)
    i, j = flatsky.pair_indices(n_bins)
    p_lo, p_hi = np.maximum(lo[i], lo[j]), np.minimum(hi[i], hi[j])
    keep = (edges[None, :-1] >= p_lo[:, None] - 1e-9) & (edges[None, 1:] <= p_hi[:, None] + 1e-9)
    if not keep.any():
        raise ValueError(f"no C_ell bin (edges {edges[0]:g}..{edges[-1]:g}) lies inside the scale "
                         f"cuts: adjust [cl] or [scales]")
    return keep.reshape(-1)


def cl_likelihood_for_model(model, prior, ell_edges, *, n_cov: int | None,
                            base: Cosmology | None = None, fiducial: Cosmology | None = None,
                            sigma_n=None, seed: int = 0, batch: int = 16, kind: str = "gaussian",
                            power_filter=None, n_chi: int = 256, nonlinear: bool = True
                            ) -> tuple[ClLikelihood, CovarianceEstimate | None]:
    """A ``ClLikelihood`` for a flat-sky map model, its covariance from n_cov fiducial simulations
    (seeds seed .. seed + n_cov - 1; keep the observation's seed outside that range), or with
    n_cov None the analytic Gaussian covariance (``analytic_covariance``) at the fiducial.

    base: the cosmology supplying the parameters not in the prior (default fiducial); fiducial: the
    covariance cosmology (default base); sigma_n: default ``lensing.noise_sigma(bins, sky)``.
    Returns (likelihood, covariance estimate, None for the analytic covariance).
    """
    base = Cosmology.fiducial() if base is None else base
    fiducial = base if fiducial is None else fiducial
    sky = model.sky
    if not hasattr(sky, "field_deg"):
        raise ValueError("the C_ell likelihood is flat-sky only: the model needs a FlatSky")
    sigma_n = noise_sigma(model.bins, sky) if sigma_n is None else sigma_n
    settings = dict(prior=prior, base=base, kind=kind, power_filter=power_filter, n_chi=n_chi,
                    nonlinear=nonlinear)
    if n_cov is None:
        cov = analytic_covariance(model.bins, fiducial, sky.field_deg, sky.npix, ell_edges,
                                  sigma_n, power_filter=power_filter, n_chi=n_chi,
                                  nonlinear=nonlinear)
        return ClLikelihood(bins=model.bins, field_deg=sky.field_deg, npix=sky.npix,
                            ell_edges=ell_edges, sigma_n=sigma_n, cov=cov, n_cov=None,
                            **settings), None
    _check_n_sims(n_cov, model.bins.n_bins * (model.bins.n_bins + 1) // 2 * (len(ell_edges) - 1))
    dvs = fiducial_data_vectors(model, fiducial, sigma_n, sky.field_deg, ell_edges, n_cov, seed,
                                batch)
    est = estimate_covariance(dvs)
    like = ClLikelihood(bins=model.bins, field_deg=sky.field_deg, npix=sky.npix,
                        ell_edges=ell_edges, sigma_n=sigma_n, cov=est.cov, n_cov=est.n_sims,
                        **settings)
    return like, est


# ------------------------------------------------------------------------------------------------
# NUTS


def _fisher_inverse_mass(likelihood: ClLikelihood, x0: dict, dense: bool):
    """Initial inverse mass matrix for NUTS: (F_u + H_u)⁻¹ at x0 in the unconstrained coordinates u
    of each prior site (numpyro's ``biject_to(support)``), F_u = D F_θ D (D = diag dθ/du), H_u the
    curvature of -[log prior(θ(u)) + log |dθ/du|] (clipped at 0). Sites in sorted-name order, as
    numpyro ravels them. Returns None when the result is not finite and positive definite."""
    from numpyro.distributions import biject_to

    names = likelihood.prior.names
    dists = likelihood.prior.numpyro_dists()
    theta = np.array([x0[n] for n in names], np.float64)
    fisher = likelihood.fisher(theta)
    dxdu, curv = np.empty(len(names)), np.empty(len(names))
    for a, n in enumerate(names):
        t = biject_to(dists[n].support)
        u0 = t.inv(jnp.asarray(theta[a]))
        dxdu[a] = float(jax.grad(t)(u0))

        def neg_log(u, t=t, d=dists[n]):
            x = t(u)
            return -(d.log_prob(x) + t.log_abs_det_jacobian(u, x))

        curv[a] = max(float(jax.grad(jax.grad(neg_log))(u0)), 0.0)
    prec = dxdu[:, None] * fisher * dxdu[None, :] + np.diag(curv)
    order = np.argsort(names)
    prec = prec[np.ix_(order, order)]
    try:
        np.linalg.cholesky(prec)
        inv = np.linalg.inv(prec)
    except np.linalg.LinAlgError:
        return None
    inv = 0.5 * (inv + inv.T)
    if not np.all(np.isfinite(inv)):
        return None
    return jnp.asarray(inv if dense else np.diag(inv))


def _grad_counter():
    """(identity with a counting VJP, counter list): every backward pass through the returned
    function adds the batch size to counter[0] (a host callback; it touches no JAX)."""
    counter = [0]

    def bump(x):
        counter[0] += max(1, int(np.prod(np.shape(x)[:-1])))

    @jax.custom_vjp
    def tap(theta):
        return theta

    def fwd(theta):
        return theta, None

    def bwd(_, g):
        jax.debug.callback(bump, g)
        return (g,)

    tap.defvjp(fwd, bwd)
    return tap, counter


def sample_cl_posterior(likelihood: ClLikelihood, data, *, num_warmup: int = 500,
                        num_samples: int = 1000, num_chains: int = 1, seed: int = 0,
                        progress: bool = True, init: str | dict = "base",
                        dense_mass: bool = True, max_tree_depth: int = 10,
                        target_accept_prob: float = 0.8, chain_method: str | None = None,
                        mass_init: str | None = "fisher") -> tuple[np.ndarray, dict]:
    """NUTS samples of p(θ | data) ∝ likelihood(data | θ) prior(θ).

    Args:
      likelihood: a ``ClLikelihood``; data: (k,) observed data vector (``cl_data_vector``).
      num_warmup, num_samples, num_chains, seed: NUTS settings (samples are per chain).
      progress: numpyro progress bar.
      init: "base" (the base cosmology's values, default: halofit is well behaved there),
        "median" (prior median) or a {name: value} dict.
      dense_mass, max_tree_depth, target_accept_prob: NUTS settings.
      mass_init: "fisher" (default): start the mass-matrix adaptation from the inverse of the
        Laplace-like precision Fisher + prior curvature at the initial point, in NUTS's
        unconstrained coordinates (``_fisher_inverse_mass``), which saves most of the long
        early-warmup trajectories of a strongly correlated posterior (Omega_c-sigma8); None: the
        identity (numpyro's default). Warmup adapts it either way.
      chain_method: numpyro's; default "parallel" when there are enough devices, else "sequential".
    Returns:
      samples: (num_chains * num_samples, d) float64 numpy, columns in ``prior.names`` order.
      info: dict with names, divergences (post-warmup transitions), ess and r_hat (per parameter,
        dicts; r_hat is split-R̂ over all chains), wall_time_s (initialisation, compilation,
        warmup and sampling), grad_evals (every likelihood gradient evaluated: initialisation,
        warmup, sampling), grad_evals_sampling (leapfrog steps after warmup), mean_tree_steps,
        step_size, accept_prob, and the likelihood summary (kind, n_cov, n_data, hartlap, ...).
    """
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS, init_to_median, init_to_value

    data = jnp.asarray(data, jnp.float64)
    if data.shape != (likelihood.n_total,):  # the whole vector: the likelihood keeps its entries
        raise ValueError(f"data must have shape ({likelihood.n_total},), got {data.shape}")
    if not bool(jnp.all(jnp.isfinite(data))):
        raise ValueError("data contain NaN or inf")
    names = likelihood.prior.names
    if isinstance(init, dict):
        missing = [n for n in names if n not in init]
        if missing:
            raise ValueError(f"init is missing {missing}")
        x0 = {n: float(init[n]) for n in names}
        strategy = init_to_value(values=x0)
    elif init == "base":
        x0 = likelihood.init_values()
        strategy = init_to_value(values=x0)
    elif init == "median":
        x0 = {n: float(d.icdf(0.5)) for n, d in likelihood.prior.numpyro_dists().items()}
        strategy = init_to_median()
    else:
        raise ValueError(f"init must be 'base', 'median' or a dict, got {init!r}")
    if chain_method is None:
        chain_method = "parallel" if jax.local_device_count() >= num_chains else "sequential"
    t0 = time.perf_counter()
    inv_mass = None
    if mass_init == "fisher":
        inv_mass = _fisher_inverse_mass(likelihood, x0, dense_mass)
    elif mass_init is not None:
        raise ValueError(f"mass_init must be 'fisher' or None, got {mass_init!r}")

    tap, counter = _grad_counter()

    kernel = NUTS(functools.partial(likelihood.model, tap=tap), init_strategy=strategy,
                  dense_mass=dense_mass, max_tree_depth=max_tree_depth,
                  target_accept_prob=target_accept_prob, inverse_mass_matrix=inv_mass)
    # One run (warmup + sampling): a separate warmup() would compile the NUTS loop twice.
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                chain_method=chain_method, progress_bar=progress)
    mcmc.run(jax.random.key(seed), data, extra_fields=("num_steps", "diverging", "accept_prob"))
    samples_by_chain = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(samples_by_chain)
    wall = time.perf_counter() - t0
    ef = mcmc.get_extra_fields()
    chains = np.stack([np.asarray(samples_by_chain[n], np.float64) for n in names], axis=-1)
    n_steps = np.asarray(ef["num_steps"])
    ess, rhat = {}, {}
    for a, n in enumerate(names):
        x = chains[..., a]
        ess[n] = float(effective_sample_size(x))
        rhat[n] = float(split_gelman_rubin(x)) if x.shape[1] >= 4 else float("nan")
    info = {
        "names": names,
        "num_warmup": num_warmup, "num_samples": num_samples, "num_chains": num_chains,
        "divergences": int(np.sum(np.asarray(ef["diverging"]))),
        "ess": ess, "r_hat": rhat,
        "wall_time_s": wall,
        "grad_evals": int(counter[0]),
        "grad_evals_sampling": int(np.sum(n_steps)),
        "mean_tree_steps": float(np.mean(n_steps)),
        "step_size": float(np.mean(np.asarray(mcmc.last_state.adapt_state.step_size))),
        "accept_prob": float(np.mean(np.asarray(ef["accept_prob"]))),
        "init": x0,
        **likelihood.summary(),
    }
    return chains.reshape(-1, len(names)), info
