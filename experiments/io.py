"""Run files: one HDF5 file per simulation.

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

Files are written to a temporary file in the target directory and renamed into place, so an
interrupted run never leaves a partial file under the requested name.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

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
    import jax  # provenance only; the caller has run a simulation so jax is already loaded

    from importlib.metadata import PackageNotFoundError, version

    try:
        lb_version = version("lensbench")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        lb_version = "unknown"

    path = Path(path)
    cfg = result.cfg
    dtype = np.dtype(cfg.dtype)
    config = config_dict(cfg)
    cosmology = cosmology_dict(cosmo)
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lensbench_version": lb_version,
        "jax_version": jax.__version__,
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

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("density", data=np.asarray(result.density, dtype=dtype))
            f.create_dataset("positions", data=np.asarray(result.positions, dtype=dtype).reshape(-1, 3))
            f.create_dataset("linear", data=np.asarray(result.linear, dtype=dtype))
            f["density"].attrs["description"] = "final density 1 + delta on the force mesh"
            f["positions"].attrs["units"] = "Mpc/h"
            f["linear"].attrs["description"] = "linear overdensity at z = 0 on the particle grid"
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def read_run(path) -> RunFile:
    """Read a run file written by ``write_run``.

    Raises:
      OSError if the file cannot be opened as HDF5; ValueError if it is not a lensbench run file.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise OSError(f"cannot read {path} as HDF5: {e}") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lensbench run file (no format={FORMAT!r} attribute)")
        missing = [name for name in DATASETS if name not in f]
        if missing:
            raise ValueError(f"{path} is not a complete lensbench run file: missing {', '.join(missing)}")
        data = {name: f[name][()] for name in DATASETS}
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else
                     v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    try:
        config = json.loads(attrs["config_json"])
        cosmology = json.loads(attrs["cosmology_json"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has no readable configuration attributes: {e}") from None
    return RunFile(path=path, attrs=attrs, config=config, cosmology_params=cosmology, **data)


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
