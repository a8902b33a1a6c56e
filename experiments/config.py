"""Experiment configuration: one TOML file per experiment, one model, one error style.

    from experiments.config import load_config
    cfg = load_config("quick")                  # a shipped config (experiments/configs/quick.toml)
    cfg = load_config("my_run.toml")            # or any path, or a dict with the same layout
    model, cosmo = cfg.build_model(), cfg.cosmology()

The schema is the pydantic models below (``ExperimentConfig`` and one section model per TOML
table); ``docs/configuration.md`` lists every key with its default and units, generated from them
(``python -m experiments.configdoc > docs/configuration.md``). The same listing, as plain text,
ends this docstring.

Every error is a ``ConfigError`` (a ValueError) whose message starts with the dotted key it is
about, e.g. ``maps.field_deg: must be > 0, got -1``; when loading a file the message is prefixed
with the file name. Unknown keys and sections are errors (with the closest valid name suggested).

Loading validates everything that can be checked without starting a JAX backend, so that the
command line can still choose the number of CPU devices (``simulation.pdims``) afterwards. The
LSST-Y10 preset bins and the default lightcone depth need JAX and are built on demand
(``bins()``, ``chi_max()``, ``build_model()``).

Adding a section: write a ``_Section`` subclass whose fields carry a ``Field(description=...)``
(units in the description) and a type from the aliases below, rules that involve several keys in
a ``model_validator(mode="after")``, and add a field of that type to ``ExperimentConfig``.
"""

import difflib
import json
import math
import os
import re
import tomllib
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union, get_args, get_origin

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, ValidationInfo, field_validator, model_validator)

__all__ = ["ConfigError", "ExperimentConfig", "OptionError", "SECTIONS", "dumps_toml",
           "load_config", "load_config_text", "parse_overrides", "parse_pdims", "peek_pdims",
           "resolve_config_path", "shipped_configs", "validate_section"]


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the key it is about."""


class OptionError(ValueError):
    """Option text that does not parse (a device grid, a mesh shape) or options that do not go
    together: the command line reports it as a usage error (exit 2), like a bad option type."""


def _fail(key: str, message: str):
    """Raise for a key named in full; validators use it for rules that name another key than
    the one being validated (pydantic's location then is only the section)."""
    raise ConfigError(f"{key}: {message}")


# ---- value types: TOML values in, normalised Python values out, messages without the key --------
# pydantic's own coercion is lax (it reads "64" as an int); these run first and refuse what a
# TOML file should not mean, in words that say what was expected.

class Label(str):
    """How the documentation names a value type (Annotated metadata)."""


def _type_name(value) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _number(value, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        raise ValueError(f"must be {'an integer' if integer else 'a number'}, got {value!r} "
                         f"({_type_name(value)})")
    if integer:
        return value
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value}")
    return value


def _unless_none(fn):
    """Unset keys (None) pass: the field's default or a section rule fills them."""
    return lambda value: value if value is None else fn(value)


def _as_bool(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r} ({_type_name(value)})")
    return value


def _as_str(value):
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r} ({_type_name(value)})")
    return value


def _triple(integer: bool, broadcast: bool):
    """3 numbers; with broadcast one number stands for all three (a cube)."""
    def coerce(value):
        if isinstance(value, (list, tuple)):
            if len(value) != 3:
                raise ValueError(f"must be {'one number or ' if broadcast else ''}a list of 3 "
                                 f"numbers, got {len(value)} values")
            return tuple(_number(v, integer) for v in value)
        if not broadcast:
            raise ValueError(f"must be a list of 3 numbers, got {value!r} ({_type_name(value)})")
        return (_number(value, integer),) * 3
    return coerce


def _floats(one_allowed: bool):
    def coerce(value):
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("must not be empty")
            return tuple(_number(v, False) for v in value)
        if not one_allowed:
            raise ValueError(f"must be a list of numbers, got {value!r} ({_type_name(value)})")
        return _number(value, False)
    return coerce


def _ints(value):
    """A list of whole numbers; empty allowed (an optional list of sizes)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of integers, got {value!r} ({_type_name(value)})")
    return tuple(_number(v, True) for v in value)


def _strs(what: str):
    def coerce(value):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of {what}, got {value!r}")
        return tuple(value)
    return coerce


def _resolve(name: str, info: ValidationInfo) -> str:
    """A file name made absolute against the config file's directory (``load_config``'s
    ``base_dir``, passed as validation context), so that a run reads the same file from anywhere."""
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    return str((base / os.path.expanduser(name)).resolve())


def _as_path(value, info: ValidationInfo):
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a file name, got {value!r} ({_type_name(value)})")
    return _resolve(value, info)


def _as_paths(value, info: ValidationInfo):
    if value is None:
        return None
    return tuple(_resolve(v, info) for v in _strs("file names")(value))


def _as_table(value):
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a table such as {{dist = \"normal\", loc = 0.8, scale = 0.1}}, "
                         f"got {value!r} ({_type_name(value)})")
    return dict(value)


def _typed(py_type, coerce, label: str):
    """``py_type`` read from TOML by ``coerce``; ``label`` names it in docs/configuration.md."""
    return Annotated[py_type, BeforeValidator(_unless_none(coerce)), Label(label)]


Int = _typed(int, lambda v: _number(v, True), "int")
Float = _typed(float, lambda v: _number(v, False), "float")
Bool = _typed(bool, _as_bool, "bool")
Str = _typed(str, _as_str, "string")
Int3 = _typed(tuple[int, int, int], _triple(True, True), "int or [int, int, int]")
Float3 = _typed(tuple[float, float, float], _triple(False, True), "float or [float, float, float]")
Vec3 = _typed(tuple[float, float, float], _triple(False, False), "[float, float, float]")
Floats = _typed(tuple[float, ...], _floats(False), "[float, ...]")
FloatOrFloats = _typed(float | tuple[float, ...], _floats(True), "float or [float, ...]")
Strs = _typed(tuple[str, ...], _strs("strings"), "[string, ...]")
Ints = _typed(tuple[int, ...], _ints, "[int, ...]")
Table = _typed(dict, _as_table, "inline table")
FilePath = Annotated[str, BeforeValidator(_as_path), Label("file name")]
FilePaths = Annotated[tuple[str, ...], BeforeValidator(_as_paths), Label("[file name, ...]")]


def OneOf(*choices):
    """A value from a fixed list (strings, or ints such as the LPT order)."""
    of_type = _as_str if all(isinstance(c, str) for c in choices) else lambda v: _number(v, True)

    def coerce(value):
        if of_type(value) not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    return _typed(Literal[choices], coerce, " | ".join(json.dumps(c) for c in choices))


def OrNone(t):
    """``t`` or None (unset: a default that depends on other keys, or "not used")."""
    base, *meta = get_args(t)
    return Annotated[(base | None, *meta)]


def Check(problem_of, rule: str = ""):
    """A rule on the coerced value: ``problem_of(value)`` returns what is wrong, or None; ``rule``
    states it for the documentation (``configdoc``)."""
    def check(value):
        problem = None if value is None else problem_of(value)
        if problem:
            raise ValueError(f"{problem}, got {_show(value)}")
        return value
    check.rule = rule
    return AfterValidator(check)


def _least(v):
    return min(v) if isinstance(v, tuple) else v


Positive = Check(lambda v: None if _least(v) > 0 else "must be > 0", "> 0")


def AtLeast(n):
    return Check(lambda v: None if _least(v) >= n else f"must be >= {n}", f">= {n}")


def Between(low, high):
    """In the open interval (low, high)."""
    return Check(lambda v: None if low < v < high else f"must be in ({low:g}, {high:g})",
                 f"in ({low:g}, {high:g})")


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


def Count(low, high):
    """An integer count in [low, high]: ``high`` is one of the limits above."""
    def problem(v):
        if v < low:
            return f"must be >= {low}"
        if v > high:
            return f"must be <= {high} (lensbench's limit for this count)"
        return None
    return Check(problem, f"in [{low}, {high}]")


def _each(value, n: int, key: str, per: str) -> tuple:
    """``value`` (one number, or a tuple of them) as n numbers, one per ``per``; a tuple of another
    length is a ConfigError naming ``key``."""
    if isinstance(value, tuple):
        if len(value) != n:
            _fail(key, f"needs one number or {n} (one per {per}), got {len(value)}")
        return value
    return (value,) * n


def _key(default: Any, description: str, shown_default: str | None = None):
    """A config key: its default, and its documentation (units in the description). A default
    that depends on other keys is None in the model; ``shown_default`` says what it becomes."""
    extra = {"shown_default": shown_default} if shown_default else None
    return Field(default, description=description, json_schema_extra=extra)


# ---- sections ---------------------------------------------------------------------------------

class _Frozen(BaseModel):
    """Frozen, no unknown keys; assignment is an AttributeError as for a frozen dataclass (pydantic
    raises a ValidationError, which callers that catch ValueError would take for bad input).
    Building one from Python (``CompressorSection(width=-1)``, ``model_validate``) raises the same
    one-line ConfigError as loading a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **values):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _config_error(e, type(self)) from None

    # Without this mark pydantic would validate a nested section by calling its __init__, which
    # would lose the key path below the section and the loading context (base_dir); with it, a
    # section inside ExperimentConfig is validated as part of the whole.
    __init__.__pydantic_base_init__ = True

    @classmethod
    def model_validate(cls, obj, **kwargs):
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise _config_error(e, cls) from None

    def __setattr__(self, name, value):
        if name in type(self).model_fields:
            raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r} "
                                 f"(ExperimentConfig.with_ makes a changed copy)")
        super().__setattr__(name, value)


