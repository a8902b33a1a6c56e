"""Full-sky (HEALPix) tomographic power spectra: a binned C_ell estimator and the pixel window.

Host-side numpy on top of healpy's spherical-harmonic transforms: nothing here is jit-able or
differentiable. (HEALPix maps are made by reading the mesh along healpy's pixel-centre directions,
``lightcone.HealpixSky``; no pixelization code of our own is involved.)

Conventions match the flat-sky estimator ``simulators.flatsky.cl_estimate``:
  - maps are (n_bins, npix) RING-ordered HEALPix maps, npix = 12 nside^2;
  - tomographic pairs (i <= j) are ordered (0,0), (0,1), ..., (0,n-1), (1,1), ...
    (``simulators.flatsky.pair_indices``);
  - an integer multipole ell is in bin b if ell_edges[b] <= ell < ell_edges[b + 1];
  - each (ell, m) mode counts once: n_modes = sum over the bin of (2 ell + 1), the bin value is the
    (2 ell + 1)-weighted mean of the pseudo-C_ell, ell_mean the (2 ell + 1)-weighted mean of ell.
Units: ell dimensionless, C_ell in steradians (for a dimensionless field such as convergence).
"""

from __future__ import annotations

import healpy as hp
import numpy as np

from .flatsky import pair_indices

NSIDE_MAX = 2**29  # the largest nside whose pixel indices fit in int64 (healpy's limit too)


def check_nside(nside) -> int:
    """nside as a Python int; ValueError unless it is a power of 2 between 1 and 2^29 (bools,
    floats and strings are refused even when they look like one)."""
    if isinstance(nside, (bool, np.bool_)) or not isinstance(nside, (int, np.integer)):
        raise ValueError(f"nside must be a power of 2 (an integer 1, 2, 4, ...), got {nside!r}")
    n = int(nside)
    if n < 1 or n & (n - 1) or n > NSIDE_MAX:
        raise ValueError(f"nside must be a power of 2 between 1 and 2^29, got {n}")
    return n


def _nside_of(npix: int) -> int:
    nside = int(round(np.sqrt(npix / 12.0)))
    if 12 * nside * nside != npix:
        raise ValueError(f"maps have {npix} pixels, which is not 12 nside^2 for any nside")
    try:
        return check_nside(nside)
    except ValueError as e:
        raise ValueError(f"maps have {npix} pixels = 12 * {nside}^2, but nside {nside} is not a "
                         "power of 2") from e


def bin_cl(cl, ell_edges):
    """Bin per-multipole spectra cl (..., lmax + 1) (index = ell) into ell bins.

    Returns (binned (..., n_ell_bins), ell_mean (n_ell_bins,), n_modes (n_ell_bins,) int64) with
    weights 2 ell + 1 (each (ell, m) mode counts once). Empty bins give NaN and 0 modes.
    """
    cl = np.asarray(cl, np.float64)
    ell = np.arange(cl.shape[-1])
    edges = np.asarray(ell_edges, np.float64)
    b = np.searchsorted(edges, ell, side="right") - 1  # bin of each ell; -1 or n_bins: outside
    nb = edges.size - 1
    inside = (b >= 0) & (b < nb)
    modes = (2 * ell + 1).astype(np.float64)
    onehot = (b[:, None] == np.arange(nb)[None, :]) & inside[:, None]  # (lmax + 1, n_ell_bins)
    weights = onehot * modes[:, None]
    n_modes = weights.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = (cl @ weights) / n_modes
        ell_mean = (ell @ weights) / n_modes
    return binned, ell_mean, n_modes.astype(np.int64)


def _check_edges(ell_edges, lmax: int) -> np.ndarray:
    edges = np.asarray(ell_edges, np.float64)
    if edges.ndim != 1 or edges.size < 2:
        raise ValueError(f"ell_edges must be 1-D with >= 2 entries, got shape {edges.shape}")
    if not np.all(np.isfinite(edges)):
        raise ValueError("ell_edges must be finite")
    if not np.all(np.diff(edges) > 0):
        raise ValueError("ell_edges must be strictly increasing")
    if edges[0] < 0 or edges[-1] > lmax + 1:
        raise ValueError(f"ell_edges must lie in [0, lmax + 1] = [0, {lmax + 1}] (bins are "
                         f"[lo, hi) over ell = 0 .. lmax), got [{edges[0]}, {edges[-1]}]")
    return edges


