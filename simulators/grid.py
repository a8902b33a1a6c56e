"""The device grid: how fields are laid out over devices. The only module that knows about devices.

A 3-D field of shape (nx, ny, nz) is split into pencils over a 2-D device grid (px, py): device
(i, j) holds x-planes [i nx/px, (i+1) nx/px) and y-rows [j ny/py, (j+1) ny/py), the whole z extent.
Particle arrays, kept in their Lagrangian grid shape (npx, npy, npz, 3), are split the same way, so a
particle lives on the shard of its Lagrangian cell.

Everything that depends on the layout lives here: sharding specs, forward/inverse FFTs (numpy-style
real FFTs on one device, jaxdecomp pencil FFTs when sharded), the matching wavevectors, and the
halo exchange used by per-shard CIC painting and reading. On one device every function takes the
plain path with no sharding machinery at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .runtime import use_gspmd_partitioner

Array = jax.Array
AXIS_NAMES = ("x", "y")


@dataclass(frozen=True)
class DeviceGrid:
    """A (px, py) grid of devices over which fields are split into pencils.

    Attributes:
      pdims: devices along x and y; (1, 1) is the plain single-device path.
      halo: halo width in mesh cells used when painting/reading particles per shard. Particles may
        move at most ``halo - 1`` cells (along x and y) from their Lagrangian cell; the simulation
        measures the largest displacement and raises ``HaloOverflowError`` beyond that.
      backend: jaxdecomp FFT backend, ``"jax"`` (any platform) or ``"cudecomp"`` (GPU); ``"auto"``
        picks cuDecomp on GPU and the JAX backend elsewhere.
    """

    pdims: tuple[int, int] = (1, 1)
    halo: int = 8
    backend: str = "auto"

    def __post_init__(self):
        pdims = tuple(int(p) for p in self.pdims)
        if len(pdims) != 2 or min(pdims) < 1:
            raise ValueError(f"pdims must be two positive integers (px, py), got {self.pdims!r}")
        object.__setattr__(self, "pdims", pdims)
        if int(self.halo) < 2:
            raise ValueError(f"halo must be >= 2 cells (CIC touches 2 cells per axis), got {self.halo}")
        object.__setattr__(self, "halo", int(self.halo))
        if self.backend not in ("auto", "jax", "cudecomp"):
            raise ValueError(f"backend must be 'auto', 'jax' or 'cudecomp', got {self.backend!r}")
        if self.sharded:
            use_gspmd_partitioner()
        # only a sharded grid needs to look at the devices (which starts JAX's backend)
        n_avail = jax.device_count() if self.n_devices > 1 else 1
        if self.n_devices > n_avail:
            raise ValueError(
                f"device grid {pdims[0]}x{pdims[1]} needs {self.n_devices} devices but only "
                f"{n_avail} are available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                f"before importing jax)")

    @property
    def n_devices(self) -> int:
        return self.pdims[0] * self.pdims[1]

    @property
    def sharded(self) -> bool:
        return self.n_devices > 1

    @cached_property
    def mesh(self) -> Mesh | None:
        if not self.sharded:
            return None
        devices = np.asarray(jax.devices()[: self.n_devices]).reshape(self.pdims)
        return Mesh(devices, AXIS_NAMES)

    @property
    def fft_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "cudecomp" if jax.devices()[0].platform == "gpu" else "jax"

    # ---- layout checks -------------------------------------------------------------------
    def check_shape(self, shape: Sequence[int], what: str = "mesh") -> None:
        """Raise ValueError if a 3-D ``shape`` cannot be split over this grid."""
        if not self.sharded:
            return
        for axis, (n, p) in enumerate(zip(shape[:2], self.pdims)):
            name = "xy"[axis]
            if n < p:
                raise ValueError(
                    f"{what} has {n} planes along {name} but the device grid puts {p} devices there; "
                    f"use at most {n} devices along {name}")
            if n % p:
                valid = [d for d in range(1, n + 1) if n % d == 0 and d <= jax.device_count()]
                raise ValueError(
                    f"{what} shape {tuple(shape)} is not divisible by the device grid "
                    f"{self.pdims[0]}x{self.pdims[1]} along {name} ({n} % {p} != 0); "
                    f"valid device counts along {name}: {valid}")
        # jaxdecomp's pencil transposes split y and z across the grid too.
        nx, ny, nz = shape
        px, py = self.pdims
        if ny % px or nz % py:
            raise ValueError(
                f"{what} shape {tuple(shape)} cannot be transposed into pencils on the "
                f"{px}x{py} device grid: need ny % px == 0 and nz % py == 0")
        local = (nx // px, ny // py)
        if self.halo > min(local):
            raise ValueError(
                f"halo of {self.halo} cells exceeds the local {what} extent {local} per device; "
                f"use fewer devices or a smaller halo")

    # ---- shardings ------------------------------------------------------------------------
    def spec(self, ndim: int = 3) -> P:
        return P(*AXIS_NAMES, *([None] * (ndim - 2)))

    def sharding(self, ndim: int = 3) -> NamedSharding | None:
        return NamedSharding(self.mesh, self.spec(ndim)) if self.sharded else None

    def put(self, x) -> Array:
        """Place an array (field or particle grid) with this grid's layout."""
        x = jnp.asarray(x)
        return jax.device_put(x, self.sharding(x.ndim)) if self.sharded else x

    def constrain(self, x: Array) -> Array:
        """Inside jit: pin ``x`` to this grid's layout (no-op on one device)."""
        if not self.sharded:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(x.ndim))

    # ---- FFTs -----------------------------------------------------------------------------
    def fft(self, x: Array) -> Array:
        """Forward FFT of a real (nx, ny, nz) field.

        One device: ``rfftn`` layout (nx, ny, nz//2+1). Sharded: jaxdecomp's complex pencil FFT in
        its transposed layout (ny, nz, nx). Use ``wavevectors`` for the matching k.
        """
        if not self.sharded:
            return jnp.fft.rfftn(x)
        import jaxdecomp  # imported lazily: the single-device path never needs it

        return jaxdecomp.fft.pfft3d(x, backend=self.fft_backend)

    def ifft(self, xk: Array, shape: Sequence[int]) -> Array:
        """Inverse of ``fft`` for a field known to be real; returns (nx, ny, nz) real."""
        return self.ifft_many([xk], shape)[0]

    def ifft_many(self, xks: Sequence[Array], shape: Sequence[int]) -> list[Array]:
        """Inverse FFTs of several Hermitian spectra to real fields.

        Sharded, two real fields share one complex transform (ifft(A + iB) = a + ib), so three
        force components cost two pencil FFTs.
        """
        shape = tuple(shape)
        if not self.sharded:
            return [jnp.fft.irfftn(xk, s=shape) for xk in xks]
        import jaxdecomp

        out = []
        for i in range(0, len(xks), 2):
            pair = xks[i : i + 2]
            packed = pair[0] if len(pair) == 1 else pair[0] + 1j * pair[1]
            z = jaxdecomp.fft.pifft3d(packed, backend=self.fft_backend)
            out.append(z.real)
            if len(pair) == 2:
                out.append(z.imag)
        return out

    def wavevectors(self, shape: Sequence[int], box_size: Sequence[float], dtype=jnp.float64,
                    zero_nyquist: bool = False):
        """Wavevectors (kx, ky, kz) in h/Mpc, each broadcastable to the ``fft`` output layout.

        Args:
          shape: real-space field shape (nx, ny, nz).
          box_size: box side lengths (Lx, Ly, Lz) in Mpc/h.
          zero_nyquist: set k_i = 0 on the Nyquist plane of even axes (for odd kernels such as
            gradients, which would otherwise break Hermitian symmetry there).
        Returns:
          three arrays; on one device shaped for (nx, ny, nz//2+1), sharded for (ny, nz, nx).
        """
        ks = []
        for axis, (n, length) in enumerate(zip(shape, box_size)):
            freq = np.fft.rfftfreq(n) if (axis == 2 and not self.sharded) else np.fft.fftfreq(n)
            if zero_nyquist and n % 2 == 0:
                freq = np.where(np.abs(freq) == 0.5, 0.0, freq)
            ks.append(jnp.asarray(2 * np.pi * n / length * freq, dtype=dtype))
        # axis position of (kx, ky, kz) in the k-space layout
        position = (0, 1, 2) if not self.sharded else (2, 0, 1)
        out = []
        for k, pos in zip(ks, position):
            bshape = [1, 1, 1]
            bshape[pos] = k.shape[0]
            out.append(k.reshape(bshape))
        return tuple(out)

    # ---- per-shard particle/mesh operations ---------------------------------------------
    def shard_map(self, f, in_ndims: Sequence[int | None], out_ndim: int):
        """Map ``f`` over shards; arguments with an ndim are split as pencils, arguments with
        ``None`` (any pytree) reach every shard whole, and the result is split as pencils.

        Pass traced values that ``f`` needs (e.g. cosmology-dependent tables) as ``None``
        arguments rather than closing over them: a closed-over tracer carries the outer, automatic
        sharding into the manual region, which jax rejects when such a value is differentiated
        inside another trace (blackjax's MCLMC tuning)."""
        return jax.shard_map(
            f,
            mesh=self.mesh,
            in_specs=tuple(P() if d is None else self.spec(d) for d in in_ndims),
            out_specs=self.spec(out_ndim),
            # the compiled CIC kernels (FFI calls) carry no varying-axes type; their custom
            # gradients would fail the check although every value in here is per-shard
            check_vma=False,
        )


