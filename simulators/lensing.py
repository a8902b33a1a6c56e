"""Born convergence maps from 3-D simulations (PM N-body or LPT only), and the map-model interface.

Every map model turns (cosmology, latent white noise) into noise-free tomographic κ maps of shape
(n_bins, *sky.shape), purely and differentiably:

  - ``PMLensing``: LPT initial conditions + FastPM steps, lightcone painted during the run;
  - ``LPTLensing``: the same lightcone painted from LPT displacements, with no N-body steps;
  - ``GaussianLensing``: Gaussian random field with the Limber C_ℓ (flat sky);
  - ``LognormalLensing``: shifted-lognormal field with the same C_ℓ (flat sky).

The latent of the 3-D models is the white-noise field on the particle grid, shape
``cfg.particle_shape``, sharded as the simulation is. Shape noise is added separately
(``add_shape_noise``) so maps come out both with and without noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .config import SimConfig
from .cosmology import Cosmology, _hermite, _uniform_cell, background, growth_table
from .forces import paint_density
from .ics import _is_key, linear_field, lpt_displacements, white_noise
from .lightcone import BornLightcone, BornParams, FlatSky, HealpixSky, Lightcone, samples_per_step
from .nbody import run_steps, start_steps
from .simulation import evolve_observed, initial_particles
from .sources import RedshiftBins, lensing_efficiency

Array = jax.Array

N_CHI_TABLE = 1024  # nodes of the q_i(χ) table: spacing ~6 Mpc/h to z = 9, q is smooth on that scale


def born_params(cosmo: Cosmology, cfg: SimConfig, bins: RedshiftBins, chi_max: float,
                n_chi: int = N_CHI_TABLE, chi_min: float = 0.0, pad: float = 0.0) -> BornParams:
    """Step radii and the q_i(χ) table for the lightcone painter (jit/grad-safe).

    The painted range is [max(χ(a_final), chi_min), min(χ(a_init), chi_max)]; the q table
    reaches ``pad`` (the radial sample spacing) beyond it on either side, within the run's range.
    """
    bg = background(cosmo)
    chi_steps = bg.comoving_distance(jnp.asarray(cfg.step_scale_factors))
    clip_lo = jnp.maximum(chi_steps[-1], chi_min)
    clip_hi = jnp.minimum(chi_steps[0], chi_max)
    lo = jnp.maximum(chi_steps[-1], chi_min - pad) if chi_min > 0 else clip_lo
    hi = jnp.minimum(chi_steps[0], chi_max + pad)
    chi = jnp.linspace(lo, hi, n_chi)
    q = lensing_efficiency(cosmo, bins, chi, bg=bg)
    return BornParams(chi_steps=chi_steps, chi_lo=lo, chi_step=(hi - lo) / (n_chi - 1), q=q,
                      clip_lo=clip_lo, clip_hi=clip_hi)


def _finish(obs: Array, sky) -> Array:
    return sky.to_maps(obs.T.astype(jnp.float64))


def pm_kappa(cosmo: Cosmology, cfg: SimConfig, lightcone: Lightcone, bins: RedshiftBins,
             noise: Array, progress: Callable[[Array], None] | None = None) -> tuple[Array, Array]:
    """Born κ maps from a PM run whose lightcone is painted step by step.

    Args:
      noise: (npx, npy, npz) unit white noise on the particle grid (``ics.white_noise``).
    Returns:
      (kappa (n_bins, *sky.shape) float64, max particle displacement in cells along the sharded axes).
    Differentiable in ``cosmo`` and ``noise``; memory independent of the number of steps with
    ``cfg.gradient == "adjoint"``.
    """
    painter = BornLightcone(cfg, lightcone, bins.n_bins, samples_per_step(cfg, lightcone))
    params = born_params(cosmo, cfg, bins, lightcone.chi_max, chi_min=lightcone.chi_min,
                         pad=painter.spacing)
    _, obs, max_disp = evolve_observed(cosmo, cfg, linear_field(cosmo, cfg, noise), painter, params,
                                       progress)
    return _finish(obs, lightcone.sky), max_disp


def lpt_kappa(cosmo: Cosmology, cfg: SimConfig, lightcone: Lightcone, bins: RedshiftBins,
              noise: Array) -> Array:
    """Born κ maps of an LPT-only lightcone: particles at D₁Ψ₁ + D₂Ψ₂, no N-body steps.

    The step boundaries of ``cfg`` set the time sampling of the displacements between which each
    particle's crossing is interpolated (any ``cfg.n_steps`` works; LPT costs no force solves).
    Returns (n_bins, *sky.shape) float64. Differentiable in ``cosmo`` and ``noise``.
    """
    growth = growth_table(cosmo)
    a = jnp.asarray(cfg.step_scale_factors)
    psi1, psi2 = lpt_displacements(cfg, linear_field(cosmo, cfg, noise))
    d1 = growth.D1_at(a).astype(psi1.dtype)
    d2 = growth.D2_at(a).astype(psi1.dtype)
    painter = BornLightcone(cfg, lightcone, bins.n_bins, samples_per_step(cfg, lightcone))
    params = born_params(cosmo, cfg, bins, lightcone.chi_max, chi_min=lightcone.chi_min,
                         pad=painter.spacing)

    def delta_at(i):
        disp = d1[i] * psi1 if psi2 is None else d1[i] * psi1 + d2[i] * psi2
        return painter.density_contrast(disp)

    @jax.checkpoint
    def step(obs, i):
        return obs + painter.project(params, i, delta_at(i), delta_at(i + 1)), None

    obs0 = jnp.zeros((lightcone.sky.n_rays, bins.n_bins), psi1.dtype)
    obs, _ = jax.lax.scan(step, obs0, jnp.arange(a.shape[0] - 1))
    return _finish(obs, lightcone.sky)


# ------------------------------------------------------------------------------------------------
# Map models


class MapModel(Protocol):
    """What a map model is: (cosmology, latent white noise) -> noise-free tomographic κ maps.

    Attributes:
      sky: the pixelisation (``FlatSky`` or ``HealpixSky``) of maps (n_bins, *sky.shape).
      bins: the source sample.
      cfg, lightcone: the 3-D simulation the maps are read from, or None for fields drawn directly
        on the sky (no mesh, no halo, no step window to check).
      latent_shape: shape of the latent white noise.
    """

    sky: FlatSky | HealpixSky
    bins: RedshiftBins
    cfg: SimConfig | None
    lightcone: Lightcone | None

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    def latent(self, seed: int | Array) -> Array:
        """Unit white noise of shape ``latent_shape`` from a seed or a key."""

    def kappa(self, cosmo: Cosmology, latent: Array) -> Array:
        """(n_bins, *sky.shape) κ; pure, jit/vmap-able, differentiable in ``cosmo`` and ``latent``."""

    def kappa_and_displacement(self, cosmo: Cosmology, latent: Array) -> tuple[Array, Array]:
        """``kappa`` and the largest particle displacement along the sharded axes in mesh cells
        (for the halo check; 0 where nothing moves across shards)."""

    def realise(self, cosmo: Cosmology, latent: Array,
                progress: Callable[[int], None] | None = None) -> Array:
        """``kappa`` of one concrete cosmology, run from the host with the model's checks (memory,
        halo, step window); ``progress(steps_done)`` where the model has steps."""


class _NoHaloCheck:
    """For map models without N-body steps (LPT, fields drawn on the sky): nothing for the halo
    check to read, so the displacement is 0."""

    def kappa_and_displacement(self, cosmo: Cosmology, latent: Array) -> tuple[Array, Array]:
        return self.kappa(cosmo, latent), jnp.zeros(())


@dataclass(frozen=True, eq=False)  # compared by identity: jit-static, and bins hold numpy arrays
class _MeshLensing:
    """Born κ maps read from a 3-D simulation's lightcone (hashable, static): what the PM and LPT
    models share.

    Attributes: cfg: the PM setup (box, mesh, steps, device grid); lightcone: observer, sky, depth;
    bins: the source sample (a pytree of arrays; held here as a static part of the model).
    """

    cfg: SimConfig
    lightcone: Lightcone
    bins: RedshiftBins

    def __post_init__(self):
        self.lightcone.check_box(self.cfg)

    @property
    def sky(self):
        return self.lightcone.sky

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.cfg.particle_shape

    def latent(self, seed: int | Array) -> Array:
        """Unit white noise of the initial conditions, the same on any device grid."""
        return white_noise(self.cfg, seed)


@dataclass(frozen=True, eq=False)
class PMLensing(_MeshLensing):
    """Tomographic Born κ maps from a particle-mesh simulation with a lightcone (``MapModel``)."""

    def kappa(self, cosmo: Cosmology, latent: Array) -> Array:
        """(n_bins, *sky.shape) noise-free κ; differentiable in ``cosmo`` and ``latent``."""
        return pm_kappa(cosmo, self.cfg, self.lightcone, self.bins, latent)[0]

    def kappa_and_displacement(self, cosmo: Cosmology, latent: Array) -> tuple[Array, Array]:
        return pm_kappa(cosmo, self.cfg, self.lightcone, self.bins, latent)

    def realise(self, cosmo: Cosmology, latent: Array,
                progress: Callable[[int], None] | None = None) -> Array:
        from .lightcone import check_step_window
        from .simulation import check_halo, check_memory

        check_step_window(cosmo, self.cfg, self.lightcone)
        check_memory(self.cfg)
        kappa, max_disp = _pm_kappa_stepwise(cosmo, self.cfg, self.lightcone, self.bins, latent,
                                             progress)
        check_halo(self.cfg, float(max_disp))
        return kappa


@dataclass(frozen=True, eq=False)
class LPTLensing(_NoHaloCheck, _MeshLensing):
    """The ``PMLensing`` lightcone painted from LPT displacements, no N-body steps (``MapModel``)."""

    def kappa(self, cosmo: Cosmology, latent: Array) -> Array:
        return lpt_kappa(cosmo, self.cfg, self.lightcone, self.bins, latent)

    def realise(self, cosmo: Cosmology, latent: Array,
                progress: Callable[[int], None] | None = None) -> Array:
        from .lightcone import check_step_window

        check_step_window(cosmo, self.cfg, self.lightcone)
        return _kappa_jit(self)(cosmo, latent)


@dataclass(frozen=True, eq=False)
class ShellLensing:
    """Born κ maps of a lightcone served by several boxes, one per shell of comoving distance
    (``MapModel``).

    Shell i is its own PM (or LPT) run: its own box, mesh, steps and white noise, painted only
    for χ in [chi_min_i, chi_max_i] (``Lightcone.chi_min`` / ``chi_max``). Shells tile [0, χ_max]
    without gaps or overlaps, and a box as deep as its shell holds each distance once, so no
    structure repeats along a line of sight; boxes that grow with distance keep the cells' angular
    size roughly constant, where a single box wastes cells near the observer and lacks them far
    away. Each run stops at the scale factor of its shell's near edge (``cfg.a_final``).

    The latent is a tuple of the shells' white-noise fields, shapes ``shell.cfg.particle_shape``;
    κ is the sum of the shells' maps. ``cfg`` and ``lightcone`` are None: there is no single mesh
    (field-level inference on shells is not supported yet).
    """

    shells: tuple

    cfg = None
    lightcone = None

    def __post_init__(self):
        shells = tuple(self.shells)
        if not shells:
            raise ValueError("shells is empty: give at least one (PMLensing or LPTLensing)")
        for s in shells:
            if not isinstance(s, (PMLensing, LPTLensing)):
                raise ValueError(f"shells must be PMLensing or LPTLensing, got {type(s).__name__}")
        first = shells[0]
        for i, s in enumerate(shells):
            if s.sky != first.sky or s.bins is not first.bins:
                raise ValueError(f"shell {i} has another sky or source sample than shell 0")
        edges = [(s.lightcone.chi_min, s.lightcone.chi_max) for s in shells]
        if edges[0][0] != 0:
            raise ValueError(f"shell 0 must start at chi = 0 (the observer), got {edges[0][0]:g} Mpc/h")
        for i in range(1, len(edges)):
            if edges[i][0] != edges[i - 1][1]:
                raise ValueError(f"shells {i - 1} and {i} leave a gap or overlap: chi_max of "
                                 f"{i - 1} = {edges[i - 1][1]:g}, chi_min of {i} = {edges[i][0]:g} Mpc/h")
        object.__setattr__(self, "shells", shells)

    @property
    def sky(self):
        return self.shells[0].sky

    @property
    def bins(self) -> RedshiftBins:
        return self.shells[0].bins

    @property
    def chi_max(self) -> float:
        return self.shells[-1].lightcone.chi_max

    @property
    def latent_shape(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s.latent_shape for s in self.shells)

    def latent(self, seed: int | Array) -> tuple[Array, ...]:
        """The shells' white noise: shell i from ``fold_in(key(seed), i)`` (independent fields)."""
        key = seed if _is_key(seed) else jax.random.key(seed)
        return tuple(s.latent(jax.random.fold_in(key, i)) for i, s in enumerate(self.shells))

    def _check_latent(self, latent) -> None:
        if not isinstance(latent, (tuple, list)) or len(latent) != len(self.shells):
            raise ValueError(f"latent must be a tuple of {len(self.shells)} fields (one per shell)")

    def kappa(self, cosmo: Cosmology, latent) -> Array:
        self._check_latent(latent)
        return sum(s.kappa(cosmo, z) for s, z in zip(self.shells, latent))

    def kappa_and_displacement(self, cosmo: Cosmology, latent) -> tuple[Array, Array]:
        self._check_latent(latent)
        out = [s.kappa_and_displacement(cosmo, z) for s, z in zip(self.shells, latent)]
        return sum(k for k, _ in out), jnp.max(jnp.stack([jnp.asarray(d) for _, d in out]))

    def realise(self, cosmo: Cosmology, latent,
                progress: Callable[[int], None] | None = None) -> Array:
        """The shells one after another (one in memory at a time); ``progress`` counts the steps
        of all shells."""
        self._check_latent(latent)
        check_shell_coverage(cosmo, self)
        done, total = 0, None
        for s, z in zip(self.shells, latent):
            call = None if progress is None else (lambda n, d=done: progress(d + n))
            k = s.realise(cosmo, z, call)
            total = k if total is None else total + k
            done += s.cfg.n_steps
        return total

    @property
    def n_steps(self) -> int:
        return sum(s.cfg.n_steps for s in self.shells)