class _Section(_Frozen):
    def _given(self) -> set[str]:
        """The keys set in the input (None counts as not set)."""
        return {k for k in self.model_fields_set if getattr(self, k) is not None}

    def _fill(self, defaults: Mapping) -> None:
        """Set the defaults that depend on other keys, for the keys not set. Called from an
        after-validator, before anyone else sees the object, so the section stays frozen."""
        self.__dict__.update({k: v for k, v in defaults.items() if getattr(self, k) is None})


class CosmologySection(_Section):
    """Flat w0waCDM; the defaults are ``Cosmology.fiducial()`` (LSST DESC Y10)."""

    Omega_c: Float = _key(0.2664, "cold dark matter density today")
    Omega_b: Float = _key(0.0492, "baryon density today")
    h: Float = _key(0.6727, "H0 / (100 km/s/Mpc)")
    n_s: Float = _key(0.9645, "scalar spectral index")
    sigma8: Float = _key(0.831, "linear rms density in 8 Mpc/h spheres at z = 0")
    w0: Float = _key(-1.0, "CPL dark-energy equation of state today: w(a) = w0 + wa (1 - a)")
    wa: Float = _key(0.0, "CPL evolution of the dark-energy equation of state")

    @model_validator(mode="after")
    def _physical(self):
        _wrap("cosmology", type(self).model_fields, self.build)
        return self

    def build(self):
        """The ``simulators.Cosmology``; also ``cfg.cosmology()`` (the section is callable)."""
        from simulators import Cosmology

        return Cosmology(**self.model_dump())

    __call__ = build


PDIMS_RE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


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


def _normal_pdims(text: str) -> str:
    px, py = _pdims(text)
    if min(px, py) < 1:
        raise ValueError(f"must look like '2x2' (positive device counts along x and y), "
                         f"got {text!r}")
    return f"{px}x{py}"


