"""Initial conditions: white noise → linear density → 1LPT/2LPT displacements and momenta.

Conventions. The linear overdensity δ_L is at z = 0 (a = 1) on the particle (Lagrangian) grid. A
particle starts at x = q + D₁ Ψ₁ + D₂ Ψ₂ with Ψ₁ = -∇φ₁, ∇²φ₁ = δ_L, and Ψ₂ = ∇φ₂,
∇²φ₂ = Σ_{i>j} (φ₁,ᵢᵢ φ₁,ⱼⱼ − φ₁,ᵢⱼ²), D₂ ≈ −3/7 D₁² (Scoccimarro 1998). Momenta are
p = a³E dx/da = a²E (f₁D₁Ψ₁ + f₂D₂Ψ₂).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

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
    grid = cfg.grid
    shape, box = cfg.particle_shape, cfg.box_size
    dtype = noise.dtype
    k, _, _ = fourier_kernels(grid, shape, box, dtype)
    log_k = 0.5 * jnp.log(jnp.maximum(k[0] ** 2 + k[1] ** 2 + k[2] ** 2, jnp.finfo(dtype).tiny))
    # P(k) on a 1-D log-k table, interpolated onto the grid: evaluating the transfer function on
    # every mode would make its reverse-mode gradient store dozens of full-grid f64 intermediates
    # (measured: ~4x the whole forward simulation's memory at 64³). Log-log interpolation over
    # 1024 points is accurate to ~1e-6.
    k_lo = np.pi / max(box) / 2
    k_hi = 1.01 * np.sqrt(3) * np.pi * max(n / length for n, length in zip(shape, box))
    k_table = jnp.geomspace(k_lo, k_hi, 1024)
    cell_volume = float(np.prod(box)) / cfg.n_particles
    log_amp = 0.5 * jnp.log(linear_power(cosmo, k_table) / cell_volume)
    amplitude = jnp.exp(jnp.interp(log_k, jnp.log(k_table).astype(dtype), log_amp.astype(dtype)))
    amplitude = jnp.where(log_k > np.log(k_lo), amplitude, 0.0)  # the k = 0 mode carries no power
    return grid.ifft(grid.fft(noise) * amplitude, shape)


def lpt_displacements(cfg: SimConfig, delta_lin: Array) -> tuple[Array, Array | None]:
    """First- and (if ``cfg.lpt_order == 2``) second-order displacement fields Ψ₁, Ψ₂.

    Args:
      delta_lin: (npx, npy, npz) linear overdensity at z = 0.
    Returns:
      Ψ₁, Ψ₂ each (npx, npy, npz, 3) in Mpc/h (Ψ₂ is None for 1LPT).
    """
    grid = cfg.grid
    shape, box = cfg.particle_shape, cfg.box_size
    dtype = delta_lin.dtype
    delta_k = grid.fft(delta_lin)
    # Ψ₁ = -∇φ₁ = -∇∇⁻²δ
    psi1 = jnp.stack([-c for c in gradient_of_inverse_laplacian(grid, shape, box, delta_k)], -1)
    if cfg.lpt_order == 1:
        return psi1, None
    k, kgrad, inv_k2 = fourier_kernels(grid, shape, box, dtype)
    phi_k = -delta_k * inv_k2  # φ₁
    # second derivatives φ,ᵢⱼ = -kᵢkⱼ φ(k); diagonal terms use the full k (even kernel)
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    kernels = [k[i] * k[j] if i == j else kgrad[i] * kgrad[j] for i, j in pairs]
    xx, yy, zz, xy, xz, yz = grid.ifft_many([-kij * phi_k for kij in kernels], shape)
    source = xx * yy + xx * zz + yy * zz - xy**2 - xz**2 - yz**2
    # Ψ₂ = ∇φ₂ = ∇∇⁻² source
    psi2 = jnp.stack(gradient_of_inverse_laplacian(grid, shape, box, grid.fft(source)), -1)
    return psi1, psi2


def lpt_state(cosmo: Cosmology, growth: GrowthTable, cfg: SimConfig, delta_lin: Array,
              a: float) -> tuple[Array, Array]:
    """LPT displacements (Mpc/h) and momenta p = a³E dx/da (Mpc/h, H0 = 1) at scale factor ``a``.

    Returns:
      disp, mom: each (npx, npy, npz, 3) of ``delta_lin``'s dtype.
    """
    dtype = delta_lin.dtype
    psi1, psi2 = lpt_displacements(cfg, delta_lin)
    a = jnp.asarray(a, jnp.float64)
    d1, f1 = growth.D1_at(a), growth.f1_at(a)
    a2e = a**2 * E(cosmo, a)
    disp = d1.astype(dtype) * psi1
    mom = (a2e * f1 * d1).astype(dtype) * psi1
    if psi2 is not None:
        d2, f2 = growth.D2_at(a), growth.f2_at(a)
        disp = disp + d2.astype(dtype) * psi2
        mom = mom + (a2e * f2 * d2).astype(dtype) * psi2
    return disp, mom
