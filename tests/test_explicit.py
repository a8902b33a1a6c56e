"""explicit/: the field-level model, segmented resumable NUTS / MCLMC, checkpoints and diagnostics.

Posterior accuracy is checked against exact posteriors (a linear-Gaussian toy with a closed form;
the Gaussian-field lensing problem via ``explicit.exact``), with tolerances set by each run's own
Monte Carlo error (ESS). Problems are tiny so that the whole file runs in about a minute on 2 CPUs.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size

from explicit import CheckpointError, HMCSettings, field_model, log_density, read_chains, run_hmc
from explicit import checkpoint as ckpt
from simulators import Cosmology
from simulators.lensing import GaussianLensing, simulate_maps
from simulators.lightcone import FlatSky
from simulators.sources import RedshiftBins

from tests.procs import HANG, xla_flags

HERE = Path(__file__).parent

# ------------------------------------------------------------------------------------------------
# A linear-Gaussian toy with the structure of the field problem: θ ~ N(0, 1), a 12-pixel field
# z ~ N(0, I), data d = θ + S z + noise. The posterior over x = (θ, z) is Gaussian in closed form.

TOY_N, TOY_S, TOY_SIG = 12, 0.5, 0.3
TOY_DATA = np.random.default_rng(0).normal(0.4, 0.6, size=TOY_N)


def toy_model():
    t = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand((TOY_N,)).to_event(1))
    numpyro.sample("obs", dist.Normal(t + TOY_S * z, TOY_SIG).to_event(1), obs=TOY_DATA)


def toy_posterior():
    """(mean (1 + N,), cov) of (θ, z) | d: prior N(0, I), d = H x + e, e ~ N(0, σ² I)."""
    h = np.hstack([np.ones((TOY_N, 1)), TOY_S * np.eye(TOY_N)])
    cov = np.linalg.inv(np.eye(TOY_N + 1) + h.T @ h / TOY_SIG**2)
    return cov @ h.T @ TOY_DATA / TOY_SIG**2, cov


def run_toy(out, settings, progress=False, **kw):
    return run_hmc(toy_model, settings, out, theta_names=("theta",), progress=progress, **kw)


# NUTS: 2 chains, warm-up (40) ending inside the third segment, a short masked last segment.
NUTS_SMALL = HMCSettings(sampler="nuts", num_warmup=40, num_samples=40, num_chains=2,
                         max_tree_depth=5, segment=15, thin_field=6, seed=3)
MCLMC_TOY = HMCSettings(sampler="mclmc", num_warmup=200, num_samples=6000, num_chains=2,
                        segment=3000, thin_field=500, seed=1)


@pytest.fixture(scope="module")
def nuts_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("nuts_ref")
    return run_toy(out, NUTS_SMALL), out


@pytest.fixture(scope="module")
def mclmc_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("mclmc_ref")
    return run_toy(out, MCLMC_TOY), out


class Killed(Exception):
    pass


def interrupt(monkeypatch, at_call: int, before: bool):
    """Make the ``at_call``-th chain commit raise (before or after writing the file): the run dies
    at a segment boundary, with the segment's field files already written when ``before``."""
    real = ckpt.save_chain
    calls = {"n": 0}

    def save(*args, **kw):
        calls["n"] += 1
        if calls["n"] == at_call and before:
            raise Killed
        real(*args, **kw)
        if calls["n"] == at_call:
            raise Killed

    monkeypatch.setattr(ckpt, "save_chain", save)


def assert_same_run(a_dir, b_dir, settings):
    """Every record and every kept field of two runs are bitwise equal."""
    for c in range(settings.num_chains):
        a, b = ckpt.load_chain(a_dir, c), ckpt.load_chain(b_dir, c)
        assert a.complete and b.complete and a.n_rows == b.n_rows == settings.n_iterations
        for name in ckpt.RECORDS:
            np.testing.assert_array_equal(a.records[name], b.records[name], err_msg=name)
        for s in range(settings.thin_field - 1, settings.num_samples, settings.thin_field):
            np.testing.assert_array_equal(ckpt.load_field(a_dir, c, s), ckpt.load_field(b_dir, c, s))


# ------------------------------------------------------------------------------------------------
# Resume after a kill