class SimulationSection(_Section):
    """The map model and its 3-D simulation."""

    kind: OneOf("pm", "lpt", "gaussian", "lognormal") = _key(
        "pm", '"pm" (LPT + FastPM steps, lightcone painted on the fly), "lpt" (LPT displacements '
              'only, no N-body steps), "gaussian" (Gaussian random field with the Limber C_ell; '
              'flat sky only, ignores the rest) or "lognormal" (shifted-lognormal field with the '
              'same C_ell, shifts from the empty-beam convergence; flat sky only, ignores the rest)')
    mesh_shape: Annotated[Int3, AtLeast(2)] = _key(
        (32, 32, 64), "force-mesh cells, one number (a cube) or [nx, ny, nz]")
    box_size: Annotated[Float3, Positive] = _key(
        (200.0, 200.0, 1000.0), "box side lengths in Mpc/h, one number (a cube) or [Lx, Ly, Lz]")
    mesh_factor: Annotated[Int, AtLeast(1)] = _key(1, "force-mesh cells per particle spacing")
    a_init: Annotated[Float, Between(0, 1)] = _key(
        0.2, "scale factor where LPT starts and the lightcone ends; keep it <= 1 / (1 + z_max) of "
             "the sources (0.2 reaches z = 4)")
    n_steps: Annotated[Int, Count(1, MAX_STEPS)] = _key(10, "time steps, uniform in a from a_init "
                                                            "to 1")
    lpt_order: OneOf(1, 2) = _key(2, "LPT order")
    deconvolve: Bool = _key(
        False, "divide the force by the CIC window of painting and reading (needs mesh_factor = "
               "1); recommended for lensing maps: the mesh power then follows halofit to smaller "
               "scales")
    dtype: OneOf("float32", "float64") = _key("float32", "dtype of fields and particles")
    gradient: OneOf("checkpoint", "adjoint") = _key(
        "checkpoint", "reverse-mode gradient of the PM steps: checkpointed, or the reverse-time "
                      "adjoint (memory independent of the number of steps)")
    pdims: Annotated[Str, AfterValidator(_normal_pdims)] = _key(
        "1x1", 'device grid "PXxPY"; mesh_shape (and the particle grid) must divide along x and '
               'y. On CPU the command line creates that many devices')
    halo: Annotated[Int, AtLeast(2)] = _key(8, "halo width in mesh cells for sharded runs")
    n_chi: Annotated[Int, AtLeast(16)] = _key(
        256, "gaussian/lognormal: Limber quadrature nodes in chi (64 is within ~1% of 256 per "
             "mode at 4x less cost, e.g. for field-level HMC)")

    @model_validator(mode="after")
    def _consistent(self):
        _wrap("simulation", type(self).model_fields, lambda: self.sim_config(sharded=False))
        px, py = self.pdim_tuple
        particles = tuple(n // self.mesh_factor for n in self.mesh_shape)
        for what, shape in (("mesh_shape", self.mesh_shape), ("particle grid", particles)):
            for axis, n, p in (("x", shape[0], px), ("y", shape[1], py)):
                if n % p:
                    _fail("simulation.pdims", f"{what} {list(shape)} is not divisible by the device "
                                              f"grid {self.pdims} along {axis} ({n} % {p} != 0)")
        return self

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


class LightconeSection(_Section):
    """The lightcone the PM and LPT models paint."""

    observer: OrNone(Vec3) = _key(
        None, "[x, y, z] observer position in box coordinates, Mpc/h",
        "flat sky: the centre of the z = 0 face; HEALPix: the box centre")
    chi_max: Annotated[OrNone(Float), Positive] = _key(
        None, 'lightcone depth in Mpc/h; the box is tiled periodically ("replicas") out to it',
        "the comoving distance of the farthest source redshift, z[-1] of the bins, for the "
        "fiducial cosmology, capped at chi(a_init)")
    randomize: Bool = _key(False, "random shift and cube-symmetry rotation of every replica")
    seed: Annotated[Int, AtLeast(0)] = _key(0, "seed of the replica transforms")
    window_margin: Annotated[Float, Check(lambda v: None if v >= 1 else "must be >= 1", ">= 1")] = _key(
        1.25, "each PM step's radial sample window spans this many times the fiducial "
              "cosmology's thickest step; raise it when a cosmology is rejected for a step "
              "thicker than the window (e.g. Omega_c near 0)")
    compensate: Bool = _key(
        False, "divide the density the rays read by the transverse CIC painting and reading "
               "windows, so that the maps follow the unsmoothed theory on resolved scales")


class ShellsSection(_Section):
    """Boxes sized to the cone: the lightcone split into shells of comoving distance, each its own
    PM (or LPT) run with its own box, cells, steps and white noise (``lensing.ShellLensing``). Box
    i is ``width`` wide across and as deep as its shell, so nothing repeats along a line of
    sight; [simulation]'s mesh_shape and box_size are then unused, its other keys apply to every
    shell. Runs stop at the scale factor of their shell's near edge; the step size in a is
    [simulation]'s, (1 - a_init) / n_steps."""

    chi_edges: OrNone(Floats) = _key(
        None, "shell boundaries in Mpc/h, increasing from 0: shell i covers "
              "[chi_edges[i], chi_edges[i + 1]]; the last edge is the lightcone depth",
        "not set: one box ([simulation], tiled periodically)")
    width: OrNone(FloatOrFloats) = _key(
        None, "transverse box side per shell (or one for all), Mpc/h, rounded up to whole cells",
        "required with chi_edges")
    cell: OrNone(FloatOrFloats) = _key(
        None, "cell size per shell (or one for all), Mpc/h (the particle spacing is "
              "cell x simulation.mesh_factor)", "required with chi_edges")
    a_margin: Annotated[Float, Between(0, 1)] = _key(
        0.03, "each run continues this far in a past its near edge's fiducial scale factor (capped "
              "at 1), so that the light of other cosmologies reaches that edge too")
    allow_replication: Bool = _key(
        False, "allow boxes narrower than the cone at their far edge (tiled across the line of "
               "sight); refused otherwise")

    @model_validator(mode="after")
    def _complete(self):
        if self.chi_edges is None:
            for k in ("width", "cell"):
                if getattr(self, k) is not None:
                    _fail(f"shells.{k}", "needs shells.chi_edges")
            return self
        e = self.chi_edges
        if len(e) < 2 or e[0] != 0 or any(b <= a for a, b in zip(e, e[1:])):
            _fail("shells.chi_edges", f"must be >= 2 strictly increasing distances starting at 0 "
                                      f"(no gaps or overlaps), got {_show(e)}")
        n = len(e) - 1
        for k in ("width", "cell"):
            v = getattr(self, k)
            if v is None:
                _fail(f"shells.{k}", "is required with shells.chi_edges")
            vals = _each(v, n, f"shells.{k}", "shell")
            if not all(math.isfinite(x) and x > 0 for x in vals):
                _fail(f"shells.{k}", f"must be positive (Mpc/h), got {_show(v)}")
            self.__dict__[k] = tuple(vals)
        for i, (w, c) in enumerate(zip(self.width, self.cell)):
            if w < 2 * c:
                _fail("shells.width", f"shell {i}: {w:g} Mpc/h is less than two cells of {c:g}")
        return self

    @property
    def n_shells(self) -> int:
        return 0 if self.chi_edges is None else len(self.chi_edges) - 1


def _power_of_2(v):
    return None if v >= 1 and not v & (v - 1) else "must be a power of 2"


class MapsSection(_Section):
    """The convergence maps: a flat square patch or the HEALPix sphere."""

    sky: OneOf("flat", "healpix") = _key(
        "flat", '"flat" (square patch around +z) or "healpix" (full sphere)')
    field_deg: Annotated[OrNone(Float), Positive] = _key(
        None, "flat: side of the square field in degrees, in (0, 90)", "5.0 on a flat sky")
    npix: Annotated[OrNone(Int), AtLeast(2)] = _key(None, "flat: pixels per side",
                                                      "64 on a flat sky")
    nside: Annotated[OrNone(Int), Check(_power_of_2, "a power of 2")] = _key(
        None, "healpix: HEALPix nside, a power of 2", "64 on the HEALPix sphere")
    disc: OrNone(Vec3) = _key(
        None, "healpix: [lon, lat, radius] in degrees for a partial sky: only pixels whose "
              "centres lie in that disc are traced and get shape noise; the maps keep the "
              "full-sky shape with zeros outside", "the full sky")

    FLAT_DEFAULTS: ClassVar[dict] = dict(field_deg=5.0, npix=64)
    HEALPIX_DEFAULTS: ClassVar[dict] = dict(nside=64, disc=None)

    @model_validator(mode="after")
    def _geometry(self):
        own, other = ((self.FLAT_DEFAULTS, self.HEALPIX_DEFAULTS) if self.sky == "flat"
                      else (self.HEALPIX_DEFAULTS, self.FLAT_DEFAULTS))
        for name in other:
            if name in self._given():
                _fail(f"maps.{name}", f"only applies to sky = "
                                      f"{'healpix' if self.sky == 'flat' else 'flat'!r}, "
                                      f"but sky = {self.sky!r}")
        self._fill(own)
        _wrap("maps", type(self).model_fields, self.build)
        return self

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


class SourcesSection(_Section):
    """The source galaxies: the LSST-Y10 preset, or one n(z) file per tomographic bin."""

    preset: OrNone(OneOf("lsst_y10")) = _key(
        None, "the LSST DESC SRD Y10 Smail n(z) in equal-number bins with Gaussian photo-z",
        '"lsst_y10" unless nz_files is given')
    n_bins: Annotated[OrNone(Int), AtLeast(1)] = _key(
        None, "preset: tomographic bins with equal galaxy numbers", "5 with the preset")
    n_gal_total: Annotated[OrNone(Float),
                           Check(lambda v: None if v > 0 else "must be > 0 (bins with no galaxies)",
                                 "> 0")
                           ] = _key(None, "preset: total galaxy density in gal/arcmin^2, split "
                                          "equally over the bins", "27.0 with the preset")
    sigma_z0: Annotated[OrNone(Float), Positive] = _key(
        None, "preset: photo-z scatter sigma_z = sigma_z0 (1 + z)", "0.05 with the preset")
    nz_files: OrNone(FilePaths) = _key(
        None, "two-column text files (z, n(z)), one per bin; relative paths are relative to the "
              "config file", "not set: the preset")
    n_gal_per_bin: OrNone(FloatOrFloats) = _key(
        None, "nz_files: galaxy density in gal/arcmin^2, one number or one per file",
        "required with nz_files")
    sigma_e: Annotated[Float, Positive] = _key(0.26, "shape noise per ellipticity component")

    PRESET_DEFAULTS: ClassVar[dict] = dict(preset="lsst_y10", n_bins=5, n_gal_total=27.0, sigma_z0=0.05)

    @model_validator(mode="after")
    def _bins_given(self):
        given = self._given()
        if self.nz_files is None:
            if "n_gal_per_bin" in given:
                _fail("sources.n_gal_per_bin", "only applies with nz_files; the preset splits "
                                               "n_gal_total equally over its bins")
            self._fill(self.PRESET_DEFAULTS)
            return self
        for name in self.PRESET_DEFAULTS:
            if name in given:
                _fail(f"sources.{name}", "only applies to the preset; with nz_files the bins "
                                         "are the files (give either preset or nz_files)")
        self._check_files()
        _wrap("sources", type(self).model_fields, self.build)
        return self

    def _check_files(self):
        if self.n_gal_per_bin is None:
            _fail("sources.n_gal_per_bin", "required with nz_files (galaxies per arcmin^2, one "
                                           "number or one per file)")
        n = len(self.nz_files)
        per_bin = self.n_gal_per_bin
        for i, v in enumerate(_each(per_bin, n, "sources.n_gal_per_bin", "n(z) file")):
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


class ClSection(_Section):
    """Tomographic C_ell binning (``lensbench cl``); ell is dimensionless."""

    ell_edges: OrNone(Floats) = _key(None, "explicit increasing bin edges",
                                       "not set: the keys below")
    ell_min: Annotated[OrNone(Float), Positive] = _key(
        None, "lowest edge", "flat: the fundamental 2 pi / field; healpix: 2")
    ell_max: Annotated[OrNone(Float), Positive] = _key(
        None, "highest edge", "flat: the Nyquist pi npix / field; healpix: 2 nside, at most "
                              "3 nside (HEALPix estimates are good to ~2 nside)")
    n_ell_bins: Annotated[OrNone(Int), AtLeast(1)] = _key(None, "number of bins", "12")
    spacing: OrNone(OneOf("log", "linear")) = _key(None, "bin spacing", '"log"')

    DEFAULTS: ClassVar[dict] = dict(n_ell_bins=12, spacing="log")

    @model_validator(mode="after")
    def _edges_or_range(self):
        if self.ell_edges is None:
            if self.ell_min is not None and self.ell_max is not None and self.ell_max <= self.ell_min:
                _fail("cl.ell_max", f"must be > ell_min = {self.ell_min:g}, got {self.ell_max:g}")
            self._fill(self.DEFAULTS)
            return self
        clash = sorted(self._given() & {"ell_min", "ell_max", "n_ell_bins", "spacing"})
        if clash:
            _fail(f"cl.{clash[0]}", "give either ell_edges or ell_min/ell_max/n_ell_bins/spacing, "
                                    "not both")
        e = self.ell_edges
        if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:])) or e[0] < 0:
            _fail("cl.ell_edges", f"must be >= 2 increasing values >= 0, got {_show(e)}")
        return self

    def edges(self, maps: MapsSection):
        """(n + 1,) float64 bin edges; the unset ones follow the map geometry (``_key`` docs)."""
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
    def problem(table):
        from .priors import ParamPrior, PriorError

        try:
            ParamPrior.from_table(name, table).check_physical()
        except PriorError as e:
            return str(e).removeprefix(f"{name}: ")
        return None
    return Check(problem)


