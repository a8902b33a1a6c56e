"""Convergence map files: simulate one realisation of a configuration's κ maps, and measure their
tomographic C_ell against Limber theory.

The library side of ``lensbench maps`` and ``lensbench cl`` (``compare`` makes its observation with
``run_maps`` too); map files are written and read by ``experiments.io`` (``write_maps``,
``read_maps``). Error messages name the command-line options the arguments come from. JAX is
imported inside the functions, after the device count is chosen (``experiments.jaxsetup``).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Optional

from .config import parse_pdims
from .jaxsetup import cpu_devices_for, hide_partitioner_warnings

# map models that are drawn without a particle mesh (no device grid, no mesh window)
_MESHLESS = ("gaussian", "lognormal")


def _check_outputs(outputs: dict, overwrite: bool) -> None:
    """The map file, image and FITS outputs ({option: path or None}): writable, new unless
    ``overwrite``, and all different."""
    from .files import check_figure_path, check_new_output, check_output

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


def _describe(cfg, model) -> tuple[str, str, float | None, tuple | None]:
    """(sky geometry, simulation) in words for the start-up line, and the lightcone depth chi_max
    (Mpc/h) and observer position (Mpc/h, box coordinates) that the map file records (None for
    mesh-less map models)."""
    sky, sim = cfg.maps, cfg.simulation
    geometry = (f"{sky.field_deg:g}x{sky.field_deg:g} deg, {sky.npix}^2 pixels" if sky.sky == "flat"
                else f"HEALPix nside {sky.nside}")
    if sim.kind in _MESHLESS:
        return geometry, f"{sim.kind} random field (Limber C_ell)", None, None
    if cfg.shells.n_shells:
        shells = model.shells
        import numpy as np

        cells = "/".join(f"{s.cfg.cell_size[0]:.2g}" for s in shells)
        what = (f"{'PM' if sim.kind == 'pm' else 'LPT'}, {len(shells)} shell boxes to "
                f"{model.chi_max:.0f} Mpc/h, cells {cells} Mpc/h, {model.n_steps} steps, "
                f"{sum(int(np.prod(s.cfg.mesh_shape)) for s in shells) / 1e6:.1f}M cells")
        return geometry, what, model.chi_max, None
    cone = model.lightcone
    chi_max, observer = cone.chi_max, tuple(cone.observer_position(sim.box_size))
    what = (f"{'PM, ' + str(sim.n_steps) + ' steps' if sim.kind == 'pm' else 'LPT lightcone'}, "
            f"{'x'.join(map(str, sim.mesh_shape))} mesh, "
            f"{'x'.join(f'{b:g}' for b in sim.box_size)} Mpc/h box, depth {chi_max:.0f} Mpc/h, "
            f"device grid {sim.pdims}")
    return geometry, what, chi_max, observer


# A mode at a fraction f of the mesh Nyquist frequency: with CIC-compensated PM forces the 3-D power
# is ~10-20% low at f ~ 0.3-0.5 (RESULTS 10), and beyond 0.5 the mesh window and aliasing dominate.
COARSE_FRACTION = 0.5


def resolution_warnings(cfg, model) -> list[str]:
    """One line per bin whose [scales] ell_max needs modes beyond ``COARSE_FRACTION`` of the mesh
    Nyquist frequency where the bin's lensing weight q²/χ² has its median, k = ell_max / χ (the
    cell there is the shell's with [shells], else the box's transverse cell). Empty for maps
    without a mesh or without [scales]."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from simulators.sources import lensing_efficiency

    rng = cfg.scales.ranges(cfg.bins().n_bins)
    if rng is None or cfg.simulation.kind not in ("pm", "lpt"):
        return []
    chi = np.linspace(1.0, cfg.chi_max(), 2048)
    q = np.asarray(jax.jit(lensing_efficiency)(cfg.cosmology(), cfg.bins(), jnp.asarray(chi)))
    if cfg.shells.n_shells:
        edges = np.asarray(cfg.shells.chi_edges)
        cells = [s.cfg.cell_size[0] for s in model.shells]
    else:
        edges, cells = np.array([0.0, np.inf]), [model.cfg.cell_size[0]]
    out = []
    for b, hi in enumerate(rng[1]):
        if not np.isfinite(hi):
            continue
        w = np.cumsum(q[b] ** 2 / chi**2)
        chi_b = float(chi[np.searchsorted(w, 0.5 * w[-1])])
        cell = cells[min(int(np.searchsorted(edges, chi_b, side="right")) - 1, len(cells) - 1)]
        k, k_nyq = hi / chi_b, np.pi / cell
        if k > COARSE_FRACTION * k_nyq:
            out.append(f"warning: scales.ell_max of bin {b + 1} ({hi:g}) needs k = {k:.2f} h/Mpc at "
                       f"its lensing kernel's median distance chi = {chi_b:.0f} Mpc/h, "
                       f"{k / k_nyq:.2f} of the mesh Nyquist pi / {cell:.3g} Mpc/h there: cells "
                       f"too coarse for that range")
    return out


