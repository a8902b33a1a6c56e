"""``report.md``: the comparison of inference methods as one Markdown page.

``write_report(out_dir, metrics, figures, title=...)`` turns a ``metrics.json`` dict
(``experiments.metrics.compare_metrics``) and already drawn figures (``experiments.plots``) into
``out_dir/report.md``. Sections: figures (relative links), constraining power (FoM of the two
headline pairs, their ratio to the C_ℓ reference, S_8), posterior mean ± std and bias per
parameter (in posterior σ), cost (wall time, simulations, gradient evaluations), the C2ST matrix,
calibration (TARP ATC and KS p, SBC rank KS p per parameter) when known, warnings, and the
configuration (TOML) when given. Missing values print as "—".

A method whose draws fail the convergence thresholds (``metrics["methods"][k]["converged"]``) is
flagged in its constraining-power row ("— unconverged (ESS 10/5, R̂ 1.35)"), and its FoM ratio,
like every ratio to an unconverged C_ℓ reference, is shown as no result. ``summary_lines`` gives
the same verdicts for the console (``lensbench demo``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

from . import metrics as M
from .files import write_text

_DASH = "—"


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(x, spec: str = ".3g") -> str:
    x = _num(x)
    return _DASH if x is None else format(x, spec)


def _sig(x, digits: int = 4) -> str:
    """A number with ``digits`` significant figures, no exponent for ordinary magnitudes."""
    x = _num(x)
    if x is None:
        return _DASH
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}" if decimals <= 8 else f"{x:.{digits - 1}e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", r"\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out + [""]


def _label(key: str, m: Mapping) -> str:
    return f"{m.get('label') or key} (`{key}`)"


def _plabel(p: str) -> str:
    return f"${M.param_label(p)}$"


def _figures(out_dir: Path, figures) -> list[str]:
    if not figures:
        return []
    items = figures.items() if isinstance(figures, Mapping) else \
        ((Path(f).stem.replace("_", " "), f) for f in figures)
    lines = ["## Figures", ""]
    for caption, path in items:
        path = Path(path)
        rel = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
        missing = "" if path.is_file() else " *(file missing)*"
        lines += [f"**{caption}**{missing}", "", f"![{caption}]({rel})", ""]
    return lines


def _thresholds_text(metrics: Mapping) -> str:
    c = metrics.get("convergence") or {}
    return (f"ESS ≥ {c.get('ess_min', M.ESS_MIN)} and split R̂ ≤ {c.get('r_hat_max', M.R_HAT_MAX)}"
            " for every sampled parameter")


def _ratio_cell(metrics: Mapping, key: str, value) -> str:
    """A FoM ratio, or why it is no result (the method or the C_ℓ reference is unconverged)."""
    if M.unconverged_note(metrics, key):
        return f"{_DASH} (unconverged)"
    ref = M.unconverged_reference(metrics)
    return f"{_DASH} (reference {ref} unconverged)" if ref else _fmt(value, ".2f")


def _power(metrics: dict, keys: list[str]) -> list[str]:
    pairs = [M.pair_key(*p) for p in metrics.get("fom_pairs", M.FOM_PAIRS)]
    ratio = metrics.get("fom_ratio") or {}
    ref = ratio.get("reference")
    values = ratio.get("values") or {}
    plabel = lambda k: "FoM(" + ", ".join(_plabel(p) for p in k.split(",")) + ")"  # noqa: E731
    header = (["method", "samples"] + [plabel(k) for k in pairs]
              + [f"{plabel(k)} / {ref or 'C_ell'}" for k in pairs]
              + [f"{_plabel('S8')} mean", f"σ({_plabel('S8')})"])
    rows = []
    for k in keys:
        m = metrics["methods"][k]
        flag = M.unconverged_note(metrics, k)
        rows.append([_label(k, m) + (f" {_DASH} {flag}" if flag else ""),
                     str(m.get("n_samples", _DASH))]
                    + [_fmt(m["fom"].get(p), ".0f") for p in pairs]
                    + [_ratio_cell(metrics, k, values.get(k, {}).get(p)) for p in pairs]
                    + [_sig(m["S8"]["mean"]), _sig(m["S8"]["std"], 3)])
    note = (f"FoM = 1/sqrt(det Cov) of the posterior samples. Ratios are to the C_ℓ reference "
            f"`{ref}`." if ref else "FoM = 1/sqrt(det Cov) of the posterior samples. No C_ℓ "
            "method (cl_analytic or npe_cl), so no ratios.")
    if any("converged" in metrics["methods"][k] for k in keys):  # not in older metrics files
        note += (f" A method counts as converged with {_thresholds_text(metrics)} (Vehtari et al. "
                 f"2021); the others are marked unconverged, their numbers carry Monte Carlo "
                 f"errors the table does not show, and their FoM ratios (and every ratio to an "
                 f"unconverged reference) are no result.")
    return ["## Constraining power", "", note, ""] + _table(header, rows)


def _bias(metrics: dict, keys: list[str]) -> list[str]:
    params = M.param_order(p for k in keys for p in metrics["methods"][k]["params"])
    truth = metrics.get("truth") or {}
    header = ["method"] + [_plabel(p) for p in params]
    rows = [["truth"] + [_sig(truth.get(p)) for p in params]]
    for k in keys:
        ps = metrics["methods"][k]["params"]
        cells = []
        for p in params:
            q = ps.get(p)
            if q is None:
                cells.append(_DASH)
                continue
            b = _num(q.get("bias_sigma"))
            cells.append(f"{_sig(q['mean'])} ± {_sig(q['std'], 2)}"
                         + ("" if b is None else f" ({b:+.2f}σ)"))
        rows.append([_label(k, metrics["methods"][k])] + cells)
    return (["## Posterior means and bias", "",
             "mean ± std; in brackets the bias (mean − truth)/std in posterior σ. "
             "Ω_m and S_8 are derived (fixed parameters from the base cosmology).", ""]
            + _table(header, rows))


def _cost(metrics: dict, keys: list[str]) -> list[str]:
    header = ["method", "wall time [s]", "simulations", "gradient evaluations", "chains"]
    rows = []
    for k in keys:
        m = metrics["methods"][k]
        b = m.get("budget") or {}
        rows.append([_label(k, m), _fmt(b.get("wall_time_s"), ".1f"),
                     _fmt(b.get("n_simulations"), ".0f"), _fmt(b.get("n_gradients"), ".0f"),
                     str(m.get("n_chains", _DASH))])
    return (["## Cost", "",
             "Wall time: every stage the method needed (simulations, training, sampling), the "
             "observation excepted.", ""] + _table(header, rows))


def _c2st(metrics: dict, keys: list[str]) -> list[str]:
    c = metrics.get("c2st")
    if not c:
        return ["## C2ST", "", "Not computed.", ""]
    acc = {}
    for e in c.get("pairs", []):
        acc[(e["a"], e["b"])] = acc[(e["b"], e["a"])] = e
    header = ["method"] + [f"`{k}`" for k in keys]
    rows = []
    for a in keys:
        row = [_label(a, metrics["methods"][a])]
        for b in keys:
            e = acc.get((a, b))
            row.append(_DASH if a == b or e is None else _fmt(e.get("accuracy"), ".3f"))
        rows.append(row)
    ns = sorted({e["n"] for e in c.get("pairs", [])})
    notes = [f"- {e['a']} vs {e['b']}: {e['note']}" for e in c.get("pairs", []) if e.get("note")]
    text = (f"Classifier two-sample test accuracy on the parameters both methods sampled "
            f"(0.5: indistinguishable, 1: disjoint). Classifier: {c.get('classifier')}; "
            f"{c.get('n_folds')}-fold cross-validation; at most {c.get('max_samples')} samples "
            f"per method (used: {', '.join(map(str, ns)) or _DASH}), seed {c.get('seed')}.")
    return ["## C2ST", "", text, ""] + _table(header, rows) + (notes + [""] if notes else [])


def _draws(metrics: dict, keys: list[str]) -> list[str]:
    """ESS and split R̂ of each method's draws (metrics["methods"][k]["draws"])."""
    have = [k for k in keys if (metrics["methods"][k].get("draws") or {}).get("ess")]
    if not have:
        return []
    params = M.param_order(p for k in have for p in metrics["methods"][k]["draws"]["ess"])
    header = (["method", "draws", "chains"] + [f"ESS {_plabel(p)}" for p in params]
              + [f"split R̂ {_plabel(p)}" for p in params])
    rows = []
    for k in have:
        m = metrics["methods"][k]
        ess, r_hat = m["draws"]["ess"], m["draws"]["r_hat"]
        rows.append([_label(k, m), str(m["n_samples"]), str(m["n_chains"])]
                    + [_fmt(ess.get(p), ".0f") for p in params]
                    + [_fmt(r_hat.get(p), ".3f") for p in params])
    lines = ["## Draws", "",
             f"Effective sample size and split R̂ of the saved draws. Independent draws (NPE, "
             f"exact grid) have ESS ≈ draws; MCMC summaries are reliable from "
             f"{_thresholds_text(metrics)} (Vehtari et al. 2021).", ""] + _table(header, rows)
    diag = metrics.get("hmc_diagnostics")
    if diag:
        div = diag.get("divergences") or {}
        lines += [f"Field-level HMC: {div.get('sampling', _DASH)} divergences after warm-up "
                  f"({div.get('warmup', _DASH)} during), {_fmt(diag.get('grads_per_ess'), '.0f')} "
                  f"gradients per effective sample; details in `hmc/diagnostics.json`.", ""]
    return lines