def _prior_table(name: str):
    return _key(None, f"the prior of {name}, overriding the preset's: {{dist = \"normal\", loc, "
                      f"scale}}, {{dist = \"truncated_normal\", loc, scale, low and/or high}} or "
                      f"{{dist = \"uniform\", low, high}}", "the preset's")


class PriorSection(_Section):
    """Which parameters are inferred, and their priors (``cfg.prior()`` builds an
    ``experiments.priors.Prior``)."""

    preset: OneOf("lsst_y10", "none") = _key(
        "lsst_y10", 'the 6-parameter LSST-Y10 prior (Omega_c ~ TN(0.2664, 0.2, low=0), Omega_b ~ '
                    'N(0.0492, 0.006), sigma8 ~ TN(0.831, 0.14, low=0), h ~ N(0.6727, 0.063), '
                    'n_s ~ N(0.9645, 0.08), w0 ~ TN(-1, 0.9, low=-2, high=-0.3)) or "none"')
    params: OrNone(Strs) = _key(
        None, "the inferred parameters, in order (Cosmology field names); the others stay at "
              "their [cosmology] values", "every preset and declared parameter")
    Omega_c: Annotated[OrNone(Table), _param_prior("Omega_c")] = _prior_table("Omega_c")
    Omega_b: Annotated[OrNone(Table), _param_prior("Omega_b")] = _prior_table("Omega_b")
    h: Annotated[OrNone(Table), _param_prior("h")] = _prior_table("h")
    n_s: Annotated[OrNone(Table), _param_prior("n_s")] = _prior_table("n_s")
    sigma8: Annotated[OrNone(Table), _param_prior("sigma8")] = _prior_table("sigma8")
    w0: Annotated[OrNone(Table), _param_prior("w0")] = _prior_table("w0")
    wa: Annotated[OrNone(Table), _param_prior("wa")] = _prior_table("wa")

    @model_validator(mode="after")
    def _buildable(self):
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


class TrainingSetSection(_Section):
    """Simulated (theta, kappa) pairs for the implicit pipeline (``lensbench generate``)."""

    n_sims: Annotated[Int, Count(1, MAX_SIMS)] = _key(1000, "simulations")
    batch_size: Annotated[OrNone(Int), AtLeast(1)] = _key(
        None, "simulations per batch and per chunk written",
        "4 per device for PM/LPT, 16 per device for Gaussian/lognormal maps")
    seed: Annotated[Int, AtLeast(0)] = _key(
        1, "seed of the parameter draws and latent fields (distinct from the observation's "
           "top-level seed)")
    n_calibration: Annotated[Int, AtLeast(0)] = _key(
        100, "the last simulations, held out from training for calibration")

    @model_validator(mode="after")
    def _held_out(self):
        if self.n_calibration >= self.n_sims:
            _fail("training_set.n_calibration", f"must be < n_sims = {self.n_sims}, got "
                                                f"{self.n_calibration}")
        return self


class CompressorSection(_Section):
    """Neural compressor training (``compressors.TrainConfig``; ``lensbench train-compressor``)."""

    loss: OneOf("mse", "mae", "gnll", "vmim") = _key("vmim", "training loss")
    network: OneOf("resnet", "cnn", "power") = _key(
        "resnet", 'architecture: "resnet", "cnn", or "power" (the maps\' band powers alone '
                  'through an MLP: a learned compression of the power spectrum)')
    power_bands: Annotated[Int, AtLeast(0)] = _key(
        0, "band powers of the maps (per annulus of the FFT grid, at most this many: the log "
           "auto-power of each bin and the correlation coefficient of each bin pair) fed to the "
           "network's head beside its convolutional features; 0: none. The optimal summary of "
           "a Gaussian field is a weighted sum of these, which a CNN learns slowly (NOTEBOOK 22)")
    width: Annotated[Int, AtLeast(1)] = _key(16, "channels of the first stage")
    depth: Annotated[Int, AtLeast(1)] = _key(3, "stages, each halving the maps")
    epochs: Annotated[Int, Count(2, MAX_EPOCHS)] = _key(
        30, "maximum epochs; early stopping may end sooner")
    steps_per_epoch: Annotated[OrNone(Int), AtLeast(1)] = _key(
        None, "optimiser steps per epoch (the unit of validation, patience and the schedule): "
              "fixing it gives every training-set size the same optimisation budget, a small "
              "set being cycled several times per epoch (the efficiency curve needs this: with "
              "one pass per epoch, 1,000 maps get a tenth of the steps 10,000 do)",
        "one pass over the training split")
    batch_size: Annotated[Int, AtLeast(1)] = _key(32, "maps per step")
    learning_rate: Annotated[Float, Positive] = _key(
        1e-3, "peak AdamW learning rate (warm-up, cosine decay)")
    patience: Annotated[Int, AtLeast(1)] = _key(
        8, "epochs without a better validation loss before stopping")
    val_fraction: Annotated[Float, Between(0, 1)] = _key(
        0.1, "fraction of the training maps used for validation")
    seed: Annotated[Int, AtLeast(0)] = _key(
        0, "seed of the split, initialisation, noise and augmentation")
    summary_dim: Annotated[OrNone(Int), AtLeast(1)] = _key(
        None, "VMIM: size of the summary (more than the number of parameters can keep "
              "information a d-dimensional summary must trade away across the prior; the other "
              "losses output one number per parameter)", "the number of parameters")
    flow_layers: Annotated[Int, AtLeast(1)] = _key(
        4, "VMIM: autoregressive layers of the conditional flow q(theta | t) trained with the "
           "compressor")
    flow_hidden: Annotated[Int, AtLeast(1)] = _key(
        32, "VMIM: hidden width of that flow's conditioner networks")
    ema: Annotated[OrNone(Float), Between(0, 1)] = _key(
        None, "decay per step of an exponential moving average of the weights used for "
              "validation, early stopping and the saved model (e.g. 0.99: a time constant of "
              "100 steps); it steadies the noisy VMIM validation loss", "no average")
    online: Bool = _key(
        False, "train on fresh simulations drawn from the prior for every batch (the "
               "[simulation] model, jitted and vmapped); the training set then serves for "
               "validation only, and every draw counts in the method's simulation budget")

    def train_config(self, loss: str | None = None, scales=None, field_deg: float | None = None):
        """The ``compressors.TrainConfig``; ``scales``/``field_deg``: the experiment's scale cuts
        (``ExperimentConfig.scale_cuts``) and map side, which the network applies to its inputs."""
        from compressors import TrainConfig

        values = {k: getattr(self, k) for k in type(self).model_fields}
        values["loss"] = loss or self.loss
        if scales is not None:
            values.update(scales=scales, field_deg=field_deg)
        if values["loss"] != "vmim":
            values["summary_dim"] = None  # one output per parameter
        return _wrap("compressor", type(self).model_fields, lambda: TrainConfig(**values))


