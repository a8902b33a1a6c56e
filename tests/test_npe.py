"""estimators: torch prior, NPE (vector and one-stage map), calibration (SBC/TARP), C2ST.

Kept small for a shared CPU: one torch thread, one toy NPE fit shared by the tests that need
it (module fixture), tiny maps for the CNN path. Fits are deterministic given their seed, so
the tolerances below guard against regressions, not against run-to-run noise.
"""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from estimators.calibration import calibrate
from estimators.metrics import c2st, fom, s8
from estimators.npe import MapEmbedding, add_noise_copies, fit_npe, load_npe
from estimators.prior import torch_prior
from experiments.priors import ParamPrior, Prior

torch.set_num_threads(1)

# ---- conjugate Gaussian toy: θ ~ N(μ0, diag σ0²) in 2-D, x = Bθ + ε, ε ~ N(0, diag σn²) ------
MU0 = np.array([0.3, 0.8])
S0 = np.array([0.1, 0.15])
B = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
SN = np.array([0.05, 0.06, 0.08])
TOY_PRIOR = Prior((ParamPrior("Omega_c", "normal", MU0[0], S0[0]),
                   ParamPrior("sigma8", "normal", MU0[1], S0[1])))
# Posterior covariance is x-independent: C = (Σ0⁻¹ + Bᵀ Σn⁻¹ B)⁻¹.
POST_COV = np.linalg.inv(np.diag(S0 ** -2) + B.T @ np.diag(SN ** -2) @ B)


def simulate(theta, rng):
    return theta @ B.T + rng.standard_normal((len(theta), 3)) * SN


def exact_mean(x):
    """Posterior mean(s) for x (3,) or (m, 3)."""
    return (POST_COV @ (MU0 / S0 ** 2 + np.atleast_2d(x) @ np.diag(SN ** -2) @ B).T).T


def exact_log_pdf(theta, x):
    diff = np.atleast_2d(theta) - exact_mean(x)
    quad = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(POST_COV), diff)
    return -0.5 * (quad + np.log(np.linalg.det(2 * np.pi * POST_COV)))


def prior_draws(n, seed):
    return MU0 + S0 * np.random.default_rng(seed).standard_normal((n, 2))


@pytest.fixture(scope="module")
def toy_npe():
    # 2000 simulations, a small zuko MAF (3 transforms × 32 units); converges in ~50 epochs.
    theta = prior_draws(2000, seed=1)
    x = simulate(theta, np.random.default_rng(2))
    return fit_npe(theta, x, TOY_PRIOR.torch(), density="maf", seed=0, max_epochs=80,
                   batch_size=100, learning_rate=2e-3, hidden_features=32, num_transforms=3,
                   progress=False)


def test_npe_matches_analytic_gaussian_posterior(toy_npe):
    sd = np.sqrt(np.diag(POST_COV))
    rng = np.random.default_rng(3)
    # Typical observations: the noise-free data at θ near the prior bulk (NPE is least
    # trained in the prior tails).
    for th_o in (MU0, MU0 + S0 * [1.0, -1.0], MU0 + S0 * [-0.5, 1.0]):
        x_o = B @ th_o
        q = toy_npe.sample(x_o, 2000, seed=1)
        exact = rng.multivariate_normal(exact_mean(x_o)[0], POST_COV, 2000)
        assert q.shape == (2000, 2) and q.dtype == np.float32
        # Monte-Carlo error of the mean is 1/sqrt(2000) ≈ 0.02σ, of the std ≈ 1.6%: the bounds
        # (0.25σ, 12%, C2ST 0.6) measure network error; measured ≤ 0.06σ, ≤ 6%, C2ST ≤ 0.52.
        z = (q.mean(0) - exact_mean(x_o)[0]) / sd
        assert np.all(np.abs(z) < 0.25), z
        ratio = q.std(0) / sd
        assert np.all(np.abs(ratio - 1) < 0.12), ratio
        assert c2st(q[:1000], exact[:1000], seed=0) <= 0.6  # 1000 each: SE ≈ 0.016
        # log q(θ|x_o) against the exact log density at exact posterior draws (nats);
        # measured mean differences ≤ 0.02 with a scatter of 0.1-0.2 per point.
        err = toy_npe.log_prob(exact[:200], x_o) - exact_log_pdf(exact[:200], x_o)
        assert abs(err.mean()) < 0.15, err.mean()


