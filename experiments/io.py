"""lensbench's HDF5 files: run files (``lensbench simulate``) and map files (``lensbench maps``).

Both are written by ``experiments.files`` (atomically: an interrupted run never leaves a partial
file under the requested name; outputs that are not regular files are refused).

Run files
---------
Layout (format ``lensbench.run``, version 1):

  /density    (nx, ny, nz)    final density 1 + δ on the force mesh (the run's dtype, float32 by default)
  /positions  (N, 3)          final particle positions in Mpc/h, wrapped into the box
  /linear     (npx, npy, npz) linear overdensity δ_L at z = 0 on the particle grid, as used

Root attributes hold everything needed to reproduce the run, as scalars, strings or short numeric
arrays: the cosmology (``Omega_c``, ``Omega_b``, ``h``, ``n_s``, ``sigma8``, ``w0``, ``wa``), the
configuration (``mesh_shape``, ``box_size``, ``mesh_factor``, ``a_init``, ``a_final``, ``n_steps``,
``lpt_order``, ``dtype``, ``pdims``, ``halo``, ...), the initial conditions (``seed`` or
``ic_file``; ``seed`` is -1 when the field came from a file), on sharded runs the largest x/y
particle displacement in mesh cells (``max_displacement_cells``, checked against the halo), and
provenance (``format``, ``format_version``, ``lensbench_version``, ``jax_version``).
``config_json`` and ``cosmology_json`` repeat the configuration and cosmology as JSON strings.

Map files
---------
Layout (format ``lensbench.maps``, version 1; the schema is ``MAP_DATASETS`` / ``MAP_ATTRS``):

  /kappa        (n_bins, npix, npix) flat sky, or (n_bins, 12 nside²) HEALPix (RING): noise-free
                Born convergence, float64
  /kappa_noisy  same shape: kappa plus Gaussian shape noise of rms sigma_n per pixel
  /nz           (n_bins, n_z) normalised source redshift distributions n_i(z), 1/redshift
  /z            (n_z,) redshifts of the nz table
  /sigma_n      (n_bins,) per-pixel shape-noise rms, sigma_e / sqrt(n_gal A_pix)
  /n_gal        (n_bins,) galaxy densities, gal/arcmin²
  /ell_edges    (n_ell + 1,) the C_ell bin edges of the configuration's [cl] section

Root attributes: ``config_toml`` (the whole experiment configuration as TOML text, with the seed
and device grid actually used; ``experiments.config.load_config_text`` reads it back), the
cosmology (``Omega_c`` ... ``wa``), the sky geometry (``sky`` = "flat" or "healpix";
``field_deg`` and ``npix``, or ``nside``; ``pixel_area_sr``), the map model (``kind``), the
lightcone (``chi_max`` in Mpc/h, ``observer``), the sources (``n_bins``, ``sigma_e``), ``seed``,
``name``, and provenance (``format``, ``format_version``, ``lensbench_version``, ``jax_version``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .files import atomic_h5, atomic_write, ensure_space

FORMAT = "lensbench.run"
FORMAT_VERSION = 1
DATASETS = ("density", "positions", "linear")
COSMOLOGY_KEYS = ("Omega_c", "Omega_b", "h", "n_s", "sigma8", "w0", "wa")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def config_dict(cfg) -> dict:
    """A ``SimConfig`` as a JSON-friendly dict (device grid flattened into pdims/halo/backend)."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "grid":
            out.update(pdims=list(value.pdims), halo=value.halo, backend=value.backend)
        else:
            out[f.name] = _jsonable(value)
    out["particle_shape"] = list(cfg.particle_shape)
    return out


def cosmology_dict(cosmo) -> dict:
    return {k: float(getattr(cosmo, k)) for k in COSMOLOGY_KEYS}


def _attr_value(value):
    """HDF5 cannot store None; lists become numeric arrays."""
    if isinstance(value, list):
        return np.asarray(value)
    return value