# ---- halo exchange (inside shard_map) ------------------------------------------------------
# ``halo_fill`` pads a shard with copies of its neighbours' edges (used before reading);
# ``halo_reduce`` adds each halo back onto the neighbour that owns it (used after painting).
# They are exact adjoints of each other: built from slices, concatenation and ppermute, whose
# transposes JAX knows, so gradients through them are right by construction (and tested).


def _shift(x: Array, axis_name: str, n: int, offset: int) -> Array:
    """Send ``x`` to the shard ``offset`` steps further along ``axis_name`` (periodic)."""
    if n == 1:
        return x
    return jax.lax.ppermute(x, axis_name, perm=[(i, (i + offset) % n) for i in range(n)])


def halo_fill(x: Array, halo: int, axis: int, axis_name: str, n: int) -> Array:
    """Pad ``x`` by ``halo`` on both sides of ``axis`` with the neighbours' edge cells."""
    lo = jax.lax.slice_in_dim(x, 0, halo, axis=axis)
    hi = jax.lax.slice_in_dim(x, x.shape[axis] - halo, x.shape[axis], axis=axis)
    from_lower = _shift(hi, axis_name, n, +1)  # my lower halo is my lower neighbour's upper edge
    from_upper = _shift(lo, axis_name, n, -1)
    return jnp.concatenate([from_lower, x, from_upper], axis=axis)


