"""The simulation-efficiency curve: posterior quality against the simulations spent.

For each training-set size n in ``[compare] efficiency`` and each NPE method of
``[compare] methods`` (NPE on compressed summaries, on the C_ℓ data vector, on the maps), the
method is trained again on the first n training rows of the compare run's training set (its
compressor too, online or not) and sampled on the observation. Each point is compared with the
reference posterior: ``compare.reference`` (a samples file of the same observation) when given,
else the run's exact one when ``exact`` is among the methods, else its field-level HMC chain (a
result only when that chain is converged; the curve says which).

Per point: C2ST against the reference (``estimators.metrics.c2st``), FoM(Ω_c, σ_8) and its ratio
to the reference's, and the simulations spent: n, plus every fresh draw of an online compressor.
The explicit method enters in the same unit: its gradient evaluations times the measured cost of
one gradient in forward simulations (seconds per gradient of its sampling, summed over resumes,
over seconds per simulation of the training-set stage's simulation loop, measured by the
invocation that finished it; both from this run on this machine).

Points (trained compressor, NPE and samples) are cached one by one under
``efficiency/<method>_n<n>/``, each with the identity of the settings it was trained with: a
killed stage resumes at the first unfinished point, a rerun for other scoring settings
(``[compare]`` seed, c2st_samples, thresholds) rescores without retraining, and a point of other
training settings is redone. Results: ``efficiency.json`` and
``efficiency/efficiency.png``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from .files import save_figure, write_json

__all__ = ["reference_method", "run_efficiency", "plot_efficiency"]


def reference_method(methods, reference_file=None) -> str | None:
    """The posterior the curve is measured against: "reference" (``compare.reference``, a
    samples file) when given, else exact if run, else the field-level chain."""
    if reference_file is not None:
        return "reference"
    return "exact" if "exact" in methods else "hmc" if "hmc" in methods else None


def read_reference(cfg, out: Path):
    """The reference posterior's ``Samples``: ``compare.reference`` (refused, naming the section,
    when drawn for another observation) or the run's own exact / hmc samples."""
    from .io import observation_mismatch, read_samples

    path = cfg.compare.reference
    if path is None:
        return read_samples(out / "samples" / f"{reference_method(cfg.compare.methods)}.h5")
    reference = read_samples(path)
    key = observation_mismatch(reference, cfg)
    if key is not None:
        raise ValueError(f"compare.reference: {path} was drawn with another [{key}] than this "
                         f"run's: it is a posterior for another observation")
    return reference


def _fom(samples, names) -> float | None:
    from .metrics import _fom as pair_fom

    if "Omega_c" in names and "sigma8" in names:
        return pair_fom(samples[:, names.index("Omega_c")], samples[:, names.index("sigma8")])
    return None


def _score(cfg, samples, reference, key: str) -> dict:
    """C2ST and FoM of ``samples`` against ``reference`` (both ``Samples``), with the rows and
    classifier settings ``metrics.json`` uses (``metrics.subsample``, ``[compare]``)."""
    from estimators.metrics import c2st

    from .metrics import subsample

    if tuple(samples.names) != tuple(reference.names):
        raise ValueError(f"parameters {samples.names} differ from the reference's "
                         f"{reference.names}")
    n, seed = cfg.compare.c2st_samples, cfg.compare.seed
    a = subsample(samples.samples, n, seed=seed, key=key)
    b = subsample(reference.samples, n, seed=seed, key=reference.method)
    fom = _fom(samples.samples, list(samples.names))
    ref_fom = _fom(reference.samples, list(reference.names))
    return {"c2st": c2st(a, b, seed=seed), "fom": fom,
            "fom_ratio": None if fom is None or not ref_fom else fom / ref_fom}


# What a point's training reads: a change here retrains it; the scoring keys do not.
_POINT_SECTIONS = ("cosmology", "simulation", "lightcone", "shells", "maps", "sources", "prior",
                   "training_set", "compressor", "npe", "cl", "scales")


