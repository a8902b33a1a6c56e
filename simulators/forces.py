"""Fourier-space kernels and the particle-mesh force.

The PM force is F = -∇∇⁻²δ in Mpc/h (positions in Mpc/h), so that with the momentum
p = a³E dx/da (time in 1/H0) the equation of motion reads dp/da = (3/2) Ω_m F / (a² E).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import SimConfig
from .grid import DeviceGrid
from .painting import cic_paint, cic_read

Array = jax.Array


def fourier_kernels(grid: DeviceGrid, shape, box_size, dtype):
    """Wavevector pieces for gradients and inverse Laplacians on ``grid``'s FFT layout.

    Returns:
      k: (kx, ky, kz) in h/Mpc, broadcastable.
      kgrad: same, with the Nyquist plane zeroed: an odd kernel there would break Hermitian
        symmetry (the real output would then depend on how the inverse FFT drops imaginary parts,
        and the one-device and sharded paths would disagree).
      inv_k2: 1/k² with the k = 0 mode set to 0 (removes the mean).
    """
    # built from 1-D wavevectors in the field's dtype, so XLA fuses the 3-D kernels into the
    # loops that consume them instead of materialising (and converting) full f64 grids
    k = grid.wavevectors(shape, box_size, dtype=dtype)
    kgrad = grid.wavevectors(shape, box_size, dtype=dtype, zero_nyquist=True)
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    inv_k2 = jnp.where(k2 > 0, 1 / jnp.where(k2 > 0, k2, 1), 0)
    return k, kgrad, inv_k2


def cic_window(grid: DeviceGrid, shape, box_size, dtype, axes=(0, 1, 2)) -> Array:
    """CIC assignment window Π_i sinc²(k_i Δ_i / 2) over ``axes`` on the FFT layout
    (dimensionless, broadcastable)."""
    k = grid.wavevectors(shape, box_size, dtype=jnp.float64)
    w = jnp.ones((), jnp.float64)
    for i in axes:
        w = w * jnp.sinc(k[i] * (box_size[i] / shape[i]) / (2 * np.pi)) ** 2
    return w.astype(dtype)


def finite_difference_k(grid: DeviceGrid, shape, box_size, dtype):
    """Fourth-order central-difference gradient kernel (8 sin kΔ − sin 2kΔ)/(6Δ), per axis.

    It vanishes at the Nyquist frequency. With a mesh finer than the particle lattice this matters:
    the lattice's first harmonic sits at the mesh Nyquist, its displacement-modulated sidebands
    alias back to large scales when the force is read at the particles, and an exact ik kernel
    (large there) lets them bias the large-scale growth by >10%; this kernel suppresses them.
    """
    k = grid.wavevectors(shape, box_size, dtype=jnp.float64)
    out = []
    for ki, n, length in zip(k, shape, box_size):
        d = length / n
        out.append(((8 * jnp.sin(ki * d) - jnp.sin(2 * ki * d)) / (6 * d)).astype(dtype))
    return tuple(out)  # 1-D, broadcastable


def gradient_of_inverse_laplacian(grid: DeviceGrid, shape, box_size, field_k: Array,
                                  extra: Array | float = 1.0, finite_difference: bool = False
                                  ) -> list[Array]:
    """Real-space components of ∇∇⁻² f from f's spectrum (``grid.fft`` layout), times ``extra``.

    ``finite_difference`` uses ``finite_difference_k`` for ∇ instead of the exact ik.
    """
    dtype = field_k.real.dtype
    _, kgrad, inv_k2 = fourier_kernels(grid, shape, box_size, dtype)
    if finite_difference:
        kgrad = finite_difference_k(grid, shape, box_size, dtype)
    # ∇∇⁻² f  ->  (i k)(-1/k²) f_k = -i k f_k / k²  (one fused loop per component)
    return grid.ifft_many([field_k * (-1j * (kg * inv_k2 * extra)) for kg in kgrad], shape)


def pm_force(cfg: SimConfig, disp: Array) -> Array:
    """PM force at the particles.

    Args:
      cfg: simulation setup (mesh, box, device grid).
      disp: (npx, npy, npz, 3) displacements from the Lagrangian grid in Mpc/h.
    Returns:
      (npx, npy, npz, 3) force F = -∇∇⁻²δ in Mpc/h.
    """
    return pm_force_and_density(cfg, disp)[0]


def pm_force_and_density(cfg: SimConfig, disp: Array) -> tuple[Array, Array]:
    """``pm_force`` and the density 1 + δ it was computed from (``paint_density``, grid layout),
    which observers of the same positions reuse instead of painting it again."""
    density = paint_density(cfg, disp)
    return read_force(cfg, force_mesh(cfg, density), disp), density


def force_mesh(cfg: SimConfig, density: Array) -> Array:
    """(nx, ny, nz, 3) force -∇∇⁻²δ on the mesh, Mpc/h, from the density 1 + δ (``cfg.mesh_shape``);
    linear in the density."""
    grid = cfg.grid
    dtype = density.dtype
    rho_k = grid.fft(density)
    extra = 1.0
    if cfg.deconvolve:  # undo the smoothing of painting and of reading
        extra = 1.0 / cic_window(grid, cfg.mesh_shape, cfg.box_size, dtype) ** 2
    comps = gradient_of_inverse_laplacian(grid, cfg.mesh_shape, cfg.box_size, rho_k, extra,
                                          finite_difference=True)
    return jnp.stack([-c for c in comps], axis=-1)


def read_force(cfg: SimConfig, field: Array, disp: Array) -> Array:
    """(npx, npy, npz, 3) CIC read of the force mesh ``field`` at displacements ``disp`` (Mpc/h)."""
    return cic_read(cfg.grid, field, _in_cells(cfg, disp), cfg.mesh_factor)


def pm_force_and_density_vjp(cfg: SimConfig, disp: Array, density: Array, ct_force: Array,
                             ct_density: Array) -> Array:
    """Cotangent of ``disp`` from those of ``pm_force_and_density(cfg, disp)``'s outputs, given the
    density that call painted: the force mesh is rebuilt from it (FFTs only), so neither the paint
    nor the read is repeated (their primal results are unused and compiled away)."""
    field, mesh_vjp = jax.vjp(lambda rho: force_mesh(cfg, rho), density)
    _, read_vjp = jax.vjp(lambda f, d: read_force(cfg, f, d), field, disp)
    ct_field, ct_disp = read_vjp(ct_force)
    (ct_rho,) = mesh_vjp(ct_field)
    _, paint_vjp = jax.vjp(lambda d: paint_density(cfg, d), disp)
    (ct_disp_paint,) = paint_vjp(ct_rho + ct_density)
    return ct_disp + ct_disp_paint


def paint_density(cfg: SimConfig, disp: Array) -> Array:
    """Density 1 + δ on the force mesh (mean 1), shape ``cfg.mesh_shape``, from displacements in Mpc/h."""
    mass = float(cfg.mesh_factor) ** 3  # mesh cells per particle: mean density 1
    return cic_paint(cfg.grid, cfg.mesh_shape, _in_cells(cfg, disp), cfg.mesh_factor, mass)


def _in_cells(cfg: SimConfig, disp: Array) -> Array:
    """Displacements from Mpc/h to force-mesh cells (cells may differ per axis)."""
    return disp / jnp.asarray(cfg.cell_size, disp.dtype)