def _provenance() -> dict:
    import jax  # the caller has run a simulation, so jax is already loaded

    from importlib.metadata import PackageNotFoundError, version

    try:
        lb_version = version("lensbench")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        lb_version = "unknown"
    return {"lensbench_version": lb_version, "jax_version": jax.__version__}


def write_run(path, result, cosmo, *, seed: int | None = None, ic_file: str | None = None) -> Path:
    """Write a ``SimResult`` (and the cosmology it was run with) to ``path`` atomically.

    Args:
      result: ``simulators.SimResult``.
      cosmo: the ``Cosmology`` of the run.
      seed: white-noise seed, if the linear field came from one.
      ic_file: path of the linear field, if it was read from a file.
    Returns:
      the final path.
    """
    path = Path(path)
    cfg = result.cfg
    dtype = np.dtype(cfg.dtype)
    config = config_dict(cfg)
    cosmology = cosmology_dict(cosmo)
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_provenance(),
        **cosmology,
        **{k: v for k, v in config.items() if v is not None and v != []},
        "seed": -1 if seed is None else int(seed),
        "ic_file": "" if ic_file is None else str(ic_file),
        "n_particles": int(cfg.n_particles),
        "config_json": json.dumps(config),
        "cosmology_json": json.dumps(cosmology),
    }
    if cfg.grid.sharded:  # only measured on a sharded grid (halo check); 0 otherwise
        attrs["max_displacement_cells"] = float(result.max_displacement)

    return _write_h5(path, attrs, {
        "density": (np.asarray(result.density, dtype=dtype),
                    {"description": "final density 1 + delta on the force mesh"}),
        "positions": (np.asarray(result.positions, dtype=dtype).reshape(-1, 3), {"units": "Mpc/h"}),
        "linear": (np.asarray(result.linear, dtype=dtype),
                   {"description": "linear overdensity at z = 0 on the particle grid"}),
    })


def _write_h5(path: Path, attrs: dict, datasets: dict) -> Path:
    """Write datasets {name: (array, {attribute: value})} and file attributes atomically."""
    with atomic_h5(path) as f:
        for name, (array, ds_attrs) in datasets.items():
            f.create_dataset(name, data=array)
            for key, value in ds_attrs.items():
                f[name].attrs[key] = value
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)
    return path


@dataclass
class RunFile:
    """Contents of a run file (all arrays loaded into memory)."""

    path: Path
    density: np.ndarray
    positions: np.ndarray
    linear: np.ndarray
    attrs: dict
    config: dict
    cosmology_params: dict

    @property
    def box_size(self) -> tuple[float, float, float]:
        return tuple(float(b) for b in self.config["box_size"])

    def cosmology(self):
        """The run's ``simulators.Cosmology`` (imports JAX)."""
        from simulators import Cosmology

        return Cosmology(**self.cosmology_params)


_KINDS = {FORMAT: "a run file (lensbench simulate)",
          "lensbench.maps": "a map file (lensbench maps)",
          "lensbench.sims": "a training set (lensbench generate)",
          "lensbench.samples": "a posterior-samples file"}


def _h5_reason(err: OSError) -> str:
    """HDF5's long open error in a few words."""
    text = str(err)
    for pattern, reason in (("truncated file", "the file is truncated (an interrupted copy or write?)"),
                            ("file signature not found", "it is not an HDF5 file"),
                            ("No such file", "no such file"),
                            ("Permission denied", "permission denied"),
                            ("unable to lock file", "another process holds it open for writing")):
        if pattern in text:
            return reason
    return " ".join(text.split())