def test_nuts_resume_is_bitwise_identical(nuts_ref, tmp_path, monkeypatch):
    """Killed mid warm-up (after a commit), killed again between a segment's field files and its
    commit, then in the second chain's first segment: the resumed run equals the uninterrupted one
    bit for bit (records, warm-up adaptation, thinned fields), with nothing lost or duplicated."""
    ref, ref_dir = nuts_ref
    out = tmp_path / "run"
    plan = [(3, False),  # chain 0: start, 0-15, 15-30 committed; warm-up (40) half done
            (4, True),   # 30-45, 45-60, 60-75 committed; 75-80 computed, fields written, not committed
            (3, False)]  # chain 0 finishes (75-80 redone), chain 1 starts, 0-15 committed
    for at_call, before in plan:
        interrupt(monkeypatch, at_call, before)
        with pytest.raises(Killed):
            run_toy(out, NUTS_SMALL)
        monkeypatch.undo()
    assert ckpt.load_chain(out, 1).n_rows == 15
    res = run_toy(out, NUTS_SMALL)
    assert_same_run(ref_dir, out, NUTS_SMALL)
    np.testing.assert_array_equal(res.theta, ref.theta)
    assert res.theta.shape == (2, 40, 1)
    assert res.grad_evals == ref.grad_evals


def test_mclmc_resume_is_bitwise_identical(mclmc_ref, tmp_path, monkeypatch):
    """MCLMC: killed after tuning and one sampling segment; the resumed run equals the
    uninterrupted one bit for bit (the tuned L, step size and preconditioner are in the state)."""
    _, ref_dir = mclmc_ref
    out = tmp_path / "run"
    interrupt(monkeypatch, 2, False)
    with pytest.raises(Killed):
        run_toy(out, MCLMC_TOY)
    monkeypatch.undo()
    assert ckpt.load_chain(out, 0).n_rows == MCLMC_TOY.segment
    run_toy(out, MCLMC_TOY)
    assert_same_run(ref_dir, out, MCLMC_TOY)


def test_extending_a_finished_run_equals_one_longer_run(nuts_ref, tmp_path, monkeypatch):
    """A finished 25-sample run resumed with num_samples = 40 (the extension killed once on the
    way) ends bitwise equal to the uninterrupted 40-sample run, although its segments fall on
    other iterations; fewer samples than were drawn is refused by name."""
    _, ref_dir = nuts_ref
    out = tmp_path / "run"
    short = dataclasses.replace(NUTS_SMALL, num_samples=25)
    first = run_toy(out, short)
    assert first.theta.shape == (2, 25, 1)
    interrupt(monkeypatch, 1, False)  # chain 0 extended by one segment, then killed
    with pytest.raises(Killed):
        run_toy(out, NUTS_SMALL)
    monkeypatch.undo()
    assert ckpt.load_chain(out, 0).n_rows == 40 + 25 + NUTS_SMALL.segment
    res = run_toy(out, NUTS_SMALL)
    assert_same_run(ref_dir, out, NUTS_SMALL)
    np.testing.assert_array_equal(res.theta[:, :25], first.theta)
    assert read_chains(out).diagnostics == res.diagnostics
    with pytest.raises(CheckpointError, match=r"num_samples: 40 → 25"):
        run_toy(out, short)


def test_chains_run_separately_equal_the_sequential_run(nuts_ref, tmp_path):
    """chains=[...]: each chain run on its own (as separate processes sharing the directory would)
    gives the chain of the sequential run bit for bit; the result comes once all are done."""
    ref, ref_dir = nuts_ref
    assert run_toy(tmp_path, NUTS_SMALL, chains=[1]) is None  # chain 0 not run yet
    assert ckpt.load_chain(tmp_path, 0) is None and ckpt.load_chain(tmp_path, 1).complete
    res = run_toy(tmp_path, NUTS_SMALL, chains=[0])
    assert_same_run(ref_dir, tmp_path, NUTS_SMALL)
    np.testing.assert_array_equal(res.theta, ref.theta)
    with pytest.raises(ValueError, match=r"chain indices in \[0, 2\), got \[2\]"):
        run_toy(tmp_path, NUTS_SMALL, chains=[2])
    with pytest.raises(ValueError, match="delete the other chains' progress"):
        run_toy(tmp_path, NUTS_SMALL, chains=[0], resume=False)


def test_progress_off_a_terminal_is_a_line_per_segment(nuts_ref, tmp_path, capsys):
    """Logged runs (stderr not a terminal, as under pytest) get one line per segment with the
    phase, step size, iterations done and time left, not a redrawn bar; the draws are unchanged."""
    ref, _ = nuts_ref
    run_hmc(toy_model, NUTS_SMALL, tmp_path, theta_names=("theta",), progress=True, chains=[1])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("hmc chain 1")]
    # 80 iterations in segments of 15: rows 15, 30, ..., 75, then 80 (the masked last segment)
    assert [int(ln.split(": ")[1].split("/")[0]) for ln in lines] == [15, 30, 45, 60, 75, 80]
    assert "warmup" in lines[1] and "sampling" in lines[-1] and "/80 iterations" in lines[-1]
    assert "s/iteration" in lines[0] and lines[-1].endswith("about 0.0 min left in this chain")
    assert "\r" not in err and "it/s" not in err  # no tqdm bar in the log
    chain = ckpt.load_chain(tmp_path, 1)
    np.testing.assert_array_equal(chain.records["theta"][40:], ref.theta[1])


