"""The field-level numpyro model (θ, z → κ → Gaussian shape-noise likelihood) and its log-density.

``field_model`` builds the posterior p(θ, z | d) of a map model: one sample site per cosmological
parameter, one event-shaped site for the latent white-noise field z, and an observed site for the
noisy κ maps. ``log_density`` turns any such numpyro model into plain JAX functions of the
unconstrained position (a dict site → array), for MCLMC, tests and custom samplers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, trace
from numpyro.infer.util import potential_energy

from simulators import Cosmology, flatsky

Array = jax.Array

FIELD_SITE = "z"
OBS_SITE = "kappa_obs"
# Default start of the field: z0 = FIELD_INIT_SCALE × N(0, 1). At z = 0 exactly κ vanishes (κ is
# linear in z for the Gaussian model, nearly so for PM at early steps), so ∂ log L / ∂θ = 0 and θ
# feels no pull from the data; a small random field breaks that symmetry and gives every chain its
# own start. It has too little amplitude, though, and the map amplitude goes as σ_8 |z|, so on large
# fields σ_8 drifts up first (to 1.4 in a 27k-cell PM run); a full prior draw has random phases
# and sent σ_8 into the mirror mode (σ_8, z) → (-σ_8, -z). ``start.field_start`` (a draw of
# p(z | d, θ₀) by perturb-and-optimise) is the better start; the CLI uses it.
FIELD_INIT_SCALE = 0.1

_COSMO_FIELDS = tuple(f.name for f in dataclasses.fields(Cosmology))


def place(x, sharding) -> Array:
    """A host array, or this process's pieces of one (``checkpoint.LocalShards``), as a device
    array with ``sharding`` (None: one device). Each process reads only the blocks its devices
    hold, so a host array must have the same values on every jax.distributed process."""
    from .checkpoint import LocalShards

    if isinstance(x, LocalShards):
        if sharding is None:
            raise ValueError(f"a {list(x.shape)} array split over processes has no field layout "
                             f"here to be placed in")
        return x.assemble(sharding)
    if isinstance(x, jax.Array) and (sharding is None or x.sharding.is_equivalent_to(sharding, x.ndim)):
        return x
    if sharding is None:
        return jnp.asarray(x)
    if isinstance(x, jax.Array):  # a device array in another layout: reshard on device
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, eq=False)  # compared by identity: holds arrays and a map model
class FieldModel:
    """A numpyro model (call it with no arguments) of the field-level posterior p(θ, z | d).

    Sites, in order: one per ``theta_names`` (the prior of each parameter, a scalar), ``"z"``
    (unit white noise of shape ``map_model.latent_shape``, one event-shaped site), ``"kappa_obs"``
    (observed: data (n_bins, *sky.shape), independent Gaussian pixels of rms sigma_n (n_bins,) per
    bin, masked outside ``mask``). Build it with ``field_model``, which validates the inputs.

    Attributes:
      map_model: a ``simulators.lensing`` map model (``latent_shape``, ``kappa``, ``sky``, ``bins``).
      prior_dists: parameter name (a ``Cosmology`` field) → scalar numpyro distribution.
      base: the cosmology whose other parameters stay fixed.
      data: (n_bins, *sky.shape) float64 noisy κ.
      sigma_n: (n_bins,) float64 per-pixel noise rms.
      mask: (n_bins, *sky.shape) bool, True where pixels enter the likelihood.
      scale_mask: None, or (n_bins, npix, npix) bool Fourier modes (``flatsky.scale_mask``) that
        enter the likelihood (scale cuts): model and data are both projected onto them
        (``flatsky.apply_scale_mask``; ``data`` is stored projected), and with white pixel noise
        the Gaussian density of the projected residual is that of the kept modes.
    """

    map_model: Any
    prior_dists: Mapping[str, dist.Distribution]
    base: Cosmology
    data: Array
    sigma_n: Array
    mask: Array
    scale_mask: Array | None = None

    @property
    def theta_names(self) -> tuple[str, ...]:
        return tuple(self.prior_dists)

    @property
    def field_site(self) -> str:
        return FIELD_SITE

    @property
    def field_shape(self) -> tuple[int, ...]:
        return tuple(self.map_model.latent_shape)

    @property
    def field_on_sky(self) -> bool:
        """True when the latent field is a (n_bins, *sky.shape) stack of sky fields (Gaussian and
        lognormal maps), False for a 3-D white-noise field of a PM or LPT mesh."""
        return getattr(self.map_model, "cfg", None) is None

    @property
    def field_dtype(self):
        """The map model's field dtype (PM: ``cfg.dtype``, float32 by default; others float64)."""
        cfg = getattr(self.map_model, "cfg", None)
        return jnp.dtype(cfg.dtype) if cfg is not None else jnp.dtype(jnp.float64)

    @property
    def grid(self):
        """The PM device grid when the field is sharded, else None."""
        cfg = getattr(self.map_model, "cfg", None)
        return cfg.grid if cfg is not None and cfg.grid.sharded else None

    def put(self, x) -> Array:
        """Place a host array on the devices: field-shaped arrays (and flattened field-sized vectors,
        e.g. a diagonal mass matrix) split like the PM field when the grid is sharded. ``x`` may
        also be this process's pieces of such an array (``checkpoint.LocalShards``, when the grid
        spans several processes)."""
        return place(x, self.sharding_for(tuple(x.shape)))

    def sharding_for(self, shape: tuple[int, ...]):
        """How ``put`` splits an array of this shape over the devices (None: it does not)."""
        grid = self.grid
        if grid is None:
            return None
        if shape == self.field_shape:
            return grid.sharding(len(shape))
        if len(shape) == 1 and shape[0] == int(np.prod(self.field_shape)):
            from jax.sharding import NamedSharding, PartitionSpec

            return NamedSharding(grid.mesh, PartitionSpec(("x", "y")))
        return None

    @cached_property
    def _kappa(self) -> Callable[[Cosmology, Array], Array]:
        # jit: numpyro runs the model eagerly to find its sites and start; compiled, those runs
        # cost one compile instead of thousands of small dispatches. Inlined under outer traces.
        return jax.jit(self.map_model.kappa)

    def __call__(self) -> None:
        theta = {name: numpyro.sample(name, d) for name, d in self.prior_dists.items()}
        cosmo = dataclasses.replace(self.base, **theta)
        shape = self.field_shape
        z = numpyro.sample(FIELD_SITE, dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
        # HMC moves z in float64 (numpyro's mass matrix is float64); the simulation runs in the
        # model's field dtype, and on a sharded grid the constraint keeps z, and through the
        # transposed constraint its gradient, split over devices.
        field = z.astype(self.field_dtype)
        if self.grid is not None:
            field = self.grid.constrain(field)
        kappa = self._kappa(cosmo, field)
        if self.scale_mask is not None:
            kappa = flatsky.apply_scale_mask(kappa, self.scale_mask)
        scale = self.sigma_n.reshape((-1,) + (1,) * (kappa.ndim - 1))
        like = dist.Normal(kappa, scale).mask(self.mask).to_event(kappa.ndim)
        numpyro.sample(OBS_SITE, like, obs=self.data)


def field_model(map_model, prior_dists: Mapping[str, dist.Distribution], base: Cosmology, data,
                sigma_n, *, mask=None, scales=None) -> FieldModel:
    """The numpyro model of the field-level posterior of a map model (see ``FieldModel``).

    Args:
      map_model: ``PMLensing``, ``LPTLensing``, ``GaussianLensing`` or ``LognormalLensing``.
      prior_dists: {name: scalar numpyro distribution}; names are ``Cosmology`` fields (e.g.
        "Omega_c", "sigma8"); the site order is the dict order.
      base: cosmology for the parameters not sampled; θ replaces fields of it.
      data: (n_bins, *sky.shape) noisy κ maps (dimensionless), finite.
      sigma_n: (n_bins,) per-pixel noise rms (e.g. ``simulators.lensing.noise_sigma``), > 0.
      mask: bool, sky.shape or (n_bins, *sky.shape); pixels where False are left out of the
        likelihood. Default: ``sky.footprint()``.
      scales: optional (ell_min, ell_max), each (n_bins,): only the Fourier modes of bin b with
        ell_min[b] <= |ℓ| <= ell_max[b] enter the likelihood (flat sky, whole footprint).
    Returns: a ``FieldModel`` (a numpyro model called with no arguments).
    Raises ValueError naming the bad argument.
    """
    for attr in ("latent_shape", "kappa", "sky", "bins"):
        if not hasattr(map_model, attr):
            raise ValueError(f"map_model must be a simulators.lensing map model; "
                             f"{type(map_model).__name__} has no {attr!r}")
    if hasattr(map_model, "shells"):
        raise ValueError("field-level inference does not support a lightcone of several boxes "
                         "([shells]) yet: use a single-box configuration")
    if not isinstance(base, Cosmology):
        raise ValueError(f"base must be a simulators.Cosmology, got {type(base).__name__}")
    prior_dists = dict(prior_dists)
    if not prior_dists:
        raise ValueError("prior_dists is empty: give at least one parameter to sample")
    for name, d in prior_dists.items():
        if name not in _COSMO_FIELDS:
            raise ValueError(f"prior_dists: {name!r} is not a Cosmology parameter; valid: "
                             f"{', '.join(_COSMO_FIELDS)}")
        if not isinstance(d, dist.Distribution):
            raise ValueError(f"prior_dists[{name!r}] must be a numpyro distribution, "
                             f"got {type(d).__name__}")
        if d.batch_shape != () or d.event_shape != ():
            raise ValueError(f"prior_dists[{name!r}] must be scalar, got batch_shape "
                             f"{d.batch_shape} and event_shape {d.event_shape}")

    n_bins = map_model.bins.n_bins
    expected = (n_bins,) + tuple(map_model.sky.shape)
    data = np.asarray(data, np.float64)
    if data.shape != expected:
        raise ValueError(f"data has shape {data.shape} but the map model gives "
                         f"(n_bins, *sky.shape) = {expected}")
    if not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.isfinite(data)))
        raise ValueError(f"data contains {bad} NaN or inf pixel(s); set pixels outside the "
                         f"footprint to 0 and leave them out with mask")
    sigma_n = np.asarray(sigma_n, np.float64)
    if sigma_n.shape != (n_bins,):
        raise ValueError(f"sigma_n must have shape (n_bins,) = ({n_bins},), got {sigma_n.shape}")
    if not np.all(np.isfinite(sigma_n) & (sigma_n > 0)):
        raise ValueError(f"sigma_n must be finite and > 0 in every bin, got {sigma_n}")
    mask = map_model.sky.footprint() if mask is None else mask
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape not in (expected, expected[1:]):
        raise ValueError(f"mask must have shape sky.shape = {expected[1:]} or (n_bins, *sky.shape) "
                         f"= {expected}, got {mask.shape}")
    mask = np.broadcast_to(mask, expected)
    if not mask.any():
        raise ValueError("mask selects no pixel: the likelihood would be empty")
    modes = None
    if scales is not None:
        sky = map_model.sky
        if not hasattr(sky, "field_deg") or not mask.all():
            raise ValueError("scale cuts need a flat-sky map model and the whole field in the "
                             "likelihood (no pixel mask)")
        lo, hi = (np.asarray(v, np.float64) for v in scales)
        if lo.shape != (n_bins,) or hi.shape != (n_bins,):
            raise ValueError(f"scales must be (ell_min, ell_max), each of shape ({n_bins},)")
        modes = flatsky.scale_mask(sky.field_deg, sky.npix, lo, hi)
        if not modes.any():
            raise ValueError("scales keep no Fourier mode: the likelihood would be empty")
        data = np.asarray(flatsky.apply_scale_mask(data, modes), np.float64)
        modes = jnp.asarray(modes)
    return FieldModel(map_model, prior_dists, base, jnp.asarray(data), jnp.asarray(sigma_n),
                      jnp.asarray(mask), modes)


