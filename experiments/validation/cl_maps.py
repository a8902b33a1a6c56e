"""Noise-free C_ℓ of a configuration's map files, averaged over seeds, against the raw Limber +
halofit theory (no mesh window): the resolution check of issue 27 / RESULTS 10.

usage: python -m experiments.validation.cl_maps MAPS.h5 [MAPS.h5 ...] --out cl_maps.json
       python -m experiments.validation.cl_maps --config hires_patch --seeds 4 [--fixed]
              [--maps-dir DIR] --out cl_maps.json
       [--ell-max-bin1 600] [--ell-range 300 1000] [--tol 0.10]

The map files are ``lensbench maps`` outputs of one configuration with different seeds; with
--config they are simulated here (seeds 0 .. n-1, kept in --maps-dir, and reused when the script
runs again), and --fixed gives every white-noise field fixed Fourier amplitudes (random phases;
Angulo & Pontzen 2016), which removes the scatter of the 3-D mode amplitudes (on a narrow field of
small shell boxes the projected C_ℓ still scatters almost as much: NOTEBOOK 13). For every
ℓ bin of the files' [cl] binning and every auto and cross pair it prints mean(C_ℓ) / theory over
the seeds and the standard error of that mean (the scatter between seeds / sqrt(n); with one file,
the Gaussian error sqrt(2 / modes)). A pair passes in the ℓ range when every bin whose centre lies
in it has |ratio - 1| <= tol + 2 × its standard error (tol is the accuracy asked, the 2σ term the
sampling error). Pairs with bin 1 use [ℓ_lo, --ell-max-bin1].
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def ratio_table(paths, window: bool = False) -> dict:
    """Mean C_ℓ / theory over the map files and its standard error, per pair and ℓ bin."""
    from experiments.io import read_maps
    from experiments.maps import cl_against_theory

    ratios, first = [], None
    for p in paths:
        data = read_maps(p)
        res = cl_against_theory(data, noisy=False, window=window)
        if first is None:
            first = res
            name = data.attrs["name"]
        elif not np.array_equal(res["ell_edges"], first["ell_edges"]):
            raise ValueError(f"{p}: another C_ell binning than {paths[0]}")
        ratios.append(res["cl"] / res["theory"])
    r = np.asarray(ratios)  # (n_files, n_pairs, n_ell)
    mean = r.mean(0)
    if len(paths) > 1:
        err = r.std(0, ddof=1) / np.sqrt(len(paths))
    else:
        err = np.broadcast_to(np.sqrt(2 / np.maximum(first["n_modes"], 1)), mean.shape)
    return dict(name=name, n_maps=len(paths), ell=first["ell"].tolist(),
                ell_edges=first["ell_edges"].tolist(), n_modes=first["n_modes"].tolist(),
                pairs=first["pairs"].tolist(), ratio=mean.tolist(), stderr=np.asarray(err).tolist(),
                theory="Limber + halofit" + (" x mesh window" if window else ""))


def fixed_amplitude(noise):
    """White noise with every Fourier amplitude set to its rms (phases kept), one device."""
    import jax.numpy as jnp

    x = np.asarray(noise, np.float64)
    nk = np.fft.rfftn(x)
    fixed = nk / np.maximum(np.abs(nk), 1e-30) * np.sqrt(x.size)
    return jnp.asarray(np.fft.irfftn(fixed, s=x.shape), noise.dtype)


def simulate_files(config, n_seeds: int, fixed: bool, maps_dir) -> list:
    """Map files of seeds 0 .. n_seeds - 1 of a configuration (reused when present)."""
    import time
    from pathlib import Path

    import jax

    from experiments.config import load_config
    from experiments.io import write_maps
    from simulators.lensing import simulate_maps

    cfg = load_config(config)
    model, cosmo, bins = cfg.build_model(), cfg.cosmology(), cfg.bins()
    out = Path(maps_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n_seeds):
        path = out / f"{cfg.name}_seed{seed}{'_fixed' if fixed else ''}.h5"
        if not path.exists():
            start = time.perf_counter()
            latent = jax.tree.map(fixed_amplitude, model.latent(seed)) if fixed else None
            maps = simulate_maps(model, cosmo, seed, latent=latent)
            write_maps(path, maps, cfg.with_(seed=seed), bins, chi_max=cfg.chi_max())
            print(f"wrote {path} ({time.perf_counter() - start:.0f} s)", flush=True)
        paths.append(str(path))
    return paths


def check(table: dict, ell_range, ell_max_bin1: float, tol: float) -> dict:
    """{pair label: {"passed": bool, "worst": max(|ratio - 1| - 2 stderr)}} over the ℓ range."""
    ell = np.asarray(table["ell"])
    out = {}
    for p, (i, j) in enumerate(table["pairs"]):
        hi = min(ell_range[1], ell_max_bin1) if 0 in (i, j) else ell_range[1]
        sel = (ell >= ell_range[0]) & (ell <= hi)
        if not sel.any():
            continue
        dev = np.abs(np.asarray(table["ratio"][p])[sel] - 1) - 2 * np.asarray(table["stderr"][p])[sel]
        out[f"{i + 1}{j + 1}"] = dict(passed=bool(np.all(dev <= tol)), worst=float(dev.max()))
    return out


def main(argv=None):
    import simulators
    simulators.enable_x64()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("maps", nargs="*")
    p.add_argument("--config", help="simulate the maps of this configuration instead")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--fixed", action="store_true", help="fixed-amplitude white noise")
    p.add_argument("--maps-dir", default="cl_maps_files")
    p.add_argument("--out", default="cl_maps.json")
    p.add_argument("--ell-range", type=float, nargs=2, default=(300.0, 1000.0))
    p.add_argument("--ell-max-bin1", type=float, default=600.0)
    p.add_argument("--tol", type=float, default=0.10)
    p.add_argument("--window", action="store_true", help="theory times the mesh window")
    args = p.parse_args(argv)
    if bool(args.maps) == bool(args.config):
        p.error("give map files or --config, not both")
    paths = args.maps or simulate_files(args.config, args.seeds, args.fixed, args.maps_dir)
    table = ratio_table(paths, window=args.window)
    table["fixed_amplitude"] = bool(args.fixed)
    table["check"] = check(table, args.ell_range, args.ell_max_bin1, args.tol)
    table.update(ell_range=list(args.ell_range), ell_max_bin1=args.ell_max_bin1, tol=args.tol,
                 command="python -m experiments.validation.cl_maps " + " ".join(sys.argv[1:] if argv is None else argv))
    ell = table["ell"]
    autos = [k for k, (i, j) in enumerate(table["pairs"]) if i == j]
    print(f"{table['name']}: mean C_ell / ({table['theory']}) over {table['n_maps']} maps, "
          f"auto-spectra (± standard error)")
    labels = [f"bin {table['pairs'][k][0] + 1}" for k in autos]
    print(f"{'ell':>7} " + " ".join(f"{lab:>13}" for lab in labels))
    for b, l in enumerate(ell):
        print(f"{l:7.0f} " + " ".join(f"{table['ratio'][k][b]:6.3f}±{table['stderr'][k][b]:.3f}"
                                      for k in autos))
    bad = [k for k, v in table["check"].items() if not v["passed"]]
    print(f"within {args.tol:.0%} + 2 sigma over ell {args.ell_range[0]:g}-{args.ell_range[1]:g} "
          f"(bin 1 to {args.ell_max_bin1:g}): {len(table['check']) - len(bad)}/{len(table['check'])} "
          f"pairs" + (f"; failing: {', '.join(bad)}" if bad else ""))
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
