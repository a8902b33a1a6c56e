"""The C_ℓ baseline likelihood (estimators/cl_baseline.py): data vector, covariance + Hartlap,
Gaussian and Sellentin-Heavens likelihoods, the numpyro model, and NUTS recovering the input
cosmology from a Gaussian-field (``GaussianLensing``) map.

One small setup serves everything (module fixtures, so that each jitted function compiles once):
a 10° / 32² flat field, two LSST-Y10 tomographic bins (3 spectra), 6 log ℓ bins from 2 ℓ_fund
(72) to the Nyquist ℓ (576), i.e. an 18-entry data vector; 150 fiducial simulations for the
covariance (Hartlap factor 0.87) and the realisation with the next seed as the observation.
The prior is LSST-Y10 over (Omega_c, sigma8). The likelihood uses n_chi = 64 Limber nodes (the
maps use 256): the binned C_ℓ differ by < 2e-3 relative, < 0.1 of the statistical error of the
150-simulation mean in every bin and ~0.05 posterior σ in S8, and the gradient is ~3x cheaper.
"""

import dataclasses
import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402
from scipy.special import gammaln  # noqa: E402

from estimators.cl_baseline import (  # noqa: E402
    ClLikelihood,
    cl_data_vector,
    cl_likelihood_for_model,
    data_vector_layout,
    data_vector_names,
    estimate_covariance,
    fiducial_data_vectors,
    hartlap_factor,
    sample_cl_posterior,
)
from experiments.priors import lsst_y10  # noqa: E402
from simulators import Cosmology, flatsky  # noqa: E402
from simulators.lensing import GaussianLensing, noise_sigma, simulate_maps  # noqa: E402
from simulators.lightcone import FlatSky  # noqa: E402
from simulators.sources import RedshiftBins  # noqa: E402

FID = Cosmology.fiducial()
FIELD, NPIX, N_BINS = 10.0, 32, 2
ELL_FUND = 2 * np.pi / np.radians(FIELD)  # 36
EDGES = np.geomspace(2 * ELL_FUND, 16 * ELL_FUND, 7)  # 72 .. 576 (Nyquist), >= 16 modes per bin
N_ELL, N_PAIRS = 6, 3
K = N_PAIRS * N_ELL  # 18
N_COV = 150
N_CHI = 64
PRIOR = lsst_y10().select(["Omega_c", "sigma8"])
TRUTH = np.array([FID.Omega_c, FID.sigma8])


def s8(omega_c, sigma8):
    return sigma8 * np.sqrt((omega_c + FID.Omega_b) / 0.3)


@pytest.fixture(scope="module")
def setup():
    bins = RedshiftBins.lsst_y10(n_bins=N_BINS)
    sky = FlatSky(FIELD, NPIX)
    return GaussianLensing(sky, bins), noise_sigma(bins, sky)


@pytest.fixture(scope="module")
def sims(setup):
    """(data vectors of seeds 0..149 for the covariance, observation = seed 150), one batch."""
    model, sigma = setup
    dvs = fiducial_data_vectors(model, FID, sigma, FIELD, EDGES, N_COV + 1, seed=0, batch=N_COV + 1)
    return dvs[:N_COV], dvs[N_COV]


@pytest.fixture(scope="module")
def cov(sims):
    return estimate_covariance(sims[0])


@pytest.fixture(scope="module")
def like(setup, cov):
    model, sigma = setup
    return ClLikelihood(bins=model.bins, field_deg=FIELD, npix=NPIX, ell_edges=EDGES, sigma_n=sigma,
                        cov=cov.cov, n_cov=cov.n_sims, prior=PRIOR, base=FID, n_chi=N_CHI)


@pytest.fixture(scope="module")
def posterior(like, sims):
    # Short chains: 100 warmup (from the Fisher mass matrix) + 150 samples give an ESS ~100, so the
    # posterior mean is known to ~0.1 σ, far inside the 3 σ tolerance below.
    return sample_cl_posterior(like, sims[1], num_warmup=100, num_samples=150, max_tree_depth=6,
                               seed=0, progress=False)


def _synthetic_like(setup, kind, n_cov=100, seed=0):
    """A likelihood with a random SPD covariance (no Limber evaluation needed)."""
    model, sigma = setup
    a = np.random.default_rng(seed).normal(size=(K, K))
    c = (a @ a.T / K + 0.5 * np.eye(K)) * 1e-18
    return ClLikelihood(bins=model.bins, field_deg=FIELD, npix=NPIX, ell_edges=EDGES, sigma_n=sigma,
                        cov=c, n_cov=n_cov, prior=PRIOR, base=FID, kind=kind), c