# ------------------------------------------------------------------------------------------------
# Log-density on the unconstrained space


@dataclass(frozen=True, eq=False)
class LogDensity:
    """The model's log-density as plain JAX functions of the unconstrained position.

    A position is a dict site → array: each θ site a scalar on the unconstrained (real) line of its
    prior's support, the field site an array of ``field_shape`` (float64). Values include the
    log-Jacobian of the θ transforms (what HMC samples).

    Attributes:
      potential_fn: position → -log p (scalar), numpyro's potential energy.
      transforms: θ name → transform from unconstrained to constrained values.
      theta_names, field_site, field_shape: the sites.
      init_theta: θ name → constrained start value.
      field_sharding: how the field is split over the devices (a jax Sharding; None: one device).
      field_scale: None, or a ``precondition.FourierScale`` S: the position's field is then the
        sampler's w, the model's field is z = S w, and ``potential_fn`` already composes S (see
        ``preconditioned``). ``to_model`` / ``init_position`` convert between the two.
    """

    potential_fn: Callable[[dict], Array]
    transforms: Mapping[str, Any]
    theta_names: tuple[str, ...]
    field_site: str
    field_shape: tuple[int, ...]
    init_theta: Mapping[str, float]
    field_sharding: Any = None
    field_scale: Any = None

    def preconditioned(self, scale) -> "LogDensity":
        """This log-density over w with z = S w (``scale``: a ``precondition.FourierScale``); the
        log-determinant of S is a constant and left out."""
        if self.field_scale is not None:
            raise ValueError("this log-density is already preconditioned")
        base, site = self.potential_fn, self.field_site

        def potential(position):
            return base({**position, site: scale.to_model(position[site])})

        return dataclasses.replace(self, potential_fn=potential, field_scale=scale)

    def to_model(self, position: dict) -> dict:
        """A sampler position with the model's field z (the identity without a preconditioner)."""
        if self.field_scale is None:
            return position
        return {**position, self.field_site: self.field_scale.to_model(position[self.field_site])}

    def logdensity(self, position: dict) -> Array:
        """log p(position) (scalar), unnormalised, on the unconstrained space."""
        return -self.potential_fn(position)

    @cached_property
    def value_and_grad(self) -> Callable[[dict], tuple[Array, dict]]:
        """jit: position → (log p, ∂ log p / ∂position, a dict like position)."""
        return jax.jit(jax.value_and_grad(self.logdensity))

    def constrain(self, position: dict) -> dict:
        """The θ part of a position on the constrained (physical) scale: {name: value}."""
        return {n: self.transforms[n](position[n]) for n in self.theta_names}

    def unconstrain(self, theta: Mapping[str, Any]) -> dict:
        """Constrained θ values → unconstrained ones (float64)."""
        return {n: jnp.asarray(self.transforms[n].inv(jnp.asarray(theta[n], jnp.float64)))
                for n in self.theta_names}

    def white_noise(self, key: Array) -> Array:
        """(field_shape) float64 unit white noise from ``key``, laid out like the field: each
        device draws only its block, and the values are the same on any device grid (JAX's
        partitionable threefry) and equal ``jax.random.normal(key, field_shape, float64)``."""
        return self._draw(key)

    @cached_property
    def _draw(self) -> Callable[[Array], Array]:
        draw = partial(jax.random.normal, shape=self.field_shape, dtype=jnp.float64)
        return jax.jit(draw, out_shardings=self.field_sharding)

    def place_field(self, field) -> Array:
        """A field (host or device array, or this process's ``checkpoint.LocalShards`` of it) as a
        float64 device array laid out like the field. Raises ValueError for a wrong shape."""
        if not hasattr(field, "shape"):  # e.g. nested lists
            field = np.asarray(field, np.float64)
        if tuple(field.shape) != self.field_shape:
            raise ValueError(f"the {self.field_site!r} field must have shape {self.field_shape}, "
                             f"got {tuple(field.shape)}")
        field = place(field, self.field_sharding)
        return field if field.dtype == jnp.float64 else field.astype(jnp.float64)

    def init_position(self, key: Array, field=None) -> dict:
        """Start position: θ at ``init_theta``; the model's field ``field`` if given (see
        ``place_field``), else FIELD_INIT_SCALE × ``white_noise(key)`` (see FIELD_INIT_SCALE for
        why); with a preconditioner, the field as the sampler's w = S^{-1} z."""
        pos = self.unconstrain(self.init_theta)
        z = FIELD_INIT_SCALE * self.white_noise(key) if field is None else self.place_field(field)
        pos[self.field_site] = z if self.field_scale is None else self.field_scale.from_model(z)
        return pos


