"""Compression losses (Lanzieri et al. 2025), all on *standardised* parameters y = (θ - mean)/std.

Every loss maps network outputs ``out`` (batch, n_out) and targets ``y`` (batch, d) to one float32
value per map, (batch,); the training loss is their batch mean:

- ``mse``:  mean over parameters of (out - y)²; n_out = d.
- ``mae``:  mean over parameters of |out - y|; n_out = d.
- ``gnll``: Gaussian negative log-likelihood with a full covariance, in nats per map:
  out = [μ (d), the d(d+1)/2 lower-triangular entries of L (row-major)], where L is the
  Cholesky factor of the *precision* Σ⁻¹ = L Lᵀ with a softplus-positive diagonal, so
  -log N(y | μ, Σ) = ½ |Lᵀ(y - μ)|² - Σ_i log L_ii + (d/2) log 2π. n_out = d + d(d+1)/2.
- ``vmim``: -log q(y | t) with t = out the summary and q a conditional flow
  (``compressors.flow``), trained jointly; n_out = the summary dimension (any, default d).

The summary a user gets back is the (de-standardised) point estimate μ for mse/mae/gnll and the
raw network output t for vmim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["LOSSES", "n_outputs", "point_estimate", "mse", "mae", "gnll", "gnll_split",
           "vmim"]

LOSSES: tuple[str, ...] = ("mse", "mae", "gnll", "vmim")

# Keeps the precision's diagonal away from 0 (infinite variance) so the NLL stays bounded.
_DIAG_FLOOR = 1e-3


def n_outputs(loss: str, d: int, summary_dim: int | None = None) -> int:
    """Network outputs needed by ``loss`` for d parameters (``summary_dim`` is VMIM's t size)."""
    if loss in ("mse", "mae"):
        return d
    if loss == "gnll":
        return d + d * (d + 1) // 2
    if loss == "vmim":
        return d if summary_dim is None else int(summary_dim)
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def point_estimate(loss: str, out: jnp.ndarray, d: int) -> jnp.ndarray:
    """The summary part of network outputs (batch, n_out): μ (batch, d), or t for vmim."""
    return out if loss == "vmim" else out[..., :d]


def mse(out: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Squared error averaged over parameters, (batch,)."""
    return jnp.mean((out - y) ** 2, axis=-1)


def mae(out: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Absolute error averaged over parameters, (batch,)."""
    return jnp.mean(jnp.abs(out - y), axis=-1)


def gnll_split(out: jnp.ndarray, d: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """out (…, d + d(d+1)/2) → μ (…, d) and the precision's Cholesky factor L (…, d, d)."""
    rows, cols = jnp.tril_indices(d)
    entries = out[..., d:]
    diag = rows == cols
    # softplus on the diagonal entries only, identity below it.
    entries = jnp.where(diag, jax.nn.softplus(entries) + _DIAG_FLOOR, entries)
    chol = jnp.zeros(out.shape[:-1] + (d, d), out.dtype).at[..., rows, cols].set(entries)
    return out[..., :d], chol


def gnll(out: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """-log N(y | μ, (L Lᵀ)⁻¹) in nats, (batch,)."""
    d = y.shape[-1]
    mu, chol = gnll_split(out, d)
    white = jnp.einsum("...ji,...j->...i", chol, y - mu)          # Lᵀ (y - μ)
    logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    nll = 0.5 * jnp.sum(white**2, -1) - logdet + 0.5 * d * math.log(2.0 * math.pi)
    return nll


def vmim(log_q: jnp.ndarray) -> jnp.ndarray:
    """log q(y | t) (batch,) from the flow → -log q, nats per map, (batch,)."""
    return -log_q


HEAD_LOSSES = {"mse": mse, "mae": mae, "gnll": gnll}
