"""The ``lensbench`` command line: simulations, κ maps, their spectra, and the demo.

    lensbench simulate --mesh 64 --box 256 --steps 10 --seed 0 --out run.h5
    lensbench pk run.h5 --out pk.png
    lensbench maps --config quick --seed 0 --out maps.h5 --png maps.png
    lensbench cl maps.h5 --out cl.png
    lensbench demo --out-dir out

Implicit inference and the C_ell baseline (experiments/pipeline.py):

    lensbench generate --config quick --n 1000 --out sims.h5
    lensbench generate --config quick --n 1000 --part 3/8 --out part3.h5   # one part of it
    lensbench merge part1.h5 ... part8.h5 --out sims.h5                   # all 8 parts -> sims.h5
    lensbench train-compressor --config quick --sims sims.h5 --loss vmim --out compressor/
    lensbench compress --compressor compressor/ --in maps.h5 --out summaries.h5
    lensbench fit-posterior --config quick --sims sims.h5 --compressor compressor/ --out posterior/
    lensbench sample --posterior posterior/ --maps maps.h5 --n 20000 --out samples.h5
    lensbench cl-baseline --config quick --maps maps.h5 --out cl_samples.h5

Explicit inference and the comparison harness (experiments/compare.py):

    lensbench hmc --config quick --maps maps.h5 --out chains/
    lensbench compare --config quick --out results/quick [--force STAGE]
    lensbench plot results/quick --method hmc --method npe_vmim --param Omega_m --param sigma8
    lensbench demo                      # = compare on the quick config into results/quick

``maps`` reads an experiment configuration (TOML; ``experiments/config.py`` documents the schema):
a path, or the name of a shipped one (``quick``, ``lsst_y10`` in ``experiments/configs``).

Device count and JAX imports. ``--pdims 2x2`` needs four devices; on a CPU-only machine JAX makes
several host devices only if told so before its backends start (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``, or the equivalent ``jax_num_cpu_devices`` option). This
module therefore never imports JAX (or ``simulators``, which imports JAX) at import time: every
command imports them inside its function body, which runs only after the argument parser has read
``--pdims``. ``simulate`` then sets ``jax_num_cpu_devices`` before anything touches a backend;
``maps`` does the same with the device grid of its configuration (or ``--pdims``), which it can read
before any backend starts because loading a configuration never starts one. This
avoids peeking at ``sys.argv`` (which would duplicate the parser and miss in-process invocations
such as ``typer.testing.CliRunner``). A device count the user chose through ``XLA_FLAGS`` or
``JAX_NUM_CPU_DEVICES`` is left alone; on GPU machines the option has no effect and the GPUs are
used.

Compiled programs are kept between runs. Unless ``JAX_COMPILATION_CACHE_DIR`` is set, every command
uses JAX's persistent compilation cache in ``$XDG_CACHE_HOME/lensbench/xla/<host CPU signature>``
(``~/.cache`` by default; at most 4 GiB, least recently used programs evicted). A resumed chain, a
rerun of ``compare`` or a chain's child process then loads its compiled programs instead of
compiling them again (minutes for the field-level HMC segment). ``JAX_ENABLE_COMPILATION_CACHE=false``
turns it off. The directory is per CPU signature because a CPU program compiled for one
instruction set must not be loaded on a node with another one sharing the same home directory.

Errors. Bad input (invalid cosmology or configuration, an unreadable file, a usage error) ends with
a single ``lensbench: error: ...`` line on stderr and a non-zero exit (2 for usage errors, 1 for
everything else, 130 on Ctrl-C), never a traceback. Set ``LENSBENCH_DEBUG=1`` to get the traceback
of a ValueError/OSError instead.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from typer.core import TyperGroup

from .config import MAX_SAMPLES, MAX_SIMS, parse_pdims

if TYPE_CHECKING:
    from .config import ExperimentConfig

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - older typer built on the click package
    from click import exceptions as _click_exceptions

# The defaults of `lensbench simulate` (a 64^3, 256 Mpc/h, 10-step fiducial run).
DEMO = dict(mesh="64", box="256", steps=10, seed=0, a_init=0.1, a_final=1.0, lpt_order=2,
            mesh_factor=1, pdims="1x1", halo=8, dtype="float32")
# The experiment configuration the demo compares methods on (a shipped name or a path).
DEMO_MAPS_CONFIG = "quick"
COSMOLOGY_OPTIONS = ("Omega_c", "Omega_b", "h", "n_s", "sigma8", "w0", "wa")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int, prefix: str = "lensbench") -> None:
    print(f"{prefix}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def _host_signature() -> str:
    """A short hash of this machine's CPU type and instruction-set flags (Linux), or its
    architecture name elsewhere: compiled CPU programs are only valid on matching hardware."""
    import hashlib
    import platform

    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            text += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine() or 'cpu'}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _use_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at lensbench's user cache directory, unless the
    user chose one (or JAX is already imported in this process: then its configuration is the
    caller's). Only environment variables are set, so JAX is not imported here; child processes
    (``[hmc] processes``) inherit them and share the cache. Programs are kept whatever their
    compile time unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise."""
    if "jax" in sys.modules:
        return
    # JAX only keeps programs that took >= 1 s to compile; the set-up programs of a run (linear
    # field, initial particles, one PM step: 0.05-1 s each) would be compiled anew by every process.
    # Loading any kept program costs milliseconds, so keep them all (also in a directory the user
    # chose, such as the test suite's).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "lensbench" / "xla" / _host_signature()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only or missing home: run without the cache
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one ``lensbench: warning: ...`` line, without the source line."""
    print(f"lensbench: warning: {_one_line(message)}", file=file or sys.stderr, flush=True)


class _OneLineErrors(TyperGroup):
    """Run commands in non-standalone mode and turn every expected failure into one stderr line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _use_compilation_cache()
        import warnings

        warnings.showwarning = _show_warning
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_exceptions.NoArgsIsHelpError as e:  # `lensbench simulate` with no options
            print(e.format_message(), file=sys.stderr)
            sys.exit(e.exit_code)
        except _click_exceptions.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail(e.format_message() + hint, e.exit_code,
                  prefix=ctx.command_path if ctx is not None else "lensbench")
        except (typer.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except (ValueError, OSError) as e:  # invalid parameters, unreadable or missing files
            if os.environ.get("LENSBENCH_DEBUG"):
                raise
            _fail(str(e) or type(e).__name__, 1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="lensbench",
    help="Differentiable particle-mesh weak lensing: simulations, convergence maps, their spectra.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# ---- argument parsing -------------------------------------------------------------------------

def _triple(text: str, what: str, cast):
    """'64' -> 64, '64x64x256' -> (64, 64, 256)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) not in (1, 3):
            raise ValueError
        values = tuple(cast(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"{what} must be one number or three like 64x64x256, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _pdims(text: str) -> tuple[int, int]:
    """``config.parse_pdims`` as a usage error (exit 2)."""
    try:
        return parse_pdims(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _part(text: str) -> tuple[int, int]:
    """``--part`` '3/8' -> (3, 8): part 3 of 8, 1-based (whether N parts fit the n simulations is
    checked later, when n is known)."""
    def bad(message):
        return typer.BadParameter(message, param_hint="'--part'")

    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise bad(f"must look like I/N, e.g. 3/8 for part 3 of 8, got {text!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise bad(f"{text!r}: the number of parts N of I/N must be at least 1")
    if not 1 <= index <= count:
        raise bad(f"{text!r}: the part number I of I/N must be between 1 and N = {count}")
    return index, count


def _request_cpu_devices(n: int) -> None:
    """Ask JAX for ``n`` host devices; must run before any JAX backend starts (see module docstring)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
            or "JAX_NUM_CPU_DEVICES" in os.environ:
        return  # the user chose a device count
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        # Backends already started in this process (JAX was used before the command ran): keep
        # what exists; DeviceGrid explains if that is too few devices.
        pass


# ---- the work ---------------------------------------------------------------------------------

def run_simulation(out: Path, *, mesh: str, box: str, steps: int, seed: int, a_init: float,
                   a_final: float, lpt_order: int, mesh_factor: int, pdims: str, halo: int,
                   dtype: str, ic: Optional[Path] = None, cosmology: Optional[dict] = None,
                   progress: bool = True, overwrite: bool = True) -> Path:
    """Simulate and write a run file; returns its path. Raises ValueError/OSError on bad input
    (before any work: the output path, the step count and the disk space are checked first)."""
    from .config import MAX_STEPS
    from .files import check_new_output, check_not_inputs, check_output, ensure_space

    check_output(out, option="--out")
    check_not_inputs(out, {"--ic": ic})
    check_new_output(out, overwrite=overwrite)
    if steps > MAX_STEPS:
        raise ValueError(f"--steps must be <= {MAX_STEPS} (lensbench's limit: PM runs use 5-100 "
                         f"steps), got {steps}")
    mesh_shape = _triple(mesh, "--mesh", int)
    box_size = _triple(box, "--box", float)
    px, py = _pdims(pdims)
    if px * py > 1:
        # jax 0.10's GSPMD partitioner (which simulators selects) logs a deprecation warning for
        # every compiled sharded function; keep XLA's C++ log to errors unless the user chose.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _request_cpu_devices(px * py)

    import numpy as np

    from simulators import Cosmology, DeviceGrid, HaloOverflowError, SimConfig, simulate

    from .io import load_linear, write_run
    from .progress import StepProgress, step_callback

    fiducial = Cosmology.fiducial()
    params = {k: getattr(fiducial, k) for k in COSMOLOGY_OPTIONS}
    params.update({k: v for k, v in (cosmology or {}).items() if v is not None})
    cosmo = Cosmology(**params)
    cfg = SimConfig(mesh_shape=mesh_shape, box_size=box_size, mesh_factor=mesh_factor,
                    a_init=a_init, a_final=a_final, n_steps=steps, lpt_order=lpt_order,
                    dtype=dtype, grid=DeviceGrid((px, py), halo=halo))
    linear = None
    if ic is not None:
        # simulate() checks this too, but checking here fails before any output or compilation
        linear = load_linear(ic)
        if linear.shape != cfg.particle_shape:
            raise ValueError(f"--ic: linear field has shape {linear.shape}, expected the particle grid "
                             f"{cfg.particle_shape} (mesh / mesh-factor)")
        if not np.all(np.isfinite(linear)):
            raise ValueError(f"--ic: linear field in {ic} contains NaN or inf values")

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


def run_power_spectrum(run: Path, out: Path, n_bins: Optional[int] = None, rows: int = 8) -> Path:
    """Measure P(k) of a run file's density, plot it against linear theory, save a PNG."""
    from .files import check_figure_path, check_not_inputs, save_figure
    from .io import read_run

    check_figure_path(out, option="--out")
    check_not_inputs(out, {"RUN": run})
    data = read_run(run)

    import jax.numpy as jnp
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulators import growth_table, linear_power, power_spectrum

    cosmo = data.cosmology()
    box = data.box_size
    a_final = float(data.config["a_final"])
    delta = jnp.asarray(data.density, dtype=jnp.float64) - 1.0
    k, pk, n_modes = (np.asarray(x) for x in power_spectrum(delta, box, n_bins=n_bins))
    keep = n_modes > 0
    k, pk = k[keep], pk[keep]
    growth2 = float(growth_table(cosmo).D1_at(a_final)) ** 2
    p_lin = np.asarray(linear_power(cosmo, k)) * growth2
    # The same realisation's linear field, grown linearly: separates sample variance (shared with
    # the PM density at low k) from nonlinear evolution and mesh effects.
    k_l, pk_l, n_l = (np.asarray(x) for x in power_spectrum(
        jnp.asarray(data.linear, dtype=jnp.float64), box, n_bins=n_bins))
    k_l, pk_l = k_l[n_l > 0], pk_l[n_l > 0] * growth2
    k_fine = np.geomspace(k.min() * 0.8, k.max() * 1.25, 256)
    p_lin_fine = np.asarray(linear_power(cosmo, k_fine)) * growth2
    k_nyq = np.pi * min(n / b for n, b in zip(data.density.shape, box))

    cfg = data.config
    mesh = "x".join(map(str, cfg["mesh_shape"]))
    boxtxt = "x".join(f"{b:g}" for b in box)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    ax.loglog(k_fine, p_lin_fine, "k--", lw=1.2, label=f"linear theory $P_{{lin}}(k)\\,D^2(a={a_final:g})$")
    ax.loglog(k_l, pk_l, "-", lw=1, color="0.55", label="this run's linear field $\\times\\,D^2$")
    ax.loglog(k, pk, "o-", ms=3.5, lw=1.2, color="C0", label=f"PM density, {cfg['n_steps']} steps")
    ax.axvline(k_nyq, color="0.6", ls=":", lw=1, label="mesh Nyquist")
    if int(cfg.get("mesh_factor", 1)) > 1:  # the particle lattice is coarser than the mesh
        ax.axvline(k_nyq / int(cfg["mesh_factor"]), color="0.6", ls="-.", lw=1,
                   label="particle-grid Nyquist")
    ax.set_xlabel(r"$k$ [$h\,\mathrm{Mpc}^{-1}$]")
    ax.set_ylabel(r"$P(k)$ [$h^{-3}\,\mathrm{Mpc}^{3}$]")
    ax.set_title(f"lensbench: {mesh} mesh, {boxtxt} Mpc/h box, "
                 f"$\\Omega_c$={cosmo.Omega_c:.3g}, $\\sigma_8$={cosmo.sigma8:.3g}", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    out = save_figure(fig, out, dpi=120, option="--out")
    plt.close(fig)

    print(f"{'k [h/Mpc]':>10} {'P(k) [(Mpc/h)^3]':>17} {'P_lin [(Mpc/h)^3]':>18} {'P/P_lin':>8}")
    for i in np.unique(np.linspace(0, len(k) - 1, min(rows, len(k))).round().astype(int)):
        print(f"{k[i]:10.4f} {pk[i]:17.5g} {p_lin[i]:18.5g} {pk[i] / p_lin[i]:8.3f}")
    print(f"wrote {out}")
    return out


def _cpu_devices_for(pdims: tuple[int, int]) -> None:
    px, py = pdims
    if px * py > 1:
        # jax 0.10's GSPMD partitioner (which simulators selects) logs a deprecation warning for
        # every compiled sharded function; keep XLA's C++ log to errors unless the user chose.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _request_cpu_devices(px * py)


def run_maps(config, out: Path, *, seed: Optional[int] = None, pdims: Optional[str] = None,
             png: Optional[Path] = None, progress: bool = True, fits: Optional[Path] = None,
             overwrite: bool = True) -> Path:
    """Simulate one realisation of the κ maps of a configuration and write a map file.

    config: a TOML path, a shipped config name, or an ``ExperimentConfig``. seed/pdims override
    the configuration's (the file records the values used). Raises ValueError/OSError on bad input.
    """
    from .config import ExperimentConfig, load_config, peek_pdims
    from .files import check_figure_path, check_new_output, check_output, ensure_space

    outputs = {"--out": out, "--png": png, "--fits": fits}
    for option, path in outputs.items():
        if path is None:
            continue
        if option == "--png":
            check_figure_path(path, option=option)
        else:
            check_output(path, option=option)
        check_new_output(path, overwrite=overwrite, option=option)
    given = [Path(p).resolve() for p in outputs.values() if p is not None]
    if len(set(given)) < len(given):
        raise ValueError("--out, --png and --fits must be different files")

    if pdims is not None or not isinstance(config, ExperimentConfig):
        # XLA reads its log level when JAX loads, which loading the configuration does: hide the
        # GSPMD deprecation warnings of sharded runs before that (as `simulate` does)
        px, py = _pdims(pdims) if pdims is not None else peek_pdims(config)
        if px * py > 1:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    changes = {}
    if seed is not None:
        changes["seed"] = int(seed)
    if pdims is not None:
        changes["simulation.pdims"] = "x".join(map(str, _pdims(pdims)))
    if changes:
        cfg = cfg.with_(**changes)
    if fits is not None and cfg.maps.sky != "healpix":
        raise ValueError("--fits needs HEALPix maps (maps.sky = 'healpix'); this configuration "
                         "makes flat-sky maps")
    if cfg.simulation.kind not in ("gaussian", "lognormal"):
        _cpu_devices_for(cfg.simulation.pdim_tuple)

    from simulators import HaloOverflowError
    from simulators.lensing import simulate_maps

    from .io import write_maps

    model = cfg.build_model()
    sky = cfg.maps
    geometry = (f"{sky.field_deg:g}x{sky.field_deg:g} deg, {sky.npix}^2 pixels" if sky.sky == "flat"
                else f"HEALPix nside {sky.nside}")
    bins = cfg.bins()
    sim = cfg.simulation
    if sim.kind in ("gaussian", "lognormal"):
        what = f"{sim.kind} random field (Limber C_ell)"
        chi_max = observer = None
    else:
        cone = model.lightcone
        chi_max, observer = cone.chi_max, tuple(cone.observer_position(sim.box_size))
        what = (f"{'PM, ' + str(sim.n_steps) + ' steps' if sim.kind == 'pm' else 'LPT lightcone'}, "
                f"{'x'.join(map(str, sim.mesh_shape))} mesh, "
                f"{'x'.join(f'{b:g}' for b in sim.box_size)} Mpc/h box, depth {chi_max:.0f} Mpc/h, "
                f"device grid {sim.pdims}")
    n_pix = sky.npix ** 2 if sky.sky == "flat" else 12 * sky.nside ** 2
    ensure_space(out, 8 * bins.n_bins * n_pix * (2 if fits is None else 4), what="the map file")
    print(f"{cfg.name}: {bins.n_bins} tomographic bins, {geometry}; {what}; seed {cfg.seed} "
          f"(first run compiles)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    from .progress import StepProgress, step_callback

    try:
        with StepProgress(sim.n_steps, desc="PM steps", enabled=progress and sim.kind == "pm"):
            maps = simulate_maps(model, cfg.cosmology(), cfg.seed, progress=step_callback)
    except HaloOverflowError as e:  # say it in configuration terms
        message, n = re.subn(r"DeviceGrid\(halo=(\d+)\)", r"simulation.halo = \1", str(e))
        raise HaloOverflowError(message if n else f"{e} (raise simulation.halo)") from None
    elapsed = time.perf_counter() - start
    path = write_maps(out, maps, cfg, bins, chi_max=chi_max, observer=observer)
    print(f"wrote {path} ({elapsed:.1f} s)")
    if fits is not None:
        from .io import write_healpix_fits

        print(f"wrote {write_healpix_fits(fits, maps, bins)}")
    if png is not None:
        from .plots import plot_maps

        img = plot_maps(png, maps.kappa, sky=sky.sky, field_deg=sky.field_deg,
                        mean_z=bins.mean_z, title=f"{cfg.name}: noise-free convergence, seed {cfg.seed}")
        print(f"wrote {img}")
    return path


def _theory_nodes(data, edges):
    """The multipoles at which Limber theory is needed to bin it as the estimator bins the maps:
    a ln(ell) table over all FFT modes (flat sky; cheaper than Limber at each of the npix^2
    modes), or every integer multipole in the bins (HEALPix)."""
    import numpy as np

    from simulators import flatsky

    if data.sky == "flat":
        modes = flatsky.mode_ell(float(data.attrs["field_deg"]), int(data.attrs["npix"]))
        lo, hi = modes[modes > 0].min(), modes.max()
        return np.geomspace(lo * (1 - 1e-9), hi * (1 + 1e-9), 256)
    return np.arange(1, int(np.ceil(edges[-1])), dtype=np.float64)  # 1 <= ell < last edge


def _binned_theory(data, edges, nodes, cl_nodes):
    """Limber C_ell (n_pairs, n_ell) averaged as the estimator averages: over the same FFT modes
    (flat sky) or with 2l+1 weights over the integer multipoles of each bin (HEALPix)."""
    import numpy as np

    from simulators import flatsky

    if data.sky == "flat":
        return np.asarray(flatsky.binned_model_cl((nodes, cl_nodes), float(data.attrs["field_deg"]),
                                                  int(data.attrs["npix"]), edges)[0])
    from simulators.fullsky import bin_cl

    per_ell = np.zeros((cl_nodes.shape[0], len(nodes) + 1))  # index = ell; Limber has no ell = 0
    per_ell[:, 1:] = cl_nodes
    return bin_cl(per_ell, edges)[0]


def run_cl(maps: Path, out: Path, *, noisy: bool = False, rows: int = 8) -> Path:
    """Tomographic C_ell of a map file against Limber theory: a PNG triangle and an .npz next to it."""
    from .files import check_figure_path, check_not_inputs, check_output, save_npz
    from .io import read_maps

    out = check_figure_path(out, option="--out")
    npz = out.with_suffix(".npz")
    check_output(npz, option="--out (.npz)")
    check_not_inputs(out, {"MAPS": maps})
    check_not_inputs(npz, {"MAPS": maps}, option="--out (.npz)")
    data = read_maps(maps)

    import jax
    import numpy as np

    from simulators import flatsky

    from .plots import plot_cl_triangle

    cosmo, bins = data.cosmology(), data.bins()
    kappa = data.kappa_noisy if noisy else data.kappa
    edges = np.asarray(data.ell_edges, np.float64)
    i, j = flatsky.pair_indices(data.n_bins)
    if data.sky == "flat":
        cl, ell, n_modes = flatsky.cl_estimate(kappa, float(data.attrs["field_deg"]), edges)
    else:
        try:
            from simulators.fullsky import cl_estimate_healpix
        except ImportError:
            raise ValueError(f"{maps} holds HEALPix maps, and the full-sky C_ell estimator "
                             f"(simulators.fullsky.cl_estimate_healpix) is not available yet") from None
        cl, ell, n_modes = cl_estimate_healpix(kappa, edges)
    cl, ell, n_modes = (np.asarray(x) for x in (cl, ell, n_modes))

    nodes = _theory_nodes(data, edges)
    ell_lo = max(edges[0], 1.0) if data.sky != "flat" else max(edges[0], float(
        flatsky.mode_ell(float(data.attrs["field_deg"]), int(data.attrs["npix"]))[0, 1]))
    ell_fine = np.geomspace(ell_lo, edges[-1], 128)
    # One compiled Limber evaluation for both sets of multipoles (eager halofit is much slower),
    # padded to a power of two >= 512 so that one compilation serves most map files
    ells = np.concatenate([nodes, ell_fine])
    size = max(512, 1 << (len(ells) - 1).bit_length())
    ells = np.concatenate([ells, np.full(size - len(ells), ells[-1])])
    window = _mesh_window(data)
    limber = jax.jit(lambda c, b, l: flatsky.limber_cl(c, b, l, power_filter=window))
    cl_all = np.asarray(limber(cosmo, bins, ells))
    cl_nodes = cl_all[:, :len(nodes)]
    theory_fine = cl_all[:, len(nodes):len(nodes) + len(ell_fine)]
    signal = _binned_theory(data, edges, nodes, cl_nodes)
    sigma_n = np.asarray(data.sigma_n)
    noise = np.where(i == j, np.asarray(flatsky.noise_cl(sigma_n[i], data.pixel_area)), 0.0) \
        if noisy else np.zeros(len(i))
    theory = signal + noise[:, None]

    pairs = np.stack([i, j], axis=1)
    save_npz(npz, ell=ell, ell_edges=edges, cl=cl, theory=theory, theory_signal=signal,
             noise=noise, n_modes=n_modes, pairs=pairs, noisy=np.bool_(noisy),
             ell_fine=ell_fine, theory_fine=theory_fine)
    which = "noisy" if noisy else "noise-free"
    vs = "Limber x mesh window" if window is not None else "Limber"
    title = (f"{data.attrs['name']}: {which} maps (seed {data.attrs['seed']}) vs {vs}, "
             f"$\\Omega_c$={cosmo.Omega_c:.3g}, $\\sigma_8$={cosmo.sigma8:.3g}")
    plot_cl_triangle(out, ell, cl, theory, pairs, ell_fine=ell_fine, theory_fine=theory_fine,
                     noise=noise if noisy else None, title=title)

    autos = np.flatnonzero(i == j)
    print(f"C_ell of the {which} maps / theory{' (+ noise)' if noisy else ''}, auto-spectra:")
    print(f"{'ell':>8} {'modes':>6} " + " ".join(f"{f'({b + 1},{b + 1})':>7}" for b in i[autos]))
    keep = np.flatnonzero(n_modes > 0)
    for r in keep[np.unique(np.linspace(0, len(keep) - 1, min(rows, len(keep))).round().astype(int))] \
            if keep.size else []:
        print(f"{ell[r]:8.1f} {int(n_modes[r]):6d} "
              + " ".join(f"{cl[p, r] / theory[p, r]:7.3f}" for p in autos))
    print(f"wrote {out} and {npz}")
    return out


def _mesh_window(data):
    """Theory factor for maps read off a PM/LPT mesh (CIC painting + trilinear reading smooth the
    density, ``lensing.mesh_power_window``); None for Gaussian maps, which have no mesh."""
    if data.attrs.get("kind") not in ("pm", "lpt"):
        return None
    from simulators.lensing import mesh_power_window

    return mesh_power_window(data.config().simulation.sim_config(sharded=False).cell_size)


# ---- commands ---------------------------------------------------------------------------------

def _cosmo_option(name: str, help_text: str):
    return typer.Option(f"--{name}", help=help_text, show_default=False,
                        rich_help_panel="Cosmology (defaults: Cosmology.fiducial())")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output HDF5 run file.", dir_okay=False)],
    mesh: Annotated[str, typer.Option(help="Force mesh cells: N or NXxNYxNZ.")] = DEMO["mesh"],
    box: Annotated[str, typer.Option(help="Box size in Mpc/h: L or LXxLYxLZ.")] = DEMO["box"],
    steps: Annotated[int, typer.Option(help="Number of PM time steps (uniform in a).")] = DEMO["steps"],
    seed: Annotated[int, typer.Option(help="White-noise seed (ignored with --ic).",
                                      min=0, max=2**63 - 1)] = DEMO["seed"],
    omega_c: Annotated[Optional[float], _cosmo_option("omega-c", "Cold dark matter density.")] = None,
    omega_b: Annotated[Optional[float], _cosmo_option("omega-b", "Baryon density.")] = None,
    h: Annotated[Optional[float], _cosmo_option("h", "Hubble parameter H0/100.")] = None,
    n_s: Annotated[Optional[float], _cosmo_option("n-s", "Scalar spectral index.")] = None,
    sigma8: Annotated[Optional[float], _cosmo_option("sigma8", "Amplitude sigma_8 at z=0.")] = None,
    w0: Annotated[Optional[float], _cosmo_option("w0", "Dark-energy w0.")] = None,
    wa: Annotated[Optional[float], _cosmo_option("wa", "Dark-energy wa.")] = None,
    a_init: Annotated[float, typer.Option(help="Initial scale factor (LPT).")] = DEMO["a_init"],
    a_final: Annotated[float, typer.Option(help="Final scale factor (<= 1).")] = DEMO["a_final"],
    lpt_order: Annotated[int, typer.Option(help="LPT order of the initial conditions (1 or 2).")] = DEMO["lpt_order"],
    mesh_factor: Annotated[int, typer.Option(help="Force-mesh cells per particle spacing.")] = DEMO["mesh_factor"],
    ic: Annotated[Optional[Path], typer.Option(
        help="Linear overdensity at z=0 on the particle grid (.npy, or a run file's 'linear').",
        dir_okay=False)] = None,
    pdims: Annotated[str, typer.Option(
        help="Device grid PXxPY; on CPU that many host devices are created.")] = DEMO["pdims"],
    halo: Annotated[int, typer.Option(help="Halo width in mesh cells for sharded painting.")] = DEMO["halo"],
    dtype: Annotated[str, typer.Option(help="Field and particle dtype: float32 or float64.")] = DEMO["dtype"],
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
):
    """Run a PM simulation and write density, positions and the linear field to an HDF5 file.
    An existing --out is refused unless --overwrite is given."""
    cosmology = dict(Omega_c=omega_c, Omega_b=omega_b, h=h, n_s=n_s, sigma8=sigma8, w0=w0, wa=wa)
    run_simulation(out, mesh=mesh, box=box, steps=steps, seed=seed, a_init=a_init, a_final=a_final,
                   lpt_order=lpt_order, mesh_factor=mesh_factor, pdims=pdims, halo=halo, dtype=dtype,
                   ic=ic, cosmology=cosmology, progress=progress, overwrite=overwrite)


@app.command()
def pk(
    run: Annotated[Path, typer.Argument(help="Run file written by 'lensbench simulate'.",
                                        exists=True, dir_okay=False, readable=True)],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Output PNG (default: RUN_pk.png next to RUN).", dir_okay=False)] = None,
    n_bins: Annotated[Optional[int], typer.Option(
        help="Number of linear k bins (default: mesh/2).", min=1)] = None,
):
    """Measure the power spectrum of a run's density and plot it against linear theory."""
    out = out if out is not None else run.with_name(run.stem + "_pk.png")
    run_power_spectrum(run, out, n_bins=n_bins)


@app.command()
def maps(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output HDF5 map file.", dir_okay=False)],
    config: Annotated[str, typer.Option(
        "--config", "-c", help="Experiment configuration: a TOML file, or a shipped name "
                               "(quick, lsst_y10).")] = "quick",
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of the initial conditions and the shape noise (default: the config's).",
        min=0, max=2**63 - 1)] = None,
    pdims: Annotated[Optional[str], typer.Option(
        help="Device grid PXxPY (default: the config's simulation.pdims); on CPU that many host "
             "devices are created.")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Also draw the noise-free maps to this PNG.",
                                                dir_okay=False)] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    fits: Annotated[Optional[Path], typer.Option(
        help="HEALPix only: also write the maps as a FITS table with healpy (columns "
             "KAPPA_1.., KAPPA_NOISY_1..).", dir_okay=False)] = None,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
):
    """Simulate tomographic convergence maps (noise-free and noisy) and write them to HDF5.
    Existing output files are refused unless --overwrite is given."""
    if pdims is not None:
        _pdims(pdims)  # a usage error (exit 2) before anything else
    run_maps(config, out, seed=seed, pdims=pdims, png=png, progress=progress, fits=fits,
             overwrite=overwrite)


@app.command()
def cl(
    maps_file: Annotated[Path, typer.Argument(
        metavar="MAPS", help="Map file written by 'lensbench maps'.", exists=True, dir_okay=False,
        readable=True)],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Output PNG (default: MAPS_cl.png next to MAPS); the numbers go to "
                            "the same name with .npz.", dir_okay=False)] = None,
    noisy: Annotated[bool, typer.Option(
        "--noisy/--no-noisy", help="Measure the noisy maps (theory then includes the shape-noise "
                                   "power on the auto-spectra) or the noise-free ones.")] = False,
):
    """Measure the tomographic C_ell of a map file and plot it against Limber theory."""
    out = out if out is not None else maps_file.with_name(maps_file.stem + "_cl.png")
    run_cl(maps_file, out, noisy=noisy)