def run_maps(config, out: Path, *, seed: Optional[int] = None, pdims: Optional[str] = None,
             png: Optional[Path] = None, progress: bool = True, fits: Optional[Path] = None,
             overwrite: bool = True) -> Path:
    """Simulate one realisation of the κ maps of a configuration and write a map file.

    config: a TOML path, a shipped config name, or an ``ExperimentConfig``. seed/pdims override
    the configuration's (the file records the values used); png: also draw the noise-free maps;
    fits: also write HEALPix maps as a healpy FITS table. Raises OptionError for pdims text that
    does not parse, ValueError/OSError on other bad input (the outputs are checked first).
    """
    from .config import ExperimentConfig, load_config, peek_pdims
    from .files import ensure_space

    _check_outputs({"--out": out, "--png": png, "--fits": fits}, overwrite)
    if pdims is not None or not isinstance(config, ExperimentConfig):
        # loading the configuration imports JAX, which is when XLA reads its log level
        px, py = parse_pdims(pdims) if pdims is not None else peek_pdims(config)
        if px * py > 1:
            hide_partitioner_warnings()
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    changes = {}
    if seed is not None:
        changes["seed"] = int(seed)
    if pdims is not None:
        changes["simulation.pdims"] = "x".join(map(str, parse_pdims(pdims)))
    if changes:
        cfg = cfg.with_(**changes)
    if fits is not None and cfg.maps.sky != "healpix":
        raise ValueError("--fits needs HEALPix maps (maps.sky = 'healpix'); this configuration "
                         "makes flat-sky maps")
    if cfg.simulation.kind not in _MESHLESS:
        cpu_devices_for(cfg.simulation.pdim_tuple)

    from simulators import HaloOverflowError
    from simulators.lensing import simulate_maps

    from .io import write_maps
    from .progress import StepProgress, step_callback

    model = cfg.build_model()
    sky, sim, bins = cfg.maps, cfg.simulation, cfg.bins()
    geometry, what, chi_max, observer = _describe(cfg, model)
    n_pix = sky.npix ** 2 if sky.sky == "flat" else 12 * sky.nside ** 2
    ensure_space(out, 8 * bins.n_bins * n_pix * (2 if fits is None else 4), what="the map file")
    print(f"{cfg.name}: {bins.n_bins} tomographic bins, {geometry}; {what}; seed {cfg.seed} "
          f"(first run compiles)", file=sys.stderr, flush=True)
    for line in resolution_warnings(cfg, model):
        print(line, file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        n_steps = model.n_steps if cfg.shells.n_shells else sim.n_steps
        with StepProgress(n_steps, desc="PM steps", enabled=progress and sim.kind == "pm"):
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


# ---- C_ell against theory -----------------------------------------------------------------------

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


def _has_mesh(data) -> bool:
    """Whether a map file's maps were read off a PM/LPT mesh (rather than drawn mesh-less)."""
    return data.attrs.get("kind") in ("pm", "lpt")


def _mesh_window(data):
    """Theory factor for maps read off a PM/LPT mesh (CIC painting + trilinear reading smooth the
    density, ``lensing.mesh_power_window``); None for Gaussian maps, which have no mesh, and for
    maps whose reads divide the window out (``lightcone.compensate``). Maps of several shell
    boxes without compensation have one window per shell, which this theory leaves out."""
    if not _has_mesh(data):
        return None
    cfg = data.config()
    if cfg.lightcone.compensate or cfg.shells.n_shells:
        return None
    from simulators.lensing import mesh_power_window

    return mesh_power_window(cfg.simulation.sim_config(sharded=False).cell_size)


def _measured_cl(data, kappa, edges):
    """(cl (n_pairs, n_ell), ell (n_ell,), n_modes (n_ell,)) numpy: the flat-sky or the full-sky
    estimator, whichever the map file's sky needs."""
    import numpy as np

    from simulators import flatsky
    from simulators.fullsky import cl_estimate_healpix

    if data.sky == "flat":
        measured = flatsky.cl_estimate(kappa, float(data.attrs["field_deg"]), edges)
    else:
        measured = cl_estimate_healpix(kappa, edges)
    return tuple(np.asarray(x) for x in measured)


def _limber(data, ells, window: bool = True):
    """Limber C_ell (n_pairs, len(ells)) of the map file's cosmology and bins, times the mesh
    window for mesh maps: one compiled evaluation (eager halofit is much slower), padded to a
    power of two >= 512 multipoles so that one compilation serves most map files."""
    import jax
    import numpy as np

    from simulators import flatsky

    size = max(512, 1 << (len(ells) - 1).bit_length())
    padded = np.concatenate([ells, np.full(size - len(ells), ells[-1])])
    window = _mesh_window(data) if window else None
    limber = jax.jit(lambda c, b, l: flatsky.limber_cl(c, b, l, power_filter=window))
    return np.asarray(limber(data.cosmology(), data.bins(), padded))[:, :len(ells)]


def cl_against_theory(data, noisy: bool = False, window: bool = True) -> dict:
    """Tomographic C_ell of a map file (``io.read_maps``) and Limber theory binned the same way.

    noisy: measure the noisy maps, theory then including the shape-noise power of the
    auto-spectra. Returns the arrays ``run_cl`` writes to its .npz, in steradians: ``ell``
    (n_ell,) mean multipole of each bin, ``ell_edges`` (n_ell + 1,), ``cl``, ``theory``,
    ``theory_signal`` (n_pairs, n_ell), ``noise`` (n_pairs,) (0 for cross pairs or noise-free
    maps), ``n_modes`` (n_ell,), ``pairs`` (n_pairs, 2) bin indices (i <= j), ``noisy``,
    ``ell_fine`` (128,) and ``theory_fine`` (n_pairs, 128), a smooth theory curve.
    window=False: the raw Limber + halofit theory even for maps read off an uncompensated mesh.
    """
    import numpy as np

    from simulators import flatsky

    edges = np.asarray(data.ell_edges, np.float64)
    cl, ell, n_modes = _measured_cl(data, data.kappa_noisy if noisy else data.kappa, edges)
    nodes = _theory_nodes(data, edges)
    ell_lo = max(edges[0], 1.0) if data.sky != "flat" else max(edges[0], float(
        flatsky.mode_ell(float(data.attrs["field_deg"]), int(data.attrs["npix"]))[0, 1]))
    ell_fine = np.geomspace(ell_lo, edges[-1], 128)
    cl_all = _limber(data, np.concatenate([nodes, ell_fine]), window)
    signal = _binned_theory(data, edges, nodes, cl_all[:, :len(nodes)])
    i, j = flatsky.pair_indices(data.n_bins)
    sigma_n = np.asarray(data.sigma_n)
    noise = np.where(i == j, np.asarray(flatsky.noise_cl(sigma_n[i], data.pixel_area)), 0.0) \
        if noisy else np.zeros(len(i))
    return dict(ell=ell, ell_edges=edges, cl=cl, theory=signal + noise[:, None],
                theory_signal=signal, noise=noise, n_modes=n_modes, pairs=np.stack([i, j], axis=1),
                noisy=np.bool_(noisy), ell_fine=ell_fine, theory_fine=cl_all[:, len(nodes):])


def validated_pair_range(data, pairs):
    """(lo, hi), each (n_pairs,): the multipoles a map file's [scales] validates for each pair
    (i, j), the intersection of the two bins' ranges; None when the file states none."""
    import numpy as np

    if "scales_ell_min" not in data.attrs:
        return None
    lo, hi = (np.asarray(data.attrs[k], np.float64) for k in ("scales_ell_min", "scales_ell_max"))
    i, j = np.asarray(pairs).T
    return np.maximum(lo[i], lo[j]), np.minimum(hi[i], hi[j])


def _print_ratios(result: dict, rows: int) -> None:
    """C_ell / theory of the auto-spectra, at ``rows`` ell bins spread over the filled ones; a
    ratio outside the pair's validated range (``valid_lo``/``valid_hi``) is marked with '*'."""
    import numpy as np

    ell, cl, theory, n_modes = (result[k] for k in ("ell", "cl", "theory", "n_modes"))
    i, j = result["pairs"].T
    autos = np.flatnonzero(i == j)
    lo, hi = result.get("valid_lo"), result.get("valid_hi")

    def mark(p, r):
        return " " if lo is None or lo[p] <= ell[r] <= hi[p] else "*"

    print(f"C_ell of the {'noisy' if result['noisy'] else 'noise-free'} maps / theory"
          f"{' (+ noise)' if result['noisy'] else ''}, auto-spectra:")
    print(f"{'ell':>8} {'modes':>6} " + " ".join(f"{f'({b + 1},{b + 1})':>8}" for b in i[autos]))
    keep = np.flatnonzero(n_modes > 0)
    for r in keep[np.unique(np.linspace(0, len(keep) - 1, min(rows, len(keep))).round().astype(int))] \
            if keep.size else []:
        print(f"{ell[r]:8.1f} {int(n_modes[r]):6d} "
              + " ".join(f"{cl[p, r] / theory[p, r]:7.3f}{mark(p, r)}" for p in autos))
    if lo is not None:
        print("* outside the validated range of [scales] ("
              + ", ".join(f"bin {b + 1}: {lo[p]:g}-{hi[p]:g}" for b, p in zip(i[autos], autos))
              + ")")


def run_cl(maps: Path, out: Path, *, noisy: bool = False, rows: int = 8) -> Path:
    """Tomographic C_ell of a map file against Limber theory: a PNG triangle and an .npz next to it."""
    from .files import check_figure_path, check_not_inputs, check_output, save_npz
    from .io import read_maps
    from .plots import plot_cl_triangle

    out = check_figure_path(out, option="--out")
    npz = out.with_suffix(".npz")
    check_output(npz, option="--out (.npz)")
    check_not_inputs(out, {"MAPS": maps})
    check_not_inputs(npz, {"MAPS": maps}, option="--out (.npz)")
    data = read_maps(maps)

    result = cl_against_theory(data, noisy)
    valid = validated_pair_range(data, result["pairs"])
    if valid is not None:
        result.update(valid_lo=valid[0], valid_hi=valid[1])
    save_npz(npz, **result)
    cosmo = data.cosmology()
    title = (f"{data.attrs['name']}: {'noisy' if noisy else 'noise-free'} maps "
             f"(seed {data.attrs['seed']}) vs {'Limber x mesh window' if _mesh_window(data) else 'Limber'}, "
             f"$\\Omega_c$={cosmo.Omega_c:.3g}, $\\sigma_8$={cosmo.sigma8:.3g}")
    plot_cl_triangle(out, result["ell"], result["cl"], result["theory"], result["pairs"],
                     ell_fine=result["ell_fine"], theory_fine=result["theory_fine"],
                     noise=result["noise"] if noisy else None, title=title, valid=valid)
    _print_ratios(result, rows)
    print(f"wrote {out} and {npz}")
    return out
