"""Cloud-in-cell (CIC) painting of particles onto a mesh and reading of mesh values at particles.

Particles are given as displacements from their Lagrangian grid, in mesh-cell units, with shape
(npx, npy, npz, 3); particle (i, j, k) sits at cell coordinate (i, j, k) * mesh_factor + disp.
On one device the mesh is periodic; sharded, each shard paints into its pencil padded by a halo and
the halos are summed onto their owners (``grid.unpad_shard``), or filled from the neighbours before
reading (``grid.pad_shard``).

Two implementations of the per-shard work, equal to round-off: compiled C++ kernels on CPU
(``native``; XLA's CPU scatter/gather is several times slower) with hand-written gradients, and
pure JAX elsewhere (GPU, or no compiler): eight chained scatter-adds (one per cell corner, faster
than one flattened scatter) and gathers of whole rows of an interleaved (cells, C) field. Both keep
particles in Lagrangian order, which keeps the memory access local.
"""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp

from . import native
from .grid import DeviceGrid, pad_shard, unpad_shard

Array = jax.Array


def _corners(shape, disp, mesh_factor: int, offset: int, wrap: bool):
    """Flat indices and CIC weights of the 8 cells around each particle.

    Args:
      shape: (nx, ny, nz) of the (possibly halo-padded) local mesh.
      disp: (npx, npy, npz, 3) displacements in cells.
      offset: padding cells added to x and y (the halo); z is always periodic.
      wrap: periodic in x and y too (single-device path).
    Returns:
      list of 8 (flat_index (N,), weight (N,)) pairs.
    """
    nx, ny, nz = shape
    npx, npy, npz, _ = disp.shape
    q = [jnp.arange(n, dtype=disp.dtype) * mesh_factor for n in (npx, npy, npz)]
    pos = [
        q[0][:, None, None] + disp[..., 0] + offset,
        q[1][None, :, None] + disp[..., 1] + offset,
        q[2][None, None, :] + disp[..., 2],
    ]
    cells, fracs = [], []
    for axis, (x, n) in enumerate(zip(pos, shape)):
        x = x.reshape(-1)
        i0 = jnp.floor(x)
        f = x - i0
        i0 = i0.astype(jnp.int32)
        i1 = i0 + 1
        if wrap or axis == 2:
            i0, i1 = i0 % n, i1 % n
        else:  # out-of-halo particles are caught by the displacement check; clip keeps memory safe
            i0, i1 = jnp.clip(i0, 0, n - 1), jnp.clip(i1, 0, n - 1)
        cells.append((i0, i1))
        fracs.append((1 - f, f))
    out = []
    for cx, cy, cz in itertools.product((0, 1), repeat=3):
        idx = (cells[0][cx] * ny + cells[1][cy]) * nz + cells[2][cz]
        w = fracs[0][cx] * fracs[1][cy] * fracs[2][cz]
        out.append((idx, w))
    return out


def _paint_local(shape, disp, mesh_factor, offset, wrap, weight):
    if native.available(disp.dtype):
        values = jnp.full(disp.shape[:3] + (1,), weight, disp.dtype)
        return _paint_native(tuple(shape), disp, values, mesh_factor, offset, wrap)[..., 0]
    return _paint_xla(shape, disp, mesh_factor, offset, wrap, weight)


def _read_local(field, disp, mesh_factor, offset, wrap):
    if native.available(disp.dtype):
        return _read_native(field, disp, mesh_factor, offset, wrap)
    return _read_xla(field, disp, mesh_factor, offset, wrap)


# ---- compiled CPU kernels with their gradients --------------------------------------------
# paint: mesh = P(disp) values      read: out = R(disp) field      (P = Rᵀ for fixed disp)
# ∂/∂values of <ct, P values> = R ct;  ∂/∂disp via ``read_grad`` (derivative of the weights).

@partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _paint_native(shape, disp, values, mesh_factor, offset, wrap):
    return native.paint(shape, disp, values, mesh_factor, offset, wrap)


def _paint_native_fwd(shape, disp, values, mesh_factor, offset, wrap):
    return _paint_native(shape, disp, values, mesh_factor, offset, wrap), (disp, values)


def _paint_native_bwd(shape, mesh_factor, offset, wrap, res, ct):
    disp, values = res
    return (native.read_grad(ct, disp, values, mesh_factor, offset, wrap),
            native.read(ct, disp, mesh_factor, offset, wrap))


