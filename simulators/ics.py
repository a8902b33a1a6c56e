"""Initial conditions: white noise → linear density → 1LPT/2LPT displacements and momenta.

Conventions. The linear overdensity δ_L is at z = 0 (a = 1) on the particle (Lagrangian) grid. A
particle starts at x = q + D₁ Ψ₁ + D₂ Ψ₂ with Ψ₁ = -∇φ₁, ∇²φ₁ = δ_L, and Ψ₂ = ∇φ₂,
∇²φ₂ = Σ_{i>j} (φ₁,ᵢᵢ φ₁,ⱼⱼ − φ₁,ᵢⱼ²), D₂ ≈ −3/7 D₁² (Scoccimarro 1998). Momenta are
p = a³E dx/da = a²E (f₁D₁Ψ₁ + f₂D₂Ψ₂).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._adjoint import after_cotangents
from .config import SimConfig
from .cosmology import Cosmology, E, GrowthTable, linear_power
from .forces import fourier_kernels, gradient_of_inverse_laplacian

Array = jax.Array


def white_noise(cfg: SimConfig, seed: int | Array) -> Array:
    """Unit-variance Gaussian white noise on the particle grid.

    The same seed gives the same field on any number of devices and any device grid (JAX's
    partitionable threefry generates each element from its global index).

    Args:
      seed: integer seed or a ``jax.random`` key.
    Returns:
      (npx, npy, npz) array of ``cfg.dtype``, laid out on ``cfg.grid``.
    """
    key = jax.random.key(seed) if np.ndim(seed) == 0 and not _is_key(seed) else seed
    draw = jax.jit(lambda k: jax.random.normal(k, cfg.particle_shape, cfg.dtype),
                   out_shardings=cfg.grid.sharding(3))
    return draw(key)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def linear_field(cosmo: Cosmology, cfg: SimConfig, noise: Array) -> Array:
    """Linear overdensity δ_L(x) at z = 0 from white noise.

    δ_L(k) = w(k) sqrt(P_lin(k) / V_cell), with numpy's unnormalised forward FFT, so that the
    field's power spectrum is P_lin(k).

    Args:
      noise: (npx, npy, npz) unit white noise.
    Returns:
      (npx, npy, npz) dimensionless overdensity, dtype of ``noise``.
    """
    # P(k) on a 1-D log-k table, interpolated onto the grid: evaluating the transfer function on
    # every mode would make its reverse-mode gradient store dozens of full-grid f64 intermediates
    # (measured: ~4x the whole forward simulation's memory at 64³). Log-log interpolation over
    # 1024 points is accurate to ~1e-6.
    k_table = _k_table(cfg)
    cell_volume = float(np.prod(cfg.box_size)) / cfg.n_particles
    log_amp = 0.5 * jnp.log(linear_power(cosmo, jnp.asarray(k_table)) / cell_volume)
    return _linear_field(cfg, noise, log_amp.astype(noise.dtype))


def _k_table(cfg: SimConfig) -> np.ndarray:
    """(1024,) log-spaced k in h/Mpc from half the fundamental mode to beyond the grid's corner."""
    shape, box = cfg.particle_shape, cfg.box_size
    k_hi = 1.01 * np.sqrt(3) * np.pi * max(n / length for n, length in zip(shape, box))
    return np.geomspace(np.pi / max(box) / 2, k_hi, 1024)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_field(cfg: SimConfig, noise: Array, log_amp: Array) -> Array:
    """δ_L from white noise and log sqrt(P/V_cell) on ``_k_table`` (``noise``'s dtype).

    Its backward keeps only its inputs and recomputes the grid's interpolation weights after the
    simulation's backward: autodiff would hold ~4 half-mesh index and weight arrays through it.
    """
    grid, shape = cfg.grid, cfg.particle_shape
    dtype = noise.dtype
    k, _, _ = fourier_kernels(grid, shape, cfg.box_size, dtype)
    log_k = 0.5 * jnp.log(jnp.maximum(k[0] ** 2 + k[1] ** 2 + k[2] ** 2, jnp.finfo(dtype).tiny))
    k_table = _k_table(cfg)
    amplitude = jnp.exp(jnp.interp(log_k, jnp.log(jnp.asarray(k_table)).astype(dtype), log_amp))
    amplitude = jnp.where(log_k > np.log(k_table[0]), amplitude, 0.0)  # k = 0 carries no power
    return grid.ifft(grid.fft(noise) * amplitude, shape)


