"""Noise-free κ C_ℓ of PM lightcone maps, averaged over seeds, against Limber + halofit theory.

usage: python -m experiments.validation.cl_pm_vs_theory [--mesh 32 32 128] [--box 256 256 1024]
       [--field 10] [--npix 128] [--seeds 4] [--steps 12] [--bins 5] [--deconvolve]
       [--out cl_validation.json]

For each ℓ bin it prints the ratio of the measured auto/cross spectra to the theory with the mesh
smoothing window (``lensing.mesh_power_window``) and without it, and the expected relative sampling
error of the seed average (Gaussian, from the mode count). Also measures the mesh P(k) at z = 0 of
one run against halofit, which sets the ℓ range the mesh resolves (k(ℓ) = ℓ / χ_peak of each bin).

The committed run is ``experiments/benchmarks/results_cl_validation.json`` (its command is in
``experiments/benchmarks/render.py``), shown in RESULTS.md by ``python -m
experiments.benchmarks.render``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from simulators import Cosmology, SimConfig, white_noise
from simulators import flatsky
from simulators.cosmology import background
from simulators.lensing import mesh_power_window, pm_kappa
from simulators.lightcone import FlatSky, Lightcone
from simulators.sources import RedshiftBins

from .cl_maps import fixed_amplitude


def main(argv=None):
    import simulators
    simulators.enable_x64()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", type=int, nargs=3, default=(32, 32, 128))
    p.add_argument("--box", type=float, nargs=3, default=(256.0, 256.0, 1024.0))
    p.add_argument("--field", type=float, default=10.0)
    p.add_argument("--npix", type=int, default=128)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--a-init", type=float, default=0.1)
    p.add_argument("--bins", type=int, default=5)
    p.add_argument("--deconvolve", action="store_true", help="CIC-compensated PM force")
    p.add_argument("--fixed", action="store_true",
                   help="fixed-amplitude initial conditions (|noise_k| = const, random phases; "
                        "Angulo & Pontzen 2016): removes the scatter of the 3-D mode amplitudes")
    p.add_argument("--out", default="cl_validation.json")
    args = p.parse_args(argv)

    cosmo = Cosmology.fiducial()
    bins = RedshiftBins.lsst_y10(n_bins=args.bins)
    chi_max = float(background(cosmo).comoving_distance(1.0 / (1.0 + bins.z[-1])))
    cfg = SimConfig(mesh_shape=tuple(args.mesh), box_size=tuple(args.box), a_init=args.a_init,
                    n_steps=args.steps, deconvolve=args.deconvolve)
    sky = FlatSky(args.field, args.npix)
    run = jax.jit(lambda c, n, lc: pm_kappa(c, cfg, lc, bins, n)[0], static_argnums=2)
    ell_f = 360.0 / args.field
    edges = np.geomspace(2 * ell_f, min(4000.0, 0.9 * np.pi * args.npix / np.radians(args.field)), 9)
    cls, t0 = [], time.time()
    for seed in range(args.seeds):
        lc = Lightcone(sky, chi_max, randomize=True, seed=seed)
        noise = white_noise(cfg, seed)
        kappa = run(cosmo, fixed_amplitude(noise) if args.fixed else noise, lc)
        cl, ell_mean, n_modes = flatsky.cl_estimate(kappa, args.field, edges)
        cls.append(np.asarray(cl))
        print(f"seed {seed}: {time.time() - t0:.1f} s", flush=True)
    cl = np.mean(cls, axis=0)
    ell_mean, n_modes = np.asarray(ell_mean), np.asarray(n_modes)
    window = mesh_power_window(cfg.cell_size)
    th_fn = lambda ell: flatsky.limber_cl(cosmo, bins, ell, power_filter=window)  # noqa: E731
    th_raw_fn = lambda ell: flatsky.limber_cl(cosmo, bins, ell)  # noqa: E731
    theory = np.asarray(flatsky.binned_model_cl(th_fn, args.field, args.npix, edges)[0])
    theory_raw = np.asarray(flatsky.binned_model_cl(th_raw_fn, args.field, args.npix, edges)[0])
    # n_modes counts ±ℓ: independent complex modes are n_modes / 2, σ(C)/C = sqrt(2 / n_indep)
    sigma = np.sqrt(2.0 / (0.5 * n_modes * args.seeds))
    i, j = flatsky.pair_indices(bins.n_bins)
    print("ell:        " + " ".join(f"{e:7.0f}" for e in ell_mean))
    print("rel. error: " + " ".join(f"{s:7.3f}" for s in sigma))
    for p_, (a, b) in enumerate(zip(i, j)):
        print(f"({a},{b}) /th+win " + " ".join(f"{r:7.3f}" for r in cl[p_] / theory[p_]))
        print(f"({a},{b}) /th     " + " ".join(f"{r:7.3f}" for r in cl[p_] / theory_raw[p_]))
    out = dict(args=vars(args), ell=ell_mean.tolist(), n_modes=n_modes.tolist(), sigma=sigma.tolist(),
               pairs=[[int(a), int(b)] for a, b in zip(i, j)], cl=cl.tolist(), theory=theory.tolist(),
               theory_no_window=theory_raw.tolist(), seconds=time.time() - t0)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
