"""Priors (experiments.priors), the [prior] config section and the posterior-samples file format."""

import math

import jax
import numpy as np
import pytest
import scipy.stats as st

from experiments.config import ConfigError, load_config, load_config_text
from experiments.io import Samples, read_samples, write_samples
from experiments.priors import ParamPrior, Prior, PriorError, lsst_y10

jax.config.update("jax_enable_x64", True)


def test_lsst_y10_prior_is_the_published_one():
    p = lsst_y10()
    assert p.names == ("Omega_c", "Omega_b", "sigma8", "h", "n_s", "w0")
    oc, ob, s8, h, ns, w0 = p.params
    assert (oc.dist, oc.loc, oc.scale, oc.low, oc.high) == ("truncated_normal", 0.2664, 0.2, 0.0, None)
    assert (ob.loc, ob.scale, s8.loc, s8.scale) == (0.0492, 0.006, 0.831, 0.14)
    assert (ob.dist, s8.dist, s8.low, s8.high) == ("normal", "truncated_normal", 0.0, None)
    assert (h.loc, h.scale, ns.loc, ns.scale) == (0.6727, 0.063, 0.9645, 0.08)
    assert (w0.dist, w0.loc, w0.scale, w0.low, w0.high) == ("truncated_normal", -1.0, 0.9, -2.0, -0.3)


def test_moments_and_log_prob_match_scipy():
    p = lsst_y10()
    # exact moments against scipy's truncnorm/norm
    for param, (m, s) in zip(p.params, zip(p.mean, p.std)):
        if param.dist == "truncated_normal":
            lo, hi = param.bounds
            ref = st.truncnorm((lo - param.loc) / param.scale, (hi - param.loc) / param.scale,
                               loc=param.loc, scale=param.scale)
        else:
            ref = st.norm(param.loc, param.scale)
        assert m == pytest.approx(ref.mean(), rel=1e-10)
        assert s == pytest.approx(ref.std(), rel=1e-10)
    theta = np.asarray(p.sample(jax.random.key(3), 5))
    assert theta.shape == (5, 6)
    expected = sum(st.truncnorm((lo - q.loc) / q.scale, (hi - q.loc) / q.scale, loc=q.loc,
                                scale=q.scale).logpdf(theta[:, i]) if q.dist == "truncated_normal"
                   else st.norm(q.loc, q.scale).logpdf(theta[:, i])
                   for i, (q, (lo, hi)) in enumerate(zip(p.params, [q.bounds for q in p.params])))
    np.testing.assert_allclose(np.asarray(p.log_prob(theta)), expected, rtol=1e-10)
    outside = theta[0].copy()
    outside[0] = -0.1  # Omega_c < 0: outside the truncated support
    assert np.asarray(p.log_prob(outside)) == -math.inf


def test_samples_follow_the_prior():
    p = lsst_y10()
    s = np.asarray(p.sample(jax.random.key(0), 40000))
    # 40000 draws: the mean's standard error is std/200, so 4 standard errors is std/50
    np.testing.assert_array_less(np.abs(s.mean(0) - p.mean), p.std / 50)
    np.testing.assert_allclose(s.std(0), p.std, rtol=0.03)  # std's relative error ~ 1/sqrt(2n)=0.35%
    assert s[:, 0].min() >= 0 and s[:, 5].min() >= -2 and s[:, 5].max() <= -0.3


def test_cosmology_from_theta():
    from simulators import Cosmology

    p = lsst_y10().select(["sigma8", "Omega_c"])
    c = p.cosmology(np.array([0.9, 0.3]), Cosmology.fiducial())
    assert (c.sigma8, c.Omega_c, c.h) == (0.9, 0.3, Cosmology.fiducial().h)


@pytest.mark.parametrize("table, message", [
    ({"dist": "gamma", "loc": 1, "scale": 1}, "unknown distribution 'gamma'"),
    ({"dist": "normal", "loc": 1}, "needs loc and scale"),
    ({"dist": "normal", "loc": 1, "scale": -1}, "scale must be > 0"),
    ({"dist": "uniform", "low": 1, "high": 0}, "low must be < high"),
    ({"dist": "truncated_normal", "loc": 1, "scale": 1}, "needs low and/or high"),
    ({"dist": "normal", "loc": 1, "scale": 1, "shape": 2}, "unknown key 'shape'"),
    ({"loc": 1, "scale": 1}, "missing 'dist'"),
])
def test_bad_param_prior(table, message):
    with pytest.raises(PriorError, match=message):
        ParamPrior.from_table("sigma8", table)


def test_unknown_parameter_and_duplicates():
    with pytest.raises(PriorError, match="Omega_x: unknown parameter"):
        ParamPrior("Omega_x", "normal", 0, 1)
    with pytest.raises(PriorError, match="declared twice"):
        Prior((ParamPrior("h", "normal", 0.7, 0.1), ParamPrior("h", "normal", 0.7, 0.1)))


def test_prior_section():
    cfg = load_config("quick")
    assert cfg.prior().names == ("Omega_c", "sigma8")
    assert load_config("lsst_y10").prior() == lsst_y10()
    changed = cfg.with_(**{"prior.sigma8": {"dist": "uniform", "low": 0.5, "high": 1.2}})
    assert changed.prior().params[1] == ParamPrior("sigma8", "uniform", low=0.5, high=1.2)
    assert load_config_text(changed.to_toml()) == changed  # inline tables round-trip
    free = cfg.with_(**{"prior.preset": "none", "prior.params": None,
                        "prior.h": {"dist": "normal", "loc": 0.7, "scale": 0.05}})
    assert free.prior().names == ("h",)


@pytest.mark.parametrize("change, message", [
    ({"prior.params": ["Omega_x"]}, r"prior.params: unknown parameter 'Omega_x' \(did you mean 'Omega_c'"),
    ({"prior.sigma8": {"dist": "gamma"}}, "prior.sigma8: unknown distribution"),
    ({"prior.params": ["wa"]}, "prior.params: 'wa' has no prior"),
    ({"prior.h": {"dist": "normal", "loc": 0.7, "scale": 0.1}}, "prior.h: declared but not in prior.params"),
    ({"prior.sigma8": 0.8}, "prior.sigma8: must be a table"),
    ({"prior.preset": "des"}, "prior.preset: must be one of"),
])
def test_bad_prior_section(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quick").with_(**change)


def test_samples_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    s = Samples(rng.normal(size=(50, 2)), ("Omega_c", "sigma8"), "npe_mse", chain=np.repeat([0, 1], 25),
                truth=[0.27, 0.83], info={"wall_s": np.float64(1.5), "n_sims": np.int64(500)},
                config_toml='name = "x"\n')
    r = read_samples(write_samples(tmp_path / "s.h5", s))
    np.testing.assert_array_equal(r.samples, s.samples)
    np.testing.assert_array_equal(r.chain, s.chain)
    np.testing.assert_array_equal(r.truth, s.truth)
    assert (r.names, r.method, r.info, r.config_toml) == (s.names, s.method, {"wall_s": 1.5, "n_sims": 500},
                                                         s.config_toml)
    assert r.column("sigma8")[0] == s.samples[0, 1]


def test_samples_errors(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        Samples(np.zeros((5, 3)), ("Omega_c", "sigma8"), "x")
    with pytest.raises(ValueError, match="1 of 2 posterior samples of 'x' contain NaN"):
        Samples(np.array([[0.0, np.nan], [1, 1]]), ("Omega_c", "sigma8"), "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_samples(tmp_path / "nope.h5")