# ---- data vector ---------------------------------------------------------------------------------


def test_data_vector_layout_and_batching():
    maps = np.asarray(jax.random.normal(jax.random.key(3), (2, N_BINS, 16, 16)))
    edges = np.array([40.0, 80.0, 160.0, 280.0])
    single = [np.asarray(cl_data_vector(m, FIELD, edges)) for m in maps]
    batched = np.asarray(jax.jit(cl_data_vector, static_argnums=1)(maps, FIELD, edges))
    assert batched.shape == (2, N_PAIRS * 3)
    np.testing.assert_allclose(batched, np.stack(single), rtol=1e-12, atol=0)
    cl = np.asarray(flatsky.cl_estimate(maps[1], FIELD, edges)[0])  # (pairs, ell)
    np.testing.assert_array_equal(single[1], cl.reshape(-1))
    i, j, b = data_vector_layout(N_BINS, 3)
    assert list(zip(i, j, b))[:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    np.testing.assert_array_equal(single[1][4], cl[1, 1])  # pair (0,1), ell bin 1
    names = data_vector_names(N_BINS, 3)
    assert len(names) == 9 and names[4] == "C_0,1[1]" and names[-1] == "C_1,1[2]"
    with pytest.raises(ValueError, match="shape"):
        cl_data_vector(maps[0, 0], FIELD, edges)


def test_fiducial_sims_follow_simulate_maps_seeds(setup, sims):
    """Realisation r of ``fiducial_data_vectors`` is ``simulate_maps`` with seed r (same latent,
    same shape-noise key), so sims and observations made either way are interchangeable."""
    model, _ = setup
    noisy = simulate_maps(model, FID, 7).kappa_noisy
    np.testing.assert_allclose(sims[0][7], np.asarray(cl_data_vector(noisy, FIELD, EDGES)),
                               rtol=1e-9, atol=0)
    assert not np.allclose(sims[0][7], sims[0][8], rtol=1e-3, atol=0)


# ---- covariance ------------------------------------------------------------------------------------


def test_hartlap_factor_and_too_few_simulations(setup, cov, sims):
    assert hartlap_factor(100, 18) == pytest.approx(80 / 99, rel=1e-15)
    assert cov.hartlap == pytest.approx((150 - 18 - 2) / 149, rel=1e-15) and cov.n_sims == N_COV
    np.testing.assert_allclose(cov.cov, np.cov(sims[0], rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(cov.precision, (130 / 149) * np.linalg.inv(np.cov(sims[0].T)),
                               rtol=1e-8)
    for n in (20, 19, 5):  # n <= k + 2 = 20
        with pytest.raises(ValueError, match=rf"\b{n}\b.*\b18\b|\b18\b.*\b{n}\b"):
            hartlap_factor(n, 18)
    hartlap_factor(21, 18)  # the first valid count
    with pytest.raises(ValueError, match=r"\b20 simulations\b.*\b18\b"):
        estimate_covariance(sims[0][:20])
    with pytest.raises(ValueError, match=r"\b20\b.*\b18\b"):
        _synthetic_like(setup, "gaussian", n_cov=20)


def test_gaussian_likelihood_is_mvn_with_one_matrix_argument(setup):
    """numpyro >= 0.15 rejects more than one of covariance / precision / scale_tril: the
    distribution must construct, and its log-density must be N(mean, S / h) exactly."""
    import numpyro.distributions as dist

    like_g, c = _synthetic_like(setup, "gaussian", n_cov=100)
    h = (100 - K - 2) / 99
    rng = np.random.default_rng(1)
    mu = rng.normal(size=K) * 1e-9
    d = like_g.distribution(jnp.asarray(mu))
    assert isinstance(d, dist.MultivariateNormal)
    np.testing.assert_allclose(np.asarray(d.scale_tril), np.linalg.cholesky(c / h), rtol=1e-12)
    x = mu + np.linalg.cholesky(c) @ rng.normal(size=K)
    ref = stats.multivariate_normal(mu, c / h).logpdf(x)
    assert float(d.log_prob(jnp.asarray(x))) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError):  # the API constraint this guards against
        dist.MultivariateNormal(jnp.asarray(mu), covariance_matrix=jnp.asarray(c),
                                scale_tril=jnp.asarray(np.linalg.cholesky(c)))


def test_sellentin_heavens_matches_formula(setup):
    """log p = ln c̄ - ½ ln|S| - (N/2) ln(1 + χ²/(N-1)), c̄ = Γ(N/2) / [(π(N-1))^(k/2) Γ((N-k)/2)],
    χ² with the raw sample covariance S (Sellentin & Heavens 2016, eq. 17), in plain numpy."""
    n = 60
    like_sh, c = _synthetic_like(setup, "sellentin_heavens", n_cov=n, seed=2)
    like_g, _ = _synthetic_like(setup, "gaussian", n_cov=n, seed=2)
    rng = np.random.default_rng(3)
    mu = rng.normal(size=K) * 1e-9
    chol = np.linalg.cholesky(c)

    def formula(x):
        r = np.linalg.solve(chol, x - mu)
        chi2 = r @ r
        log_c = gammaln(n / 2) - 0.5 * K * math.log(math.pi * (n - 1)) - gammaln((n - K) / 2)
        return log_c - np.sum(np.log(np.diag(chol))) - 0.5 * n * math.log1p(chi2 / (n - 1))

    xs = [mu + chol @ rng.normal(size=K) * s for s in (0.5, 1.0, 2.0)]
    got = [float(like_sh.distribution(jnp.asarray(mu)).log_prob(jnp.asarray(x))) for x in xs]
    ref = [formula(x) for x in xs]
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    np.testing.assert_allclose(np.diff(got), np.diff(ref), rtol=1e-9)  # the θ-dependent part
    # heavier tails than the Hartlap Gaussian: at a 2σ-per-entry outlier the t is higher
    far = float(like_g.distribution(jnp.asarray(mu)).log_prob(jnp.asarray(xs[2])))
    assert got[2] > far


# ---- theory mean -------------------------------------------------------------------------------------


def test_theory_is_binned_model_cl(like):
    """The fast mode-weight matrix gives exactly ``flatsky.binned_model_cl`` of the same Limber."""
    c = PRIOR.cosmology(jnp.array([0.3, 0.75]), FID)
    fast = like.mean(jnp.array([0.3, 0.75])) - like.noise_vector
    ref = jax.jit(like.theory_cl_reference)(c)  # jit: eager dispatch of Limber is slow
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref).reshape(-1), rtol=1e-12, atol=0)
    _, ell_mean, n_modes = flatsky.cl_estimate(np.zeros((N_BINS, NPIX, NPIX)) + 1.0, FIELD, EDGES)
    np.testing.assert_array_equal(like.n_modes, np.asarray(n_modes))
    np.testing.assert_allclose(like.ell_mean, np.asarray(ell_mean), rtol=1e-12)
    assert like.summary()["n_cov"] == N_COV