# ---- implicit inference and the C_ell baseline (experiments/pipeline.py) ---------------------------

_OVERWRITE_HELP = "Replace an existing output file (without it, an existing one is refused)."
_CONFIG_HELP = "Experiment configuration: a TOML file, or a shipped name (quick, lsst_y10)."
_SET_HELP = ("Override a configuration key, KEY=VALUE with a TOML value (repeatable), e.g. "
             "--set hmc.num_samples=2000.")


def _device_grid(config, changes: dict) -> tuple[int, int]:
    """The device grid of a config file (or name) with ``--set`` changes, read without JAX."""
    from .config import peek_pdims

    pdims = changes.get("simulation.pdims")
    return _pdims(pdims) if isinstance(pdims, str) else peek_pdims(config)


def _configured(config, overrides) -> ExperimentConfig:
    """The configuration ``config`` (name, path or ExperimentConfig) with ``--set`` overrides,
    its CPU devices requested before JAX starts."""
    from .config import ExperimentConfig, load_config, parse_overrides

    changes = parse_overrides(overrides or ())
    if not isinstance(config, ExperimentConfig):
        _cpu_devices_for(_device_grid(config, changes))
        config = load_config(config)
    return config.with_(**changes) if changes else config


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output sims file (HDF5); rerun with "
                                      "the same arguments to finish an interrupted one.", dir_okay=False)],
    config: Annotated[str, typer.Option("--config", "-c", help=_CONFIG_HELP)] = "quick",
    n: Annotated[Optional[int], typer.Option("--n", help="Simulations (default: training_set.n_sims).",
                                            min=1, max=MAX_SIMS)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Simulations per batch (default: "
                                                      "training_set.batch_size or automatic).", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (default: training_set.seed).", min=0)] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    part: Annotated[Optional[str], typer.Option(
        "--part", metavar="I/N",
        help="Only part I of N (1-based) of the n simulations, into its own --out; the same "
             "simulations as in a whole run. Join the parts with 'lensbench merge'.")] = None,
):
    """Simulate (theta, kappa) pairs, theta drawn from the prior, noise-free maps, into HDF5."""
    from .pipeline import run_generate

    run_generate(config, out, n=n, batch_size=batch_size, seed=seed, progress=progress,
                 part=None if part is None else _part(part))