def _calibration(metrics: dict, keys: list[str], calibration) -> list[str]:
    cal = {k: M._calibration_summary(v) for k, v in (calibration or {}).items()}
    for k in keys:  # fall back to what the samples carried
        if cal.get(k) is None and metrics["methods"][k].get("calibration"):
            cal[k] = metrics["methods"][k]["calibration"]
    cal = {k: v for k, v in cal.items() if v}
    if not cal:
        return []
    order = [k for k in keys if k in cal] + sorted(k for k in cal if k not in keys)
    params = M.param_order(p for v in cal.values() for p in (v.get("sbc_ks_pvals") or {}))
    header = (["method", "TARP ATC", "TARP KS p", "test sims"]
              + [f"SBC KS p {_plabel(p)}" for p in params])
    rows = []
    for k in order:
        v = cal[k]
        label = _label(k, metrics["methods"][k]) if k in metrics["methods"] else f"`{k}`"
        rows.append([label, _fmt(v.get("tarp_atc"), "+.3f"), _fmt(v.get("tarp_ks_pval"), ".2f"),
                     _fmt(v.get("n_test"), ".0f")]
                    + [_fmt((v.get("sbc_ks_pvals") or {}).get(p), ".2f") for p in params])
    return (["## Calibration", "",
             "TARP ATC > 0: under-confident, < 0: over-confident or biased (0 ideal); "
             "KS p-values small when ranks / coverage are not uniform.", ""]
            + _table(header, rows))


