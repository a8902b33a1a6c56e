"""Run in a subprocess with 2 fake CPU devices: the field-level log-density, its gradient and
(with ``mclmc``) a short MCLMC run for a tiny PM lightcone model on one device and sharded over a
2x1 grid, written to an .npz that tests/test_explicit.py compares. The MCLMC run is most of the
worker's time (its compilations, ~2 min), so only the slow test asks for it. The short NUTS run of
explicit_multiprocess_worker is defined here too.

usage: python explicit_sharded_worker.py OUT.npz [mclmc]
"""

import os
import sys
import tempfile

from procs import set_xla_flags  # noqa: E402

# 2 fake devices, unless the importer (explicit_multiprocess_worker) already chose its own
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    set_xla_flags(2)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

from simulators import DeviceGrid, SimConfig  # noqa: E402
from simulators.lensing import PMLensing, noise_sigma  # noqa: E402
from simulators.lightcone import FlatSky, Lightcone  # noqa: E402
import lightcone_cases as lcc  # noqa: E402
from explicit import HMCSettings, field_model, log_density, run_hmc  # noqa: E402

# 16^3 particles and mesh in a 128^3 Mpc/h box (8 Mpc/h cells), 2 PM steps from a = 0.3, a 4 degree
# 16^2 flat sky to chi = 1500 Mpc/h (the two lcc source bins at z ~ 0.3, 0.5), float32 fields.
BASE = dict(mesh_shape=(16, 16, 16), box_size=(128.0, 128.0, 128.0), a_init=0.3, n_steps=2,
            gradient="adjoint")
PRIORS = {"Omega_c": dist.Uniform(0.15, 0.4), "sigma8": dist.Uniform(0.5, 1.1)}


def evaluate(grid: DeviceGrid, data=None, mclmc: bool = False):
    cone = Lightcone(FlatSky(4.0, 16), lcc.CHI_MAX)
    pm = PMLensing(SimConfig(**BASE, grid=grid), cone, lcc.BINS)
    sigma = noise_sigma(lcc.BINS, cone.sky)
    truth = pm.latent(5)
    if data is None:  # noise-only data: what is compared is ln p and its gradient, not a fit
        data = np.random.default_rng(0).normal(size=(lcc.BINS.n_bins,) + cone.sky.shape)
        data *= sigma[:, None, None]
    model = field_model(pm, PRIORS, lcc.COSMO, data, sigma)
    ld = log_density(model, model.theta_names, init={"Omega_c": 0.27, "sigma8": 0.85})
    pos = ld.init_position(jax.random.PRNGKey(0), field=0.9 * np.asarray(truth))
    logp, grad = ld.value_and_grad(pos)
    g_field = grad[ld.field_site]
    layout = grid.sharding(3) if grid.sharded else None

    def laid_out(a):  # split like the grid's field (on one device: not split)
        return bool(a.sharding.is_equivalent_to(layout, 3)) if grid.sharded else a.is_fully_replicated

    default = ld.init_position(jax.random.PRNGKey(1))[ld.field_site]  # the default start draw
    results = {}
    if mclmc:  # a short MCLMC run (blackjax's tuning differentiates the lightcone in its own trace)
        run = run_hmc(model, HMCSettings(sampler="mclmc", num_warmup=20, num_samples=2, num_chains=1),
                      tempfile.mkdtemp(), theta_names=model.theta_names, progress=False,
                      init={"Omega_c": 0.27, "sigma8": 0.85,
                            ld.field_site: 0.9 * np.asarray(truth, np.float64)})
        results["mclmc_theta"] = np.asarray(run.theta)
    results.update(logp=np.asarray(logp), grad_theta=np.array([grad[n] for n in ld.theta_names]),
                   grad_field=np.asarray(g_field), grad_field_sharded=np.asarray(laid_out(g_field)),
                   start_sharded=np.asarray(laid_out(pos[ld.field_site])),
                   default_start=np.asarray(default), default_start_sharded=np.asarray(laid_out(default)))
    return data, results


NUTS_MP = HMCSettings(sampler="nuts", num_warmup=6, num_samples=6, num_chains=1, max_tree_depth=3,
                      segment=4, thin_field=3, seed=2)


def nuts_model(grid: DeviceGrid):
    """The model of ``evaluate`` on noise-only data (the same on every process: a fixed seed)."""
    cone = Lightcone(FlatSky(4.0, 16), lcc.CHI_MAX)
    pm = PMLensing(SimConfig(**BASE, grid=grid), cone, lcc.BINS)
    sigma = noise_sigma(lcc.BINS, cone.sky)
    data = np.random.default_rng(0).normal(size=(lcc.BINS.n_bins,) + cone.sky.shape)
    truth = pm.latent(5)
    if not truth.is_fully_addressable:  # split over processes: every process needs all of it
        from jax.experimental import multihost_utils

        truth = multihost_utils.process_allgather(truth, tiled=True)
    return field_model(pm, PRIORS, lcc.COSMO, data * sigma[:, None, None], sigma), truth


def run_nuts(model_and_truth, out_dir, **kw):
    """A short NUTS run of ``nuts_model``'s model (3 segments, 2 fields kept) into out_dir."""
    model, truth = model_and_truth
    return run_hmc(model, NUTS_MP, out_dir, theta_names=model.theta_names, progress=False,
                   init={"Omega_c": 0.27, "sigma8": 0.85,
                         model.field_site: 0.9 * np.asarray(truth, np.float64)}, **kw)


def main():
    import simulators
    simulators.enable_x64()
    mclmc = sys.argv[2:] == ["mclmc"]
    data, single = evaluate(DeviceGrid(), mclmc=mclmc)
    _, sharded = evaluate(DeviceGrid((2, 1), halo=4), data, mclmc=mclmc)
    out = {f"single_{k}": v for k, v in single.items()}
    out.update({f"sharded_{k}": v for k, v in sharded.items()})
    np.savez(sys.argv[1], **out)


if __name__ == "__main__":
    main()
