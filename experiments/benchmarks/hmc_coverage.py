"""Coverage of the explicit (field-level HMC) posterior on Gaussian-field maps, where the exact
posterior is known: simulation-based calibration over many observations.

    python -m experiments.benchmarks.hmc_coverage --config gaussian_check --n-obs 60 \
        --set maps.npix=8 --set sources.n_bins=1 --set simulation.n_chi=16 \
        --work runs/hmc_coverage --out experiments/benchmarks/results_hmc_coverage.json

For i < n_obs: θ_i is drawn from the config's prior, maps are simulated at θ_i (seed
``--seed-offset`` + i), and both ``lensbench hmc`` (the config's [hmc] settings) and the exact grid
posterior (``lensbench exact``) are run on them. Per parameter, q_i = the fraction of posterior
samples below θ_i is uniform on [0, 1] for a calibrated posterior (SBC, Talts et al. 2018). The
HMC draws are thinned to about one per effective sample first: ranks among autocorrelated draws
are not uniform even for an exact sampler. Reported: the KS p-value of q against U(0, 1), the
empirical coverage of central 68 % and 95 % intervals, and, per observation, how far the HMC mean
is from the exact one in units of the HMC Monte Carlo error (z) and of the exact posterior std
(shift), and the ratio of the stds. The exact posterior's own
ranks are the control: they show what a calibrated posterior gives on the same observations.

Every observation's run lives in ``work/obs_<i>``; finished ones are skipped, an unfinished HMC
run resumes, so the benchmark can be killed and rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


LEVELS = (0.68, 0.95)


def _log(msg: str) -> None:
    print(msg, flush=True)


def thin_to_ess(samples: np.ndarray, ess: float) -> np.ndarray:
    """(n, d) chain → every k-th draw, k = ceil(n / ESS), so the kept draws are ~independent."""
    k = max(1, math.ceil(len(samples) / max(ess, 1.0)))
    return samples[k - 1::k]


def quantile_of_truth(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(d,) fraction of the (n, d) samples below the truth, per parameter (ties count half)."""
    below = (samples < truth).mean(0)
    equal = (samples == truth).mean(0)
    return below + 0.5 * equal


def summarise(q: np.ndarray, names) -> dict:
    """SBC summary of (m, d) quantiles of the truth: KS p-value against U(0, 1), coverage of
    central intervals, and the mean quantile (0.5 when unbiased)."""
    from scipy.stats import kstest

    out = {}
    for j, name in enumerate(names):
        col = q[:, j]
        out[name] = {"ks_pval": float(kstest(col, "uniform").pvalue),
                     "mean_quantile": float(col.mean()),
                     **{f"coverage_{int(100 * a)}": float(np.mean(np.abs(col - 0.5) < a / 2))
                        for a in LEVELS}}
    return out


def run_one(cfg, i: int, theta: np.ndarray, seed: int, work: Path) -> dict:
    """Maps at θ, then HMC and the exact posterior on them (each skipped when already there)."""
    from experiments.maps import run_maps
    from experiments.io import read_samples
    from experiments.pipeline import run_exact, run_hmc

    d = work / f"obs_{i:03d}"
    d.mkdir(parents=True, exist_ok=True)
    stamp = d / "observation.json"  # what the maps were made from: a rerun must not mix setups
    this = json.loads(json.dumps({"theta": theta.tolist(), "seed": seed, "config": cfg.to_dict()}))
    if stamp.is_file() and json.loads(stamp.read_text()) != this:
        raise SystemExit(f"{d} holds another observation (other θ, seed or settings): use another "
                         f"--work directory")
    stamp.write_text(json.dumps(this))
    cfg_i = cfg.with_(seed=seed, **{f"cosmology.{n}": float(v) for n, v in zip(cfg.prior().names,
                                                                                 theta)})
    maps = d / "maps.h5"
    if not maps.is_file():
        run_maps(cfg_i, maps, progress=False)
    timing = {}
    if not (d / "hmc" / "samples.h5").is_file():
        t0 = time.perf_counter()
        run_hmc(cfg_i, maps, d / "hmc", progress=False)
        timing["hmc_s"] = time.perf_counter() - t0
    if not (d / "exact.h5").is_file():
        run_exact(cfg_i, maps, d / "exact.h5")
    hmc = read_samples(d / "hmc" / "samples.h5")
    exact = read_samples(d / "exact.h5")
    diag = hmc.info["parameters"]
    ess = np.array([diag[n]["ess"] for n in hmc.names])
    kept = thin_to_ess(hmc.samples, float(ess.min()))
    # HMC mean against the exact mean, in units of the HMC Monte Carlo error std / sqrt(ESS)
    z_mean = (hmc.samples.mean(0) - exact.samples.mean(0)) / (hmc.samples.std(0) / np.sqrt(ess))
    return {"i": i, "theta": theta.tolist(), "seed": seed, "ess": ess.tolist(), "n_kept": len(kept),
            "q_hmc": quantile_of_truth(kept, theta).tolist(),
            "q_exact": quantile_of_truth(exact.samples, theta).tolist(),
            "z_mean": z_mean.tolist(),
            "shift": ((hmc.samples.mean(0) - exact.samples.mean(0)) / exact.samples.std(0)).tolist(),
            "std_ratio": (hmc.samples.std(0) / exact.samples.std(0)).tolist(),
            "n_gradients": int(hmc.info["n_gradients"]),
            "divergences": int(hmc.info["divergences"]["sampling"]), **timing}


