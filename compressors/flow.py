"""Conditional normalizing flow q(θ | context) in flax, for any dimension d >= 1.

Structure (θ → z direction, i.e. the density-evaluation direction)::

    z = P_L ∘ T_L ∘ ... ∘ P_1 ∘ T_1 (θ),    z ~ N(0, I_d)

Each ``T_l`` is *autoregressive*: output i is a monotone scalar map of input i,
``z_i = g(θ_i; φ_i)``, whose parameters φ_i come from an MLP of (θ_<i, context). The Jacobian is
therefore triangular, ``log|det J| = Σ_i log g'(θ_i; φ_i)``, and the flow is valid for d = 1,
where the transform depends on the context only (coupling layers alone cannot do this). ``P_l``
reverses the order of the dimensions (volume-preserving) so every dimension conditions on every
other across layers.

The scalar map is an affine step followed by a sinh-arcsinh step (Jones & Pewsey 2009)::

    u = (x - μ) e^{-s},    g(x) = sinh(δ asinh(u) - ε),
    log g'(x) = -s + log δ + log cosh(δ asinh(u) - ε) - ½ log(1 + u²)

which is strictly increasing for δ > 0, has a closed-form inverse
``x = μ + e^{s} sinh((asinh(z) + ε) / δ)`` (so sampling is exact), and adds skewness (ε) and
tail weight (δ) to a Gaussian. s, ε and δ are softly bounded (|s| ≤ 5, |ε| ≤ 3,
δ ∈ [e^{-0.7}, e^{0.7}]) so that a random or badly trained conditioner cannot produce
numerically degenerate maps; with the conditioner's last layer initialised at zero, each layer
starts as the identity and a fresh flow is exactly N(0, I).

Rather than one network per dimension, one MLP per layer takes (θ ⊙ mask_i, onehot(i), context)
for all i at once (a (…, d, 2d + c) input): the mask zeroes θ_j for j ≥ i, which is what makes
the layer autoregressive.

Usage (flax module methods)::

    flow = ConditionalFlow(dim=2, n_layers=4, hidden=32)
    params = flow.init(key, theta, context)["params"]             # theta (n, d), context (n, c)
    logq = flow.apply({"params": params}, theta, context)         # (n,)  == method=log_prob
    draws = flow.apply({"params": params}, key, ctx, 1000, method=ConditionalFlow.sample)

or the functional wrappers ``log_prob(flow, params, theta, context)`` and
``sample(flow, params, key, context, n)``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ConditionalFlow", "log_prob", "sample"]

_S_MAX = 5.0
_EPS_MAX = 3.0
_LOG_DELTA_MAX = 0.7


def _log_cosh(a: jnp.ndarray) -> jnp.ndarray:
    """log cosh a without overflow for large |a|."""
    a = jnp.abs(a)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - math.log(2.0)


def _bounded(raw: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Conditioner outputs (…, 4) → (μ, s, ε, log δ), softly bounded; all zero ↦ identity."""
    mu = raw[..., 0]
    s = _S_MAX * jnp.tanh(raw[..., 1] / _S_MAX)
    eps = _EPS_MAX * jnp.tanh(raw[..., 2] / _EPS_MAX)
    log_delta = _LOG_DELTA_MAX * jnp.tanh(raw[..., 3])
    return mu, s, eps, log_delta


def _forward_scalar(x, raw):
    """x → z = g(x) and log g'(x), elementwise."""
    mu, s, eps, log_delta = _bounded(raw)
    u = (x - mu) * jnp.exp(-s)
    a = jnp.exp(log_delta) * jnp.arcsinh(u) - eps
    z = jnp.sinh(a)
    logdet = -s + log_delta + _log_cosh(a) - 0.5 * jnp.log1p(u * u)
    return z, logdet


def _inverse_scalar(z, raw):
    """z → x = g⁻¹(z), elementwise."""
    mu, s, eps, log_delta = _bounded(raw)
    u = jnp.sinh((jnp.arcsinh(z) + eps) * jnp.exp(-log_delta))
    return mu + jnp.exp(s) * u


