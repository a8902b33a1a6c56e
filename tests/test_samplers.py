"""MAMS and the Fourier field preconditioner (explicit/kernels.py MAMSStepper,
explicit/precondition.py): the preconditioner is an exact linear change of variables and its
estimate is exact on a model whose Hessian is diagonal in Fourier space; MAMS, with and without it,
reproduces the closed-form posterior of the linear-Gaussian toy and resumes bit for bit."""

from functools import partial

import numpy as np
import numpyro
import numpyro.distributions as dist
import jax
import jax.numpy as jnp
import pytest

from explicit import HMCSettings, log_density
from explicit import checkpoint as ckpt
from explicit.precondition import FourierScale, estimate_scale, shell_labels

from tests.test_explicit import (assert_same_run, assert_toy_posterior, interrupt, Killed, run_toy,
                                 toy_model)

SHAPE = (4, 4, 6)  # a small 3-D field: Fourier axes all three, the last one the line of sight
AXES = (0, 1, 2)


def _random_scale(shape, axes, seed=0):
    n = len(np.unique(shell_labels(shape, axes)))
    return FourierScale(np.random.default_rng(seed).uniform(0.2, 1.5, n), axes, shape)


def _dense(f, shape):
    """The matrix of a linear map of fields (columns: images of the unit fields)."""
    n = int(np.prod(shape))
    eye = np.eye(n).reshape((n,) + shape)
    return np.stack([np.asarray(f(jnp.asarray(e))).ravel() for e in eye], axis=1)


@pytest.mark.parametrize("shape,axes", [(SHAPE, AXES), ((2, 6, 6), (1, 2))])
def test_fourier_scale_is_a_symmetric_invertible_linear_map(shape, axes):
    """S is real symmetric (so rfftn · factor · irfftn loses nothing), from_model inverts it, and
    its eigenvalues are the shells' factors, each with its number of real modes: log|det S| is a
    constant, the change of variables exact. Tolerances: float64 FFT round-off."""
    s = _random_scale(shape, axes)
    S = _dense(s.to_model, shape)
    np.testing.assert_allclose(S, S.T, atol=1e-13)
    np.testing.assert_allclose(_dense(s.from_model, shape) @ S, np.eye(S.shape[0]), atol=1e-12)
    # its spectrum: the factor of every mode of the full FFT grid (S δ transforms to the factors)
    factors = np.fft.fftn(np.asarray(s.to_model(jnp.asarray(_delta(shape, axes)))), axes=axes)
    np.testing.assert_allclose(factors.imag, 0.0, atol=1e-13)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(S)), np.sort(factors.real.ravel()),
                               rtol=1e-10)
    assert set(np.round(factors.real.ravel(), 12)) == set(np.round(s.shells, 12))


def _delta(shape, axes):
    """A unit impulse at the origin of every Fourier block: its transform under S is the factor
    per full-grid mode."""
    d = np.zeros(shape)
    d[tuple(0 if a in axes else slice(None) for a in range(len(shape)))] = 1.0
    return d


# A linear-Gaussian model whose data term is diagonal in Fourier space: d = K * z + noise with a
# kernel constant on the preconditioner's shells, so the posterior precision of mode k is exactly
# 1 + K_k² / σ².
SIGMA = 0.3


def _kernel(shape):
    labels = shell_labels(shape, AXES)
    return 0.5 + 2.0 / (1.0 + labels.astype(float) / 7.0)


def _conv(z, kern):
    return jnp.fft.irfftn(jnp.fft.rfftn(z) * kern, s=z.shape)


def test_estimated_scale_is_the_posterior_width_per_mode():
    """On the Fourier-diagonal model, the Hessian probes recover s_k = (1 + K_k²/σ²)^{-1/2} on every
    shell to 1e-6 (the potential is quadratic, so central differences are exact up to round-off)."""
    kern = jnp.asarray(_kernel(SHAPE))
    data = np.asarray(_conv(jnp.asarray(np.random.default_rng(2).normal(size=SHAPE)), kern))

    def model():
        t = numpyro.sample("t", dist.Normal(0.0, 1.0))
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand(SHAPE).to_event(3))
        numpyro.sample("obs", dist.Normal(_conv(z, kern) + t, SIGMA).to_event(3), obs=data)

    ld = log_density(model, ("t",))
    pos = ld.init_position(jax.random.PRNGKey(0))
    s = estimate_scale(ld, pos, jax.random.PRNGKey(1), sky_fields=False, n_probes=2)
    want = 1.0 / np.sqrt(1.0 + np.asarray(kern) ** 2 / SIGMA**2)
    np.testing.assert_allclose(np.asarray(s.scale), want, rtol=1e-6)
    # the preconditioned log-density is the model's at z = S w (θ untouched)
    pre = ld.preconditioned(s)
    w = {"t": jnp.asarray(0.3), "z": jnp.asarray(np.random.default_rng(3).normal(size=SHAPE))}
    np.testing.assert_allclose(float(pre.logdensity(w)), float(ld.logdensity(pre.to_model(w))),
                               rtol=1e-14)
    assert float(pre.logdensity(w)) != float(ld.logdensity(w))  # it does change variables