def summary_lines(metrics: Mapping, pair: tuple[str, str] = ("Omega_c", "sigma8")) -> list[str]:
    """The console summary (``lensbench demo``): per method its FoM(``pair``) and either its ratio
    to the C_ℓ reference or why that is no result (the method's ``metrics.unconverged_note``, or
    an unconverged reference), then, if any method is flagged, the thresholds it missed."""
    p = M.pair_key(*pair)
    values = (metrics.get("fom_ratio") or {}).get("values") or {}
    bad_ref = M.unconverged_reference(metrics)
    lines, flagged = [], False
    for k in metrics.get("methods_order") or M.order_methods(metrics["methods"]):
        if k not in metrics["methods"]:
            continue
        fom = _num(metrics["methods"][k]["fom"].get(p))
        ratio = _num(values.get(k, {}).get(p))
        own = M.unconverged_note(metrics, k)
        flagged |= own is not None
        tail = (f"   {own}" if own else f"   (no C_ell ratio: {bad_ref} unconverged)" if bad_ref
                else f"   ({ratio:.2f} x C_ell)" if ratio is not None else "")
        lines.append(f"{k:12s} FoM({pair[0]}, {pair[1]}) = "
                     f"{fom if fom is not None else math.nan:8.1f}{tail}")
    if flagged:
        lines.append(f"converged means {_thresholds_text(metrics)} ([compare] ess_min, "
                     f"r_hat_max); an unconverged method's FoM is no result: run its chains longer")
    return lines