def check_shell_coverage(cosmo: Cosmology, model: ShellLensing) -> None:
    """Raise ValueError when, for ``cosmo`` (concrete), a shell's run does not span its χ range:
    it starts after the light from the far edge passed (χ(a_init) < chi_max) or stops before the
    light reached the near edge (χ(a_final) > chi_min), which would leave a gap in the maps."""
    from .cosmology import comoving_distance_jit

    for i, s in enumerate(model.shells):
        cfg, lc = s.cfg, s.lightcone
        chi = np.asarray(comoving_distance_jit(cosmo, np.array([cfg.a_final, cfg.a_init])))
        if chi[0] > lc.chi_min * (1 + 1e-9):
            raise ValueError(
                f"shell {i}: this cosmology's light reaches its near edge chi = {lc.chi_min:g} "
                f"Mpc/h at a later time than the run's last step a = {cfg.a_final:.4f} (chi = "
                f"{chi[0]:.1f} Mpc/h there): raise shells.a_margin")
        if chi[1] < lc.chi_max * (1 - 1e-9):
            raise ValueError(
                f"shell {i}: the run starts at a_init = {cfg.a_init:g}, after the light from its "
                f"far edge chi = {lc.chi_max:g} Mpc/h passed (chi(a_init) = {chi[1]:.1f} Mpc/h): "
                f"lower simulation.a_init")