_paint_native.defvjp(_paint_native_fwd, _paint_native_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _read_native(field, disp, mesh_factor, offset, wrap):
    return native.read(field, disp, mesh_factor, offset, wrap)


def _read_native_fwd(field, disp, mesh_factor, offset, wrap):
    return _read_native(field, disp, mesh_factor, offset, wrap), (field, disp)


def _read_native_bwd(mesh_factor, offset, wrap, res, ct):
    field, disp = res
    return (native.paint(field.shape[:3], disp, ct, mesh_factor, offset, wrap),
            native.read_grad(field, disp, ct, mesh_factor, offset, wrap))


_read_native.defvjp(_read_native_fwd, _read_native_bwd)


# Interpolation at fixed points (the lightcone's ray samples): the points are the Lagrangian grid
# of an (N, 1, 1) "particle" array with mesh_factor 0, so the particle kernels serve them. Their
# positions do not depend on anything differentiated, so the backward pass is the paint alone.

@jax.custom_vjp
def _read_points_native(field, cells, count):
    n = cells.shape[0]
    out = native.read_first(field, cells.reshape(n, 1, 1, 3), count, 0, 0, True)
    return out.reshape(n, field.shape[-1])


def _read_points_native_fwd(field, cells, count):
    return _read_points_native(field, cells, count), (field.shape[:3], cells)


def _read_points_native_bwd(res, ct):
    # the points past ``count`` read 0 whatever the field: their cotangents do not reach it (the
    # paint skips points whose values are 0, and the caller's are 0 there)
    shape, cells = res
    n = cells.shape[0]
    ct_field = native.paint(shape, cells.reshape(n, 1, 1, 3), ct.reshape(n, 1, 1, -1), 0, 0, True)
    return ct_field, jnp.zeros_like(cells), None


_read_points_native.defvjp(_read_points_native_fwd, _read_points_native_bwd)


def read_points_periodic(field: Array, cells: Array, count: Array | None = None) -> Array | None:
    """Trilinear (CIC) interpolation of a periodic one-device mesh at fixed points with the compiled
    CPU kernels, or None where they do not run (then the caller gathers in JAX).

    Args:
      field: (nx, ny, nz, C) mesh values; cell i's value sits at coordinate i.
      cells: (N, 3) cell coordinates of the points, treated as constants (no gradient flows to them).
      count: optional int scalar (may be traced): only the first ``count`` points are read, the
        others return 0 (and must get zero cotangents: the adjoint paints them as they come).
    Returns:
      (N, C) values; differentiable in ``field`` (the adjoint paints the cotangents).
    """
    if not native.available(field.dtype):
        return None
    n = cells.shape[0] if count is None else jnp.minimum(count, cells.shape[0])
    return _read_points_native(field, jax.lax.stop_gradient(cells.astype(field.dtype)),
                               jnp.asarray(n, jnp.int32))


# ---- pure-JAX path (GPU, or no compiler) --------------------------------------------------

def _paint_xla(shape, disp, mesh_factor, offset, wrap, weight):
    mesh = jnp.zeros(shape[0] * shape[1] * shape[2], disp.dtype)
    for idx, w in _corners(shape, disp, mesh_factor, offset, wrap):
        mesh = mesh.at[idx].add(w * weight)
    return mesh.reshape(shape)


def _read_xla(field, disp, mesh_factor, offset, wrap):
    shape = field.shape[:3]
    rows = field.reshape(shape[0] * shape[1] * shape[2], -1)
    out = 0
    for idx, w in _corners(shape, disp, mesh_factor, offset, wrap):
        out = out + rows[idx] * w[:, None]
    return out.reshape(*disp.shape[:3], rows.shape[1])


def cic_paint(grid: DeviceGrid, mesh_shape, disp: Array, mesh_factor: int = 1,
              weight: float | Array = 1.0) -> Array:
    """Paint particles with CIC; each particle deposits ``weight`` (total mass is conserved).

    Args:
      grid: device grid; ``disp`` must carry its layout.
      mesh_shape: (nx, ny, nz) cells.
      disp: (npx, npy, npz, 3) displacements from the Lagrangian grid, in cells.
      mesh_factor: mesh cells per particle spacing.
      weight: scalar mass per particle.
    Returns:
      (nx, ny, nz) painted mass, same dtype as ``disp``.
    """
    mesh_shape = tuple(mesh_shape)
    if not grid.sharded:
        return _paint_local(mesh_shape, disp, mesh_factor, 0, True, weight)
    px, py = grid.pdims
    h = grid.halo
    local = (mesh_shape[0] // px + 2 * h, mesh_shape[1] // py + 2 * h, mesh_shape[2])

    def shard(d):
        painted = _paint_local(local, d, mesh_factor, h, False, weight)
        return unpad_shard(grid, painted)

    return grid.shard_map(shard, (4,), 3)(disp)


def cic_read(grid: DeviceGrid, field: Array, disp: Array, mesh_factor: int = 1) -> Array:
    """Interpolate a mesh field to particle positions with CIC (the adjoint of painting).

    Args:
      field: (nx, ny, nz, C) mesh values (C components interleaved).
      disp: (npx, npy, npz, 3) displacements in cells.
    Returns:
      (npx, npy, npz, C) values at the particles.
    """
    if not grid.sharded:
        return _read_local(field, disp, mesh_factor, 0, True)
    h = grid.halo

    def shard(f, d):
        return _read_local(pad_shard(grid, f), d, mesh_factor, h, False)

    return grid.shard_map(shard, (4, 4), 4)(field, disp)

