"""Experiment configuration: one TOML file per experiment, one loader, one error style.

    from experiments.config import load_config
    cfg = load_config("quick")                  # a shipped config (experiments/configs/quick.toml)
    cfg = load_config("my_run.toml")            # or any path, or a dict with the same layout
    model, cosmo = cfg.build_model(), cfg.cosmology()

Every error is a ``ConfigError`` (a ValueError) whose message starts with the dotted key it is
about, e.g. ``maps.field_deg: must be > 0, got -1``; when loading a file the message is prefixed
with the file name. Unknown keys and sections are errors (with the closest valid name suggested).

Loading validates everything that can be checked without starting a JAX backend, so that the
command line can still choose the number of CPU devices (``simulation.pdims``) afterwards. The
LSST-Y10 preset bins and the default lightcone depth need JAX and are built on demand
(``bins()``, ``chi_max()``, ``build_model()``).

Schema (every key is optional; defaults in brackets; units after the colon)
--------------------------------------------------------------------------
Top level
  name                 : str, a label for outputs [the file's stem, or "experiment"]
  seed                 : int >= 0, seed of the initial white noise and of the shape noise [0]

[cosmology]            flat w0waCDM (defaults: ``Cosmology.fiducial()``, LSST DESC Y10)
  Omega_c              : cold dark matter density today [0.2664]
  Omega_b              : baryon density today [0.0492]
  h                    : H0 / (100 km/s/Mpc) [0.6727]
  n_s                  : scalar spectral index [0.9645]
  sigma8               : linear rms density in 8 Mpc/h spheres at z = 0 [0.831]
  w0, wa               : CPL dark-energy equation of state w(a) = w0 + wa (1 - a) [-1, 0]

[simulation]           the map model and its 3-D simulation
  kind                 : "pm" (LPT + FastPM steps, lightcone painted on the fly), "lpt" (LPT
                         displacements only, no N-body steps), "gaussian" (Gaussian random
                         field with the Limber C_ell; flat sky only, ignores the rest) or
                         "lognormal" (shifted-lognormal field with the same C_ell, shifts from
                         the empty-beam convergence; flat sky only, ignores the rest) ["pm"]
  mesh_shape           : force-mesh cells, int (cube) or [nx, ny, nz] [[32, 32, 64]]
  box_size             : box side lengths in Mpc/h, float (cube) or [Lx, Ly, Lz]
                         [[200.0, 200.0, 1000.0]]
  mesh_factor          : force-mesh cells per particle spacing (int >= 1) [1]
  a_init               : scale factor where LPT starts and the lightcone ends, in (0, 1); keep
                         it <= 1 / (1 + z_max) of the sources (0.2 reaches z = 4) [0.2]
  n_steps              : time steps, uniform in a from a_init to 1 [10]
  lpt_order            : 1 or 2 [2]
  deconvolve           : divide the force by the CIC window of painting and reading (needs
                         mesh_factor = 1); recommended for lensing maps: the mesh power then
                         follows halofit to smaller scales [false]
  dtype                : "float32" or "float64", fields and particles ["float32"]
  gradient             : "checkpoint" or "adjoint" ["checkpoint"]
  pdims                : device grid "PXxPY"; mesh_shape (and the particle grid) must divide
                         along x and y. On CPU the command line creates that many devices ["1x1"]
  halo                 : halo width in mesh cells for sharded runs (int >= 2) [8]
  n_chi                : gaussian/lognormal: Limber quadrature nodes in chi (int >= 16; 64 is
                         within ~1% of 256 per mode at 4x less cost, e.g. for field-level HMC) [256]

[lightcone]
  observer             : [x, y, z] observer position in box coordinates, Mpc/h [flat sky: the
                         centre of the z = 0 face; HEALPix: the box centre]
  chi_max              : lightcone depth in Mpc/h [the comoving distance of the farthest source
                         redshift, z[-1] of the bins, for the fiducial cosmology, capped at
                         chi(a_init)]; the box is tiled periodically ("replicas") out to it
  randomize            : random shift and cube-symmetry rotation of every replica [false]
  seed                 : int >= 0, seed of the replica transforms [0]
  window_margin        : each PM step's radial sample window spans this many times the fiducial
                         cosmology's thickest step, float >= 1 [1.25]; raise it when a cosmology
                         is rejected for a step thicker than the window (e.g. Omega_c near 0)

[maps]
  sky                  : "flat" (square patch around +z) or "healpix" (full sphere) ["flat"]
  field_deg            : flat: side of the square field in degrees, in (0, 90) [5.0]
  npix                 : flat: pixels per side (int >= 2) [64]
  nside                : healpix: HEALPix nside, a power of 2 [64]
  disc                 : healpix: [lon, lat, radius] in degrees for a partial sky: only pixels
                         whose centres lie in that disc are traced and get shape noise; the maps
                         keep the full-sky shape with zeros outside [full sky]

[sources]              either the LSST-Y10 preset or one n(z) file per bin
  preset               : "lsst_y10" [used unless nz_files is given]
  n_bins               : preset: tomographic bins with equal galaxy numbers (int >= 1) [5]
  n_gal_total          : preset: total galaxy density in gal/arcmin^2, split equally [27.0]
  sigma_z0             : preset: photo-z scatter sigma_z = sigma_z0 (1 + z) [0.05]
  nz_files             : list of two-column text files (z, n(z)), one per bin; relative paths
                         are relative to the config file
  n_gal_per_bin        : nz_files: galaxy density in gal/arcmin^2, one number or one per file
                         [required with nz_files]
  sigma_e              : shape noise per ellipticity component [0.26]

[cl]                   tomographic C_ell binning (``lensbench cl``); ell is dimensionless
  ell_edges            : explicit increasing bin edges [not set: use the keys below]
  ell_min              : lowest edge [flat: the fundamental 2 pi / field; healpix: 2]
  ell_max              : highest edge [flat: the Nyquist pi npix / field; healpix: 2 nside, at
                         most 3 nside (HEALPix estimates are good to ~2 nside)]
  n_ell_bins           : number of bins (int >= 1) [12]
  spacing              : "log" or "linear" ["log"]

[prior]                which parameters are inferred, and their priors (``cfg.prior()`` builds an
                       ``experiments.priors.Prior``)
  preset               : "lsst_y10" (the 6-parameter LSST-Y10 prior: Omega_c ~ TN(0.2664, 0.2,
                         low=0), Omega_b ~ N(0.0492, 0.006), sigma8 ~ TN(0.831, 0.14, low=0),
                         h ~ N(0.6727, 0.063), n_s ~ N(0.9645, 0.08), w0 ~ TN(-1, 0.9, low=-2,
                         high=-0.3)) or "none" ["lsst_y10"]
  params               : the inferred parameters, in order (Cosmology field names); the others
                         stay at their [cosmology] values [every preset and declared parameter]
  Omega_c, Omega_b, h, n_s, sigma8, w0, wa : a parameter's prior as an inline table,
                         overriding the preset's:
                         {dist = "normal", loc, scale}, {dist = "truncated_normal", loc, scale,
                         low and/or high} or {dist = "uniform", low, high}

[training_set]         simulated (theta, kappa) pairs for the implicit pipeline (``lensbench generate``)
  n_sims               : simulations [1000]
  batch_size           : simulations per batch and per chunk written [4 per device for PM/LPT,
                         16 per device for Gaussian/lognormal maps]
  seed                 : seed of the parameter draws and latent fields (distinct from the
                         observation's top-level seed) [1]
  n_calibration        : the last simulations, held out from training for calibration [100]

[compressor]           neural compressor training (``compressors.TrainConfig``)
  loss                 : "mse", "mae", "gnll" or "vmim" ["vmim"]
  network              : "resnet" or "cnn" ["resnet"]
  width, depth         : channels of the first stage [16], stages (each halves the maps) [3]
  epochs               : maximum epochs; early stopping may end sooner [30]
  batch_size           : maps per step [32]
  learning_rate        : peak AdamW learning rate (warm-up, cosine decay) [1e-3]
  patience             : epochs without a better validation loss before stopping [8]
  val_fraction         : fraction of the training maps used for validation [0.1]
  seed                 : seed of the split, initialisation, noise and augmentation [0]

[npe]                  neural posterior estimation (sbi)
  density              : "nsf" (neural spline flow) or "maf" ["nsf"]
  max_epochs           : maximum training epochs (sbi stops early) [300]
  batch_size           : training batch size [128]
  noise_copies         : shape-noise realisations drawn per simulation [4]
  n_samples            : posterior samples written by ``lensbench sample`` [20000]
  calibration_samples  : posterior samples per held-out simulation for SBC/TARP [500]
  seed                 : seed of the noise and of training [0]

[cl_baseline]          the power-spectrum baseline (analytic Gaussian likelihood + NUTS)
  covariance           : "simulated" (the sample covariance of n_cov simulations of the map
                         model at [cosmology], Hartlap-corrected) or "gaussian" (the analytic
                         Gaussian covariance of the binned C_ell at [cosmology], per Fourier mode
                         with shape noise: exact for Gaussian maps, no sampling noise; it omits
                         the non-Gaussian terms of PM maps) ["simulated"]
  n_cov                : fiducial simulations for the simulated covariance [200]
  likelihood           : "gaussian" or "sellentin_heavens" (simulated covariance only) ["gaussian"]
  num_warmup, num_samples, num_chains : NUTS settings [500, 2000, 2]
  n_chi                : Limber quadrature nodes in chi (64 changes the binned C_ell by < 0.2%
                         against 256, at a quarter of the cost per gradient) [64]
  seed                 : the covariance simulations use seeds seed .. seed + n_cov - 1 (keep
                         the observation's seed outside); NUTS uses seed too [10000]

[hmc]                  explicit full-field inference over theta and the initial white noise
                       (``lensbench hmc``; ``explicit``)
  sampler              : "nuts" (dense mass block over theta, diagonal over the field),
                         "mclmc" (blackjax microcanonical Langevin; unadjusted, so biased by its
                         step size) or "mams" (Metropolis-adjusted microcanonical HMC: MCLMC's
                         tuning, then the step size adapted to target_accept; unbiased) ["nuts"]
  num_warmup           : warm-up (NUTS adaptation / MCLMC tuning) steps [200]
  num_samples          : samples per chain [200]
  num_chains           : chains [1]
  processes            : run the chains in this many OS processes at once on this machine (CPU:
                         up to the number of cores; one GPU: keep 1); the draws do not depend on
                         it. Must be 1 under jax.distributed, which splits each chain's field [1]
  max_tree_depth       : NUTS: at most 2^depth - 1 gradient evaluations per sample [6]
  target_accept        : NUTS and MAMS: target acceptance probability of the step-size
                         adaptation [0.8]
  precondition         : "none" or "fourier": sample the latent field with each Fourier mode
                         scaled by its linearised posterior width, estimated once at the start
                         from 8 Hessian-vector probes (16 gradients); an exact change of
                         variables, for any sampler (``explicit.precondition``) ["none"]
  segment              : iterations between checkpoints (the run resumes from the last one) [25]
  thin_field           : keep the latent field every N samples (0: never); theta is always kept [50]
  gradient             : "adjoint" (reverse-time PM adjoint: memory independent of the number of
                         steps) or "checkpoint"; replaces simulation.gradient for HMC ["adjoint"]
  seed                 : seed of the chains [2]
  start_steps          : Adam steps (one gradient each) of the start field, a draw of
                         p(z | d, theta at the prior mean) by perturb-and-optimise
                         (``explicit.field_start``); 100 bring the quick objective to within 1 of
                         its optimum, 0 starts from the perturbed draw itself [100]

[compare]              ``lensbench compare``: the methods run on one observation and compared
  methods              : any of "cl_analytic" (Gaussian C_ell likelihood + NUTS), "npe_cl" (NPE on
                         the C_ell data vector), "npe_mse", "npe_mae", "npe_gnll", "npe_vmim" (NPE
                         on a compressor trained with that loss), "npe_maps" (one-stage NPE),
                         "hmc" (explicit field-level), "exact" (grid posterior; Gaussian-field
                         maps only) [["cl_analytic", "npe_cl", "npe_vmim", "hmc"]]
  observation          : an observed map file (``lensbench maps``) [simulate one at [cosmology]
                         with the top-level seed]; relative paths are relative to the config file
  c2st_samples         : at most this many samples per method enter each C2ST [2000]
  seed                 : seed of the C2ST subsampling and classifier [0]
  ess_min              : least effective sample size of every sampled parameter for a method to
                         count as converged (int >= 1) [400]
  r_hat_max            : largest split R-hat of every sampled parameter for a method to count as
                         converged (> 1) [1.01]. The console, report.md and the contour legend
                         flag methods that miss either as "unconverged"

Adding a section (e.g. [prior], [compressor], [npe], [hmc] later): write a frozen dataclass whose
fields are declared with ``key(...)`` (type, default, doc, optional check), optionally a
``_check(self, given)`` method for rules that involve several keys, add it to ``SECTIONS`` and add
a field of that type to ``ExperimentConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ConfigError", "ExperimentConfig", "OptionError", "SECTIONS", "load_config",
           "load_config_text", "parse_pdims", "peek_pdims", "resolve_config_path",
           "shipped_configs"]


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the key it is about."""