def test_finished_run_is_read_back(nuts_ref):
    ref, out = nuts_ref
    again = read_chains(out)
    np.testing.assert_array_equal(again.theta, ref.theta)
    assert again.names == ("theta",) and again.diagnostics == ref.diagnostics
    assert list(again.field_samples) == [5, 11, 17, 23, 29, 35]
    fields = again.fields(1)
    assert fields.shape == (6, TOY_N) and np.all(np.isfinite(fields))
    # a rerun of a finished run loads it without sampling again
    rerun = run_toy(out, NUTS_SMALL)
    np.testing.assert_array_equal(rerun.theta, ref.theta)


def test_diagnostics_file(nuts_ref):
    ref, out = nuts_ref
    d = ckpt.read_json(out / "diagnostics.json")
    assert d == ref.diagnostics
    g = d["gradient_evaluations"]
    # NUTS: at least one gradient per iteration; warm-up counted apart (plus one per chain start)
    assert g["warmup"] >= 2 * (40 + 1) and g["sampling"] >= 2 * 40
    assert g["total"] == g["warmup"] + g["sampling"] == ref.grad_evals["total"]
    p = d["parameters"]["theta"]
    assert p["ess"] > 0 and p["r_hat"] is not None
    assert d["grads_per_ess"] == pytest.approx(g["sampling"] / p["ess"])
    assert len(d["step_size"]) == 2 and all(s > 0 for s in d["step_size"])
    assert d["wall_time_s"] > 0
    # the counts are the sums of the per-iteration flags in the chain files; on this Gaussian
    # target with an adapted step size a divergence after warm-up would be a broken integrator or
    # adaptation, so the sampling count is 0 (warm-up may diverge while the step size is found)
    div = np.stack([ckpt.load_chain(out, c).records["diverging"] for c in range(2)])
    warm = NUTS_SMALL.num_warmup
    assert d["divergences"]["warmup"] == int(div[:, :warm].sum())
    assert d["divergences"]["per_chain"] == [int(v) for v in div[:, warm:].sum(1)]
    assert d["divergences"]["sampling"] == int(div[:, warm:].sum()) == 0


# ------------------------------------------------------------------------------------------------
# Posterior accuracy


def mc_tolerances(x, k=4.5):
    """(tolerance on the mean, relative tolerance on the std) of draws x (chains, draws): k times
    the Monte Carlo standard error, from the ESS of x (mean) and of (x - mean)² (variance; the
    std's relative error is half the variance's)."""
    ess_mean = float(effective_sample_size(x))
    sq = (x - x.mean()) ** 2
    ess_var = float(effective_sample_size(sq))
    rel_var = np.std(sq) / (np.mean(sq) * np.sqrt(ess_var))
    return k * x.std() / np.sqrt(ess_mean), k * rel_var / 2, ess_mean


def assert_toy_posterior(res, std_slack=0.0, fields=False):
    """θ's mean and std within 4.5 Monte Carlo standard errors of the toy's closed form (+
    ``std_slack`` relative on the std: an unadjusted sampler's step-size bias), and with
    ``fields`` the kept fields' mean within 4.5 σ/√n (+ 0.05) of the posterior mean."""
    mean, cov = toy_posterior()
    x = res.theta[..., 0]
    tol_mean, tol_std, ess = mc_tolerances(x)
    assert ess > 300  # else the test has no power
    assert abs(x.mean() - mean[0]) < tol_mean
    assert abs(x.std() / np.sqrt(cov[0, 0]) - 1) < tol_std + std_slack
    if fields:
        kept = np.concatenate([res.fields(c) for c in range(res.theta.shape[0])])
        z_sd = np.sqrt(np.diag(cov)[1:])
        assert np.all(np.abs(kept.mean(0) - mean[1:]) < 4.5 * z_sd / np.sqrt(len(kept)) + 0.05)


