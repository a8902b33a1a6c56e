"""Side-by-side gradient timing of two source trees (e.g. a ``git worktree`` of the parent commit
and this one): fresh processes, alternating trees and modes, so both see the same load.

    git worktree add --detach /tmp/parent 13080d7
    python experiments/benchmarks/ab_gradient.py --trees /tmp/parent,. --config quick \
        --rounds 3 --evals 20 --out ab_quick.jsonl
    python experiments/benchmarks/ab_gradient.py --trees /tmp/parent,. --config lsst_y10 \
        --mesh 32,32,128 --rounds 2 --evals 3 --out ab_lsst.jsonl
    python experiments/benchmarks/ab_gradient.py --trees /tmp/parent,. --config quick \
        --modes forward --rounds 3 --evals 20       # the κ maps alone (PM + lightcone)

Each process imports everything from its tree, builds the field-level log density as
``experiments.benchmarks.hmc grads`` does, times each value-and-gradient after the first (median),
then the FFT floor (``hmc.fft_floor``'s definition, here inline so older trees can be measured),
and prints one JSON line; the summary gives, per tree and mode, the median over rounds of the
per-process medians and of the ratio gradient / FFT floor. Run it as a file, not with ``-m``, so
that the tree under test and not this one comes first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def one(root: str, name: str, mode: str, evals: int, mesh: str | None) -> dict:
    sys.path.insert(0, root)
    os.chdir(root)
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import simulators
    from experiments.benchmarks.hmc import _config
    from explicit import field_model, log_density
    from simulators.lensing import noise_sigma

    assert Path(simulators.__file__).resolve().is_relative_to(Path(root).resolve()), simulators.__file__
    cfg = _config(name, mesh, "adjoint" if mode == "forward" else mode)
    model = cfg.build_model()
    prior = cfg.prior()
    data = np.zeros((model.bins.n_bins,) + tuple(model.sky.shape))
    ld = log_density(field_model(model, prior.numpyro_dists(), cfg.cosmology(), data,
                                 noise_sigma(model.bins, model.sky)), prior.names)
    pos = ld.init_position(jax.random.PRNGKey(0))
    if mode == "forward":  # the κ maps alone (PM + lightcone), no gradient
        cosmo, latent = cfg.cosmology(), model.latent(0)
        fn = jax.jit(lambda z: model.kappa(cosmo, z))
        args = (latent,)
    else:
        fn, args = ld.value_and_grad, (pos,)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(evals):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    if mode == "forward":
        value, grad = float(jnp.sum(jnp.asarray(out, jnp.float64) ** 2)), []
    else:
        value, grad = out
    x = jnp.asarray(np.random.default_rng(0).normal(size=(128,) * 3), jnp.float32)

    @jax.jit
    def fft(x):
        k = jnp.fft.rfftn(x)
        return [jnp.fft.irfftn(k * (i + 1.0), s=x.shape) for i in range(3)]

    jax.block_until_ready(fft(x))
    ffts = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(fft(x))
        ffts.append(time.perf_counter() - t0)
    norm = np.sqrt(sum(float(jnp.sum(jnp.asarray(g, jnp.float64) ** 2)) for g in jax.tree.leaves(grad)))
    return {"root": root, "config": name, "mesh": mesh, "mode": mode, "compile_s": compile_s,
            "median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
            "fft_ms": 1e3 * float(np.median(ffts)), "value": float(value), "grad_norm": float(norm),
            "load": os.getloadavg()[0]}


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_one":
        root, name, mode, evals, mesh = argv[1:6]
        print(json.dumps(one(root, name, mode, int(evals), None if mesh == "-" else mesh)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True, help="comma-separated source trees, e.g. /tmp/parent,.")
    ap.add_argument("--config", default="quick")
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--modes", default="adjoint,checkpoint",
                    help="gradient modes, and/or 'forward' (the maps alone: PM + lightcone)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evals", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = ap.parse_args(argv)
    import numpy as np

    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    rows = []
    for _ in range(args.rounds):
        for root in trees:
            for mode in args.modes.split(","):
                cmd = [sys.executable, str(Path(__file__).resolve()), "_one", root, args.config, mode,
                       str(args.evals), args.mesh or "-"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
    for root in trees:
        for mode in args.modes.split(","):
            rs = [r for r in rows if r["root"] == root and r["mode"] == mode]
            med = np.median([r["median_ms"] for r in rs])
            ratio = np.median([r["median_ms"] / r["fft_ms"] for r in rs])
            what = "map" if mode == "forward" else "gradient"
            print(f"{root} {args.config} {mode}: median {med:.0f} ms per {what}, "
                  f"{what} / FFT floor {ratio:.2f} ({len(rs)} processes)")


if __name__ == "__main__":
    main()