class OptionError(ValueError):
    """Option text that does not parse (a device grid, a mesh shape) or options that do not go
    together: the command line reports it as a usage error (exit 2), like a bad option type."""


def _fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}")


# ---- key declarations -----------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """How one key is read: its type tag, documentation, choices and an extra value check.

    Types: "float", "int", "bool", "str", "int3" (int or 3 ints), "float3" (float or 3 floats),
    "vec3" (exactly 3 floats), "floats" (list of floats), "float|floats" (one or a list),
    "path" (a file name), "paths" (list of file names), "strs" (list of strings), "table" (an inline table, kept as a
    dict; its ``check`` validates the contents).
    """

    type: str
    doc: str = ""
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None  # value -> error message or None


def key(type_: str, default: Any = None, doc: str = "", choices: tuple = (),
        check: Callable[[Any], str | None] | None = None):
    """A dataclass field that is a config key (see ``Key``)."""
    return field(default=default, metadata={"key": Key(type_, doc, choices, check)})


def _type_name(value) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _number(value, name: str, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        _fail(name, f"must be {'an integer' if integer else 'a number'}, got {value!r} "
                    f"({_type_name(value)})")
    if not integer:
        value = float(value)
        if not math.isfinite(value):
            _fail(name, f"must be finite, got {value}")
    return value


def _coerce(k: Key, value, name: str, base_dir: Path):
    """Convert a TOML value to the key's normalised Python value, or fail naming the key."""
    t = k.type
    if t in ("float", "int"):
        value = _number(value, name, t == "int")
    elif t == "bool":
        if not isinstance(value, bool):
            _fail(name, f"must be true or false, got {value!r} ({_type_name(value)})")
    elif t == "str":
        if not isinstance(value, str):
            _fail(name, f"must be a string, got {value!r} ({_type_name(value)})")
    elif t in ("int3", "float3", "vec3"):
        integer = t == "int3"
        if isinstance(value, list):
            if len(value) != 3:
                _fail(name, f"must be {'one number or ' if t != 'vec3' else ''}a list of 3 numbers, "
                            f"got {len(value)} values")
            value = tuple(_number(v, name, integer) for v in value)
        elif t == "vec3":
            _fail(name, f"must be a list of 3 numbers, got {value!r} ({_type_name(value)})")
        else:
            value = (_number(value, name, integer),) * 3
    elif t in ("floats", "float|floats"):
        if isinstance(value, list):
            if not value:
                _fail(name, "must not be empty")
            value = tuple(_number(v, name, False) for v in value)
        elif t == "floats":
            _fail(name, f"must be a list of numbers, got {value!r} ({_type_name(value)})")
        else:
            value = _number(value, name, False)
    elif t == "path":
        if not isinstance(value, str) or not value:
            _fail(name, f"must be a file name, got {value!r} ({_type_name(value)})")
        value = str((base_dir / os.path.expanduser(value)).resolve())
    elif t == "paths":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            _fail(name, f"must be a list of file names, got {value!r}")
        value = tuple(str((base_dir / os.path.expanduser(v)).resolve()) for v in value)
    elif t == "strs":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            _fail(name, f"must be a list of strings, got {value!r}")
        value = tuple(value)
    elif t == "table":
        if not isinstance(value, Mapping):
            _fail(name, f"must be a table such as {{dist = \"normal\", loc = 0.8, scale = 0.1}}, "
                        f"got {value!r} ({_type_name(value)})")
        value = dict(value)
    else:  # pragma: no cover - a schema bug
        raise TypeError(f"unknown key type {t!r} for {name}")
    if k.choices and value not in k.choices:
        _fail(name, f"must be one of {', '.join(map(repr, k.choices))}, got {value!r}")
    if k.check is not None:
        problem = k.check(value)
        if problem:
            _fail(name, f"{problem}, got {_show(value)}")
    return value


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if not close:  # also catch case slips like omega_c -> Omega_c
        close = [o for o in options if o.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _positive(v):
    return None if (min(v) if isinstance(v, tuple) else v) > 0 else "must be > 0"


def _at_least(n):
    return lambda v: None if (min(v) if isinstance(v, tuple) else v) >= n else f"must be >= {n}"


# Hard limits on the counts that size a run's memory, disk or time, so that a typo (an extra
# three zeros) is refused at once instead of filling the disk or running for days. Each is far
# beyond what the method needs (README, "Bad input"); the command-line options use the same ones.
MAX_STEPS = 10_000                # PM time steps (simulators.config.MAX_STEPS is the same limit)
MAX_SIMS = 100_000_000            # simulations in one training set
MAX_SAMPLES = 10_000_000          # posterior samples of one method (per chain for MCMC)
MAX_WARMUP = 1_000_000            # MCMC warm-up iterations per chain
MAX_CHAINS = 1024                 # MCMC chains
MAX_NOISE_COPIES = 1000           # shape-noise copies per training simulation
MAX_CALIBRATION_SAMPLES = 100_000  # posterior samples per held-out simulation (SBC/TARP)
MAX_EPOCHS = 1_000_000            # training epochs


def _count(low, high):
    """An integer count in [low, high]: ``high`` is one of the limits above."""
    def check(v):
        if v < low:
            return f"must be >= {low}"
        if v > high:
            return f"must be <= {high} (lensbench's limit for this count)"
        return None
    return check


def _keys(cls) -> dict[str, Key]:
    return {f.name: f.metadata["key"] for f in fields(cls) if "key" in f.metadata}


def _parse_section(cls, table: Mapping, prefix: str, base_dir: Path):
    """Build a section dataclass from a TOML table: unknown keys, types, values, then ``_check``."""
    valid = _keys(cls)
    values = {}
    for name, value in table.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in valid:
            _fail(dotted, f"unknown key{_suggest(name, valid)}; valid keys: {', '.join(valid)}")
        values[name] = _coerce(valid[name], value, dotted, base_dir)
    obj = cls(**values)
    check = getattr(obj, "_check", None)
    return check(set(values)) if check is not None else obj


def _wrap(section: str, names, fn):
    """Run a simulator constructor; re-raise its ValueError naming the section's key it is about."""
    try:
        return fn()
    except ConfigError:
        raise
    except ValueError as e:
        message = str(e)
        hits = sorted((m.start(), n) for n in names
                      for m in [re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message)] if m)
        if not hits:
            _fail(section, message)
        name = hits[0][1]
        if message.startswith(name + " "):
            message = message[len(name) + 1:]
        _fail(f"{section}.{name}", message)