def _default_init(d: dist.Distribution, name: str) -> float:
    """Prior mean, or the median where the mean is not finite (e.g. Cauchy)."""
    try:
        value = float(d.mean)
    except NotImplementedError:
        value = float("nan")
    if not np.isfinite(value):
        value = float(d.icdf(0.5))
    if not np.isfinite(value):
        raise ValueError(f"prior of {name!r} has no finite mean or median: pass init[{name!r}]")
    return value


def _latent_sites(model) -> dict:
    """{name: {"fn": distribution, "shape": value shape}} of the model's latent sample sites, read
    by tracing the model abstractly (jax.eval_shape): no simulation runs, nothing is compiled. The
    prior distributions are built outside the model, so their supports and moments stay concrete."""
    sites = {}

    def run():
        tr = trace(seed(model, 0)).get_trace()
        for name, site in tr.items():
            if site["type"] == "sample" and not site["is_observed"]:
                sites[name] = {"fn": site["fn"], "shape": tuple(np.shape(site["value"]))}
        return jnp.zeros(())

    jax.eval_shape(run)
    return sites


def log_density(model: Callable[[], None], theta_names, *, field_site: str = FIELD_SITE,
                init: Mapping[str, Any] | None = None) -> LogDensity:
    """Plain-JAX log-density of a numpyro model with θ sites ``theta_names`` and a field site.

    Args:
      model: a numpyro model called with no arguments (e.g. ``field_model(...)``).
      theta_names: the scalar parameter sites.
      field_site: the latent field site.
      init: optional constrained start values of θ by name (default: each prior's mean, or its
        median where the mean is undefined).
    Reads the model's sites by abstract evaluation (no simulation is run or compiled). A model with
    a ``sharding_for`` method (``FieldModel``) gives the field's device layout.
    Raises ValueError for a missing site, a non-scalar θ site or an invalid init value.
    """
    theta_names = tuple(theta_names)
    sites = _latent_sites(model)
    for name in theta_names + (field_site,):
        if name not in sites:
            raise ValueError(f"the model has no latent sample site {name!r}; its sites: "
                             f"{', '.join(sites)}")
    for name in theta_names:
        if sites[name]["shape"] != ():
            raise ValueError(f"parameter site {name!r} must be scalar, got shape "
                             f"{sites[name]['shape']}")
    extra = set(sites) - set(theta_names) - {field_site}
    if extra:
        raise ValueError(f"the model has latent sites beyond theta_names and {field_site!r}: "
                         f"{', '.join(sorted(extra))}")
    init = dict(init or {})
    init_theta = {}
    for name in theta_names:
        d = sites[name]["fn"]
        value = float(init[name]) if name in init else _default_init(d, name)
        if not np.isfinite(value) or not bool(d.support(jnp.asarray(value))):
            raise ValueError(f"init[{name!r}] = {value} lies outside the prior's support")
        init_theta[name] = value
    # numpyro's potential energy as a pure function of the unconstrained sites: no eager
    # initialisation (an eager gradient through a simulation costs many small compilations).
    potential_fn = partial(potential_energy, model, (), {})
    transforms = {n: biject_to(sites[n]["fn"].support) for n in theta_names}
    shape = sites[field_site]["shape"]
    sharding_for = getattr(model, "sharding_for", None)  # FieldModel: the PM device grid's layout
    return LogDensity(potential_fn, transforms, theta_names, field_site, shape, init_theta,
                      None if sharding_for is None else sharding_for(shape))
