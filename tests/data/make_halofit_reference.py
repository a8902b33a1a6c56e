"""Reference halofit numbers from jax_cosmo, for tests/test_halofit.py.

Run with the separate peer environment (jax_cosmo 0.1.0, jax 0.6):
    .venv-peer/bin/python tests/data/make_halofit_reference.py
It prints a summary and writes tests/data/halofit_reference.json next to this script.

For each cosmology and scale factor a it stores, at 15 k values in [0.01, 10] h/Mpc:
  p_nl:  jax_cosmo.power.nonlinear_matter_power(..., transfer_fn=Eisenstein_Hu, nonlinear_fn=halofit)
         (prescription "takahashi2012", the default);
  p_lin: jax_cosmo.power.linear_matter_power at the same k and a;
  k_nl, n_eff, C: jax_cosmo's halofit parameters (diagnostics).
and per cosmology sigma8_eff: the top-hat sigma(8 Mpc/h) of jax_cosmo's z = 0 linear power computed
here with a fine trapezoid in ln k over [1e-5, 1e3] h/Mpc. jax_cosmo's ``sigmasqr`` passes log10
limits to an integrand in ln k, i.e. it integrates only 0.018 < k < 20 h/Mpc, so its P_lin is
normalised to a sigma8 slightly different from the one requested; sigma8_eff lets the test compare
halofit at equal linear amplitude.
"""

import json
import os

import jax

jax.config.update("jax_enable_x64", True)

import jax_cosmo as jc  # noqa: E402
import numpy as np  # noqa: E402

BASE = dict(Omega_c=0.2664, Omega_b=0.0492, h=0.6727, n_s=0.9645, sigma8=0.831, w0=-1.0, wa=0.0)
COSMOLOGIES = {
    "fiducial": BASE,
    "w0wa": {**BASE, "w0": -0.8, "wa": 0.2},
    "high_om_low_s8": {**BASE, "Omega_c": 0.32, "sigma8": 0.75},
}
K = np.geomspace(0.01, 10.0, 15)
A_VALUES = [1.0, 0.67, 0.5, 0.33]


def sigma8_of_linear(cosmo):
    lnk = np.linspace(np.log(1e-5), np.log(1e3), 40001)
    k = np.exp(lnk)
    pk = np.asarray(jc.power.linear_matter_power(cosmo, k, 1.0))
    x = 8.0 * k
    w = 3.0 * (np.sin(x) - x * np.cos(x)) / x**3
    return float(np.sqrt(np.trapezoid(k**3 * pk * w**2 / (2 * np.pi**2), lnk)))


def main():
    import simulators
    simulators.enable_x64()
    out = {"k": K.tolist(), "a": A_VALUES, "jax_cosmo_version": getattr(jc, "__version__", "?"),
           "jax_version": jax.__version__, "cosmologies": {}}
    for name, pars in COSMOLOGIES.items():
        cosmo = jc.Cosmology(Omega_k=0.0, **pars)
        entry = {"params": pars, "sigma8_eff": sigma8_of_linear(cosmo), "by_a": []}
        for a in A_VALUES:
            p_nl = jc.power.nonlinear_matter_power(
                cosmo, K, a, transfer_fn=jc.transfer.Eisenstein_Hu, nonlinear_fn=jc.power.halofit)
            p_lin = jc.power.linear_matter_power(cosmo, K, a, transfer_fn=jc.transfer.Eisenstein_Hu)
            k_nl, n_eff, c = (float(np.squeeze(x)) for x in jc.power._halofit_parameters(
                cosmo, np.atleast_1d(a), jc.transfer.Eisenstein_Hu))
            entry["by_a"].append({
                "a": a, "p_nl": np.asarray(p_nl).tolist(), "p_lin": np.asarray(p_lin).tolist(),
                "k_nl": k_nl, "n_eff": n_eff, "C": c,
            })
            r = np.asarray(p_nl) / np.asarray(p_lin)
            print(f"{name:15s} a={a:4.2f} k_nl={k_nl:.4f} n_eff={n_eff:+.4f} C={c:.4f}  "
                  f"P_NL/P_lin at k={K[0]:.2f},{K[10]:.2f},{K[-1]:.0f}: {r[0]:.4f} {r[10]:.3f} {r[-1]:.2f}")
        print(f"{name:15s} sigma8 requested {pars['sigma8']}, "
              f"jax_cosmo P_lin has sigma8 {entry['sigma8_eff']:.6f}")
        out["cosmologies"][name] = entry
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "halofit_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