@dataclass(frozen=True, eq=False)
class _SkyField(_NoHaloCheck):
    """Flat-sky random κ fields with the Limber C_ℓ (halofit) of the cosmology, drawn directly on
    the sky (no 3-D simulation): what the Gaussian and lognormal models share.
    latent: (n_bins, npix, npix) unit white noise.

    n_chi: Limber χ nodes (static, >= 16, ``flatsky.limber_cl``). The default 256 is within 1e-4 of
    a 1024-node C_ℓ; fewer nodes make κ and its gradients cheaper (field-level HMC, tests) at a
    largest per-mode C_ℓ error (LSST-Y10 3-5 bins, 36 < ℓ < 2300) of ~1 % (64) or ~4 % (32).
    """

    sky: FlatSky
    bins: RedshiftBins
    n_chi: int = 256
    what = "Gaussian"  # for messages (not a field)
    cfg = None  # no 3-D simulation (``MapModel``; class attributes, not fields)
    lightcone = None

    def __post_init__(self):
        if not isinstance(self.sky, FlatSky):
            raise ValueError(f"the {self.what} map model is flat-sky only: use a FlatSky")
        n = self.n_chi
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 16:
            raise ValueError(f"n_chi must be an integer >= 16 (static Limber nodes), got {n!r}")
        object.__setattr__(self, "n_chi", int(n))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.bins.n_bins,) + self.sky.shape

    def latent(self, seed: int | Array) -> Array:
        key = jax.random.key(seed) if np.ndim(seed) == 0 and not isinstance(seed, jax.Array) else seed
        return jax.random.normal(key, self.latent_shape, jnp.float64)

    def realise(self, cosmo: Cosmology, latent: Array,
                progress: Callable[[int], None] | None = None) -> Array:
        return _kappa_jit(self)(cosmo, latent)


