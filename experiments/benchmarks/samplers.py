"""Field-level samplers side by side on one observation: gradients per effective sample, split R̂,
and, against a reference posterior (exact on Gaussian-field maps, or a converged chain's samples),
C2ST, mean offsets in reference σ and std ratios.

    python -m experiments.benchmarks.samplers --config gaussian_check --reference exact \
        --variant nuts --variant mams:target_accept=0.9 --variant mams+fourier \
        --chains 4 --out samplers_gaussian.json
    python -m experiments.benchmarks.samplers --config quick --variant mams+fourier:num_samples=400 \
        --chains 4 --out samplers_quick.json --work runs/samplers_quick

A variant is ``SAMPLER[+fourier][:key=value,...]`` with [hmc] keys (``num_warmup``,
``num_samples``, ``max_tree_depth``, ``target_accept``, ``segment``, ``start_steps``, ``seed``,
``energy_variance``, ``integrator``, ``processes``: chains run at once, one process each, which
changes no draw); ``+fourier`` sets
``hmc.precondition = "fourier"``. Every variant runs ``--chains`` chains through
``experiments.pipeline.run_hmc`` (checkpointed: an interrupted benchmark resumes each run from
``--work``). The observation is ``--maps`` or a map at the config's seed. ``--reference exact``
computes the exact posterior (Gaussian-field configs); ``--reference FILE`` reads a samples file.
Each finished row is written to ``--out`` at once; a table goes to stdout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

HMC_KEYS = ("num_warmup", "num_samples", "max_tree_depth", "target_accept", "segment",
            "start_steps", "seed", "energy_variance", "integrator", "processes")


def parse_variant(text: str) -> tuple[str, dict]:
    """'mams+fourier:num_samples=400' → ('mams+fourier:num_samples=400', {hmc.* changes})."""
    head, _, items = text.partition(":")
    sampler, _, pre = head.partition("+")
    if pre not in ("", "fourier"):
        raise SystemExit(f"--variant {text!r}: after '+' only 'fourier' is known, got {pre!r}")
    changes = {"hmc.sampler": sampler, "hmc.precondition": pre or "none"}
    for item in filter(None, items.split(",")):
        key, _, value = item.partition("=")
        if key not in HMC_KEYS:
            raise SystemExit(f"--variant {text!r}: unknown key {key!r}; valid: {', '.join(HMC_KEYS)}")
        changes[f"hmc.{key}"] = _value(value)
    return text, changes


def _value(text: str):
    """'400' → 400, '2e-5' → 2e-05, 'mclachlan' → 'mclachlan'."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def fom(x: np.ndarray) -> float:
    """1 / sqrt(det cov) of the first two columns."""
    return float(1.0 / np.sqrt(np.linalg.det(np.cov(x[:, :2], rowvar=False))))


def against_reference(x: np.ndarray, ref: np.ndarray, seed: int = 0) -> dict:
    from estimators.metrics import c2st

    rng = np.random.default_rng(seed)
    pick = lambda a: a[rng.permutation(len(a))[:2000]]  # noqa: E731  (thinned chains: shuffled)
    mu, sd = ref.mean(0), ref.std(0)
    return {"c2st": float(c2st(pick(x), pick(ref), seed=seed)),
            "mean_offset_sigma": ((x.mean(0) - mu) / sd).tolist(),
            "std_ratio": (x.std(0) / sd).tolist(),
            "fom": fom(x), "fom_reference": fom(ref), "fom_ratio": fom(x) / fom(ref)}


def main(argv=None) -> None:
    import simulators
    simulators.enable_x64()
    from experiments.maps import run_maps
    from experiments.config import ConfigError, load_config
    from experiments.files import write_json
    from experiments.io import read_maps, read_samples
    from experiments.pipeline import run_exact, run_hmc

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gaussian_check")
    p.add_argument("--maps", type=Path, default=None, help="observation (default: simulated)")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--reference", default=None, help="'exact' or a samples file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: temporary)")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    cfg = load_config(args.config).with_(**{"hmc.num_chains": args.chains})
    try:  # every variant's settings checked before any run starts
        configs = {name: cfg.with_(**changes) for name, changes in variants}
    except ConfigError as e:
        raise SystemExit(f"--variant: {e}") from None
    work = args.work or Path(tempfile.mkdtemp(prefix="samplers_"))
    work.mkdir(parents=True, exist_ok=True)
    obs = args.maps or work / "obs.h5"
    if not obs.exists():
        run_maps(cfg, obs, progress=False)
    ref = None
    if args.reference == "exact":
        path = work / "exact.h5"
        if not path.exists():
            run_exact(cfg, obs, path)
        ref = read_samples(path).samples
    elif args.reference:
        ref = read_samples(args.reference).samples
    obs_seed = int(read_maps(obs).attrs["seed"])  # every map file has it (io.MAP_ATTRS)
    rows = []
    for name, changes in variants:
        out = work / name.replace(":", "_").replace("=", "").replace(",", "_").replace("+", "_")
        t0 = time.perf_counter()
        s = run_hmc(configs[name], obs, out, progress=False)
        wall = time.perf_counter() - t0
        info = s.info
        params = info["parameters"]
        grads = info["gradient_evaluations"]
        ess = {k: v["ess"] for k, v in params.items()}
        row = {"variant": name, "config": args.config, "observation_seed": obs_seed,
               "reference": None if ref is None else Path(args.reference).name,
               "chains": args.chains, "changes": changes,
               "draws_per_chain": len(s.samples) // args.chains,
               "ess": ess, "r_hat": {k: v["r_hat"] for k, v in params.items()},
               "gradients": grads, "wall_s": wall, "sampling_wall_s": info.get("wall_time_s"),
               "gradients_per_min_ess": grads["total"] / min(ess.values()),
               "sampling_gradients_per_min_ess": grads["sampling"] / min(ess.values()),
               "divergences": info.get("divergences"), "tuned": info.get("tuned"),
               "mean": s.samples.mean(0).tolist(), "std": s.samples.std(0).tolist()}
        if ref is not None:
            row.update(against_reference(s.samples, ref))
        rows.append(row)
        line = (f"{name:34s} ESS {[round(e) for e in ess.values()]} R̂ "
                f"{[round(r, 3) for r in row['r_hat'].values()]} grads/ESS "
                f"{row['gradients_per_min_ess']:.0f} (sampling {row['sampling_gradients_per_min_ess']:.0f})"
                f" wall {wall:.0f} s")
        if ref is not None:
            line += (f"; C2ST {row['c2st']:.3f} offsets {np.round(row['mean_offset_sigma'], 2).tolist()}"
                     f" σ std ratios {np.round(row['std_ratio'], 3).tolist()}")
        print(line, flush=True)
        write_json(args.out, {"config": args.config, "rows": rows})  # each finished row kept


if __name__ == "__main__":
    main()
