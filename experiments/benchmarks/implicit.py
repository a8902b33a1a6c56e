"""Implicit inference and the C_ell baselines on one observation: stage timings, FoM, calibration,
and posterior quality against the number of training simulations.

    python -m experiments.benchmarks.implicit --config quick --work runs/quick \
        --n-train 500,900 --losses mse,mae,gnll,vmim --out experiments/benchmarks/results_implicit.json

    python -m experiments.benchmarks.implicit --config gaussian_check --work runs/gc_online \
        --n-train 1900 --losses vmim --reference exact --skip-cl --set compressor.online=true

Stages (each cached in --work, so an interrupted run continues): the observation (the config's
seed), the training set (``lensbench generate``; n = max(n_train) + training_set.n_calibration),
for each loss and training-set size a compressor, its NPE posterior and its calibration on the
held-out simulations, NPE on the C_ell data vector, and the analytic C_ell likelihood with NUTS.

Metrics per method: posterior mean/std, bias (mean - truth) / std, FoM(Omega_c, sigma8) =
1/sqrt(det Cov), sigma(S8), TARP ATC and SBC KS p-values, wall times; C2ST (sklearn MLP, 5 folds,
``estimators.metrics.c2st``) of every posterior against the reference, which is the VMIM NPE
posterior at the largest training set unless --reference names another method, or
--reference-samples gives a posterior file of the same observation (e.g. a committed quick
field-level posterior for ``--config quick``: ``reference_quick_field_level_ev2e-5.h5``, the
least biased (NOTEBOOK 28), or ``reference_quick_field_level.h5``, NOTEBOOK 15; refused when its
configuration gives other maps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _stage(name, path: Path, fn, timings: dict):
    """Run fn unless path exists (a finished stage); record its wall time."""
    if path.exists():
        print(f"[{name}] cached: {path}", flush=True)
        return
    t0 = time.perf_counter()
    fn()
    timings[name] = time.perf_counter() - t0
    print(f"[{name}] {timings[name]:.1f} s", flush=True)


def _metrics(samples, reference=None) -> dict:
    from estimators.metrics import c2st, fom, s8

    s, names = samples.samples, list(samples.names)
    mean, std = s.mean(0), s.std(0)
    out = {"n_samples": len(s), "mean": dict(zip(names, mean.tolist())),
           "std": dict(zip(names, std.tolist()))}
    if samples.truth is not None:
        out["bias_sigma"] = dict(zip(names, ((mean - samples.truth) / std).tolist()))
    if "Omega_c" in names and "sigma8" in names:
        ij = [names.index("Omega_c"), names.index("sigma8")]
        out["fom_omega_c_sigma8"] = fom(s[:, ij])
        if "Omega_b" in names:
            omega_m = s[:, names.index("Omega_c")] + s[:, names.index("Omega_b")]
        else:
            from experiments.config import load_config_text

            omega_m = s[:, ij[0]] + load_config_text(samples.config_toml).cosmology.Omega_b
        out["sigma_S8"] = float(np.std(s8(omega_m, s[:, ij[1]])))
    if reference is not None:
        rng = np.random.default_rng(0)
        n = min(len(s), len(reference), 5000)
        a = s[rng.choice(len(s), n, replace=False)]
        b = reference[rng.choice(len(reference), n, replace=False)]
        out["c2st_vs_reference"] = c2st(a, b, seed=0)
    return out


def _check_same_observation(ref, cfg, error) -> None:
    """Refuse a reference posterior drawn for another observation (``io.observation_mismatch``)."""
    from experiments.io import observation_mismatch

    key = observation_mismatch(ref, cfg)
    if key is not None:
        error(f"--reference-samples: its configuration's [{key}] differs from this run's; "
              "it is a posterior for another observation")


def main(argv=None):
    import simulators
    simulators.enable_x64()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="quick")
    ap.add_argument("--work", type=Path, default=Path("runs/quick"))
    ap.add_argument("--n-train", default="900", help="comma-separated training-set sizes")
    ap.add_argument("--losses", default="mse,mae,gnll,vmim")
    ap.add_argument("--reference", default=None, help="method whose posterior is the C2ST "
                    "reference; 'exact': the exact posterior (Gaussian-field configurations)")
    ap.add_argument("--reference-samples", type=Path, default=None, metavar="H5",
                    help="a Samples file on the same observation (e.g. the committed field-level "
                         "reference posterior) as the C2ST reference, named 'field_level'")
    ap.add_argument("--skip-cl", action="store_true", help="skip both C_ell baselines")
    ap.add_argument("--out", type=Path, default=Path("experiments/benchmarks/results_implicit.json"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set compressor.epochs=100 (TOML value)")
    args = ap.parse_args(argv)
    if args.reference_samples is not None and args.reference is not None:
        ap.error("give --reference or --reference-samples, not both")

    from experiments import pipeline
    from experiments.maps import run_maps
    from experiments.config import load_config, parse_overrides
    from experiments.io import read_samples

    cfg = load_config(args.config)
    if args.set:
        cfg = cfg.with_(**parse_overrides(args.set))
    if args.reference_samples is not None:
        _check_same_observation(read_samples(args.reference_samples), cfg, ap.error)
    sizes = sorted(int(v) for v in args.n_train.split(","))
    losses = [v for v in args.losses.split(",") if v]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    obs, sims = work / "obs.h5", work / "sims.h5"
    _stage("observation", obs, lambda: run_maps(cfg, obs, progress=False), timings)
    n_sims = sizes[-1] + cfg.training_set.n_calibration
    t0 = time.perf_counter()
    report = pipeline.run_generate(cfg, sims, n=n_sims, progress=False)  # resumes / no-op if done
    timings["generate"] = time.perf_counter() - t0

    methods: dict[str, dict] = {}
    for n in sizes:
        for loss in losses:
            tag = f"{loss}_n{n}"
            comp, post, smp = work / f"comp_{tag}", work / f"post_{tag}", work / f"samples_{tag}.h5"
            _stage(f"compressor {tag}", comp / "compressor.json", lambda: pipeline.run_train_compressor(
                cfg, sims, comp, loss=loss, n_train=n, progress=False), timings)
            _stage(f"npe {tag}", post / "lensbench.json", lambda: pipeline.run_fit_posterior(
                cfg, sims, post, compressor=comp, n_train=n, progress=False), timings)
            _stage(f"sample {tag}", smp, lambda: pipeline.run_sample(post, obs, smp), timings)
            methods[f"npe_{tag}"] = {"samples": smp, "posterior": post, "compressor": comp, "n_train": n}
        if not args.skip_cl:
            post, smp = work / f"post_cl_n{n}", work / f"samples_npe_cl_n{n}.h5"
            _stage(f"npe cl n{n}", post / "lensbench.json", lambda: pipeline.run_fit_posterior(
                cfg, sims, post, summary="cl", n_train=n, progress=False), timings)
            _stage(f"sample cl n{n}", smp, lambda: pipeline.run_sample(post, obs, smp), timings)
            methods[f"npe_cl_n{n}"] = {"samples": smp, "posterior": post, "n_train": n}
    if not args.skip_cl:
        smp = work / "samples_cl_analytic.h5"
        _stage("cl analytic", smp, lambda: pipeline.run_cl_baseline(cfg, obs, smp, progress=False),
               timings)
        methods["cl_analytic"] = {"samples": smp}

    if args.reference == "exact":  # the grid posterior of Gaussian-field maps (explicit.exact)
        smp = work / "samples_exact.h5"
        _stage("exact", smp, lambda: pipeline.run_exact(cfg, obs, smp), timings)
        methods["exact"] = {"samples": smp}
    if args.reference_samples is not None:
        methods["field_level"] = {"samples": args.reference_samples}
        args.reference = "field_level"
    ref_name = args.reference or (f"npe_vmim_n{sizes[-1]}" if "vmim" in losses else None)
    reference = read_samples(methods[ref_name]["samples"]).samples if ref_name in methods else None
    results = {"config": cfg.name, "overrides": args.set, "observation_seed": cfg.seed, "generate": {
        "n_sims": n_sims, "n_ok": report.n_ok, "n_failed": report.n_failed,
        "sims_per_s": report.sims_per_s}, "reference": ref_name, "c2st_classifier":
        "sklearn MLP, two hidden layers of 10*d, 5-fold (estimators.metrics.c2st)",
        "timings_s": timings, "methods": {}}
    for name, m in methods.items():
        s = read_samples(m["samples"])
        entry = _metrics(s, reference if name != ref_name else None)
        entry["method"] = s.method
        if "posterior" in m:
            meta = json.loads((Path(m["posterior"]) / "lensbench.json").read_text())
            entry.update(n_train=m["n_train"], npe_fit_s=meta["fit_time_s"],
                         calibration=meta.get("calibration"))
        if "compressor" in m:
            hist = json.loads((Path(m["compressor"]) / "history.json").read_text())
            secs = hist.get("seconds", [])
            entry["compressor_epochs"] = len(secs)
            entry["compressor_simulations"] = (hist.get("simulations") or [None])[-1]
            entry["compressor_s"] = float(np.sum(secs)) if secs else None
            entry["compressor_s_per_epoch"] = float(np.median(secs)) if secs else None
        if s.method == "hmc":  # a field-level reference: its convergence certificate
            params = s.info.get("parameters") or {}
            entry.update(ess={n: p.get("ess") for n, p in params.items()},
                         r_hat={n: p.get("r_hat") for n, p in params.items()},
                         sampler=s.info.get("sampler"), num_chains=s.info.get("num_chains"),
                         n_gradients=s.info.get("n_gradients"))
        if s.method == "cl_analytic":
            entry.update({k: s.info.get(k) for k in ("divergences", "ess", "r_hat", "wall_time_s",
                                                        "grad_evals", "n_cov", "hartlap",
                                                        "covariance_time_s")})
        results["methods"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n| method | n_train | FoM(Ωc,σ8) | σ(S8) | bias Ωc, σ8 [σ] | TARP ATC | C2ST vs {ref_name} |")
    print("|---|---|---|---|---|---|---|")
    for name, e in results["methods"].items():
        b = e.get("bias_sigma", {})
        cal = e.get("calibration") or {}
        c2 = e.get("c2st_vs_reference")
        print(f"| {name} | {e.get('n_train', '-')} | {e.get('fom_omega_c_sigma8', float('nan')):.0f} | "
              f"{e.get('sigma_S8', float('nan')):.4f} | {b.get('Omega_c', 0):+.2f}, {b.get('sigma8', 0):+.2f} | "
              f"{cal.get('tarp_atc', float('nan')):+.3f} | {'-' if c2 is None else f'{c2:.3f}'} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