# ---- sections ---------------------------------------------------------------------------------

PDIMS_RE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


@dataclass(frozen=True)
class CosmologySection:
    Omega_c: float = key("float", 0.2664, "cold dark matter density today")
    Omega_b: float = key("float", 0.0492, "baryon density today")
    h: float = key("float", 0.6727, "H0 / (100 km/s/Mpc)")
    n_s: float = key("float", 0.9645, "scalar spectral index")
    sigma8: float = key("float", 0.831, "rms linear density in 8 Mpc/h spheres at z = 0")
    w0: float = key("float", -1.0, "dark-energy equation of state today")
    wa: float = key("float", 0.0, "CPL evolution of w")

    def _check(self, given):
        _wrap("cosmology", _keys(type(self)), self.build)
        return self

    def build(self):
        """The ``simulators.Cosmology``; also ``cfg.cosmology()`` (the section is callable)."""
        from simulators import Cosmology

        return Cosmology(**dataclasses.asdict(self))

    __call__ = build


@dataclass(frozen=True)
class SimulationSection:
    kind: str = key("str", "pm", "map model", choices=("pm", "lpt", "gaussian", "lognormal"))
    mesh_shape: tuple = key("int3", (32, 32, 64), "force-mesh cells", check=_at_least(2))
    box_size: tuple = key("float3", (200.0, 200.0, 1000.0), "box sides, Mpc/h", check=_positive)
    mesh_factor: int = key("int", 1, "force-mesh cells per particle spacing", check=_at_least(1))
    a_init: float = key("float", 0.2, "initial scale factor",
                        check=lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    n_steps: int = key("int", 10, "time steps", check=_count(1, MAX_STEPS))
    lpt_order: int = key("int", 2, "LPT order", choices=(1, 2))
    deconvolve: bool = key("bool", False, "CIC-compensated force (needs mesh_factor = 1)")
    dtype: str = key("str", "float32", "field dtype", choices=("float32", "float64"))
    gradient: str = key("str", "checkpoint", "gradient mode", choices=("checkpoint", "adjoint"))
    pdims: str = key("str", "1x1", "device grid PXxPY",
                     check=lambda v: None if min(_pdims(v)) >= 1
                     else "must look like '2x2' (positive device counts along x and y)")
    halo: int = key("int", 8, "halo width, mesh cells", check=_at_least(2))
    n_chi: int = key("int", 256, "Limber chi nodes of the gaussian/lognormal models",
                     check=_at_least(16))

    def _check(self, given):
        obj = replace(self, pdims="x".join(map(str, _pdims(self.pdims))))
        _wrap("simulation", _keys(type(self)), lambda: obj.sim_config(sharded=False))
        px, py = obj.pdim_tuple
        particles = tuple(n // obj.mesh_factor for n in obj.mesh_shape)
        for what, shape in (("mesh_shape", obj.mesh_shape), ("particle grid", particles)):
            for axis, n, p in (("x", shape[0], px), ("y", shape[1], py)):
                if n % p:
                    _fail("simulation.pdims", f"{what} {list(shape)} is not divisible by the device "
                                              f"grid {obj.pdims} along {axis} ({n} % {p} != 0)")
        return obj

    @property
    def pdim_tuple(self) -> tuple[int, int]:
        return _pdims(self.pdims)

    def sim_config(self, sharded: bool = True):
        """The ``SimConfig``; with sharded=False on a 1x1 grid (never touches the JAX devices)."""
        from simulators import DeviceGrid, SimConfig

        grid = DeviceGrid(self.pdim_tuple if sharded else (1, 1), halo=self.halo)
        return SimConfig(mesh_shape=self.mesh_shape, box_size=self.box_size,
                         mesh_factor=self.mesh_factor, a_init=self.a_init, a_final=1.0,
                         n_steps=self.n_steps, lpt_order=self.lpt_order,
                         deconvolve=self.deconvolve, gradient=self.gradient,
                         dtype=self.dtype, grid=grid)


def parse_pdims(text: str) -> tuple[int, int]:
    """The device grid ``"2x2"`` (or ``"2×2"``) -> (2, 2): the one parser of the ``PXxPY`` text of
    ``--pdims`` and ``simulation.pdims`` (JAX-free, so the command line can read it before JAX
    starts). OptionError (a ValueError) unless both counts are positive integers."""
    m = PDIMS_RE.match(text) if isinstance(text, str) else None
    if m is None or min(int(m.group(1)), int(m.group(2))) < 1:
        raise OptionError(f"device grid must look like 2x2 (positive device counts along x and "
                          f"y), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _pdims(text: str) -> tuple[int, int]:
    """``parse_pdims``, or (0, 0) for text that is not a device grid (checked where it matters)."""
    try:
        return parse_pdims(text)
    except ValueError:
        return (0, 0)


@dataclass(frozen=True)
class LightconeSection:
    observer: tuple | None = key("vec3", None, "observer position, Mpc/h")
    chi_max: float | None = key("float", None, "lightcone depth, Mpc/h", check=_positive)
    randomize: bool = key("bool", False, "randomly shift and rotate the replicas")
    seed: int = key("int", 0, "seed of the replica transforms", check=_at_least(0))
    window_margin: float = key("float", 1.25, "radial window per step / fiducial thickest step",
                               check=lambda v: None if v >= 1 else "must be >= 1")


@dataclass(frozen=True)
class MapsSection:
    sky: str = key("str", "flat", "sky geometry", choices=("flat", "healpix"))
    field_deg: float | None = key("float", None, "flat: field side, degrees", check=_positive)
    npix: int | None = key("int", None, "flat: pixels per side", check=_at_least(2))
    nside: int | None = key("int", None, "healpix: nside",
                            check=lambda v: None if v >= 1 and not v & (v - 1)
                            else "must be a power of 2")
    disc: tuple | None = key("vec3", None, "healpix: partial sky (lon, lat, radius), degrees")

    FLAT_DEFAULTS = dict(field_deg=5.0, npix=64)
    HEALPIX_DEFAULTS = dict(nside=64, disc=None)

    def _check(self, given):
        own, other = ((self.FLAT_DEFAULTS, self.HEALPIX_DEFAULTS) if self.sky == "flat"
                      else (self.HEALPIX_DEFAULTS, self.FLAT_DEFAULTS))
        for name in other:
            if name in given:
                _fail(f"maps.{name}", f"only applies to sky = "
                                      f"{'healpix' if self.sky == 'flat' else 'flat'!r}, "
                                      f"but sky = {self.sky!r}")
        obj = replace(self, **{k: v for k, v in own.items() if k not in given})
        _wrap("maps", _keys(type(self)), obj.build)
        return obj

    def build(self):
        from simulators.lightcone import FlatSky, HealpixSky

        if self.sky == "flat":
            return FlatSky(self.field_deg, self.npix)
        return HealpixSky(self.nside, disc=self.disc)

    @property
    def pixel_area(self) -> float:
        """Pixel solid angle in steradians."""
        if self.sky == "flat":
            return (math.radians(self.field_deg) / self.npix) ** 2
        return 4 * math.pi / (12 * self.nside**2)


@dataclass(frozen=True)
class SourcesSection:
    preset: str | None = key("str", None, "n(z) preset", choices=("lsst_y10",))
    n_bins: int | None = key("int", None, "preset: number of bins", check=_at_least(1))
    n_gal_total: float | None = key(
        "float", None, "preset: galaxies per arcmin^2",
        check=lambda v: None if v > 0 else "must be > 0 (bins with no galaxies)")
    sigma_z0: float | None = key("float", None, "preset: photo-z scatter / (1 + z)", check=_positive)
    nz_files: tuple | None = key("paths", None, "n(z) files, one per bin")
    n_gal_per_bin: Any = key("float|floats", None, "nz_files: galaxies per arcmin^2 per bin")
    sigma_e: float = key("float", 0.26, "shape noise per component", check=_positive)

    PRESET_DEFAULTS = dict(preset="lsst_y10", n_bins=5, n_gal_total=27.0, sigma_z0=0.05)
    PRESET_KEYS = ("preset", "n_bins", "n_gal_total", "sigma_z0")

    def _check(self, given):
        if self.nz_files is None:
            if "n_gal_per_bin" in given:
                _fail("sources.n_gal_per_bin", "only applies with nz_files; the preset splits "
                                               "n_gal_total equally over its bins")
            return replace(self, **{k: v for k, v in self.PRESET_DEFAULTS.items() if k not in given})
        for name in self.PRESET_KEYS:
            if name in given:
                _fail(f"sources.{name}", "only applies to the preset; with nz_files the bins "
                                         "are the files (give either preset or nz_files)")
        if self.n_gal_per_bin is None:
            _fail("sources.n_gal_per_bin", "required with nz_files (galaxies per arcmin^2, one "
                                           "number or one per file)")
        n = len(self.nz_files)
        per_bin = self.n_gal_per_bin
        if isinstance(per_bin, tuple) and len(per_bin) != n:
            _fail("sources.n_gal_per_bin", f"needs one number or {n} (one per n(z) file), "
                                           f"got {len(per_bin)}")
        for i, v in enumerate(per_bin if isinstance(per_bin, tuple) else (per_bin,) * n):
            if not v > 0:
                _fail("sources.n_gal_per_bin", f"bin {i} has no galaxies (n_gal must be > 0), "
                                               f"got {_show(per_bin)}")
        from simulators.sources import RedshiftBins

        for i, path in enumerate(self.nz_files):
            if not os.path.isfile(path):
                _fail(f"sources.nz_files[{i}]", f"n(z) file not found: {path}")
            try:  # each file on its own, so that the error names its index
                RedshiftBins.from_files([path], 1.0, self.sigma_e)
            except (OSError, ValueError) as e:
                _fail(f"sources.nz_files[{i}]", str(e))
        _wrap("sources", _keys(type(self)), self.build)
        return self

    def build(self):
        """The ``RedshiftBins`` (the preset evaluates n(z) with JAX: starts its backend)."""
        from simulators.sources import RedshiftBins

        if self.nz_files is not None:
            return RedshiftBins.from_files(list(self.nz_files), self.n_gal_per_bin, self.sigma_e)
        return RedshiftBins.lsst_y10(n_bins=self.n_bins, sigma_z0=self.sigma_z0,
                                     n_gal_total=self.n_gal_total, sigma_e=self.sigma_e)

    @property
    def n_bins_total(self) -> int:
        return len(self.nz_files) if self.nz_files is not None else self.n_bins


@dataclass(frozen=True)
class ClSection:
    ell_edges: tuple | None = key("floats", None, "explicit bin edges")
    ell_min: float | None = key("float", None, "lowest edge", check=_positive)
    ell_max: float | None = key("float", None, "highest edge", check=_positive)
    n_ell_bins: int | None = key("int", None, "number of bins", check=_at_least(1))
    spacing: str | None = key("str", None, "bin spacing", choices=("log", "linear"))

    DEFAULTS = dict(n_ell_bins=12, spacing="log")

    def _check(self, given):
        if self.ell_edges is None:
            if self.ell_min is not None and self.ell_max is not None and self.ell_max <= self.ell_min:
                _fail("cl.ell_max", f"must be > ell_min = {self.ell_min:g}, got {self.ell_max:g}")
            return replace(self, **{k: v for k, v in self.DEFAULTS.items() if k not in given})
        clash = sorted(given & {"ell_min", "ell_max", "n_ell_bins", "spacing"})
        if clash:
            _fail(f"cl.{clash[0]}", "give either ell_edges or ell_min/ell_max/n_ell_bins/spacing, "
                                    "not both")
        e = self.ell_edges
        if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:])) or e[0] < 0:
            _fail("cl.ell_edges", f"must be >= 2 increasing values >= 0, got {_show(e)}")
        return self

    def edges(self, maps: MapsSection):
        """(n + 1,) float64 bin edges; the unset ones follow the map geometry (module docstring)."""
        import numpy as np

        if self.ell_edges is not None:
            edges = np.asarray(self.ell_edges, np.float64)
            if maps.sky == "healpix" and edges[-1] > 3 * maps.nside:
                _fail("cl.ell_edges", f"must end at <= 3 nside = {3 * maps.nside} (the highest "
                                      f"multipole of the maps, plus 1), got {edges[-1]:g}")
            return edges
        if maps.sky == "flat":
            field = math.radians(maps.field_deg)
            lo_auto, hi_auto = 2 * math.pi / field * (1 - 1e-9), math.pi * maps.npix / field
        else:
            lo_auto, hi_auto = 2.0, 2.0 * maps.nside
        lo = self.ell_min if self.ell_min is not None else lo_auto
        hi = self.ell_max if self.ell_max is not None else hi_auto
        if hi <= lo:
            _fail("cl.ell_max" if self.ell_max is not None else "cl.ell_min",
                  f"the ell range [{lo:g}, {hi:g}] is empty for this map geometry")
        if maps.sky == "healpix" and hi > 3 * maps.nside:
            _fail("cl.ell_max", f"must be <= 3 nside = {3 * maps.nside} (the highest multipole of "
                                f"the maps, plus 1), got {hi:g}")
        if self.spacing == "log":
            return np.geomspace(lo, hi, self.n_ell_bins + 1)
        return np.linspace(lo, hi, self.n_ell_bins + 1)


