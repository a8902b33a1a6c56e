"""Per-batch data augmentation for map batches (batch, n_bins, npix_y, npix_x), jit-friendly.

Training maps are stored noise-free, so every batch gets a fresh shape-noise realisation; random
symmetries of the square (the dihedral group D4: 4 rotations × optional reflection) are free extra
data because the statistics of a flat-sky lensing patch are invariant under them. Each map in a
batch draws its own noise and its own symmetry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["add_shape_noise", "random_dihedral", "random_flips", "augment_batch"]


def add_shape_noise(key: jax.Array, maps: jnp.ndarray, sigma_n: jnp.ndarray) -> jnp.ndarray:
    """maps + white Gaussian noise of rms ``sigma_n`` (n_bins,) per pixel, per bin (map units)."""
    sigma = jnp.asarray(sigma_n, maps.dtype)[None, :, None, None]
    return maps + sigma * jax.random.normal(key, maps.shape, maps.dtype)


def _where(flag: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.where(flag[:, None, None, None], a, b)


def _coin_flips(key: jax.Array, n: int) -> jnp.ndarray:
    """n independent fair 3-bit draws (uint32); bit k is the k-th coin. One draw of raw bits
    compiles faster than three Bernoulli draws."""
    return jax.random.bits(key, (n,), jnp.uint32)


def _flip(bits: jnp.ndarray, maps: jnp.ndarray) -> jnp.ndarray:
    maps = _where((bits & 2) != 0, jnp.flip(maps, -2), maps)
    return _where((bits & 4) != 0, jnp.flip(maps, -1), maps)


def random_flips(key: jax.Array, maps: jnp.ndarray) -> jnp.ndarray:
    """Independent random up-down and left-right reflections of each map (any npix_y, npix_x)."""
    return _flip(_coin_flips(key, maps.shape[0]), maps)


def random_dihedral(key: jax.Array, maps: jnp.ndarray) -> jnp.ndarray:
    """A uniformly random element of D4 applied to each square map.

    Optional transpose, then optional flips of each axis: 2³ = 8 distinct maps, which are exactly
    the 4 rotations and 4 reflections (e.g. transpose + left-right flip = rotation by 90°).
    """
    if maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"rotations need square maps, got npix {maps.shape[-2:]}")
    bits = _coin_flips(key, maps.shape[0])
    maps = _where((bits & 1) != 0, jnp.swapaxes(maps, -1, -2), maps)
    return _flip(bits, maps)


def augment_batch(key: jax.Array, maps: jnp.ndarray, sigma_n: jnp.ndarray, *,
                  symmetries: bool = True) -> jnp.ndarray:
    """Fresh shape noise, then (if ``symmetries``) a random D4 element (flips only if not square).

    Noise first or last is equivalent in distribution (white noise is D4-invariant); noise first
    keeps the per-map noise independent of the drawn symmetry.
    """
    kn, ks = jax.random.split(key)
    maps = add_shape_noise(kn, maps, sigma_n)
    if not symmetries:
        return maps
    if maps.shape[-1] == maps.shape[-2]:
        return random_dihedral(ks, maps)
    return random_flips(ks, maps)