class _Conditioner(nn.Module):
    """Parameters φ_i (…, d, 4) of every dimension from (x_<i, context)."""

    dim: int
    hidden: int
    n_hidden: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        d = self.dim
        strictly_lower = jnp.tril(jnp.ones((d, d), jnp.float32), k=-1)     # [i, j] = j < i
        batch = x.shape[:-1]
        masked = x[..., None, :] * strictly_lower                          # (…, d, d)
        onehot = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), batch + (d, d))
        ctx = jnp.broadcast_to(context[..., None, :], batch + (d, context.shape[-1]))
        h = jnp.concatenate([masked, onehot, ctx], axis=-1)
        for _ in range(self.n_hidden):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(4, kernel_init=nn.initializers.zeros)(h)


class ConditionalFlow(nn.Module):
    """q(θ | context): autoregressive sinh-arcsinh flow with a N(0, I) base.

    Attributes:
      dim: d, dimension of θ (>= 1).
      n_layers: number of autoregressive layers.
      hidden: width of each conditioner's hidden layers.
      n_hidden: number of hidden layers per conditioner.
    """

    dim: int
    n_layers: int = 4
    hidden: int = 32
    n_hidden: int = 2

    def setup(self):
        if self.dim < 1 or self.n_layers < 1:
            raise ValueError(f"flow needs dim >= 1 and n_layers >= 1, got {self.dim}, "
                             f"{self.n_layers}")
        self.conditioners = [_Conditioner(self.dim, self.hidden, self.n_hidden)
                             for _ in range(self.n_layers)]

    def _check(self, theta: jnp.ndarray, context: jnp.ndarray):
        if theta.shape[-1] != self.dim:
            raise ValueError(f"theta must end in dim={self.dim}, got shape {theta.shape}")
        if context.ndim != theta.ndim:
            raise ValueError(f"context {context.shape} and theta {theta.shape} must both be "
                             "(n, ·)")

    def forward(self, theta: jnp.ndarray, context: jnp.ndarray):
        """θ (n, d), context (n, c) → z (n, d) and log|det ∂z/∂θ| (n,)."""
        self._check(theta, context)
        z = theta.astype(jnp.float32)
        context = context.astype(jnp.float32)
        logdet = jnp.zeros(z.shape[:-1], jnp.float32)
        for cond in self.conditioners:
            z, ld = _forward_scalar(z, cond(z, context))
            logdet = logdet + ld.sum(-1)
            z = z[..., ::-1]
        return z, logdet

    def log_prob(self, theta: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        """log q(θ | context) in nats, (n,), for θ (n, d) and context (n, c)."""
        z, logdet = self.forward(theta, context)
        base = -0.5 * jnp.sum(z * z, -1) - 0.5 * self.dim * math.log(2.0 * math.pi)
        return base + logdet

    def __call__(self, theta: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        return self.log_prob(theta, context)

    def inverse(self, z: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        """z (n, d), context (n, c) → θ (n, d); inverts ``forward`` one dimension at a time."""
        context = context.astype(jnp.float32)
        x = z.astype(jnp.float32)
        for cond in reversed(self.conditioners):
            y = x[..., ::-1]                     # undo the permutation
            x = jnp.zeros_like(y)
            # Output i depends on x_<i only, so d passes recover x exactly, in order.
            for i in range(self.dim):
                raw = cond(x, context)[..., i, :]
                # float32 like x, whatever dtype the parameters were given in
                x = x.at[..., i].set(_inverse_scalar(y[..., i], raw).astype(x.dtype))
        return x

    def sample(self, key: jax.Array, context: jnp.ndarray, n: int) -> jnp.ndarray:
        """n draws θ (n, d) from q(· | context); context (c,) is shared, (n, c) is per draw."""
        context = jnp.asarray(context, jnp.float32)
        if context.ndim == 1:
            context = jnp.broadcast_to(context, (n, context.shape[0]))
        if context.shape[0] != n:
            raise ValueError(f"context has {context.shape[0]} rows, expected {n} (or pass (c,))")
        z = jax.random.normal(key, (n, self.dim), jnp.float32)
        return self.inverse(z, context)


def log_prob(flow: ConditionalFlow, params, theta, context) -> jnp.ndarray:
    """log q(θ | context), (n,), for θ (n, d) and context (n, c)."""
    return flow.apply({"params": params}, jnp.asarray(theta), jnp.asarray(context))


def sample(flow: ConditionalFlow, params, key: jax.Array, context, n: int) -> jnp.ndarray:
    """n draws (n, d) from q(· | context), context (c,) or (n, c)."""
    return flow.apply({"params": params}, key, context, n, method=ConditionalFlow.sample)