def test_mean_matches_simulations(like, cov):
    """Hotelling test of the 150-simulation mean against mean(θ_fid) (theory + shape noise):
    T² = N (x̄ - μ)ᵀ S⁻¹ (x̄ - μ), (N - k) / (k (N - 1)) T² ~ F(k, N - k) for a correct mean.
    Thresholds at the 0.1% tails; dropping the shape noise must fail by a huge margin."""
    mu = np.asarray(like.mean(jnp.asarray(TRUTH)))
    scale = (N_COV - K) / (K * (N_COV - 1))
    prec = np.linalg.inv(cov.cov)

    def f_stat(m):
        d = cov.mean - m
        return scale * N_COV * d @ prec @ d

    f = f_stat(mu)
    print(f"\nHotelling F = {f:.3f} (k = {K}, N = {N_COV}; 1 +- {math.sqrt(2 / K):.2f} expected)")
    assert stats.f(K, N_COV - K).ppf(0.001) < f < stats.f(K, N_COV - K).ppf(0.999), f
    assert f_stat(mu - like.noise_vector) > 100 * stats.f(K, N_COV - K).ppf(0.999)
    # sigma8 = 0.831 -> 0.80 (4% in amplitude, 8% in C_ℓ) is also rejected: the test has power
    wrong = np.asarray(like.mean(jnp.asarray([TRUTH[0], 0.80])))
    assert f_stat(wrong) > stats.f(K, N_COV - K).ppf(0.999)


