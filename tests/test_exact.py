"""The exact Gaussian-field posterior (``explicit/exact.py``) and ``GaussianLensing.n_chi``.

  - likelihood: on tiny maps (2 bins 8², 3 bins 7²; n_chi = 32) against the dense
    pixel-space Gaussian whose signal covariance is A Aᵀ, A = ∂κ/∂(white noise) of the simulator
    itself (``model.kappa``, pushed unit vectors via jacfwd), and against scipy's
    multivariate_normal for a likelihood difference;
  - grid machinery: an analytic bivariate normal (ρ = -0.95), untruncated and cut by a prior edge
    (exact moments and evidence known);
  - end to end: one simulated 10° / 32² two-bin map, posterior over (Omega_c, sigma8) with the
    LSST-Y10 prior.
"""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments.priors import lsst_y10
from explicit.exact import (
    GridPosterior,
    gaussian_field_loglike,
    grid_posterior,
    grid_posterior_from_loglike,
    mode_groups,
    theta_loglike,
)
from simulators import Cosmology, flatsky
from simulators.lensing import GaussianLensing, LognormalLensing, noise_sigma
from simulators.lightcone import FlatSky
from simulators.sources import RedshiftBins

FID = Cosmology.fiducial()
N_CHI = 32  # the likelihood is exact for the model's own n_chi; 32 keeps the tests cheap
COSMOS = (FID, dataclasses.replace(FID, Omega_c=0.2, sigma8=0.6),
          dataclasses.replace(FID, Omega_c=0.33, sigma8=0.95, h=0.72))


@jax.jit(static_argnums=0)
def _jac_and_loglike(model, cosmo, data, sigma):
    """(A (n, n): the simulator's white noise → κ Jacobian, our ln L): one compilation per model."""
    z0 = jnp.zeros(model.latent_shape)
    a = jax.jacfwd(model.kappa, argnums=1)(cosmo, z0).reshape(z0.size, z0.size)
    return a, gaussian_field_loglike(model, cosmo, data, sigma)


def _dense_cov(model, cosmo, sigma, data):
    """(pixel covariance A Aᵀ + diag σ², our ln L of data)."""
    a, ll = _jac_and_loglike(model, cosmo, data, sigma)
    a = np.asarray(a)
    return a @ a.T + np.diag(np.repeat(np.asarray(sigma) ** 2, model.sky.npix**2)), float(ll)


@pytest.fixture(scope="module", params=[(2, 8), (3, 7)], ids=["2x8", "3x7"])
def tiny(request):
    """(model, sigma (n_bins,), data): κ at the fiducial + noise + a constant per bin (so that the
    ℓ = 0 mode, pure noise in the model, is exercised away from its mean)."""
    n_bins, npix = request.param
    bins = RedshiftBins.lsst_y10(n_bins=n_bins)
    sky = FlatSky(6.0, npix)
    model = GaussianLensing(sky, bins, n_chi=N_CHI)
    sigma = noise_sigma(bins, sky) * np.linspace(1.0, 1.5, n_bins)  # unequal noise per bin
    rng = np.random.default_rng(npix)
    a, _ = _jac_and_loglike(model, FID, np.zeros(model.latent_shape), sigma)
    kappa = (np.asarray(a) @ rng.normal(size=a.shape[1])).reshape(model.latent_shape)  # linear in z
    data = kappa + rng.normal(size=kappa.shape) * sigma[:, None, None] + 0.3 * sigma[:, None, None]
    return model, sigma, data