def _linear_field_fwd(cfg, noise, log_amp):
    return _linear_field(cfg, noise, log_amp), (noise, log_amp)


def _linear_field_bwd(cfg, inputs, ct_delta):
    def adjoint(inputs, ct_delta):
        noise, log_amp = inputs
        # inside the conditional the fields' layouts are unknown to the partitioner
        noise, ct_delta = cfg.grid.constrain(noise), cfg.grid.constrain(ct_delta)
        return jax.vjp(partial(_linear_field.fun, cfg), noise, log_amp)[1](ct_delta)

    return after_cotangents(adjoint, inputs, ct_delta)


_linear_field.defvjp(_linear_field_fwd, _linear_field_bwd)


def lpt_displacements(cfg: SimConfig, delta_lin: Array) -> tuple[Array, Array | None]:
    """First- and (if ``cfg.lpt_order == 2``) second-order displacement fields Ψ₁, Ψ₂.

    Args:
      delta_lin: (npx, npy, npz) linear overdensity at z = 0.
    Returns:
      Ψ₁, Ψ₂ each (npx, npy, npz, 3) in Mpc/h (Ψ₂ is None for 1LPT).
    """
    delta_k = cfg.grid.fft(delta_lin)
    psi1 = _psi1(cfg, delta_k)
    if cfg.lpt_order == 1:
        return psi1, None
    return psi1, _psi2(cfg, _source2(*_hessian(cfg, delta_k)))


def lpt_psis(cfg: SimConfig, delta_lin: Array) -> list[Array]:
    """[Ψ₁] or [Ψ₁, Ψ₂] (``cfg.lpt_order``), each (npx, npy, npz, 3) Mpc/h: ``lpt_displacements``
    without the placeholder for a missing Ψ₂."""
    return [psi for psi in lpt_displacements(cfg, delta_lin) if psi is not None]


def lpt_displacements_vjp(cfg: SimConfig, delta_lin: Array, ct_psis: Sequence[Array]) -> Array:
    """Cotangent of ``delta_lin`` from those of ``lpt_psis`` (one per order), written per
    operator so that the 2LPT source's Hessian fields are recomputed here rather than saved: the
    source is quadratic in them, so its adjoint multiplies the source's cotangent by them.

    Returns:
      (npx, npy, npz) cotangent of ``delta_lin``.
    """
    delta_k, fft_vjp = jax.vjp(cfg.grid.fft, delta_lin)
    # the linear maps' primal outputs are unused, so XLA drops them
    ct_k = jax.vjp(partial(_psi1, cfg), delta_k)[1](ct_psis[0])[0]
    if len(ct_psis) == 2:
        fields, hessian_vjp = jax.vjp(lambda dk: tuple(_hessian(cfg, dk)), delta_k)
        xx, yy, zz, xy, xz, yz = fields
        (ct_s,) = jax.vjp(partial(_psi2, cfg), xx)[1](ct_psis[1])
        # ∂source/∂(xx, yy, zz, xy, xz, yz)
        ct_fields = (ct_s * (yy + zz), ct_s * (xx + zz), ct_s * (xx + yy),
                     -2 * ct_s * xy, -2 * ct_s * xz, -2 * ct_s * yz)
        ct_k = ct_k + hessian_vjp(ct_fields)[0]
    return fft_vjp(ct_k)[0]


def _psi1(cfg: SimConfig, delta_k: Array) -> Array:
    """Ψ₁ = -∇φ₁ = -∇∇⁻²δ, (npx, npy, npz, 3) Mpc/h, from δ's spectrum."""
    comps = gradient_of_inverse_laplacian(cfg.grid, cfg.particle_shape, cfg.box_size, delta_k)
    return jnp.stack([-c for c in comps], -1)


_HESSIAN_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def _hessian(cfg: SimConfig, delta_k: Array) -> list[Array]:
    """φ₁,ᵢⱼ for (i, j) in ``_HESSIAN_PAIRS``: six dimensionless (npx, npy, npz) fields, linear in δ."""
    grid, shape = cfg.grid, cfg.particle_shape
    k, kgrad, inv_k2 = fourier_kernels(grid, shape, cfg.box_size, delta_k.real.dtype)
    phi_k = -delta_k * inv_k2  # φ₁
    # φ,ᵢⱼ = -kᵢkⱼ φ(k); the diagonal uses the full k (an even kernel keeps its Nyquist plane)
    kernels = [k[i] * k[j] if i == j else kgrad[i] * kgrad[j] for i, j in _HESSIAN_PAIRS]
    return grid.ifft_many([-kij * phi_k for kij in kernels], shape)