def cl_estimate_healpix(maps, ell_edges, lmax: int | None = None, iter: int = 3):
    """Binned full-sky auto and cross power spectra of HEALPix maps (host-side, not jit-able).

    For each pair (i, j) the pseudo-C_ell is C_ell = sum_m Re(a_lm,i a_lm,j^*) / (2 ell + 1) from
    the maps' spherical-harmonic coefficients, exactly what ``healpy.anafast(map_i, map2=map_j,
    lmax=lmax, iter=iter, pol=False)`` returns; the a_lm of each map are computed once
    (``healpy.map2alm``) and combined with ``healpy.alm2cl``, instead of one anafast call per pair.
    No mask, beam or pixel-window correction is applied (``healpix_pixel_window`` gives the
    window to divide by, squared, if wanted). Pixels equal to healpy.UNSEEN are treated by healpy
    as zero.

    Accuracy: HEALPix quadrature is good for ell <~ 2 nside. Above, map2alm loses power even for a
    band-limited map: for nside 64, iter 3, a map made from a_lm up to 3 nside - 1 gives C_ell low
    by ~1% at ell ~ 140 and ~7% at ell ~ 185 (1e-4 below ell = 2 nside). Keep the bins of
    interest below ~2 nside.

    Args:
      maps: (n_bins, npix) or (npix,) real RING maps, finite, npix = 12 nside^2.
      ell_edges: (n_ell_bins + 1,) strictly increasing bin edges in [0, lmax + 1]; integer ell is in
        bin b if ell_edges[b] <= ell < ell_edges[b + 1].
      lmax: highest multipole computed (default 3 nside - 1, healpy's default), integer >= 0.
      iter: healpy's number of map2alm Jacobi iterations (3, its default, improves the quadrature).
    Returns: (cl (n_pairs, n_ell_bins) float64 in steradians, pairs as in
      ``flatsky.pair_indices``; ell_mean (n_ell_bins,) (2 ell + 1)-weighted mean ell; n_modes
      (n_ell_bins,) int64 number of (ell, m) modes, sum of 2 ell + 1). Empty bins (no integer ell)
      give NaN cl and ell_mean and 0 modes.
    Raises ValueError for a wrong shape or npix, NaN/inf in the maps, a bad lmax or edges.
    """
    maps = np.asarray(maps)
    if maps.ndim == 1:
        maps = maps[None, :]
    if maps.ndim != 2:
        raise ValueError(f"maps must have shape (n_bins, npix), got {maps.shape}")
    if not np.issubdtype(maps.dtype, np.number) or np.iscomplexobj(maps):
        raise ValueError(f"maps must be real numbers, got dtype {maps.dtype}")
    nside = _nside_of(maps.shape[1])
    maps = maps.astype(np.float64)
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps contain NaN or inf")
    if lmax is None:
        lmax = 3 * nside - 1
    if isinstance(lmax, (bool, np.bool_)) or not isinstance(lmax, (int, np.integer)) or lmax < 0:
        raise ValueError(f"lmax must be an integer >= 0, got {lmax!r}")
    lmax = int(lmax)
    if not (isinstance(iter, (int, np.integer)) and iter >= 0):
        raise ValueError(f"iter must be an integer >= 0, got {iter!r}")
    edges = _check_edges(ell_edges, lmax)

    alms = [hp.map2alm(m, lmax=lmax, iter=int(iter), pol=False) for m in maps]
    i, j = pair_indices(maps.shape[0])
    cl = np.stack([hp.alm2cl(alms[a], alms[b], lmax=lmax) for a, b in zip(i, j)])
    return bin_cl(cl, edges)


def healpix_pixel_window(nside: int, ell, datapath: str | None = None) -> np.ndarray:
    """HEALPix temperature pixel window function w_ell at integer multipoles (host-side numpy).

    Wraps ``healpy.pixwin(nside, lmax=max(ell))``: a map that is the pixel average of a field with
    spectrum C_ell has spectrum ~ w_ell^2 C_ell. healpy reads the window from a data file
    (pixel_window_n<nside>.fits) that its wheel does not ship: on first use it downloads it and
    caches it (astropy's cache), or reads it from ``datapath``. Offline and without a cached copy,
    a RuntimeError says so.

    Args:
      nside: power of 2.
      ell: (...) non-negative integer multipoles (ints or integral floats), at most the window
        file's lmax (4 nside for healpy's files).
      datapath: optional folder holding healpy's data, i.e. the file
        <datapath>/pixel_window_functions/pixel_window_n<nside:04d>.fits (passed to healpy.pixwin,
        which raises ValueError if it is missing).
    Returns: (...) float64 w_ell.
    """
    nside = check_nside(nside)
    ell_arr = np.asarray(ell)
    if ell_arr.size == 0:
        return np.zeros(ell_arr.shape)
    if not np.issubdtype(ell_arr.dtype, np.number) or not np.all(np.isfinite(ell_arr)):
        raise ValueError("ell must be finite numbers")
    if np.any(ell_arr < 0) or np.any(ell_arr != np.round(ell_arr)):
        raise ValueError("ell must be non-negative integers")
    ell_int = np.round(ell_arr).astype(np.int64)
    lmax = int(ell_int.max())
    try:
        w = hp.pixwin(nside, lmax=lmax, datapath=datapath)
    except OSError as e:  # includes urllib's URLError: file neither cached nor downloadable
        raise RuntimeError(
            f"healpy has no pixel-window file for nside {nside} (pixel_window_n{nside:04d}.fits): "
            "it is downloaded on first use; without network access pass datapath= pointing to "
            "a copy of healpy's data files") from e
    w = np.asarray(w, np.float64)
    if w.shape[0] < lmax + 1:
        raise ValueError(f"the pixel window for nside {nside} stops at ell = {w.shape[0] - 1}, "
                         f"asked for ell = {lmax}")
    return w[ell_int]