@dataclass(frozen=True, eq=False)
class GaussianLensing(_SkyField):
    """Flat-sky Gaussian random κ maps with the Limber C_ℓ (halofit) of the cosmology, with the
    right cross-bin correlations (``MapModel``; fields as ``_SkyField``)."""

    def kappa(self, cosmo: Cosmology, latent: Array) -> Array:
        from . import flatsky

        cl = lambda ell: flatsky.limber_cl(cosmo, self.bins, ell, n_chi=self.n_chi)  # noqa: E731
        return flatsky.gaussian_maps_from_white(latent, cl, self.sky.field_deg, self.sky.npix)


def lognormal_shift(cosmo: Cosmology, bins: RedshiftBins, n_chi: int = 1024) -> Array:
    """(n_bins,) lognormal shift parameters λ_i = ∫_0^χ_max q_i(χ) dχ: the magnitude of the Born
    convergence of an empty beam (δ = -1 along the whole line of sight), i.e. κ_min = -λ_i.
    q_i from ``sources.lensing_efficiency``; trapezoid on n_chi uniform nodes in [0, χ(z_max)],
    z_max = bins.z[-1] (q_i vanishes beyond). jit- and grad-able in cosmo."""
    bg = background(cosmo)
    chi_max = bg.comoving_distance(1.0 / (1.0 + jnp.asarray(bins.z, jnp.float64)[-1]))
    chi = chi_max * jnp.linspace(0.0, 1.0, n_chi)
    return jnp.trapezoid(lensing_efficiency(cosmo, bins, chi, bg=bg), chi, axis=-1)