def _param_prior(name: str):
    """Check of one [prior] parameter table (messages name the key)."""
    def check(table):
        from .priors import ParamPrior, PriorError

        try:
            ParamPrior.from_table(name, table).check_physical()
        except PriorError as e:
            return str(e).removeprefix(f"{name}: ")
        return None
    return check


@dataclass(frozen=True)
class PriorSection:
    """Which cosmological parameters are inferred, and their priors (experiments.priors)."""

    preset: str | None = key("str", "lsst_y10", "built-in prior", choices=("lsst_y10", "none"))
    params: tuple | None = key("strs", None, "inferred parameters, in order")
    Omega_c: dict | None = key("table", None, "prior of Omega_c", check=_param_prior("Omega_c"))
    Omega_b: dict | None = key("table", None, "prior of Omega_b", check=_param_prior("Omega_b"))
    h: dict | None = key("table", None, "prior of h", check=_param_prior("h"))
    n_s: dict | None = key("table", None, "prior of n_s", check=_param_prior("n_s"))
    sigma8: dict | None = key("table", None, "prior of sigma8", check=_param_prior("sigma8"))
    w0: dict | None = key("table", None, "prior of w0", check=_param_prior("w0"))
    wa: dict | None = key("table", None, "prior of wa", check=_param_prior("wa"))

    def _check(self, given):
        self.build()  # every rule is checked by building it
        return self

    def build(self):
        """The ``experiments.priors.Prior`` this section declares."""
        from .priors import COSMOLOGY_PARAMS, PRESETS, ParamPrior, Prior, PriorError

        preset = {} if self.preset == "none" else \
            {p.name: p for p in PRESETS[self.preset]().params}
        declared = {n: getattr(self, n) for n in COSMOLOGY_PARAMS if getattr(self, n) is not None}
        names = self.params if self.params is not None else \
            tuple(preset) + tuple(n for n in declared if n not in preset)
        if not names:
            _fail("prior", "no parameters: give a preset or declare at least one parameter")
        params = []
        for n in names:
            if n not in COSMOLOGY_PARAMS:
                _fail("prior.params", f"unknown parameter {n!r}{_suggest(n, COSMOLOGY_PARAMS)}; "
                                      f"valid: {', '.join(COSMOLOGY_PARAMS)}")
            if n in declared:
                params.append(ParamPrior.from_table(n, declared[n]).check_physical())
            elif n in preset:
                params.append(preset[n].check_physical())
            else:
                _fail("prior.params", f"{n!r} has no prior: declare prior.{n} = {{dist = ...}} "
                                      f"(preset {self.preset!r} does not have it)")
        unused = [n for n in declared if n not in names]
        if unused:
            _fail(f"prior.{unused[0]}", f"declared but not in prior.params ({', '.join(names)})")
        try:
            return Prior(tuple(params))
        except PriorError as e:
            _fail("prior.params", str(e))

    __call__ = build  # cfg.prior() builds it, like cfg.cosmology()