def halo_reduce(x: Array, halo: int, axis: int, axis_name: str, n: int) -> Array:
    """Remove the ``halo`` padding of ``axis``, adding each halo onto the shard that owns it."""
    size = x.shape[axis] - 2 * halo
    lo = jax.lax.slice_in_dim(x, 0, halo, axis=axis)
    hi = jax.lax.slice_in_dim(x, size + halo, size + 2 * halo, axis=axis)
    core = jax.lax.slice_in_dim(x, halo, size + halo, axis=axis)
    to_upper_edge = _shift(lo, axis_name, n, -1)  # my lower halo belongs to my lower neighbour
    to_lower_edge = _shift(hi, axis_name, n, +1)
    idx_lo = [slice(None)] * x.ndim
    idx_hi = [slice(None)] * x.ndim
    idx_lo[axis] = slice(0, halo)
    idx_hi[axis] = slice(size - halo, size)
    core = core.at[tuple(idx_lo)].add(to_lower_edge)
    return core.at[tuple(idx_hi)].add(to_upper_edge)


def pad_shard(grid: DeviceGrid, x: Array) -> Array:
    """Inside shard_map: fill x and y halos (x first, then y so corners come from diagonals)."""
    px, py = grid.pdims
    x = halo_fill(x, grid.halo, 0, "x", px)
    return halo_fill(x, grid.halo, 1, "y", py)


def unpad_shard(grid: DeviceGrid, x: Array) -> Array:
    """Inside shard_map: the adjoint of ``pad_shard`` (y first, then x)."""
    px, py = grid.pdims
    x = halo_reduce(x, grid.halo, 1, "y", py)
    return halo_reduce(x, grid.halo, 0, "x", px)
