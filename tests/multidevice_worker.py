"""Run in a subprocess with N fake CPU devices: sharded results for several device grids, next to
the single-device path, written to an .npz that tests compare (see test_distributed.py).

usage: python multidevice_worker.py N_DEVICES OUT.npz PX1xPY1 [PX2xPY2 ...]
"""

import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simulators import Cosmology, DeviceGrid, SimConfig, evolve, linear_field, white_noise  # noqa: E402
from simulators.forces import paint_density  # noqa: E402
from simulators.grid import pad_shard, unpad_shard  # noqa: E402

# 16 x 16 x 32 tall box (non-cubic mesh), float64 so that sharded and single-device results can be
# compared at round-off level, 3 steps from a = 0.2 to 0.6 (displacements stay inside a 4-cell halo).
BASE = dict(mesh_shape=(16, 16, 32), box_size=(64.0, 64.0, 128.0), a_init=0.2, a_final=0.6,
            n_steps=3, snapshots=(0.4,), dtype="float64")
COSMO = Cosmology.fiducial()


def loss_fn(cfg):
    def loss(omega_c, noise):
        cosmo = Cosmology(Omega_c=omega_c, Omega_b=COSMO.Omega_b, h=COSMO.h, n_s=COSMO.n_s,
                          sigma8=COSMO.sigma8)
        out = evolve(cosmo, cfg, linear_field(cosmo, cfg, noise))
        rho = paint_density(cfg, out.final.disp)
        return jnp.sum(rho**2), (rho, out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


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
    lx, ly = shape[0] // grid.pdims[0], shape[1] // grid.pdims[1]
    h = grid.halo
    padded_shape = (shape[0] + 2 * h * grid.pdims[0], shape[1] + 2 * h * grid.pdims[1], shape[2])
    y = grid.put(rng.normal(size=padded_shape))
    fill = jax.jit(grid.shard_map(lambda a: pad_shard(grid, a), 1, (3,), 3))
    reduce = jax.jit(grid.shard_map(lambda a: unpad_shard(grid, a), 1, (3,), 3))
    lhs = float(jnp.vdot(y, fill(x)))
    rhs = float(jnp.vdot(reduce(y), x))
    (transposed,) = jax.linear_transpose(fill, x)(y)
    results[prefix + "halo_dot"] = np.array([lhs, rhs])
    results[prefix + "halo_transpose_err"] = np.asarray(jnp.max(jnp.abs(transposed - reduce(y))))
    del lx, ly


def main():
    out_path, layouts = sys.argv[2], sys.argv[3:]
    results = {}
    run(SimConfig(**BASE), "single_", results)
    for text in layouts:
        grid = DeviceGrid.parse(text, halo=4)
        run(SimConfig(**BASE, grid=grid), f"{text}_", results)
        halo_dot_test(grid, results, f"{text}_")
    np.savez(out_path, **results)


if __name__ == "__main__":
    main()
