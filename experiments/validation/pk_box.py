"""PM matter power against halofit as the box and the cells change: what a shell box of a resolved
lightcone loses to its finite size and to its force resolution (RESULTS: results_pk_box.json).

usage: python -m experiments.validation.pk_box [--cases 64:64:4,128:128:4,256:256:1,128:256:1]
       [--a 0.8] [--a-init 0.2] [--steps 24] [--out pk_box.json]

Each case is box:cells:seeds (a cubic box of side ``box`` Mpc/h, ``cells``³ mesh cells and as many
particles, CIC-compensated force, 2LPT at a_init, PM steps uniform in a to --a, the step size of
the hires configurations). The spectrum of the CIC density is divided by the CIC window and by
halofit (Takahashi et al. 2012) at --a, averaged over the seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

K_REPORT = (0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)  # h/Mpc: the k the lensing kernels need (issue 27)


def measure(box: float, cells: int, seeds: int, a: float, a_init: float, steps: int) -> dict:
    import jax.numpy as jnp

    from simulators import Cosmology, DeviceGrid, SimConfig
    from simulators.forces import cic_window
    from simulators.halofit import nonlinear_power
    from simulators.simulation import simulate
    from simulators.spectra import power_spectrum

    cosmo = Cosmology.fiducial()
    cfg = SimConfig(mesh_shape=cells, box_size=box, a_init=a_init, a_final=a, n_steps=steps,
                    deconvolve=True)
    window = cic_window(DeviceGrid(), (cells,) * 3, (box,) * 3, jnp.float64)
    pks, start = [], time.perf_counter()
    for seed in range(seeds):
        r = simulate(cosmo, cfg, seed=seed)
        k, pk, _ = power_spectrum(jnp.asarray(r.density - 1), box, n_bins=cells // 2, window=window)
        pks.append(np.asarray(pk))
    k = np.asarray(k)
    ratio = np.mean(pks, 0) / np.asarray(nonlinear_power(cosmo, jnp.asarray(k), a))
    pick = [int(np.argmin(np.abs(k - kk))) for kk in K_REPORT]
    return dict(box=box, cells=cells, cell_size=box / cells, seeds=seeds,
                k_nyquist=float(np.pi * cells / box), seconds_per_run=(time.perf_counter() - start) / seeds,
                k=[float(k[i]) for i in pick], ratio=[float(ratio[i]) for i in pick])


def main(argv=None):
    import simulators
    simulators.enable_x64()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="64:64:4,128:128:4,256:256:1,128:256:1")
    p.add_argument("--a", type=float, default=0.8)
    p.add_argument("--a-init", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default="pk_box.json")
    args = p.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        box, cells, seeds = case.split(":")
        r = measure(float(box), int(cells), int(seeds), args.a, args.a_init, args.steps)
        rows.append(r)
        print(f"box {r['box']:g} Mpc/h, {r['cells']}^3 cells ({r['cell_size']:.2g} Mpc/h), "
              f"{r['seeds']} seeds: " + " ".join(f"k={k:.2f}:{v:.2f}" for k, v in zip(r["k"], r["ratio"])),
              flush=True)
    out = dict(a=args.a, a_init=args.a_init, steps=args.steps, rows=rows,
               command="python -m experiments.validation.pk_box " + " ".join(
                   sys.argv[1:] if argv is None else argv))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