MAMS_TOY = HMCSettings(sampler="mams", num_warmup=200, num_samples=4000, num_chains=2,
                       segment=2000, thin_field=400, seed=1)


@pytest.mark.parametrize("precondition", ["none", "fourier"])
def test_mams_recovers_gaussian_posterior(tmp_path, precondition):
    """MAMS on the linear-Gaussian toy: θ mean and std, and the kept fields' mean, within 4.5 Monte
    Carlo standard errors of the closed form; no step-size bias allowance (the Metropolis test
    removes it, unlike MCLMC's 2 %)."""
    settings = HMCSettings(**{**MAMS_TOY.to_dict(), "precondition": precondition})
    res = run_toy(tmp_path, settings)
    assert_toy_posterior(res, fields=True)  # the kept fields are the model's z, not w
    d = res.diagnostics
    assert d["gradient_evaluations"]["sampling"] >= 2 * 2 * 4000  # ≥ 1 McLachlan step (2 grads)
    assert all(0 < np.mean(a) <= 1 for a in [d["accept_rate"]])
    assert (tmp_path / ckpt.FIELD_SCALE_FILE).exists() == (precondition == "fourier")


def test_mams_resume_is_bitwise_identical(tmp_path, monkeypatch):
    """A preconditioned MAMS run killed after its first segment and resumed equals the uninterrupted
    run bit for bit (the preconditioner is read back from the run directory)."""
    settings = HMCSettings(sampler="mams", num_warmup=40, num_samples=30, num_chains=1, segment=10,
                           thin_field=5, seed=4, precondition="fourier")
    ref = run_toy(tmp_path / "ref", settings)
    out = tmp_path / "run"
    interrupt(monkeypatch, 2, False)  # start committed, first segment committed, then killed
    with pytest.raises(Killed):
        run_toy(out, settings)
    monkeypatch.undo()
    res = run_toy(out, settings)
    assert_same_run(tmp_path / "ref", out, settings)
    np.testing.assert_array_equal(res.theta, ref.theta)


@pytest.mark.parametrize("changes,key", [(dict(sampler="hmc"), "sampler"),
                                         (dict(precondition="wiener"), "precondition"),
                                         (dict(sampler="mams", num_warmup=10), "num_warmup")])
def test_bad_sampler_settings_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        HMCSettings(**changes)


def test_saved_settings_without_precondition_still_resume():
    """Runs written before the precondition key existed compare equal to precondition = 'none'."""
    old = {k: v for k, v in HMCSettings().to_dict().items() if k != "precondition"}
    assert HMCSettings.with_later_keys(old) == HMCSettings().to_dict()


def test_mclmc_tuning_equals_blackjax():
    """MCLMCStepper.tune (one compiled step in a Python loop) is blackjax's
    ``mclmc_find_L_and_step_size`` (stages 1-2, same keys, with hmc.energy_variance as its target)
    followed by the θ-only L stage run as compiled scans, two rounds, the second at the L the
    first measured (the implementation it replaces):
    the same tuned L, step size, diagonal preconditioner and end state, to round-off (the same
    arithmetic compiled in other programs: 1e-9 relative is ~10⁶ float64 ulps, while a changed
    key, stage length or weight moves them by O(1)). And the tuning compiles the kernel once."""
    import blackjax

    from explicit.kernels import MCLMC_FRACS, MCLMC_L_ROUNDS, MCLMCStepper

    assert MCLMC_L_ROUNDS == 2  # the reference below runs two rounds

    settings = HMCSettings(sampler="mclmc", num_warmup=60, num_samples=2, num_chains=1,
                           segment=2, thin_field=0, seed=1, energy_variance=3e-5)
    ld = log_density(toy_model, ("theta",))
    stepper = MCLMCStepper(toy_model, ld, settings)
    key = jax.random.PRNGKey(3)
    position = ld.init_position(jax.random.PRNGKey(4))
    state = stepper._init(position, jax.random.PRNGKey(5))
    initial = stepper.initial_params(position)

    ours_state, ours = stepper.tune(key, state, initial, settings.num_warmup)
    assert stepper._tuning_step._cache_size() == 1  # one compiled kernel step for every stage

    def reference():
        f1, f2, f3 = MCLMC_FRACS
        k12, k3 = jax.random.split(key)
        st, params, _ = blackjax.mclmc_find_L_and_step_size(
            mclmc_kernel=stepper.kernel, num_steps=settings.num_warmup, state=state, rng_key=k12,
            logdensity_fn=ld.logdensity, frac_tune1=f1, frac_tune2=f2, frac_tune3=0.0,
            diagonal_preconditioning=True, params=initial, desired_energy_var=3e-5)
        params = type(params)(*(jnp.asarray(p, jnp.float64) for p in params))
        n3 = round(settings.num_warmup * f3)

        def step(s, k, p):
            s, _ = stepper.kernel(k, s, ld.logdensity, p.inverse_mass_matrix, p.L, p.step_size)
            return s, jnp.stack([jnp.asarray(s.position["theta"], jnp.float64)])

        keys = jax.random.split(k3, n3)
        half = round(n3 / 2)
        for lo, hi in [(0, half), (half, n3)]:  # two rounds, the second at the first's L
            st, trace = jax.lax.scan(partial(step, p=params), st, keys[lo:hi])
            tau = (hi - lo) / blackjax.diagnostics.effective_sample_size(trace[None])
            params = params._replace(L=0.4 * params.step_size * jnp.mean(tau))
        return st, params

    ref_state, ref = reference()
    for a, b in [(ours.L, ref.L), (ours.step_size, ref.step_size),
                 (ours.inverse_mass_matrix, ref.inverse_mass_matrix),
                 (ours_state.position["z"], ref_state.position["z"]),
                 (ours_state.position["theta"], ref_state.position["theta"])]:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    assert float(ours.step_size) != float(initial.step_size)  # it did tune


