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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["ResNet", "SimpleCNN", "NETWORKS", "build_network"]


def _to_nhwc(x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4:
        raise ValueError(f"expected maps shaped (batch, n_bins, npix, npix), got {x.shape}")
    return jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))


class _Head(nn.Module):
    """Global average pool, one hidden layer, linear output."""

    n_out: int
    hidden: int

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        h = jnp.mean(h, axis=(1, 2))
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
    """

    n_out: int
    width: int = 16
    depth: int = 3
    blocks: int = 1
    head_hidden: int = 64

    @nn.compact
    def __call__(self, maps: jnp.ndarray) -> jnp.ndarray:
        """maps (batch, n_bins, npix, npix) → (batch, n_out)."""
        h = nn.Conv(self.width, (3, 3), padding="SAME")(_to_nhwc(maps))
        for stage in range(self.depth):
            channels = self.width * 2**stage
            for block in range(self.blocks):
                stride = 2 if (stage > 0 and block == 0) else 1
                h = _ResBlock(channels, stride)(h)
        return _Head(self.n_out, self.head_hidden)(nn.silu(h))


class SimpleCNN(nn.Module):
    """Plain CNN: ``depth`` stride-2 convolutions (channels doubling), pool, MLP head.

    Attributes:
      n_out: output dimension.
      width: channels of the first convolution.
      depth: number of convolutions (>= 1).
      head_hidden: width of the head's hidden layer.
    """

    n_out: int
    width: int = 16
    depth: int = 3
    head_hidden: int = 64

    @nn.compact
    def __call__(self, maps: jnp.ndarray) -> jnp.ndarray:
        """maps (batch, n_bins, npix, npix) → (batch, n_out)."""
        h = _to_nhwc(maps)
        for layer in range(self.depth):
            h = nn.Conv(self.width * 2**layer, (3, 3), strides=2, padding="SAME")(h)
            h = nn.silu(h)
        return _Head(self.n_out, self.head_hidden)(h)


NETWORKS: dict[str, Callable[..., nn.Module]] = {"resnet": ResNet, "cnn": SimpleCNN}


def build_network(name: str, n_out: int, **kw: Any) -> nn.Module:
    """Network ``name`` ("resnet" or "cnn") with ``n_out`` outputs; ``kw`` are its attributes
    (``width``, ``depth``, ``head_hidden``, and ``blocks`` for the ResNet)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    if int(n_out) < 1:
        raise ValueError(f"n_out must be >= 1, got {n_out}")
    for key in ("width", "depth", "blocks", "head_hidden"):
        if key in kw and int(kw[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {kw[key]}")
    try:
        return NETWORKS[name](n_out=int(n_out), **kw)
    except TypeError as err:
        raise ValueError(f"bad options for network {name!r}: {err}") from None
