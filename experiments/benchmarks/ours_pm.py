"""Benchmark of lensbench's PM simulator, one measurement per process (same protocol as
``peer_jaxpm.py``): prints ONE JSON line on stdout.

    .venv/bin/python experiments/benchmarks/ours_pm.py --n 64 --what forward --repeats 5

Setting (as for the peer): box 256 Mpc/h, N³ particles on an N³ mesh, float32, Ω_c = 0.25,
σ_8 = 0.8, white noise from seed 0, 2LPT at a = 0.1, 10 uniform steps in a to a = 1, final CIC
density.

``--what``:
  forward  jit(omega_c, noise) -> final density (linear field, 2LPT, 10 steps, paint)
  grad     jit(grad(sum(rho**2), argnums=(0, 1))) with ``--gradient checkpoint|adjoint``
  forces   jit(pm_force) on N³ particles displaced from the grid
  fft      the FFT floor: 1 rfftn + 3 irfftn at N³
``--steps`` changes the number of steps; ``--devices D --pdims PXxPY`` runs on D fake CPU devices
(weak scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def _reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb():
    """VmHWM of this process in MiB (peak RSS since the last reset), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--what", choices=["forward", "grad", "forces", "fft"], required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gradient", choices=["checkpoint", "adjoint"], default="adjoint")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--pdims", default="1x1")
    p.add_argument("--mesh", default=None, help="mesh as NXxNYxNZ (default N³); box 4 Mpc/h per cell")
    return p.parse_args()


def main():
    import simulators
    simulators.enable_x64()
    args = parse()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import jax.numpy as jnp

    from experiments.config import parse_pdims
    from simulators import (Cosmology, DeviceGrid, SimConfig, evolve, linear_field, paint_density,
                            pm_force, white_noise)

    n = args.n
    mesh = tuple(int(v) for v in args.mesh.split("x")) if args.mesh else (n, n, n)
    grid = DeviceGrid(parse_pdims(args.pdims), halo=8)
    cfg = SimConfig(mesh_shape=mesh, box_size=tuple(256.0 * m / n for m in mesh), a_init=0.1,
                    a_final=1.0, n_steps=args.steps, lpt_order=2, gradient=args.gradient,
                    dtype="float32", grid=grid)
    fid = Cosmology.fiducial()

    def cosmo_of(omega_c):
        return Cosmology(Omega_c=omega_c, Omega_b=fid.Omega_b, h=fid.h, n_s=fid.n_s, sigma8=0.8)

    def density(omega_c, noise):
        cosmo = cosmo_of(omega_c)
        out = evolve(cosmo, cfg, linear_field(cosmo, cfg, noise))
        return paint_density(cfg, out.final.disp)

    noise = white_noise(cfg, 0)
    omega_c = jnp.float64(0.25)
    if args.what == "forward":
        fn, fargs = jax.jit(density), (omega_c, noise)
    elif args.what == "grad":
        fn = jax.jit(jax.grad(lambda oc, w: jnp.sum(density(oc, w) ** 2), argnums=(0, 1)))
        fargs = (omega_c, noise)
    elif args.what == "forces":
        disp = grid.put(jax.random.normal(jax.random.key(1), cfg.particle_shape + (3,), jnp.float32) * 2.0)
        fn, fargs = jax.jit(lambda d: pm_force(cfg, d)), (disp,)
    else:
        x = jax.random.normal(jax.random.key(2), cfg.mesh_shape, jnp.float32)

        def floor(x):
            xk = jnp.fft.rfftn(x)
            return [jnp.fft.irfftn(xk * (i + 1.0), s=x.shape) for i in range(3)]

        fn, fargs = jax.jit(floor), (x,)

    t0 = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_temp_mb = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else None
    _reset_peak_rss()  # so that run_peak_rss_mb excludes compilation
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*fargs))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*fargs))
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "code": "lensbench", "n": n, "what": args.what, "median_s": statistics.median(times),
        "all_s": times, "compile_s": compile_s, "first_call_s": first,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "run_peak_rss_mb": _peak_rss_mb(), "xla_temp_mb": xla_temp_mb,
        "steps": args.steps, "gradient": args.gradient, "devices": args.devices,
        "pdims": args.pdims, "mesh": list(cfg.mesh_shape),
        "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", ""),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
