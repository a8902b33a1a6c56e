"""experiments.metrics: per-method metrics against independent computations, C2ST sanity, names.

Samples are synthetic Gaussians (no simulator). The C2ST tests train sklearn MLPs on ≤ 2000
points in 2-D, about a second each on one core.
"""

import json
import math

import h5py
import numpy as np
import pytest

from experiments.io import Samples, read_samples, write_samples
from experiments.metrics import (METHODS, compare_metrics, method_label, order_methods,
                                 read_metrics, unconverged_note, validate_method, write_metrics)

NAMES = ("Omega_c", "sigma8")
BASE = {"Omega_c": 0.2664, "Omega_b": 0.0492, "h": 0.6727, "n_s": 0.9645, "sigma8": 0.831,
        "w0": -1.0, "wa": 0.0}
TRUTH = {"Omega_c": 0.2664, "sigma8": 0.831, "Omega_b": 0.0492}


def gaussian(rng, mean, std, rho, n):
    cov = np.array([[std[0] ** 2, rho * std[0] * std[1]], [rho * std[0] * std[1], std[1] ** 2]])
    return rng.multivariate_normal(mean, cov, n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three methods written to disk with write_samples and read back."""
    d = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(42)
    cl = gaussian(rng, [0.26, 0.84], [0.03, 0.04], -0.6, 4000)
    hmc = gaussian(rng, [0.27, 0.83], [0.015, 0.02], -0.7, 3000)
    # NPE also samples Omega_b, correlated with Omega_c, so Omega_m differs from Omega_c + const
    npe = gaussian(rng, [0.268, 0.828], [0.018, 0.025], -0.5, 2500)
    ob = 0.049 + 0.006 * rng.standard_normal(len(npe)) - 0.2 * (npe[:, 0] - 0.268)
    made = {
        "cl_analytic": Samples(cl, NAMES, "cl_analytic", chain=np.repeat([0, 1, 2, 3], 1000),
                               truth=[0.2664, 0.831],
                               info={"wall_time_s": 12.5, "n_cov": 1000, "grad_evals": 54321}),
        "hmc": Samples(hmc, NAMES, "hmc", info={"wall_time_s": 3600.0, "n_gradients": 10 ** 6}),
        "npe_vmim": Samples(np.column_stack([npe, ob]), NAMES + ("Omega_b",), "npe_vmim",
                            info={"fit_time_s": 40.0, "sample_time_s": 2.0, "n_train_sims": 2000,
                                  "calibration": {"tarp_atc": -0.02, "tarp_ks_pval": 0.4,
                                                  "sbc_ks_pvals": {"Omega_c": 0.3}}}),
    }
    paths = {k: write_samples(d / f"{k}.h5", s) for k, s in made.items()}
    return paths, {k: read_samples(p) for k, p in paths.items()}


def raw(path):
    """The saved samples straight from the HDF5 file, independently of read_samples."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["samples"][()]), json.loads(f.attrs["names"])


def fom_by_hand(x, y):
    c = np.cov(np.stack([x, y]))
    return 1.0 / math.sqrt(c[0, 0] * c[1, 1] - c[0, 1] * c[1, 0])


def test_metrics_json_against_independent_computation(saved, tmp_path):
    paths, samples = saved
    path = write_metrics(tmp_path / "out" / "metrics.json",
                         compare_metrics(samples, base=BASE, truth=TRUTH, c2st=False))
    m = json.loads(path.read_text())
    assert read_metrics(path) == m
    assert m["methods_order"] == ["hmc", "cl_analytic", "npe_vmim"]
    foms = {}
    for key, p in paths.items():
        s, names = raw(p)
        col = dict(zip(names, s.T))
        ob = col.get("Omega_b", BASE["Omega_b"])
        om = col["Omega_c"] + ob
        s8 = col["sigma8"] * np.sqrt(om / 0.3)
        got = m["methods"][key]
        assert got["n_samples"] == len(s)
        fc, fm = fom_by_hand(col["Omega_c"], col["sigma8"]), fom_by_hand(om, col["sigma8"])
        foms[key] = (fc, fm)
        assert got["fom"]["Omega_c,sigma8"] == pytest.approx(fc, rel=1e-9)
        assert got["fom"]["Omega_m,sigma8"] == pytest.approx(fm, rel=1e-9)
        for name in names:
            x = col[name]
            bias = (x.sum() / len(x) - TRUTH[name]) / math.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1))
            assert got["params"][name]["bias_sigma"] == pytest.approx(bias, rel=1e-9)
        om_t = TRUTH["Omega_c"] + TRUTH["Omega_b"]
        s8_t = TRUTH["sigma8"] * math.sqrt(om_t / 0.3)
        assert m["truth"]["S8"] == pytest.approx(s8_t, rel=1e-12)
        assert got["S8"]["mean"] == pytest.approx(s8.mean(), rel=1e-12)
        assert got["S8"]["std"] == pytest.approx(np.std(s8, ddof=1), rel=1e-9)
        assert got["params"]["S8"]["bias_sigma"] == pytest.approx(
            (s8.mean() - s8_t) / np.std(s8, ddof=1), rel=1e-9)
    # Omega_b sampled by NPE: FoM(Omega_m, sigma8) must use its samples, not the base value
    assert abs(foms["npe_vmim"][1] / foms["npe_vmim"][0] - 1) > 0.05
    # FoM ratios to the C_ell reference
    assert m["fom_ratio"]["reference"] == "cl_analytic"
    for key in paths:
        for i, pair in enumerate(("Omega_c,sigma8", "Omega_m,sigma8")):
            assert m["fom_ratio"]["values"][key][pair] == pytest.approx(
                foms[key][i] / foms["cl_analytic"][i], rel=1e-9)
    # budgets carried through (canonical keys or the pipeline's names)
    assert m["methods"]["cl_analytic"]["budget"] == {"wall_time_s": 12.5, "n_simulations": 1000,
                                                     "n_gradients": 54321}
    assert m["methods"]["hmc"]["budget"] == {"wall_time_s": 3600.0, "n_simulations": None,
                                             "n_gradients": 10 ** 6}
    assert m["methods"]["npe_vmim"]["budget"] == {"wall_time_s": 42.0, "n_simulations": 2000,
                                                  "n_gradients": None}
    assert m["methods"]["npe_vmim"]["calibration"]["tarp_atc"] == -0.02
    assert m["methods"]["cl_analytic"]["n_chains"] == 4
    assert m["c2st"] is None