def test_fourier_loglike_equals_dense_pixel_loglike(tiny):
    model, sigma, data = tiny
    x = data.reshape(-1)
    npix2 = model.sky.npix**2
    for cosmo in COSMOS:
        cov, got = _dense_cov(model, cosmo, sigma, data)
        # the test means something: bins are correlated, and signal dominates the noise
        assert np.abs(cov[:npix2, npix2:2 * npix2]).max() > 0.3 * np.abs(cov[:npix2, :npix2]).max()
        assert np.trace(cov) > 2 * npix2 * np.sum(sigma**2)  # signal variance > noise variance
        _, logdet = np.linalg.slogdet(cov)
        ref = -0.5 * (x @ np.linalg.solve(cov, x) + logdet + x.size * math.log(2 * math.pi))
        assert abs(got - ref) < 1e-9 * abs(ref), (got, ref)


def test_loglike_difference_matches_scipy(tiny):
    model, sigma, data = tiny
    x = data.reshape(-1)
    (cov1, ll1), (cov2, ll2) = (_dense_cov(model, c, sigma, data) for c in COSMOS[:2])
    mvn = stats.multivariate_normal
    ref = mvn(cov=cov2).logpdf(x) - mvn(cov=cov1).logpdf(x)
    assert abs(ref) > 1.0  # a real difference
    assert abs((ll2 - ll1) - ref) < 1e-8 * abs(ref) + 1e-9, (ll2 - ll1, ref)


def test_loglike_jit_vmap(tiny):
    """theta_loglike under jit(vmap) equals gaussian_field_loglike point by point. (Its gradient
    in θ matches finite differences to 1e-5, but compiling it costs ~15 s, too slow to test here;
    limber_cl's gradient is tested in test_flatsky.)"""
    model, sigma, data = tiny
    if model.sky.npix != 8:
        pytest.skip("one geometry is enough")
    fn = theta_loglike(model, data, sigma, ["Omega_c", "sigma8"], FID)
    thetas = jnp.asarray([[0.25, 0.8], [0.3, 0.7], [0.21, 0.93]])
    values = np.asarray(jax.jit(jax.vmap(fn))(thetas))
    for t, v in zip(thetas, values):
        cosmo = dataclasses.replace(FID, Omega_c=float(t[0]), sigma8=float(t[1]))
        assert abs(v - _dense_cov(model, cosmo, sigma, data)[1]) < 1e-12 * abs(v)
    assert np.ptp(values) > 1.0


def test_mode_groups_cover_the_plane():
    for npix in (7, 8, 32):
        ell, index, count = mode_groups(10.0, npix)
        assert ell[0] == 0 and np.all(np.diff(ell) > 0) and count.sum() == npix**2
        np.testing.assert_allclose(ell[index], flatsky.mode_ell(10.0, npix).reshape(-1), rtol=1e-14)
    assert len(mode_groups(10.0, 32)[0]) == 135