@dataclass(frozen=True)
class TrainingSetSection:
    """The simulated (θ, κ) training set of the implicit pipeline (``lensbench generate``)."""

    n_sims: int = key("int", 1000, "simulations", check=_count(1, MAX_SIMS))
    batch_size: int | None = key("int", None, "simulations per batch", check=_at_least(1))
    seed: int = key("int", 1, "seed of θ and the latent fields", check=_at_least(0))
    n_calibration: int = key("int", 100, "last simulations held out for calibration",
                             check=_at_least(0))

    def _check(self, given):
        if self.n_calibration >= self.n_sims:
            _fail("training_set.n_calibration", f"must be < n_sims = {self.n_sims}, got "
                                                f"{self.n_calibration}")
        return self


@dataclass(frozen=True)
class CompressorSection:
    """Neural compressor training (``compressors.TrainConfig``; ``lensbench train-compressor``)."""

    loss: str = key("str", "vmim", "loss", choices=("mse", "mae", "gnll", "vmim"))
    network: str = key("str", "resnet", "architecture", choices=("resnet", "cnn"))
    width: int = key("int", 16, "channels of the first stage", check=_at_least(1))
    depth: int = key("int", 3, "stages", check=_at_least(1))
    epochs: int = key("int", 30, "maximum epochs", check=_count(2, MAX_EPOCHS))
    batch_size: int = key("int", 32, "maps per step", check=_at_least(1))
    learning_rate: float = key("float", 1e-3, "peak learning rate", check=_positive)
    patience: int = key("int", 8, "early-stopping patience in epochs", check=_at_least(1))
    val_fraction: float = key("float", 0.1, "validation fraction",
                              check=lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    seed: int = key("int", 0, "seed", check=_at_least(0))

    def train_config(self, loss: str | None = None):
        from compressors import TrainConfig

        values = {k: getattr(self, k) for k in _keys(type(self))}
        values["loss"] = loss or self.loss
        return _wrap("compressor", _keys(type(self)), lambda: TrainConfig(**values))


@dataclass(frozen=True)
class NpeSection:
    """Neural posterior estimation with sbi (``lensbench fit-posterior``)."""

    density: str = key("str", "nsf", "sbi density estimator", choices=("nsf", "maf"))
    max_epochs: int = key("int", 300, "maximum training epochs", check=_count(1, MAX_EPOCHS))
    batch_size: int = key("int", 128, "training batch size", check=_at_least(1))
    noise_copies: int = key("int", 4, "noise realisations per simulation",
                            check=_count(1, MAX_NOISE_COPIES))
    n_samples: int = key("int", 20000, "posterior samples drawn by `sample`",
                         check=_count(1, MAX_SAMPLES))
    calibration_samples: int = key("int", 500, "posterior samples per held-out simulation",
                                   check=_count(10, MAX_CALIBRATION_SAMPLES))
    seed: int = key("int", 0, "seed", check=_at_least(0))


@dataclass(frozen=True)
class ClBaselineSection:
    """The power-spectrum baseline (``lensbench cl-baseline``)."""

    covariance: str = key("str", "simulated", "covariance", choices=("simulated", "gaussian"))
    n_cov: int = key("int", 200, "fiducial simulations for the covariance",
                     check=_count(3, MAX_SIMS))
    likelihood: str = key("str", "gaussian", "likelihood",
                          choices=("gaussian", "sellentin_heavens"))
    num_warmup: int = key("int", 500, "NUTS warm-up steps", check=_count(1, MAX_WARMUP))
    num_samples: int = key("int", 2000, "NUTS samples per chain", check=_count(1, MAX_SAMPLES))
    num_chains: int = key("int", 2, "NUTS chains", check=_count(1, MAX_CHAINS))
    n_chi: int = key("int", 64, "Limber quadrature nodes", check=_at_least(16))
    seed: int = key("int", 10000, "first seed of the covariance simulations, and of NUTS",
                    check=_at_least(0))

    def _check(self, given):
        if self.covariance == "gaussian" and self.likelihood == "sellentin_heavens":
            _fail("cl_baseline.likelihood", "'sellentin_heavens' marginalises a simulated "
                                            "covariance's noise: it needs covariance = 'simulated'")
        return self


COMPARE_METHODS = ("cl_analytic", "npe_cl", "npe_mse", "npe_mae", "npe_gnll", "npe_vmim",
                   "npe_maps", "hmc", "exact")


@dataclass(frozen=True)
class HmcSection:
    """Explicit full-field inference (``lensbench hmc``; ``explicit.HMCSettings``)."""

    sampler: str = key("str", "nuts", "sampler", choices=("nuts", "mclmc", "mams"))
    num_warmup: int = key("int", 200, "warm-up steps", check=_count(1, MAX_WARMUP))
    num_samples: int = key("int", 200, "samples per chain", check=_count(1, MAX_SAMPLES))
    num_chains: int = key("int", 1, "chains", check=_count(1, MAX_CHAINS))
    max_tree_depth: int = key("int", 6, "NUTS tree depth", check=_at_least(1))
    target_accept: float = key("float", 0.8, "NUTS / MAMS target acceptance",
                               check=lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    precondition: str = key("str", "none", "field preconditioner", choices=("none", "fourier"))
    segment: int = key("int", 25, "iterations per checkpoint", check=_at_least(1))
    thin_field: int = key("int", 50, "keep the field every N samples (0: never)",
                          check=_at_least(0))
    gradient: str = key("str", "adjoint", "PM gradient mode", choices=("adjoint", "checkpoint"))
    seed: int = key("int", 2, "seed of the chains", check=_at_least(0))
    processes: int = key("int", 1, "processes running chains at once", check=_at_least(1))
    start_steps: int = key("int", 100, "Adam steps of the start field", check=_at_least(0))

    # not explicit.HMCSettings fields: the PM gradient mode (set on the simulation), how many
    # processes run the chains, and how the start field is found (explicit.field_start)
    NOT_SAMPLER_KEYS = ("gradient", "processes", "start_steps")

    def settings(self):
        """The ``explicit.HMCSettings``."""
        from explicit import HMCSettings

        values = {k: getattr(self, k) for k in _keys(type(self)) if k not in self.NOT_SAMPLER_KEYS}
        return _wrap("hmc", _keys(type(self)), lambda: HMCSettings(**values))


# Vehtari et al. 2021 (Bayesian Analysis 16, 667): report MCMC summaries when split R̂ < 1.01 and
# the ESS > 400. Below that the moments, and more so the FoM (a determinant of the covariance)
# and C2ST, carry Monte Carlo errors or a bias the tables do not show. The defaults of
# [compare] ess_min / r_hat_max, and of experiments.metrics.compare_metrics.
ESS_MIN, R_HAT_MAX = 400, 1.01


@dataclass(frozen=True)
class CompareSection:
    """``lensbench compare``: which methods run, on which observation, what counts as converged."""

    methods: tuple = key("strs", ("cl_analytic", "npe_cl", "npe_vmim", "hmc"), "methods")
    observation: str | None = key("path", None, "observed map file")
    c2st_samples: int = key("int", 2000, "samples per method in a C2ST",
                              check=_count(10, MAX_SAMPLES))
    seed: int = key("int", 0, "seed of the C2ST", check=_at_least(0))
    ess_min: int = key("int", ESS_MIN, "least ESS per parameter of a converged method",
                       check=_at_least(1))
    r_hat_max: float = key("float", R_HAT_MAX, "largest split R-hat of a converged method",
                           check=lambda v: None if v > 1 else "must be > 1")

    def _check(self, given):
        if not self.methods:
            _fail("compare.methods", "must name at least one method")
        for m in self.methods:
            if m not in COMPARE_METHODS:
                _fail("compare.methods", f"unknown method {m!r}{_suggest(m, COMPARE_METHODS)}; "
                                         f"valid: {', '.join(COMPARE_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            _fail("compare.methods", f"lists a method twice: {_show(list(self.methods))}")
        return self


# Section name -> dataclass, in file order. Add later sections ([prior], [npe], ...) here and as a
# field of ExperimentConfig.
SECTIONS: dict[str, type] = {
    "cosmology": CosmologySection,
    "simulation": SimulationSection,
    "lightcone": LightconeSection,
    "maps": MapsSection,
    "sources": SourcesSection,
    "cl": ClSection,
    "prior": PriorSection,
    "training_set": TrainingSetSection,
    "compressor": CompressorSection,
    "npe": NpeSection,
    "cl_baseline": ClBaselineSection,
    "hmc": HmcSection,
    "compare": CompareSection,
}
TOP_LEVEL = ("name", "seed")


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment configuration (frozen; equal configs compare equal).

    Each TOML section is an attribute of the same name (``cfg.maps.npix``). ``cfg.cosmology()``
    (the section is callable), ``cfg.bins()``, ``cfg.sky()`` and ``cfg.build_model()`` build the
    simulator objects.
    """

    name: str = "experiment"
    seed: int = 0
    cosmology: CosmologySection = field(default_factory=lambda: _default_section('cosmology'))
    simulation: SimulationSection = field(default_factory=lambda: _default_section('simulation'))
    lightcone: LightconeSection = field(default_factory=lambda: _default_section('lightcone'))
    maps: MapsSection = field(default_factory=lambda: _default_section('maps'))
    sources: SourcesSection = field(default_factory=lambda: _default_section('sources'))
    cl: ClSection = field(default_factory=lambda: _default_section('cl'))
    prior: PriorSection = field(default_factory=lambda: _default_section('prior'))
    training_set: TrainingSetSection = field(default_factory=lambda: _default_section('training_set'))
    compressor: CompressorSection = field(default_factory=lambda: _default_section('compressor'))
    npe: NpeSection = field(default_factory=lambda: _default_section('npe'))
    cl_baseline: ClBaselineSection = field(default_factory=lambda: _default_section('cl_baseline'))
    hmc: HmcSection = field(default_factory=lambda: _default_section('hmc'))
    compare: CompareSection = field(default_factory=lambda: _default_section('compare'))
    path: str | None = field(default=None, compare=False)  # the file it came from, if any

    # ---- builders (these import JAX; bins() and chi_max() may start its backend) -------------
    def cosmology_params(self) -> dict:
        return dataclasses.asdict(self.cosmology)

    def bins(self):
        """The tomographic ``RedshiftBins`` of [sources] (cached)."""
        return self._bins

    @cached_property
    def _bins(self):
        return _wrap("sources", _keys(SourcesSection), self.sources.build)

    def sky(self):
        """``FlatSky`` or ``HealpixSky`` of [maps]."""
        return self.maps.build()

    def chi_max(self) -> float:
        """Lightcone depth in Mpc/h: lightcone.chi_max, or the fiducial comoving distance of the
        farthest source redshift capped at chi(a_init)."""
        if self.lightcone.chi_max is not None:
            return self.lightcone.chi_max
        import numpy as np

        from simulators import Cosmology
        from simulators.cosmology import comoving_distance_jit

        z_max = float(self.bins().z[-1])
        # both distances from one table in one compiled program (kept by JAX's persistent cache)
        chi = np.asarray(comoving_distance_jit(
            Cosmology.fiducial(), np.array([1.0 / (1.0 + z_max), self.simulation.a_init])))
        return float(min(chi[0], chi[1]))

    def ell_edges(self):
        return self.cl.edges(self.maps)

    def build_model(self):
        """The map model (``PMLensing``, ``LPTLensing``, ``GaussianLensing`` or ``LognormalLensing``).

        A sharded ``simulation.pdims`` needs that many JAX devices (the CLI creates them on CPU).
        """
        from simulators import lensing
        from simulators.lightcone import Lightcone

        sky, bins, kind = self.sky(), self.bins(), self.simulation.kind
        n_chi = self.simulation.n_chi
        if kind == "gaussian":
            return _wrap("maps", _keys(MapsSection), lambda: lensing.GaussianLensing(sky, bins, n_chi))
        if kind == "lognormal":
            return _wrap("maps", _keys(MapsSection),
                         lambda: lensing.LognormalLensing(sky, bins, n_chi))
        cfg = _wrap("simulation", _keys(SimulationSection), self.simulation.sim_config)
        lc = self.lightcone
        cone = _wrap("lightcone", _keys(LightconeSection), lambda: Lightcone(
            sky, self.chi_max(), observer=lc.observer, randomize=lc.randomize, seed=lc.seed,
            window_margin=lc.window_margin))
        cls = lensing.PMLensing if kind == "pm" else lensing.LPTLensing
        return _wrap("lightcone", _keys(LightconeSection), lambda: cls(cfg, cone, bins))

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The configuration as a TOML-ready dict (normalised; unset keys left out)."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {k: _plain(getattr(section, k)) for k in _keys(type(section))
                         if getattr(section, k) is not None}
        return out

    def to_toml(self) -> str:
        """TOML text that ``load_config`` reads back into an equal configuration."""
        return dumps_toml(self.to_dict())

    def with_(self, **changes) -> "ExperimentConfig":
        """A re-validated copy with dotted keys changed: ``cfg.with_(seed=1, **{"simulation.pdims": "2x2"})``;
        a value None removes the key (it takes its default)."""
        data = self.to_dict()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            if value is None:
                node.pop(leaf, None)
            else:
                node[leaf] = value
        return load_config(data, name=self.name, path=self.path)

    def __post_init__(self):
        # cross-section rules (the sections are valid on their own by now)
        kind = self.simulation.kind
        if kind in ("gaussian", "lognormal") and self.maps.sky != "flat":
            _fail("simulation.kind", f"'{kind}' maps need maps.sky = 'flat'")
        if self.lightcone.observer is not None and kind not in ("gaussian", "lognormal"):
            box = self.simulation.box_size
            if any(not 0 <= o <= b for o, b in zip(self.lightcone.observer, box)):
                _fail("lightcone.observer", f"{_show(self.lightcone.observer)} lies outside the "
                                            f"box [0, {_show(box)}] Mpc/h")
        self.cl.edges(self.maps)  # an ell range that is empty for this map geometry
        if "exact" in self.compare.methods and kind != "gaussian":
            _fail("compare.methods", f"'exact' needs Gaussian-field maps (simulation.kind = "
                                     f"'gaussian'), not '{kind}'")


def _default_section(name: str):
    return _parse_section(SECTIONS[name], {}, name, Path.cwd())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---- loading ----------------------------------------------------------------------------------

def shipped_configs() -> dict[str, Path]:
    """Name -> path of the configurations shipped in ``experiments/configs``."""
    root = resources.files("experiments") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def resolve_config_path(name_or_path) -> Path:
    """A path that exists as given, or the shipped config of that name (``quick``, ``quick.toml``)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name[:-5] if path.name.endswith(".toml") else path.name
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    if path.exists():
        raise ConfigError(f"config {path}: is not a file")
    raise ConfigError(f"config {name_or_path}: no such file, and not a shipped config "
                      f"({', '.join(sorted(shipped))}){_suggest(stem, shipped)}")


def parse_overrides(items) -> dict[str, Any]:
    """``["hmc.num_samples=2000", "compare.methods=['hmc']"]`` -> ``{"hmc.num_samples": 2000, ...}``
    for ``ExperimentConfig.with_``: each value is a TOML literal, a bare word a string.
    Raises ConfigError on an item without ``KEY=``."""
    out = {}
    for item in items:
        k, sep, value = item.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. hmc.num_samples=2000")
        try:
            out[k.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = value
    return out


def peek_pdims(source) -> tuple[int, int]:
    """The device grid of a config file without validating it or importing JAX; (1, 1) when it
    cannot tell (``load_config`` reports any problem)."""
    try:
        data = tomllib.loads(resolve_config_path(source).read_text(encoding="utf-8"))
        px, py = _pdims(data["simulation"]["pdims"])
        return (px, py) if px >= 1 and py >= 1 else (1, 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return (1, 1)


def load_config_text(text: str, *, name: str | None = None, where: str = "<config text>",
                     base_dir: str | os.PathLike | None = None) -> ExperimentConfig:
    """``load_config`` of TOML text (e.g. the ``config_toml`` attribute of a map file)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    return load_config(data, name=name, path=where, base_dir=base_dir)


def load_config(source, *, name: str | None = None, path: str | os.PathLike | None = None,
                base_dir: str | os.PathLike | None = None) -> ExperimentConfig:
    """Read and validate a configuration.

    Args:
      source: a TOML file path, the name of a shipped config (``"quick"``), or a dict with the
        TOML layout (sections as nested dicts).
      name: default for the top-level ``name`` (otherwise the file stem, or "experiment").
      path: the file a dict came from (kept as ``ExperimentConfig.path``, for messages).
      base_dir: directory that relative n(z) file names are relative to (default: the config
        file's directory, or the current directory for a dict).
    Raises:
      ConfigError (a ValueError) naming the key; OSError if the file cannot be read.
    """
    if isinstance(source, Mapping):
        data, where = source, (str(path) if path is not None else None)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        file = resolve_config_path(source)
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not UTF-8 text ({e})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{file}: invalid TOML: {e}") from None
        where, name = str(file), name or file.stem
        base = Path(base_dir) if base_dir is not None else file.resolve().parent
    try:
        return _build(data, name or "experiment", where, base)
    except ConfigError as e:
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}") from None


def _build(data: Mapping, default_name: str, where: str | None, base: Path) -> ExperimentConfig:
    top = {}
    sections = {}
    for k, v in data.items():
        if k in SECTIONS:
            if not isinstance(v, Mapping):
                _fail(k, f"must be a table [{k}], got {v!r} ({_type_name(v)})")
            sections[k] = _parse_section(SECTIONS[k], v, k, base)
        elif k in TOP_LEVEL:
            top[k] = v
        elif isinstance(v, Mapping):
            _fail(f"[{k}]", f"unknown section{_suggest(k, SECTIONS)}; valid sections: "
                            f"{', '.join(SECTIONS)}")
        else:
            _fail(k, f"unknown key{_suggest(k, [*TOP_LEVEL, *SECTIONS])}; valid top-level keys: "
                     f"{', '.join(TOP_LEVEL)} (and the sections {', '.join(SECTIONS)})")
    name = top.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        _fail("name", f"must be a non-empty string, got {name!r}")
    seed = _number(top.get("seed", 0), "seed", integer=True)
    if not 0 <= seed < 2**63:
        _fail("seed", f"must be in [0, 2^63), got {seed}")
    for k, cls in SECTIONS.items():
        if k not in sections:
            sections[k] = _parse_section(cls, {}, k, base)
    return ExperimentConfig(name=name, seed=seed, path=where, **sections)


# ---- TOML output (tomllib reads only) ---------------------------------------------------------

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ("" if value > 0 or math.isnan(value) else "-") + ("nan" if math.isnan(value) else "inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # inline table
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def dumps_toml(data: Mapping) -> str:
    """TOML text of a dict of scalars, lists and one level of tables."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    # one level of [tables]; deeper mappings are written as inline tables
    for k, table in data.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_toml_key(k)}]"]
            lines += [f"{_toml_key(kk)} = {_toml_value(v)}" for kk, v in table.items()]
    return "\n".join(lines) + "\n"