def test_reference_fallback_nan_to_null_and_truth_mismatch(saved, tmp_path):
    _, samples = saved
    flat = samples["hmc"].samples.copy()
    flat[:, 0] = 0.27  # degenerate: singular covariance -> FoM null, std 0 -> bias null
    npe_cl = Samples(samples["cl_analytic"].samples, NAMES, "npe_cl", truth=[0.3, 0.831])
    m = compare_metrics({"npe_cl": npe_cl, "hmc": Samples(flat, NAMES, "hmc")}, base=BASE,
                        truth=TRUTH, c2st=False)
    assert m["fom_ratio"]["reference"] == "npe_cl"
    assert any("npe_cl" in w and "differs" in w for w in m["warnings"])  # its truth 0.3 ≠ 0.2664
    text = write_metrics(tmp_path / "m.json", m).read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["methods"]["hmc"]["fom"]["Omega_c,sigma8"] is None
    assert back["methods"]["hmc"]["params"]["Omega_c"]["bias_sigma"] is None
    assert back["fom_ratio"]["values"]["hmc"]["Omega_c,sigma8"] is None
    # unphysical samples (Omega_m <= 0): S8 undefined for them, statistics over the rest
    neg = samples["hmc"].samples.copy()
    neg[:10, 0] = -0.5
    m = compare_metrics({"hmc": Samples(neg, NAMES, "hmc")}, base=BASE, truth=TRUTH, c2st=False)
    assert any("10 of 3000 samples have Omega_m <= 0" in w for w in m["warnings"])
    om = neg[10:, 0] + BASE["Omega_b"]
    assert m["methods"]["hmc"]["S8"]["mean"] == pytest.approx(
        np.mean(neg[10:, 1] * np.sqrt(om / 0.3)), rel=1e-12)
    none = compare_metrics({"hmc": samples["hmc"]}, base=BASE, truth=TRUTH, c2st=False)
    assert none["fom_ratio"] == {"reference": None, "values": {}}
    with pytest.raises(ValueError, match="Omega_b"):  # Omega_m needs Omega_b from somewhere
        compare_metrics({"hmc": samples["hmc"]}, base={"h": 0.7}, truth=TRUTH, c2st=False)


