"""Is the analytic C_ℓ likelihood a calibrated posterior on a configuration's maps? SBC and TARP
on held-out simulations, and its information against a reference posterior, per likelihood
variant.

A C_ℓ likelihood's NUTS chain can converge to the wrong posterior: its theory (Limber + halofit
× the mesh window), its covariance (simulated and Hartlap-corrected, or analytic Gaussian) and
its distribution (Gaussian, Sellentin–Heavens, Wishart) are models of PM maps, not facts. This
calibrates each variant the way NPE is calibrated (``pipeline.calibrate_cl_baseline``: the last
``training_set.n_calibration`` simulations of a sims file, grid posteriors, SBC ranks and TARP),
and, with ``--maps`` and ``--reference``, scores its posterior of the observation (tabulated on
the same grid) against a reference posterior (the converged field-level one) by FoM and C2ST:

    python -m experiments.benchmarks.cl_calibration --config quick --sims sims.h5 \
        --set training_set.n_calibration=200 --maps obs.h5 \
        --reference experiments/benchmarks/reference_quick_field_level_mclachlan.h5 \
        --variant gaussian_sim200 --variant wishart:covariance=gaussian,likelihood=wishart \
        --work runs/clcal --out results_cl_calibration_quick.json

Variants: a name and comma-separated keys as in ``cl_baseline_vs_exact`` (``covariance``,
``n_cov``, ``likelihood``, ``n_ell_bins``, ``spacing``, ``ell_max``). ``--set KEY=VALUE``
changes the configuration for every variant. Each finished variant is written to ``--out`` at
once (JSON) and a table row to stdout.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    import simulators
    simulators.enable_x64()
    from estimators.metrics import c2st, fom
    from experiments.benchmarks.cl_baseline_vs_exact import _variant
    from experiments.config import load_config, parse_overrides
    from experiments.files import write_json
    from experiments.io import observation_mismatch, read_samples
    from experiments.pipeline import calibrate_cl_baseline, cl_likelihood, read_observation

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="quick")
    p.add_argument("--sims", type=Path, required=True, help="a sims file of the configuration")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--maps", type=Path, default=None, help="the observation (with --reference)")
    p.add_argument("--reference", type=Path, default=None, help="reference samples of --maps")
    p.add_argument("--n-grid", type=int, default=None,
                   help="grid cells per parameter (default: sized by the Fisher matrix)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: temporary)")
    args = p.parse_args(argv)
    if (args.maps is None) != (args.reference is None):
        raise SystemExit("--maps and --reference go together")
    variants = [_variant(v) for v in args.variant]
    base = load_config(args.config)
    if args.set:
        base = base.with_(**parse_overrides(args.set))
    work = args.work or Path(tempfile.mkdtemp(prefix="cl_calibration_"))
    ref = None
    if args.reference is not None:
        ref_s = read_samples(args.reference)
        key = observation_mismatch(ref_s, base)
        if key is not None:
            raise SystemExit(f"--reference {args.reference}: its configuration's [{key}] differs "
                             f"from this run's: a posterior of another observation")
        ref = ref_s.samples
    rows = []
    for name, changes in variants:
        cfg = base.with_(**changes)
        cal = calibrate_cl_baseline(cfg, args.sims, work / name, n_grid=args.n_grid)
        row = {"variant": name, "changes": changes, "likelihood": cal["likelihood"],
               "grid": cal["grid"], "n_test": cal["n_test"], "time_s": cal["time_s"],
               "tarp_atc": cal["tarp"]["atc"], "tarp_ks_pval": cal["tarp"]["ks_pval"],
               "sbc_ks_pvals": cal["sbc"]["ks_pvals"], "sbc_c2st_ranks": cal["sbc"]["c2st_ranks"]}
        # rank quantiles of the truths: mean 0.5 unbiased (> 0.5: the posteriors sit low), and
        # the share inside the central 68 % (0.68: widths right)
        q = np.asarray(cal["sbc"]["ranks"]) / cal["n_posterior_samples"]
        row["rank_quantile_mean"] = dict(zip(cal["names"], q.mean(0).tolist()))
        row["central_68_coverage"] = dict(zip(cal["names"],
                                              ((q > 0.16) & (q < 0.84)).mean(0).tolist()))
        if ref is not None:
            from estimators.cl_baseline import ClGridPosterior, cl_data_vector

            like, _, _ = cl_likelihood(cfg, work / name / "cov.npz")
            obs = read_observation(cfg, args.maps)
            data = np.asarray(cl_data_vector(obs.kappa_noisy, cfg.maps.field_deg, like.ell_edges))
            post = ClGridPosterior(like, n_grid=args.n_grid).posterior(data)
            x = post.sample(0, 20000)
            row.update(fom=fom(x), fom_reference=fom(ref), fom_ratio=fom(x) / fom(ref),
                       c2st=float(c2st(x[:2000], ref[np.random.default_rng(0).permutation(
                           len(ref))[:2000]], seed=0)),
                       mean=post.mean.tolist(), std=post.std.tolist(),
                       mean_offset_sigma=((post.mean - ref.mean(0)) / ref.std(0)).tolist(),
                       std_ratio=(post.std / ref.std(0)).tolist(),
                       cells_per_std=post.diagnostics["cells_per_std"])
        rows.append(row)
        sbc = ", ".join(f"{v:.2f}" for v in row["sbc_ks_pvals"].values())
        extra = (f"; FoM {row['fom']:.1f} / reference {row['fom_reference']:.1f} = "
                 f"{row['fom_ratio']:.3f}, C2ST {row['c2st']:.3f}" if ref is not None else "")
        print(f"{name:20s} TARP ATC {row['tarp_atc']:+.3f}, SBC KS p {sbc} "
              f"({row['n_test']} held out){extra}", flush=True)
        write_json(args.out, {"config": args.config, "sets": args.set, "sims": str(args.sims),
                              "reference": None if ref is None else str(args.reference),
                              "rows": rows})


if __name__ == "__main__":
    main()