def test_fit_record_and_held_out_kl(toy_npe):
    # Held-out E[log q(θ|x) − log p(θ|x)] = −E_x KL(p‖q) ≤ 0; measured −0.030 ± 0.009 over
    # 1000 fresh pairs. −0.1 nats flags a clearly worse fit; +0.03 is 3 MC standard errors.
    theta = prior_draws(1000, seed=30)
    x = simulate(theta, np.random.default_rng(31))
    diff = toy_npe.log_prob_pairs(theta, x) - np.concatenate(
        [exact_log_pdf(t, xi) for t, xi in zip(theta, x)])
    assert -0.1 < diff.mean() < 0.03, diff.mean()
    # The best validation log q sits near the ideal E[log p(θ|x)] = -½ log det(2πe C);
    # its ~200 validation pairs scatter it by ~0.07 nats (measured 3.29 vs 3.45).
    ideal = -0.5 * np.log(np.linalg.det(2 * np.pi * math.e * POST_COV))
    assert abs(toy_npe.best_val_log_prob - ideal) < 0.3
    assert 0 < toy_npe.epochs <= 80 and toy_npe.fit_time_s > 0
    assert toy_npe.names == ("Omega_c", "sigma8") and toy_npe.x_shape == (3,)
    assert len(toy_npe.history["val_log_prob"]) == toy_npe.epochs