@dataclass(frozen=True, eq=False)
class LognormalLensing(_SkyField):
    """Flat-sky shifted-lognormal κ maps with exactly the Limber C_ℓ (halofit) of the cosmology on
    the periodic FFT grid, including cross-bin correlations. latent: (n_bins, npix, npix) unit white
    noise and n_chi: Limber χ nodes of that C_ℓ (both as ``GaussianLensing``; ``MapModel``).

      κ_i = λ_i [exp(g_i - σ²_g,i / 2) - 1],   ξ^g_ij(θ) = ln(1 + ξ^κ_ij(θ) / (λ_i λ_j)),

    g a zero-mean Gaussian field, so that <κ_i> = 0, κ_i > -λ_i and <κ_i κ_j>(θ) = ξ^κ_ij(θ).
    Shift parameters λ_i (``lognormal_shift``): the empty-beam convergence, λ_i = ∫ q_i(χ) dχ with
    the Born lensing efficiency q_i, so that -λ_i, the κ of a line of sight with δ = -1 everywhere,
    is the map's lower bound, as it is physically in the Born approximation.

    On the grid (flatsky conventions: κ_ℓ = FFT2(map) A_pix, <κ_ℓ κ_ℓ*> = A_field C(ℓ)):
    ξ^κ(lag) = IFFT2[C(|ℓ|)] / A_pix, ξ^g from the formula above, C^g(ℓ) = Re FFT2[ξ^g] A_pix
    (even in ℓ since ξ^g is real and even). The per-mode C^g matrices are clipped to be positive
    definite (``flatsky._clip_modes``; a mode can come out slightly negative) and coloured like
    ``flatsky.gaussian_maps_from_white`` (Cholesky per mode, ℓ = 0 dropped). σ²_g,i is the variance
    g_i really has, Σ_ℓ C^g_ii / A_field over the coloured modes; this equals ξ^g_ii(0) up to the
    dropped ℓ = 0 mode and the clipping and keeps <κ_i> = 0 exact. Dropping the ℓ = 0 mode of g
    (where C^g(0) = A_pix Σ ξ^g ≤ 0 is not a valid power) shifts ξ^g by a constant c_ij, which
    scales the κ power by exp(-c_ij) (|c| ≲ 4e-6 for the LSST-Y10 bins on a 10° / 64² field).
    """

    what = "lognormal"

    def shift(self, cosmo: Cosmology) -> Array:
        """(n_bins,) shift parameters λ_i (``lognormal_shift``). Not tied to ``n_chi``: the λ
        quadrature needs no halofit, so its 1024 nodes cost little next to the Limber C_ℓ."""
        return lognormal_shift(cosmo, self.bins)

    def gaussian_spectra(self, cosmo: Cosmology) -> Array:
        """(n_pairs, npix, npix) C^g on the FFT mode grid, clipped, ℓ = 0 set to 0."""
        from . import flatsky

        field, npix = self.sky.field_deg, self.sky.npix
        ell_grid = flatsky.mode_ell(field, npix)
        a_pix = flatsky.pixel_area_sr(field, npix)
        cl = flatsky._model_on_modes(
            lambda ell: flatsky.limber_cl(cosmo, self.bins, ell, n_chi=self.n_chi), ell_grid)
        xi = jnp.real(jnp.fft.ifft2(cl)) / a_pix  # (n_pairs, N, N) on the lag grid
        lam = self.shift(cosmo)
        i, j = flatsky.pair_indices(self.bins.n_bins)
        xi_g = jnp.log1p(xi / (lam[i] * lam[j])[:, None, None])
        cl_g = jnp.real(jnp.fft.fft2(xi_g)) * a_pix
        return flatsky._clip_modes(cl_g, ell_grid)

    def kappa(self, cosmo: Cosmology, latent: Array) -> Array:
        from . import flatsky

        field, npix = self.sky.field_deg, self.sky.npix
        latent = jnp.asarray(latent, jnp.float64)
        if latent.shape != self.latent_shape:
            raise ValueError(f"latent must have shape {self.latent_shape}, got {latent.shape}")
        cl_g = self.gaussian_spectra(cosmo)
        g = flatsky._colour_white(latent, cl_g, field, npix)
        auto = np.cumsum(np.r_[0, np.arange(self.bins.n_bins, 1, -1)])  # (i, i) in the pair order
        var_g = jnp.sum(cl_g[auto], axis=(-2, -1)) / (flatsky.pixel_area_sr(field, npix) * npix**2)
        lam = self.shift(cosmo)
        return lam[:, None, None] * jnp.expm1(g - 0.5 * var_g[:, None, None])