def test_mclmc_tuning_is_announced(tmp_path, capsys):
    """The tuning, run before the first checkpoint, is announced and reported in the log."""
    s = HMCSettings(sampler="mclmc", num_warmup=40, num_samples=2, num_chains=1, segment=2,
                    thin_field=0, seed=1, energy_variance=3e-5)
    res = run_toy(tmp_path, s, progress=True)
    assert np.isfinite(res.theta).all()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hmc chain 0: tun")]
    grads = res.diagnostics["gradient_evaluations"]["warmup"]
    assert lines[0] == "hmc chain 0: tuning (40 warm-up steps; checkpointed once tuned)"
    assert lines[1].startswith("hmc chain 0: tuned in ") and f" {grads} gradients (L " in lines[1]


@pytest.mark.parametrize("key,bad", [("energy_variance", 0.0), ("integrator", "leapfrog")])
def test_saved_settings_without_later_mclmc_keys_still_resume(key, bad):
    """Runs written before the energy_variance (integrator) key existed compare equal to
    blackjax's 5e-4 (velocity Verlet, the only integrator then); a bad value is refused naming
    the key."""
    old = {k: v for k, v in HMCSettings().to_dict().items() if k != key}
    assert HMCSettings.with_later_keys(old) == HMCSettings().to_dict()
    with pytest.raises(ValueError, match=f"^{key} "):
        HMCSettings(**{key: bad})


def test_mams_warm_up_stages_are_logged(tmp_path, capsys):
    """MAMS's warm-up (three long calls before the first checkpoint) logs a line per stage with
    its gradients and the L and step it reached; the lines' gradients add up to the warm-up's."""
    settings = HMCSettings(sampler="mams", num_warmup=40, num_samples=2, num_chains=1, segment=2,
                           thin_field=0, seed=4)
    res = run_toy(tmp_path, settings, progress=True)
    lines = [ln.removeprefix("hmc chain 0: ") for ln in capsys.readouterr().err.splitlines()
             if ln.startswith("hmc chain 0: ") and "iterations" not in ln]
    assert lines[0].startswith("tuning (40 warm-up steps")
    assert lines[1].startswith("MCLMC tuning: 20 steps, ")
    assert lines[2].startswith("step-size adaptation: 12 steps, ")  # 8 L-stage steps: skipped
    assert lines[3].startswith("tuned in ") and len(lines) == 4
    grads = [int(ln.split(" steps, ")[1].split(" gradients")[0]) for ln in lines[1:3]]
    assert sum(grads) == res.diagnostics["gradient_evaluations"]["warmup"]
    assert "steps per trajectory" in lines[2] and "; MAMS starts at L " in lines[1]


@pytest.mark.parametrize("target", [0.6, 0.8, 0.9])
def test_mams_starting_step_meets_the_acceptance_target(target):
    """mams_step_factor inverts the acceptance of a Gaussian energy error ΔE ~ N(σ²/2, σ²)
    (Metropolis: E min(1, e^-ΔE)): at the σ² it asks for, a Monte Carlo estimate of the mean
    acceptance (10⁶ draws: standard error < 5e-4) is the target within 2e-3. The factor scales
    the step as (σ² / (dim · per-dimension variance))^¼."""
    from explicit.kernels import mams_step_factor

    dim, var = 1000, 5e-4
    f = mams_step_factor(dim, var, target)
    sigma2 = f ** 4 * dim * var
    de = np.random.default_rng(0).normal(sigma2 / 2, np.sqrt(sigma2), 1_000_000)
    assert abs(np.minimum(1.0, np.exp(-de)).mean() - target) < 2e-3
    assert mams_step_factor(16 * dim, var, target) == pytest.approx(f / 2, rel=1e-12)


def test_samplers_benchmark_rejects_a_bad_variant_before_running(tmp_path):
    """A variant whose [hmc] value the config model refuses stops the benchmark with one line
    naming the key, before any run, map or work directory is made."""
    from experiments.benchmarks.samplers import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"^--variant: .*hmc\.processes: must be >= 1, got 0$"):
        main(["--config", "gaussian_check", "--variant", "mclmc:processes=0", "--chains", "2",
              "--out", str(tmp_path / "out.json"), "--work", str(work)])
    assert not work.exists() and not (tmp_path / "out.json").exists()