class NpeSection(_Section):
    """Neural posterior estimation with sbi (``lensbench fit-posterior``)."""

    density: OneOf("nsf", "maf") = _key("nsf", '"nsf" (neural spline flow) or "maf"')
    vmim_flow: Bool = _key(
        False, "NPE on VMIM summaries takes the compressor's own flow q(theta | t), trained with "
               "it on every simulation it saw, as the posterior instead of fitting a second flow "
               "on the training set; calibrated on the held-out simulations like any NPE")
    max_epochs: Annotated[Int, Count(1, MAX_EPOCHS)] = _key(
        300, "maximum training epochs (sbi stops early)")
    batch_size: Annotated[Int, AtLeast(1)] = _key(128, "training batch size")
    noise_copies: Annotated[Int, Count(1, MAX_NOISE_COPIES)] = _key(
        4, "shape-noise realisations drawn per simulation")
    n_samples: Annotated[Int, Count(1, MAX_SAMPLES)] = _key(
        20000, "posterior samples written by `lensbench sample`")
    calibration_samples: Annotated[Int, Count(10, MAX_CALIBRATION_SAMPLES)] = _key(
        500, "posterior samples per held-out simulation for SBC/TARP")
    seed: Annotated[Int, AtLeast(0)] = _key(0, "seed of the noise and of training")


class ClBaselineSection(_Section):
    """The power-spectrum baseline: analytic Gaussian likelihood + NUTS (``lensbench cl-baseline``)."""

    covariance: OneOf("simulated", "gaussian") = _key(
        "simulated", '"simulated" (the sample covariance of n_cov simulations of the map model at '
                     '[cosmology], Hartlap-corrected) or "gaussian" (the analytic Gaussian '
                     'covariance of the binned C_ell at [cosmology], per Fourier mode with shape '
                     'noise: exact for Gaussian maps, no sampling noise; it omits the non-Gaussian '
                     'terms of PM maps)')
    n_cov: Annotated[Int, Count(3, MAX_SIMS)] = _key(
        200, "fiducial simulations for the simulated covariance")
    likelihood: OneOf("gaussian", "sellentin_heavens", "wishart") = _key(
        "gaussian", '"gaussian", "sellentin_heavens" (simulated covariance only) or "wishart" (the '
                    'exact distribution of the band powers of Gaussian maps, whose covariance '
                    'follows the cosmology; covariance = "gaussian" only)')
    num_warmup: Annotated[Int, Count(1, MAX_WARMUP)] = _key(500, "NUTS warm-up steps")
    num_samples: Annotated[Int, Count(1, MAX_SAMPLES)] = _key(2000, "NUTS samples per chain")
    num_chains: Annotated[Int, Count(1, MAX_CHAINS)] = _key(2, "NUTS chains")
    n_chi: Annotated[Int, AtLeast(16)] = _key(
        64, "Limber quadrature nodes in chi (64 changes the binned C_ell by < 0.2% against 256, "
            "at a quarter of the cost per gradient)")
    seed: Annotated[Int, AtLeast(0)] = _key(
        10000, "the covariance simulations use seeds seed .. seed + n_cov - 1 (keep the "
               "observation's seed outside); NUTS uses seed too")

    @model_validator(mode="after")
    def _likelihood_fits(self):
        if self.covariance == "gaussian" and self.likelihood == "sellentin_heavens":
            _fail("cl_baseline.likelihood", "'sellentin_heavens' marginalises a simulated "
                                            "covariance's noise: it needs covariance = 'simulated'")
        if self.covariance == "simulated" and self.likelihood == "wishart":
            _fail("cl_baseline.likelihood", "'wishart' is the band powers' distribution for "
                                            "Gaussian maps and takes no simulated covariance: "
                                            "it needs covariance = 'gaussian'")
        return self


MIN_MCLMC_WARMUP = 20  # blackjax's three tuning stages each need a few steps (MAMS starts with them)
MAX_TREE_DEPTH = 15    # NUTS: 2^15 gradients per iteration


def _tree_depth(v):
    if v < 1:
        return "must be >= 1"
    if v > MAX_TREE_DEPTH:
        return f"must be <= {MAX_TREE_DEPTH} (2^{MAX_TREE_DEPTH} gradients per iteration)"
    return None


# MCLMC's isokinetic integrators (blackjax.mcmc.integrators) and their gradients per step: a
# palindromic scheme of k force stages reuses its last gradient as the next step's first
MCLMC_INTEGRATORS = {"velocity_verlet": 1, "mclachlan": 2}

COMPARE_METHODS = ("cl_analytic", "npe_cl", "npe_mse", "npe_mae", "npe_gnll", "npe_vmim",
                   "npe_maps", "hmc", "exact")


class HmcSection(_Section):
    """Explicit full-field inference over theta and the initial white noise (``lensbench hmc``;
    ``explicit.HMCSettings``)."""

    sampler: OneOf("nuts", "mclmc", "mams") = _key(
        "nuts", '"nuts" (dense mass block over theta, diagonal over the field), "mclmc" (blackjax '
                'microcanonical Langevin; unadjusted, so biased by its step size) or "mams" '
                "(Metropolis-adjusted microcanonical HMC: MCLMC's tuning, then the step size "
                "adapted to target_accept; unbiased)")
    num_warmup: Annotated[Int, Count(0, MAX_WARMUP)] = _key(
        200, f"warm-up (NUTS adaptation / MCLMC tuning) steps; at least {MIN_MCLMC_WARMUP} for "
             f"mclmc and mams")
    num_samples: Annotated[Int, Count(1, MAX_SAMPLES)] = _key(200, "samples per chain")
    num_chains: Annotated[Int, Count(1, MAX_CHAINS)] = _key(1, "chains")
    max_tree_depth: Annotated[Int, Check(_tree_depth, f"in [1, {MAX_TREE_DEPTH}]")] = _key(
        6, "NUTS: at most 2^depth - 1 gradient evaluations per sample")
    target_accept: Annotated[Float, Between(0, 1)] = _key(
        0.8, "NUTS and MAMS: target acceptance probability of the step-size adaptation")
    energy_variance: Annotated[Float, Between(0, 1)] = _key(
        5e-4, "MCLMC, and the first warm-up stage of MAMS: the energy-error variance per "
              "dimension the step size is tuned to (blackjax's desired_energy_var). MCLMC is "
              "unadjusted: its bias shrinks with the step (~ step^2), and the step with this "
              "variance (~ its 6th root in blackjax's step-size model; 5x smaller gave 0.78x "
              "the step on quick), at proportionally more gradients per effective sample")
    integrator: OneOf(*MCLMC_INTEGRATORS) = _key(
        "velocity_verlet", "MCLMC, and the first warm-up stage of MAMS: the isokinetic "
                           'integrator of one step: "velocity_verlet" (1 gradient per step) or '
                           '"mclachlan" (2 gradients; both second order, McLachlan\'s minimal-'
                           "norm scheme with a much smaller error, so the tuned step is ~1.9x "
                           "longer). At energy_variance 2e-5 McLachlan left half velocity "
                           "Verlet's bias against the exact posterior of gaussian_check and took "
                           "1.27x fewer gradients per effective sample on quick (NOTEBOOK 29). "
                           "Gradients are counted per step as stated")
    precondition: OneOf("none", "fourier") = _key(
        "none", '"none" or "fourier": sample the latent field with each Fourier mode scaled by its '
                "linearised posterior width, estimated once at the start from 8 Hessian-vector "
                "probes (16 gradients); an exact change of variables, for any sampler "
                "(``explicit.precondition``)")
    segment: Annotated[Int, AtLeast(1)] = _key(
        25, "iterations between checkpoints (the run resumes from the last one)")
    thin_field: Annotated[Int, AtLeast(0)] = _key(
        50, "keep the latent field every N samples (0: never); theta is always kept")
    gradient: OneOf("adjoint", "checkpoint") = _key(
        "adjoint", '"adjoint" (reverse-time PM adjoint: memory independent of the number of '
                   'steps) or "checkpoint"; replaces simulation.gradient for HMC')
    seed: Annotated[Int, AtLeast(0)] = _key(2, "seed of the chains")
    processes: Annotated[Int, AtLeast(1)] = _key(
        1, "run the chains in this many OS processes at once on this machine (CPU: up to the "
           "number of cores; one GPU: keep 1); the draws do not depend on it. Must be 1 under "
           "jax.distributed, which splits each chain's field")
    start_steps: Annotated[Int, AtLeast(0)] = _key(
        100, "Adam steps (one gradient each) of the start field, a draw of p(z | d, theta at the "
             "prior mean) by perturb-and-optimise (``explicit.field_start``); 100 bring the quick "
             "objective to within 1 of its optimum, 0 starts from the perturbed draw itself")

    # not explicit.HMCSettings fields: the PM gradient mode (set on the simulation), how many
    # processes run the chains, and how the start field is found (explicit.field_start)
    NOT_SAMPLER_KEYS: ClassVar[tuple] = ("gradient", "processes", "start_steps")

    @model_validator(mode="after")
    def _enough_warmup(self):
        if self.sampler in ("mclmc", "mams") and self.num_warmup < MIN_MCLMC_WARMUP:
            _fail("hmc.num_warmup", f"must be >= {MIN_MCLMC_WARMUP} for {self.sampler} (its tuning "
                                    f"stages need steps), got {self.num_warmup}")
        return self

    def settings(self):
        """The ``explicit.HMCSettings``."""
        from explicit import HMCSettings

        values = {k: getattr(self, k) for k in type(self).model_fields
                  if k not in self.NOT_SAMPLER_KEYS}
        return _wrap("hmc", type(self).model_fields, lambda: HMCSettings(**values))


