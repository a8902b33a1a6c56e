"""Writing lensbench's files: the one atomic writer, the checks on output paths, disk space.

Every file lensbench writes goes through ``atomic_write`` (or its wrappers ``write_text``,
``write_json``, ``atomic_h5``): the content goes to a temporary file next to the target, which is
renamed onto it only when complete, so a reader (or an interrupted run) sees the old file or the
new one, never half of one.

Output paths. An existing output must be a regular file (replaced) or a symbolic link to one, in
which case the link is kept and its target is replaced: lensbench never turns a device, a FIFO, a
socket or a directory into a regular file, and refuses such an output with one line naming it.
Output directories must be directories (or links to one).

Failures name the file: a full disk, a quota, a read-only file system or a missing permission end
in one ``OSError`` line ("cannot write PATH: no space left on device") with the temporary file
removed and the previous file untouched.

HDF5 files are built in memory and written to disk in one plain write: the HDF5 library does not
recover from a failed write (on a full disk h5py raises from its close and the process then
crashes), and the in-memory image also gives the exact size for the disk-space check.

This module imports only the standard library and h5py (lazily), so every package may use it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

__all__ = ["OutputError", "check_output", "check_output_dir", "check_not_inputs",
           "check_new_output", "ensure_space", "atomic_write", "write_bytes", "write_text",
           "write_json", "atomic_h5", "h5_file", "format_bytes", "check_figure_path",
           "save_figure", "save_npz", "FIGURE_FORMATS"]

# Errors of the file system that a user can act on; everything else is a bug and keeps its traceback.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
# Free space asked beyond a file's estimated size (HDF5 metadata, rounding to blocks).
SPACE_MARGIN = (1.02, 64 << 10)  # factor, bytes


class OutputError(OSError):
    """An output that cannot or must not be written; the message names the path."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror if self.errno is not None and self.strerror else super().__str__()


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _label(path: Path, option: str | None) -> str:
    return f"{option} {path}" if option else str(path)


def check_output(path, *, option: str | None = None) -> Path:
    """The file to write for the output ``path``: ``path`` itself, or the target of a symbolic
    link at ``path``. Raises OutputError when an existing output (or link target) is not a regular
    file. ``option`` names the command-line option in the message (e.g. ``--out``)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as e:
        raise OutputError(f"cannot write {_label(path, option)}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        via = f" (a link to {target})" if target != path else ""
        raise OutputError(f"{_label(path, option)}{via} is a {_kind(mode)}, not a regular file; "
                          f"lensbench writes only regular files: choose another path")
    return target


def check_output_dir(path, *, option: str | None = None) -> Path:
    """``path`` as an output directory: absent, a directory or a link to one; OutputError if it
    is anything else."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        mode = os.stat(path).st_mode
        raise OutputError(f"{_label(path, option)} is a {_kind(mode) if not stat.S_ISREG(mode) else 'file'}, "
                          f"not a directory: choose another path")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{_label(path, option)} is a broken symbolic link")
    return path


def check_not_inputs(out, inputs: Mapping[str, object], *, option: str = "--out") -> None:
    """Refuse an output that is one of the command's inputs (the same file, by inode, so links and
    other spellings of the path count). ``inputs`` maps an option name to a path (None skipped)."""
    out = Path(out)
    if not out.exists():
        return
    for name, given in inputs.items():
        if given is None:
            continue
        given = Path(given)
        if given.exists() and os.path.samefile(out, given):
            raise OutputError(f"{option} {out} is the input {name} {given}: writing it would "
                              f"replace the input; choose another {option}")


def check_new_output(path, *, overwrite: bool, option: str = "--out") -> None:
    """The policy of commands writing one result file: an existing one is replaced only when the
    user said so (``--overwrite``)."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{option} {path} exists; pass --overwrite to replace it, or choose "
                          f"another path")


def _existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ensure_space(path, nbytes: float, *, what: str = "the output") -> None:
    """Refuse (OutputError, ENOSPC) when ``nbytes`` (plus ``SPACE_MARGIN``) exceed the free space
    of the file system that would hold ``path``."""
    where = _existing_parent(Path(path))
    free = shutil.disk_usage(where).free
    need = nbytes * SPACE_MARGIN[0] + SPACE_MARGIN[1]
    if need > free:
        raise OutputError(errno.ENOSPC,
                          f"{what} {path} needs about {format_bytes(need)} but its file system "
                          f"({where}) has {format_bytes(free)} free")


def _errno_of(err: BaseException) -> int | None:
    """The file-system error number behind ``err``: an OSError's, or the one HDF5/torch put in
    their message."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    match = re.search(r"errno\s*=\s*(\d+)", str(err))
    if match:
        return int(match.group(1))
    text = str(err)
    return next((code for code in _DISK_ERRORS if os.strerror(code) in text), None)


