"""On-disk layout of a segmented HMC run, written so that a kill at any moment loses nothing.

out_dir/
  run.json            settings and run identity (θ names, field site, start), written at the
                      start (and again when a finished run is extended to more samples)
  chain_<c>.h5        per chain: per-iteration records and the sampler state after the last
                      finished segment; rewritten whole, atomically, after every segment
  fields/c<c>_<s>.npy kept field samples (sample index s), one file each, written atomically
  diagnostics.json    written when every chain has finished

Every file is written by ``experiments.files.atomic_write`` (a temporary name in the same
directory, flushed to disk, then renamed into place), so a reader sees the old or the new file,
never half of one.
The chain file is the commit point: field files past its row count are simply rewritten on resume.

With several processes (``jax.distributed``), arrays split over processes (the field and its
per-cell sampler state) are never gathered: each process writes its own pieces, and the shared
files (run.json, chain files, diagnostics) are written by process 0 alone:
  state/c<c>_<n>.p<r>.h5    process r's pieces of chain c's state after n rows; written before
                            the chain file that commits row n, older ones deleted after it
  fields/c<c>_<s>.p<r>.h5   process r's pieces of a kept field sample (``load_field`` joins them)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import jax
import numpy as np

from experiments.files import atomic_write, h5_file
from .settings import HMCSettings

FORMAT = "lensbench-explicit-chain/1"
RECORDS = ("theta", "potential_energy", "num_grads", "diverging", "accept_prob", "step_size",
           "energy_change")
OTHER_SETTINGS_HINT = ("use the original settings (or only a larger num_samples, to extend the "
                   "run), another out_dir, or resume=False")
_RESTART = "delete it (or the whole run directory) to restart, or rerun with resume=False"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or from a different run."""


# ------------------------------------------------------------------------------------------------
# Arrays split over processes


@dataclass(frozen=True)
class LocalShards:
    """This process's pieces of an array split over processes.

    shape, dtype: the global array's. pieces: ((start, stop), data) per distinct addressable
    shard, start/stop (ndim,) int index bounds in the global array.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: tuple

    def __getitem__(self, i: int) -> "LocalShards":
        """Element i along the first (unsplit) axis, e.g. one kept sample of a field buffer."""
        return LocalShards(self.shape[1:], self.dtype,
                           tuple(((b[1:], e[1:]), d[i]) for (b, e), d in self.pieces))

    def assemble(self, sharding) -> jax.Array:
        """The global array with ``sharding``; every block this process needs must be covered by
        its pieces (true when the pieces came from an array with the same layout)."""
        def block(index):
            bounds = [sl.indices(n)[:2] for sl, n in zip(index, self.shape)]
            out = np.empty([e - b for b, e in bounds], self.dtype)
            filled = np.zeros(out.shape, bool)
            for (lo, hi), data in self.pieces:
                src, dst = [], []
                for (b, e), l, h in zip(bounds, lo, hi):
                    b2, e2 = max(b, l), min(e, h)
                    if b2 >= e2:
                        break
                    src.append(slice(b2 - l, e2 - l))
                    dst.append(slice(b2 - b, e2 - b))
                else:
                    out[tuple(dst)] = data[tuple(src)]
                    filled[tuple(dst)] = True
            if not filled.all():
                raise CheckpointError(f"the saved pieces of a {list(self.shape)} state array do "
                                      f"not cover block {bounds} of this process: was the run "
                                      f"resumed on another device layout?")
            return out

        return jax.make_array_from_callback(self.shape, sharding, block)


def to_host(x, keep_split: bool = True) -> np.ndarray | LocalShards:
    """A device array as host numpy, or, when it is split over processes and ``keep_split``, as
    this process's pieces (gathering a field would put all of it in every process's memory;
    small arrays that the partitioner happened to split are gathered)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    if not keep_split:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    pieces = {}
    for shard in x.addressable_shards:
        bounds = tuple(sl.indices(n)[:2] for sl, n in zip(shard.index, x.shape))
        if bounds not in pieces:  # replicas hold the same values
            pieces[bounds] = np.asarray(shard.data)
    return LocalShards(tuple(x.shape), np.dtype(x.dtype),
                       tuple(((np.array([b for b, _ in k]), np.array([e for _, e in k])), v)
                             for k, v in pieces.items()))


