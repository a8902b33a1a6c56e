"""Two processes on localhost (jax.distributed, CPU collectives) equal one process."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from simulators import SimConfig, white_noise
from tests.procs import free_port
from tests.sim_cases import BASE, COSMO, loss_fn

from tests.procs import HANG

HERE = Path(__file__).parent


def test_two_processes_equal_single_process(tmp_path):
    out, port = tmp_path / "mp.npz", free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(i),
                               str(port), str(out)], cwd=HERE.parent)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=HANG) == 0
    got = dict(np.load(out))

    cfg = SimConfig(**BASE)
    (value, (rho, run)), (g_oc, g_noise) = loss_fn(cfg)(COSMO.Omega_c, white_noise(cfg, 7))
    # float64; the distributed path only reorders sums (FFTs, halo adds): 1e-10 relative
    for key, ref in [("rho", rho), ("disp", run.final.disp), ("grad_noise", g_noise),
                     ("grad_oc", g_oc), ("value", value)]:
        ref = np.asarray(ref)
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-10 * np.max(np.abs(ref)))
    assert jax.process_count() == 1
