"""Training sets of simulated (θ, κ) pairs: ``generate`` writes them, ``read_sims`` reads them.

    from experiments.config import load_config
    from experiments.priors import lsst_y10
    from experiments.dataset import generate, read_sims

    cfg = load_config("quick")
    report = generate(cfg, lsst_y10().select(["Omega_c", "sigma8"]), 1000, "sims.h5")
    sims = read_sims("sims.h5")             # the ok simulations: sims.theta, sims.kappa, ...

Each simulation i draws θ_i from the prior and the latent field of the map model (white noise of
the initial conditions, or of the Gaussian/lognormal field) from its own key,

    key_i = fold_in(key(seed), i);   (θ-key, latent-key) = split(key_i)
    θ_i = prior.sample(θ-key);       latent_i = model.latent(latent-key)

so simulation i is the same whatever the batch size, the number of devices, or where a run was
interrupted and resumed. κ maps are stored noise-free; trainers add Gaussian shape noise of rms
``sigma_n`` (per bin and pixel) on the fly.

Execution
---------
Simulations run in batches, ``jax.vmap`` of ``model.kappa`` over (θ, latent), compiled once.
  * Unsharded model (``simulation.pdims = "1x1"``, and the Gaussian / lognormal kinds): data
    parallel. The batch axis is split over all of ``jax.devices()`` with ``jax.shard_map`` on a
    1-D mesh; each device vmaps over its share. A batch that is not a multiple of the device count
    is padded up to one; the padding simulations are computed and thrown away.
  * Sharded model (pdims ≠ 1x1): the model already spreads each simulation over its device grid,
    so simulations run one at a time through the sharded simulator (jit, no vmap). PM runs check
    the halo after each simulation; one whose particles outran the halo is marked failed.

Work is done in chunks of ``batch_size`` consecutive simulations (chunk c is rows
[c·batch_size, (c+1)·batch_size)); each chunk is written and flushed as soon as it is done, its
``status`` last, so after an interruption a chunk is either complete on disk or redone. Rerunning
``generate`` on the same file resumes: chunks whose rows all have a nonzero status are skipped and
the others are simulated again, giving a file bitwise identical to an uninterrupted run (the
resumed run takes the file's batch size; one and two CPU devices gave bitwise identical files for
the Gaussian and PM models, while a sharded PM model differs from an unsharded one by float32
round-off, ~1e-6 relative).

A simulation fails when its maps (or θ) are not finite, or when it raised an error (a halo
overflow, or an error that only some simulations of a batch hit: the batch is then retried one
simulation at a time). Failed rows get status 2, are counted in the report and a warning, and are
left out by ``read_sims``. If every simulation of a chunk raises, the error is re-raised instead
(a systematic problem, not a bad draw): the chunk stays pending and a rerun retries it.

Parts
-----
A training set too large for one machine is made in parts: ``generate(..., part=(I, N))``
(``lensbench generate --part I/N``) simulates only the simulations [start, stop) of part I of N
(``Part``: a contiguous, balanced split of range(n), 1-based) into a file of its own, resumable
like a whole one. Each of them is the whole run's simulation, bitwise: its θ and latent come from
its index's key, and its arithmetic does not depend on the batch or chunk it runs in (a part's
chunks start at its first simulation, so they are not the whole run's chunks; batch sizes 1-4 on
2, 3 and 7 parts gave the whole run's file bit for bit on CPU). ``merge_parts``
(``lensbench merge``) checks that its files are every part, once, of one split of one run (the
identity a resume compares), all finished, and copies them in blocks into the file that one
``generate`` of all n simulations writes.

The parts never communicate: each is an independent process (a SLURM array task, or one task of
an ``srun`` step with ``--part $((SLURM_PROCID + 1))/$SLURM_NTASKS``), each on its own devices.
``lensbench generate`` never starts jax.distributed; a program that has started it must not call
``generate(part=...)`` in each process, because the data-parallel batches span ``jax.devices()``,
which then are every process's devices.

Sims files
----------
Layout (format ``lensbench.sims``, version 1; the schema is ``SIMS_DATASETS`` / ``SIMS_ATTRS``):

  /theta    (n, d) float64: θ_i, columns in the order of ``param_names``; NaN until simulated
  /kappa    (n, n_bins, npix, npix) flat sky, or (n, n_bins, 12 nside²) HEALPix (RING): noise-free
            Born convergence of simulation i, float32; HDF5 chunks of one simulation; rows not
            simulated yet are not written (undefined, zeros on most file systems)
  /status   (n,) int8: 0 = not simulated yet, 1 = ok, 2 = failed (NaN/inf maps or an error)

The datasets are allocated in full when the file is created (all status 0), so later writes
never change the file's structure: a run killed at any point leaves a readable file.

A part file has the same layout with its rows only (row r is simulation ``part_start`` + r), the
whole run's attributes (``n`` is the whole run's), and ``PART_ATTRS``: ``part_index`` I,
``part_count`` N, ``part_start``, ``part_stop``. ``read_sims`` refuses it (merge the parts first).

Root attributes: ``param_names`` (d strings), ``prior`` (the prior as JSON, ``Prior.to_dict()``
layout; ``prior_from_file`` rebuilds it), ``config_toml`` (the whole experiment configuration as
TOML text with the seed used; ``experiments.config.load_config_text`` reads it back), ``seed``,
``n``, ``batch_size`` (simulations per chunk), ``sigma_n`` (n_bins,) per-pixel shape-noise rms
σ_e / sqrt(n_gal A_pix) for the trainers' noise, ``sigma_e``, ``n_bins``, the map model (``kind``
from the configuration and ``model``, its class), the sky geometry (``sky`` = "flat" or
"healpix"; ``field_deg`` and ``npix``, or ``nside``; ``pixel_area_sr``), ``name``, and provenance
(``format``, ``format_version``, ``lensbench_version``, ``jax_version``).

A rerun must describe the same simulations as the file: same ``n``, ``seed``, prior, map model
and the configuration sections that make the maps ([cosmology], [simulation], [lightcone], [maps],
[sources]; ``simulation.pdims`` and ``simulation.halo`` may change, they change the maps by
round-off at most), and the same part (or the whole run). Otherwise ``generate`` raises a
ValueError asking for another output file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import tomllib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .files import (atomic_write, check_new_output, check_not_inputs, check_output,
                    ensure_space)
from .io import _provenance
from .priors import Prior

__all__ = ["FORMAT", "FORMAT_VERSION", "GenerateReport", "MergeReport", "PART_ATTRS", "Part",
           "SIMS_ATTRS", "SIMS_DATASETS", "SimSet", "STATUS_FAILED", "STATUS_OK", "STATUS_PENDING",
           "generate", "merge_parts", "prior_from_file", "prior_simulator", "read_sims"]

FORMAT = "lensbench.sims"
FORMAT_VERSION = 1
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
# dataset -> description (stored as its "description" attribute)
SIMS_DATASETS = {
    "theta": "parameters drawn from the prior, (n, d), columns in the order of param_names; NaN "
             "until simulated",
    "kappa": "noise-free Born convergence, float32, (n, n_bins, npix, npix) flat or "
             "(n, n_bins, 12 nside^2) HEALPix RING",
    "status": "0 = not simulated yet, 1 = ok, 2 = failed (NaN/inf maps or an error), (n,)",
}
# attributes every sims file has (flat maps add field_deg and npix, HEALPix maps nside)
SIMS_ATTRS = ("format", "format_version", "lensbench_version", "jax_version", "name", "seed", "n",
              "batch_size", "param_names", "prior", "config_toml", "kind", "model", "sky",
              "pixel_area_sr", "n_bins", "sigma_e", "sigma_n")
# attributes a part file has in addition (``Part``); a whole file has none of them
PART_ATTRS = ("part_index", "part_count", "part_start", "part_stop")
# the configuration sections that make the maps (compared on resume; the other sections, e.g.
# [cl] or [prior], do not change them: the prior actually used is the ``prior`` attribute) ...
SIMULATION_SECTIONS = ("cosmology", "simulation", "lightcone", "maps", "sources")
# ... less the keys that change them by round-off at most
IGNORED_CONFIG_KEYS = ("simulation.pdims", "simulation.halo")
# test hook: seconds to sleep after each chunk is on disk (lets a test kill a run mid-way)
CHUNK_DELAY_ENV = "LENSBENCH_GENERATE_CHUNK_DELAY"

_OTHER_FORMATS = {"lensbench.run": "a run file (lensbench simulate)",
                  "lensbench.maps": "a map file (lensbench maps)"}
_DEFAULT_PER_DEVICE = {"3d": 4, "2d": 16}  # default batch per device: PM/LPT, Gaussian/lognormal
# rows read or copied at once are limited to about this many bytes (memory stays bounded)
_BLOCK_BYTES = 64 << 20


# ---- parts of a training set --------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count`` of a training set of ``n`` simulations.

    The parts split range(n) into ``count`` contiguous, balanced ranges [start, stop) in order
    (the first n mod count parts have one simulation more, as ``numpy.array_split``). A part file
    holds only its rows (file row r is simulation start + r) and the whole run's identity, so its
    simulations are exactly rows [start, stop) of the whole run's file.
    """

    index: int
    count: int
    n: int

    @classmethod
    def split(cls, n: int, index: int, count: int, *, option: str = "part") -> "Part":
        """The part, validated (ValueError naming ``option``): 1 <= index <= count <= n."""
        for name, value in (("n", n), ("index", index), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{option}: {name} must be an integer, got {value!r}")
        label = f"{option} {index}/{count}"
        if not 1 <= index <= count:
            raise ValueError(f"{label}: the part number must be between 1 and {count}")
        if count > n:
            raise ValueError(f"{label}: {count} parts of {n} simulations would leave parts empty; "
                             f"split into at most {n} parts")
        return cls(int(index), int(count), int(n))

    def _boundary(self, i: int) -> int:
        """The first simulation of the part after the i-th (0 <= i <= count)."""
        q, r = divmod(self.n, self.count)
        return i * q + min(i, r)

    @property
    def start(self) -> int:
        return self._boundary(self.index - 1)

    @property
    def stop(self) -> int:
        return self._boundary(self.index)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def describe(self) -> str:
        """E.g. "part 2/3 (simulations 4-6 of 10)"."""
        return f"part {self.label} (simulations {self.start}-{self.stop - 1} of {self.n})"

    def attrs(self) -> dict:
        """The ``PART_ATTRS`` of its file (start and stop stored for readers, checked on open)."""
        return dict(zip(PART_ATTRS, (self.index, self.count, self.start, self.stop)))

    @classmethod
    def from_attrs(cls, path: Path, attrs) -> "Part | None":
        """The part a file's attributes describe; None for a whole file. ValueError if they are
        incomplete or do not agree with ``n``."""
        found = [k for k in PART_ATTRS if k in attrs]
        if not found:
            return None
        try:
            if len(found) < len(PART_ATTRS):
                raise ValueError
            index, count, start, stop = (int(attrs[k]) for k in PART_ATTRS)
            part = cls.split(int(attrs["n"]), index, count)
            if (start, stop) != (part.start, part.stop):
                raise ValueError
        except (ValueError, TypeError):
            given = ", ".join(f"{k} = {attrs[k]}" if k in attrs else f"no {k}" for k in PART_ATTRS)
            raise ValueError(f"{path} is an inconsistent part file: {given} for n = "
                             f"{attrs.get('n')}") from None
        return part


def _part_label(part: "Part | None") -> str:
    """How a file's part reads in messages: "part 2/3" or "the whole run"."""
    return "the whole run" if part is None else f"part {part.label}"


# ---- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateReport:
    """What ``generate`` did.

    Attributes:
      path: the sims file.
      n_requested: simulations in the file (``n``, or the part's).
      n_ok, n_failed: simulations with status ok / failed in the file at the end.
      n_resumed: simulations already done (ok or failed) when this call started.
      n_simulated: simulations run by this call.
      n_pending: simulations still not done (0 unless the call was interrupted).
      failed_indices: indices of the failed simulations (whole file; for a part, indices in the
        whole run, i.e. file rows + part.start).
      wall_s: duration of the call, seconds; compile_s: of which compiling.
      sims_per_s: n_simulated / the time of the simulation loop (compilation excluded, file
        writes included); 0 if none ran.
      batch_size: simulations per chunk; n_devices: devices used; mode: "data-parallel" or
        "sharded" (see the module docstring).
      part: the ``Part`` the file holds, or None for the whole run.
    """

    path: Path
    n_requested: int
    n_ok: int
    n_failed: int
    n_resumed: int
    n_simulated: int
    n_pending: int
    failed_indices: tuple[int, ...]
    wall_s: float
    compile_s: float
    sims_per_s: float
    batch_size: int
    n_devices: int
    mode: str
    part: Part | None = None

    def summary(self) -> str:
        """One line for the user."""
        resumed = f", {self.n_resumed} already done" if self.n_resumed else ""
        part = "" if self.part is None else f", {self.part.describe()}"
        return (f"{self.path}{part}: {self.n_ok} ok, {self.n_failed} failed of {self.n_requested}"
                f"{resumed}; simulated {self.n_simulated} in {self.wall_s:.1f} s "
                f"({self.sims_per_s:.2f} sims/s after {self.compile_s:.1f} s compiling; batch "
                f"{self.batch_size}, {self.n_devices} device{'s' if self.n_devices > 1 else ''}, "
                f"{self.mode})")


@dataclass(frozen=True, eq=False)
class SimSet:
    """Simulations read from a sims file (all arrays in memory).

    Attributes:
      path: the file.
      theta: (m, d) float64 parameters, columns in the order of ``names``.
      kappa: (m, n_bins, *sky shape) float32 noise-free convergence maps.
      indices: (m,) rows of the file these simulations come from.
      status: (m,) their status (all 1, unless read with include_failed=True).
      names: parameter names; sigma_n: (n_bins,) per-pixel shape-noise rms to add in training.
      prior: the prior as a dict (``Prior.to_dict()`` layout; ``build_prior()`` makes the Prior).
      config_toml: the experiment configuration (``config()`` loads it).
      seed: the generation seed; n_failed, n_pending: failed and not-yet-simulated rows in the file.
      attrs: all root attributes of the file.
    """

    path: Path
    theta: np.ndarray
    kappa: np.ndarray
    indices: np.ndarray
    status: np.ndarray
    names: tuple[str, ...]
    sigma_n: np.ndarray
    prior: dict
    config_toml: str
    seed: int
    n_failed: int
    n_pending: int
    attrs: dict

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def build_prior(self) -> Prior:
        return Prior.from_dict(self.prior)

    def config(self):
        """The ``ExperimentConfig`` of the simulations (re-validated)."""
        from .config import load_config_text

        return load_config_text(self.config_toml, where=f"{self.path} (config_toml)")


# ---- reading ------------------------------------------------------------------------------------

def _attrs_dict(attrs) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode()
        out[k] = v
    return out


def _open_sims(path: Path, mode: str = "r") -> h5py.File:
    """Open and validate the structure of a sims file; the caller closes it."""
    if not path.exists():
        raise FileNotFoundError(f"sims file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        if h5py.is_hdf5(path):  # a lock held by a running generate, or a damaged file
            raise OSError(f"cannot open {path} ({e}); is another lensbench generate writing "
                          f"it?") from None
        raise ValueError(f"{path} is not a lensbench sims file (not HDF5)") from None
    try:
        _check_structure(path, f)
    except BaseException:
        f.close()
        raise
    return f


def _check_structure(path: Path, f: h5py.File) -> None:
    found = f.attrs.get("format")
    if isinstance(found, bytes):
        found = found.decode()
    if found != FORMAT:
        what = (f"{_OTHER_FORMATS[found]}, not a sims file" if found in _OTHER_FORMATS
                else f"not a lensbench sims file (no format={FORMAT!r} attribute)")
        raise ValueError(f"{path} is {what}")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} is a sims file of format version {version}; this lensbench "
                         f"reads version {FORMAT_VERSION}")
    missing = ([d for d in SIMS_DATASETS if d not in f]
               + [a for a in SIMS_ATTRS if a not in f.attrs])
    if missing:
        raise ValueError(f"{path} is not a complete sims file: missing {', '.join(missing)}")
    part = Part.from_attrs(path, f.attrs)
    n, d = int(f.attrs["n"]), len(f.attrs["param_names"])
    rows = n if part is None else part.rows
    shapes = {k: f[k].shape for k in SIMS_DATASETS}
    if (shapes["theta"] != (rows, d) or shapes["status"] != (rows,)
            or shapes["kappa"][:1] != (rows,) or len(shapes["kappa"]) < 3
            or shapes["kappa"][1] != int(f.attrs["n_bins"])):
        of = f"n = {n}" if part is None else f"{part.rows} rows ({part.describe()})"
        raise ValueError(f"{path} is an inconsistent sims file: theta {shapes['theta']}, kappa "
                         f"{shapes['kappa']}, status {shapes['status']} for {of}, "
                         f"{d} parameters and {int(f.attrs['n_bins'])} bins")