def _write_pieces(f: h5py.Group, x: LocalShards) -> None:
    f.attrs["shape"] = list(x.shape)
    f.attrs["dtype"] = x.dtype.str
    for j, ((lo, hi), data) in enumerate(x.pieces):
        d = f.create_dataset(f"{j:04d}", data=data)
        d.attrs["start"], d.attrs["stop"] = lo, hi


def _read_pieces(f: h5py.Group) -> LocalShards:
    pieces = tuple(((np.asarray(d.attrs["start"]), np.asarray(d.attrs["stop"])), d[()])
                   for _, d in sorted(f.items()))
    return LocalShards(tuple(int(n) for n in f.attrs["shape"]), np.dtype(f.attrs["dtype"]), pieces)


def barrier(name: str) -> None:
    """Wait for every process (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_writer() -> bool:
    """Whether this process writes the files shared by all processes (process 0)."""
    return jax.process_index() == 0


# The run's field preconditioner (``precondition.FourierScale.to_dict``), estimated once at the
# first start; every chain and every resume reads it, so all sample the same variables.
FIELD_SCALE_FILE = "field_scale.json"


def clear_run(out_dir: Path) -> None:
    """Remove a sampling run's files (chains, kept fields, sampler state, run.json,
    diagnostics.json, the field preconditioner) from out_dir and nothing else; process 0 does it for all."""
    out_dir = Path(out_dir)
    if is_writer():
        for p in list(out_dir.glob("chain_*.h5")) + [out_dir / "run.json",
                                                     out_dir / "diagnostics.json",
                                                     out_dir / FIELD_SCALE_FILE]:
            p.unlink(missing_ok=True)
        for p in [*(out_dir / "fields").glob("c*_*.npy"), *(out_dir / "fields").glob("c*_*.p*.h5"),
                  *(out_dir / "state").glob("c*_*.p*.h5")]:
            p.unlink()
    barrier("lensbench clear")


def state_path(out_dir: Path, chain: int, n_rows: int, process: int) -> Path:
    return Path(out_dir) / "state" / f"c{chain}_{n_rows}.p{process}.h5"


@dataclass
class ChainCheckpoint:
    """What one chain file holds (host numpy).

    n_rows: iterations of the segmented loop done; records[name]: (n_rows, ...) per iteration
    (theta (n_rows, d) constrained; potential_energy, accept_prob, step_size, energy_change
    float64; num_grads int64; diverging bool). first_sample_row: rows before it are warm-up.
    tuning_grads: gradients spent outside the loop (MCLMC tuning). wall_s: seconds spent on this
    chain, summed over resumes. leaves: the sampler state's pytree leaves (None before the first
    commit). complete: all iterations done. tuned: sampler parameters fixed before the loop (MCLMC
    L and step size), for the diagnostics.
    """

    n_rows: int
    first_sample_row: int
    tuning_grads: int = 0
    wall_s: float = 0.0
    complete: bool = False
    records: dict = field(default_factory=dict)
    leaves: list | None = None
    treedef: str = ""
    tuned: dict = field(default_factory=dict)


def chain_path(out_dir: Path, chain: int) -> Path:
    return Path(out_dir) / f"chain_{chain}.h5"


def field_path(out_dir: Path, chain: int, sample: int) -> Path:
    return Path(out_dir) / "fields" / f"c{chain}_{sample:07d}.npy"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """The project's atomic writer, flushed to disk before the rename: a checkpoint must survive
    a crash of the machine, not only of the process."""
    atomic_write(path, write, fsync=True)


def write_json(path: Path, obj: dict) -> None:
    """Write (process 0 only) a JSON file atomically."""
    def write(tmp):
        tmp.write_text(json.dumps(obj, indent=2, default=float))

    if is_writer():
        _atomic(path, write)


def read_json(path: Path) -> dict | None:
    """The JSON object at ``path``, None when absent; CheckpointError when unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return obj
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable run file ({err}); {_RESTART}") from None