def test_mclmc_recovers_gaussian_posterior(mclmc_ref):
    """MCLMC on the linear-Gaussian toy: θ mean and std, and the field's posterior mean, within
    4.5 Monte Carlo standard errors of the closed form (plus 2 % on the std for the unadjusted
    sampler's step-size bias: energy-error variance tuned to 5e-4 per dimension)."""
    res, out = mclmc_ref
    assert_toy_posterior(res, std_slack=0.02, fields=True)  # fields: every 500th sample, 24 in all
    d = res.diagnostics
    assert d["gradient_evaluations"]["sampling"] == 2 * 6000  # one gradient per step
    assert all(t["L"] > 0 and t["step_size"] > 0 for t in d["tuned"])


def test_mclmc_mclachlan_recovers_gaussian_posterior_with_longer_steps(mclmc_ref, tmp_path):
    """hmc.integrator = "mclachlan": the same toy posterior within 4.5 Monte Carlo standard errors
    (+ 2 % on the std, as above), two gradients counted per step (warm-up: init, the θ Hessian's
    2 per site, then 2 per tuning step), and a tuned step longer than velocity Verlet's at the same
    energy variance: the minimal-norm scheme's energy error is much smaller at equal step (1.9x
    longer on average over the chains here, measured). A kernel left at velocity Verlet
    tunes to the reference's steps and fails the last check; a miscounted step fails the counts."""
    ref, _ = mclmc_ref
    settings = dataclasses.replace(MCLMC_TOY, integrator="mclachlan", num_samples=3000)
    res = run_toy(tmp_path, settings)
    assert_toy_posterior(res, std_slack=0.02)
    grads = res.diagnostics["gradient_evaluations"]
    assert grads["per_chain_sampling"] == [2 * 3000] * 2
    assert grads["per_chain_warmup"] == [1 + 2 + 2 * settings.num_warmup] * 2
    step = lambda r: np.mean([t["step_size"] for t in r.diagnostics["tuned"]])  # noqa: E731
    assert step(res) > 1.4 * step(ref)


@pytest.mark.slow
def test_nuts_matches_exact_gaussian_field_posterior(tmp_path):
    """NUTS over (σ8, 64 latent pixels) of a 1-bin 8x8 GaussianLensing problem: the σ8 mean and std
    agree with the exact grid posterior (latent field marginalised analytically) within 4.5 Monte
    Carlo standard errors of this run's own draws."""
    from explicit.exact import grid_posterior

    z = np.linspace(0.0, 2.0, 101)
    # 3 galaxies/arcmin²: per-pixel S/N ~ 1, so σ8 is measured (σ ~ 0.12) while the σ8-amplitude
    # degeneracy of the field stays mild enough for NUTS to give ESS ~ 0.5 per draw
    bins = RedshiftBins.from_arrays(z, np.exp(-0.5 * ((z - 0.8) / 0.2) ** 2), 3.0, 0.26)
    gauss = GaussianLensing(FlatSky(5.0, 8), bins, n_chi=16)  # 16 Limber nodes: cheap gradients
    base = Cosmology.fiducial()
    maps = simulate_maps(gauss, base, 3)
    lo, hi = 0.4, 1.2
    model = field_model(gauss, {"sigma8": dist.Uniform(lo, hi)}, base, maps.kappa_noisy, maps.sigma_n)
    exact = grid_posterior(gauss, maps.kappa_noisy, maps.sigma_n, ("sigma8",), base=base,
                           log_prior=lambda t: jnp.where((t[0] > lo) & (t[0] < hi), 0.0, -jnp.inf))
    settings = HMCSettings(sampler="nuts", num_warmup=200, num_samples=600, num_chains=1,
                           segment=400, seed=0)
    res = run_hmc(model, settings, tmp_path, theta_names=model.theta_names, progress=False)
    x = res.theta[..., 0]
    tol_mean, tol_std, ess = mc_tolerances(x)
    assert ess > 150  # else the test has no power
    assert abs(x.mean() - exact.mean[0]) < tol_mean
    assert abs(x.std() / exact.std[0] - 1) < tol_std
    assert res.diagnostics["divergences"]["sampling"] == 0


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def tiny_gauss():
    z = np.linspace(0.0, 2.0, 51)
    bins = RedshiftBins.from_arrays(z, np.exp(-0.5 * ((z - 0.8) / 0.2) ** 2), 10.0, 0.26)
    return GaussianLensing(FlatSky(5.0, 4), bins, n_chi=16)


PRIOR = {"sigma8": dist.Uniform(0.4, 1.2)}


