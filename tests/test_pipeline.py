"""The implicit pipeline and the C_ell baseline through the command line, end to end on a tiny
Gaussian-field problem (16² maps, 2 bins, 2 parameters): generate -> train-compressor -> compress
-> fit-posterior (+ calibration) -> sample, NPE on C_ell, and cl-baseline; plus their errors.

The networks and flows are tiny and trained for a few epochs, so these tests check the plumbing
(files, shapes, held-out split, provenance, errors), not posterior quality; that is tested on toy
problems in test_compressors / test_npe / test_cl_baseline.
"""


import h5py
import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from experiments import cli
from experiments.config import load_config
from experiments.dataset import read_sims
from experiments.io import read_samples
from experiments.pipeline import split_sims

runner = CliRunner()

TINY = """
name = "tiny"
seed = 0
[simulation]
kind = "gaussian"
[maps]
field_deg = 5.0
npix = 16
[sources]
n_bins = 2
[cl]
n_ell_bins = 3
[prior]
params = ["Omega_c", "sigma8"]
[training_set]
n_sims = 48
n_calibration = 12
[compressor]
network = "cnn"
width = 4
depth = 2
epochs = 3
batch_size = 12
[npe]
max_epochs = 8
noise_copies = 2
n_samples = 500
calibration_samples = 20
[cl_baseline]
n_cov = 40
num_warmup = 30
num_samples = 40
num_chains = 1
"""


def invoke(*args):
    result = runner.invoke(cli.app, [str(a) for a in args])
    return result


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    (d / "tiny.toml").write_text(TINY)
    ok("maps", "--config", d / "tiny.toml", "--out", d / "obs.h5", "--no-progress")
    ok("generate", "--config", d / "tiny.toml", "--out", d / "sims.h5", "--no-progress")
    return d


def test_generate_and_split(work):
    sims = read_sims(work / "sims.h5")
    assert sims.kappa.shape == (48, 2, 16, 16) and sims.theta.shape == (48, 2)
    assert sims.names == ("Omega_c", "sigma8")
    split = split_sims(sims, 12)
    # the held-out rows are the last 12 of the file, disjoint from training
    assert sorted(sims.indices[split.held_out]) == list(range(36, 48))
    assert not set(split.train) & set(split.held_out)
    with pytest.raises(ValueError, match="n_calibration = 48"):
        split_sims(sims, 48)