def _block_rows(ds: h5py.Dataset) -> int:
    """Rows of ``ds`` (axis 0) in about ``_BLOCK_BYTES``: the unit of bounded-memory reads."""
    return max(1, _BLOCK_BYTES // max(1, ds.dtype.itemsize * math.prod(ds.shape[1:])))


def prior_from_file(path) -> Prior:
    """The ``Prior`` the simulations of a sims file were drawn from."""
    path = Path(path)
    with _open_sims(path) as f:
        text = f.attrs["prior"]
    return Prior.from_dict(json.loads(text))


def read_sims(path, *, include_failed: bool = False) -> SimSet:
    """Read the simulations of a sims file written by ``generate`` (layout: module docstring).

    Only the ok simulations (status 1) are returned, or also the failed ones (status 2, whose maps
    may hold NaN) with include_failed=True; rows not simulated yet are never returned. A file with
    such rows (an unfinished run) is read with a warning, and ``n_pending`` says how many.

    Raises:
      FileNotFoundError if ``path`` does not exist; ValueError if it is not a sims file;
      OSError if it cannot be opened (e.g. a generate run is writing it).
    """
    path = Path(path)
    with _open_sims(path) as f:
        part = Part.from_attrs(path, f.attrs)
        if part is not None:  # its rows are not the whole run's: training on them is a mistake
            raise ValueError(f"{path} is {part.describe()} of a training set, not a whole one: "
                             f"join all {part.count} parts with `lensbench merge PART... --out "
                             f"sims.h5` first")
        attrs = _attrs_dict(f.attrs)
        status = f["status"][()]
        keep = (status == STATUS_OK) | (include_failed & (status == STATUS_FAILED))
        indices = np.flatnonzero(keep)
        theta = f["theta"][()][indices]
        kds = f["kappa"]
        kappa = np.empty((indices.size,) + kds.shape[1:], np.float32)
        block = _block_rows(kds)
        pos = 0
        for start in range(0, status.size, block):  # contiguous reads, at most ~64 MiB each
            rows = keep[start:start + block]
            k = int(rows.sum())
            if k:
                kappa[pos:pos + k] = kds[start:start + rows.size][rows]
                pos += k
    n_failed = int(np.sum(status == STATUS_FAILED))
    n_pending = int(np.sum(status == STATUS_PENDING))
    if n_pending:
        warnings.warn(f"{path}: {n_pending} of {status.size} simulations are not done yet (an "
                      f"unfinished run; rerun generate with this file to finish it); reading the "
                      f"{int(np.sum(status == STATUS_OK))} done", RuntimeWarning, stacklevel=2)
    return SimSet(path=path, theta=np.asarray(theta, np.float64), kappa=kappa, indices=indices,
                  status=status[indices], names=tuple(attrs["param_names"]),
                  sigma_n=np.asarray(attrs["sigma_n"], np.float64).reshape(-1),
                  prior=json.loads(attrs["prior"]), config_toml=attrs["config_toml"],
                  seed=int(attrs["seed"]), n_failed=n_failed, n_pending=n_pending, attrs=attrs)


# ---- generation ---------------------------------------------------------------------------------

def _comparable_config(toml_text: str) -> dict:
    data = tomllib.loads(toml_text)
    data = {k: v for k, v in data.items() if k in SIMULATION_SECTIONS}
    for dotted in IGNORED_CONFIG_KEYS:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return data


def _diff_keys(a: dict, b: dict, prefix: str = "", where=("in the file", "now")) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        dotted = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, dotted + ".", where)
        elif va != vb:
            out.append(f"{dotted} = {va!r} {where[0]}, {vb!r} {where[1]}")
    return out


