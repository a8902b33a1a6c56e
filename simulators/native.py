"""Compiled CPU kernels for CIC paint/read, called inside jit through XLA's FFI.

The C++ source (``_native/cic.cc``) is compiled on first use with the system C++ compiler against
the headers that ship with jaxlib, into a per-user cache keyed by the source, the jaxlib version
and the compiler flags, then registered as FFI targets. If no compiler is found, or
``LENSBENCH_NATIVE=0`` is set, ``available()`` is False and painting uses pure-JAX scatter/gather
(also the path on GPU, where XLA's scatter is fast). The kernels are exact to round-off against
the pure-JAX path (tests/test_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from .cpu import cpu_signature

SOURCE = Path(__file__).parent / "_native" / "cic.cc"
# -march=native: hardware floor/FMA make the kernels ~1.5x faster than generic x86-64; the cache
# key includes the CPU signature (its feature flags), so a cache shared between machines rebuilds
# per CPU type.
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_SUFFIX = {jnp.dtype("float32"): "f32", jnp.dtype("float64"): "f64"}


def _cache_dir() -> Path:
    root = os.environ.get("LENSBENCH_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lensbench"


def _build() -> Path:
    import jaxlib

    key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode() + " ".join(FLAGS).encode()
                         + cpu_signature().encode())
    lib = _cache_dir() / f"cic-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temporary name and rename: concurrent processes never see a partial library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def _load() -> bool:
    if os.environ.get("LENSBENCH_NATIVE", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (RuntimeError, OSError) as err:
        warnings.warn(f"lensbench: native CIC kernels unavailable, using pure JAX ({err})",
                      RuntimeWarning, stacklevel=2)
        return False
    for kind in ("paint", "read", "read_first", "read_grad"):
        for suffix in _SUFFIX.values():
            name = f"lb_cic_{kind}_{suffix}"
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return True


def available(dtype) -> bool:
    """True if the compiled kernels can run ``dtype`` on the current (CPU) backend."""
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) in _SUFFIX and _load()


def _call(kind, out_shape, dtype, *args, mesh_factor, offset, wrap):
    name = f"lb_cic_{kind}_{_SUFFIX[jnp.dtype(dtype)]}"
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(out_shape, dtype), vmap_method="sequential")
    return call(*args, mesh_factor=int(mesh_factor), offset=int(offset), wrap_xy=int(wrap))


def paint(mesh_shape, disp, values, mesh_factor, offset, wrap):
    """mesh (nx, ny, nz, C) = Σ_p CIC weights × values (npx, npy, npz, C); disp in cells."""
    shape = tuple(mesh_shape) + (values.shape[-1],)
    return _call("paint", shape, disp.dtype, disp, values, mesh_factor=mesh_factor,
                 offset=offset, wrap=wrap)


def read(field, disp, mesh_factor, offset, wrap):
    """(npx, npy, npz, C) CIC interpolation of ``field`` (nx, ny, nz, C) at the particles."""
    shape = disp.shape[:3] + (field.shape[-1],)
    return _call("read", shape, disp.dtype, field, disp, mesh_factor=mesh_factor,
                 offset=offset, wrap=wrap)


def read_first(field, disp, count, mesh_factor, offset, wrap):
    """``read`` of the first ``count`` (int32 scalar, traced) particles in C order; 0 for the rest."""
    shape = disp.shape[:3] + (field.shape[-1],)
    return _call("read_first", shape, disp.dtype, field, disp, jnp.asarray(count, jnp.int32),
                 mesh_factor=mesh_factor, offset=offset, wrap=wrap)


def read_grad(field, disp, cotangent, mesh_factor, offset, wrap):
    """(npx, npy, npz, 3) ∂/∂disp of Σ cotangent · read(field, disp)."""
    return _call("read_grad", disp.shape, disp.dtype, field, disp, cotangent,
                 mesh_factor=mesh_factor, offset=offset, wrap=wrap)


if __name__ == "__main__":  # `python -m simulators.native` builds the kernels ahead of time
    print(_build())
    sys.exit(0 if _load() else 1)