def save_array(path: Path, value: np.ndarray | LocalShards) -> None:
    """Write an array atomically: whole as ``path`` (.npy, by process 0), or each process its
    pieces as ``path`` with the suffix .p<process>.h5."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, LocalShards):
        def write(tmp):
            with h5_file(tmp) as f:
                f.attrs["n_processes"] = jax.process_count()
                _write_pieces(f, value)

        _atomic(path.with_suffix(f".p{jax.process_index()}.h5"), write)
    elif is_writer():
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(value))

        _atomic(path, write)


def load_array(path: Path) -> np.ndarray | LocalShards | None:
    """What ``save_array`` wrote, as this process holds it: the whole array, or this process's
    pieces (the run must have the same processes); None when neither exists."""
    path = Path(path)
    try:
        if path.exists():
            return np.load(path)
        part = path.with_suffix(f".p{jax.process_index()}.h5")
        if not part.exists():
            return None
        with h5py.File(part, "r") as f:
            n_proc = int(f.attrs["n_processes"])
            if n_proc != jax.process_count():
                raise ValueError(f"written by {n_proc} processes, this run has "
                                 f"{jax.process_count()}")
            return _read_pieces(f)
    except (OSError, ValueError, EOFError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable array ({err}); {_RESTART}") from None


def digest(x: np.ndarray | LocalShards) -> str:
    """sha256 of an array's float64 values; of pieces split over processes, a hash over every
    process's pieces (the same in all processes, but not the hash of the joined array)."""
    if not isinstance(x, LocalShards):
        return hashlib.sha256(np.ascontiguousarray(np.asarray(x, np.float64)).tobytes()).hexdigest()
    h = hashlib.sha256()
    for (lo, hi), data in sorted(x.pieces, key=lambda p: tuple(p[0][0])):
        h.update(np.asarray(lo, np.int64).tobytes() + np.asarray(hi, np.int64).tobytes())
        h.update(np.ascontiguousarray(np.asarray(data, np.float64)).tobytes())
    from jax.experimental import multihost_utils

    mine = np.frombuffer(h.digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 32), process order
    return hashlib.sha256(every.tobytes()).hexdigest()


def save_field(out_dir: Path, chain: int, sample: int, value: np.ndarray | LocalShards) -> None:
    """Write one kept field sample: whole (process 0), or each process its pieces."""
    save_array(field_path(out_dir, chain, sample), value)