def _identity(cfg, prior: Prior, n: int, seed: int, model) -> dict:
    """The attributes that say which simulations a file holds (compared on resume and among the
    parts of a merge): those of the whole run, in a part file too."""
    return {
        "n": n,
        "seed": seed,
        "prior": json.dumps(prior.to_dict()),
        "config_toml": cfg.replace(seed=seed).to_toml(),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
    }


def _identity_problems(have: dict, want: dict, where=("in the file", "now")) -> list[str]:
    """How two identities (``_identity``, or a file's attributes) differ, one phrase per
    difference ("seed = 0 in the file, 1 now"); empty when they describe the same simulations.
    ``where`` names the two sides."""
    problems = []
    for k in ("n", "seed", "model"):
        if have[k] != want[k]:
            problems.append(f"{k} = {have[k]!r} {where[0]}, {want[k]!r} {where[1]}")
    if json.loads(have["prior"]) != json.loads(want["prior"]):
        problems.append(f"prior {have['prior']} {where[0]}, {want['prior']} {where[1]}")
    try:
        problems += [f"config {p}" for p in _diff_keys(_comparable_config(have["config_toml"]),
                                                       _comparable_config(want["config_toml"]),
                                                       where=where)]
    except tomllib.TOMLDecodeError:
        problems.append(f"the config_toml {where[0]} or {where[1]} is not valid TOML")
    return problems


