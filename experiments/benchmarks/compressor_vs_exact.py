"""How far a VMIM compressor (and an NPE on its summaries) is from the exact posterior of
Gaussian-field maps, map by map, on held-out simulations.

For each of the last ``--n`` simulations of a sims file (the held-out calibration set of a
``gaussian_check``-like configuration) one shape-noise draw makes the observation; on it:

- the exact posterior (``explicit.exact.grid_posterior``): FoM(Ω_c, σ_8) from its grid
  covariance, and ln p(θ_true | x) from the grid's own likelihood and evidence;
- the compressor's own flow q(θ | t(x)) restricted to the prior (``estimators.npe``'s
  ``CompressorFlowPosterior``): FoM from ``--draws`` draws, and ln q(θ_true | t);
- with ``--npe DIR``: the fitted NPE's posterior at t(x), the same two numbers.

Printed and written (``--out``): per map and averaged, the FoM ratio to the exact posterior
(mean and geometric mean) and the mean log-density gap ln p_exact − ln q at the truth with its
standard error. The gap is the expected KL from the exact posterior to the method's, less the
(unknown) entropy differences averaged over the data: 0 for a method with the exact posterior,
and an estimate of the information a compressor throws away that is paired map by map, so far
less noisy than comparing two validation losses. One observation's FoM says little on its own:
the exact FoM varies by a factor of several across the prior.

    python -m experiments.benchmarks.compressor_vs_exact --config gaussian_check \\
        --sims runs/g/sims.h5 --compressor runs/g/comp_vmim_n1900 [--npe runs/g/post_vmim_n1900] \\
        --n 50 --out runs/g/vs_exact.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _fom(cov: np.ndarray) -> float:
    return float(1.0 / np.sqrt(np.linalg.det(cov)))


def _exact(model, cfg, prior, noisy, sigma, truth):
    from explicit.exact import grid_posterior

    post = grid_posterior(model, noisy, sigma, prior.names, log_prior=prior.log_prob,
                          base=cfg.cosmology(), scales=cfg.scale_cuts())
    ll, lp = post.evaluate(np.asarray(truth, np.float64)[None])
    return _fom(post.cov), float(ll[0] + lp[0] - post.log_evidence)


def _posterior_numbers(posterior, t, truth, n_draws, seed):
    import torch

    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(t, np.float32)[None])
    draws = posterior.sample((n_draws,), x=x).numpy().astype(np.float64)
    logq = float(posterior.log_prob(torch.as_tensor(np.asarray(truth, np.float32)[None]), x=x)[0])
    return _fom(np.cov(draws, rowvar=False)), logq


def main(argv=None) -> int:
    import simulators

    simulators.enable_x64()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sims", type=Path, required=True)
    ap.add_argument("--compressor", type=Path, required=True, help="a VMIM compressor directory")
    ap.add_argument("--npe", type=Path, default=None,
                    help="a `lensbench fit-posterior` directory fitted on its summaries")
    ap.add_argument("--n", type=int, default=50, help="held-out simulations (the file's last n)")
    ap.add_argument("--draws", type=int, default=4000, help="draws per map for a flow's FoM")
    ap.add_argument("--seed", type=int, default=12345, help="seed of the shape noise")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from compressors import load_compressor
    from estimators.npe import CompressorFlowPosterior, load_npe
    from experiments.config import load_config
    from experiments.dataset import read_sims
    from simulators.lensing import noise_sigma

    cfg = load_config(args.config)
    prior = cfg.prior()
    if tuple(prior.names) != ("Omega_c", "sigma8"):
        ap.error(f"--config: the FoM needs the prior on (Omega_c, sigma8), not {prior.names}")
    model = cfg.build_model()
    sigma = noise_sigma(model.bins, model.sky)
    sims = read_sims(args.sims)
    if not 1 <= args.n <= len(sims):
        ap.error(f"--n {args.n}: the sims file holds {len(sims)} simulations")
    comp = load_compressor(args.compressor)
    if comp.config.loss != "vmim":
        ap.error(f"--compressor {args.compressor}: a {comp.config.loss!r} compressor has no flow")
    flow_post = CompressorFlowPosterior(args.compressor, prior.torch())
    npe = None
    if args.npe is not None:
        from experiments.pipeline import _posterior_meta

        fitted_on = _posterior_meta(args.npe).get("compressor")
        if fitted_on is None or Path(fitted_on).resolve() != args.compressor.resolve():
            ap.error(f"--npe {args.npe} was fitted on {fitted_on or 'C_ell'}, not on the summaries "
                     f"of --compressor {args.compressor}")
        npe = load_npe(args.npe / "npe")

    kappa, theta = sims.kappa[-args.n:], sims.theta[-args.n:]
    rng = np.random.default_rng(args.seed)
    noisy = (kappa + np.asarray(sigma, np.float32)[None, :, None, None]
             * rng.standard_normal(kappa.shape, np.float32))
    t_all = comp.compress(noisy)
    rows, t0 = [], time.perf_counter()
    for i in range(args.n):
        fe, le = _exact(model, cfg, prior, noisy[i], sigma, theta[i])
        row = {"theta": theta[i].tolist(), "fom_exact": fe, "logp_exact": le}
        row["fom_flow"], row["logq_flow"] = _posterior_numbers(flow_post, t_all[i], theta[i],
                                                               args.draws, i)
        if npe is not None:
            row["fom_npe"], row["logq_npe"] = _posterior_numbers(npe.posterior, t_all[i],
                                                                 theta[i], args.draws, i)
        rows.append(row)
        print(f"{i + 1}/{args.n}: FoM exact {fe:.0f}, flow {row['fom_flow']:.0f}"
              + (f", npe {row['fom_npe']:.0f}" if npe is not None else "")
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    summary = {"config": cfg.name, "sims": str(args.sims), "compressor": str(args.compressor),
               "npe": None if args.npe is None else str(args.npe), "n": args.n,
               "noise_seed": args.seed, "maps": rows}
    for tag in ("flow", "npe") if npe is not None else ("flow",):
        ratio = np.array([r[f"fom_{tag}"] / r["fom_exact"] for r in rows])
        gap = np.array([r["logp_exact"] - r[f"logq_{tag}"] for r in rows])
        gap = gap[np.isfinite(gap)]
        summary[tag] = {"fom_ratio_mean": float(ratio.mean()),
                        "fom_ratio_geomean": float(np.exp(np.log(ratio).mean())),
                        "fom_ratio_se": float(ratio.std(ddof=1) / np.sqrt(len(ratio))),
                        "logp_gap_mean": float(gap.mean()),
                        "logp_gap_se": float(gap.std(ddof=1) / np.sqrt(len(gap))),
                        "n_finite_gap": int(len(gap))}
        s = summary[tag]
        print(f"{tag}: FoM / exact {s['fom_ratio_mean']:.3f} ± {s['fom_ratio_se']:.3f} (geometric "
              f"mean {s['fom_ratio_geomean']:.3f}); ln p_exact − ln q at the truth "
              f"{s['logp_gap_mean']:.3f} ± {s['logp_gap_se']:.3f} nats over {len(gap)} maps")
    if args.out is not None:
        from experiments.files import write_text

        write_text(args.out, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