@pytest.mark.parametrize("data_shape", [(1, 4, 5), (4, 4), (2, 4, 4)])
def test_wrong_data_shape(tiny_gauss, data_shape):
    with pytest.raises(ValueError, match=r"data has shape \S.*but the map model gives") as err:
        field_model(tiny_gauss, PRIOR, Cosmology.fiducial(), np.zeros(data_shape), [0.01])
    assert str(data_shape) in str(err.value) and "(1, 4, 4)" in str(err.value)


def test_nan_data(tiny_gauss):
    data = np.zeros((1, 4, 4))
    data[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="data contains 1 NaN"):
        field_model(tiny_gauss, PRIOR, Cosmology.fiducial(), data, [0.01])


@pytest.mark.parametrize("kw, match", [
    (dict(sigma_n=[0.01, 0.01]), r"sigma_n must have shape \(n_bins,\) = \(1,\)"),
    (dict(sigma_n=[0.0]), "sigma_n must be finite and > 0"),
    (dict(prior_dists={"Omega_x": dist.Uniform(0.1, 0.5)}), "'Omega_x' is not a Cosmology parameter"),
    (dict(prior_dists={"sigma8": 0.8}), r"prior_dists\['sigma8'\] must be a numpyro distribution"),
    (dict(prior_dists={}), "prior_dists is empty"),
    (dict(mask=np.zeros((4, 4), bool)), "mask selects no pixel"),
    (dict(mask=np.ones((3, 3), bool)), "mask must have shape"),
])
def test_bad_model_arguments(tiny_gauss, kw, match):
    args = dict(prior_dists=PRIOR, sigma_n=[0.01])
    args.update(kw)
    mask = args.pop("mask", None)
    with pytest.raises(ValueError, match=match):
        field_model(tiny_gauss, args["prior_dists"], Cosmology.fiducial(), np.zeros((1, 4, 4)),
                    args["sigma_n"], mask=mask)