def test_calibration_of_toy_npe(toy_npe, tmp_path):
    theta = prior_draws(200, seed=10)
    x = simulate(theta, np.random.default_rng(11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sbi's C2ST-variability / sample-size notices
        res = calibrate(toy_npe, theta, x, n_posterior_samples=500, out_dir=tmp_path, seed=0)
    # For a calibrated posterior each KS p-value is U(0, 1): P(p < 1e-3) = 0.1% per parameter.
    assert min(res["sbc"]["ks_pvals"].values()) > 1e-3, res["sbc"]["ks_pvals"]
    # 200 test pairs: ECP has ~±0.035 binomial noise per α, ATC ~±0.02 (measured ATC +0.029,
    # max|ECP-α| 0.084, KS p 0.41 / 0.20).
    ecp, alpha = np.array(res["tarp"]["ecp"]), np.array(res["tarp"]["alpha"])
    assert abs(res["tarp"]["atc"]) < 0.06
    assert np.max(np.abs(ecp - alpha)) < 0.12  # ≈ the 99% KS band 1.63/sqrt(200)
    assert set(res["sbc"]["c2st_ranks"]) == {"Omega_c", "sigma8"}
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["tarp"]["atc"] == res["tarp"]["atc"] and saved["names"] == res["names"]
    assert np.array(saved["sbc"]["ranks"]).shape == (200, 2)
    for png in ("sbc_ranks.png", "tarp.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


class ExactGaussianPosterior:
    """Duck-typed sbi posterior: exact toy posterior, optionally widened/narrowed by ``scale``."""

    def __init__(self, scale=1.0):
        self.chol = torch.tensor(np.linalg.cholesky(POST_COV) * scale, dtype=torch.float32)

    def sample_batched(self, sample_shape, x, show_progress_bars=False):
        mean = torch.tensor(exact_mean(x.numpy()), dtype=torch.float32)
        z = torch.randn(*sample_shape, len(x), 2)
        return mean + z @ self.chol.T


def test_calibration_separates_exact_from_overconfident():
    theta = prior_draws(300, seed=20)
    x = simulate(theta, np.random.default_rng(21))
    kw = dict(n_posterior_samples=300, names=["a", "b"], seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = calibrate(ExactGaussianPosterior(1.0), theta, x, **kw)
        bad = calibrate(ExactGaussianPosterior(0.5), theta, x, **kw)
    # Measured (300 pairs): exact ATC +0.008, max|ECP-α| 0.05, KS p ≥ 0.1; half-width
    # posteriors ATC -0.057, max|ECP-α| 0.16, KS p ≤ 2e-7 (ranks pile up at both ends).
    # TARP noise at 300 pairs: ~±0.03 per α, ~±0.015 on ATC.
    for res in (good, bad):
        assert set(res["sbc"]["ks_pvals"]) == {"a", "b"}
    dev = lambda r: np.max(np.abs(np.subtract(r["tarp"]["ecp"], r["tarp"]["alpha"])))  # noqa: E731
    assert abs(good["tarp"]["atc"]) < 0.03 and dev(good) < 0.1
    assert min(good["sbc"]["ks_pvals"].values()) > 1e-3
    assert bad["tarp"]["atc"] < -0.03 and dev(bad) > 0.12
    assert max(bad["sbc"]["ks_pvals"].values()) < 1e-4


# ---- prior ------------------------------------------------------------------------------------
MIXED_PRIOR = Prior((
    ParamPrior("Omega_c", "truncated_normal", 0.2664, 0.2, low=0.0),        # one bound (low)
    ParamPrior("sigma8", "normal", 0.831, 0.14),
    ParamPrior("w0", "truncated_normal", -1.0, 0.9, low=-2.0, high=-0.3),    # two bounds
    ParamPrior("n_s", "truncated_normal", 0.96, 0.1, high=0.9),              # one bound (high)
    ParamPrior("h", "uniform", low=0.55, high=0.8),
    ParamPrior("wa", "truncated_normal", 0.0, 1.0, low=4.0),                 # deep in the tail
))


def test_torch_prior_log_prob_matches_numpyro():
    tp = torch_prior(MIXED_PRIOR)
    rng = np.random.default_rng(0)
    # Points spread past every bound so that some fall outside the support.
    pts = MIXED_PRIOR.mean + 3 * MIXED_PRIOR.std * rng.uniform(-1, 1, (500, MIXED_PRIOR.dim))
    pts = pts.astype(np.float32)
    ours = tp.log_prob(torch.from_numpy(pts)).numpy()
    ref = np.asarray(MIXED_PRIOR.log_prob(pts))
    assert np.array_equal(np.isfinite(ours), np.isfinite(ref))
    assert 0 < np.isfinite(ref).sum() < len(pts)  # both inside and outside points tested
    fin = np.isfinite(ref)
    # float32 evaluation of sums of 6 terms of size ~1-10: 1e-4 absolute.
    np.testing.assert_allclose(ours[fin], ref[fin], atol=1e-4, rtol=1e-5)
    inside = torch.from_numpy(pts).clamp(torch.tensor(MIXED_PRIOR.low, dtype=torch.float32),
                                         torch.tensor(MIXED_PRIOR.high, dtype=torch.float32))
    assert torch.equal(tp.support.check(torch.from_numpy(pts)), torch.from_numpy(fin))
    assert bool(tp.support.check(inside).all())


def test_torch_prior_moments_and_sbi_compatibility():
    tp = torch_prior(MIXED_PRIOR)
    np.testing.assert_allclose(tp.mean.numpy(), MIXED_PRIOR.mean, rtol=1e-5)
    np.testing.assert_allclose(tp.stddev.numpy(), MIXED_PRIOR.std, rtol=1e-4)
    torch.manual_seed(0)
    s = tp.sample((200_000,)).numpy()
    assert s.shape == (200_000, MIXED_PRIOR.dim) and s.dtype == np.float32
    assert np.all((s >= MIXED_PRIOR.low) & (s <= MIXED_PRIOR.high))
    # Sample-mean standard error is σ/sqrt(n) ≈ 0.0022σ: 5 SE. Std SE ≈ σ/sqrt(2n): 1% ≈ 6 SE.
    assert np.all(np.abs(s.mean(0) - MIXED_PRIOR.mean) < 5 * MIXED_PRIOR.std / math.sqrt(2e5))
    np.testing.assert_allclose(s.std(0), MIXED_PRIOR.std, rtol=0.01)

    # Far-tail truncations, where Φ(a) rounds to 1 even in float64: exact mean from the Mills
    # ratio φ(a)/(1−Φ(a)) = sqrt(2/π)/erfcx(a/√2); truncated std ≈ 1/a ≈ 0.1, so 2000 draws
    # give SE ≈ 0.002.
    from scipy.special import erfcx

    from estimators.prior import TruncatedNormal

    mills = math.sqrt(2 / math.pi) / erfcx(10 / math.sqrt(2))
    for tn, sign in ((TruncatedNormal(0.0, 1.0, low=10.0), 1),
                     (TruncatedNormal(0.0, 1.0, high=-10.0), -1)):
        draws = tn.sample((2000,))
        assert torch.isfinite(draws).all() and bool((sign * draws >= 10).all())
        assert abs(sign * draws.mean().item() - mills) < 0.01
        assert abs(sign * tn.mean.item() - mills) < 1e-4
        assert math.isfinite(tn.log_prob(torch.tensor(sign * 10.5)).item())

    from sbi.utils.sbiutils import mcmc_transform
    from sbi.utils.user_input_checks import process_prior

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sbi must accept the prior as a plain torch prior
        processed, numel, returns_numpy = process_prior(tp)
        transform = mcmc_transform(tp)  # what build_posterior needs: biject_to(support)
    assert processed is tp and numel == MIXED_PRIOR.dim and not returns_numpy
    theta = tp.sample((100,))
    np.testing.assert_allclose(transform(transform.inv(theta)).numpy(), theta.numpy(),
                               rtol=1e-4, atol=1e-4)


# ---- metrics ----------------------------------------------------------------------------------
def test_c2st_same_and_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1000, 2)), rng.standard_normal((1000, 2))
    # Same distribution: CV accuracy of 2000 points has SE ~0.011 around 0.5.
    assert c2st(a, b, seed=0) <= 0.6
    assert c2st(a[:300], b[:300] + 6.0, seed=0) >= 0.95  # 6σ apart: ~perfectly separable


def test_fom_and_s8():
    rng = np.random.default_rng(1)
    cov = np.array([[0.04, 0.01], [0.01, 0.09]])
    s = rng.multivariate_normal([0.3, 0.8], cov, 20_000)
    # det of a sample covariance (n=20000) scatters by ~sqrt(2·2/n) ≈ 1.4%; FoM by half that.
    assert fom(s) == pytest.approx(1 / math.sqrt(np.linalg.det(cov)), rel=0.03)
    assert s8(0.3, 0.8) == pytest.approx(0.8)
    np.testing.assert_allclose(s8(np.array([1.2]), np.array([0.5])), [1.0])


# ---- one-stage NPE on maps ----------------------------------------------------------------------
MAP_PRIOR = Prior((ParamPrior("Omega_c", "truncated_normal", 0.3, 0.1, low=0.1),
                   ParamPrior("sigma8", "uniform", low=0.5, high=1.1)))


def toy_maps(n, seed):
    """θ from MAP_PRIOR and 2-bin 8×8 Gaussian 'maps' whose amplitude is Ω_c·σ8."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    theta = MAP_PRIOR.torch().sample((n,)).numpy()
    amp = (theta[:, 0] * theta[:, 1])[:, None, None, None]
    return theta, (amp * rng.standard_normal((n, 2, 8, 8))).astype(np.float32)


def fit_tiny_maps(theta, maps, seed=0):
    return fit_npe(theta, maps, MAP_PRIOR.torch(), density="nsf", seed=seed, max_epochs=2,
                   embedding_net=MapEmbedding(2, 8, n_out=4, channels=(8, 16), hidden=16),
                   noise_sigma=[0.01, 0.02], n_noise_copies=2, hidden_features=16,
                   num_transforms=2, progress=False)


def test_one_stage_npe_on_maps(tmp_path):
    theta, maps = toy_maps(200, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "max epochs reached": 2 epochs is the point here
        res = fit_tiny_maps(theta, maps)
        again = fit_tiny_maps(theta, maps)
    assert res.x_shape == (2, 8, 8) and res.n_train == 400 and res.epochs == 2
    s = res.sample(maps[0], 50, seed=0)
    assert s.shape == (50, 2)
    assert np.all((s >= MAP_PRIOR.low) & (s <= MAP_PRIOR.high))  # sbi rejects outside prior
    assert np.array_equal(again.sample(maps[0], 50, seed=0), s)  # deterministic given seed
    assert res.sample_batched(maps[:3], 7).shape == (7, 3, 2)
    assert res.log_prob(s[:4], maps[0]).shape == (4,)
    with pytest.raises(ValueError, match=r"expected shape \(2, 8, 8\).*got \(8, 8\)"):
        res.sample(maps[0, 0], 10)
    with pytest.raises(ValueError, match="expected shape"):
        res.sample(maps[:2], 10)  # a batch where one observation is expected
    res.save(tmp_path / "npe")
    back = load_npe(tmp_path / "npe")
    assert np.array_equal(back.sample(maps[0], 50, seed=0), s)
    assert back.names == res.names and back.x_shape == res.x_shape
    assert back.fit_time_s == res.fit_time_s
    # The embedding also takes flattened maps (batch, n_bins·npix²).
    emb = MapEmbedding(2, 8, n_out=4, channels=(8,), hidden=8)
    flat = torch.from_numpy(maps[:5].reshape(5, -1))
    assert torch.equal(emb(flat), emb(torch.from_numpy(maps[:5])))


def test_noise_copies():
    theta = np.arange(6, dtype=np.float32).reshape(3, 2)
    maps = np.zeros((3, 2, 32, 32), np.float32)
    th, x = add_noise_copies(theta, maps, [0.1, 0.5], 4, np.random.default_rng(0))
    assert th.shape == (12, 2) and x.shape == (12, 2, 32, 32)
    assert np.array_equal(th[:4], np.repeat(theta[:1], 4, axis=0))
    assert not np.array_equal(x[0], x[1])  # fresh noise per copy
    # 12·1024 pixels per bin: the std estimate is good to ~0.6%.
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), [0.1, 0.5], rtol=0.03)
    with pytest.raises(ValueError, match="broadcast"):
        add_noise_copies(theta, maps, [0.1, 0.2, 0.3], 2, np.random.default_rng(0))


# ---- errors -----------------------------------------------------------------------------------
def test_nan_rows_rejected():
    theta = prior_draws(50, seed=0)
    x = simulate(theta, np.random.default_rng(0))
    theta[3, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 of 50 simulations have NaN or inf.*\[3, 7\]"):
        fit_npe(theta, x, TOY_PRIOR.torch(), progress=False)
    with pytest.raises(ValueError, match="embedding_net"):
        fit_npe(prior_draws(8, 0), np.zeros((8, 2, 4, 4)), TOY_PRIOR.torch(), progress=False)


def test_load_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_npe(missing)


def test_package_import_is_torch_free():
    code = "import sys, estimators; assert 'torch' not in sys.modules; estimators.s8"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])