def efficiency_table(result: Mapping) -> list[str]:
    """The simulation-efficiency section (``efficiency.json``): one row per (method, size)."""
    ref = result["reference"]
    name = (f"reference ({Path(ref['file']).name})" if ref.get("file") else ref["method"]) + (
        "" if ref.get("converged", True) else " (unconverged: not a result)")
    lines = ["## Simulation efficiency", "",
             f"Each NPE method trained again on the first n training simulations, against the "
             f"{name} posterior (FoM {_fmt(ref.get('fom'), '.0f')}). Simulations: n plus the "
             f"fresh draws of a compressor trained online. C2ST 0.5: indistinguishable "
             f"(at most {result.get('c2st_samples')} samples a side). The points are not "
             f"calibrated on held-out simulations: they show how each method approaches the "
             f"reference, and are no certified posteriors.", "",
             "| method | n | simulations | C2ST | FoM | FoM / reference | status |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(result["points"], key=lambda p: (p["method"], p["n_train"])):
        lines.append(f"| {p['method']} | {p['n_train']} | {p['n_simulations']} | "
                     f"{_fmt(p['c2st'], '.3f')} | {_fmt(p['fom'], '.0f')} | "
                     f"{_fmt(p['fom_ratio'], '.2f')} | uncalibrated |")
    e = result.get("explicit")
    if e:
        tag = "hmc" + ("" if e.get("converged") else " (unconverged)")
        lines.append(f"| {tag} | – | {_fmt(e.get('n_simulations'), '.0f')} "
                     f"({_fmt(e.get('n_gradients'), '.0f')} gradients × "
                     f"{_fmt(e.get('simulations_per_gradient'), '.2f')}) | "
                     f"{_fmt(e.get('c2st'), '.3f')} | {_fmt(e.get('fom'), '.0f')} | "
                     f"{_fmt(e.get('fom_ratio'), '.2f')} | "
                     f"{'converged' if e.get('converged') else 'unconverged'} |")
    return lines + [""]


def _scale_cuts(cuts) -> list[str]:
    """One line: the multipoles every method saw ([scales] with cut = true), or that all did."""
    if not cuts:
        return ["Scales: every method saw every multipole of the maps (no [scales] cuts).", ""]
    parts = [f"bin {b + 1}: {lo:g}–{'∞' if hi is None else f'{hi:g}'}"
             for b, (lo, hi) in enumerate(zip(cuts["ell_min"], cuts["ell_max"]))]
    return ["Scales: every method saw only ℓ in " + ", ".join(parts)
            + " (C_ℓ methods: the ℓ bins inside these; map methods: the maps' Fourier modes "
              "inside them).", ""]


def write_report(out_dir, metrics: dict, figures=None, *, title: str,
                 config_toml: str | None = None, calibration: Mapping | None = None,
                 efficiency: Mapping | None = None) -> Path:
    """Write ``out_dir/report.md``; returns its path.

    Args:
      metrics: a ``compare_metrics`` / ``read_metrics`` dict.
      figures: {caption: path} or a list of paths (caption from the file name); linked relative
        to ``out_dir`` (a missing file is flagged, not an error).
      title: the page title.
      config_toml: the experiment configuration, appended in a collapsed block.
      calibration: method key -> a ``calibrate`` result, its ``calibration.json`` path, or the
        pipeline's summary {"tarp_atc", "tarp_ks_pval", "sbc_ks_pvals"}; methods not given use
        the calibration their samples carried (``metrics["methods"][k]["calibration"]``).
      efficiency: the ``efficiency.json`` dict (``experiments.efficiency``), tabulated.
    """
    if not isinstance(metrics, Mapping) or "methods" not in metrics:
        raise ValueError("write_report: metrics must be a compare_metrics() dict")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in metrics.get("methods_order") or M.order_methods(metrics["methods"])
            if k in metrics["methods"]]
    lines = [f"# {title}", "",
             "Methods: " + ", ".join(_label(k, metrics["methods"][k]) for k in keys) + ".", ""]
    lines += _scale_cuts(metrics.get("scale_cuts"))
    lines += _figures(out_dir, figures)
    lines += _power(metrics, keys)
    lines += _bias(metrics, keys)
    lines += _cost(metrics, keys)
    lines += _c2st(metrics, keys)
    lines += _draws(metrics, keys)
    lines += _calibration(metrics, keys, calibration)
    if efficiency:
        lines += efficiency_table(efficiency)
    if metrics.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]] + [""]
    if config_toml:
        lines += ["## Configuration", "", "<details><summary>config.toml</summary>", "",
                  "```toml", config_toml.rstrip(), "```", "", "</details>", ""]
    return write_text(out_dir / "report.md", "\n".join(lines))


