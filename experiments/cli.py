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

``maps`` reads an experiment configuration (TOML; ``docs/configuration.md`` documents every key):
a path, or the name of a shipped one (``quick``, ``lsst_y10`` in ``experiments/configs``).

Device count and JAX imports. This module never imports JAX (or ``simulators``, which imports
JAX) at import time: every command imports them inside its function body, which runs only after
the argument parser has read ``--pdims`` or the configuration's device grid, so that the host
devices a grid needs on CPU can be asked for before a backend starts (``experiments.jaxsetup``),
without peeking at ``sys.argv`` (which would duplicate the parser and miss in-process invocations
such as ``typer.testing.CliRunner``).

Compiled programs are kept between runs: unless ``JAX_COMPILATION_CACHE_DIR`` is set, every command
uses JAX's persistent compilation cache in ``$XDG_CACHE_HOME/lensbench/xla/<host CPU signature>``
(``jaxsetup.use_compilation_cache``; ``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off). They
are compiled with XLA's legacy CPU fusion emitters unless ``XLA_FLAGS`` sets
``--xla_cpu_use_fusion_emitters`` (``jaxsetup.use_legacy_cpu_emitters`` says why).

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
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .config import MAX_SAMPLES, MAX_SIMS, OptionError, parse_pdims
from .jaxsetup import enable_x64 as _enable_x64
from .jaxsetup import use_compilation_cache as _use_compilation_cache
from .jaxsetup import use_legacy_cpu_emitters as _use_legacy_cpu_emitters

try:  # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - older typer built on the click package
    from click import exceptions as _click_exceptions

# The defaults of `lensbench simulate` (a 64^3, 256 Mpc/h, 10-step fiducial run).
DEMO = dict(mesh="64", box="256", steps=10, seed=0, a_init=0.1, a_final=1.0, lpt_order=2,
            mesh_factor=1, pdims="1x1", halo=8, dtype="float32")
# The experiment configuration the demo compares methods on (a shipped name or a path).
DEMO_MAPS_CONFIG = "quick"


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int, prefix: str = "lensbench") -> None:
    print(f"{prefix}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one ``lensbench: warning: ...`` line, without the source line."""
    print(f"lensbench: warning: {_one_line(message)}", file=file or sys.stderr, flush=True)


class _OneLineErrors(TyperGroup):
    """Run commands in non-standalone mode and turn every expected failure into one stderr line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _use_compilation_cache()
        _use_legacy_cpu_emitters()
        _enable_x64()
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

_OVERWRITE_HELP = "Replace an existing output file (without it, an existing one is refused)."
_CONFIG_HELP = "Experiment configuration: a TOML file, or a shipped name (quick, lsst_y10)."
_SET_HELP = ("Override a configuration key, KEY=VALUE with a TOML value (repeatable), e.g. "
             "--set hmc.num_samples=2000.")


@contextmanager
def _usage_errors():
    """The library's OptionErrors (option text that does not parse, options that do not go
    together) as usage errors: exit 2 with the command's --help hint, like typer's own."""
    try:
        yield
    except OptionError as e:
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
    from .runs import run_simulation

    cosmology = dict(Omega_c=omega_c, Omega_b=omega_b, h=h, n_s=n_s, sigma8=sigma8, w0=w0, wa=wa)
    with _usage_errors():
        run_simulation(out, mesh=mesh, box=box, steps=steps, seed=seed, a_init=a_init,
                       a_final=a_final, lpt_order=lpt_order, mesh_factor=mesh_factor, pdims=pdims,
                       halo=halo, dtype=dtype, ic=ic, cosmology=cosmology, progress=progress,
                       overwrite=overwrite)


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
    from .runs import run_power_spectrum

    run_power_spectrum(run, out if out is not None else run.with_name(run.stem + "_pk.png"),
                       n_bins=n_bins)


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
    from .maps import run_maps

    if pdims is not None:
        with _usage_errors():  # before anything else
            parse_pdims(pdims)
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
    from .maps import run_cl

    run_cl(maps_file, out if out is not None else maps_file.with_name(maps_file.stem + "_cl.png"),
           noisy=noisy)


# ---- implicit inference and the C_ell baseline (experiments/pipeline.py) ---------------------------

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
    online: Annotated[Optional[bool], typer.Option(
        help="Train on fresh simulations in every batch, validate on --sims (default: "
             "compressor.online).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train a neural compressor (maps -> summaries) on a training set, or on fresh simulations."""
    from .pipeline import run_train_compressor

    if loss is not None and loss not in ("mse", "mae", "gnll", "vmim"):
        raise typer.BadParameter(f"--loss must be mse, mae, gnll or vmim, got {loss!r}")
    run_train_compressor(config, sims, out, loss=loss, online=online, progress=progress)


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
    from .jaxsetup import cpu_devices_for, device_grid
    from .pipeline import run_cl_baseline, start_child_process

    start_child_process()
    with _usage_errors():
        cpu_devices_for(device_grid(config, {}))  # its covariance simulations use the grid
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
    """Explicit full-field inference: NUTS, MCLMC or MAMS over the cosmology and the initial field."""
    from .config import load_config, parse_overrides
    from .jaxsetup import cpu_devices_for, device_grid, start_distributed
    from .pipeline import run_hmc, start_child_process

    start_child_process()

    changes = parse_overrides(overrides or ())
    with _usage_errors():
        pdims = device_grid(config, changes)
        if distributed:
            start_distributed(pdims, coordinator, num_processes, process_id)
        elif (coordinator, num_processes, process_id) != (None, None, None):
            raise OptionError("--coordinator, --num-processes and --process-id need --distributed")
        else:
            cpu_devices_for(pdims)
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
    from .compare import run_compare

    with _usage_errors():
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
    from .compare import run_compare
    from .report import summary_lines

    start = time.perf_counter()
    metrics = run_compare(DEMO_MAPS_CONFIG, out_dir)
    for line in summary_lines(metrics):
        print(f"  {line}")
    print(f"demo done in {time.perf_counter() - start:.0f} s; report: {out_dir / 'report.md'}")


if __name__ == "__main__":  # pragma: no cover
    app()
