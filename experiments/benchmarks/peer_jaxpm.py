"""Benchmark of the peer code JaxPM 0.1.6, one measurement per process.

Run it with the PEER interpreter (``.venv-peer/bin/python``, made by
``experiments/benchmarks/setup_peer.sh``); JaxPM is never a dependency of lensbench.

    .venv-peer/bin/python experiments/benchmarks/peer_jaxpm.py --n 64 --what forward --repeats 5

It prints exactly ONE JSON line on stdout (everything else goes to stderr):

    {"code": "jaxpm", "n": N, "what": W, "median_s": ..., "all_s": [...],
     "compile_s": ..., "peak_rss_mb": ..., ...extra informational keys}

Benchmark setting (the same one ``ours_pm.py`` must implement):
  * box 256 Mpc/h, N^3 particles on an N^3 mesh, float32, single CPU device;
  * cosmology ``jc.Planck15(Omega_c=omega_c, sigma8=0.8)`` with omega_c = 0.25;
  * ICs: white noise ``jax.random.normal(PRNGKey(0), (N, N, N), float32)`` coloured
    by the jax_cosmo linear P(k) (k = logspace(-4, 1, 128), interpolated), exactly
    as ``jaxpm.pm.linear_field`` does it but with the noise passed in so that it
    can be differentiated;
  * 2LPT at a = 0.1: ``jaxpm.pm.lpt(cosmo, ic, particles=None, a=0.1, order=2)``;
  * 10 fixed steps a = 0.1 -> 1.0 with diffrax, following the JaxPM 0.1.x
    notebooks: ``diffeqsolve(ODETerm(jaxpm.pm.make_diffrax_ode(mesh_shape,
    paint_absolute_pos=False)), LeapfrogMidpoint(), t0=0.1, t1=1.0, dt0=0.09,
    y0=jnp.stack([dx, p]), args=cosmo, saveat=SaveAt(t1=True),
    stepsize_controller=ConstantStepSize())`` (1 force evaluation per step);
  * final density: ``jaxpm.painting.cic_paint_dx(final_displacement)``.

``--what``:
  forward  jit(omega_c, noise) -> final density (whole pipeline: P(k), ICs, 2LPT, ODE, paint)
  grad     jit(grad(sum(rho**2), argnums=(0, 1))): gradient w.r.t. omega_c (scalar)
           AND the white-noise ICs in one reverse pass (``--grad-wrt`` narrows it)
  forces   jit(jaxpm.pm.pm_forces(disp, mesh_shape, paint_absolute_pos=False)) on
           N^3 particles displaced from the grid (``--paint abs`` uses absolute positions)
  fft      the FFT floor in plain jnp: 1 rfftn + 3 irfftn (gradient kernels) at N^3

Cosmology: jax_cosmo's P(k) is computed from one ``jc.Planck15`` object and 2LPT/ODE use a
fresh one (as in the JaxPM notebooks/tests, which reset ``cosmo._workspace``): sharing one
fails with KeyError 'h' in ``jaxpm.growth.dGfa``.

``--max-steps``: by default diffrax's ``max_steps=4096`` (the notebooks do not set it); it
also sizes diffrax's RecursiveCheckpointAdjoint, and ``--max-steps 10`` (the tuned variant,
same numbers) halves the gradient's peak memory (128^3: 15.0 GB -> 6.8 GB).

Timing: ``compile_s`` is the ahead-of-time lower+compile time; then one warm-up
call (``first_call_s``, excluded), then ``--repeats`` timed calls, each ended by
``block_until_ready``. ``peak_rss_mb`` is ``ru_maxrss`` of this process (KiB -> MiB).
XLA_FLAGS is not set here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


BOX = 256.0
A0 = 0.1
A1 = 1.0
NSTEPS = 10
OMEGA_C = 0.25
SIGMA8 = 0.8


def build(n: int, what: str, grad_wrt: str, paint: str, max_steps: int | None = None):
    """Returns (fn, args, info) with fn jitted."""
    import jax
    import jax.numpy as jnp

    mesh_shape = (n, n, n)
    box_size = (BOX, BOX, BOX)
    info: dict = {}

    if what == "fft":
        kx = jnp.fft.fftfreq(n).astype(jnp.float32) * 2 * jnp.pi
        kz = jnp.fft.rfftfreq(n).astype(jnp.float32) * 2 * jnp.pi
        kernels = (kx.reshape(n, 1, 1), kx.reshape(1, n, 1), kz.reshape(1, 1, n // 2 + 1))

        def fft_floor(x, k0, k1, k2):
            xk = jnp.fft.rfftn(x)
            return jnp.stack(
                [jnp.fft.irfftn(1j * k * xk, s=mesh_shape) for k in (k0, k1, k2)], axis=-1)

        x = jax.random.normal(jax.random.PRNGKey(1), mesh_shape, dtype=jnp.float32)
        return jax.jit(fft_floor), (x, *kernels), info

    from jaxpm.pm import pm_forces

    if what == "forces":
        key = jax.random.PRNGKey(2)
        disp = 0.5 * jax.random.normal(key, (*mesh_shape, 3), dtype=jnp.float32)
        if paint == "dx":
            fn = lambda d: pm_forces(d, mesh_shape=mesh_shape, paint_absolute_pos=False)
            args = (disp,)
        else:
            grid = jnp.stack(jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in mesh_shape],
                                          indexing="ij"), axis=-1)
            fn = lambda pos: pm_forces(pos, mesh_shape=mesh_shape, paint_absolute_pos=True)
            args = ((grid + disp).reshape(-1, 3),)
        info["paint"] = paint
        return jax.jit(fn), args, info

    import jax_cosmo as jc
    from diffrax import ConstantStepSize, LeapfrogMidpoint, ODETerm, SaveAt, diffeqsolve
    from jaxpm.distributed import fft3d, ifft3d
    from jaxpm.kernels import fftk
    from jaxpm.painting import cic_paint_dx
    from jaxpm.pm import lpt, make_diffrax_ode

    def linear_field_from_noise(noise, pk):
        # == jaxpm.pm.linear_field, with the normal field passed in (differentiable)
        field = fft3d(noise)
        kvec = fftk(field)
        kmesh = sum((kk / box_size[i] * mesh_shape[i])**2 for i, kk in enumerate(kvec))**0.5
        pkmesh = pk(kmesh) * (mesh_shape[0] * mesh_shape[1] * mesh_shape[2]) / (
            box_size[0] * box_size[1] * box_size[2])
        return ifft3d(field * jnp.sqrt(pkmesh))

    def simulate(omega_c, noise):
        # As in the JaxPM notebooks: P(k) from its own Cosmology object, then a fresh
        # one for lpt/ODE (jax_cosmo's growth cache in cosmo._workspace lacks the
        # keys that jaxpm.growth needs, so the two must not share a workspace).
        k = jnp.logspace(-4, 1, 128)
        pk = jc.power.linear_matter_power(jc.Planck15(Omega_c=omega_c, sigma8=SIGMA8), k)
        cosmo = jc.Planck15(Omega_c=omega_c, sigma8=SIGMA8)
        pk_fn = lambda x: jnp.interp(x.reshape([-1]), k, pk).reshape(x.shape)
        ic = linear_field_from_noise(noise, pk_fn)
        dx, p, _ = lpt(cosmo, ic, particles=None, a=A0, order=2)
        res = diffeqsolve(ODETerm(make_diffrax_ode(mesh_shape, paint_absolute_pos=False)),
                          LeapfrogMidpoint(),
                          t0=A0, t1=A1, dt0=(A1 - A0) / NSTEPS,
                          y0=jnp.stack([dx, p], axis=0),
                          args=cosmo,
                          saveat=SaveAt(t1=True),
                          stepsize_controller=ConstantStepSize(),
                          **solve_kw)
        rho = cic_paint_dx(res.ys[-1, 0])
        return rho, res.stats["num_steps"]

    # diffrax default max_steps=4096 (what the JaxPM notebooks use); it also sizes the
    # RecursiveCheckpointAdjoint of the gradient. --max-steps 10 is a tuned variant.
    solve_kw = {} if max_steps is None else {"max_steps": max_steps}
    info["max_steps"] = 4096 if max_steps is None else max_steps

    omega_c = jnp.asarray(OMEGA_C, dtype=jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(0), mesh_shape, dtype=jnp.float32)
    info.update(ode="diffrax.LeapfrogMidpoint+ConstantStepSize", nsteps=NSTEPS, lpt_order=2)

    if what == "forward":
        return jax.jit(simulate), (omega_c, noise), info

    def loss(omega_c, noise):
        rho, _ = simulate(omega_c, noise)
        return jnp.sum(rho**2)

    argnums = {"both": (0, 1), "omega_c": 0, "ic": 1}[grad_wrt]
    info["grad_wrt"] = grad_wrt
    return jax.jit(jax.grad(loss, argnums=argnums)), (omega_c, noise), info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--what", choices=["forward", "grad", "forces", "fft"], required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grad-wrt", choices=["both", "omega_c", "ic"], default="both")
    ap.add_argument("--paint", choices=["dx", "abs"], default="dx",
                    help="forces only: displacement painting (as in the sim) or absolute positions")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="diffrax max_steps (default: diffrax's 4096, as in the JaxPM notebooks); "
                         "10 = tuned variant, halves the gradient's memory")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import jaxpm

    out = {"code": "jaxpm", "n": a.n, "what": a.what}
    t_start = time.perf_counter()
    fn, args, info = build(a.n, a.what, a.grad_wrt, a.paint, a.max_steps)
    args = jax.block_until_ready(args)
    baseline = _rss_mb()

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    rss_first = _rss_mb()  # peak after compile + one execution

    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        res = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)

    if a.what == "forward":
        rho, nsteps = res
        info["num_steps"] = int(nsteps)
        info["check"] = float(jnp.sum(rho.astype(jnp.float64) ** 2)) if jax.config.jax_enable_x64 \
            else float(jnp.sum(rho ** 2))
        info["rho_mean"] = float(jnp.mean(rho))
    elif a.what == "grad":
        leaves = jax.tree_util.tree_leaves(res)
        if a.grad_wrt in ("both", "omega_c"):
            info["dloss_domega_c"] = float(leaves[0])
        if a.grad_wrt in ("both", "ic"):
            info["dloss_dic_rms"] = float(jnp.sqrt(jnp.mean(leaves[-1] ** 2)))

    out.update(
        median_s=statistics.median(times) if times else None,
        all_s=[round(t, 6) for t in times],
        min_s=min(times) if times else None,
        compile_s=round(compile_s, 4),
        first_call_s=round(first, 6),
        peak_rss_mb=round(_rss_mb(), 1),
        peak_rss_first_call_mb=round(rss_first, 1),
        baseline_rss_mb=round(baseline, 1),
        total_s=round(time.perf_counter() - t_start, 3),
        dtype="float32",
        box=BOX,
        jax=jax.__version__,
        jaxpm=getattr(jaxpm, "__version__", "0.1.6"),
        devices=str(jax.devices()[0].platform),
        xla_flags=os.environ.get("XLA_FLAGS"),
        ld_preload=os.environ.get("LD_PRELOAD"),
        **info,
    )
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