def test_compressor_npe_sample(work):
    cfg = work / "tiny.toml"
    ok("train-compressor", "--config", cfg, "--sims", work / "sims.h5", "--loss", "mse",
       "--out", work / "comp", "--no-progress")
    assert (work / "comp" / "loss.png").is_file()
    res = ok("compress", "--compressor", work / "comp", "--in", work / "sims.h5",
             "--out", work / "t.h5")
    with h5py.File(work / "t.h5", "r") as f:
        summaries, theta, indices = f["summaries"][()], f["theta"][()], f["indices"][()]
    # the trained network applied here to the sims plus the documented noise draw (seed 0, one
    # copy): the same float32 program on the same inputs, so equal up to batching (1e-5 of the
    # summaries' scale; a wrong map, noise draw or row order changes them by O(1))
    from compressors import load_compressor
    from estimators.npe import add_noise_copies

    sims = read_sims(work / "sims.h5")
    np.testing.assert_array_equal(theta, sims.theta)
    np.testing.assert_array_equal(indices, sims.indices)
    _, noisy = add_noise_copies(sims.theta, sims.kappa, sims.sigma_n, 1, np.random.default_rng(0))
    want = np.asarray(load_compressor(work / "comp").compress(noisy))
    assert summaries.shape == want.shape == (48, 2) and np.std(want) > 0
    np.testing.assert_allclose(summaries, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    ok("fit-posterior", "--config", cfg, "--sims", work / "sims.h5", "--compressor", work / "comp",
       "--out", work / "post", "--no-progress")
    cal = work / "post" / "calibration"
    assert (cal / "calibration.json").is_file() and (cal / "tarp.png").is_file()
    res = ok("sample", "--posterior", work / "post", "--maps", work / "obs.h5", "--n", 300,
             "--out", work / "s.h5")
    s = read_samples(work / "s.h5")
    assert s.method == "npe_mse" and s.samples.shape == (300, 2) and s.names == ("Omega_c", "sigma8")
    obs_cosmo = load_config(cfg).cosmology()
    np.testing.assert_allclose(s.truth, [obs_cosmo.Omega_c, obs_cosmo.sigma8])
    assert s.info["n_train_sims"] == 36  # 48 minus the 12 held out
    assert "npe_mse" in res.stdout


def test_online_compressor(work):
    # 36 training rows, 10 % for validation: 32 → 2 steps of 12 fresh draws per epoch, 3 epochs
    res = ok("train-compressor", "--config", work / "tiny.toml", "--sims", work / "sims.h5",
             "--loss", "mse", "--online", "--out", work / "comp_online",
             "--no-progress")
    assert "trained on 72 fresh simulations" in res.stdout
    from compressors import load_compressor

    comp = load_compressor(work / "comp_online")
    assert comp.config.online and comp.online_simulations == 72
    assert comp.n_simulations == 36 + 72
    assert comp.history["simulations"] == [24, 48, 72]
    # the draws are new simulations: the first batch's θ (the compressor's online stream) are
    # none of the training set's (θ is continuous: a shared stream would repeat rows exactly)
    from compressors.train import _ONLINE_TAG
    from experiments.pipeline import online_simulator

    cfg = load_config(work / "tiny.toml")
    simulate = jax.vmap(online_simulator(cfg, cfg.prior(), 12), in_axes=(None, 0))
    key = jax.random.fold_in(jax.random.key(cfg.compressor.seed), _ONLINE_TAG)
    theta, kappa = simulate(jax.random.fold_in(key, 0), np.arange(12, dtype=np.uint32))
    assert kappa.shape == (12, 2, 16, 16) and np.all(np.isfinite(kappa))
    train_theta = read_sims(work / "sims.h5").theta
    assert not np.any(np.all(np.isclose(np.asarray(theta)[:, None], train_theta[None]), -1))


def test_vmim_flow_as_the_posterior(work):
    """npe.vmim_flow: the VMIM compressor's own flow is the posterior (nothing fitted). Its
    draws must follow the flow's density restricted to the prior (checked against that density
    on a grid), stay inside the prior, survive saving, and go through calibration."""
    cfg_path = work / "tiny_flow.toml"
    cfg_path.write_text(TINY.replace("[npe]", "[npe]\nvmim_flow = true"))
    ok("train-compressor", "--config", cfg_path, "--sims", work / "sims.h5", "--loss", "vmim",
       "--out", work / "comp_vmim", "--no-progress")
    ok("fit-posterior", "--config", cfg_path, "--sims", work / "sims.h5", "--compressor",
       work / "comp_vmim", "--out", work / "post_flow", "--no-progress")
    assert (work / "post_flow" / "calibration" / "calibration.json").is_file()
    ok("sample", "--posterior", work / "post_flow", "--maps", work / "obs.h5", "--n", 4000,
       "--out", work / "s_flow.h5")
    s = read_samples(work / "s_flow.h5")
    assert s.method == "npe_vmim" and s.samples.shape == (4000, 2)
    cfg = load_config(cfg_path)
    prior = cfg.prior()
    assert np.all(np.isfinite(np.asarray(prior.log_prob(s.samples))))
    # the flow's density on a grid over the prior's box of sampled values, truncated to it
    from compressors import load_compressor
    from experiments.io import read_maps

    comp = load_compressor(work / "comp_vmim")
    t = comp.compress(read_maps(work / "obs.h5").kappa_noisy[None].astype(np.float32))
    lo, hi = s.samples.min(0), s.samples.max(0)
    axes = [np.linspace(lo[i], hi[i], 161) for i in range(2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    logq = comp.flow_log_prob(grid, np.repeat(t, len(grid), 0)).astype(np.float64)
    logq[~np.isfinite(np.asarray(prior.log_prob(grid)))] = -np.inf
    w = np.exp(logq - logq.max())
    w /= w.sum()
    mean = w @ grid
    std = np.sqrt(w @ (grid - mean) ** 2)
    # 4000 draws: the sample mean is within 4 standard errors (4 std / sqrt(4000) = 0.063 std) and
    # the std within 10 % (4 × its standard error 1/sqrt(2 × 4000) = 1.1 %, plus the 161² grid)
    assert np.all(np.abs(s.samples.mean(0) - mean) <= 4 * std / np.sqrt(4000))
    np.testing.assert_allclose(s.samples.std(0), std, rtol=0.1)
    # log_prob takes the summary as sbi's posteriors do (a torch tensor) or as numpy, and is the
    # flow's density in θ units (the flow works in standardised θ: minus Σ ln θ_std).
    import torch

    from estimators.npe import CompressorFlowPosterior

    post = CompressorFlowPosterior(work / "comp_vmim", prior.torch())
    pts = s.samples[:5].astype(np.float32)
    want = (comp.flow_log_prob(pts, np.repeat(t, 5, 0)) - np.sum(np.log(comp.theta_std)))
    for x in (t, torch.from_numpy(t)):
        np.testing.assert_allclose(post.log_prob(torch.from_numpy(pts), x=x).numpy(), want,
                                   rtol=1e-5, atol=1e-5)


def test_npe_on_cl(work):
    ok("fit-posterior", "--config", work / "tiny.toml", "--sims", work / "sims.h5", "--summary",
       "cl", "--out", work / "post_cl", "--no-progress", "--no-calibrate")
    ok("sample", "--posterior", work / "post_cl", "--maps", work / "obs.h5", "--n", 100,
       "--out", work / "s_cl.h5")
    s = read_samples(work / "s_cl.h5")
    assert s.method == "npe_cl" and s.samples.shape == (100, 2)


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], result.output
    return lines[0]


def test_errors(work, tmp_path):
    cfg = work / "tiny.toml"
    # a training set of other maps than the configuration's
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace("npix = 16", "npix = 32"))
    msg = one_line_error(invoke("train-compressor", "--config", other, "--sims", work / "sims.h5",
                                "--out", tmp_path / "c"))
    assert "maps of shape (2, 16, 16)" in msg and "(2, 32, 32)" in msg
    # NPE without a summary, a posterior dir that is not one, an unknown loss
    msg = one_line_error(invoke("fit-posterior", "--config", cfg, "--sims", work / "sims.h5",
                                "--out", tmp_path / "p"))
    assert "choose the summary" in msg
    msg = one_line_error(invoke("sample", "--posterior", tmp_path, "--maps", work / "obs.h5",
                                "--out", tmp_path / "s.h5"))
    assert "not a posterior directory" in msg
    msg = one_line_error(invoke("train-compressor", "--config", cfg, "--sims", work / "sims.h5",
                                "--loss", "huber", "--out", tmp_path / "c"))
    assert "--loss must be mse, mae, gnll or vmim" in msg
    # a sims file that does not exist / that is a map file
    msg = one_line_error(invoke("fit-posterior", "--config", cfg, "--sims", tmp_path / "none.h5",
                                "--summary", "cl", "--out", tmp_path / "p"))
    assert "none.h5" in msg
    msg = one_line_error(invoke("fit-posterior", "--config", cfg, "--sims", work / "obs.h5",
                                "--summary", "cl", "--out", tmp_path / "p"))
    assert "obs.h5" in msg


def test_cl_baseline(work):
    ok("cl-baseline", "--config", work / "tiny.toml", "--maps", work / "obs.h5",
       "--out", work / "s_cla.h5", "--no-progress")
    s = read_samples(work / "s_cla.h5")
    assert s.method == "cl_analytic" and s.samples.shape == (40, 2)
    # Hartlap et al. (2007): (n_cov - n_data - 2) / (n_cov - 1), 3 pairs x 3 ℓ bins = 9 data
    assert s.info["n_cov"] == 40 and s.info["hartlap"] == pytest.approx((40 - 9 - 2) / 39, rel=1e-12)
    # the data vector is the binned C_ℓ of the observed noisy maps (flatsky's estimator, float64:
    # equal to round-off)
    from experiments.io import read_maps
    from experiments.pipeline import cl_data_path
    from simulators import flatsky

    saved = np.load(cl_data_path(work / "s_cla.h5"))
    cfg = load_config(work / "tiny.toml")
    cl, _, _ = flatsky.cl_estimate(read_maps(work / "obs.h5").kappa_noisy, cfg.maps.field_deg,
                                   saved["ell_edges"])
    assert saved["data"].shape == (3, 3)
    np.testing.assert_allclose(saved["data"], np.asarray(cl), rtol=1e-10)
    # the covariance simulations are cached next to the output and reused
    assert (work / "s_cla.h5.cov.npz").is_file()
    # an observation whose seed is one of the covariance seeds is refused
    bad = work / "bad.toml"
    bad.write_text(TINY.replace("seed = 0", "seed = 10005", 1))
    ok("maps", "--config", bad, "--out", work / "obs_bad.h5", "--no-progress")
    msg = one_line_error(invoke("cl-baseline", "--config", work / "tiny.toml", "--maps",
                                work / "obs_bad.h5", "--out", work / "x.h5"))
    assert "seed 10005 is one of the covariance simulations' seeds" in msg


def test_chain_processes_get_their_own_cores():
    """On CPU, ``hmc.processes`` children are dealt this process's cores (one share each) and pin
    themselves to them, so that their thread pools do not oversubscribe the machine; no pinning
    with fewer cores than children."""
    import os

    from experiments.pipeline import _cores_per_process

    mine = sorted(os.sched_getaffinity(0))
    shares = _cores_per_process(len(mine))
    assert shares == [[c] for c in mine]
    assert sorted(c for share in _cores_per_process(1) for c in share) == mine
    assert _cores_per_process(len(mine) + 1) is None
    # a child started with its share pins itself first thing (before JAX sizes its thread pool)
    import subprocess
    import sys

    from experiments.pipeline import CHILD_CORES_ENV, PARENT_PID_ENV

    env = dict(os.environ, **{PARENT_PID_ENV: str(os.getpid()), CHILD_CORES_ENV: str(mine[-1])})
    code = ("import os; from experiments.pipeline import start_child_process; "
            "start_child_process(); print(sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == [f"[{mine[-1]}]"]


def test_cl_baseline_calibration(work):
    """``calibrate_cl_baseline`` on the tiny problem's 12 held-out simulations: the noise of
    ``fit-posterior``'s calibration, one grid posterior per simulation, SBC/TARP files written,
    the likelihood recorded. Plumbing only: 12 simulations cannot judge calibration (that is
    test_cl_baseline's grid test)."""
    from experiments.pipeline import calibrate_cl_baseline

    cfg = load_config(work / "tiny.toml").with_(**{"cl_baseline.covariance": "gaussian",
                                                  "cl_baseline.likelihood": "wishart"})
    cal = calibrate_cl_baseline(cfg, work / "sims.h5", work / "clcal")  # n_grid from the Fisher
    assert cal["n_test"] == 12 and cal["n_posterior_samples"] == 20
    assert cal["likelihood"] == {"kind": "wishart", "n_cov": None, "n_data": 9,
                                 "covariance": "gaussian"}
    assert cal["grid"]["min_cells_per_std"] >= 3
    assert np.asarray(cal["sbc"]["ranks"]).shape == (12, 2)
    for name in ("calibration.json", "sbc_ranks.png", "tarp.png"):
        assert (work / "clcal" / name).is_file()
