"""PM simulation run files: simulate one into an HDF5 run file, and plot its power spectrum.

The library side of ``lensbench simulate`` and ``lensbench pk``; run files are written and read by
``experiments.io`` (``write_run``, ``read_run``). Error messages name the command-line options the
arguments come from. JAX is imported inside the functions, after the device count is chosen
(``experiments.jaxsetup``).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Optional

from .config import OptionError, parse_pdims
from .jaxsetup import cpu_devices_for

# The cosmology keywords ``run_simulation`` accepts (others keep ``Cosmology.fiducial()``'s value).
COSMOLOGY_OPTIONS = ("Omega_c", "Omega_b", "h", "n_s", "sigma8", "w0", "wa")


def parse_triple(text: str, what: str, cast):
    """'64' -> 64, '64x64x256' (or '64×64×256') -> (64, 64, 256), each part through ``cast``.
    OptionError naming the option ``what`` for anything else."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) not in (1, 3):
            raise ValueError
        values = tuple(cast(p) for p in parts)
    except ValueError:
        raise OptionError(f"{what} must be one number or three like 64x64x256, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _cosmology(overrides: Optional[dict]):
    """``Cosmology.fiducial()`` with the non-None values of ``overrides`` (COSMOLOGY_OPTIONS keys)."""
    from simulators import Cosmology

    fiducial = Cosmology.fiducial()
    params = {k: getattr(fiducial, k) for k in COSMOLOGY_OPTIONS}
    params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Cosmology(**params)


def _checked_linear(ic: Path, particle_shape: tuple[int, int, int]):
    """The linear field of ``--ic`` (a .npy or a run file), checked against the particle grid."""
    import numpy as np

    from .io import load_linear

    linear = load_linear(ic)
    if linear.shape != particle_shape:
        raise ValueError(f"--ic: linear field has shape {linear.shape}, expected the particle grid "
                         f"{particle_shape} (mesh / mesh-factor)")
    if not np.all(np.isfinite(linear)):
        raise ValueError(f"--ic: linear field in {ic} contains NaN or inf values")
    return linear


def run_simulation(out: Path, *, mesh: str, box: str, steps: int, seed: int, a_init: float,
                   a_final: float, lpt_order: int, mesh_factor: int, pdims: str, halo: int,
                   dtype: str, ic: Optional[Path] = None, cosmology: Optional[dict] = None,
                   progress: bool = True, overwrite: bool = True) -> Path:
    """Simulate and write a run file; returns its path.

    mesh, box: 'N' or 'NXxNYxNZ' cells and 'L' or 'LXxLYxLZ' Mpc/h; pdims: the device grid 'PXxPY'
    (on CPU that many host devices are asked for); cosmology: COSMOLOGY_OPTIONS values, None
    keeping the fiducial one; ic: a linear field at z=0 on the particle grid instead of ``seed``.
    Raises OptionError for mesh/box/pdims text that does not parse, ValueError/OSError on other
    bad input (before any work: the output path, the step count and the disk space are checked
    first).
    """
    from .config import MAX_STEPS
    from .files import check_new_output, check_not_inputs, check_output, ensure_space

    check_output(out, option="--out")
    check_not_inputs(out, {"--ic": ic})
    check_new_output(out, overwrite=overwrite)
    if steps > MAX_STEPS:
        raise ValueError(f"--steps must be <= {MAX_STEPS} (lensbench's limit: PM runs use 5-100 "
                         f"steps), got {steps}")
    mesh_shape = parse_triple(mesh, "--mesh", int)
    box_size = parse_triple(box, "--box", float)
    px, py = parse_pdims(pdims)
    cpu_devices_for((px, py))

    import numpy as np

    from simulators import DeviceGrid, HaloOverflowError, SimConfig, simulate

    from .io import write_run
    from .progress import StepProgress, step_callback

    cosmo = _cosmology(cosmology)
    cfg = SimConfig(mesh_shape=mesh_shape, box_size=box_size, mesh_factor=mesh_factor,
                    a_init=a_init, a_final=a_final, n_steps=steps, lpt_order=lpt_order,
                    dtype=dtype, grid=DeviceGrid((px, py), halo=halo))
    # simulate() checks the field too, but checking here fails before any output or compilation
    linear = None if ic is None else _checked_linear(ic, cfg.particle_shape)

    # density on the mesh, positions and the linear field on the particle grid
    ensure_space(out, np.dtype(dtype).itemsize * (np.prod(cfg.mesh_shape) + 4 * cfg.n_particles),
                 what="the run file")
    n_steps = len(cfg.step_scale_factors) - 1
    source = f"linear field from {ic}" if ic is not None else f"seed {seed}"
    print(f"simulating {'x'.join(map(str, cfg.mesh_shape))} mesh, "
          f"{'x'.join(f'{b:g}' for b in cfg.box_size)} Mpc/h box, {cfg.n_particles} particles, "
          f"{n_steps} steps from a={cfg.a_init:g} to {cfg.a_final:g}, {source}, "
          f"device grid {px}x{py} (first run compiles)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with StepProgress(n_steps, desc="PM steps", enabled=progress):
        try:
            result = simulate(cosmo, cfg, seed=seed, linear=linear, progress=step_callback)
        except HaloOverflowError as e:  # say it in command-line terms
            message, n = re.subn(r"DeviceGrid\(halo=(\d+)\)", r"--halo \1", str(e))
            raise HaloOverflowError(message if n else f"{e} (raise --halo)") from None
    elapsed = time.perf_counter() - start
    path = write_run(out, result, cosmo, seed=None if ic is not None else seed,
                     ic_file=None if ic is None else str(ic))
    print(f"wrote {path} ({elapsed:.1f} s)")
    return path


def power_spectra(data, n_bins: Optional[int] = None) -> dict:
    """P(k) of a run (``io.read_run``) against linear theory, all at the run's final a.

    Returns numpy arrays, k in h/Mpc and P in (Mpc/h)^3: ``k``, ``pk`` (the PM density contrast,
    non-empty linear k bins; ``n_bins`` of them before dropping empty ones, default mesh/2),
    ``p_lin`` (linear theory at ``k``), ``k_lin``, ``pk_lin`` (the run's own linear field grown
    by D², which shares the PM density's sample variance at low k), ``k_fine``, ``p_lin_fine``
    (a smooth theory curve), and the float ``k_nyq`` (the mesh's lowest Nyquist wavenumber).
    """
    import jax.numpy as jnp
    import numpy as np

    from simulators import growth_table, linear_power, power_spectrum

    def measured(field):
        k, p, n = (np.asarray(x) for x in power_spectrum(jnp.asarray(field, dtype=jnp.float64),
                                                         data.box_size, n_bins=n_bins))
        return k[n > 0], p[n > 0]

    cosmo = data.cosmology()
    growth2 = float(growth_table(cosmo).D1_at(float(data.config["a_final"]))) ** 2
    k, pk = measured(np.asarray(data.density, np.float64) - 1.0)
    k_lin, pk_lin = measured(data.linear)
    k_fine = np.geomspace(k.min() * 0.8, k.max() * 1.25, 256)
    return dict(k=k, pk=pk, p_lin=np.asarray(linear_power(cosmo, k)) * growth2,
                k_lin=k_lin, pk_lin=pk_lin * growth2, k_fine=k_fine,
                p_lin_fine=np.asarray(linear_power(cosmo, k_fine)) * growth2,
                k_nyq=np.pi * min(n / b for n, b in zip(data.density.shape, data.box_size)))


def run_power_spectrum(run: Path, out: Path, n_bins: Optional[int] = None, rows: int = 8) -> Path:
    """Measure P(k) of a run file's density, plot it against linear theory into the image ``out``
    (format from its suffix) and print ``rows`` rows of the table P/P_lin; returns ``out``."""
    import numpy as np

    from .files import check_figure_path, check_not_inputs
    from .io import read_run
    from .plots import plot_power_spectrum

    check_figure_path(out, option="--out")
    check_not_inputs(out, {"RUN": run})
    data = read_run(run)
    spectra = power_spectra(data, n_bins)
    cfg, cosmo = data.config, data.cosmology()
    out = plot_power_spectrum(
        out, spectra, a_final=float(cfg["a_final"]), n_steps=cfg["n_steps"],
        mesh_factor=int(cfg.get("mesh_factor", 1)),
        title=f"lensbench: {'x'.join(map(str, cfg['mesh_shape']))} mesh, "
              f"{'x'.join(f'{b:g}' for b in data.box_size)} Mpc/h box, "
              f"$\\Omega_c$={cosmo.Omega_c:.3g}, $\\sigma_8$={cosmo.sigma8:.3g}")

    k, pk, p_lin = spectra["k"], spectra["pk"], spectra["p_lin"]
    print(f"{'k [h/Mpc]':>10} {'P(k) [(Mpc/h)^3]':>17} {'P_lin [(Mpc/h)^3]':>18} {'P/P_lin':>8}")
    for i in np.unique(np.linspace(0, len(k) - 1, min(rows, len(k))).round().astype(int)):
        print(f"{k[i]:10.4f} {pk[i]:17.5g} {p_lin[i]:18.5g} {pk[i] / p_lin[i]:8.3f}")
    print(f"wrote {out}")
    return out