def open_h5(path, kind: str) -> h5py.File:
    """``h5py.File(path, "r")``; an OSError naming the file and the ``kind`` of file expected
    (e.g. "map file") when it cannot be opened."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot read {path} as a {kind}: it is a directory")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise OSError(f"cannot read {path} as a {kind} (HDF5): {_h5_reason(e)}") from None


def _read_h5(path: Path, fmt: str, kind: str, datasets, required_attrs=()):
    """Open a lensbench HDF5 file of format ``fmt``; returns ({dataset: array}, {attr: value}).

    Raises OSError if it is not HDF5, ValueError if it is another kind of file or incomplete.
    """
    with open_h5(path, f"lensbench {kind} file") as f:
        found = f.attrs.get("format")
        if found != fmt:
            what = (f"{_KINDS[found]}, not a {kind} file" if found in _KINDS
                    else f"not a lensbench {kind} file (no format={fmt!r} attribute)")
            raise ValueError(f"{path} is {what}")
        missing = [n for n in datasets if n not in f] + [a for a in required_attrs if a not in f.attrs]
        if missing:
            raise ValueError(f"{path} is not a complete lensbench {kind} file: missing {', '.join(missing)}")
        data = {name: np.asarray(f[name][()]) for name in datasets}
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else
                     v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return data, attrs


def read_run(path) -> RunFile:
    """Read a run file written by ``write_run``.

    Raises:
      OSError if the file cannot be opened as HDF5; ValueError if it is not a lensbench run file.
    """
    path = Path(path)
    data, attrs = _read_h5(path, FORMAT, "run", DATASETS)
    try:
        config = json.loads(attrs["config_json"])
        cosmology = json.loads(attrs["cosmology_json"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has no readable configuration attributes: {e}") from None
    return RunFile(path=path, attrs=attrs, config=config, cosmology_params=cosmology, **data)


# ---- map files ----------------------------------------------------------------------------------

MAP_FORMAT = "lensbench.maps"
MAP_FORMAT_VERSION = 1
# dataset -> description (stored as its "description" attribute)
MAP_DATASETS = {
    "kappa": "noise-free Born convergence, (n_bins, npix, npix) flat or (n_bins, 12 nside^2) HEALPix RING",
    "kappa_noisy": "kappa plus Gaussian shape noise of rms sigma_n per pixel",
    "nz": "normalised source redshift distributions n_i(z), (n_bins, n_z)",
    "z": "redshifts of the nz table, (n_z,)",
    "sigma_n": "per-pixel shape-noise rms sigma_e / sqrt(n_gal A_pix), (n_bins,)",
    "n_gal": "galaxy density per bin, gal/arcmin^2, (n_bins,)",
    "ell_edges": "C_ell bin edges of the configuration's [cl] section, (n_ell + 1,)",
}
# attributes every map file has (flat maps add field_deg and npix, HEALPix maps nside)
MAP_ATTRS = ("format", "format_version", "lensbench_version", "jax_version", "name", "seed",
             "config_toml", *COSMOLOGY_KEYS, "kind", "sky", "pixel_area_sr", "n_bins", "sigma_e")


def write_maps(path, maps, config, bins, *, chi_max: float | None = None,
               observer=None) -> Path:
    """Write one realisation of tomographic κ maps atomically (layout: module docstring).

    Args:
      maps: ``simulators.lensing.Maps`` (kappa, kappa_noisy, sigma_n).
      config: the ``experiments.config.ExperimentConfig`` that made them (its seed is the maps').
      bins: the ``RedshiftBins`` used.
      chi_max, observer: the resolved lightcone depth (Mpc/h) and observer position (3-D models).
    Returns: the final path.
    """
    path = Path(path)
    sky = config.maps
    kappa = np.asarray(maps.kappa, np.float64)
    expected = (bins.n_bins, sky.npix, sky.npix) if sky.sky == "flat" else (bins.n_bins, 12 * sky.nside**2)
    if kappa.shape != expected or np.shape(maps.kappa_noisy) != expected:
        raise ValueError(f"maps have shape {kappa.shape} / {np.shape(maps.kappa_noisy)}, expected "
                         f"{expected} for this configuration")
    attrs = {
        "format": MAP_FORMAT,
        "format_version": MAP_FORMAT_VERSION,
        **_provenance(),
        "name": config.name,
        "seed": int(config.seed),
        "config_toml": config.to_toml(),
        **{k: float(v) for k, v in config.cosmology_params().items()},
        "kind": config.simulation.kind,
        "sky": sky.sky,
        **({"field_deg": float(sky.field_deg), "npix": int(sky.npix)} if sky.sky == "flat"
           else {"nside": int(sky.nside)}),
        "pixel_area_sr": float(sky.pixel_area),
        "n_bins": int(bins.n_bins),
        "sigma_e": float(bins.sigma_e),
    }
    scales = config.scales.ranges(bins.n_bins)
    if scales is not None:  # the validated multipoles per bin ([scales]); inf: not limited
        attrs["scales_ell_min"] = np.asarray(scales[0], np.float64)
        attrs["scales_ell_max"] = np.asarray(scales[1], np.float64)
    if chi_max is not None:
        attrs["chi_max"] = float(chi_max)
    if observer is not None:
        attrs["observer"] = np.asarray(observer, np.float64)
    data = {
        "kappa": kappa,
        "kappa_noisy": np.asarray(maps.kappa_noisy, np.float64),
        "nz": np.asarray(bins.nz, np.float64),
        "z": np.asarray(bins.z, np.float64),
        "sigma_n": np.asarray(maps.sigma_n, np.float64).reshape(-1),
        "n_gal": np.asarray(bins.n_gal, np.float64).reshape(-1),
        "ell_edges": np.asarray(config.ell_edges(), np.float64),
    }
    return _write_h5(path, attrs, {name: (data[name], {"description": description})
                                   for name, description in MAP_DATASETS.items()})


def write_healpix_fits(path, maps, bins) -> Path:
    """HEALPix maps (RING) to a FITS table with healpy: columns KAPPA_i then KAPPA_NOISY_i."""
    import healpy

    kappa = np.asarray(maps.kappa)
    if kappa.ndim != 2:
        raise ValueError("--fits needs HEALPix maps (maps.sky = 'healpix'); these are flat-sky maps")
    n = bins.n_bins
    names = [f"KAPPA_{i + 1}" for i in range(n)] + [f"KAPPA_NOISY_{i + 1}" for i in range(n)]
    data = np.concatenate([kappa, np.asarray(maps.kappa_noisy)])
    ensure_space(path, data.nbytes)
    return atomic_write(path, lambda tmp: healpy.write_map(
        str(tmp), data, nest=False, column_names=names, overwrite=True, dtype=np.float64))


@dataclass
class MapFile:
    """Contents of a map file (all arrays loaded into memory); see the module docstring."""

    path: Path
    kappa: np.ndarray
    kappa_noisy: np.ndarray
    nz: np.ndarray
    z: np.ndarray
    sigma_n: np.ndarray
    n_gal: np.ndarray
    ell_edges: np.ndarray
    attrs: dict

    @property
    def sky(self) -> str:
        return self.attrs["sky"]

    @property
    def n_bins(self) -> int:
        return int(self.kappa.shape[0])

    @property
    def pixel_area(self) -> float:
        """Pixel solid angle, steradians."""
        return float(self.attrs["pixel_area_sr"])

    @property
    def config_toml(self) -> str:
        return self.attrs["config_toml"]

    def config(self):
        """The ``ExperimentConfig`` that made the maps (re-validated: n(z) files must still exist)."""
        from .config import load_config_text

        return load_config_text(self.config_toml, where=f"{self.path} (config_toml)")

    def cosmology(self):
        """The maps' ``simulators.Cosmology`` (imports JAX)."""
        from simulators import Cosmology

        return Cosmology(**{k: float(self.attrs[k]) for k in COSMOLOGY_KEYS})

    def bins(self):
        """The ``RedshiftBins`` of the maps, from the stored n(z) (imports JAX)."""
        from simulators.sources import RedshiftBins

        return RedshiftBins(z=self.z, nz=self.nz, n_gal=self.n_gal, sigma_e=float(self.attrs["sigma_e"]))


def read_maps(path) -> MapFile:
    """Read a map file written by ``write_maps``.

    Raises:
      OSError if the file cannot be opened as HDF5; ValueError if it is not a complete,
      consistent lensbench map file.
    """
    path = Path(path)
    data, attrs = _read_h5(path, MAP_FORMAT, "map", MAP_DATASETS, MAP_ATTRS)
    kappa = data["kappa"]
    n = kappa.shape[0] if kappa.ndim >= 2 else -1
    if attrs["sky"] == "flat":
        npix = int(attrs.get("npix", -1))
        expected = (n, npix, npix)
    else:
        nside = int(attrs.get("nside", -1))
        expected = (n, 12 * nside**2)
    problems = []
    if kappa.shape != expected or data["kappa_noisy"].shape != expected:
        problems.append(f"kappa {kappa.shape} / kappa_noisy {data['kappa_noisy'].shape}, expected "
                        f"{expected} for a {attrs['sky']} sky")
    if data["nz"].shape != (n, data["z"].shape[0]):
        problems.append(f"nz {data['nz'].shape} vs z {data['z'].shape} and {n} bins")
    if data["sigma_n"].shape != (n,) or data["n_gal"].shape != (n,):
        problems.append(f"sigma_n {data['sigma_n'].shape} / n_gal {data['n_gal'].shape} vs {n} bins")
    if problems:
        raise ValueError(f"{path} is an inconsistent map file: {'; '.join(problems)}")
    return MapFile(path=path, attrs=attrs, **data)


def load_linear(path) -> np.ndarray:
    """A linear field from a ``.npy`` file, or the ``linear`` dataset of a run file (``.h5``)."""
    path = Path(path)
    if not path.is_file():
        raise OSError(f"initial-conditions file {path} does not exist or is not a file")
    if path.suffix.lower() in (".h5", ".hdf5"):
        return read_run(path).linear
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{path} is not a .npy file (expected a NumPy array saved with numpy.save, "
                         f"or a lensbench run file ending in .h5)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a .npy array: {e}") from None
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) \
            or np.iscomplexobj(arr):
        raise ValueError(f"{path} must hold a real numeric array, got {getattr(arr, 'dtype', type(arr))}")
    return arr