def _source2(xx, yy, zz, xy, xz, yz) -> Array:
    """∇²φ₂ = Σ_{i>j} (φ₁,ᵢᵢ φ₁,ⱼⱼ − φ₁,ᵢⱼ²)."""
    return xx * yy + xx * zz + yy * zz - xy**2 - xz**2 - yz**2


def _psi2(cfg: SimConfig, source: Array) -> Array:
    """Ψ₂ = ∇φ₂ = ∇∇⁻² source, (npx, npy, npz, 3) Mpc/h; linear in the source."""
    comps = gradient_of_inverse_laplacian(cfg.grid, cfg.particle_shape, cfg.box_size,
                                          cfg.grid.fft(source))
    return jnp.stack(comps, -1)


def lpt_coefficients(cosmo: Cosmology, growth: GrowthTable, order: int, a) -> Array:
    """Growth factors that turn Ψ₁, Ψ₂ into displacements and momenta at scale factor ``a``.

    Returns:
      (2, order) float64: row 0 multiplies Ψₙ in the displacement (Dₙ), row 1 in the momentum
      p = a³E dx/da (a²E fₙ Dₙ); column n-1 belongs to Ψₙ.
    """
    a = jnp.asarray(a, jnp.float64)
    a2e = a**2 * E(cosmo, a)
    d1, f1 = growth.D1_at(a), growth.f1_at(a)
    columns = [(d1, a2e * f1 * d1)]
    if order == 2:
        d2, f2 = growth.D2_at(a), growth.f2_at(a)
        columns.append((d2, a2e * f2 * d2))
    return jnp.stack([jnp.stack(c) for c in columns], axis=1)


def lpt_combine(cfg: SimConfig, delta_lin: Array, coefs: Array) -> tuple[Array, Array]:
    """Displacements and momenta Σₙ coefs[:, n-1] Ψₙ from the linear field.

    Args:
      delta_lin: (npx, npy, npz) linear overdensity at z = 0.
      coefs: (2, lpt_order) ``lpt_coefficients`` in ``delta_lin``'s dtype.
    Returns:
      disp (Mpc/h), mom (Mpc/h, H0 = 1): each (npx, npy, npz, 3).
    """
    return lpt_mix(coefs, lpt_psis(cfg, delta_lin))


def lpt_mix(coefs: Array, psis: Sequence[Array]) -> tuple[Array, Array]:
    """(disp, mom) = Σₙ coefs[:, n-1] Ψₙ for ``lpt_psis``' fields."""
    disp = sum(coefs[0, n] * psi for n, psi in enumerate(psis))
    mom = sum(coefs[1, n] * psi for n, psi in enumerate(psis))
    return disp, mom


def lpt_combine_vjp(cfg: SimConfig, delta_lin: Array, coefs: Array, psis: Sequence[Array],
                    ct_disp: Array, ct_mom: Array) -> tuple[Array, Array]:
    """Cotangents of (``delta_lin``, ``coefs``) from those of ``lpt_combine``'s (disp, mom), given
    its Ψₙ (``lpt_psis(cfg, delta_lin)``, recomputed by the caller, which needs them too).

    Returns:
      (npx, npy, npz) cotangent of ``delta_lin``, (2, lpt_order) of ``coefs`` (its dtype).
    """
    ct_coefs = jnp.stack([jnp.stack([jnp.vdot(ct_disp, psi), jnp.vdot(ct_mom, psi)])
                          for psi in psis], axis=1)
    ct_psis = [coefs[0, n] * ct_disp + coefs[1, n] * ct_mom for n in range(len(psis))]
    return lpt_displacements_vjp(cfg, delta_lin, ct_psis), ct_coefs.astype(coefs.dtype)


def lpt_state(cosmo: Cosmology, growth: GrowthTable, cfg: SimConfig, delta_lin: Array,
              a: float) -> tuple[Array, Array]:
    """LPT displacements (Mpc/h) and momenta p = a³E dx/da (Mpc/h, H0 = 1) at scale factor ``a``.

    Returns:
      disp, mom: each (npx, npy, npz, 3) of ``delta_lin``'s dtype.
    """
    coefs = lpt_coefficients(cosmo, growth, cfg.lpt_order, a).astype(delta_lin.dtype)
    return lpt_combine(cfg, delta_lin, coefs)