def plot_results(results, out=None, *, methods=None, params=None) -> Path:
    """``lensbench plot``: redraw the triangle plot from saved samples.

    results: a ``lensbench compare`` directory (samples in ``results/samples/``) or a directory of
    samples files; out: the image (default ``results/figures/contours.png``); methods / params:
    what to draw (default everything found / every sampled parameter; "Omega_m" and "S8" allowed).
    With a ``metrics.json`` in ``results``, methods it flags unconverged say so in the legend.
    Raises FileNotFoundError when no samples are found, ValueError for a method or parameter
    that is not there.
    """
    from .config import load_config_text
    from .io import read_samples
    from .plots import plot_triangle

    results = Path(results)
    folder = results / "samples" if (results / "samples").is_dir() else results
    files = sorted(folder.glob("*.h5"))
    samples = {}
    for f in files:
        try:
            s = read_samples(f)
        except ValueError:  # another kind of HDF5 file (maps, sims) in a plain directory
            continue
        samples[M.validate_method(f.stem if M.method_base(f.stem) == s.method else s.method)] = s
    if not samples:
        raise FileNotFoundError(f"no posterior-samples files in {folder}")
    if methods:
        missing = [m for m in methods if m not in samples]
        if missing:
            for m in missing:
                M.validate_method(m)  # an unknown name gets the list of valid ones
            raise ValueError(f"no samples for {', '.join(missing)} in {folder}; found: "
                             f"{', '.join(samples)}")
    first = next(iter(samples.values()))
    cfg_text = (results / "config.toml").read_text() if (results / "config.toml").is_file() \
        else first.config_toml
    base = load_config_text(cfg_text).cosmology_params() if cfg_text else {}
    truth = ({n: float(v) for n, v in zip(first.names, first.truth)}
             if first.truth is not None else None)
    out = Path(out) if out is not None else results / "figures" / "contours.png"
    metrics_file = results / "metrics.json"
    converged = M.converged_flags(M.read_metrics(metrics_file)) if metrics_file.is_file() else None
    return plot_triangle(out, samples, base=base, truth=truth, methods=methods, params=params,
                         title=f"{results.name}: posteriors", converged=converged)