# mesh_power_window's table: uniform in ln k over [K_WINDOW_MIN, K_WINDOW_MAX] h/Mpc
K_WINDOW_MIN, K_WINDOW_MAX, N_WINDOW = 1e-5, 1e3, 4096


def mesh_power_window(cell_size, n_phi: int = 32):
    """k ↦ power suppression of the simulated maps' density: CIC painting and trilinear reading
    each multiply δ by Π_i sinc²(k_i Δ_i / 2), so P gets Π_i sinc⁸(k_i Δ_i / 2). Limber modes are
    transverse to the line of sight (the box z axis for a flat sky), so the factor is averaged over
    the azimuth of k in the x-y plane (n_phi points). cell_size: (3,) or (2,) Mpc/h (x, y used).
    Returns a function of k (h/Mpc, any shape) for ``flatsky.limber_cl(power_filter=...)``.

    The average is tabulated once (``N_WINDOW`` nodes uniform in ln k, with its derivative) and
    read by cubic Hermite interpolation: evaluated directly, its n_phi sinc⁸ products per k and
    their gradient were two thirds of a C_ℓ-likelihood gradient (NOTEBOOK 24). Against the direct
    average the table is exact to 2e-11 absolute (the window is ≤ 1; ``mesh_power_window_direct``).
    Below the table the window is 1 − O(k²Δ²) ≈ its first node; above, ≈ 0 (its last node).
    Built with numpy: safe to call inside a trace.
    """
    log_k = np.linspace(np.log(K_WINDOW_MIN), np.log(K_WINDOW_MAX), N_WINDOW)
    x = np.exp(log_k)[:, None] * _half_cells(cell_size, n_phi)[:, None, :]
    s, ds = _sinc_and_derivative(x)  # (2, n_k, n_phi): along x and y
    w = np.mean((s[0] * s[1]) ** 8, axis=-1)
    # dW/dln k = mean 8 (s_x s_y)^7 (x s_x' s_y + y s_x s_y')
    dw = np.mean(8 * (s[0] * s[1]) ** 7 * (x[0] * ds[0] * s[1] + x[1] * s[0] * ds[1]), axis=-1)
    step = float(log_k[1] - log_k[0])

    def window(k):
        x = jnp.clip(jnp.log(jnp.asarray(k)), log_k[0], log_k[-1])
        i, t = _uniform_cell(x, log_k[0], step, N_WINDOW)
        return _hermite(i, t, step, jnp.asarray(w), jnp.asarray(dw))

    return window