def _disk_error(path: Path, err: BaseException) -> OutputError | None:
    code = _errno_of(err)
    if code not in _DISK_ERRORS:
        return None
    return OutputError(code, f"cannot write {path}: {os.strerror(code).lower()}")


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write into {directory}: it exists and is not a directory") from None
    except OSError as e:
        raised = _disk_error(directory, e)
        if raised is None:
            raise
        raise raised from None


def atomic_write(path, write: Callable[[Path], None], *, fsync: bool = False,
                 exclusive: bool = False, option: str | None = None) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary file next to the target, which
    then replaces ``path`` (or a symbolic link's target, see ``check_output``).

    Args:
      fsync: flush the file to disk before the rename (checkpoints that must survive a crash).
      exclusive: create ``path`` only if nothing is there; FileExistsError otherwise (the
        check and the creation are one step, so two processes cannot both create it).
      option: the command-line option the path came from, for messages.
    Returns:
      the path written (the link's target for a symbolic link).
    Raises:
      OutputError for an output that is not a regular file, or a full / read-only / forbidden
      file system (temporary file removed, the previous file untouched).
    """
    target = check_output(path, option=option)
    _mkdir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raised = _disk_error(target, e)
        if raised is None:
            raise
        raise raised from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)  # fails if target exists: creation and check in one step
        else:
            os.replace(tmp, target)
    except BaseException as e:
        raised = None if isinstance(e, FileExistsError) else _disk_error(target, e)
        if raised is None:
            raise
        raise raised from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_bytes(path, data: bytes, **kwargs) -> Path:
    """``atomic_write`` of ``data``; the free space is checked first."""
    ensure_space(check_output(path, option=kwargs.get("option")), len(data))
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), **kwargs)


def write_text(path, text: str, **kwargs) -> Path:
    return write_bytes(path, text.encode(), **kwargs)


def write_json(path, obj, *, indent: int = 1, **kwargs) -> Path:
    """``obj`` as JSON (``default=str`` for objects JSON does not know, e.g. paths)."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n", **kwargs)


def save_npz(path, **arrays) -> Path:
    """``numpy.savez`` through ``atomic_write`` (to a file object: savez would add .npz to the
    temporary name)."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    ensure_space(check_output(path), sum(np.asarray(a).nbytes for a in arrays.values()))
    return atomic_write(path, write)


# Formats matplotlib's Agg-based savefig writes, by file suffix.
FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def check_figure_path(path, *, option: str | None = None) -> Path:
    """An output image path: a writable output (``check_output``) with a suffix matplotlib can
    write; checked before any work so that a typo does not waste a computation."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FIGURE_FORMATS:
        raise OutputError(f"{_label(path, option)}: unknown image format {path.suffix or '(none)'!r}; "
                          f"use one of {', '.join('.' + f for f in FIGURE_FORMATS)}")
    check_output(path, option=option)
    return path


def save_figure(fig, path, *, dpi: int = 110, option: str | None = None) -> Path:
    """``fig.savefig`` through ``atomic_write``, the format from the suffix."""
    fmt = check_figure_path(path, option=option).suffix.lstrip(".").lower()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt), option=option)


@contextlib.contextmanager
def h5_file(path) -> Iterator:
    """An ``h5py.File`` built in memory, written to ``path`` in one plain write on a normal exit
    (use inside ``atomic_write``'s callback; see the module docstring for why in memory)."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    data = buffer.getbuffer()
    ensure_space(path, data.nbytes)
    with open(path, "wb") as out:
        out.write(data)


@contextlib.contextmanager
def atomic_h5(path, *, exclusive: bool = False, option: str | None = None) -> Iterator:
    """Yield a new (in-memory) ``h5py.File``; on success it replaces ``path`` atomically, on any
    failure nothing is written."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_bytes(path, buffer.getbuffer(), exclusive=exclusive, option=option)