# Vehtari et al. 2021 (Bayesian Analysis 16, 667): report MCMC summaries when split R̂ < 1.01 and
# the ESS > 400. Below that the moments, and more so the FoM (a determinant of the covariance)
# and C2ST, carry Monte Carlo errors or a bias the tables do not show. The defaults of
# [compare] ess_min / r_hat_max, and of experiments.metrics.compare_metrics.
ESS_MIN, R_HAT_MAX = 400, 1.01


class CompareSection(_Section):
    """``lensbench compare``: the methods run on one observation and compared, and what counts as
    converged."""

    methods: Strs = _key(
        ("cl_analytic", "npe_cl", "npe_vmim", "hmc"),
        'any of "cl_analytic" (Gaussian C_ell likelihood + NUTS), "npe_cl" (NPE on the C_ell data '
        'vector), "npe_mse", "npe_mae", "npe_gnll", "npe_vmim" (NPE on a compressor trained with '
        'that loss), "npe_maps" (one-stage NPE), "hmc" (explicit field-level), "exact" (grid '
        "posterior; Gaussian-field maps only)")
    observation: OrNone(FilePath) = _key(
        None, "an observed map file (``lensbench maps``); relative paths are relative to the "
              "config file", "simulate one at [cosmology] with the top-level seed")
    c2st_samples: Annotated[Int, Count(10, MAX_SAMPLES)] = _key(
        2000, "at most this many samples per method enter each C2ST")
    seed: Annotated[Int, AtLeast(0)] = _key(0, "seed of the C2ST subsampling and classifier")
    ess_min: Annotated[Int, AtLeast(1)] = _key(
        ESS_MIN, "least effective sample size of every sampled parameter for a method to count "
                 "as converged")
    r_hat_max: Annotated[Float, Check(lambda v: None if v > 1 else "must be > 1", "> 1")] = _key(
        R_HAT_MAX, "largest split R-hat of every sampled parameter for a method to count as "
                   'converged. The console, report.md and the contour legend flag methods that '
                   'miss either as "unconverged"')
    efficiency: Ints = _key(
        (), "training-set sizes of the simulation-efficiency curve: every NPE method in "
            "methods is trained again on the first n training simulations for each n and "
            "compared with the reference posterior (reference, else exact, else hmc) by C2ST "
            "and FoM (efficiency.json, efficiency/efficiency.png, report.md)", "no curve")
    reference: OrNone(FilePath) = _key(
        None, "a posterior samples file of this run's observation (e.g. a committed converged "
              "field-level posterior, experiments/benchmarks/reference_quick_field_level_"
              "mclachlan.h5) that the efficiency curve is scored against, when a long chain "
              "is the only converged reference; its configuration must give the same maps and "
              "prior; relative paths are relative to the config file",
        "exact if among methods, else hmc")

    @field_validator("efficiency")
    @classmethod
    def _increasing(cls, sizes):
        if any(n < 2 for n in sizes):
            raise ValueError(f"sizes must be >= 2, got {_show(list(sizes))}")
        if list(sizes) != sorted(set(sizes)):
            raise ValueError(f"must increase without repeats, got {_show(list(sizes))}")
        return sizes

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods):
        for m in methods:
            if m not in COMPARE_METHODS:
                raise ValueError(f"unknown method {m!r}{_suggest(m, COMPARE_METHODS)}; "
                                 f"valid: {', '.join(COMPARE_METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"lists a method twice: {_show(list(methods))}")
        return methods


# ---- the whole configuration ---------------------------------------------------------------------

def _name(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _seed(value):
    value = _number(value, True)
    if not 0 <= value < 2**63:
        raise ValueError(f"must be in [0, 2^63), got {value}")
    return value


class ScalesSection(_Section):
    """The multipoles per tomographic bin on which the maps are validated against theory (how it was
    measured: the comment in the shipped file). ``maps`` writes the range into the map file,
    ``cl`` marks it, and ``maps`` warns when cells are too coarse for it."""

    ell_min: OrNone(FloatOrFloats) = _key(
        None, "lowest validated multipole, one number or one per bin", "no lower limit")
    ell_max: OrNone(FloatOrFloats) = _key(
        None, "highest validated multipole, one number or one per bin (at most the pixel Nyquist "
              "pi npix / field, or 3 nside)", "not validated: the pixel Nyquist")
    cut: Bool = _key(
        True, "every inference method sees only these multipoles: the C_ell methods drop the "
              "[cl] bins outside them, the map methods (compressors, NPE on maps, field-level "
              "and exact likelihoods) see maps whose Fourier modes outside them are removed "
              "(flat sky)")

    def ranges(self, n_bins: int) -> "tuple[tuple[float, ...], tuple[float, ...]] | None":
        """((ell_min per bin), (ell_max per bin)), or None when neither key is set; a list of
        another length than ``n_bins`` is a ConfigError naming the key."""
        if self.ell_min is None and self.ell_max is None:
            return None
        return tuple((default,) * n_bins if v is None else
                     tuple(float(x) for x in _each(v, n_bins, f"scales.{k}", "bin"))
                     for k, v, default in (("ell_min", self.ell_min, 0.0),
                                           ("ell_max", self.ell_max, math.inf)))


def _check_scales(cfg) -> None:
    sc = cfg.scales
    rng = sc.ranges(cfg.sources.n_bins_total)
    if rng is None:
        return
    for k, vals in zip(("ell_min", "ell_max"), rng):
        if getattr(sc, k) is not None and not all(x >= 0 and math.isfinite(x) for x in vals):
            _fail(f"scales.{k}", f"must be finite and >= 0, got {_show(getattr(sc, k))}")
    maps = cfg.maps
    if sc.cut and maps.sky != "flat":
        _fail("scales.cut", "scale cuts need flat-sky maps (maps.sky = 'flat'); set "
                            "scales.cut = false to only record the range")
    nyquist = (math.pi * maps.npix / math.radians(maps.field_deg) if maps.sky == "flat"
               else 3.0 * maps.nside)
    for i, (lo, hi) in enumerate(zip(*rng)):
        if hi <= lo:
            _fail("scales.ell_max", f"bin {i + 1}: must be > ell_min = {lo:g}, got {hi:g}")
        if math.isfinite(hi) and hi > nyquist * (1 + 1e-9):
            _fail("scales.ell_max", f"bin {i + 1}: {hi:g} is above the maps' highest multipole "
                                    f"{nyquist:.0f} (the pixel Nyquist)")


def _section(cls):
    return Field(default_factory=cls, description=cls.__doc__)


class ExperimentConfig(_Frozen):
    """A validated experiment configuration (frozen; equal configs compare equal).

    Each TOML section is an attribute of the same name (``cfg.maps.npix``). ``cfg.cosmology()``
    (the section is callable), ``cfg.bins()``, ``cfg.sky()`` and ``cfg.build_model()`` build the
    simulator objects. ``path`` is the file it came from, if any (not compared).
    """

    name: Annotated[str, BeforeValidator(_name), Label("string")] = _key(
        "experiment", "a label for outputs", "the file's stem, or \"experiment\"")
    seed: Annotated[int, BeforeValidator(_seed), Label("int")] = _key(
        0, "seed of the initial white noise and of the shape noise, in [0, 2^63)")
    cosmology: CosmologySection = _section(CosmologySection)
    simulation: SimulationSection = _section(SimulationSection)
    lightcone: LightconeSection = _section(LightconeSection)
    shells: ShellsSection = _section(ShellsSection)
    maps: MapsSection = _section(MapsSection)
    sources: SourcesSection = _section(SourcesSection)
    cl: ClSection = _section(ClSection)
    scales: ScalesSection = _section(ScalesSection)
    prior: PriorSection = _section(PriorSection)
    training_set: TrainingSetSection = _section(TrainingSetSection)
    compressor: CompressorSection = _section(CompressorSection)
    npe: NpeSection = _section(NpeSection)
    cl_baseline: ClBaselineSection = _section(ClBaselineSection)
    hmc: HmcSection = _section(HmcSection)
    compare: CompareSection = _section(CompareSection)

    @field_validator("*", mode="before")
    @classmethod
    def _tables(cls, value, info: ValidationInfo):
        if info.field_name in SECTIONS and not isinstance(value, (Mapping, BaseModel)):
            raise ValueError(f"must be a table [{info.field_name}], got {value!r} "
                             f"({_type_name(value)})")
        return value

    @model_validator(mode="after")
    def _across_sections(self):
        kind = self.simulation.kind
        if kind in ("gaussian", "lognormal") and self.maps.sky != "flat":
            _fail("simulation.kind", f"'{kind}' maps need maps.sky = 'flat'")
        if self.lightcone.observer is not None and kind not in ("gaussian", "lognormal"):
            box = self.simulation.box_size
            if any(not 0 <= o <= b for o, b in zip(self.lightcone.observer, box)):
                _fail("lightcone.observer", f"{_show(self.lightcone.observer)} lies outside the "
                                            f"box [0, {_show(box)}] Mpc/h")
        self.cl.edges(self.maps)  # an ell range that is empty for this map geometry
        if self.shells.n_shells:
            self._check_shells()
        _check_scales(self)
        if "exact" in self.compare.methods and kind != "gaussian":
            _fail("compare.methods", f"'exact' needs Gaussian-field maps (simulation.kind = "
                                     f"'gaussian'), not '{kind}'")
        px, py = self.simulation.pdim_tuple
        if self.compressor.online and kind in ("pm", "lpt") and px * py > 1:
            _fail("compressor.online", f"needs a map model that runs many simulations in one "
                                       f"vmapped program; simulation.pdims = "
                                       f"'{self.simulation.pdims}' shards each over devices: "
                                       f"train on a generated training set instead")
        sizes = self.compare.efficiency
        if sizes and any(m in ("npe_mse", "npe_mae", "npe_gnll", "npe_vmim")
                         for m in self.compare.methods):
            n_val = round(self.compressor.val_fraction * sizes[0])
            if n_val < 1 or n_val >= sizes[0]:
                _fail("compare.efficiency", f"size {sizes[0]} leaves an empty compressor "
                                            f"training or validation split (compressor."
                                            f"val_fraction {self.compressor.val_fraction:g})")
        if sizes:
            methods = self.compare.methods
            if not any(m.startswith("npe_") for m in methods):
                _fail("compare.efficiency", "needs an NPE method in compare.methods (npe_cl, "
                                            "npe_maps or npe_<loss>) to train at each size")
            if "exact" not in methods and "hmc" not in methods and self.compare.reference is None:
                _fail("compare.efficiency", "needs a reference posterior: compare.reference (a "
                                            "samples file), or 'exact' (Gaussian-field maps) or "
                                            "'hmc' in compare.methods")
            n_train = self.training_set.n_sims - self.training_set.n_calibration
            if sizes[-1] > n_train:
                _fail("compare.efficiency", f"size {sizes[-1]} exceeds the {n_train} training "
                                            f"simulations (training_set.n_sims "
                                            f"{self.training_set.n_sims} minus n_calibration "
                                            f"{self.training_set.n_calibration})")
        return self

    def _check_shells(self) -> None:
        kind = self.simulation.kind
        if kind not in ("pm", "lpt"):
            _fail("shells.chi_edges", f"needs a 3-D simulation (simulation.kind = 'pm' or 'lpt'), "
                                      f"not '{kind}'")
        if self.maps.sky != "flat":
            _fail("shells.chi_edges", "needs maps.sky = 'flat' (shell boxes follow the field)")
        if self.simulation.pdims != "1x1":
            _fail("simulation.pdims", "shells run on one device for now: set pdims = '1x1'")
        if self.lightcone.randomize:
            _fail("lightcone.randomize", "must be false with shells: no box is repeated along a "
                                         "line of sight, so there is nothing to randomise")
        if self.lightcone.chi_max is not None:
            _fail("lightcone.chi_max", "is the last of shells.chi_edges with shells: leave it unset")
        if self.lightcone.observer is not None:
            _fail("lightcone.observer", "is the centre of each shell box's near face with shells: "
                                        "leave it unset")
        if self.compressor.online:
            _fail("compressor.online", "does not support shells yet: train on a generated set")
        half = math.tan(math.radians(self.maps.field_deg) / 2)
        if not self.shells.allow_replication:
            for i, (w, far) in enumerate(zip(self.shells.width, self.shells.chi_edges[1:])):
                need = 2 * far * half
                if w < need:
                    _fail("shells.width", f"shell {i}: {w:g} Mpc/h is narrower than the "
                                          f"{self.maps.field_deg:g} deg field at its far edge "
                                          f"chi = {far:g} ({need:.1f} Mpc/h); widen it or set "
                                          f"shells.allow_replication = true")

    # equality and hashing ignore where the configuration was read from
    def __eq__(self, other):
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self):
        return hash(self._values())

    def _values(self) -> tuple:
        return tuple(getattr(self, k) for k in type(self).model_fields)

    _path: str | None = PrivateAttr(None)

    @property
    def path(self) -> str | None:
        """The file this configuration came from, if any."""
        return self._path

    # ---- builders (these import JAX; bins() and chi_max() may start its backend) -------------
    def cosmology_params(self) -> dict:
        return self.cosmology.model_dump()

    def bins(self):
        """The tomographic ``RedshiftBins`` of [sources] (cached)."""
        return self._bins

    @cached_property
    def _bins(self):
        return _wrap("sources", SourcesSection.model_fields, self.sources.build)

    def sky(self):
        """``FlatSky`` or ``HealpixSky`` of [maps]."""
        return self.maps.build()

    def chi_max(self) -> float:
        """Lightcone depth in Mpc/h: lightcone.chi_max, or the fiducial comoving distance of the
        farthest source redshift capped at chi(a_init); with [shells], the last shell edge."""
        if self.shells.n_shells:
            return float(self.shells.chi_edges[-1])
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

    def scale_cuts(self) -> "tuple[tuple[float, ...], tuple[float, ...]] | None":
        """(ell_min per bin, ell_max per bin) that every inference method applies, or None: [scales]
        with ``cut = true`` (inf where a bin has no upper limit)."""
        if not self.scales.cut:
            return None
        return self.scales.ranges(self.sources.n_bins_total)

    def build_model(self):
        """The map model (``PMLensing``, ``LPTLensing``, ``GaussianLensing`` or ``LognormalLensing``).

        A sharded ``simulation.pdims`` needs that many JAX devices (the CLI creates them on CPU).
        """
        from simulators import lensing
        from simulators.lightcone import Lightcone

        sky, bins, kind = self.sky(), self.bins(), self.simulation.kind
        n_chi = self.simulation.n_chi
        maps_keys, cone_keys = MapsSection.model_fields, LightconeSection.model_fields
        if kind == "gaussian":
            return _wrap("maps", maps_keys, lambda: lensing.GaussianLensing(sky, bins, n_chi))
        if kind == "lognormal":
            return _wrap("maps", maps_keys, lambda: lensing.LognormalLensing(sky, bins, n_chi))
        cls = lensing.PMLensing if kind == "pm" else lensing.LPTLensing
        lc = self.lightcone
        if self.shells.n_shells:
            shells = tuple(cls(cfg, Lightcone(sky, far, chi_min=near, window_margin=lc.window_margin,
                                              compensate=lc.compensate), bins)
                           for cfg, (near, far) in self.shell_configs())
            return _wrap("shells", ShellsSection.model_fields, lambda: lensing.ShellLensing(shells))
        cfg = _wrap("simulation", SimulationSection.model_fields, self.simulation.sim_config)
        cone = _wrap("lightcone", cone_keys, lambda: Lightcone(
            sky, self.chi_max(), observer=lc.observer, randomize=lc.randomize, seed=lc.seed,
            window_margin=lc.window_margin, compensate=lc.compensate))
        return _wrap("lightcone", cone_keys, lambda: cls(cfg, cone, bins))

    def shell_configs(self) -> list:
        """[(SimConfig, (chi_min, chi_max))] of each shell of [shells] (empty without it).

        Box i is ``width`` (rounded up to whole cells) across and as deep as the shell seen from
        the field's corner (chi_max - chi_min cos θ_corner), so no point of the shell is held
        twice; its run goes from a_init to the fiducial scale factor of its near edge plus
        ``a_margin`` (capped at 1), in steps of [simulation]'s size in a.
        """
        if not self.shells.n_shells:
            return []
        import jax
        import numpy as np

        from simulators import Cosmology, DeviceGrid, SimConfig
        from simulators.cosmology import a_of_chi

        sim, sh = self.simulation, self.shells
        edges = np.asarray(sh.chi_edges, np.float64)
        a_near = np.asarray(jax.jit(a_of_chi)(Cosmology.fiducial(), edges[:-1]))
        cos_corner = math.cos(math.atan(math.sqrt(2) * math.tan(math.radians(self.maps.field_deg) / 2)))
        da = (1.0 - sim.a_init) / sim.n_steps
        out = []
        for i, (near, far) in enumerate(zip(edges[:-1], edges[1:])):
            cell, f = sh.cell[i], sim.mesh_factor
            n_xy = f * math.ceil(sh.width[i] / cell / f - 1e-9)
            depth = far - near * cos_corner
            n_z = f * math.ceil(depth / cell / f - 1e-9)
            a_final = 1.0 if near == 0 else min(1.0, float(a_near[i]) + sh.a_margin)
            if a_final <= sim.a_init:
                _fail("shells.chi_edges", f"shell {i} starts at chi = {near:g} Mpc/h, beyond "
                                          f"chi(a_init = {sim.a_init:g}): lower simulation.a_init")
            n_steps = max(1, math.ceil((a_final - sim.a_init) / da - 1e-9))
            cfg = _wrap("shells", ShellsSection.model_fields, lambda: SimConfig(
                mesh_shape=(n_xy, n_xy, n_z), box_size=(n_xy * cell, n_xy * cell, depth),
                mesh_factor=f, a_init=sim.a_init, a_final=a_final, n_steps=n_steps,
                lpt_order=sim.lpt_order, deconvolve=sim.deconvolve, gradient=sim.gradient,
                dtype=sim.dtype, grid=DeviceGrid((1, 1), halo=sim.halo)))
            out.append((cfg, (float(near), float(far))))
        return out

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The configuration as a TOML-ready dict (normalised; unset keys left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        """TOML text that ``load_config`` reads back into an equal configuration."""
        return dumps_toml(self.to_dict())

    def replace(self, **changes) -> "ExperimentConfig":
        """A copy with top-level keys (name, seed) or whole sections replaced by values that are
        already valid, without validating again (cheap: for cache keys and provenance)."""
        copy = self.model_copy(update=changes)
        if "sources" in changes:
            copy.__dict__.pop("_bins", None)  # the cached bins were those of the old sources
        return copy

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


SECTIONS: dict[str, type] = {k: f.annotation for k, f in ExperimentConfig.model_fields.items()
                             if isinstance(f.annotation, type) and issubclass(f.annotation, _Section)}
TOP_LEVEL = tuple(k for k in ExperimentConfig.model_fields if k not in SECTIONS)


def _keys(cls) -> tuple[str, ...]:
    """The keys of a section model, in file order."""
    return tuple(cls.model_fields)


# ---- errors: pydantic's, and the simulators', in the form "<dotted.key>: <problem>" --------------

def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if not close:  # also catch case slips like omega_c -> Omega_c
        close = [o for o in options if o.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _message(error: dict, within: tuple[str, ...] = ()) -> str:
    """One pydantic error (``ValidationError.errors()`` item) as ``<dotted.key>: <problem>``;
    ``within``: the section of a section model validated on its own."""
    loc = within + tuple(str(p) for p in error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a rule that names its key in full
        return str(cause)
    if error["type"] == "extra_forbidden":
        return _unknown(loc, error["input"])
    problem = str(cause) if cause is not None else error["msg"][:1].lower() + error["msg"][1:]
    return f"{'.'.join(loc) or 'config'}: {problem}"


def _config_error(error: ValidationError, model: type) -> ConfigError:
    """The first problem of a validation of ``model`` (a section or the whole configuration)."""
    within = tuple(name for name, cls in SECTIONS.items() if cls is model)
    return ConfigError(_message(error.errors()[0], within))


def _unknown(loc: tuple[str, ...], value) -> str:
    """An unknown section or key, with the closest valid name."""
    *parents, name = loc
    if not parents:
        if isinstance(value, Mapping):
            return (f"[{name}]: unknown section{_suggest(name, SECTIONS)}; valid sections: "
                    f"{', '.join(SECTIONS)}")
        return (f"{name}: unknown key{_suggest(name, [*TOP_LEVEL, *SECTIONS])}; valid top-level "
                f"keys: {', '.join(TOP_LEVEL)} (and the sections {', '.join(SECTIONS)})")
    valid = _keys(SECTIONS[parents[0]])
    return f"{'.'.join(loc)}: unknown key{_suggest(name, valid)}; valid keys: {', '.join(valid)}"


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


def validate_section(name: str, values: Mapping):
    """The section model of ``values``, validated as loading would: for a library class that takes
    a section's keys (``explicit.HMCSettings``), so that a key has one validation. Raises
    ConfigError ``<section>.<key>: <problem>``."""
    return SECTIONS[name].model_validate(values)


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


def _field(dotted: str):
    """The model field of a dotted key (``hmc.num_samples``), or None if there is none."""
    section, _, leaf = dotted.rpartition(".")
    model = SECTIONS.get(section) if section else ExperimentConfig
    return model.model_fields.get(leaf) if model is not None else None


def parse_overrides(items) -> dict[str, Any]:
    """``["hmc.num_samples=2000", "compare.methods=['hmc']"]`` -> ``{"hmc.num_samples": 2000, ...}``
    for ``ExperimentConfig.with_``: each value is a TOML literal, a bare word a string; a key that
    takes a string keeps the text as written (``name=2024``). Raises ConfigError on an item
    without ``KEY=``; ``with_`` validates the keys and values."""
    out = {}
    for item in items:
        k, sep, value = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. hmc.num_samples=2000")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()
        if _takes_text(_field(k)) and not isinstance(parsed, str):
            parsed = value.strip()
        out[k] = parsed
    return out


def _takes_text(field) -> bool:
    """A field whose value is a string (optionally None), such as ``name`` or a file name."""
    if field is None:
        return False
    t = field.annotation
    return t is str or (get_origin(t) in (Union, UnionType) and str in get_args(t))


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
    """Validate with the models; the first problem becomes the one-line ConfigError."""
    data = {"name": default_name, **data}
    cfg = ExperimentConfig.model_validate(data, context={"base_dir": base})
    cfg._path = where
    return cfg


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
    """TOML text of a dict of scalars, lists and one level of tables (``ExperimentConfig.to_dict``
    gives one in the models' key order)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    # one level of [tables]; deeper mappings are written as inline tables
    for k, table in data.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_toml_key(k)}]"]
            lines += [f"{_toml_key(kk)} = {_toml_value(v)}" for kk, v in table.items()]
    return "\n".join(lines) + "\n"


def _document() -> None:
    """Append the generated key reference to this module's docstring (``help()`` shows it)."""
    from .configdoc import schema_text

    global __doc__
    __doc__ += "\n" + schema_text()


_document()
