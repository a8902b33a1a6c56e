"""Scale cuts ([scales] with cut = true): every method sees the same multipoles.

The harmonic mask and its projection (``flatsky.scale_mask`` / ``apply_scale_mask``), the exact
Gaussian-field likelihood and the field-level likelihood restricted to the kept Fourier modes
(checked against a direct sum over those modes), the C_ℓ likelihood on the kept ℓ bins, and the
compressor, which cannot see the removed modes."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.config import ConfigError, load_config, load_config_text
from simulators import Cosmology, flatsky
from simulators.lensing import GaussianLensing, noise_sigma
from simulators.lightcone import FlatSky
from simulators.sources import RedshiftBins

FIELD, NPIX = 5.0, 16
BINS = RedshiftBins.lsst_y10(n_bins=2)
SCALES = ((0.0, 100.0), (300.0, 500.0))  # bin 1: ℓ in [0, 300]; bin 2: [100, 500]


def test_mask_is_an_orthogonal_projector_on_the_kept_modes():
    mask = flatsky.scale_mask(FIELD, NPIX, *SCALES)
    ell = flatsky.mode_ell(FIELD, NPIX)
    np.testing.assert_array_equal(mask[0], ell <= 300.0)
    np.testing.assert_array_equal(mask[1], (ell >= 100.0) & (ell <= 500.0))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 2, NPIX, NPIX))
    px = np.asarray(flatsky.apply_scale_mask(x, mask))
    np.testing.assert_allclose(np.asarray(flatsky.apply_scale_mask(px, mask)), px, atol=1e-12)
    # self-adjoint: <P x, y> = <x, P y>, and the kept modes are untouched, the others gone
    py = np.asarray(flatsky.apply_scale_mask(y, mask))
    assert abs(np.sum(px * y) - np.sum(x * py)) < 1e-10 * np.sum(np.abs(x * y))
    fx, fpx = np.fft.fft2(x), np.fft.fft2(px)
    np.testing.assert_allclose(fpx[mask], fx[mask], atol=1e-10)
    assert np.max(np.abs(fpx[~mask])) < 1e-10


def _model():
    return GaussianLensing(FlatSky(FIELD, NPIX), BINS, 64)


def _kept_mode_loglike(model, cosmo, data, sigma, scales):
    """Direct sum over the FFT modes: each bin's kept modes, a Gaussian vector per mode with
    covariance C(|ℓ|)/A_pix + σ² restricted to the bins that keep it (unitary FFT)."""
    import jax.numpy as jnp

    ell = flatsky.mode_ell(FIELD, NPIX).reshape(-1)
    lo, hi = (np.asarray(v) for v in scales)
    keep = (ell[:, None] >= lo) & (ell[:, None] <= hi)  # (modes, bins)
    cl = np.asarray(flatsky.limber_cl(cosmo, BINS, jnp.asarray(np.maximum(ell, 1.0)), n_chi=64))
    i, j = flatsky.pair_indices(2)
    d = np.fft.fft2(data).reshape(2, -1) / NPIX
    area = flatsky.pixel_area_sr(FIELD, NPIX)
    total = 0.0
    for k in range(ell.size):
        c = np.zeros((2, 2))
        if ell[k] > 0:
            c[i, j] = c[j, i] = cl[:, k]
        m = c / area + np.diag(np.asarray(sigma) ** 2)
        b = np.flatnonzero(keep[k])
        if b.size == 0:
            continue
        ms, ds = m[np.ix_(b, b)], d[b, k]
        # -1/2 [d^H M^-1 d + ln det M] per mode (the ± pair together make a complex Gaussian)
        total += -0.5 * (np.real(np.conj(ds) @ np.linalg.solve(ms, ds)) + np.log(np.linalg.det(ms)))
    return total


def test_exact_likelihood_uses_only_the_kept_modes():
    """Differences between two cosmologies (the constant drops out) agree with the direct sum to
    1e-9 relative (float64 FFTs and solves of a few hundred modes)."""
    from explicit.exact import gaussian_field_loglike

    model = _model()
    sigma = noise_sigma(BINS, model.sky)
    a = Cosmology.fiducial()
    b = dataclasses.replace(a, Omega_c=0.3, sigma8=0.78)
    data = np.asarray(model.kappa(a, model.latent(3))) + np.random.default_rng(1).normal(
        size=(2, NPIX, NPIX)) * sigma[:, None, None]
    got = float(gaussian_field_loglike(model, a, data, sigma, SCALES)
                - gaussian_field_loglike(model, b, data, sigma, SCALES))
    want = (_kept_mode_loglike(model, a, data, sigma, SCALES)
            - _kept_mode_loglike(model, b, data, sigma, SCALES))
    assert got == pytest.approx(want, rel=1e-9)
    full = float(gaussian_field_loglike(model, a, data, sigma) - gaussian_field_loglike(model, b, data, sigma))
    assert abs(full - got) > 1e-3 * abs(got)  # the cut changes the likelihood


def test_field_level_likelihood_is_that_of_the_kept_modes():
    """The field model's log density at two latent fields differs by the χ² of the kept Fourier
    modes of the residuals (white noise: each kept real degree of freedom has variance σ²)."""
    import jax
    import numpyro.distributions as dist
    from numpyro.infer.util import log_density

    from explicit.model import field_model

    model = _model()
    sigma = noise_sigma(BINS, model.sky)
    cosmo = Cosmology.fiducial()
    data = np.random.default_rng(2).normal(size=(2, NPIX, NPIX)) * 0.02
    fm = field_model(model, {"Omega_c": dist.Uniform(0.1, 0.5)}, cosmo, data, sigma, scales=SCALES)
    z1, z2 = (np.asarray(model.latent(s)) for s in (4, 5))

    def logp(z):
        return float(log_density(fm, (), {}, {"Omega_c": cosmo.Omega_c, "z": z})[0])

    mask = flatsky.scale_mask(FIELD, NPIX, *SCALES)

    def chi2(z):
        r = np.fft.fft2(data - np.asarray(model.kappa(cosmo, z))) / NPIX  # unitary
        return sum(np.sum(np.abs(r[b][mask[b]]) ** 2) / sigma[b] ** 2 for b in range(2))

    prior = lambda z: -0.5 * np.sum(z**2)  # noqa: E731  (the latent's unit normal)
    got = logp(z1) - logp(z2)
    want = -0.5 * (chi2(z1) - chi2(z2)) + prior(z1) - prior(z2)
    assert got == pytest.approx(want, rel=1e-8)
    with pytest.raises(ValueError, match="keep no Fourier mode"):
        field_model(model, {"Omega_c": dist.Uniform(0.1, 0.5)}, cosmo, data, sigma,
                    scales=((5000.0, 5000.0), (6000.0, 6000.0)))
    del jax


def test_cl_keep_and_likelihood_on_the_kept_bins():
    from estimators.cl_baseline import ClLikelihood, scale_cut_keep
    from experiments.priors import lsst_y10

    edges = np.array([72.0, 150.0, 300.0, 600.0, 1000.0])
    keep = scale_cut_keep(2, edges, SCALES).reshape(3, 4)
    # pair (1,1): [0, 300] -> bins 1-2; (1,2): [100, 300] -> bin 2; (2,2): [100, 500] -> bin 2
    np.testing.assert_array_equal(keep, [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    prior = lsst_y10().select(["Omega_c", "sigma8"])
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 12))
    cov = (a @ a.T + 12 * np.eye(12)) * 1e-18
    kw = dict(bins=BINS, field_deg=FIELD, npix=NPIX, ell_edges=edges, sigma_n=np.array([0.1, 0.1]),
              cov=cov, n_cov=None, prior=prior, base=Cosmology.fiducial(), n_chi=32)
    cut = ClLikelihood(**kw, keep=keep.reshape(-1))
    assert cut.n_data == 4
    theta = np.array([0.27, 0.8])
    data = np.asarray(cut.mean(np.array([0.26, 0.83]))) * (1 + 0.01 * rng.normal(size=12))
    sel = np.flatnonzero(keep.reshape(-1))
    mean = np.asarray(cut.mean(theta))[sel]
    # the likelihood evaluates Limber only at the |ell| of the kept bins (here below 300: bins
    # 3-4 are cut for every pair), and gets the same kept entries as the whole mean vector
    assert cut.ell_needed.max() < 300.0 < cut.ell_unique.max()
    np.testing.assert_allclose(np.asarray(cut.kept_mean(theta)), mean, rtol=1e-12, atol=0)
    r = data[sel] - mean
    c = cov[np.ix_(sel, sel)]
    want = -0.5 * (r @ np.linalg.solve(c, r) + np.linalg.slogdet(2 * np.pi * c)[1])
    assert float(cut.log_likelihood(theta, data)) == pytest.approx(want, rel=1e-9)
    # the density NUTS samples (the likelihood's model; sample_cl_posterior only taps θ in it) is
    # prior × the kept-bin likelihood: equal to round-off (float64)
    from numpyro.infer.util import log_density

    params = {"Omega_c": jnp.asarray(theta[0]), "sigma8": jnp.asarray(theta[1])}
    got, _ = log_density(cut.model, (data,), {"tap": lambda t: t}, params)
    prior_lp = sum(float(d.log_prob(params[n])) for n, d in prior.numpyro_dists().items())
    assert float(got) == pytest.approx(want + prior_lp, rel=1e-9)


def test_compressor_cannot_see_the_removed_modes(tmp_path):
    """Two maps that differ only in modes outside the cuts compress to the same summary."""
    from compressors import TrainConfig, train_compressor

    rng = np.random.default_rng(4)
    maps = rng.normal(size=(24, 2, NPIX, NPIX)).astype(np.float32) * 0.01
    theta = rng.normal(size=(24, 2)).astype(np.float32)
    cfg = TrainConfig(loss="mse", network="cnn", width=4, depth=2, epochs=2, batch_size=8,
                      scales=SCALES, field_deg=FIELD)
    comp = train_compressor(maps, theta, np.array([0.01, 0.01]), cfg, tmp_path / "c",
                            progress=False)
    mask = flatsky.scale_mask(FIELD, NPIX, *SCALES)
    x = maps[:3]
    outside = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=x.shape)) * ~mask)).astype(np.float32)
    np.testing.assert_allclose(comp.compress(x + outside), comp.compress(x), rtol=1e-4, atol=1e-5)
    plain = TrainConfig(loss="mse", network="cnn", width=4, depth=2, epochs=2, batch_size=8)
    other = train_compressor(maps, theta, np.array([0.01, 0.01]), plain, tmp_path / "p",
                             progress=False)
    assert not np.allclose(other.compress(x + outside), other.compress(x), rtol=1e-4, atol=1e-5)


def test_summaries_apply_the_cuts():
    from experiments.pipeline import summarise

    rng = np.random.default_rng(5)
    maps = rng.normal(size=(3, 2, NPIX, NPIX)).astype(np.float32)
    edges = np.array([72.0, 150.0, 300.0, 600.0, 1000.0])
    full = summarise("cl", maps, field_deg=FIELD, ell_edges=edges)
    cut = summarise("cl", maps, field_deg=FIELD, ell_edges=edges, scales=SCALES)
    assert full.shape == (3, 12) and cut.shape == (3, 4)
    np.testing.assert_array_equal(cut, full[:, [0, 1, 5, 9]])
    m = summarise("maps", maps, field_deg=FIELD, scales=SCALES)
    mask = flatsky.scale_mask(FIELD, NPIX, *SCALES)
    assert np.max(np.abs(np.fft.fft2(m)[:, ~mask])) < 1e-4


def test_config_cuts():
    quick = load_config("quick")
    lo, hi = quick.scale_cuts()
    assert lo == (0.0, 0.0, 0.0) and hi == (130.0, 330.0, 440.0)
    assert quick.with_(**{"scales.cut": False}).scale_cuts() is None
    assert load_config("gaussian_check").scale_cuts() is None
    with pytest.raises(ConfigError, match=r"scales\.cut"):
        load_config_text('[maps]\nsky = "healpix"\nnside = 64\n[scales]\nell_max = 100.0\n')
    ok = load_config_text('[maps]\nsky = "healpix"\nnside = 64\n[scales]\nell_max = 100.0\ncut = false\n')
    assert ok.scale_cuts() is None


def test_report_states_the_cuts():
    from experiments.report import _scale_cuts

    assert "no [scales] cuts" in _scale_cuts(None)[0]
    line = _scale_cuts({"ell_min": [0.0, 100.0], "ell_max": [300.0, None]})[0]
    assert "bin 1: 0–300, bin 2: 100–∞" in line
