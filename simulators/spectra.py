"""Power-spectrum estimators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .grid import DeviceGrid

Array = jax.Array


def power_spectrum(delta: Array, box_size, n_bins: int | None = None,
                   grid: DeviceGrid | None = None, window=None):
    """Spherically averaged power spectrum of a 3-D overdensity field.

    Bins are linear in |k| from the fundamental 2π/L_max up to the smallest Nyquist frequency.

    Args:
      delta: (nx, ny, nz) overdensity (mean removed by the k = 0 exclusion).
      box_size: (Lx, Ly, Lz) in Mpc/h.
      n_bins: number of k bins (default min(n)/2).
      grid: device grid ``delta`` is laid out on (default: one device).
      window: optional array on the FFT layout to divide the modes by (e.g. the CIC window).
    Returns:
      k: (n_bins,) mean |k| of the modes in each bin, h/Mpc.
      pk: (n_bins,) power, (Mpc/h)³.
      n_modes: (n_bins,) number of Fourier modes (counting ±k separately).
    """
    grid = grid or DeviceGrid()
    shape = delta.shape
    box = np.broadcast_to(np.asarray(box_size, float), (3,))
    n_bins = n_bins or min(shape) // 2
    delta_k = grid.fft(delta)
    if window is not None:
        delta_k = delta_k / window
    kx, ky, kz = grid.wavevectors(shape, box, dtype=jnp.float64)
    kmag = jnp.sqrt(kx**2 + ky**2 + kz**2)
    kmag = jnp.broadcast_to(kmag, delta_k.shape)
    # rfft stores one of each ±kz pair except on the kz = 0 and Nyquist planes
    weight = jnp.ones_like(kmag)
    if not grid.sharded:
        nz = shape[2]
        half = np.full(nz // 2 + 1, 2.0)
        half[0] = 1.0
        if nz % 2 == 0:
            half[-1] = 1.0
        weight = weight * jnp.asarray(half)[None, None, :]
    volume = float(np.prod(box))
    power = jnp.abs(delta_k) ** 2 * volume / float(np.prod(shape)) ** 2
    k_fund = 2 * np.pi / box.max()
    k_nyq = np.pi * np.min(np.asarray(shape) / box)
    edges = np.linspace(k_fund / 2, k_nyq, n_bins + 1)
    idx = jnp.digitize(kmag.ravel(), jnp.asarray(edges)) - 1
    valid = (idx >= 0) & (idx < n_bins) & (kmag.ravel() > 0)
    idx = jnp.where(valid, idx, n_bins)
    w = weight.ravel() * valid
    count = jnp.bincount(idx, w, length=n_bins + 1)[:n_bins]
    ksum = jnp.bincount(idx, w * kmag.ravel(), length=n_bins + 1)[:n_bins]
    psum = jnp.bincount(idx, w * power.ravel(), length=n_bins + 1)[:n_bins]
    safe = jnp.maximum(count, 1)
    return ksum / safe, psum / safe, count