def test_model_and_gradients(like, sims, posterior):  # after the posterior: shares its compilations
    """The numpyro model's joint density is prior + likelihood, and the likelihood gradient is
    finite across the prior bulk (10%-90% quantiles of each parameter) and matches central
    differences at the truth (halofit's implicit-function derivative included)."""
    from numpyro.infer.util import log_density

    # float64 (not weakly typed) θ everywhere, as inside NUTS: the jitted theory and its
    # derivatives compiled for the posterior fixture are then reused, not recompiled
    obs = jnp.asarray(sims[1])
    theta = jnp.asarray(np.array([0.3, 0.8]))
    joint, _ = log_density(like.model, (obs,), {}, {"Omega_c": theta[0], "sigma8": theta[1]})
    expect = like.log_likelihood(theta, obs) + PRIOR.log_prob(theta)
    assert float(joint) == pytest.approx(float(expect), rel=1e-12)

    grad = jax.grad(like.log_likelihood)
    dists = PRIOR.numpyro_dists()
    qs = {n: [float(d.icdf(q)) for q in (0.1, 0.9)] for n, d in dists.items()}
    for oc in qs["Omega_c"]:
        for sg in qs["sigma8"]:
            g = np.asarray(grad(jnp.asarray(np.array([oc, sg])), obs))
            assert np.all(np.isfinite(g)), (oc, sg, g)
    # the Sellentin-Heavens variant of the same likelihood is differentiable too
    sh = dataclasses.replace(like, kind="sellentin_heavens")
    g_sh = np.asarray(jax.grad(lambda t: sh.distribution(like.mean(t)).log_prob(obs))(theta))
    assert sh.df == N_COV - K and np.all(np.isfinite(g_sh))
    g0 = np.asarray(grad(jnp.asarray(TRUTH), obs))
    eps = 1e-5
    fd = [(float(like.log_likelihood(jnp.asarray(TRUTH + eps * e), obs))
           - float(like.log_likelihood(jnp.asarray(TRUTH - eps * e), obs))) / (2 * eps)
          for e in np.eye(2)]
    # log L ~ -χ²/2 with |∂ log L/∂θ| ~ 10-100 here; central differences are good to ~1e-6 rel
    np.testing.assert_allclose(g0, fd, rtol=1e-5, atol=1e-6 * np.max(np.abs(fd)))


# ---- posterior -----------------------------------------------------------------------------------


def test_posterior_recovers_truth(posterior):
    samples, info = posterior
    assert samples.shape == (150, 2) and info["names"] == ("Omega_c", "sigma8")
    mean, sd = samples.mean(axis=0), samples.std(axis=0)
    s8_post = s8(samples[:, 0], samples[:, 1])
    s8_true = s8(*TRUTH)
    # 3 posterior σ for each parameter and for S8, the best-measured direction
    assert np.all(np.abs(mean - TRUTH) < 3 * sd), (mean, sd, TRUTH)
    assert abs(s8_post.mean() - s8_true) < 3 * s8_post.std(), (s8_post.mean(), s8_post.std(), s8_true)
    # the data are informative: S8 is measured far better than the prior allows (prior σ(S8) ~ 0.2)
    prior_draws = np.asarray(PRIOR.sample(jax.random.key(0), 4000))
    s8_prior = s8(np.clip(prior_draws[:, 0], 0, None), prior_draws[:, 1])
    assert s8_post.std() < 0.25 * s8_prior.std()
    # healthy sampler: no divergences expected for this smooth 2-d posterior; a short single chain
    assert info["divergences"] <= 2
    assert min(info["ess"].values()) > 30 and max(info["r_hat"].values()) < 1.1
    assert info["grad_evals"] >= info["grad_evals_sampling"] >= 150
    assert info["n_cov"] == N_COV and info["kind"] == "gaussian"
    print(f"\nposterior mean {mean}, sd {sd}, S8 {s8_post.mean():.4f} +- {s8_post.std():.4f} "
          f"(truth {TRUTH}, S8 {s8_true:.4f}); " + ", ".join(
              f"{k}={info[k]}" for k in ("wall_time_s", "grad_evals", "grad_evals_sampling",
                                         "divergences", "ess", "r_hat", "step_size")))