@app.command()
def merge(
    parts: Annotated[list[Path], typer.Argument(
        metavar="PART...", help="Part files from 'lensbench generate --part I/N', all N of them, "
                                "in any order.", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output sims file (HDF5).",
                                      dir_okay=False)],
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
):
    """Join the parts of a training set into one sims file, the file a single 'lensbench
    generate' of all simulations writes. An existing --out is refused unless --overwrite is
    given; --out may never be a part."""
    from .dataset import merge_parts

    print(merge_parts(parts, out, overwrite=overwrite).summary())


@app.command("train-compressor")
def train_compressor(
    sims: Annotated[Path, typer.Option("--sims", help="Sims file from 'lensbench generate'.", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (checkpoints, model, "
                                      "loss.png); an existing one is resumed.", file_okay=False)],
    config: Annotated[str, typer.Option("--config", "-c", help=_CONFIG_HELP)] = "quick",
    loss: Annotated[Optional[str], typer.Option(help="mse, mae, gnll or vmim (default: compressor.loss).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train a neural compressor (maps -> summaries) on a training set."""
    from .pipeline import run_train_compressor

    if loss is not None and loss not in ("mse", "mae", "gnll", "vmim"):
        raise typer.BadParameter(f"--loss must be mse, mae, gnll or vmim, got {loss!r}")
    run_train_compressor(config, sims, out, loss=loss, progress=progress)


@app.command()
def compress(
    compressor: Annotated[Path, typer.Option("--compressor", help="Directory of a trained compressor.",
                                             file_okay=False)],
    inputs: Annotated[Path, typer.Option("--in", help="A map file or a sims file.", exists=True,
                                         dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output summaries (HDF5).", dir_okay=False)],
    noisy: Annotated[bool, typer.Option("--noisy/--no-noise", help="Compress noisy maps (a map file's "
                                        "kappa_noisy; sims get one shape-noise draw).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the noise added to sims.", min=0)] = 0,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
):
    """Apply a trained compressor to maps or to a training set. An existing --out is refused
    unless --overwrite is given; --out may never be the input."""
    from .pipeline import run_compress

    run_compress(compressor, inputs, out, noisy=noisy, seed=seed, overwrite=overwrite)


@app.command("fit-posterior")
def fit_posterior(
    sims: Annotated[Path, typer.Option("--sims", help="Sims file from 'lensbench generate'.", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", file_okay=False)],
    config: Annotated[str, typer.Option("--config", "-c", help=_CONFIG_HELP)] = "quick",
    compressor: Annotated[Optional[Path], typer.Option(
        help="Trained compressor: NPE on its summaries (two-stage).", file_okay=False)] = None,
    summary: Annotated[Optional[str], typer.Option(
        help="Instead of a compressor: 'cl' (NPE on the C_ell data vector) or 'maps' (one-stage "
             "NPE with a CNN embedding trained by sbi).")] = None,
    calibrate: Annotated[bool, typer.Option(help="SBC and TARP on the held-out simulations.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Fit a neural posterior (sbi NPE) on summaries of a training set, and calibrate it."""
    from .pipeline import run_fit_posterior

    if summary is not None and summary not in ("cl", "maps", "compressor"):
        raise typer.BadParameter(f"--summary must be cl or maps, got {summary!r}")
    run_fit_posterior(config, sims, out, compressor=compressor, summary=summary,
                      calibrate=calibrate, progress=progress)


@app.command()
def sample(
    posterior: Annotated[Path, typer.Option("--posterior", help="Directory from 'lensbench fit-posterior'.",
                                            file_okay=False)],
    maps_file: Annotated[Path, typer.Option("--maps", help="Observed map file ('lensbench maps').",
                                            exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output samples file (HDF5).", dir_okay=False)],
    n: Annotated[Optional[int], typer.Option("--n", help="Samples (default: npe.n_samples).",
                                            min=1, max=MAX_SAMPLES)] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.", min=0)] = 0,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
):
    """Draw posterior samples for an observation from a fitted NPE posterior. An existing --out
    is refused unless --overwrite is given."""
    from .pipeline import run_sample

    run_sample(posterior, maps_file, out, n=n, seed=seed, overwrite=overwrite)


@app.command("cl-baseline")
def cl_baseline(
    maps_file: Annotated[Path, typer.Option("--maps", help="Observed map file ('lensbench maps').",
                                            exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output samples file (HDF5).", dir_okay=False)],
    config: Annotated[str, typer.Option("--config", "-c", help=_CONFIG_HELP)] = "quick",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """The analytic C_ell baseline: Gaussian likelihood with a simulated covariance, NUTS."""
    from .pipeline import run_cl_baseline

    run_cl_baseline(config, maps_file, out, progress=progress)


# ---- explicit inference and the comparison harness ---------------------------------------------

@app.command()
def hmc(
    maps_file: Annotated[Path, typer.Option("--maps", help="Observed map file ('lensbench maps').",
                                            exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: chains, checkpoints, "
                                      "diagnostics.json and samples.h5.", file_okay=False)],
    config: Annotated[str, typer.Option("--config", "-c", help=_CONFIG_HELP)] = "quick",
    resume: Annotated[bool, typer.Option("--resume/--restart", help="Continue the run in OUT from "
                                         "its last checkpoint, or start over. A config with a "
                                         "larger hmc.num_samples extends a finished run.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    distributed: Annotated[bool, typer.Option(
        "--distributed", help="One of several jax.distributed processes (one per node or GPU), "
                              "all run with the same options: the field is split over all their "
                              "devices (simulation.pdims). Without --coordinator, JAX detects "
                              "the cluster (SLURM, Open MPI, ...).")] = False,
    coordinator: Annotated[Optional[str], typer.Option(
        help="With --distributed: HOST:PORT of process 0.")] = None,
    num_processes: Annotated[Optional[int], typer.Option(
        help="With --distributed: the number of processes.", min=1)] = None,
    process_id: Annotated[Optional[int], typer.Option(
        help="With --distributed: this process's index, 0 .. num-processes - 1.", min=0)] = None,
    chain: Annotated[Optional[list[int]], typer.Option(
        "--chain", help="Run only this chain of the run (repeatable). Several `lensbench hmc "
                        "--chain C` with the same OUT run chains in parallel and equal the "
                        "sequential run; the one finishing last writes samples.h5.", min=0)] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help=_SET_HELP)] = None,
):
    """Explicit full-field inference: HMC (NUTS or MCLMC) over the cosmology and the initial field."""
    from .config import load_config, parse_overrides
    from .pipeline import run_hmc, stop_with_parent

    stop_with_parent()

    changes = parse_overrides(overrides or ())
    pdims = _device_grid(config, changes)
    if distributed:
        _start_distributed(pdims, coordinator, num_processes, process_id)
    elif (coordinator, num_processes, process_id) != (None, None, None):
        raise typer.BadParameter("--coordinator, --num-processes and --process-id need --distributed")
    else:
        _cpu_devices_for(pdims)
    cfg = load_config(config)
    try:
        run_hmc(cfg.with_(**changes) if changes else cfg, maps_file, out, resume=resume,
                progress=progress, chains=chain)
    except ValueError as e:  # the library's words (explicit.run_hmc) in this command's options
        message = str(e).replace("resume=False", "--restart").replace("another out_dir",
                                                                       "another --out")
        if message == str(e):
            raise
        raise ValueError(message) from None


def _start_distributed(pdims: tuple[int, int], coordinator: Optional[str],
                       num_processes: Optional[int], process_id: Optional[int]) -> None:
    """``jax.distributed.initialize`` before any JAX backend starts. On CPU (tests, a laptop) each
    process gets its share of the pdims devices and collectives go through gloo."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise typer.BadParameter("give all of --coordinator, --num-processes and --process-id, "
                                 "or none (cluster auto-detection)")
    if all(given):
        if process_id >= num_processes:
            raise typer.BadParameter(f"--process-id {process_id} must be below --num-processes "
                                     f"{num_processes}")
        px, py = pdims
        if (px * py) % num_processes:
            raise typer.BadParameter(f"the device grid {px}x{py} does not split evenly over "
                                     f"{num_processes} processes")
        _cpu_devices_for((px * py // num_processes, 1))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def run_compare(config, out: Path, *, force: tuple[str, ...] = (),
                overrides: tuple[str, ...] = ()) -> dict:
    """``lensbench compare`` (and ``demo``): all stages of ``experiments.compare``; ``overrides``
    are ``--set KEY=VALUE`` items."""
    config = _configured(config, overrides)
    _cpu_devices_for(config.simulation.pdim_tuple)
    from .compare import compare as run

    return run(config, out, force=tuple(force))


@app.command()
def compare(
    out: Annotated[Path, typer.Option("--out", "-o", help="Results directory (rerun to resume).",
                                      file_okay=False)],
    config: Annotated[str, typer.Option("--config", "-c", help=_CONFIG_HELP)] = "quick",
    force: Annotated[Optional[list[str]], typer.Option(
        "--force", help="Rerun this stage (and what depends on it) even if done; repeatable; "
                        "'all' reruns everything.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help=_SET_HELP)] = None,
):
    """Run the C_ell baselines, implicit (NPE) and explicit (HMC) inference on one observation and
    compare them: metrics.json, contour plots, report.md."""
    run_compare(config, out, force=tuple(force or ()), overrides=tuple(overrides or ()))


@app.command()
def plot(
    results: Annotated[Path, typer.Argument(help="A 'lensbench compare' results directory, or a "
                                            "directory of samples files.", file_okay=False,
                                            exists=True)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output image (default: "
                                                "RESULTS/figures/contours.png).", dir_okay=False)] = None,
    methods: Annotated[Optional[list[str]], typer.Option(
        "--method", "-m", help="Methods to overlay (repeatable; default: all found).")] = None,
    params: Annotated[Optional[list[str]], typer.Option(
        "--param", "-p", help="Parameters (repeatable; also Omega_m and S8; default: the "
                              "sampled ones).")] = None,
):
    """Redraw the posterior contours (getdist triangle plot) from saved samples."""
    from .report import plot_results

    path = plot_results(results, out, methods=methods or None, params=params or None)
    print(f"wrote {path}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(
        help="Results directory (rerun to resume).", file_okay=False)] = Path("results/quick"),
):
    """The main job: `lensbench compare` on the shipped quick configuration (PM lightcone maps;
    C_ell baselines, NPE on VMIM summaries, field-level HMC), then where the report is."""
    from .report import summary_lines

    start = time.perf_counter()
    metrics = run_compare(DEMO_MAPS_CONFIG, out_dir)
    for line in summary_lines(metrics):
        print(f"  {line}")
    print(f"demo done in {time.perf_counter() - start:.0f} s; report: {out_dir / 'report.md'}")


if __name__ == "__main__":  # pragma: no cover
    app()