def main(argv=None):
    import jax

    import simulators

    simulators.enable_x64()
    from experiments.config import load_config, parse_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="gaussian_check")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (TOML value), e.g. --set maps.npix=8")
    ap.add_argument("--n-obs", type=int, default=60, help="observations (θ drawn from the prior)")
    ap.add_argument("--first", type=int, default=0,
                    help="skip observations before this one (a second process can share the work)")
    ap.add_argument("--seed-offset", type=int, default=5000, help="map seed of observation 0")
    ap.add_argument("--work", type=Path, default=Path("runs/hmc_coverage"))
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    if args.set:
        cfg = cfg.with_(**parse_overrides(args.set))
    if cfg.simulation.kind != "gaussian":
        raise SystemExit("the coverage benchmark needs simulation.kind = 'gaussian' (exact posterior)")
    prior = cfg.prior()
    # one key per observation: observation i is the same whatever --n-obs, so a run can be cut
    # short and summarised by rerunning with a smaller --n-obs
    key = jax.random.PRNGKey(args.seed_offset)
    thetas = np.stack([np.asarray(prior.sample(jax.random.fold_in(key, i), 1)[0], np.float64)
                       for i in range(args.n_obs)])
    t0 = time.perf_counter()
    rows = []
    for i, theta in enumerate(thetas):
        if i < args.first:
            continue
        row = run_one(cfg, i, theta, args.seed_offset + i, args.work)
        rows.append(row)
        _log(f"obs {i + 1}/{args.n_obs}: theta {np.round(theta, 4).tolist()}, ESS "
             f"{np.round(row['ess'], 0).tolist()}, q_hmc {np.round(row['q_hmc'], 2).tolist()}, "
             f"q_exact {np.round(row['q_exact'], 2).tolist()}, z_mean "
             f"{np.round(row['z_mean'], 1).tolist()} ({time.perf_counter() - t0:.0f} s)")
    names = list(prior.names)
    q_hmc = np.array([r["q_hmc"] for r in rows])
    q_exact = np.array([r["q_exact"] for r in rows])
    z = np.array([r["z_mean"] for r in rows])
    results = {
        "config": cfg.name, "overrides": args.set, "n_obs": args.n_obs, "names": names,
        "hmc": cfg.hmc.settings().to_dict(),
        "sbc_hmc": summarise(q_hmc, names), "sbc_exact": summarise(q_exact, names),
        # Σ z² ~ χ²(n_obs) per parameter when the HMC means are right to within their MC error
        "hmc_vs_exact": {n: {"chi2_mean": float(np.sum(z[:, j] ** 2)), "dof": len(rows),
                             "mean_z": float(np.mean(z[:, j])),
                             # HMC mean - exact mean, in exact posterior std
                             "mean_shift": float(np.mean([r["shift"][j] for r in rows])),
                             "median_std_ratio": float(np.median([r["std_ratio"][j] for r in rows]))}
                         for j, n in enumerate(names)},
        "median_ess": np.median([r["ess"] for r in rows], axis=0).tolist(),
        "median_gradients": float(np.median([r["n_gradients"] for r in rows])),
        "wall_s": time.perf_counter() - t0, "rows": rows,
    }
    for label in ("sbc_hmc", "sbc_exact"):
        _log(f"{label}: " + "; ".join(
            f"{n} KS p {v['ks_pval']:.2f}, 68% cover {v['coverage_68']:.2f}, "
            f"95% cover {v['coverage_95']:.2f}" for n, v in results[label].items()))
    _log("hmc vs exact: " + "; ".join(
        f"{n} sum z^2 {v['chi2_mean']:.1f} / {v['dof']}, mean z {v['mean_z']:+.2f}, mean shift "
        f"{v['mean_shift']:+.3f} sigma, std ratio {v['median_std_ratio']:.3f}"
        for n, v in results["hmc_vs_exact"].items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        _log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