def _check_resumable(path: Path, f: h5py.File, identity: dict, batch_size: int | None,
                     part: Part | None) -> int:
    """Raise ValueError if the file holds other simulations (or another part of them) than
    requested; return its batch size."""
    attrs = _attrs_dict(f.attrs)
    problems = _identity_problems(attrs, identity)
    file_part = Part.from_attrs(path, attrs)
    if file_part != part:
        problems.append(f"{_part_label(file_part)} in the file, {_part_label(part)} now")
    file_batch = int(attrs["batch_size"])
    if batch_size is not None and batch_size != file_batch:
        problems.append(f"batch_size = {file_batch} in the file, {batch_size} now (omit the "
                        f"batch size to resume with the file's)")
    if problems:
        raise ValueError(f"{path} holds other simulations than requested ({'; '.join(problems)}): "
                         f"choose another output file (--out) or delete {path} to start over")
    return file_batch


def _dcpl(fill: bool):
    """Dataset creation properties: storage allocated when the file is created."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if fill else h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _create(path: Path, identity: dict, cfg, prior: Prior, model, batch: int,
            sigma_n: np.ndarray, part: Part | None = None) -> None:
    """Write the empty sims file (every row pending) atomically: the whole run's rows, or only
    ``part``'s (with the ``PART_ATTRS``)."""
    n_bins = int(model.bins.n_bins)
    sky = model.sky
    flat = hasattr(sky, "field_deg")
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_provenance(),
        "name": cfg.name,
        **identity,
        "batch_size": batch,
        "param_names": np.array(prior.names, dtype=h5py.string_dtype()),
        "kind": cfg.simulation.kind,
        "sky": "flat" if flat else "healpix",
        **({"field_deg": float(sky.field_deg), "npix": int(sky.npix)} if flat
           else {"nside": int(sky.nside)}),
        "pixel_area_sr": float(sky.pixel_area),
        "n_bins": n_bins,
        "sigma_e": float(model.bins.sigma_e),
        "sigma_n": np.asarray(sigma_n, np.float64).reshape(-1),
        **({} if part is None else part.attrs()),
    }

    def set_attrs(f):
        for key, value in attrs.items():
            f.attrs[key] = value

    rows = identity["n"] if part is None else part.rows
    what = f"the sims file for {rows} simulations{'' if part is None else f' ({part.label})'},"
    # exclusive: of two runs started at once, one creates the file, the other resumes it
    _write_sims_file(path, rows, prior.dim, (n_bins,) + tuple(sky.shape), set_attrs,
                     exclusive=True, what=what)


