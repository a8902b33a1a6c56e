"""Time and peak memory of one κ map (forward and gradient) for the shipped configurations, and how
they scale with the number of lightcone slices ("shells") and tomographic bins.

usage: python -m experiments.benchmarks.lensing_maps [--cases quick,lsst_y10,...] [--out FILE.json]
       python -m experiments.benchmarks.lensing_maps --one CASE   (internal: one case, one process)

Each case runs in its own process so that its peak resident memory (ru_maxrss) is its own. Times
are the median of 3 calls (1 for lsst_y10) of the compiled program after a warm-up call; compile
times separately. The gradient is that of
L = Σ κ² with respect to all cosmological parameters and the white-noise field (what HMC needs).
XLA's own estimate of the compiled program's temporary buffers is reported next to ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# case name -> (config, changes to it, lightcone overrides)
CASES = {
    "quick": ("quick", {}, {}),
    "quick_bins1": ("quick", {"sources.n_bins": 1}, {}),
    "quick_bins5": ("quick", {"sources.n_bins": 5}, {}),
    "quick_slices_x2": ("quick", {}, {"slices": 2}),
    "quick_slices_x4": ("quick", {}, {"slices": 4}),
    "quick_adjoint": ("quick", {"simulation.gradient": "adjoint"}, {}),
    "lsst_y10": ("lsst_y10", {}, {}),
    "lsst_y10_adjoint": ("lsst_y10", {"simulation.gradient": "adjoint"}, {}),
}


def _timed(fn, *args, repeats: int = 3):
    """Median wall time of ``repeats`` calls of a compiled function, after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_one(name: str) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from experiments.config import load_config
    from simulators.lightcone import samples_per_step

    config, changes, lc_over = CASES[name]
    cfg = load_config(config)
    if changes:
        cfg = cfg.with_(**changes)
    model = cfg.build_model()
    base_slices = samples_per_step(model.cfg, model.lightcone)
    if "slices" in lc_over:
        lc = dataclasses.replace(model.lightcone, slices_per_step=base_slices * lc_over["slices"])
        model = dataclasses.replace(model, lightcone=lc)
    slices = samples_per_step(model.cfg, model.lightcone)
    cosmo = cfg.cosmology()
    latent = model.latent(0)

    forward = jax.jit(model.kappa)

    def loss(c, z):
        return jnp.sum(model.kappa(c, z) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    out = dict(case=name, config=config, changes=changes, mesh=list(model.cfg.mesh_shape),
               n_steps=model.cfg.n_steps, n_bins=model.bins.n_bins, sky=list(model.sky.shape),
               slices_per_step=slices, shells=slices * model.cfg.n_steps,
               gradient_mode=model.cfg.gradient)
    t0 = time.perf_counter()
    fwd_c = forward.lower(cosmo, latent).compile()
    out["forward_compile_s"] = time.perf_counter() - t0
    out["forward_xla_temp_mb"] = fwd_c.memory_analysis().temp_size_in_bytes / 2**20
    repeats = 1 if config == "lsst_y10" else 3  # a minute per lsst_y10 gradient call
    out["forward_s"] = _timed(fwd_c, cosmo, latent, repeats=repeats)
    rss_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    grad_c = grad.lower(cosmo, latent).compile()
    out["grad_compile_s"] = time.perf_counter() - t0
    out["grad_xla_temp_mb"] = grad_c.memory_analysis().temp_size_in_bytes / 2**20
    out["grad_s"] = _timed(grad_c, cosmo, latent, repeats=repeats)
    out["peak_rss_forward_mb"] = rss_fwd
    out["peak_rss_total_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv=None):
    import simulators
    simulators.enable_x64()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default="experiments/benchmarks/results_lensing.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = []
    for name in args.cases.split(","):
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.lensing_maps", "--one", name],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"{name:18s} bins {res['n_bins']} shells {res['shells']:5d}  forward {res['forward_s']:6.2f} s "
              f"(compile {res['forward_compile_s']:5.1f})  grad {res['grad_s']:6.2f} s "
              f"(compile {res['grad_compile_s']:5.1f})  XLA temp fwd/grad {res['forward_xla_temp_mb']:6.0f}/"
              f"{res['grad_xla_temp_mb']:6.0f} MB  peak RSS fwd {res['peak_rss_forward_mb']:6.0f} MB, "
              f"with grad {res['peak_rss_total_mb']:6.0f} MB", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(machine="2-core CPU VM, no GPU", results=results), f, indent=1)


if __name__ == "__main__":
    main()