# ---- posterior samples ---------------------------------------------------------------------------

SAMPLES_FORMAT = "lensbench.samples"
SAMPLES_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Samples:
    """Posterior samples of one method (the one format every method writes).

    samples: (n, d) float64, in the units of the parameters ``names`` (Cosmology field names);
    chain: (n,) int chain index of each sample (0 for independent samples, e.g. NPE);
    method: "npe_vmim", "cl_analytic", "hmc", ...; truth: (d,) true values when known, else None;
    info: JSON-able dict (wall time, simulation/gradient budget, diagnostics, inputs' paths);
    config_toml: the experiment configuration ("" when none).
    """

    samples: np.ndarray
    names: tuple[str, ...]
    method: str
    chain: np.ndarray | None = None
    truth: np.ndarray | None = None
    info: dict | None = None
    config_toml: str = ""

    def __post_init__(self):
        s = np.asarray(self.samples, np.float64)
        if s.ndim != 2 or s.shape[1] != len(self.names):
            raise ValueError(f"samples must have shape (n, {len(self.names)}) for parameters "
                             f"{', '.join(self.names)}, got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{int((~np.isfinite(s)).any(axis=1).sum())} of {len(s)} posterior "
                             f"samples of {self.method!r} contain NaN or inf")
        object.__setattr__(self, "samples", s)
        object.__setattr__(self, "names", tuple(self.names))
        chain = np.zeros(len(s), np.int64) if self.chain is None else np.asarray(self.chain, np.int64)
        if chain.shape != (len(s),):
            raise ValueError(f"chain must have shape ({len(s)},), got {chain.shape}")
        object.__setattr__(self, "chain", chain)
        if self.truth is not None:
            truth = np.asarray(self.truth, np.float64)
            if truth.shape != (len(self.names),):
                raise ValueError(f"truth must have shape ({len(self.names)},), got {truth.shape}")
            object.__setattr__(self, "truth", truth)
        object.__setattr__(self, "info", dict(self.info or {}))

    def column(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"parameter {name!r} is not in these samples ({', '.join(self.names)})")
        return self.samples[:, self.names.index(name)]