@pytest.mark.parametrize("kw, name", [
    (dict(sampler="hmc"), "sampler"), (dict(num_warmup=-1), "num_warmup"),
    (dict(num_samples=0), "num_samples"), (dict(num_chains=0), "num_chains"),
    (dict(max_tree_depth=0), "max_tree_depth"), (dict(max_tree_depth=16), "max_tree_depth"),
    (dict(target_accept=1.0), "target_accept"), (dict(dense_theta="yes"), "dense_theta"),
    (dict(segment=0), "segment"), (dict(thin_field=-1), "thin_field"), (dict(seed=1.5), "seed"),
    (dict(num_chains=True), "num_chains"), (dict(sampler="mclmc", num_warmup=5), "num_warmup"),
])
def test_invalid_settings(kw, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        HMCSettings(**kw)


def test_settings_mismatch_is_named(nuts_ref, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(nuts_ref[1], out)
    changed = HMCSettings(**{**NUTS_SMALL.to_dict(), "num_samples": 50, "segment": 20})
    msg = r"other settings \(num_samples: 40 → 50; segment: 15 → 20\)"
    with pytest.raises(CheckpointError, match=msg):
        run_toy(out, changed)
    with pytest.raises(CheckpointError, match=r"different init"):
        run_toy(out, NUTS_SMALL, init={"theta": 0.3})


def test_provenance_must_match_to_resume(nuts_ref, tmp_path):
    """A run tagged with the digest of its data refuses to continue on other data, by name; a
    directory written before provenance existed (the reference run) is still read back."""
    ref, ref_dir = nuts_ref
    out = tmp_path / "run"
    tag = {"observation_sha256": "aaa"}
    assert run_toy(out, NUTS_SMALL, chains=[1], provenance=tag) is None
    with pytest.raises(CheckpointError, match=r"another run \(different observation_sha256\)"):
        run_toy(out, NUTS_SMALL, chains=[0], provenance={"observation_sha256": "bbb"})
    assert ckpt.load_chain(out, 0) is None  # refused before sampling anything
    legacy = tmp_path / "legacy"
    shutil.copytree(ref_dir, legacy)
    np.testing.assert_array_equal(run_toy(legacy, NUTS_SMALL, provenance=tag).theta, ref.theta)


@pytest.mark.parametrize("how", ["truncate", "garbage", "run_json"])
def test_corrupted_checkpoint(nuts_ref, tmp_path, how):
    out = tmp_path / "run"
    shutil.copytree(nuts_ref[1], out)
    path = out / ("run.json" if how == "run_json" else "chain_1.h5")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncate" else b"\x00garbage" * 50)
    for call in (lambda: run_toy(out, NUTS_SMALL), lambda: read_chains(out)):
        with pytest.raises(CheckpointError) as err:
            call()
        assert str(path) in str(err.value) and "delete it" in str(err.value)
    # resume=False starts over and gives the reference run again
    res = run_toy(out, NUTS_SMALL, resume=False)
    np.testing.assert_array_equal(res.theta, nuts_ref[0].theta)


def test_pieces_of_a_split_array_join_back(tmp_path, monkeypatch):
    """What each process keeps of a field split over processes (``LocalShards``, written by
    ``save_field``) joins back into the array, and a device array is rebuilt from the pieces that
    cover its blocks; a missing piece is named, not read as zeros. (The pieces are made by hand:
    one process holds all blocks here; the two-process test makes them for real.)"""
    x = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    cut = [((np.array([0, 0, 0]), np.array([4, 2, 2])), x[:, :2]),
           ((np.array([0, 2, 0]), np.array([4, 6, 2])), x[:, 2:])]
    halves = [ckpt.LocalShards(x.shape, x.dtype, (piece,)) for piece in cut]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for p, part in enumerate(halves):  # as processes 0 and 1 write sample 3 of chain 0
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        ckpt.save_field(tmp_path, 0, 3, part)
    monkeypatch.undo()
    np.testing.assert_array_equal(ckpt.load_field(tmp_path, 0, 3), x)
    both = ckpt.LocalShards(x.shape, x.dtype, tuple(cut))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    np.testing.assert_array_equal(np.asarray(both.assemble(one_device)), x)
    np.testing.assert_array_equal(np.asarray(both[1].assemble(one_device)), x[1])
    with pytest.raises(CheckpointError, match="do not cover"):
        halves[0].assemble(one_device)
    ckpt.field_path(tmp_path, 0, 3).with_suffix(".p1.h5").unlink()  # process 1's piece is lost
    with pytest.raises(CheckpointError, match="1 of the 2 processes"):
        ckpt.load_field(tmp_path, 0, 3)


def test_log_density_matches_numpyro_and_start(tmp_path):
    """The plain-JAX log-density is numpyro's (negated potential, Jacobian included) and the start
    position is θ at the prior mean with a small random field."""
    from numpyro.infer.util import log_density as np_log_density

    ld = log_density(toy_model, ("theta",))
    assert ld.init_theta == {"theta": 0.0}
    pos = ld.init_position(jax.random.PRNGKey(0))
    assert pos["z"].shape == (TOY_N,) and 0 < float(jnp.std(pos["z"])) < 0.3
    logp, grad = ld.value_and_grad(pos)
    ref, _ = np_log_density(toy_model, (), {}, {"theta": pos["theta"], "z": pos["z"]})
    np.testing.assert_allclose(float(logp), float(ref), rtol=1e-12)
    assert set(grad) == {"theta", "z"}
    with pytest.raises(ValueError, match="no latent sample site 'omega'"):
        log_density(toy_model, ("omega",))
    with pytest.raises(ValueError, match=r"init has unknown site\(s\) \['omega'\]"):
        run_toy(tmp_path, NUTS_SMALL, init={"omega": 0.1})
    with pytest.raises(ValueError, match="lies outside the prior's support"):
        log_density(toy_model, ("theta",), init={"theta": float("inf")})
    # a given start field: float64 whatever its input type; the wrong shape named
    start = ld.init_position(jax.random.PRNGKey(0), [0.5] * TOY_N)["z"]
    assert start.dtype == jnp.float64 and np.all(np.asarray(start) == 0.5)
    with pytest.raises(ValueError, match=rf"'z' field must have shape \({TOY_N},\), got \(3,\)"):
        ld.init_position(jax.random.PRNGKey(0), np.zeros(3, np.float32))


# ------------------------------------------------------------------------------------------------
# Sharded log-density


@pytest.fixture(scope="module", autouse=True)
def sharded_worker(request, tmp_path_factory):
    """Start the 2-device worker (PM gradient compilations on one and two devices, plus MCLMC's
    when its slow test is selected, ~2 min more) as soon as this module runs, so that it compiles
    while the other tests run; ``sharded`` waits for it."""
    names = {item.name for item in request.session.items}
    mclmc = "test_sharded_mclmc_follows_the_single_device_chain" in names
    if not mclmc and not names & {"test_sharded_log_density_equals_single_device",
                                  "test_start_fields_are_laid_out_like_the_field"}:
        yield None
        return
    out = tmp_path_factory.mktemp("sharded") / "results.npz"
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PYTHONPATH": str(HERE.parent)}
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, str(HERE / "explicit_sharded_worker.py"), str(out)]
                            + (["mclmc"] if mclmc else []),
                            cwd=HERE.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module", autouse=True)
def multiprocess_workers(request, tmp_path_factory):
    """Start the two jax.distributed processes of explicit_multiprocess_worker.py (each compiles
    the tiny PM model's NUTS once) with the module, like ``sharded_worker``."""
    if not any(item.name == "test_multiprocess_nuts_resumes_after_a_kill"
               for item in request.session.items):
        yield None
        return
    from tests.procs import free_port

    work = tmp_path_factory.mktemp("multiprocess")
    out, port = work / "results.npz", free_port()
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PYTHONPATH": str(HERE.parent)}
    logs = [open(work / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "explicit_multiprocess_worker.py"), str(i),
                               str(port), str(work), str(out)], cwd=HERE.parent, env=env,
                              stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    yield procs, work, out
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for log in logs:
        log.close()


@pytest.fixture(scope="module")
def sharded(sharded_worker):
    proc, out = sharded_worker
    proc.wait(timeout=HANG)
    log = out.with_suffix(".log").read_text()
    assert proc.returncode == 0, f"sharded worker failed:\n{log[-4000:]}"
    return dict(np.load(out))


def test_sharded_log_density_equals_single_device(sharded):
    """A 16³ PM lightcone model (float32 fields, adjoint gradients) on a 2x1 device grid gives the
    single-device log-density and gradients (θ and z), and the field gradient stays sharded.

    Tolerances: the two paths differ only in float32 summation order (pencil FFTs, halo sums):
    ~6e-8 relative per operation, ~1e-6 after the FFTs, 2 PM steps and the lightcone paint (2e-7
    of the gradients' scale measured on CPU). Gradients must agree to 1e-4 of their scale, ln p
    (|ln p| ~ 4e3, from χ² over 512 pixels accumulated in float64) to 1e-3 absolute (1e-5
    measured): far above rounding, far below the O(1) errors of a wrong halo or transpose.
    """
    s, p = "single_", "sharded_"
    assert bool(sharded[p + "grad_field_sharded"])
    assert abs(float(sharded[s + "logp"] - sharded[p + "logp"])) < 1e-3
    for key in ("grad_theta", "grad_field"):
        ref, got = sharded[s + key], sharded[p + key]
        scale = np.max(np.abs(ref))
        assert scale > 0 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale, err_msg=key)


