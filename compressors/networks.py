"""Convolutional map → vector networks (flax linen, float32).

Inputs are batches of tomographic maps shaped ``(batch, n_bins, npix_y, npix_x)`` (channels first,
as stored on disk); the networks transpose to NHWC internally because that is what flax's
convolutions expect. Outputs are ``(batch, n_out)`` float32, with no final activation: the loss
decides what the outputs mean (a point estimate, a mean plus a Cholesky factor, or a summary).

There are no normalisation layers. Per-sample normalisations (GroupNorm, LayerNorm) would divide
out the overall map amplitude, which is what σ8-like parameters control; BatchNorm would bring
running statistics to carry, checkpoint and switch between train and eval. Instead the inputs are
standardised per bin by the caller (``compressors.train`` uses training-set statistics) and each
residual branch starts at zero (its last convolution is zero-initialised), so the ResNet begins
as a well-conditioned stack of identities plus a few convolutions.
Flat-sky patches are not periodic, so convolutions use zero ("SAME") padding.

Band powers (``power_bands`` > 0, and the ``"power"`` network): a convolution stack has to learn
the quadratic, scale-by-scale weighting of the modes that the optimal compressor of a Gaussian
field is (the score of its likelihood, a weighted sum of the cross-spectra); it does so slowly
and, on ``gaussian_check``, to about half the exact posterior's figure of merit (NOTEBOOK 12).
``band_power_features`` hands the head that statistic directly (per annulus of the FFT grid: the
log auto-power of every bin and the correlation coefficient of every bin pair), so the network
starts from the power spectrum and the convolutions only have to add what it misses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

__all__ = ["ResNet", "SimpleCNN", "PowerNet", "NETWORKS", "build_network", "band_power_features",
           "band_membership"]


def _to_nhwc(x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4:
        raise ValueError(f"expected maps shaped (batch, n_bins, npix, npix), got {x.shape}")
    return jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))


def band_membership(ny: int, nx: int, n_bands: int) -> np.ndarray:
    """(ny * nx, n) float32: row m holds 1 / (modes in the band) in the column of the band of FFT
    mode m (row-major over ``fft2``'s (ky, kx) grid), zeros elsewhere, so ``power @ W`` averages
    over each band. Bands are annuli of |k| in grid units (k = 1 is the map's fundamental mode),
    of equal width from 0.5 to the grid's corner; the mean (k = 0) is in none. There are
    ``min(n_bands, floor(k_corner - 0.5))`` bands, so that each is at least one grid unit wide
    and holds modes."""
    ky = np.fft.fftfreq(ny) * ny
    kx = np.fft.fftfreq(nx) * nx
    k = np.hypot(*np.meshgrid(ky, kx, indexing="ij")).ravel()
    n = int(min(n_bands, np.floor(k.max() - 0.5)))
    if n < 1:
        raise ValueError(f"maps of {ny}x{nx} pixels are too small for band powers")
    edges = np.linspace(0.5, k.max() * (1 + 1e-9), n + 1)
    band = np.digitize(k, edges) - 1                      # -1: the mean; n never (edge above max)
    weights = np.zeros((k.size, n), np.float32)
    inside = band >= 0
    weights[np.flatnonzero(inside), band[inside]] = 1.0
    return weights / weights.sum(axis=0, keepdims=True)


def band_power_features(maps: jnp.ndarray, n_bands: int) -> jnp.ndarray:
    """Band powers of tomographic maps: (batch, n_bins, ny, nx) → (batch, n_features) float32.

    Per band (``band_membership``) and bin pair i <= j of the unitary FFT: for i = j the log of the
    mean |F_i|² (the maps are standardised, so O(1)), for i < j the correlation coefficient
    Re⟨F_i F_j*⟩ / √(⟨|F_i|²⟩⟨|F_j|²⟩). A band whose power is zero (removed by a scale cut) gives
    0 in both, with a finite gradient. n_features = n_bins (n_bins + 1) / 2 × bands.
    """
    x = maps.astype(jnp.float32)
    batch, n_bins, ny, nx = x.shape
    w = jnp.asarray(band_membership(ny, nx, n_bands))
    f = jnp.fft.fft2(x, norm="ortho").reshape(batch, n_bins, ny * nx)
    i, j = np.triu_indices(n_bins)
    cross = jnp.real(f[:, i] * jnp.conj(f[:, j])) @ w     # (batch, pairs, bands)
    auto = cross[:, np.flatnonzero(i == j)]               # (batch, n_bins, bands), bins in order
    tiny = jnp.float32(1e-12)
    ok = auto > tiny
    log_auto = jnp.where(ok, jnp.log(jnp.where(ok, auto, 1.0)), 0.0)
    norm = auto[:, i] * auto[:, j]
    ok2 = norm > tiny * tiny
    coeff = jnp.where(ok2, cross / jnp.sqrt(jnp.where(ok2, norm, 1.0)), 0.0)
    feats = jnp.where((i == j)[None, :, None], log_auto[:, i], coeff)
    return feats.reshape(batch, -1)


class _PowerBranch(nn.Module):
    """Band powers of the input maps through one hidden layer (``hidden`` features)."""

    n_bands: int
    hidden: int

    @nn.compact
    def __call__(self, maps: jnp.ndarray) -> jnp.ndarray:
        return nn.silu(nn.Dense(self.hidden)(band_power_features(maps, self.n_bands)))


class _Head(nn.Module):
    """Global average pool, joined (``power_bands`` > 0) by the band powers of the input ``maps``
    through ``_PowerBranch``; one hidden layer, linear output."""

    n_out: int
    hidden: int
    power_bands: int = 0

    @nn.compact
    def __call__(self, h: jnp.ndarray, maps: jnp.ndarray) -> jnp.ndarray:
        h = jnp.mean(h, axis=(1, 2))
        if self.power_bands:
            h = jnp.concatenate([h, _PowerBranch(self.power_bands, self.hidden)(maps)], axis=-1)
        h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.n_out)(h)


class _ResBlock(nn.Module):
    """Pre-activation residual block; ``stride=2`` halves the resolution."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.silu(x)
        skip = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            # Project the (pre-activated) input so the skip matches shape; 1x1, strided.
            skip = nn.Conv(self.channels, (1, 1), strides=self.stride, use_bias=False)(h)
        h = nn.Conv(self.channels, (3, 3), strides=self.stride, padding="SAME")(h)
        h = nn.silu(h)
        # Zero-initialised last conv: every block starts as the identity (or as its projection),
        # which keeps a deep network well conditioned at the start without normalisation.
        h = nn.Conv(self.channels, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros)(h)
        return skip + h


class ResNet(nn.Module):
    """Residual CNN: stem, ``depth`` stages, global average pool, MLP head.

    Stage ``s`` has ``width * 2**s`` channels and ``blocks`` residual blocks; every stage after
    the first starts by halving the resolution, so a 64² map ends at ``64 / 2**(depth-1)`` pixels
    per side before pooling.

    Attributes:
      n_out: output dimension.
      width: channels of the first stage.
      depth: number of stages (>= 1).
      blocks: residual blocks per stage (>= 1).
      head_hidden: width of the head's hidden layer.
      power_bands: > 0: the head also sees the maps' band powers (``band_power_features``
        through a hidden layer) in at most this many bands.
    """

    n_out: int
    width: int = 16
    depth: int = 3
    blocks: int = 1
    head_hidden: int = 64
    power_bands: int = 0

    @nn.compact
    def __call__(self, maps: jnp.ndarray) -> jnp.ndarray:
        """maps (batch, n_bins, npix, npix) → (batch, n_out)."""
        h = nn.Conv(self.width, (3, 3), padding="SAME")(_to_nhwc(maps))
        for stage in range(self.depth):
            channels = self.width * 2**stage
            for block in range(self.blocks):
                stride = 2 if (stage > 0 and block == 0) else 1
                h = _ResBlock(channels, stride)(h)
        return _Head(self.n_out, self.head_hidden, self.power_bands)(nn.silu(h), maps)


class SimpleCNN(nn.Module):
    """Plain CNN: ``depth`` stride-2 convolutions (channels doubling), pool, MLP head.

    Attributes:
      n_out: output dimension.
      width: channels of the first convolution.
      depth: number of convolutions (>= 1).
      head_hidden: width of the head's hidden layer.
      power_bands: as for ``ResNet``.
    """

    n_out: int
    width: int = 16
    depth: int = 3
    head_hidden: int = 64
    power_bands: int = 0

    @nn.compact
    def __call__(self, maps: jnp.ndarray) -> jnp.ndarray:
        """maps (batch, n_bins, npix, npix) → (batch, n_out)."""
        h = _to_nhwc(maps)
        for layer in range(self.depth):
            h = nn.Conv(self.width * 2**layer, (3, 3), strides=2, padding="SAME")(h)
            h = nn.silu(h)
        return _Head(self.n_out, self.head_hidden, self.power_bands)(h, maps)


class PowerNet(nn.Module):
    """The maps' band powers alone (``band_power_features``) through a two-hidden-layer MLP: a
    learned compression of the power spectrum, blind to everything a power spectrum misses.

    Attributes:
      n_out: output dimension.
      power_bands: at most this many bands (>= 1).
      head_hidden: width of the hidden layers.
    """

    n_out: int
    power_bands: int = 32
    head_hidden: int = 64

    @nn.compact
    def __call__(self, maps: jnp.ndarray) -> jnp.ndarray:
        """maps (batch, n_bins, npix, npix) → (batch, n_out)."""
        if maps.ndim != 4:
            raise ValueError(f"expected maps shaped (batch, n_bins, npix, npix), got {maps.shape}")
        h = _PowerBranch(self.power_bands, self.head_hidden)(maps)
        h = nn.silu(nn.Dense(self.head_hidden)(h))
        return nn.Dense(self.n_out)(h)


NETWORKS: dict[str, Callable[..., nn.Module]] = {"resnet": ResNet, "cnn": SimpleCNN,
                                                 "power": PowerNet}


def build_network(name: str, n_out: int, **kw: Any) -> nn.Module:
    """Network ``name`` ("resnet", "cnn" or "power") with ``n_out`` outputs; ``kw`` are its
    attributes (``width``, ``depth``, ``head_hidden``, ``power_bands``, and ``blocks`` for the
    ResNet; the "power" network takes only ``power_bands`` and ``head_hidden``)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    if int(n_out) < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    for key in ("width", "depth", "blocks", "head_hidden"):
        if key in kw and int(kw[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {kw[key]}")
    if "power_bands" in kw and int(kw["power_bands"]) < 0:
        raise ValueError(f"power_bands must be >= 0, got {kw['power_bands']}")
    if name == "power" and int(kw.get("power_bands", 1)) < 1:
        raise ValueError("the 'power' network needs power_bands >= 1")
    try:
        return NETWORKS[name](n_out=int(n_out), **kw)
    except TypeError as err:
        raise ValueError(f"bad options for network {name!r}: {err}") from None