def write_samples(path, samples: Samples) -> Path:
    """Write posterior samples to HDF5 (format ``lensbench.samples`` v1), atomically.

    Layout: /samples (n, d) float64 with a ``names`` attribute; /chain (n,) int64; /truth (d,)
    when known. Root attributes: ``names`` (JSON list), ``method``, ``info_json``,
    ``config_toml`` and provenance.
    """
    path = Path(path)
    datasets = {"samples": (samples.samples, {"names": json.dumps(list(samples.names))}),
                "chain": (samples.chain, {})}
    if samples.truth is not None:
        datasets["truth"] = (samples.truth, {})
    attrs = {"format": SAMPLES_FORMAT, "format_version": SAMPLES_FORMAT_VERSION,
             "names": json.dumps(list(samples.names)), "method": samples.method,
             "info_json": json.dumps(_jsonable_tree(samples.info)),
             "config_toml": samples.config_toml, **_provenance()}
    return _write_h5(path, attrs, datasets)


def read_samples(path) -> Samples:
    """Read a samples file written by ``write_samples``.

    Raises FileNotFoundError for a missing file, OSError if it is not HDF5, ValueError if it is
    not a lensbench samples file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"posterior-samples file {path} does not exist")
    data, attrs = _read_h5(path, SAMPLES_FORMAT, "posterior-samples", ("samples", "chain"),
                           ("names", "method"))
    with h5py.File(path, "r") as f:
        truth = np.asarray(f["truth"][()]) if "truth" in f else None
    try:
        names = tuple(json.loads(attrs["names"]))
        info = json.loads(attrs.get("info_json", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable names/info attributes ({e})") from None
    return Samples(data["samples"], names, attrs["method"], chain=data["chain"], truth=truth,
                   info=info, config_toml=attrs.get("config_toml", ""))


# What defines a posterior's target besides [prior]: the maps' model and scales. The device
# layout (pdims, halo) and the gradient mode give the same posterior and are left out. Shared by
# the HMC run's provenance digest (``pipeline._hmc_provenance``) and ``observation_mismatch``.
MODEL_SECTIONS = ("cosmology", "simulation", "lightcone", "shells", "maps", "sources", "scales")
LAYOUT_KEYS = ("pdims", "halo", "gradient")


def observation_mismatch(samples: Samples, cfg) -> str | None:
    """The first configuration key in which the configuration a posterior samples file was drawn
    with differs from ``cfg`` (the observation's seed and file, ``MODEL_SECTIONS`` less
    ``LAYOUT_KEYS``, [prior]), i.e. why it is a posterior of another target; None when they
    agree. A file without its configuration gives "config_toml". An observation read from a
    file (``compare.observation``) is matched by its path: the check cannot see inside it."""
    from .config import load_config_text

    if not samples.config_toml:
        return "config_toml"
    theirs = load_config_text(samples.config_toml)
    if theirs.compare.observation != cfg.compare.observation:
        return "compare.observation"
    for key in ("seed", *MODEL_SECTIONS, "prior"):
        a, b = getattr(theirs, key, None), getattr(cfg, key, None)
        if key == "simulation":
            a, b = a.model_dump(exclude=set(LAYOUT_KEYS)), b.model_dump(exclude=set(LAYOUT_KEYS))
        if a != b:
            return key
    return None


def _jsonable_tree(value):
    """Nested dicts/lists of numpy values -> plain JSON types (non-finite floats -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable_tree(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable_tree(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