def _write_sims_file(path: Path, rows: int, d: int, map_shape: tuple, fill, *, exclusive: bool,
                     what: str) -> None:
    """Write a sims file atomically (``files.atomic_write``): the datasets of ``rows``
    simulations with ``d`` parameters and maps of ``map_shape`` (n_bins, *sky), allocated in full
    (theta NaN, status pending, kappa unwritten), then ``fill(f)`` on the open file sets the
    attributes and writes whatever rows it has.

    The HDF5 file is written on disk, not in memory as ``files.h5_file`` does: a training set may
    exceed the memory. HDF5 does not survive a full disk, so the space is checked first, for the
    whole file: its datasets are allocated now and never grow.
    """
    specs = {  # name: (shape, dtype, chunks, fill value or None for no fill)
        "theta": ((rows, d), np.float64, (min(rows, 4096), d), np.nan),
        "kappa": ((rows,) + tuple(map_shape), np.float32, (1,) + tuple(map_shape), None),
        "status": ((rows,), np.int8, (min(rows, 1 << 16),), STATUS_PENDING),
    }
    ensure_space(path, sum(math.prod(shape) * np.dtype(dtype).itemsize
                           for shape, dtype, _, _ in specs.values()), what=what)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for name, (shape, dtype, chunks, fill_value) in specs.items():
                fillvalue = None if fill_value is None else np.array(fill_value, dtype)
                f.create_dataset(name, shape, dtype, chunks=chunks, fillvalue=fillvalue,
                                 dcpl=_dcpl(fill_value is not None))
                f[name].attrs["description"] = SIMS_DATASETS[name]
            fill(f)

    atomic_write(path, write, exclusive=exclusive, option="--out")


_MODELS: OrderedDict = OrderedDict()  # configuration -> map model, so that reruns reuse compilations


def _model_for(cfg):
    """``cfg.build_model()``, cached: models compare by identity, compilations are cached per model."""
    key = cfg.replace(seed=0, name="experiment").to_toml()
    if key not in _MODELS:
        _MODELS[key] = cfg.build_model()
        while len(_MODELS) > 4:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return _MODELS[key]


def _model_sharded(model) -> bool:
    grid = getattr(getattr(model, "cfg", None), "grid", None)
    return bool(grid is not None and grid.sharded)


def _is_3d(model) -> bool:
    return getattr(model, "cfg", None) is not None or hasattr(model, "shells")


def _model_bytes(model) -> int:
    """Estimated memory of one simulation of a PM/LPT model (every shell of a shells model: a
    vmapped batch may hold them all at once)."""
    from simulators.simulation import estimated_bytes

    shells = getattr(model, "shells", None)
    if shells is not None:
        return sum(estimated_bytes(s.cfg) for s in shells)
    return estimated_bytes(model.cfg)


def _check_batch_memory(model, per_device: int) -> None:
    """On CPU, refuse a PM/LPT batch that cannot fit in memory (instead of swapping)."""
    import jax

    if not _is_3d(model) or jax.default_backend() != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = _model_bytes(model) * per_device
    if need > total:
        raise ValueError(f"a batch of {per_device} simulations per device needs about "
                         f"{need / 2**30:.0f} GiB but this machine has {total / 2**30:.0f} GiB of "
                         f"memory; use a smaller batch size")


