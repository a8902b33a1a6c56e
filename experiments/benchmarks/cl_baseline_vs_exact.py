"""The analytic C_ℓ likelihood against the exact posterior of Gaussian-field maps, over several
observation seeds and C_ℓ settings (covariance and binning).

On Gaussian maps the per-mode power spectrum is a sufficient statistic, so a C_ℓ likelihood can
only lose information through its binning, its Gaussian approximation and its covariance (the
Hartlap factor of a simulated one). This measures how much, per variant:

    python -m experiments.benchmarks.cl_baseline_vs_exact --out cl_vs_exact.json \
        --seeds 0 1 2 --variant simulated_8:covariance=simulated,n_ell_bins=8 \
        --variant gaussian_16:covariance=gaussian,n_ell_bins=16

Each variant is a name and comma-separated ``cl_baseline`` / ``cl`` keys (``covariance``,
``n_cov``, ``n_ell_bins``, ``spacing``, ``ell_max``). The configuration is ``gaussian_check`` (``--config``);
the exact posterior is computed once per seed. Results (FoM ratio, mean offsets in exact σ,
std ratios, C2ST against the exact samples, NUTS ESS) go to ``--out`` as JSON and a table to stdout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

CL_KEYS = {"covariance": "cl_baseline", "n_cov": "cl_baseline", "n_ell_bins": "cl",
           "spacing": "cl", "ell_max": "cl", "likelihood": "cl_baseline"}


def _variant(text: str) -> tuple[str, dict]:
    name, _, items = text.partition(":")
    changes = {}
    for item in filter(None, items.split(",")):
        key, _, value = item.partition("=")
        if key not in CL_KEYS:
            raise SystemExit(f"--variant {text!r}: unknown key {key!r}; valid: {', '.join(CL_KEYS)}")
        try:
            value = float(value) if "." in value else int(value)
        except ValueError:
            pass
        changes[f"{CL_KEYS[key]}.{key}"] = value
    return name, changes


def _fom(x: np.ndarray) -> float:
    return float(1.0 / np.sqrt(np.linalg.det(np.cov(x, rowvar=False))))


def main(argv=None) -> None:
    import simulators
    simulators.enable_x64()
    from estimators.metrics import c2st
    from experiments.maps import run_maps
    from experiments.config import load_config
    from experiments.files import write_json
    from experiments.io import read_samples
    from experiments.pipeline import run_cl_baseline, run_exact

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gaussian_check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: temporary)")
    args = p.parse_args(argv)
    variants = [_variant(v) for v in args.variant]
    base = load_config(args.config)
    work = args.work or Path(tempfile.mkdtemp(prefix="cl_vs_exact_"))
    rows = []
    for seed in args.seeds:
        cfg = base.with_(seed=seed)
        obs = work / f"obs_{seed}.h5"
        if not obs.exists():
            run_maps(cfg, obs, progress=False)
        exact_path = work / f"exact_{seed}.h5"
        if not exact_path.exists():
            run_exact(cfg, obs, exact_path)
        exact = read_samples(exact_path).samples
        for name, changes in variants:
            out = work / f"cl_{name}_{seed}.h5"
            t0 = time.perf_counter()
            run_cl_baseline(cfg.with_(**changes), obs, out, progress=False)
            wall = time.perf_counter() - t0
            s = read_samples(out)
            x = s.samples
            mu_e, sd_e = exact.mean(0), exact.std(0)
            rows.append({
                "seed": seed, "variant": name, "changes": changes, "wall_s": wall,
                "fom_exact": _fom(exact), "fom": _fom(x), "fom_ratio": _fom(x) / _fom(exact),
                "mean_offset_sigma": ((x.mean(0) - mu_e) / sd_e).tolist(),
                "std_ratio": (x.std(0) / sd_e).tolist(),
                "c2st": float(c2st(x[:2000], exact[:2000], seed=0)),
                "ess": s.info.get("ess"), "r_hat": s.info.get("r_hat"), "names": list(s.names)})
            r = rows[-1]
            print(f"seed {seed} {name:16s} FoM {r['fom']:7.1f} / exact {r['fom_exact']:7.1f} = "
                  f"{r['fom_ratio']:.3f}; offsets {np.round(r['mean_offset_sigma'], 2).tolist()} "
                  f"sigma; std ratios {np.round(r['std_ratio'], 3).tolist()}; C2ST {r['c2st']:.3f}",
                  flush=True)
            write_json(args.out, {"config": args.config, "rows": rows})  # each row kept
    summary = {}
    for name, _ in variants:
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {"fom_ratio_mean": float(np.mean([r["fom_ratio"] for r in mine])),
                         "c2st_mean": float(np.mean([r["c2st"] for r in mine])),
                         "seeds": [r["seed"] for r in mine]}
        print(f"{name:16s} mean FoM ratio {summary[name]['fom_ratio_mean']:.3f}, mean C2ST "
              f"{summary[name]['c2st_mean']:.3f} over seeds {summary[name]['seeds']}")
    write_json(args.out, {"config": args.config, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