# ---- C2ST ------------------------------------------------------------------------------------
# Tolerance for "indistinguishable": with n samples per side the cross-validated accuracy is a
# mean over 2n held-out predictions, sd ≈ sqrt(0.25 / 2n) ≈ 0.011 at n = 1000, so |acc − 0.5| <
# 0.05 is ≈ 4.5 sd (the classifier and folds are seeded, so the result is also deterministic).
# Literally identical arrays are a different case: every point has a twin with the opposite label,
# usually in the training folds, so the classifier leans the wrong way and the accuracy sits at
# or below 0.5 (0.46–0.50 over seeds 3–5): the window there is [0.40, 0.55].

def test_draw_diagnostics_flag_autocorrelated_chains():
    """ESS and split R̂ of the saved draws. Two AR(1) chains (ρ = 0.9, 2 × 2000 draws) have the
    ESS 2·2000·(1−ρ)/(1+ρ) = 211 (the AR(1) integrated autocorrelation time); the estimator's
    scatter at this length is ~10 %, so 0.7–1.4× is allowed. They are flagged (ESS < 400); 4000
    independent draws are not, and give ESS ≈ 4000 (within 10 %). A chain whose halves differ by
    2σ gives split R̂ far above 1.01 whatever its ESS."""
    rng = np.random.default_rng(3)
    rho, n = 0.9, 2000
    ar = np.empty((2, n, 2))
    ar[:, 0] = rng.standard_normal((2, 2))
    for t in range(1, n):
        ar[:, t] = rho * ar[:, t - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal((2, 2))
    mcmc = Samples(np.array([0.27, 0.83]) + 0.01 * ar.reshape(-1, 2), NAMES, "hmc",
                   chain=np.repeat([0, 1], n))
    iid = Samples(gaussian(rng, [0.27, 0.83], [0.01, 0.01], 0.0, 4000), NAMES, "npe_cl")
    drift = iid.samples.copy()
    drift[2000:] += 0.02  # second half 2σ away
    m = compare_metrics({"hmc": mcmc, "npe_cl": iid, "npe_vmim": Samples(drift, NAMES, "npe_vmim")},
                        base=BASE, truth=TRUTH, c2st=False)
    theory = 2 * n * (1 - rho) / (1 + rho)
    for name in NAMES:
        assert 0.7 < m["methods"]["hmc"]["draws"]["ess"][name] / theory < 1.4
        assert abs(m["methods"]["npe_cl"]["draws"]["ess"][name] / 4000 - 1) < 0.1
        assert m["methods"]["npe_cl"]["draws"]["r_hat"][name] < 1.01
        assert m["methods"]["npe_vmim"]["draws"]["r_hat"][name] > 1.5
    flagged = {w.split(":")[0] for w in m["warnings"] if "not converged" in w}
    assert flagged == {"hmc", "npe_vmim"}


def random_walk(rng, n_chains, n, scale=0.001, start=(0.27, 0.83)):
    """(n_chains * n, 2) draws, chain by chain, of a Gaussian random walk: the extreme of an
    autocorrelated, unmixed chain (its ESS does not grow with n, its chains disagree)."""
    steps = scale * rng.standard_normal((n_chains, n, 2))
    return (np.asarray(start) + np.cumsum(steps, axis=1)).reshape(-1, 2)


def test_convergence_certificate_per_method_and_its_thresholds(tmp_path):
    """methods[k]["converged"]: True only when every sampled parameter has ESS >= ess_min and
    split R̂ <= r_hat_max. Two 1000-step random walks have an ESS of a few (far below 400 at
    any seed: a random walk's autocorrelation does not decay) and split R̂ >> 1.01; 4000 i.i.d.
    draws have ESS ≈ 4000 and R̂ within ~1e-3 of 1 (the halves' means differ by ~σ/√2000), so
    they pass with a wide margin. A constant parameter (a stuck chain) has no ESS and fails."""
    rng = np.random.default_rng(11)
    walk = Samples(random_walk(rng, 2, 1000), NAMES, "hmc", chain=np.repeat([0, 1], 1000))
    iid = Samples(gaussian(rng, [0.26, 0.84], [0.03, 0.04], -0.6, 4000), NAMES, "cl_analytic")
    stuck = iid.samples.copy()
    stuck[:, 1] = 0.8
    m = compare_metrics({"hmc": walk, "cl_analytic": iid,
                         "npe_cl": Samples(stuck, NAMES, "npe_cl")},
                        base=BASE, truth=TRUTH, c2st=False)
    assert m["convergence"] == {"ess_min": 400, "r_hat_max": 1.01}
    assert m["methods"]["hmc"]["converged"] is False
    assert all(e < 400 for e in m["methods"]["hmc"]["draws"]["ess"].values())
    assert m["methods"]["cl_analytic"]["converged"] is True
    assert m["methods"]["npe_cl"]["converged"] is False
    assert m["methods"]["npe_cl"]["draws"]["ess"]["sigma8"] is None
    # the certificate survives the file round trip, as a JSON boolean
    back = read_metrics(write_metrics(tmp_path / "m.json", m))
    assert back["methods"]["hmc"]["converged"] is False
    assert back["methods"]["cl_analytic"]["converged"] is True
    # thresholds the config states: 300 i.i.d. draws (ESS ≈ 300) fail ESS >= 400 and pass
    # ESS >= 100; a looser R̂ does not rescue the random walk (ESS of a few, below 100)
    few = Samples(iid.samples[:300], NAMES, "npe_cl")
    assert compare_metrics({"npe_cl": few}, base=BASE, truth=TRUTH,
                           c2st=False)["methods"]["npe_cl"]["converged"] is False
    loose = compare_metrics({"npe_cl": few, "hmc": walk}, base=BASE, truth=TRUTH, c2st=False,
                            ess_min=100, r_hat_max=1.1)
    assert loose["convergence"] == {"ess_min": 100, "r_hat_max": 1.1}
    assert loose["methods"]["npe_cl"]["converged"] is True
    assert loose["methods"]["hmc"]["converged"] is False
    for bad in (dict(ess_min=0), dict(ess_min=400.5), dict(r_hat_max=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            compare_metrics({"npe_cl": few}, base=BASE, truth=TRUTH, c2st=False, **bad)


def test_unconverged_note_and_older_files():
    """unconverged_note: the per-parameter ESS rounded down (a failing 399.7 must not read 400)
    joined by "/", and the worst R̂ with enough decimals to stay on its side of r_hat_max; None
    for a certified method and for a metrics file from before the certificate (unknown)."""
    entry = {"converged": False, "draws": {"ess": {"Omega_c": 10.9, "sigma8": 5.2},
                                           "r_hat": {"Omega_c": 1.3501, "sigma8": 1.2}}}
    metrics = {"methods": {"hmc": entry}, "convergence": {"ess_min": 400, "r_hat_max": 1.01}}
    assert unconverged_note(metrics, "hmc") == "unconverged (ESS 10/5, R̂ 1.35)"
    entry["draws"] = {"ess": {"Omega_c": 399.7, "sigma8": None},
                      "r_hat": {"Omega_c": 1.012, "sigma8": None}}
    assert unconverged_note(metrics, "hmc") == "unconverged (ESS 399/—, R̂ 1.012)"
    entry["converged"] = True
    assert unconverged_note(metrics, "hmc") is None
    del entry["converged"]
    assert unconverged_note(metrics, "hmc") is None


def test_c2st_same_distribution_is_half_and_separated_is_one():
    rng = np.random.default_rng(3)
    a = gaussian(rng, [0.27, 0.83], [0.02, 0.03], -0.5, 1000)
    b = gaussian(rng, [0.27, 0.83], [0.02, 0.03], -0.5, 1000)
    far = gaussian(rng, [0.27 + 10 * 0.02, 0.83], [0.02, 0.03], -0.5, 1000)
    m = compare_metrics({"npe_vmim@a": Samples(a, NAMES, "npe_vmim"),
                         "npe_vmim@b": Samples(b, NAMES, "npe_vmim"),
                         "hmc": Samples(a, NAMES, "hmc"),  # the very same array as npe_vmim@a
                         "exact": Samples(far, NAMES, "exact")},
                        base=BASE, truth=TRUTH, max_samples=1000)
    c = m["c2st"]
    assert "MLPClassifier" in c["classifier"] and c["n_folds"] == 5
    acc = {frozenset((e["a"], e["b"])): e["accuracy"] for e in c["pairs"]}
    assert len(acc) == 6
    assert abs(acc[frozenset(("npe_vmim@a", "npe_vmim@b"))] - 0.5) < 0.05
    assert 0.40 < acc[frozenset(("npe_vmim@a", "hmc"))] < 0.55  # identical sets
    for other in ("npe_vmim@a", "npe_vmim@b", "hmc"):
        assert acc[frozenset(("exact", other))] > 0.98  # 10σ apart in Omega_c


def test_c2st_subsamples_to_max_samples_on_shared_params():
    rng = np.random.default_rng(5)
    a = Samples(0.3 + 0.02 * rng.normal(size=(3000, 2)), NAMES, "hmc")
    b = Samples(0.3 + 0.02 * rng.normal(size=(2500, 3)), NAMES + ("Omega_b",), "npe_mse")
    small = Samples(rng.normal(size=(8, 2)), NAMES, "npe_mae")
    kw = dict(base=BASE, truth=TRUTH, max_samples=300)
    m1 = compare_metrics({"hmc": a, "npe_mse": b, "npe_mae": small}, **kw)
    pairs = {(e["a"], e["b"]): e for e in m1["c2st"]["pairs"]}
    e = pairs[("hmc", "npe_mse")]
    assert e["n"] == 300 and e["params"] == ["Omega_c", "sigma8"]
    assert 0.4 < e["accuracy"] < 0.6
    assert pairs[("hmc", "npe_mae")]["accuracy"] is None  # 8 < 2 * n_folds: not computable
    assert "too few" in pairs[("hmc", "npe_mae")]["note"]
    m2 = compare_metrics({"hmc": a, "npe_mse": b}, **kw)  # seeded: same subsample, same score
    assert m2["c2st"]["pairs"][0]["accuracy"] == e["accuracy"]


# ---- method names ----------------------------------------------------------------------------

def test_method_names():
    for name in METHODS:
        assert validate_method(name) == name
    assert validate_method("npe_my_net2") == "npe_my_net2"  # NPE on a custom compressor
    assert method_label("npe_vmim@1000sims") == "NPE (VMIM) [1000sims]"
    assert method_label("npe_my_net2") == "NPE (my_net2)"
    assert order_methods(["npe_zz", "npe_vmim", "exact", "cl_analytic"]) == \
        ["exact", "cl_analytic", "npe_vmim", "npe_zz"]
    for bad in ("mcmc", "NPE_vmim", "npe_", "npe-vmim", "hmc@", "hmc@a b", ""):
        with pytest.raises(ValueError, match=r"unknown method .*valid: exact, hmc, cl_analytic"):
            validate_method(bad)


def test_unknown_or_mismatched_method_in_compare(saved):
    _, samples = saved
    with pytest.raises(ValueError, match="unknown method 'nuts'.*valid:"):
        compare_metrics({"nuts": Samples(samples["hmc"].samples, NAMES, "nuts")}, base=BASE,
                        truth=TRUTH, c2st=False)
    with pytest.raises(ValueError, match="'hmc' names samples of method 'cl_analytic'"):
        compare_metrics({"hmc": samples["cl_analytic"]}, base=BASE, truth=TRUTH, c2st=False)