def _default_batch(model, n: int, n_devices: int, sharded: bool) -> int:
    if sharded:
        return 1
    per_device = _DEFAULT_PER_DEVICE["3d" if _is_3d(model) else "2d"]
    per_device = min(per_device, -(-n // n_devices))
    if _is_3d(model):
        import jax

        if jax.default_backend() == "cpu":
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                per_device = max(1, min(per_device, int(0.5 * total // _model_bytes(model))))
            except (ValueError, OSError, AttributeError):
                pass
    return per_device * n_devices


# compiled batch functions, keyed by (mode, model, prior, base cosmology, devices, batch)
_COMPILED: OrderedDict = OrderedDict()
_COMPILED_MAX = 8


def prior_simulator(model, prior: Prior, base):
    """(key, index) -> (θ (d,), κ (n_bins, *sky) float32): simulation ``index`` of seed ``key``,
    θ drawn from ``prior`` (the other parameters at ``base``), noise-free maps of ``model``.

    Pure and jittable; ``generate`` vmaps it over indices, online compressor training over a
    batch (``compressors.train_compressor(simulate=...)``).
    """
    import jax
    import jax.numpy as jnp

    def one(key, index):
        theta_key, latent_key = jax.random.split(jax.random.fold_in(key, index))
        theta = prior.sample(theta_key)
        kappa = model.kappa(prior.cosmology(theta, base), model.latent(latent_key))
        return theta, kappa.astype(jnp.float32)

    return one


def _compiled(cache_key, build, *example_args):
    """AOT-compile ``build()`` for the example arguments, once per cache key; (exe, seconds)."""
    if cache_key in _COMPILED:
        _COMPILED.move_to_end(cache_key)
        return _COMPILED[cache_key], 0.0
    t = time.perf_counter()
    exe = build().lower(*example_args).compile()
    _COMPILED[cache_key] = exe
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return exe, time.perf_counter() - t


class _DataParallel:
    """Batches of simulations, the batch axis split over all devices (shard_map of vmap)."""

    mode = "data-parallel"

    def __init__(self, model, prior, base, batch: int):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.devices = jax.devices()
        self.n_devices = len(self.devices)
        self.batch = -(-batch // self.n_devices) * self.n_devices  # padded to the device count
        _check_batch_memory(model, self.batch // self.n_devices)
        mesh = Mesh(np.asarray(self.devices), ("batch",))
        self.sharding = NamedSharding(mesh, P("batch"))
        one = prior_simulator(model, prior, base)
        self.model, self.prior, self.base, self.one = model, prior, base, one
        self.theta_dim, self.map_shape = prior.dim, (model.bins.n_bins,) + tuple(model.sky.shape)

        def build():
            batched = jax.vmap(one, in_axes=(None, 0))
            # check_vma=False: the simulators' scans start from constant (device-invariant)
            # carries that become batch-varying; every device just runs its own shard.
            return jax.jit(jax.shard_map(batched, mesh=mesh, in_specs=(P(), P("batch")),
                                         out_specs=(P("batch"), P("batch")), check_vma=False))

        self._build = build
        self._single = None
        self.cache_key = ("dp", model, prior, base, tuple(self.devices), self.batch)

    def compile(self, key) -> float:
        import jax

        idx = jax.device_put(np.zeros(self.batch, np.uint32), self.sharding)
        self.exe, seconds = _compiled(self.cache_key, self._build, key, idx)
        return seconds

    def run(self, key, start: int, stop: int):
        """θ (m, d), κ (m, ...), error messages (m,) for simulations [start, stop)."""
        import jax

        idx = np.arange(start, start + self.batch, dtype=np.uint32)
        try:
            theta, kappa = self.exe(key, jax.device_put(idx, self.sharding))
            m = stop - start
            return np.asarray(theta)[:m], np.asarray(kappa)[:m], [None] * m
        except Exception:  # retry one by one: which simulations raise?
            return self._singly(key, start, stop)

    def _singly(self, key, start, stop):
        import jax

        if self._single is None:  # compiled on first use only
            self._single = jax.jit(self.one)
        single = self._single
        thetas, kappas, errors = [], [], []
        for i in range(start, stop):
            try:
                theta, kappa = single(key, np.uint32(i))
                thetas.append(np.asarray(theta))
                kappas.append(np.asarray(kappa))
                errors.append(None)
            except Exception as e:
                thetas.append(None)
                kappas.append(None)
                errors.append(e)
        return _assemble(thetas, kappas, errors, self.theta_dim, self.map_shape)


class _Sharded:
    """One simulation at a time through a model sharded over the device grid."""

    mode = "sharded"

    def __init__(self, model, prior, base, batch: int):
        import jax
        import jax.numpy as jnp

        self.batch = batch
        self.n_devices = model.cfg.grid.n_devices
        self.model = model
        self.theta_dim, self.map_shape = prior.dim, (model.bins.n_bins,) + tuple(model.sky.shape)

        def sim(key, index):
            theta_key, latent_key = jax.random.split(jax.random.fold_in(key, index))
            theta = prior.sample(theta_key)
            cosmo, latent = prior.cosmology(theta, base), model.latent(latent_key)
            kappa, max_disp = model.kappa_and_displacement(cosmo, latent)
            return theta, kappa.astype(jnp.float32), max_disp

        self._build = lambda: jax.jit(sim)
        self.cache_key = ("sharded", model, prior, base)

    def compile(self, key) -> float:
        from simulators.simulation import check_memory

        check_memory(self.model.cfg)
        self.exe, seconds = _compiled(self.cache_key, self._build, key, np.uint32(0))
        return seconds

    def run(self, key, start: int, stop: int):
        from simulators.simulation import check_halo

        thetas, kappas, errors = [], [], []
        for i in range(start, stop):
            theta = None
            try:
                theta, kappa, max_disp = self.exe(key, np.uint32(i))
                theta = np.asarray(theta)
                check_halo(self.model.cfg, float(max_disp))
                kappas.append(np.asarray(kappa))
                errors.append(None)
            except Exception as e:
                kappas.append(None)
                errors.append(e)
            thetas.append(theta)
        return _assemble(thetas, kappas, errors, self.theta_dim, self.map_shape)


def _assemble(thetas, kappas, errors, theta_dim: int, map_shape: tuple):
    """Stack per-simulation results; failed ones get NaN (θ if unknown, and κ).

    If every simulation raised and not all of them merely failed (halo overflow), the first
    error is re-raised: a systematic problem, not a bad draw, and the chunk must stay pending.
    """
    from simulators.simulation import HaloOverflowError

    if all(k is None for k in kappas):
        for e in errors:
            if not isinstance(e, HaloOverflowError):
                raise e
    theta = np.stack([t if t is not None else np.full(theta_dim, np.nan) for t in thetas])
    kappa = np.stack([k if k is not None else np.full(map_shape, np.nan, np.float32)
                      for k in kappas])
    return theta, kappa, errors


def _warn_step_window(model, prior: Prior, base, thetas: np.ndarray, out: Path) -> None:
    """Warn when some θ of a PM/LPT training set has a step thicker than the lightcone's radial
    window (the far end of that shell is missing from its maps; ``lightcone.step_window_ratio``)."""
    import jax

    from simulators.lightcone import margin_to_cover, step_window_ratio

    if model.lightcone is None or not len(thetas):
        return
    ratio = np.asarray(jax.jit(jax.vmap(lambda t: step_window_ratio(
        prior.cosmology(t, base), model.cfg, model.lightcone)))(thetas))
    over = int(np.sum(ratio > 1))
    if over:
        need = margin_to_cover(ratio.max(), model.lightcone)
        warnings.warn(f"{out}: {over} of {len(thetas)} simulations drew a cosmology whose thickest "
                      f"PM step exceeds the lightcone's radial window (up to {ratio.max():.3f}x), "
                      f"so the far end of that shell is missing from their maps; set "
                      f"lightcone.window_margin >= {need:g} to cover them", RuntimeWarning,
                      stacklevel=3)


def generate(cfg, prior: Prior, n: int, out, *, batch_size: int | None = None,
             seed: int | None = None, model=None, progress: bool = True,
             part: "Part | tuple[int, int] | None" = None) -> GenerateReport:
    """Simulate ``n`` (θ, κ) pairs into the sims file ``out``, or finish an interrupted run there;
    or only one part of them (``part``; ``merge_parts`` joins the parts).

    Args:
      cfg: the ``ExperimentConfig`` (map model, sky, sources, base cosmology for the parameters
        not in the prior).
      prior: the ``Prior`` θ is drawn from; its parameter names are ``Cosmology`` fields.
      n: number of simulations.
      out: the sims file (layout: module docstring). If it exists it must hold the same
        simulations (same n, seed, prior, model and configuration, and the same part): the run
        resumes there.
      batch_size: simulations per batch and per chunk written; default: 4 per device for PM/LPT
        models (fewer if memory is short, or if the run or part is smaller), 16 per device for
        Gaussian/lognormal maps, 1 for a sharded model; on resume, the file's (a different value
        is an error).
      seed: default ``cfg.seed``.
      model: the map model; default ``cfg.build_model()`` (an explicit model replaces the one the
        configuration describes; its class is recorded and compared on resume).
      progress: show a tqdm bar on stderr.
      part: (index, count), 1-based, or a ``Part`` of ``n``: simulate only the simulations
        [start, stop) of that part of the whole run of ``n`` (``Part`` says which) into ``out``,
        a part file. Each simulation is the whole run's, bitwise (per-index keys).
    Returns:
      a ``GenerateReport``; a warning is issued when simulations failed.
    Raises:
      ValueError for invalid arguments, or an existing ``out`` that is not a sims file or holds
      other simulations; whatever a simulation raises when every simulation of a chunk raises it.
    """
    import jax

    from simulators.lensing import noise_sigma

    t0 = time.perf_counter()
    out = Path(out)
    for name, value, low in (("n", n, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    n = int(n)
    if part is not None and not isinstance(part, Part):
        part = Part.split(n, *part)
    if part is not None and part.n != n:
        raise ValueError(f"part {part.label} is a part of {part.n} simulations, not of n = {n}")
    start, stop = (0, n) if part is None else (part.start, part.stop)  # simulations of the file
    batch_size = None if batch_size is None else int(batch_size)
    seed = int(cfg.seed if seed is None else seed)
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be an experiments.priors.Prior, got {type(prior).__name__}")
    if model is None:
        model = _model_for(cfg)
    base = cfg.cosmology()
    identity = _identity(cfg, prior, n, seed, model)
    sharded = _model_sharded(model)

    check_output(out, option="--out")
    created = False
    if not out.exists():
        n_dev = 1 if sharded else jax.device_count()
        batch = (batch_size if batch_size is not None
                 else _default_batch(model, stop - start, n_dev, sharded))
        try:
            _create(out, identity, cfg, prior, model, batch, noise_sigma(model.bins, model.sky),
                    part)
            created = True
        except FileExistsError:  # another generate created it in the meantime: resume that
            pass
    if not created:
        with _open_sims(out) as f:
            batch = _check_resumable(out, f, identity, batch_size, part)

    runner = (_Sharded if sharded else _DataParallel)(model, prior, base, batch)
    key = jax.random.key(seed)
    # chunks of simulation indices [s, e); a part's start at its first simulation. File row of
    # simulation i: i - start. Simulation i is the same in any chunk (per-index keys).
    chunks = [(s, min(stop, s + batch)) for s in range(start, stop, batch)]
    compile_s = 0.0
    n_simulated = 0
    delay = float(os.environ.get(CHUNK_DELAY_ENV, "0") or 0)
    first_errors: list[str] = []
    try:
        f = h5py.File(out, "r+")
    except OSError as e:
        raise OSError(f"cannot open {out} for writing ({e}); is another lensbench generate "
                      f"writing it?") from None
    with f:
        status = f["status"][()]
        todo = [(s, e) for s, e in chunks
                if not np.all(status[s - start:e - start] != STATUS_PENDING)]
        n_resumed = (stop - start) - sum(e - s for s, e in todo)
        if todo:
            compile_s = runner.compile(key)
        ok_count = int(np.sum(status == STATUS_OK)) - sum(
            int(np.sum(status[s - start:e - start] == STATUS_OK)) for s, e in todo)
        failed_count = int(np.sum(status == STATUS_FAILED)) - sum(
            int(np.sum(status[s - start:e - start] == STATUS_FAILED)) for s, e in todo)
        from tqdm import tqdm

        with tqdm(total=stop - start, initial=n_resumed, unit="sim", desc=f"simulating {out.name}",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            bar.set_postfix(OrderedDict(ok=ok_count, failed=failed_count), refresh=False)
            t_run = time.perf_counter()
            for s, e in todo:
                theta, kappa, errors = runner.run(key, s, e)
                good = (np.array([err is None for err in errors])
                        & np.all(np.isfinite(kappa.reshape(e - s, -1)), axis=1)
                        & np.all(np.isfinite(theta), axis=1))
                for i, err in enumerate(errors):
                    if err is not None:
                        message = f"simulation {s + i} failed: {type(err).__name__}: {err}"
                        if not first_errors:
                            first_errors.append(" ".join(message.split()))
                        if progress:
                            bar.write(message, file=sys.stderr)
                rows = slice(s - start, e - start)
                f["theta"][rows] = theta
                f["kappa"][rows] = kappa
                f.flush()  # data first, then the status that says it is there
                f["status"][rows] = np.where(good, STATUS_OK, STATUS_FAILED).astype(np.int8)
                f.flush()
                n_simulated += e - s
                ok_count += int(good.sum())
                failed_count += int((~good).sum())
                bar.set_postfix(OrderedDict(ok=ok_count, failed=failed_count), refresh=False)
                bar.update(e - s)
                if delay:
                    time.sleep(delay)
            run_s = time.perf_counter() - t_run
        status = f["status"][()]
        if n_simulated:
            _warn_step_window(model, prior, base, f["theta"][()][status == STATUS_OK], out)

    failed = tuple(start + int(i) for i in np.flatnonzero(status == STATUS_FAILED))
    report = GenerateReport(
        path=out, n_requested=stop - start, n_ok=int(np.sum(status == STATUS_OK)),
        n_failed=len(failed),
        n_resumed=n_resumed, n_simulated=n_simulated,
        n_pending=int(np.sum(status == STATUS_PENDING)), failed_indices=failed,
        wall_s=time.perf_counter() - t0, compile_s=compile_s,
        sims_per_s=n_simulated / run_s if n_simulated and run_s > 0 else 0.0,
        batch_size=batch, n_devices=runner.n_devices, mode=runner.mode, part=part)
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
        errors = f"; {first_errors[0]}" if first_errors else ""
        of, which = ((f"{n} simulations", "rows") if part is None else
                     (f"the {stop - start} simulations of {part.describe()}", "simulations"))
        warnings.warn(f"{len(failed)} of {of} failed (NaN/inf maps or errors; {which} {shown}): "
                      f"they have status 2 in {out} and read_sims leaves them out{errors}",
                      RuntimeWarning, stacklevel=2)
    return report


# ---- merging parts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeReport:
    """What ``merge_parts`` wrote.

    Attributes:
      path: the merged sims file.
      n: simulations in it; n_ok, n_failed: of which ok / failed (status 1 / 2).
      n_parts: the parts joined.
    """

    path: Path
    n: int
    n_ok: int
    n_failed: int
    n_parts: int

    def summary(self) -> str:
        """One line for the user."""
        return (f"wrote {self.path}: {self.n} simulations ({self.n_ok} ok, {self.n_failed} "
                f"failed) from {self.n_parts} parts")


@dataclass(frozen=True)
class _PartFile:
    """What ``merge_parts`` checks of one part file, read with the file closed again (a merge
    of thousands of parts must not hold thousands of files open)."""

    path: Path
    part: Part
    attrs: dict
    n_ok: int
    n_failed: int
    n_pending: int


def _read_part(path: Path) -> _PartFile:
    with _open_sims(path) as f:
        part = Part.from_attrs(path, f.attrs)
        if part is None:
            raise ValueError(f"{path} is a whole training set, not a part: merge joins the files "
                             f"of `lensbench generate --part I/N`")
        attrs = _attrs_dict(f.attrs)
        status = f["status"][()]
    return _PartFile(path, part, attrs, n_ok=int(np.sum(status == STATUS_OK)),
                     n_failed=int(np.sum(status == STATUS_FAILED)),
                     n_pending=int(np.sum(status == STATUS_PENDING)))


def _listed(items, limit: int = 10) -> str:
    items = [str(x) for x in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_parts(files: list[_PartFile]) -> list[_PartFile]:
    """``files`` in the order of their parts; ValueError (one line naming the files or parts)
    unless they are each part, once, of one split of one run, all finished."""
    first = files[0]
    for other in files[1:]:  # the same simulations: the identity ``generate`` resumes by
        problems = _identity_problems(first.attrs, other.attrs,
                                      where=(f"in {first.path}", f"in {other.path}"))
        if problems:
            raise ValueError(f"cannot merge parts of different runs: {other.path} and "
                             f"{first.path} hold other simulations ({'; '.join(problems)})")
    count = first.part.count
    for other in files[1:]:
        if other.part.count != count:  # their ranges would overlap or leave gaps
            raise ValueError(f"cannot merge parts of different splits: {first.path} is part "
                             f"{first.part.label}, {other.path} part {other.part.label}; merge "
                             f"the parts of one --part I/N split (the same N)")
    by_index: dict[int, list[_PartFile]] = {}
    for pf in files:
        by_index.setdefault(pf.part.index, []).append(pf)
    twice = {i: pfs for i, pfs in sorted(by_index.items()) if len(pfs) > 1}
    if twice:
        raise ValueError("overlapping parts: " + "; ".join(
            f"part {i}/{count} given {len(pfs)} times ({', '.join(str(pf.path) for pf in pfs)})"
            for i, pfs in twice.items()) + "; give each part once")
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise ValueError(f"missing part{'s' if len(missing) > 1 else ''} {_listed(missing)} of "
                         f"{count} (of {first.part.n} simulations, from {first.path}): generate "
                         f"{'them' if len(missing) > 1 else 'it'} with --part I/{count} and merge "
                         f"all {count} parts")
    unfinished = [pf for pf in files if pf.n_pending]
    if unfinished:
        raise ValueError("unfinished parts: " + _listed(
            f"{pf.path} ({pf.n_pending} of its {pf.part.rows} simulations not done)"
            for pf in unfinished) + "; rerun their `lensbench generate --part` to finish them")
    return [by_index[i][0] for i in range(1, count + 1)]


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, offset: int) -> None:
    """dst[offset:offset + len(src)] = src, in blocks of ``_block_rows`` (bounded memory)."""
    block = _block_rows(src)
    for a in range(0, src.shape[0], block):
        b = min(src.shape[0], a + block)
        dst[offset + a:offset + b] = src[a:b]


def merge_parts(parts, out, *, overwrite: bool = False) -> MergeReport:
    """Join the part files of one training set (``generate(..., part=(I, N))`` for I = 1..N)
    into the sims file ``out``: the file one ``generate`` of all ``n`` simulations writes.

    θ, κ and status are copied bit for bit, in blocks (memory stays bounded whatever ``n``), and
    the attributes are the whole run's: part 1's less ``PART_ATTRS``. A run's ``batch_size``
    (which only says how a rerun would chunk it; a merged file is complete) and provenance
    (``lensbench_version``, ``jax_version``) are part 1's. ``read_sims`` and everything
    downstream read the result as any whole file.

    Args:
      parts: the part files, in any order.
      out: the merged file, written atomically through ``files.atomic_write`` after a disk-space
        check; never one of the parts.
      overwrite: replace an existing ``out`` (otherwise it is refused).
    Returns:
      a ``MergeReport``.
    Raises:
      ValueError (one line naming the files or parts) when the parts are of different runs
      (n, seed, prior, model or configuration differ) or splits, overlap, are missing, are
      unfinished (pending rows), or a file is not a part; OutputError for an ``out`` that exists
      (without ``overwrite``), is one of the parts, or does not fit on its file system;
      FileNotFoundError for a missing part file.
    """
    parts = [Path(p) for p in parts]
    out = Path(out)
    if not parts:
        raise ValueError("no part files to merge")
    check_output(out, option="--out")
    for path in parts:
        check_not_inputs(out, {"PART": path})
    check_new_output(out, overwrite=overwrite)
    ordered = _check_parts([_read_part(path) for path in parts])
    whole = ordered[0].part.n

    with _open_sims(ordered[0].path) as f:
        d, map_shape = f["theta"].shape[1], f["kappa"].shape[1:]

    def fill(f):
        with _open_sims(ordered[0].path) as src:  # with their HDF5 types, as generate wrote them
            for key in src.attrs:
                if key not in PART_ATTRS:
                    f.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
        for pf in ordered:
            with _open_sims(pf.path) as src:
                if np.any(src["status"][()] == STATUS_PENDING):  # changed since it was checked
                    raise ValueError(f"{pf.path} has simulations not done: is a lensbench "
                                     f"generate writing it?")
                for name in SIMS_DATASETS:
                    _copy_rows(src[name], f[name], pf.part.start)

    try:
        _write_sims_file(out, whole, d, map_shape, fill, exclusive=not overwrite,
                         what=f"the merged sims file of {whole} simulations,")
    except FileExistsError:  # created since check_new_output looked: still never overwritten
        check_new_output(out, overwrite=False)
        raise
    return MergeReport(out, whole, n_ok=sum(pf.n_ok for pf in ordered),
                       n_failed=sum(pf.n_failed for pf in ordered), n_parts=len(ordered))