def test_start_fields_are_laid_out_like_the_field(sharded):
    """init_position places a given start field, and draws its default one, where the field lives
    (split over the 2x1 grid, each device drawing its block), and the default draw has the
    single-device values exactly (JAX's partitionable threefry: the same bits on any layout)."""
    for prefix in ("single_", "sharded_"):
        assert bool(sharded[prefix + "start_sharded"]), prefix
        assert bool(sharded[prefix + "default_start_sharded"]), prefix
    np.testing.assert_array_equal(sharded["sharded_default_start"], sharded["single_default_start"])
    assert np.std(sharded["single_default_start"]) > 0.05  # FIELD_INIT_SCALE × N(0, 1), not zeros


@pytest.mark.slow
def test_sharded_mclmc_follows_the_single_device_chain(sharded):
    """MCLMC (blackjax's tuning differentiates the lightcone inside its own trace, which a
    shard_map closing over θ-dependent tables broke) runs on the 2x1 grid, and its 20 tuning + 2
    kept steps, same key and start, track the single-device chain: θ moves by 0.1-0.25 from the
    start and the two chains end within 1.5e-3 (measured), the float32 round-off of the gradients
    (2e-7 relative, above) grown through 22 steps and the step-size tuning. 0.01 allows for that;
    a wrong halo or transpose gives O(1) gradient errors and chains that part by the excursion."""
    s, p = "single_", "sharded_"
    ref, got = sharded[s + "mclmc_theta"], sharded[p + "mclmc_theta"]
    assert ref.shape == got.shape == (1, 2, 2) and np.all(np.isfinite(got))
    assert np.max(np.abs(ref - [0.27, 0.85])) > 0.05  # the chain moved
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.01)