def test_loglike_rejects_bad_input(tiny):
    model, sigma, data = tiny
    with pytest.raises(ValueError, match="GaussianLensing"):
        gaussian_field_loglike(LognormalLensing(model.sky, model.bins), FID, data, sigma)
    with pytest.raises(ValueError, match="shape"):
        gaussian_field_loglike(model, FID, data[:, :-1], sigma)
    with pytest.raises(ValueError, match="sigma_n"):
        gaussian_field_loglike(model, FID, data, 0.0)
    with pytest.raises(ValueError, match="sigma_n"):
        gaussian_field_loglike(model, FID, data, np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_field_loglike(model, FID, np.full_like(data, np.nan), sigma)
    with pytest.raises(ValueError, match="Cosmology fields"):
        theta_loglike(model, data, sigma, ["Omega_k"], FID)


def test_n_chi_field(monkeypatch):
    """GaussianLensing / LognormalLensing hand their n_chi (default 256 = limber_cl's default, so
    the default maps are unchanged) to every limber_cl call; bad values are refused."""
    bins = RedshiftBins.lsst_y10(n_bins=2)
    sky = FlatSky(5.0, 4)
    seen = []

    def fake_limber(cosmo, bins_, ell, n_chi=256, nonlinear=True, power_filter=None):
        seen.append(n_chi)  # a cheap positive-definite stand-in: the plumbing is under test
        a = 1e-9 / (1.0 + jnp.asarray(ell) / 100.0)
        return jnp.stack([a, 0.5 * a, a])

    assert inspect.signature(flatsky.limber_cl).parameters["n_chi"].default == 256
    monkeypatch.setattr(flatsky, "limber_cl", fake_limber)
    latent = jnp.ones((2, 4, 4))
    for cls in (GaussianLensing, LognormalLensing):
        default = cls(sky, bins)
        assert default.n_chi == 256
        cheap = cls(sky, bins, n_chi=np.int64(32))
        assert type(cheap.n_chi) is int
        seen.clear()
        if cls is GaussianLensing:
            default.kappa(FID, latent), cheap.kappa(FID, latent)
        else:  # kappa's only C_ℓ
            default.gaussian_spectra(FID), cheap.gaussian_spectra(FID)
        assert seen == [256, 32], (cls, seen)
    for bad in (8, 15, 64.0, True, "64", None):
        with pytest.raises(ValueError, match="n_chi"):
            GaussianLensing(sky, bins, n_chi=bad)


# ------------------------------------------------------------------------------------------------
# Grid machinery on an analytic posterior

MU, SIG, RHO = np.array([0.3, 0.8]), np.array([0.05, 0.07]), -0.95
COV = np.array([[SIG[0] ** 2, RHO * SIG[0] * SIG[1]], [RHO * SIG[0] * SIG[1], SIG[1] ** 2]])


def _gauss_loglike(theta):
    r = theta - MU
    return -0.5 * r @ jnp.asarray(np.linalg.inv(COV)) @ r


def _check_samples(post: GridPosterior, n=10_000):
    s = post.sample(1, n)
    assert s.shape == (n, 2)
    # continuous (jittered within cells), and every draw lies in a cell of positive density
    assert len(np.unique(s[:, 0])) == n and len(np.unique(s[:, 1])) == n
    lows = np.array([ax[0] for ax in post.axes]) - post.widths / 2
    cell = np.floor((s - lows) / post.widths).astype(int)
    assert np.all(post.density[cell[:, 0], cell[:, 1]] > 0)
    # sample moments reproduce the grid's within 4 MC standard errors (jitter adds h²/12)
    se_mean = post.std / math.sqrt(n)
    assert np.all(np.abs(s.mean(0) - post.mean) < 4 * se_mean), (s.mean(0), post.mean)
    var = np.diag(post.cov) + post.widths**2 / 12
    assert np.all(np.abs(s.var(0) / var - 1) < 4 * math.sqrt(2 / n)), (s.var(0), var)
    corr_s, corr_g = np.corrcoef(s.T)[0, 1], post.cov[0, 1] / np.prod(post.std)
    assert abs(corr_s - corr_g) < 4 * (1 - corr_g**2) / math.sqrt(n)
    return s


def test_grid_reproduces_bivariate_normal():
    post = grid_posterior_from_loglike(_gauss_loglike, ["a", "b"], None, None, MU + 2 * SIG)
    assert isinstance(post, GridPosterior) and post.density.ndim == 2
    np.testing.assert_allclose(post.mean, MU, rtol=0, atol=1e-6 * SIG.min())
    np.testing.assert_allclose(post.cov, COV, rtol=1e-6)
    # evidence of an unnormalised Gaussian with a flat prior: 2π sqrt(det Σ)
    assert abs(post.log_evidence - math.log(2 * math.pi * math.sqrt(np.linalg.det(COV)))) < 1e-6
    assert abs(post.density.sum() * post.cell_volume - 1) < 1e-12
    for i in range(2):
        ax, m = post.marginal(i)
        assert abs(np.trapezoid(m, ax) - 1) < 1e-6
        ref = stats.norm(MU[i], SIG[i]).pdf(ax)
        assert np.max(np.abs(m - ref)) < 1e-4 * ref.max()
    d = post.diagnostics
    assert d["edge_drop"] < -15 and d["interp_error"] < 1e-8 and d["quadrature_error"] < 1e-4
    assert d["jitter_tv"] < 0.05
    _check_samples(post)
    assert 0.0 <= post.hpd_level(MU) < 0.01 and post.hpd_level(MU + 10 * SIG) == 1.0


def test_grid_one_parameter():
    post = grid_posterior_from_loglike(lambda t: -0.5 * ((t[0] - 0.8) / 0.05) ** 2, ["sigma8"],
                                       theta0=[0.7])
    assert post.density.shape == (255 * 8,)
    assert abs(post.mean[0] - 0.8) < 1e-8 and abs(post.std[0] - 0.05) < 1e-8
    s = post.sample(0, 10_000)
    assert s.shape == (10_000, 1) and len(np.unique(s)) == 10_000
    assert abs(s.mean() - 0.8) < 4 * 0.05 / 100 and abs(s.std() / 0.05 - 1) < 4 / math.sqrt(2e4)


def test_grid_resolves_a_prior_edge():
    """The half-plane prior a >= μ_a cuts the mode: a truncated bivariate normal with known
    moments (a - μ_a is half-normal), resolved at the fine-cell scale and sampled inside."""
    def log_prior(theta):
        return jnp.where(theta[0] >= MU[0], 0.0, -jnp.inf)

    post = grid_posterior_from_loglike(_gauss_loglike, ["a", "b"], log_prior, None,
                                       MU + np.array([1.0, -1.0]) * SIG)
    c = math.sqrt(2 / math.pi)
    mean = MU + np.array([SIG[0] * c, RHO * SIG[1] * c])
    cov = np.array([[SIG[0] ** 2 * (1 - c**2), RHO * SIG[0] * SIG[1] * (1 - c**2)],
                    [RHO * SIG[0] * SIG[1] * (1 - c**2), SIG[1] ** 2 * (1 - RHO**2 * c**2)]])
    assert np.all(np.abs(post.mean - mean) < 2e-3 * np.sqrt(np.diag(cov))), (post.mean, mean)
    np.testing.assert_allclose(post.cov, cov, rtol=5e-3)
    assert abs(post.log_evidence - math.log(math.pi * math.sqrt(np.linalg.det(COV)))) < 2e-3
    s = _check_samples(post)
    assert np.all(s[:, 0] >= MU[0])  # jitter in cells cut by the edge stays inside the support


def test_grid_finds_mass_next_to_where_the_likelihood_ends():
    """A weak likelihood (σ ~ 1, far wider than the prior), undefined below 0 like Omega_c: the
    first box (peak ± 8σ) puts at most one coarse node in [0, 1], left of the first finite node
    the posterior still has most of its mass. The box must reach down to 0 (it used to stop at the
    first finite node: moments 4σ off). Reference: a brute-force midpoint sum on [0, 3]²."""
    mu, sig, rho = np.array([0.35, 0.8]), np.array([1.2, 1.4]), -0.9
    icov = np.linalg.inv(np.array([[sig[0] ** 2, rho * sig.prod()], [rho * sig.prod(), sig[1] ** 2]]))
    p_loc, p_scale = np.array([0.27, 0.83]), np.array([0.2, 0.14])

    def loglike(theta):
        r = theta - mu
        return jnp.where(jnp.all(theta >= 0), -0.5 * r @ jnp.asarray(icov) @ r, jnp.nan)

    def log_prior(theta):
        return jnp.where(jnp.all(theta >= 0), -0.5 * jnp.sum(((theta - p_loc) / p_scale) ** 2),
                         -jnp.inf)

    post = grid_posterior_from_loglike(loglike, ["a", "b"], log_prior, theta0=[0.3, 0.8],
                                       n_grid=32, n_coarse=16)
    h = 3.0 / 3000
    x = (np.arange(3000) + 0.5) * h
    g = np.stack(np.meshgrid(x, x, indexing="ij"), -1)
    r = g - mu
    logp = (-0.5 * np.einsum("...i,ij,...j", r, icov, r)
            - 0.5 * np.sum(((g - p_loc) / p_scale) ** 2, -1))
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean = np.einsum("ij,ijk->k", w, g)
    std = np.sqrt(np.einsum("ij,ijk->k", w, (g - mean) ** 2))
    # midpoint sums on both sides: errors ~ h² and far below these 1 % of σ
    np.testing.assert_allclose(post.mean, mean, atol=0.01 * std.min())
    np.testing.assert_allclose(post.std, std, rtol=0.01)
    assert post.diagnostics["edge_drop"] < -15  # the sides at a = 0, b = 0 are support edges


# ------------------------------------------------------------------------------------------------
# End to end on simulated maps

FIELD, NPIX = 10.0, 32
TRUTH = np.array([FID.Omega_c, FID.sigma8])
PRIOR = lsst_y10().select(["Omega_c", "sigma8"])


@pytest.fixture(scope="module")
def setup32():
    bins = RedshiftBins.lsst_y10(n_bins=2)
    return GaussianLensing(FlatSky(FIELD, NPIX), bins, n_chi=N_CHI)


@pytest.fixture(scope="module")
def map_posterior(setup32):
    """(data (2, 32, 32): κ at FID + noise, the grid posterior over (Omega_c, sigma8))."""
    model = setup32
    sigma = noise_sigma(model.bins, model.sky)
    latent = model.latent(3)
    noise = np.random.default_rng(3).normal(size=latent.shape) * sigma[:, None, None]
    data = np.asarray(jax.jit(model.kappa)(FID, latent)) + noise
    post = grid_posterior(model, data, sigma, ["Omega_c", "sigma8"], PRIOR.log_prob, FID,
                          n_grid=32, n_coarse=16)
    return data, post


def test_grid_posterior_contains_truth(map_posterior):
    _, post = map_posterior
    assert post.names == ("Omega_c", "sigma8")
    assert abs(post.density.sum() * post.cell_volume - 1) < 1e-12
    for i in range(2):
        ax, m = post.marginal(i)
        assert abs(np.trapezoid(m, ax) - 1) < 1e-3
    # informative: much narrower than the prior (0.2, 0.14), and the Omega_c-sigma8 degeneracy
    assert post.std[0] < 0.1 and post.std[1] < 0.1
    assert post.cov[0, 1] / np.prod(post.std) < -0.8
    # the truth: inside the 99 % highest-density region and within 3σ on each axis
    assert post.hpd_level(TRUTH) < 0.99
    assert np.all(np.abs(post.mean - TRUTH) < 3 * post.std), (post.mean, post.std)
    d = post.diagnostics
    assert d["edge_drop"] < -15 and d["interp_error"] < 1e-2 and d["quadrature_error"] < 1e-3


def test_grid_density_follows_exact_posterior(map_posterior):
    """Density ratios between posterior-drawn cells equal exact exp(Δ(ln L + ln π)), and samples
    reproduce the grid moments and stay in the prior support."""
    _, post = map_posterior
    s = _check_samples(post)
    assert np.all(np.isfinite(np.asarray(jax.vmap(PRIOR.log_prob)(jnp.asarray(s)))))
    cells = np.random.default_rng(2).choice(post.density.size, 6, p=post.density.reshape(-1)
                                            / post.density.sum())
    idx = np.unravel_index(cells, post.density.shape)
    theta = np.stack([ax[k] for ax, k in zip(post.axes, idx)], -1)
    ll, lp = post.evaluate(theta)  # theta_loglike, checked against the dense likelihood above
    np.testing.assert_allclose(lp, np.asarray(jax.vmap(PRIOR.log_prob)(jnp.asarray(theta))))
    exact = ll + lp
    grid = np.log(post.density[idx])
    np.testing.assert_allclose(grid - grid[0], exact - exact[0], atol=1e-2)
