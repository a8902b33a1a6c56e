"""Past lightcone of a PM simulation, projected into Born convergence maps while the run goes.

Geometry. The observer sits at ``Lightcone.observer`` (Mpc/h, box coordinates). The box is tiled
periodically ("replicas") out to the depth ``chi_max``; each replica may get its own random shift
and cube-symmetry rotation, which breaks the periodic repetition of structures along the line of
sight. The sky is a square flat patch (gnomonic coordinates θ = (x/z, y/z) around the +z axis) or
the HEALPix sphere (RING ordering).

Born projection. During the step a₀ → a₁ the lightcone radius shrinks from χ₀ = χ(a₀) to
χ₁ = χ(a₁). Rays are sampled at fixed radii χ_s = (s + ½)Δχ (Δχ ≲ one mesh cell, the same for
every cosmology); each sample stands for the interval [sΔχ, (s+1)Δχ], and the part ℓ_s of it inside
the shell [χ₁, χ₀] is the sample's weight in this step. At χ_s every pixel's ray reads the CIC
density contrast δ of the mesh (trilinear interpolation) at the point χ_s n̂_pix, linearly
interpolated in time between the densities painted at a₀ and a₁:

    κ_i(n̂) = Σ_steps Σ_s q_i(χ_s) ℓ_s [(1 - t_s) δ(χ_s n̂, a₀) + t_s δ(χ_s n̂, a₁)],  t_s = (χ₀ - χ_s)/(χ₀ - χ₁).

Fixed sample radii make κ a smooth function of the cosmology at a fixed initial field, which
field-level HMC needs: samples that followed χ(a) slid through the mesh cells as Ω_c changed, and
the likelihood wiggled on ~1% scales of Ω_c.

Reading the mesh rather than projecting particles keeps the particle discreteness out of the maps
(the CIC mesh of a near-uniform lattice is smooth) at the price of the mesh's own smoothing, which
the theory can include (``flatsky`` mesh-window correction).

Memory: the observation is the (n_pix, n_bins) maps only; the sample radii are read in blocks
(``POINTS_PER_BLOCK`` ray points each), one scan iteration per block. Sharded, every device reads
the samples that fall in its own pencil (halo-padded mesh) and the per-device maps are summed.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from .config import SimConfig
from .forces import cic_window, paint_density
from .grid import pad_shard
from .painting import read_points_periodic

Array = jax.Array

# Default of ``Lightcone.window_margin``: steps of other cosmologies may be this much thicker than
# the fiducial one's, and the radial sample window of a step covers that. On the quick lightcone
# (5 steps from a = 0.2, clipped at χ_max = 4939 Mpc/h) the thickest step is 1.09× the fiducial
# one at Ω_c = 0.05 and 1.27× as Ω_c → 0; on lsst_y10 1.25× at Ω_c = 0.05 and 1.35× at 0.01.
# Ω_c = 0.5 and w0 = -0.3 give thinner ones. ``step_window_ratio`` measures it for a cosmology.
SHELL_MARGIN = 1.25


@dataclass(frozen=True)
class FlatSky:
    """A square field_deg × field_deg patch around the +z axis, npix × npix pixels.

    Pixel (i, j) covers gnomonic coordinates θx = x/z in [-F/2 + i Δ, -F/2 + (i+1) Δ), θy likewise
    with j, Δ = F / npix in radians. Maps have shape (npix, npix).
    """

    field_deg: float
    npix: int

    def __post_init__(self):
        if not (math.isfinite(self.field_deg) and 0 < self.field_deg < 90):
            raise ValueError(f"field_deg must be in (0, 90) degrees, got {self.field_deg}")
        if int(self.npix) != self.npix or self.npix < 2:
            raise ValueError(f"npix must be an integer >= 2, got {self.npix}")
        object.__setattr__(self, "field_deg", float(self.field_deg))
        object.__setattr__(self, "npix", int(self.npix))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.npix, self.npix)

    @property
    def n_pix(self) -> int:
        return self.npix * self.npix

    @property
    def n_rays(self) -> int:
        return self.n_pix

    def to_maps(self, values: Array) -> Array:
        """(n_bins, npix²) ray values → (n_bins, npix, npix) maps."""
        return values.reshape((values.shape[0],) + self.shape)

    def footprint(self) -> np.ndarray:
        return np.ones(self.shape, bool)

    @property
    def pixel_side(self) -> float:
        """Pixel side in radians (gnomonic)."""
        return math.radians(self.field_deg) / self.npix

    @property
    def pixel_area(self) -> float:
        """Pixel area in steradians (gnomonic; equal to the solid angle at the field centre)."""
        return self.pixel_side**2

    def directions(self) -> np.ndarray:
        """(n_pix, 3) unit vectors of the pixel centres (float64, pixel-major)."""
        t = (np.arange(self.npix) + 0.5 - 0.5 * self.npix) * self.pixel_side
        tx, ty = np.meshgrid(t, t, indexing="ij")
        v = np.stack([tx, ty, np.ones_like(tx)], -1).reshape(-1, 3)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)


@dataclass(frozen=True)
class HealpixSky:
    """The HEALPix sphere at ``nside`` (RING ordering), maps of shape (12 nside²,).

    disc: optional (lon, lat, radius) in degrees: only the pixels whose centres lie within the
      disc are traced (partial sky); the maps keep the full-sky shape with zeros outside.
    """

    nside: int
    disc: tuple[float, float, float] | None = None

    def __post_init__(self):
        n = int(self.nside) if int(self.nside) == self.nside else -1
        if n < 1 or n & (n - 1):
            raise ValueError(f"nside must be a power of 2, got {self.nside}")
        object.__setattr__(self, "nside", n)
        if self.disc is not None:
            disc = tuple(float(v) for v in self.disc)
            if len(disc) != 3 or not (-90 <= disc[1] <= 90 and 0 < disc[2] <= 180):
                raise ValueError(f"disc must be (lon, lat in [-90, 90], radius in (0, 180]) degrees, "
                                 f"got {self.disc}")
            object.__setattr__(self, "disc", disc)
            if self.pixels.size == 0:
                raise ValueError(f"the disc {disc} holds no pixel centre at nside {n}")

    @property
    def shape(self) -> tuple[int]:
        return (12 * self.nside**2,)

    @property
    def n_pix(self) -> int:
        return 12 * self.nside**2

    @property
    def pixel_area(self) -> float:
        return 4 * math.pi / self.n_pix

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        """RING indices of the traced pixels (all of them on the full sky)."""
        if self.disc is None:
            return np.arange(self.n_pix)
        import healpy

        lon, lat, radius = self.disc
        centre = healpy.ang2vec(lon, lat, lonlat=True)
        return np.sort(healpy.query_disc(self.nside, centre, math.radians(radius)))

    @property
    def n_rays(self) -> int:
        return int(self.pixels.size)

    def directions(self) -> np.ndarray:
        """(n_rays, 3) unit vectors of the traced pixel centres, RING order (float64, healpy)."""
        import healpy

        return np.stack(healpy.pix2vec(self.nside, self.pixels), -1)

    def to_maps(self, values: Array) -> Array:
        """(n_bins, n_rays) ray values → (n_bins, 12 nside²) maps, zero outside the footprint."""
        if self.disc is None:
            return values
        return jnp.zeros((values.shape[0], self.n_pix), values.dtype).at[:, self.pixels].set(values)

    def footprint(self) -> np.ndarray:
        """(12 nside²,) bool, True on the traced pixels."""
        mask = np.zeros(self.n_pix, bool)
        mask[self.pixels] = True
        return mask


Sky = Union[FlatSky, HealpixSky]


@dataclass(frozen=True)
class Lightcone:
    """Where the observer is, what it sees, and how deep.

    Attributes:
      sky: ``FlatSky`` or ``HealpixSky``.
      chi_max: depth in Mpc/h up to which replicas are tiled; beyond it nothing is painted (make it
        at least the distance of the farthest source; ``lensing`` checks this for the cosmology).
      observer: position in box coordinates (Mpc/h); default: for a flat sky the centre of the
        box's z = 0 face, for HEALPix the box centre.
      randomize: give every replica a random periodic shift and a random cube-symmetry rotation
        (axis permutations among equal box sides and mirror flips), drawn from ``seed``.
      seed: seed of those random transforms (numpy; static).
      slices_per_step: radial samples per PM step (>= 2); default: enough for slices at most one
        mesh cell thick (``samples_per_step``).
      window_margin: the radial window of every step spans this many times the fiducial
        cosmology's thickest step (>= 1), so that thicker steps of other cosmologies are covered
        (``step_window_ratio`` <= 1). Static: a larger margin costs proportionally more samples.
      chi_min: near edge in Mpc/h (default 0): nothing closer is painted. With ``chi_max`` it
        makes this box one shell of a lightcone served by several boxes (``lensing.ShellLensing``).
      compensate: divide the density read by the rays by the transverse CIC windows of painting
        and of the trilinear read (Π_{i=x,y} sinc⁴(k_i Δ_i / 2)), so that the maps follow the
        unsmoothed theory on the scales the mesh resolves, instead of the mesh-windowed one. Costs
        one FFT pair per painted density.
    """

    sky: Sky
    chi_max: float
    observer: tuple[float, float, float] | None = None
    randomize: bool = False
    seed: int = 0
    slices_per_step: int | None = None
    window_margin: float = SHELL_MARGIN
    chi_min: float = 0.0
    compensate: bool = False

    def __post_init__(self):
        if not isinstance(self.sky, (FlatSky, HealpixSky)):
            raise ValueError(f"sky must be FlatSky or HealpixSky, got {type(self.sky).__name__}")
        if not (math.isfinite(self.chi_max) and self.chi_max > 0):
            raise ValueError(f"chi_max must be > 0 Mpc/h, got {self.chi_max}")
        object.__setattr__(self, "chi_max", float(self.chi_max))
        if not (math.isfinite(self.chi_min) and 0 <= self.chi_min < self.chi_max):
            raise ValueError(f"chi_min must be in [0, chi_max = {self.chi_max:g}) Mpc/h, "
                             f"got {self.chi_min}")
        object.__setattr__(self, "chi_min", float(self.chi_min))
        object.__setattr__(self, "compensate", bool(self.compensate))
        if self.observer is not None:
            obs = tuple(float(v) for v in self.observer)
            if len(obs) != 3 or not all(map(math.isfinite, obs)):
                raise ValueError(f"observer must be three finite coordinates (Mpc/h), got {self.observer}")
            object.__setattr__(self, "observer", obs)
        if self.slices_per_step is not None and (int(self.slices_per_step) != self.slices_per_step
                                                 or self.slices_per_step < 2):
            # one sample per step cannot span a shell: each sample stands for one radial interval
            raise ValueError(f"slices_per_step must be an integer >= 2, got {self.slices_per_step}")
        if not (isinstance(self.window_margin, (int, float)) and math.isfinite(self.window_margin)
                and self.window_margin >= 1):
            raise ValueError(f"window_margin must be a number >= 1, got {self.window_margin!r}")
        object.__setattr__(self, "window_margin", float(self.window_margin))

    def observer_position(self, box_size) -> np.ndarray:
        if self.observer is not None:
            return np.asarray(self.observer, np.float64)
        box = np.asarray(box_size, np.float64)
        if isinstance(self.sky, FlatSky):
            return np.array([box[0] / 2, box[1] / 2, 0.0])
        return box / 2

    def replica_transforms(self, box_size):
        """Random transforms of the box copies n ∈ Z³ within ``chi_max`` of the observer.

        Returns (n_lo (3,) int, dims (3,) int, inv_perm (M, 3) int, signs (M, 3), shifts (M, 3)
        Mpc/h) over the dense block of copies n_lo ≤ n < n_lo + dims, flattened in C order. A copy
        maps box coordinates x to y = mirror(perm(mod(x + shift, L))) + n L; mirror flips the axes
        with sign -1 (y → L - y), and perm only swaps axes of equal length.
        """
        box = np.asarray(box_size, np.float64)
        obs = self.observer_position(box)
        n_lo = np.floor((obs - self.chi_max) / box).astype(int)
        n_hi = np.floor((obs + self.chi_max) / box).astype(int)
        dims = n_hi - n_lo + 1
        m = int(np.prod(dims))
        perms = [p for p in itertools.permutations(range(3)) if np.allclose(box[list(p)], box)]
        rng = np.random.default_rng(self.seed)
        perm = np.array([perms[i] for i in rng.integers(len(perms), size=m)])
        signs = rng.choice([-1.0, 1.0], size=(m, 3))
        shifts = rng.uniform(0, 1, size=(m, 3)) * box
        return n_lo, dims, np.argsort(perm, axis=1), signs, shifts

    def check_box(self, cfg: SimConfig) -> None:
        """Raise ValueError when the observer is outside the box (a lightcone with no near side)."""
        obs = self.observer_position(cfg.box_size)
        if np.any(obs < 0) or np.any(obs > np.asarray(cfg.box_size)):
            raise ValueError(f"observer {tuple(obs)} lies outside the box [0, {cfg.box_size}] Mpc/h")




@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class BornParams:
    """Cosmology-dependent inputs of the lightcone projection (traced; float64).

    chi_steps: (n_steps + 1,) comoving distance χ(a) of the step boundaries, Mpc/h.
    chi_lo, chi_step: first node and spacing (Mpc/h) of the uniform χ table of ``q``; it reaches
      one radial sample spacing beyond the painted range on either side, so that a sample whose
      centre lies just outside that range still carries its q for the part of it inside.
    q: (n_bins, n_chi) lensing efficiency q_i(χ) in h/Mpc on that table.
    clip_lo, clip_hi: the painted range, [max(χ(a_final), chi_min), min(χ(a_init), chi_max)].
    """

    chi_steps: Array
    chi_lo: Array
    chi_step: Array
    q: Array
    clip_lo: Array
    clip_hi: Array

    def q_at(self, chi: Array) -> Array:
        """q_i at chi (Mpc/h, scalar or (n,)) by linear interpolation, 0 outside the table;
        (n_bins,) or (n_bins, n)."""
        n = self.q.shape[1]
        u = (chi - self.chi_lo) / self.chi_step
        i0 = jnp.clip(jnp.floor(u), 0, n - 2)
        f = u - i0
        i0 = i0.astype(jnp.int32)
        val = self.q[:, i0] * (1 - f) + self.q[:, i0 + 1] * f
        return jnp.where((u >= 0) & (u <= n - 1), val, 0.0)


def _wrap(x: Array, box: Array) -> Array:
    """x modulo box, in [0, box], through floor, not XLA's CPU remainder, which calls fmod per
    element (~27 ns each, 60x the floor's cost: it was most of a reduced lsst_y10 gradient's
    ray-sample transform). ``jnp.mod``'s value bit for bit where ⌊x / box⌋ box is exact (box
    lengths that are integers, as every shipped configuration's); otherwise within an ulp, or
    its periodic image, which the periodic reads treat alike."""
    y = x - jnp.floor(x / box) * box
    # x / box rounded up to an integer leaves y just below 0
    return jnp.where(y < 0, y + box, y)


def _trilinear(field: Array, cells: Array, lo: Array, owned_hi, halo: int, wrap: bool):
    """Trilinear interpolation of a local mesh at global cell coordinates.

    field: (nx, ny, nz, C) local mesh, padded by ``halo`` cells along x and y when sharded.
    cells: (N, 3) global cell coordinates (cell i's value sits at coordinate i).
    lo: (2,) global index of the shard's first x and y cell; owned_hi: (2,) local extent.
    Returns (N, C): values at the points this shard owns (floor index inside its pencil), 0 elsewhere.
    """
    nx, ny, nz, _ = field.shape
    i0 = jnp.floor(cells)
    f = cells - i0
    i0 = i0.astype(jnp.int32)
    if wrap:
        ix, iy = i0[:, 0] % nx, i0[:, 1] % ny
        owned = jnp.ones(cells.shape[0], bool)
    else:
        ix, iy = i0[:, 0] - lo[0], i0[:, 1] - lo[1]
        owned = (ix >= 0) & (ix < owned_hi[0]) & (iy >= 0) & (iy < owned_hi[1])
        ix, iy = jnp.where(owned, ix + halo, 0), jnp.where(owned, iy + halo, 0)
    iz = i0[:, 2] % nz
    rows = field.reshape(nx * ny * nz, -1)
    out = 0
    for cx, cy, cz in itertools.product((0, 1), repeat=3):
        jx = (ix + cx) % nx if wrap else ix + cx
        jy = (iy + cy) % ny if wrap else iy + cy
        jz = (iz + cz) % nz
        w = ((f[:, 0] if cx else 1 - f[:, 0]) * (f[:, 1] if cy else 1 - f[:, 1])
             * (f[:, 2] if cz else 1 - f[:, 2]))
        out = out + rows[(jx * ny + jy) * nz + jz] * w[:, None]
    return jnp.where(owned[:, None], out, 0)


# Ray points read in one block of radial samples: bounds the block's transient memory (about
# 100 bytes per point in the gradient: coordinates, 8 corner indices and weights, 2 time levels)
# to ~0.1 GB, while quick (1024 rays × 98 samples) runs a step's samples in one block.
POINTS_PER_BLOCK = 2**20


# The ray samples' cell coordinates are tabulated once (``BornLightcone._sample_table``) when the
# table takes at most this many bytes (quick: 3 MB), instead of transforming every block's points
# through the replicas in every step and again in the backward pass.
SAMPLE_TABLE_BYTES = 2**26


def _blocks(n_samples: int, n_rays: int) -> tuple[int, int]:
    """(samples per block, blocks) covering ``n_samples`` radial samples of ``n_rays`` rays."""
    per = max(1, min(n_samples, POINTS_PER_BLOCK // max(n_rays, 1)))
    return per, -(-n_samples // per)


@dataclass(frozen=True)
class BornLightcone:
    """The lightcone projector, an additive ``nbody.Observer``; ``obs`` is (n_rays, n_bins) κ."""

    cfg: SimConfig
    lightcone: Lightcone
    n_bins: int
    samples_per_step: int

    def init(self, state):
        return jnp.zeros((self.lightcone.sky.n_rays, self.n_bins), state.disp.dtype)

    def update(self, params: BornParams, step, a0, a1, before, after, obs):
        # the densities the forces were computed from: painting the particles again would cost two
        # paints per step forward and their transposes in the adjoint
        delta0 = self.contrast_of(before.density)
        delta1 = self.contrast_of(after.density)
        return obs + self.project(params, step, delta0, delta1)

    def density_contrast(self, disp: Array) -> Array:
        """δ on the mesh (grid layout) as the rays read it: CIC-painted, and with the transverse
        painting and reading windows divided out when ``lightcone.compensate``."""
        return self.contrast_of(paint_density(self.cfg, disp))

    def contrast_of(self, density: Array) -> Array:
        """``density_contrast`` from the painted density 1 + δ (grid layout)."""
        delta = density - 1
        if not self.lightcone.compensate:
            return delta
        cfg, grid = self.cfg, self.cfg.grid
        # painting and reading, each one CIC window; Limber modes are transverse, so the line of
        # sight is left alone
        w = cic_window(grid, cfg.mesh_shape, cfg.box_size, delta.dtype, axes=(0, 1)) ** 2
        return grid.ifft(grid.fft(delta) / w, cfg.mesh_shape)

    def project(self, params: BornParams, step, delta0: Array, delta1: Array) -> Array:
        """Born κ of the shell between step boundaries ``step`` and ``step + 1`` (n_rays, n_bins).

        delta0, delta1: (nx, ny, nz) mesh density contrast at the two boundaries (grid layout).
        """
        grid = self.cfg.grid
        field = jnp.stack([delta0, delta1], -1)
        # the step's shell [chi1, chi0] (time interpolation) and its painted part [lo, hi]
        chi0, chi1 = params.chi_steps[step], params.chi_steps[step + 1]
        bounds = jnp.stack([chi0, chi1, jnp.minimum(chi0, params.clip_hi),
                            jnp.maximum(chi1, params.clip_lo)])
        if not grid.sharded:
            return self._project_local(params, bounds, field, jnp.zeros(2, jnp.int32))
        px, py = grid.pdims
        local = (self.cfg.mesh_shape[0] // px, self.cfg.mesh_shape[1] // py)

        def shard(f, params, bounds):
            lo = jnp.stack([jax.lax.axis_index("x") * local[0], jax.lax.axis_index("y") * local[1]])
            return self._project_local(params, bounds, pad_shard(grid, f), lo)[None, None]

        # (px, py, ...) partial sums -> sum; the cosmology-dependent inputs enter explicitly
        return grid.shard_map(shard, (4, None, None), 4)(field, params, bounds).sum(axis=(0, 1))

    @functools.cached_property
    def _static(self):
        cfg, lc = self.cfg, self.lightcone
        box = np.asarray(cfg.box_size)
        return dict(box=box, cell=box / np.asarray(cfg.mesh_shape), dirs=lc.sky.directions(),
                    obs=lc.observer_position(box),
                    table=lc.replica_transforms(box) if lc.randomize else None)

    def _to_box(self, r: Array) -> Array:
        """Observer-frame points (N, 3) → box coordinates (N, 3) through the replica transforms."""
        st = self._static
        dtype = r.dtype
        box = jnp.asarray(st["box"], dtype)
        x = r + jnp.asarray(st["obs"], dtype)
        if st["table"] is None:
            return _wrap(x, box)
        n_lo, dims, inv_perm, signs, shifts = st["table"]
        n = jnp.floor(x / box)
        y = x - n * box
        # int32 throughout: the numpy tables' int64 made this index arithmetic and the gathers
        # 64-bit (x64 is on), ~40 % slower on CPU
        idx = jnp.clip(n.astype(jnp.int32) - jnp.asarray(n_lo, jnp.int32), 0,
                       jnp.asarray(dims, jnp.int32) - 1)
        flat = (idx[:, 0] * int(dims[1]) + idx[:, 1]) * int(dims[2]) + idx[:, 2]
        sign = jnp.asarray(signs, dtype)[flat]
        y = jnp.where(sign > 0, y, box - y)  # permuted axes have equal lengths: the same box
        x = jnp.take_along_axis(y, jnp.asarray(inv_perm, jnp.int32)[flat], axis=1)
        return _wrap(x - jnp.asarray(shifts, dtype)[flat], box)

    def _cells(self, chi: Array, dtype) -> Array:
        """(len(chi) · n_rays, 3) mesh-cell coordinates of every ray at the radii ``chi`` (Mpc/h),
        computed in ``dtype``."""
        st = self._static
        dirs = jnp.asarray(st["dirs"], dtype)
        x = self._to_box((chi.astype(dtype)[:, None, None] * dirs[None]).reshape(-1, 3))
        return x / jnp.asarray(st["cell"], dtype)

    @functools.cached_property
    def _sample_tables(self) -> dict:
        return {}

    def _sample_table(self, dtype) -> np.ndarray | None:
        """(n_s, n_rays, 3) mesh-cell coordinates of ray sample s (at χ_s = (s + ½)Δχ) for every s
        a step's window can reach (χ < chi_max), or None when it would exceed
        ``SAMPLE_TABLE_BYTES`` (then each block transforms its points itself). Computed by that
        transform's own compiled arithmetic in ``dtype``, so the points are the same to the bit
        (numpy's float32 differs from XLA's by one unit in the last place in a quarter of them,
        which moves κ by ~3e-6 of its largest value on a cell-scale random field)."""
        dtype = np.dtype(dtype)
        if dtype not in self._sample_tables:
            st = self._static
            n_rays = st["dirs"].shape[0]
            per, n_blocks = _blocks(self.samples_per_step, n_rays)
            n_s = int(math.floor(self.lightcone.chi_max / self.spacing)) + per * n_blocks + 1
            table = None
            if n_s * n_rays * 3 * dtype.itemsize <= SAMPLE_TABLE_BYTES:
                chi = (np.arange(n_s) + 0.5) * self.spacing
                with jax.ensure_compile_time_eval():  # concrete, also while a caller traces
                    table = np.asarray(_cells_jit(self, chi, dtype)).reshape(n_s, n_rays, 3)
            self._sample_tables[dtype] = table
        return self._sample_tables[dtype]

    @functools.cached_property
    def spacing(self) -> float:
        """Radial sample spacing Δχ (Mpc/h; static): the fiducial cosmology's thickest step,
        widened by ``lightcone.window_margin`` for other cosmologies, spans
        ``samples_per_step`` - 1 of them."""
        return _window(self.cfg, self.lightcone) / max(self.samples_per_step - 1, 1)

    def _project_local(self, params, bounds, field, lo):
        st = self._static
        grid = self.cfg.grid
        n_win = self.samples_per_step
        spacing = self.spacing
        dtype = field.dtype
        local = (self.cfg.mesh_shape[0] // grid.pdims[0], self.cfg.mesh_shape[1] // grid.pdims[1])
        # Sample s sits at χ_s = (s + ½)Δχ and stands for [sΔχ, (s+1)Δχ]: the positions are fixed,
        # whatever the cosmology, so the maps change smoothly with it (samples that followed
        # χ(a) slid along the rays through the mesh cells, and κ, hence the likelihood at fixed
        # initial field, wiggled with Ω_c on ~1% scales). Its weight is the length of its
        # interval inside this step's shell [χ₁, χ₀] (continuous in χ₀, χ₁; the pieces of a
        # sample split between two steps add up to Δχ, and both read δ(a) at the shared boundary).
        chi0, chi1, hi, low = bounds[0], bounds[1], bounds[2], bounds[3]
        first = jnp.floor(low / spacing)
        width = jnp.maximum(chi0 - chi1, 1e-30)
        n_rays = st["dirs"].shape[0]
        per, n_blocks = _blocks(n_win, n_rays)
        table = self._sample_table(dtype)

        # A block of ``per`` samples per iteration: one gather over per × n_rays points instead
        # of ``per`` small ones, so fewer, larger kernels (quick gradient 333 -> 232 ms on a
        # 2-core CPU, 12.2 -> 14.7 per second on an H200; NOTEBOOK 7i).
        # Rematerialised: reverse mode stores nothing per block (the carry enters linearly), so
        # gradient memory does not grow with the number of samples.
        @jax.checkpoint
        def block(acc, c):
            j = c * per + jnp.arange(per)
            s = first + j
            chi = (s + 0.5) * spacing  # (per,)
            length = jnp.clip(jnp.minimum((s + 1) * spacing, hi) - jnp.maximum(s * spacing, low),
                              0.0, None)
            length = jnp.where(j < n_win, length, 0.0)  # padding of the last block
            t = jnp.clip((chi0 - chi) / width, 0.0, 1.0)
            if table is None:
                cells = self._cells(chi, dtype)
            else:  # samples first + c·per ... of the table (in bounds: first ≤ chi_max / Δχ)
                start = first.astype(jnp.int32) + c * per
                cells = jax.lax.dynamic_slice(table, (start, 0, 0), (per, n_rays, 3)).reshape(-1, 3)
            # the block's samples inside the shell come first (s counts up from the shell's near
            # end), so read only those: the rest have length 0 (about half of quick's reads)
            used = jnp.max(jnp.where(length > 0, jnp.arange(1, per + 1), 0)) * n_rays
            vals = None if grid.sharded else read_points_periodic(field, cells, used)
            if vals is None:
                vals = _trilinear(field, cells, lo, local, grid.halo, not grid.sharded)
            vals = vals.reshape(per, n_rays, 2)
            delta = ((1 - t).astype(dtype)[:, None] * vals[..., 0]
                     + t.astype(dtype)[:, None] * vals[..., 1])  # (per, n_rays)
            w = (params.q_at(chi) * length).astype(dtype)  # (n_bins, per)
            return acc + _weighted_sum(delta, w), None

        acc0 = jnp.zeros((n_rays, self.n_bins), dtype)
        acc, _ = jax.lax.scan(block, acc0, jnp.arange(n_blocks))
        return acc


@jax.custom_vjp
def _weighted_sum(delta: Array, w: Array) -> Array:
    """(n_rays, n_bins) Σ_s delta[s, r] w[b, s], for delta (n_s, n_rays) and w (n_bins, n_s).

    Broadcast products and sums, forward and backward: XLA's CPU dot took 0.3-0.45 ms for each of
    quick's (3, 98) x (98, 1024) contractions (the forward and its two transposes), a fused product
    and sum ~0.07 ms."""
    return jnp.sum(delta[:, :, None] * w.T[:, None, :], axis=0)


def _weighted_sum_fwd(delta, w):
    return _weighted_sum(delta, w), (delta, w)


def _weighted_sum_bwd(res, ct):
    delta, w = res  # ct: (n_rays, n_bins)
    ct_delta = jnp.sum(w.T[:, None, :] * ct[None, :, :], axis=-1)  # (n_s, n_rays)
    ct_w = jnp.sum(ct.T[:, None, :] * delta[None, :, :], axis=-1)  # (n_bins, n_s)
    return ct_delta, ct_w


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


# The sample table's points, by the same compiled arithmetic as a block's own transform.
_cells_jit = jax.jit(BornLightcone._cells, static_argnums=(0, 2))


@functools.lru_cache(maxsize=64)
def _fiducial_thickest_step(cfg: SimConfig, lightcone: Lightcone) -> float:
    """Radial extent (Mpc/h) of the thickest PM step inside the lightcone, for
    ``Cosmology.fiducial()`` (static; safe to call while tracing)."""
    from .cosmology import Cosmology

    with jax.ensure_compile_time_eval():
        return float(_thickest_step_jit(Cosmology.fiducial(), cfg, lightcone))


def _thickest_step(cosmo, cfg: SimConfig, lightcone: Lightcone) -> Array:
    """Radial extent (Mpc/h) of ``cosmo``'s thickest PM step inside the lightcone (jit-safe)."""
    from .cosmology import background

    chi = jnp.minimum(background(cosmo).comoving_distance(jnp.asarray(cfg.step_scale_factors)),
                      lightcone.chi_max)
    return jnp.max(chi[:-1] - chi[1:])


# For concrete cosmologies (the fiducial window, ``check_step_window``): one compiled program, which
# JAX's persistent cache keeps between processes, instead of the distance table's dozens of eagerly
# compiled operations.
_thickest_step_jit = jax.jit(_thickest_step, static_argnums=(1, 2))


@functools.lru_cache(maxsize=64)
def samples_per_step(cfg: SimConfig, lightcone: Lightcone) -> int:
    """Radial samples read per PM step (static; safe to call while tracing): enough for a
    spacing of at most one mesh cell (along the line of sight) over the fiducial cosmology's
    thickest step widened by ``lightcone.window_margin``, plus one for a sample straddling each
    end, unless the lightcone sets ``slices_per_step``. A cosmology whose thickest step is more
    than that (``step_window_ratio`` > 1) has the far end of that shell cut."""
    if lightcone.slices_per_step is not None:
        return int(lightcone.slices_per_step)
    cell = np.asarray(cfg.cell_size)
    if isinstance(lightcone.sky, FlatSky):
        # rays run along z, or along an axis that a replica rotation swaps with z (equal box sides)
        box = np.asarray(cfg.box_size)
        cell = cell[np.isclose(box, box[2])]
    return max(2, int(math.ceil(_window(cfg, lightcone) / float(np.min(cell)))) + 2)


def _window(cfg: SimConfig, lightcone: Lightcone) -> float:
    """Radial extent (Mpc/h; static) that every step's samples cover."""
    return lightcone.window_margin * _fiducial_thickest_step(cfg, lightcone)


def step_window_ratio(cosmo, cfg: SimConfig, lightcone: Lightcone) -> Array:
    """The thickest PM step of ``cosmo`` inside the lightcone over the radial window that a step's
    samples cover (scalar float64; jit/vmap-safe). 1 / ``window_margin`` at the fiducial
    cosmology; above 1 the far end of that step's shell is left out of the maps (raise
    ``Lightcone.window_margin`` to above the ratio times the current margin)."""
    return _thickest_step(cosmo, cfg, lightcone) / _window(cfg, lightcone)


def margin_to_cover(ratio: float, lightcone: Lightcone) -> float:
    """The ``window_margin`` (rounded up to 0.01) whose window covers a step ``ratio`` times the
    current window (``step_window_ratio``)."""
    return math.ceil(100 * float(ratio) * lightcone.window_margin) / 100


def check_step_window(cosmo, cfg: SimConfig, lightcone: Lightcone) -> None:
    """Raise ValueError when ``cosmo`` (concrete) has a step thicker than the radial window."""
    ratio = float(_thickest_step_jit(cosmo, cfg, lightcone)) / _window(cfg, lightcone)
    if ratio > 1:
        raise ValueError(
            f"this cosmology's thickest PM step is {ratio:.3f}x the lightcone's radial window "
            f"(window_margin {lightcone.window_margin:g} x the fiducial cosmology's), so the far "
            f"end of that shell would be left out of the maps: set lightcone.window_margin >= "
            f"{margin_to_cover(ratio, lightcone):g}")