def load_field(out_dir: Path, chain: int, sample: int) -> np.ndarray:
    """One kept field sample as a host array (joined from the processes' pieces if need be)."""
    path = field_path(out_dir, chain, sample)
    try:
        if path.exists() or not path.parent.is_dir():
            return np.load(path)
        parts = sorted(path.parent.glob(f"{path.stem}.p*.h5"))
        if not parts:
            raise OSError("no such file")
        out = None
        for part in parts:
            with h5py.File(part, "r") as f:
                n_proc = int(f.attrs["n_processes"])
                x = _read_pieces(f)
            if out is None:
                out = np.empty(x.shape, x.dtype)
            for (lo, hi), data in x.pieces:
                out[tuple(slice(b, e) for b, e in zip(lo, hi))] = data
        if len(parts) != n_proc:
            raise ValueError(f"{len(parts)} of the {n_proc} processes' pieces exist")
        return out
    except (OSError, ValueError, EOFError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable field sample ({err}); {_RESTART}") from None


def save_chain(out_dir: Path, chain: int, ck: ChainCheckpoint, settings: dict) -> None:
    """Commit chain ``chain``: its file (records, state leaves, counters, settings), written
    atomically by process 0, after every process has written its pieces of split state arrays."""
    leaves = ck.leaves or []
    split = [i for i, leaf in enumerate(leaves) if isinstance(leaf, LocalShards)]
    if split:
        here = state_path(out_dir, chain, ck.n_rows, jax.process_index())
        here.parent.mkdir(parents=True, exist_ok=True)

        def write_state(tmp):
            with h5_file(tmp) as f:
                for i in split:
                    _write_pieces(f.create_group(f"{i:04d}"), leaves[i])

        _atomic(here, write_state)
        barrier(f"lensbench state {chain} {ck.n_rows}")

    def write(tmp):
        with h5_file(tmp) as f:
            f.attrs["format"] = FORMAT
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            f.attrs["chain"] = chain
            f.attrs["n_rows"] = ck.n_rows
            f.attrs["first_sample_row"] = ck.first_sample_row
            f.attrs["tuning_grads"] = ck.tuning_grads
            f.attrs["wall_s"] = ck.wall_s
            f.attrs["complete"] = ck.complete
            f.attrs["tuned"] = json.dumps(ck.tuned)
            f.attrs["n_processes"] = jax.process_count()
            rec = f.create_group("records")
            for name in RECORDS:
                rec.create_dataset(name, data=np.asarray(ck.records[name]))
            if ck.leaves is not None:
                st = f.create_group("state")
                st.attrs["treedef"] = ck.treedef
                st.attrs["n_leaves"] = len(leaves)
                for i, leaf in enumerate(leaves):
                    if i in split:  # a placeholder: the values are in the processes' state files
                        st.create_dataset(f"{i:04d}", data=np.zeros(0)).attrs["split"] = True
                    else:
                        st.create_dataset(f"{i:04d}", data=np.asarray(leaf))

    if is_writer():
        _atomic(chain_path(out_dir, chain), write)
    barrier(f"lensbench commit {chain} {ck.n_rows}")  # no process reads ahead of the commit
    if split:
        for old in here.parent.glob(f"c{chain}_*.p{jax.process_index()}.h5"):
            if old != here:
                old.unlink(missing_ok=True)


def _split_leaves(out_dir: Path, chain: int, n_rows: int, n_processes: int, split: list) -> dict:
    """This process's pieces of the split state arrays committed at row n_rows."""
    if n_processes != jax.process_count():
        raise ValueError(f"the run was written by {n_processes} process(es), this is "
                         f"{jax.process_count()}: resume it with the same processes and devices")
    path = state_path(out_dir, chain, n_rows, jax.process_index())
    if not path.exists():
        raise ValueError(f"{path}, this process's part of the state, is missing")
    with h5py.File(path, "r") as f:
        return {i: _read_pieces(f[f"{i:04d}"]) for i in split}


def load_chain(out_dir: Path, chain: int, settings: dict | None = None, *,
               extend: bool = False, state: bool = True) -> ChainCheckpoint | None:
    """Chain ``chain``'s checkpoint; None when the file does not exist. ``state=False`` leaves the
    sampler state unread (``leaves`` None): enough to read the records or whether it is complete,
    without the field-sized state arrays.

    Raises CheckpointError when the file is unreadable or inconsistent (truncated, corrupted, or
    not a chain file), or, with ``settings``, when it was written with other settings (with
    ``extend``, fewer samples per chain and otherwise the same settings are accepted: the chain
    is then continued, ``complete`` being set against ``settings``).
    """
    path = chain_path(out_dir, chain)
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            saved = HMCSettings.with_later_keys(json.loads(f.attrs["settings"]))
            ck = ChainCheckpoint(
                n_rows=int(f.attrs["n_rows"]), first_sample_row=int(f.attrs["first_sample_row"]),
                tuning_grads=int(f.attrs["tuning_grads"]), wall_s=float(f.attrs["wall_s"]),
                complete=bool(f.attrs["complete"]), tuned=json.loads(f.attrs["tuned"]),
                records={name: f["records"][name][()] for name in RECORDS})
            split, n_proc = [], int(f.attrs.get("n_processes", 1))
            if state and "state" in f:
                st = f["state"]
                ck.treedef = str(st.attrs["treedef"])
                ds = [st[f"{i:04d}"] for i in range(int(st.attrs["n_leaves"]))]
                ck.leaves = [d[()] for d in ds]
                split = [i for i, d in enumerate(ds) if d.attrs.get("split", False)]
        if split:
            for i, leaf in _split_leaves(out_dir, chain, ck.n_rows, n_proc, split).items():
                ck.leaves[i] = leaf
        for name, arr in ck.records.items():
            if arr.shape[:1] != (ck.n_rows,):
                raise ValueError(f"record {name!r} has {arr.shape[:1]} rows, expected {ck.n_rows}")
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({err}); "
                              f"{_RESTART}") from None
    if settings is not None and saved != settings:
        wanted = HMCSettings(**settings)
        if not (extend and wanted.extends(saved)):
            raise CheckpointError(f"{path} was written with other settings "
                                  f"({'; '.join(wanted.differences(saved))}); {OTHER_SETTINGS_HINT}")
        ck.complete = ck.n_rows >= wanted.n_iterations
    return ck