def _half_cells(cell_size, n_phi: int) -> np.ndarray:
    """(2, n_phi) Δx cos φ / 2 and Δy sin φ / 2 at n_phi midpoints φ of one quadrant (the window
    is even in kx, ky): k times these are the sinc arguments along x and y."""
    dx, dy = (float(c) for c in np.asarray(cell_size)[:2])
    phi = (np.arange(n_phi) + 0.5) * (np.pi / 2) / n_phi
    return np.stack([np.cos(phi) * dx, np.sin(phi) * dy]) / 2


def _sinc_and_derivative(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin(x)/x and its derivative (cos x − sin x / x)/x, by their series below |x| = 1e-3."""
    small = np.abs(x) < 1e-3
    xs = np.where(small, 1.0, x)
    s = np.where(small, 1 - x**2 / 6, np.sin(xs) / xs)
    ds = np.where(small, -x / 3 + x**3 / 30, (np.cos(xs) - np.sin(xs) / xs) / xs)
    return s, ds


def mesh_power_window_direct(cell_size, n_phi: int = 32):
    """``mesh_power_window`` evaluated directly: the mean of Π sinc⁸ over n_phi azimuths per k."""
    c = jnp.asarray(_half_cells(cell_size, n_phi))

    def window(k):
        k = jnp.asarray(k)[..., None]
        return jnp.mean((jnp.sinc(k * c[0] / np.pi) * jnp.sinc(k * c[1] / np.pi)) ** 8, axis=-1)

    return window


def noise_sigma(bins: RedshiftBins, sky) -> np.ndarray:
    """(n_bins,) per-pixel shape-noise rms σ_e / sqrt(n_gal,i A_pix), with A_pix in arcmin²."""
    a_pix_arcmin2 = sky.pixel_area * (180 * 60 / np.pi) ** 2
    return np.asarray(bins.sigma_e) / np.sqrt(np.asarray(bins.n_gal) * a_pix_arcmin2)


def add_shape_noise(key: Array, kappa: Array, sigma: Array) -> Array:
    """κ plus independent Gaussian pixel noise of rms ``sigma`` (n_bins,) per bin."""
    sigma = jnp.asarray(sigma, kappa.dtype)
    shape = (kappa.shape[0],) + (1,) * (kappa.ndim - 1)
    return kappa + jax.random.normal(key, kappa.shape, kappa.dtype) * sigma.reshape(shape)


@dataclass(frozen=True)
class Maps:
    """Noise-free and noisy κ maps of one realisation (host numpy).

    kappa, kappa_noisy: (n_bins, *sky.shape) float64.  sigma_n: (n_bins,) per-pixel noise rms.
    """

    kappa: np.ndarray
    kappa_noisy: np.ndarray
    sigma_n: np.ndarray


def simulate_maps(model: MapModel, cosmo: Cosmology, seed: int,
                  progress: Callable[[Array], None] | None = None, latent=None) -> Maps:
    """One realisation: latent field from ``seed``, shape noise from an independent key of ``seed``.

    progress: optional host callback called with the number of PM steps done (PM model only).
    latent: the white noise to use instead of ``model.latent(seed)`` (e.g. fixed-amplitude
      fields for a validation); the shape noise still comes from ``seed``.

    Raises HaloOverflowError when a sharded PM run moved particles beyond the halo, ValueError when
    the maps are not finite or a PM/LPT step of ``cosmo`` is thicker than the lightcone's radial
    window (``lightcone.check_step_window``).
    """
    latent = model.latent(seed) if latent is None else latent
    kappa = np.asarray(model.realise(cosmo, latent, progress), np.float64)
    if not np.all(np.isfinite(kappa)):
        raise ValueError("the simulated convergence maps contain NaN or inf")
    sigma = noise_sigma(model.bins, model.sky)
    noise_key = jax.random.fold_in(jax.random.key(seed), 1)
    noisy = np.asarray(add_shape_noise(noise_key, jnp.asarray(kappa), sigma))
    noisy = np.where(model.sky.footprint(), noisy, 0.0)  # partial sky: no galaxies outside
    return Maps(kappa, noisy, sigma)


# ``simulate_maps`` runs ``pm_kappa`` as callback-free programs (the set-up, one PM step, the maps)
# that JAX's persistent compilation cache keeps between processes, and reports progress between
# steps from the host: a program with the progress callback inside is never cached (see
# ``nbody.take_step``). The arithmetic is ``pm_kappa``'s.


def _pm_start(cosmo: Cosmology, cfg: SimConfig, lightcone: Lightcone, bins: RedshiftBins,
              painter: BornLightcone, noise: Array):
    """``pm_kappa`` up to the first step: the step carry, the step factors and the Born table."""
    params = born_params(cosmo, cfg, bins, lightcone.chi_max, chi_min=lightcone.chi_min,
                         pad=painter.spacing)
    state, factors = initial_particles(cosmo, cfg, linear_field(cosmo, cfg, noise))
    return start_steps(cfg, state, painter), factors, params


_pm_start_jit = jax.jit(_pm_start, static_argnums=(1, 2, 4))
_finish_jit = jax.jit(_finish, static_argnums=1)


def _pm_kappa_stepwise(cosmo: Cosmology, cfg: SimConfig, lightcone: Lightcone, bins: RedshiftBins,
                       noise: Array, progress: Callable[[int], None] | None = None
                       ) -> tuple[Array, Array]:
    """``pm_kappa`` step by step from the host, with ``progress(steps_done)`` after each step."""
    painter = BornLightcone(cfg, lightcone, bins.n_bins, samples_per_step(cfg, lightcone))
    carry, factors, params = _pm_start_jit(cosmo, cfg, lightcone, bins, painter, noise)
    _, obs, max_disp = run_steps(cfg, painter, carry, factors, params, progress)
    return _finish_jit(obs, lightcone.sky), max_disp


@functools.lru_cache(maxsize=16)
def _kappa_jit(model):
    """One compiled ``model.kappa`` per map model (models hash by identity), so repeated
    ``simulate_maps`` calls do not re-trace it (~4 s a call for the Gaussian-field model)."""
    return jax.jit(model.kappa)

__all__ = ["mesh_power_window", "ShellLensing", "check_shell_coverage", "GaussianLensing", "LognormalLensing", "lognormal_shift", "Maps", "MapModel", "simulate_maps", "FlatSky", "HealpixSky", "Lightcone", "LPTLensing", "PMLensing", "add_shape_noise",
           "born_params", "lpt_kappa", "noise_sigma", "pm_kappa"]
