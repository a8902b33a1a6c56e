"""One of two processes of a jax.distributed run on localhost (2 CPU devices each, 2x2 grid).

usage: python multiprocess_worker.py PROCESS_ID PORT OUT.npz
Process 0 gathers the global results and writes them to OUT.npz (see test_multiprocess.py).
"""

import sys

from procs import set_xla_flags  # noqa: E402

set_xla_flags(2)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2,
                           process_id=int(sys.argv[1]))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from simulators import DeviceGrid, SimConfig  # noqa: E402
from sim_cases import BASE, COSMO, loss_fn  # noqa: E402
from simulators import white_noise  # noqa: E402


def main():
    import simulators
    simulators.enable_x64()
    assert jax.process_count() == 2 and jax.device_count() == 4
    cfg = SimConfig(**BASE, grid=DeviceGrid((2, 2), halo=4))
    noise = white_noise(cfg, 7)
    (value, (rho, out)), (g_oc, g_noise) = loss_fn(cfg)(COSMO.Omega_c, noise)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    results = {"rho": gather(rho), "disp": gather(out.final.disp), "grad_noise": gather(g_noise),
               "grad_oc": np.asarray(g_oc), "value": np.asarray(value)}
    if jax.process_index() == 0:
        np.savez(sys.argv[3], **results)


if __name__ == "__main__":
    main()
