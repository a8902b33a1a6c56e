"""Run in a subprocess with N fake CPU devices: sharded results for several device grids, next to
the single-device path, written to an .npz that tests compare (see test_distributed.py, which
names the grids). The PM run is made on the first list of grids, the lightcone maps on the second;
the halo exchange's adjoint is checked on both.

usage: python multidevice_worker.py N_DEVICES OUT.npz PX1xPY1[,PX2xPY2...] PX1xPY1[,...]
"""

import sys

from procs import set_xla_flags

set_xla_flags(int(sys.argv[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simulators import DeviceGrid, HaloOverflowError, SimConfig, simulate, white_noise  # noqa: E402
from simulators.grid import pad_shard, unpad_shard  # noqa: E402
from experiments.config import parse_pdims  # noqa: E402
from sim_cases import BASE, COSMO, loss_fn  # noqa: E402
import lightcone_cases as lcc  # noqa: E402


def run_lightcone(cfg, prefix, results):
    """PM κ maps (flat sky with randomized replicas; HEALPix nside 8 around the box centre) and
    their gradients w.r.t. (Omega_c, noise)."""
    from simulators.lightcone import HealpixSky, Lightcone

    noise = white_noise(cfg, 3)
    cones = {"lc_": lcc.lightcone(randomize=True, seed=1),
             "hp_": Lightcone(HealpixSky(8), lcc.CHI_MAX, randomize=True, seed=1)}
    for tag, cone in cones.items():
        (value, kappa), (g_oc, g_noise) = lcc.map_loss(cfg, cone)(lcc.COSMO.Omega_c, noise)
        results[prefix + tag + "kappa"] = np.asarray(kappa)
        results[prefix + tag + "grad_oc"] = np.asarray(g_oc)
        results[prefix + tag + "grad_noise"] = np.asarray(g_noise)

def run(cfg, prefix, results):
    noise = white_noise(cfg, 7)
    (value, (rho, out)), (g_oc, g_noise) = loss_fn(cfg)(COSMO.Omega_c, noise)
    results[prefix + "noise"] = np.asarray(noise)
    results[prefix + "rho"] = np.asarray(rho)
    results[prefix + "disp"] = np.asarray(out.final.disp)
    results[prefix + "mom"] = np.asarray(out.final.mom)
    results[prefix + "snap"] = np.asarray(out.snapshots["disp"])
    results[prefix + "grad_oc"] = np.asarray(g_oc)
    results[prefix + "grad_noise"] = np.asarray(g_noise)
    results[prefix + "maxdisp"] = np.asarray(out.max_displacement)


def halo_dot_test(grid, results, prefix):
    """<y, fill(x)> == <reduce(y), x> for the explicit pair, and JAX's transpose of fill == reduce."""
    rng = np.random.default_rng(0)
    shape = (16, 16, 8)
    x = grid.put(rng.normal(size=shape))
    h = grid.halo
    padded_shape = (shape[0] + 2 * h * grid.pdims[0], shape[1] + 2 * h * grid.pdims[1], shape[2])
    y = grid.put(rng.normal(size=padded_shape))
    fill = jax.jit(grid.shard_map(lambda a: pad_shard(grid, a), (3,), 3))
    reduce = jax.jit(grid.shard_map(lambda a: unpad_shard(grid, a), (3,), 3))
    lhs = float(jnp.vdot(y, fill(x)))
    rhs = float(jnp.vdot(reduce(y), x))
    (transposed,) = jax.linear_transpose(fill, x)(y)
    results[prefix + "halo_dot"] = np.array([lhs, rhs])
    results[prefix + "halo_transpose_err"] = np.asarray(jnp.max(jnp.abs(transposed - reduce(y))))


def main():
    import simulators
    simulators.enable_x64()
    out_path = sys.argv[2]
    layouts, lightcone_layouts = (sys.argv[i].split(",") for i in (3, 4))
    results = {}
    run(SimConfig(**BASE), "single_", results)
    run_lightcone(SimConfig(**lcc.BASE, dtype="float64"), "single_", results)
    for text in dict.fromkeys([*layouts, *lightcone_layouts]):
        grid = DeviceGrid(parse_pdims(text), halo=4)
        halo_dot_test(grid, results, f"{text}_")
        if text in layouts:
            run(SimConfig(**BASE, grid=grid), f"{text}_", results)
        if text in lightcone_layouts:
            run_lightcone(SimConfig(**lcc.BASE, dtype="float64", grid=grid), f"{text}_", results)
    # a halo too small for the displacements must raise, not give a silently wrong density
    try:
        simulate(COSMO, SimConfig(**BASE, grid=DeviceGrid((2, 2), halo=2)), seed=7)
        results["halo_overflow_message"] = np.array("no error")
    except HaloOverflowError as err:
        results["halo_overflow_message"] = np.array(str(err))
    # bad layouts name the mismatch and the valid choices
    for name, kwargs in [("indivisible", dict(mesh_shape=(18, 16, 32), grid=DeviceGrid((4, 1), halo=2))),
                         ("too_few_planes", dict(mesh_shape=(4, 16, 32), grid=DeviceGrid((8, 1), halo=2)))]:
        try:
            SimConfig(box_size=64.0, **kwargs)
            results[f"layout_error_{name}"] = np.array("no error")
        except ValueError as err:
            results[f"layout_error_{name}"] = np.array(str(err))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main()