def _identity(cfg, method: str, n: int) -> str:
    data = cfg.to_dict()
    blob = json.dumps({"method": method, "n": n, **{k: data.get(k) for k in _POINT_SECTIONS}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _point(cfg, out: Path, method: str, n: int) -> dict:
    """Train (or reuse) one point: its samples file and cost; the score is computed by the
    caller. A cached point of other settings (a run killed, then reconfigured) is redone."""
    from .pipeline import run_fit_posterior, run_sample, run_train_compressor

    work = out / "efficiency" / f"{method}_n{n}"
    done = work / "point.json"
    identity = _identity(cfg, method, n)
    if done.is_file():
        point = json.loads(done.read_text())
        if point.get("identity") == identity:
            return point
        shutil.rmtree(work)
    t0 = time.perf_counter()
    summary = method[4:] if method in ("npe_cl", "npe_maps") else "compressor"
    comp, drawn = None, 0
    if summary == "compressor":
        comp = work / "compressor"
        drawn = run_train_compressor(cfg, out / "sims.h5", comp, loss=method[4:], n_train=n,
                                     progress=False).online_simulations
    post = work / "posterior"
    shutil.rmtree(post, ignore_errors=True)  # an NPE fit does not resume: start it again
    run_fit_posterior(cfg, out / "sims.h5", post, compressor=comp, summary=summary,
                      calibrate=False, n_train=n, progress=False)
    run_sample(post, out / "observation.h5", work / "samples.h5", seed=cfg.npe.seed)
    point = {"method": method, "n_train": n, "n_simulations": n + drawn,
             "online_simulations": drawn, "wall_s": time.perf_counter() - t0,
             "identity": identity}
    write_json(done, point)
    return point


def _explicit_point(cfg, out: Path, reference, sims_per_s: float | None,
                    score: bool) -> dict | None:
    """The field-level chain in the curve's unit, or None when it did not run; ``score``: also
    its C2ST and FoM against ``reference`` (not when it is the reference)."""
    from .io import read_samples

    path = out / "samples" / "hmc.h5"
    if not path.is_file():
        return None
    s = read_samples(path)
    info = s.info or {}
    n_grad = info.get("n_gradients") or info.get("grad_evals")
    if isinstance(n_grad, dict):  # per-phase counts
        n_grad = n_grad.get("total")
    wall = info.get("wall_time_s")
    sims_per_gradient = (wall / n_grad * sims_per_s
                         if n_grad and wall and sims_per_s else None)
    point = {"method": "hmc", "n_gradients": n_grad, "simulations_per_gradient": sims_per_gradient,
             "n_simulations": (n_grad * sims_per_gradient if sims_per_gradient else None),
             "converged": _converged(cfg, s)}
    if score:
        point.update(_score(cfg, s, reference, "hmc"))
    return point


def _converged(cfg, samples) -> bool:
    """The report's verdict (``metrics.method_metrics``): ESS and split R̂ within [compare]'s."""
    from .metrics import method_metrics

    return bool(method_metrics(samples, base=cfg.cosmology_params(), truth={},
                               ess_min=cfg.compare.ess_min,
                               r_hat_max=cfg.compare.r_hat_max)["converged"])


def _sims_per_s(out: Path) -> float | None:
    """Training-set simulations per second of this run: the simulations the invocation that
    finished the ``sims`` stage ran over the time of its simulation loop (compilation excluded),
    a rate a resumed ``generate`` leaves right. None when unknown (that invocation had nothing
    left to simulate)."""
    path = out / "stages" / "sims.json"
    if not path.is_file():
        return None
    marker = json.loads(path.read_text())
    if "sims_per_s" in marker:
        return marker["sims_per_s"] or None
    # a marker without the rate: all ok simulations over the finishing invocation's time, too
    # high if that invocation resumed
    n, wall = marker.get("n_ok"), marker.get("wall_s")
    return n / wall if n and wall else None


def run_efficiency(cfg, out: Path) -> dict:
    """Every point of the curve (cached), ``efficiency.json`` and ``efficiency/efficiency.png``."""
    from .io import read_samples

    out = Path(out)
    ref_name = reference_method(cfg.compare.methods, cfg.compare.reference)
    reference = read_reference(cfg, out)
    methods = [m for m in cfg.compare.methods if m.startswith("npe_")]
    points = []
    for n in cfg.compare.efficiency:
        for m in methods:
            point = _point(cfg, out, m, n)
            samples = read_samples(out / "efficiency" / f"{m}_n{n}" / "samples.h5")
            points.append({k: v for k, v in point.items() if k != "identity"}
                          | _score(cfg, samples, reference, f"{m}@n{n}"))
    ref_info = {"method": ref_name, "fom": _fom(reference.samples, list(reference.names))}
    if ref_name != "exact":  # a chain, whose draws may not be converged
        ref_info["converged"] = _converged(cfg, reference)
    if cfg.compare.reference is not None:
        ref_info["file"] = str(cfg.compare.reference)
    result = {"reference": ref_info, "budgets": list(cfg.compare.efficiency),
              "c2st_samples": cfg.compare.c2st_samples, "points": points,
              "explicit": _explicit_point(cfg, out, reference, _sims_per_s(out),
                                          score=ref_name != "hmc")}
    write_json(out / "efficiency.json", result)
    plot_efficiency(result, out / "efficiency" / "efficiency.png")
    return result


def plot_efficiency(result: dict, path: Path) -> None:
    """C2ST and FoM / reference against simulations spent, one line per NPE method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_c, ax_f = fig.subplots(1, 2)
    ref = result["reference"]
    ref_label = (Path(ref["file"]).stem if ref.get("file") else ref["method"]) + (
        "" if ref.get("converged", True) else " (unconverged)")
    methods = sorted({p["method"] for p in result["points"]})
    for m in methods:
        pts = sorted((p for p in result["points"] if p["method"] == m),
                     key=lambda p: p["n_simulations"])
        x = [p["n_simulations"] for p in pts]
        ax_c.plot(x, [p["c2st"] for p in pts], "o-", label=m)
        ax_f.plot(x, [p["fom_ratio"] if p["fom_ratio"] is not None else np.nan for p in pts],
                  "o-", label=m)
    explicit = result.get("explicit")
    if explicit and explicit.get("n_simulations"):
        tag = "hmc" + ("" if explicit.get("converged") else " (unconverged)")
        if explicit.get("c2st") is not None:
            ax_c.plot([explicit["n_simulations"]], [explicit["c2st"]], "k*", ms=10, label=tag)
            ax_f.plot([explicit["n_simulations"]], [explicit["fom_ratio"]], "k*", ms=10,
                      label=tag)
        else:
            for ax in (ax_c, ax_f):
                ax.axvline(explicit["n_simulations"], color="k", ls=":", lw=1, label=tag)
    ax_c.axhline(0.5, color="0.6", lw=1)
    ax_f.axhline(1.0, color="0.6", lw=1)
    from matplotlib.ticker import NullFormatter, NullLocator

    xlabel = "simulations" + (" (hmc: gradients × simulations per gradient)"
                              if explicit and explicit.get("n_simulations") else "")
    ticks = sorted({int(p["n_simulations"]) for p in result["points"]})
    for ax, label in ((ax_c, f"C2ST against {ref_label}"),
                      (ax_f, f"FoM(Ω_c, σ_8) / {ref_label}'s")):
        ax.set_xscale("log")
        # the sizes themselves as ticks: log-axis minor labels (3×10², 4×10², …) collide
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(ticks) <= 8:
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
    ax_c.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
