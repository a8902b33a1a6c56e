"""On-disk layout of a segmented HMC run, written so that a kill at any moment loses nothing.

out_dir/
  run.json            settings and run identity (θ names, field site, start), written at the
                      start (and again when a finished run is extended to more samples)
  chain_<c>.h5        per chain: per-iteration records and the sampler state after the last
                      finished segment; rewritten whole, atomically, after every segment
  fields/c<c>_<s>.npy kept field samples (sample index s), one file each, written atomically
  diagnostics.json    written when every chain has finished

Every file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so a reader sees the old or the new file, never half of one.
The chain file is the commit point: field files past its row count are simply rewritten on resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

FORMAT = "lensbench-explicit-chain/1"
RECORDS = ("theta", "potential_energy", "num_grads", "diverging", "accept_prob", "step_size",
           "energy_change")
OTHER_SETTINGS_HINT = ("use the original settings (or only a larger num_samples, to extend the "
                   "run), another out_dir, or resume=False")
_RESTART = "delete it (or the whole run directory) to restart, or rerun with resume=False"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or from a different run."""


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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: dict) -> None:
    def write(tmp):
        tmp.write_text(json.dumps(obj, indent=2, default=float))

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


def save_field(out_dir: Path, chain: int, sample: int, value: np.ndarray) -> None:
    path = field_path(out_dir, chain, sample)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(value))

    _atomic(path, write)


def load_field(out_dir: Path, chain: int, sample: int) -> np.ndarray:
    path = field_path(out_dir, chain, sample)
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable field sample ({err}); {_RESTART}") from None


def save_chain(out_dir: Path, chain: int, ck: ChainCheckpoint, settings: dict) -> None:
    """Write chain ``chain``'s file atomically (records, state leaves, counters, settings)."""

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            f.attrs["chain"] = chain
            f.attrs["n_rows"] = ck.n_rows
            f.attrs["first_sample_row"] = ck.first_sample_row
            f.attrs["tuning_grads"] = ck.tuning_grads
            f.attrs["wall_s"] = ck.wall_s
            f.attrs["complete"] = ck.complete
            f.attrs["tuned"] = json.dumps(ck.tuned)
            rec = f.create_group("records")
            for name in RECORDS:
                rec.create_dataset(name, data=np.asarray(ck.records[name]))
            if ck.leaves is not None:
                st = f.create_group("state")
                st.attrs["treedef"] = ck.treedef
                st.attrs["n_leaves"] = len(ck.leaves)
                for i, leaf in enumerate(ck.leaves):
                    st.create_dataset(f"{i:04d}", data=np.asarray(leaf))

    _atomic(chain_path(out_dir, chain), write)


def load_chain(out_dir: Path, chain: int, settings: dict | None = None, *,
               extend: bool = False) -> ChainCheckpoint | None:
    """Chain ``chain``'s checkpoint; None when the file does not exist.

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
            saved = json.loads(f.attrs["settings"])
            ck = ChainCheckpoint(
                n_rows=int(f.attrs["n_rows"]), first_sample_row=int(f.attrs["first_sample_row"]),
                tuning_grads=int(f.attrs["tuning_grads"]), wall_s=float(f.attrs["wall_s"]),
                complete=bool(f.attrs["complete"]), tuned=json.loads(f.attrs["tuned"]),
                records={name: f["records"][name][()] for name in RECORDS})
            if "state" in f:
                st = f["state"]
                ck.treedef = str(st.attrs["treedef"])
                ck.leaves = [st[f"{i:04d}"][()] for i in range(int(st.attrs["n_leaves"]))]
        for name, arr in ck.records.items():
            if arr.shape[:1] != (ck.n_rows,):
                raise ValueError(f"record {name!r} has {arr.shape[:1]} rows, expected {ck.n_rows}")
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({err}); "
                              f"{_RESTART}") from None
    if settings is not None and saved != settings:
        from .settings import HMCSettings

        wanted = HMCSettings(**settings)
        if not (extend and wanted.extends(saved)):
            raise CheckpointError(f"{path} was written with other settings "
                                  f"({'; '.join(wanted.differences(saved))}); {OTHER_SETTINGS_HINT}")
        ck.complete = ck.n_rows >= wanted.n_iterations
    return ck