@pytest.mark.slow
def test_multiprocess_nuts_resumes_after_a_kill(multiprocess_workers):
    """The tiny PM model's field split over two jax.distributed processes (one device each): NUTS
    runs, checkpoints each process's own pieces of the field-shaped state and kept fields (no
    gather), and, killed after its second commit and resumed, gives the uninterrupted run bit for
    bit (a misplaced or stale piece of the state would change the resumed draws). That a
    two-process run equals the same run with the 2x1 grid in one process is
    test_cli_hmc.test_hmc_over_two_processes_equals_one_process (the same partitioned programs,
    through `lensbench hmc --distributed`; marked slow); a one-process reference here would
    compile this NUTS a third time (~40 s)."""
    procs, work, out = multiprocess_workers
    for i, proc in enumerate(procs):
        proc.wait(timeout=HANG)
        assert proc.returncode == 0, (work / f"p{i}.log").read_text()[-4000:]
    got = dict(np.load(out))
    for name in ckpt.RECORDS:
        np.testing.assert_array_equal(got[f"rec_resumed_{name}"], got[f"rec_{name}"], err_msg=name)
    np.testing.assert_array_equal(got["fields_resumed"], got["fields"])
    assert list(got["field_files"]) == ["c0_0000002.p0.h5", "c0_0000002.p1.h5",
                                        "c0_0000005.p0.h5", "c0_0000005.p1.h5"]
    assert got["theta"].shape == (1, 6, 2) and np.ptp(got["theta"][0, :, 0]) > 0.01  # it moved
    np.testing.assert_array_equal(got["theta_resumed"], got["theta"])


# ------------------------------------------------------------------------------------------------
# Starting points


def test_field_start_is_the_perturbed_posterior_mode(tiny_gauss):
    """For κ linear in z (Gaussian field) the start is z* = (I + AᵀN⁻¹A)⁻¹ (ε + AᵀN⁻¹(d + n')),
    with ε, n' the function's documented draws (ε from jax.random.key(seed), n' from numpy's
    default_rng(seed)): a
    draw from p(z | d, θ₀). Checked against that closed form (A from jax.jacfwd); Adam's residual
    jitter at lr 0.01 after 3000 steps is ~1e-3 of the unit field scale."""
    from explicit import field_start

    base = Cosmology.fiducial()
    maps = simulate_maps(tiny_gauss, base, 5)
    model = field_model(tiny_gauss, PRIOR, base, maps.kappa_noisy, maps.sigma_n)
    z_start = field_start(model, ("sigma8",), seed=7, steps=3000, learning_rate=0.01,
                          init={"sigma8": 0.8})
    cosmo = dataclasses.replace(base, sigma8=0.8)
    shape = tiny_gauss.latent_shape
    n = int(np.prod(shape))
    a = np.asarray(jax.jacfwd(lambda z: tiny_gauss.kappa(cosmo, z.reshape(shape)).ravel())(
        jnp.zeros(n))).reshape(-1, n)
    data = np.asarray(maps.kappa_noisy)
    sig = np.broadcast_to(np.asarray(maps.sigma_n)[:, None, None], data.shape).ravel()
    d_pert = data.ravel() + sig * np.random.default_rng(7).standard_normal(data.size)
    eps = np.asarray(jax.random.normal(jax.random.key(7), shape, jnp.float64)).ravel()
    m = np.asarray(model.mask).ravel()
    an = a[m] / sig[m, None] ** 2
    expected = np.linalg.solve(np.eye(n) + a[m].T @ an, eps + an.T @ d_pert[m])
    np.testing.assert_allclose(z_start.ravel(), expected, atol=5e-3)
    # and it is not the unperturbed mode (the perturbations matter): that differs by O(1)
    mode = np.linalg.solve(np.eye(n) + a[m].T @ an, an.T @ data.ravel()[m])
    assert np.max(np.abs(z_start.ravel() - mode)) > 0.3


def test_theta_inverse_mass_is_the_inverse_hessian():
    """On the linear-Gaussian toy, the θ block of the potential's Hessian at fixed z is exactly
    1 + N/σ² (prior + N pixels); the initial inverse mass is its inverse, and the floor at 1 keeps
    an unconstrained direction at the unit scale."""
    from explicit.kernels import theta_inverse_mass

    ld = log_density(toy_model, ("theta",))
    pos = ld.init_position(jax.random.PRNGKey(0))
    inv = np.asarray(theta_inverse_mass(ld, pos))
    np.testing.assert_allclose(inv, [[1.0 / (1.0 + TOY_N / TOY_SIG**2)]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(theta_inverse_mass(ld, pos, dense=False)),
                               [1.0 / (1.0 + TOY_N / TOY_SIG**2)], rtol=1e-6)

    def flat():  # θ has no data and a wide prior: Hessian 0.01 -> floored to 1
        numpyro.sample("theta", dist.Normal(0.0, 10.0))
        numpyro.sample("z", dist.Normal(0.0, 1.0).expand((3,)).to_event(1))

    ld = log_density(flat, ("theta",))
    np.testing.assert_allclose(np.asarray(theta_inverse_mass(ld, ld.init_position(
        jax.random.PRNGKey(0)))), [[1.0]])
