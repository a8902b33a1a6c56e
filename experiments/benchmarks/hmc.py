"""Field-level HMC costs: gradient evaluations per second and peak memory of the log-density
gradient (reverse-time adjoint against checkpointed autodiff), and sampler efficiency (ESS per
gradient and per hour) of NUTS against MCLMC on one observation.

    python -m experiments.benchmarks.hmc grads --config quick --evals 20
    python -m experiments.benchmarks.hmc grads --config lsst_y10 --mesh 32,32,128 --evals 3
    python -m experiments.benchmarks.hmc chains --config quick --maps obs.h5 --work runs/hmc_bench \
        --samplers nuts,mclmc --mclmc 500,2500 --out experiments/benchmarks/results_hmc.json

``grads`` runs every gradient mode in its own subprocess, so that each peak resident set size
(``ru_maxrss``) belongs to one mode alone; it reports the RSS after building the model (imports,
tables) and at the end (compilation and gradients included), the mean and median time per
gradient, and the "FFT floor" measured in the same process (``fft_floor``: median time of one
rfftn and three irfftn at 128³, float32) with the ratio median gradient / FFT floor, a number
that depends less on the machine and on what else shares it. The data are zero maps: the cost of
a gradient does not depend on their values. ``chains`` runs ``lensbench hmc`` per sampler on the
observation with the config's ``[hmc]`` settings (sampler replaced) and reads ESS, R̂ and
wall time from each run's diagnostics.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _config(name: str, mesh: str | None, gradient: str, changes: dict | None = None):
    """The named config with the gradient mode, the mesh ("nx,ny,nz") and any other dotted-key
    ``changes`` (e.g. {"maps.npix": 32}: gpu_check's CPU smoke shrinks the maps too)."""
    from experiments.config import load_config

    cfg = load_config(name)
    all_changes = {"simulation.gradient": gradient, **(changes or {})}
    if mesh:
        all_changes["simulation.mesh_shape"] = [int(n) for n in mesh.split(",")]
    return cfg.with_(**all_changes)


def build_log_density(name: str, mesh: str | None, gradient: str, changes: dict | None = None):
    """(cfg, model, prior, log density, start position) of the field-level posterior on zero maps
    (the cost of a gradient does not depend on the data's values). Call with x64 enabled."""
    import jax
    import numpy as np

    from explicit import field_model, log_density
    from simulators.lensing import noise_sigma

    cfg = _config(name, mesh, gradient, changes)
    model = cfg.build_model()
    prior = cfg.prior()
    data = np.zeros((model.bins.n_bins,) + tuple(model.sky.shape))
    fm = field_model(model, prior.numpyro_dists(), cfg.cosmology(), data,
                     noise_sigma(model.bins, model.sky))
    ld = log_density(fm, prior.names)
    return cfg, model, prior, ld, ld.init_position(jax.random.PRNGKey(0))


def device_peak_bytes() -> int | None:
    """Peak bytes the first device's allocator has handed out in this process (None on CPU,
    whose client keeps no such statistics: there the RSS is the measure). Per process: there is
    no reset, which is why every mode runs in its own subprocess."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def fft_floor(n: int = 128, repeats: int = 20) -> float:
    """Median seconds of one rfftn and three irfftn of an n³ float32 field (a PM force's FFTs at
    that size), in this process: the unit that makes gradient times comparable across machines
    and across loads of a shared one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n, n)), jnp.float32)

    @jax.jit
    def f(x):
        k = jnp.fft.rfftn(x)
        return [jnp.fft.irfftn(k * (i + 1.0), s=x.shape) for i in range(3)]  # 3 distinct inverses

    jax.block_until_ready(f(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_gradient(name: str, mesh: str | None, gradient: str, evals: int,
                     changes: dict | None = None) -> dict:
    """One gradient mode, in this process: compile time, gradients/s, RSS (MB) before and after,
    and on an accelerator its peak memory (``device_peak_bytes``: after the gradients, before
    the FFT floor, whose arrays would otherwise count; ``device_peak_mb``: at the end, FFT floor
    included, as measured before this key existed) and that peak per mesh cell."""
    import jax
    import numpy as np

    import simulators

    simulators.enable_x64()
    cfg, model, prior, ld, pos = build_log_density(name, mesh, gradient, changes)
    base = _rss_mb()
    t0 = time.perf_counter()
    jax.block_until_ready(ld.value_and_grad(pos))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(evals):
        t0 = time.perf_counter()
        jax.block_until_ready(ld.value_and_grad(pos))
        times.append(time.perf_counter() - t0)
    per = float(np.mean(times))
    median = float(np.median(times))
    grad_peak = device_peak_bytes()
    fft = fft_floor()
    # accelerator memory (None on CPU, where the RSS above is the measure)
    peak = device_peak_bytes()
    mesh_cells = int(np.prod(cfg.simulation.mesh_shape))
    return {"config": name, "mesh_shape": list(cfg.simulation.mesh_shape),
            "n_steps": cfg.simulation.n_steps, "npix": cfg.maps.npix, "n_bins": model.bins.n_bins,
            "n_params": prior.dim, "field_cells": int(np.prod(model.latent_shape)),
            "gradient": gradient, "compile_plus_first_s": compile_s, "seconds_per_gradient": per,
            "gradients_per_s": 1.0 / per, "median_seconds_per_gradient": median,
            "fft_floor_s": fft, "gradient_over_fft_floor": median / fft, "evals": evals,
            "rss_after_build_mb": base,
            "peak_rss_mb": _rss_mb(), "device_peak_mb": None if peak is None else peak / 2**20,
            "devices": [str(d) for d in jax.devices()],
            "backend": jax.default_backend(), "mesh_cells": mesh_cells,
            "device_peak_bytes": grad_peak,
            "device_bytes_per_mesh_cell": None if grad_peak is None else grad_peak / mesh_cells}


def run_grads(args) -> list[dict]:
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, "-m", "experiments.benchmarks.hmc", "_one", "--config", args.config,
               "--gradient", mode, "--evals", str(args.evals)] + (["--mesh", args.mesh] if args.mesh else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{row['config']} {row['mesh_shape']} {mode}: {row['gradients_per_s']:.3g} grad/s, "
              f"median {1e3 * row['median_seconds_per_gradient']:.1f} ms per gradient, "
              f"FFT floor {1e3 * row['fft_floor_s']:.1f} ms (gradient / floor "
              f"{row['gradient_over_fft_floor']:.2f}), "
              f"compile {row['compile_plus_first_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB "
              f"(after build {row['rss_after_build_mb']:.0f} MB)"
              + (f", device peak {row['device_peak_bytes'] / 2**20:.0f} MB "
                 f"({row['device_bytes_per_mesh_cell']:.0f} B per mesh cell)"
                 if row.get("device_peak_bytes") else ""),
              flush=True)
        rows.append(row)
    return rows


def run_chains(args) -> list[dict]:
    from experiments.config import load_config
    from experiments.pipeline import run_hmc

    rows = []
    for sampler in args.samplers.split(","):
        changes = {"hmc.sampler": sampler}
        if sampler == "mclmc" and args.mclmc:  # one gradient per step: its own step counts
            warm, samples = (int(n) for n in args.mclmc.split(","))
            changes.update({"hmc.num_warmup": warm, "hmc.num_samples": samples,
                            "hmc.segment": max(1, samples // 5)})
        cfg = load_config(args.config).with_(**changes)
        out = Path(args.work) / sampler
        t0 = time.perf_counter()
        run_hmc(cfg, args.maps, out, progress=not args.quiet)
        wall = time.perf_counter() - t0
        diag = json.loads((out / "diagnostics.json").read_text())
        ess = {k: v["ess"] for k, v in diag["parameters"].items()}
        grads = diag["gradient_evaluations"]["total"]
        hours = diag.get("wall_time_s", wall) / 3600.0
        rows.append({"sampler": sampler, "config": args.config, "ess": ess,
                     "r_hat": {k: v["r_hat"] for k, v in diag["parameters"].items()},
                     "gradients": grads, "sampling_wall_s": hours * 3600.0, "total_wall_s": wall,
                     "min_ess_per_1000_gradients": 1000.0 * min(ess.values()) / grads,
                     "min_ess_per_hour": min(ess.values()) / hours})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grads")
    g.add_argument("--config", default="quick")
    g.add_argument("--mesh", default=None, help="override mesh_shape, e.g. 32,32,128")
    g.add_argument("--modes", default="adjoint,checkpoint")
    g.add_argument("--evals", type=int, default=10)
    g.add_argument("--out", type=Path, default=None, help="append the rows to this JSON file")
    one = sub.add_parser("_one")  # internal: one mode in a fresh process
    one.add_argument("--config")
    one.add_argument("--mesh", default=None)
    one.add_argument("--gradient")
    one.add_argument("--evals", type=int)
    c = sub.add_parser("chains")
    c.add_argument("--config", default="quick")
    c.add_argument("--maps", required=True)
    c.add_argument("--work", type=Path, default=Path("runs/hmc_bench"))
    c.add_argument("--samplers", default="nuts,mclmc")
    c.add_argument("--mclmc", default=None, help="MCLMC tuning,sampling steps (default: [hmc]'s)")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import simulators

    simulators.enable_x64()  # run_hmc's cosmology tables (measure_gradient turns it on itself)
    if args.cmd == "_one":
        print(json.dumps(measure_gradient(args.config, args.mesh, args.gradient, args.evals)))
        return
    rows = run_grads(args) if args.cmd == "grads" else run_chains(args)
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