def test_cl_likelihood_for_model(setup, sims):
    """The one-call builder: covariance of seeds 0..n_cov-1 (batch 151: the compiled sims are
    reused), noise from ``noise_sigma``, the same settings passed on."""
    model, sigma = setup
    lk, est = cl_likelihood_for_model(model, PRIOR, EDGES, n_cov=N_COV + 1, batch=N_COV + 1,
                                      n_chi=N_CHI, kind="sellentin_heavens")
    everything = np.vstack([sims[0], sims[1][None]])
    np.testing.assert_allclose(est.cov, np.cov(everything, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(lk.cov, est.cov, rtol=0)
    assert lk.n_cov == N_COV + 1 and lk.kind == "sellentin_heavens" and lk.df == N_COV + 1 - K
    np.testing.assert_array_equal(lk.sigma_n, sigma)
    with pytest.raises(ValueError, match=r"\b19 simulations\b.*\b18\b"):
        cl_likelihood_for_model(model, PRIOR, EDGES, n_cov=19)


def test_errors(setup, cov):
    model, sigma = setup
    kw = dict(bins=model.bins, field_deg=FIELD, npix=NPIX, sigma_n=sigma, cov=cov.cov, n_cov=N_COV,
              prior=PRIOR, base=FID)
    with pytest.raises(ValueError, match="kind"):
        ClLikelihood(ell_edges=EDGES, kind="student", **kw)
    with pytest.raises(ValueError, match="no Fourier mode"):  # 36 < ell < 40: no mode (fund. 36)
        ClLikelihood(ell_edges=np.array([37.0, 40.0, 80.0, 120.0, 200.0, 300.0, 500.0]), **kw)
    with pytest.raises(ValueError, match=r"\(18, 18\)"):
        ClLikelihood(ell_edges=EDGES[:-1], **kw)
    with pytest.raises(ValueError, match="data must have shape"):
        sample_cl_posterior(ClLikelihood(ell_edges=EDGES, **kw), np.zeros(5), progress=False)


# ---- analytic covariance -------------------------------------------------------------------------


def test_analytic_covariance_matches_simulations(setup):
    """The analytic Gaussian covariance against the sample covariance of 2000 simulated data
    vectors of the same Gaussian maps. Sampling error of a sample variance: sqrt(2 / n) = 3.2 %
    per element (more with the chi-square tails of few-mode bins), so each diagonal ratio is held
    to 15 % and their mean to 3 % (18 nearly independent entries: 0.75 % each); correlation
    coefficients (error ~1 / sqrt(n) = 0.022) to 0.1. A factor two in the mode counting (ell and
    -ell), a missing noise term or cross-spectrum term each fail these by far."""
    from estimators.cl_baseline import analytic_covariance

    model, sigma = setup
    n = 2000
    dvs = fiducial_data_vectors(model, FID, sigma, FIELD, EDGES, n, seed=50_000, batch=500)
    sample = np.cov(dvs, rowvar=False)
    analytic = analytic_covariance(model.bins, FID, FIELD, NPIX, EDGES, sigma)
    ratio = np.diag(sample) / np.diag(analytic)
    assert np.all(np.abs(ratio - 1) < 0.15), ratio
    assert abs(ratio.mean() - 1) < 0.03, ratio.mean()
    d_s, d_a = np.sqrt(np.diag(sample)), np.sqrt(np.diag(analytic))
    corr_s, corr_a = sample / np.outer(d_s, d_s), analytic / np.outer(d_a, d_a)
    assert np.max(np.abs(corr_s - corr_a)) < 0.1
    # different ell bins are independent: exactly zero analytically
    layout_b = data_vector_layout(N_BINS, N_ELL)[2]
    assert np.all(analytic[layout_b[:, None] != layout_b[None, :]] == 0)


def test_analytic_covariance_likelihood(setup):
    """n_cov=None: the analytic covariance, no Hartlap factor; Sellentin-Heavens needs sims."""
    model, sigma = setup
    like, est = cl_likelihood_for_model(model, PRIOR, EDGES, n_cov=None, n_chi=N_CHI)
    assert est is None and like.hartlap == 1.0 and like.n_cov is None
    np.testing.assert_allclose(np.asarray(like.scale_tril) @ np.asarray(like.scale_tril).T,
                               like.cov, rtol=1e-10, atol=1e-30)
    with pytest.raises(ValueError, match="Sellentin-Heavens likelihood needs a simulated"):
        dataclasses.replace(like, kind="sellentin_heavens")


def test_bins_without_modes_are_named(setup):
    from estimators.cl_baseline import analytic_covariance

    model, sigma = setup
    edges = np.geomspace(2 * ELL_FUND, 16 * ELL_FUND, 25)  # log bins narrower than the mode spacing
    with pytest.raises(ValueError, match=r"ell bins \[2\] contain no Fourier mode .* linearly"):
        analytic_covariance(model.bins, FID, FIELD, NPIX, edges, sigma)


# ---- the Wishart band-power likelihood -------------------------------------------------------------


def _wishart_like(setup, edges, keep=None, n_chi=N_CHI):
    model, sigma = setup
    like, _ = cl_likelihood_for_model(model, PRIOR, edges, n_cov=None, n_chi=n_chi, kind="wishart")
    if keep is not None:
        like = dataclasses.replace(like, keep=keep)
    return like


def test_wishart_is_scipys_wishart_per_ell_bin(setup):
    """Each ℓ bin's kept block, against ``scipy.stats.wishart`` of ν Ĉ_b with scale M_b (plus
    the Jacobian (p(p+1)/2) ln ν to the data's entries), for random positive-definite M and Ĉ,
    with bin 1 cut from the two highest ℓ bins (a 1 × 1 block there). Both sides are float64
    sums of ~10 terms of size ~10³: 1e-9 relative is round-off, and a wrong ν, a missing
    Jacobian or a mishandled cut block is off by O(1)."""
    from estimators.cl_baseline import data_vector_layout, wishart_log_prob

    keep = np.ones(K, bool)
    i, j, b = data_vector_layout(N_BINS, N_ELL)
    keep[(j == 1) & (b >= N_ELL - 2)] = False
    like = _wishart_like(setup, EDGES, keep)
    rng = np.random.default_rng(5)
    mean, data, expected = np.zeros(K), np.zeros(K), 0.0
    for e in range(N_ELL):
        p = 1 if e >= N_ELL - 2 else 2
        nu = int(like.n_modes[e])
        a = rng.normal(size=(p, p))
        m = (a @ a.T + p * np.eye(p)) * 1e-9
        chat = stats.wishart.rvs(df=nu, scale=m, random_state=rng) / nu
        m, chat = np.atleast_2d(m), np.atleast_2d(chat)
        expected += (stats.wishart.logpdf(nu * chat, df=nu, scale=m)
                     + 0.5 * p * (p + 1) * np.log(nu))
        for r in range(p):
            for c in range(r, p):
                idx = np.flatnonzero((i == r) & (j == c) & (b == e))[0]
                mean[idx], data[idx] = m[r, c], chat[r, c]
    got = float(wishart_log_prob(like.wishart, like._kept(mean), like._kept(data)))
    assert got == pytest.approx(expected, rel=1e-9)
    assert float(like._kept_distribution(like._kept(mean)).log_prob(like._kept(data))) == got


def test_wishart_with_one_ring_per_bin_is_the_exact_likelihood(setup):
    """With ℓ bins that each hold exactly one distinct |ℓ| of the FFT grid (every ring of an 8²
    map but its corner, a single self-conjugate mode: one real vector for two bins, which the
    Wishart refuses), the band powers are the exact likelihood's sufficient statistics and the
    Wishart likelihood is ``explicit.exact``'s ln L, cut at the same ℓ, up to a θ-independent
    constant (the ℓ = 0 mode's noise and the normalisations). Differences between cosmologies
    agree to float64 round-off of the ~10³-size sums (1e-7 absolute); the fixed-covariance
    Gaussian misses them by a tenth of a nat, 10⁶ times that."""
    from explicit.exact import mode_groups, theta_loglike

    model, sigma = setup
    small = GaussianLensing(FlatSky(FIELD, 8), model.bins, n_chi=N_CHI)
    ell, _, count = mode_groups(FIELD, 8)
    assert count[-1] == 1 and np.all(count[1:-1] >= 2)
    edges = 0.5 * (ell[:-1] + ell[1:])  # one ring per bin, ℓ = 0 and the corner outside
    like, _ = cl_likelihood_for_model(small, PRIOR, edges, n_cov=None, n_chi=N_CHI, kind="wishart",
                                      sigma_n=sigma)
    obs = simulate_maps(small, FID, 11).kappa_noisy
    data = cl_data_vector(obs, FIELD, edges)
    cut = (np.zeros(N_BINS), np.full(N_BINS, edges[-1]))
    exact = theta_loglike(small, obs, sigma, PRIOR.names, base=FID, scales=cut)
    thetas = [TRUTH, np.array([0.22, 0.9]), np.array([0.35, 0.7])]
    ours = [float(like.log_likelihood(jnp.asarray(t), data)) for t in thetas]
    ref = [float(exact(jnp.asarray(t))) for t in thetas]
    np.testing.assert_allclose(np.diff(ours), np.diff(ref), rtol=0, atol=1e-7)
    gauss = dataclasses.replace(like, kind="gaussian")
    g = [float(gauss.log_likelihood(jnp.asarray(t), data)) for t in thetas]
    assert np.max(np.abs(np.diff(g) - np.diff(ref))) > 1e-2  # 0.04 and 0.11 nats here


def test_wishart_refuses_what_it_cannot_model(setup, cov):
    """No simulated covariance; no ℓ bin with fewer modes than bins; no partial block."""
    from estimators.cl_baseline import _wishart_blocks

    model, sigma = setup
    with pytest.raises(ValueError, match="Wishart likelihood is that of Gaussian maps"):
        ClLikelihood(bins=model.bins, field_deg=FIELD, npix=NPIX, ell_edges=EDGES, sigma_n=sigma,
                     cov=cov.cov, n_cov=cov.n_sims, prior=PRIOR, base=FID, kind="wishart")
    like = _wishart_like(setup, EDGES)
    keep = np.ones(K, bool)
    keep[N_ELL + 2] = False  # the cross spectrum of ℓ bin 2 alone
    with pytest.raises(ValueError, match="ell bin 2 keeps 2 of the 3 pairs"):
        dataclasses.replace(like, keep=keep)
    with pytest.raises(ValueError, match="holds 1 Fourier modes for 2 tomographic bins"):
        _wishart_blocks(N_BINS, 1, np.arange(3), np.array([1]))


def test_wishart_posterior_recovers_the_truth(setup, sims):
    """NUTS on the Wishart likelihood of the observation used for the Gaussian one: gradients
    are finite and the chain's mean is within 3 σ of the truth (as the Gaussian's test)."""
    like = _wishart_like(setup, EDGES)
    theta, info = sample_cl_posterior(like, sims[1], num_warmup=100, num_samples=150,
                                      max_tree_depth=6, seed=0, progress=False)
    z = (theta.mean(0) - TRUTH) / theta.std(0)
    assert np.all(np.abs(z) < 3), z
    assert info["divergences"] == 0 and info["kind"] == "wishart"


def test_wishart_draws_have_its_mean_and_variance(setup):
    """4000 draws of the distribution at the truth: mean M_b and variance (M_aa M_bb + M_ab²)/ν
    per entry (the Wishart's moments). Monte Carlo error of a mean: σ/√4000 (held to 5 of them);
    of a variance ~√(2/4000) = 2.2 % for the near-Gaussian many-mode bins (held to 12 %)."""
    from estimators.cl_baseline import data_vector_layout

    like = _wishart_like(setup, EDGES)
    mean = like.mean(jnp.asarray(TRUTH))
    draws = np.asarray(like.distribution(mean).sample(jax.random.key(0), (4000,)))
    i, j, b = data_vector_layout(N_BINS, N_ELL)
    m = np.asarray(mean)
    at = {(r, c, e): m[k] for k, (r, c, e) in enumerate(zip(i, j, b))}
    var = np.array([(at[r, r, e] * at[c, c, e] + at[r, c, e] ** 2) / like.n_modes[e]
                    for r, c, e in zip(i, j, b)])
    assert np.all(np.abs(draws.mean(0) - m) < 5 * np.sqrt(var / 4000))
    np.testing.assert_allclose(draws.var(0) / var, 1, atol=0.12)
    assert np.all(np.isfinite(np.asarray(like.distribution(mean).log_prob(draws[:10]))))


# ---- the grid posterior and its calibration -----------------------------------------------------

def _narrow_prior():
    """Ω_c, σ_8 ~ N(fiducial, 0.03): the posteriors of this setup are ~0.02 wide, so a 96²
    grid over the prior's ±5σ holds ~6 cells per posterior σ (no local grids needed)."""
    from experiments.priors import ParamPrior, Prior

    return Prior((ParamPrior("Omega_c", "normal", loc=FID.Omega_c, scale=0.03),
                  ParamPrior("sigma8", "normal", loc=FID.sigma8, scale=0.03)))


@pytest.fixture(scope="module")
def grid(setup):
    from estimators.cl_baseline import ClGridPosterior

    like = dataclasses.replace(_wishart_like(setup, EDGES), prior=_narrow_prior())
    return ClGridPosterior(like, n_grid=96)


def test_tabulated_posterior_moments_and_refusals():
    """A correlated 2-D Gaussian ln L tabulated at 12 cells per σ: the midpoint rule's mean is
    exact up to round-off and its variance high by h²/12 relative to σ² (1/1728 here); held to
    1e-3 of σ. NaN inside the prior support and tables of the wrong shape are refused."""
    from explicit.exact import tabulated_posterior

    mu, sd, rho = np.array([0.3, 0.8]), np.array([0.05, 0.02]), -0.6
    cov = np.array([[sd[0] ** 2, rho * sd[0] * sd[1]], [rho * sd[0] * sd[1], sd[1] ** 2]])
    axes = [m + s * (np.arange(120) + 0.5 - 60) / 12 for m, s in zip(mu, sd)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), -1) - mu
    ll = -0.5 * np.einsum("...i,ij,...j->...", g, np.linalg.inv(cov), g)
    post = tabulated_posterior(("a", "b"), axes, ll, np.zeros_like(ll))
    np.testing.assert_allclose(post.mean, mu, atol=1e-3 * sd.min())
    np.testing.assert_allclose(post.cov, cov, atol=1e-3 * sd.min() ** 2 * 3)
    assert post.diagnostics["cells_per_std"] == pytest.approx(12, rel=1e-2)
    x = post.sample(0, 20000)
    np.testing.assert_allclose(x.std(0), sd, rtol=0.02)  # 20000 draws: √(1/40000) = 0.5 % each
    bad = ll.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="not finite inside the prior support"):
        tabulated_posterior(("a", "b"), axes, bad, np.zeros_like(ll))
    with pytest.raises(ValueError, match="tables of shape"):
        tabulated_posterior(("a", "b"), axes, ll[:-1], np.zeros_like(ll))


def test_grid_posterior_is_the_likelihood_on_its_nodes(setup, grid):
    """The grid's ln L at its nodes is ``log_likelihood``'s, to round-off (the same function,
    batched), and its posterior peaks near the truth for the observation of the other tests."""
    model, sigma = setup
    data = simulate_maps(model, FID, 150).kappa_noisy
    x = cl_data_vector(data, FIELD, EDGES)
    ll = grid.log_likelihood(x).reshape(-1)
    for k in (0, 1000, 4656, 9215):
        direct = float(grid.like.log_likelihood(jnp.asarray(grid.nodes[k]), x))
        assert ll[k] == pytest.approx(direct, rel=1e-12, abs=1e-9)
    post = grid.posterior(x)
    assert np.all(np.abs((post.mean - TRUTH) / post.std) < 3)
    assert post.diagnostics["cells_per_std"] >= 4


def test_grid_posterior_is_calibrated_on_its_own_model_and_not_on_another(grid):
    """SBC and TARP (``estimators.calibration.calibrate``) of the grid posterior on 300 data
    vectors drawn from the Wishart likelihood itself at θ from the prior: its model is then
    exact, so ranks are uniform (KS p > 0.01 for both parameters; three seeded draws of this
    size gave p = 0.13-0.71) and |ATC| small. Data drawn with 20 % more shape-noise power than the likelihood assumes
    (a misspecified model) must fail: the posterior is then off by several σ in σ_8 for most
    draws and the KS p-value of σ_8's ranks is < 1e-3."""
    from estimators.calibration import calibrate

    like = grid.like
    prior = like.prior
    thetas = np.asarray(prior.sample(jax.random.key(5), 300))
    keys = jax.random.split(jax.random.key(6), len(thetas))
    means = np.stack([np.asarray(like.mean(jnp.asarray(t))) for t in thetas])
    noise = np.asarray(like.noise_vector)

    def draws(extra_noise):
        out = []
        for k, m in zip(keys, means):
            kept = like.distribution(jnp.asarray(m + extra_noise * noise)).sample(k)
            full = np.array(m)
            full[like.selected] = np.asarray(kept)
            out.append(full)
        return np.stack(out)

    good = calibrate(grid, thetas, draws(0.0), n_posterior_samples=100, seed=0)
    assert min(good["sbc"]["ks_pvals"].values()) > 0.01, good["sbc"]["ks_pvals"]
    assert abs(good["tarp"]["atc"]) < 0.1
    bad = calibrate(grid, thetas, draws(0.2), n_posterior_samples=100, seed=0)
    assert bad["sbc"]["ks_pvals"]["theta_1"] < 1e-3, bad["sbc"]["ks_pvals"]


def test_grid_posterior_zooms_into_posteriors_narrower_than_its_cells(grid):
    """An 8² grid over the same prior's ±5σ (cells of 0.0375, about two posterior σ) tabulates
    the posterior again on a local grid around it: its moments then equal the 96² grid's to
    within their resolution (1 % of σ in the mean, 2 % in σ)."""
    from estimators.cl_baseline import ClGridPosterior

    coarse = ClGridPosterior(grid.like, n_grid=8)
    x = grid.like.mean(jnp.asarray(TRUTH))  # the noise-free expectation as data
    fine, zoomed = grid.posterior(x), coarse.posterior(x)
    assert coarse.n_local == 1 and zoomed.diagnostics["cells_per_std"] >= 5
    np.testing.assert_allclose(zoomed.mean, fine.mean, atol=0.01 * fine.std.min())
    np.testing.assert_allclose(zoomed.std, fine.std, rtol=0.02)
