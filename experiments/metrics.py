"""Posterior comparison metrics across inference methods -> ``metrics.json``.

``compare_metrics(samples, base=..., truth=...)`` takes one ``experiments.io.Samples`` per method
(all for the same observation) and returns a JSON-able dict; ``write_metrics`` writes it
atomically (NaN and ±inf become ``null``), ``read_metrics`` reads it back.

Method names
------------
``METHODS`` lists the known methods with their human labels (tables, legends):
``exact``, ``hmc``, ``cl_analytic``, ``npe_cl``, ``npe_maps``, ``npe_mse``, ``npe_mae``,
``npe_gnll``, ``npe_vmim``. Any other ``npe_<name>`` (``<name>`` lower-case letters, digits and
underscores, e.g. NPE on a custom compressor's summaries) is accepted too and labelled
"NPE (<name>)". A method key may carry a tag after ``@`` to compare several runs of one method,
e.g. ``npe_vmim@1000sims`` (label "NPE (VMIM) [1000sims]"); the part before ``@`` must equal the
``Samples.method`` it names. Anything else raises ``ValueError`` listing the valid names.

Derived parameters
------------------
Ω_m = Ω_c + Ω_b and S_8 = σ_8 sqrt(Ω_m / 0.3) are computed per sample; a parameter a method did
not sample (e.g. Ω_b) takes its value from ``base`` (the fixed cosmology). The truth of derived
parameters is computed the same way from the truth (falling back to ``base``).

Conventions: standard deviations and covariances use ddof = 1 (as ``np.cov``); FoM(a, b) =
1 / sqrt(det Cov(a, b)) (``estimators.metrics.fom``), ``null`` when the pair is degenerate (a
parameter constant to 1e-10 relative, or |correlation| = 1 to 1e-12); bias = (mean − truth) /
std, in posterior σ, ``null`` for a constant parameter. S_8 is undefined (NaN, left out of its
statistics, with a warning) for samples with Ω_m <= 0.

JSON layout (format ``lensbench.metrics``, version 1)
-------------------------------------------------------
::

  {"format": "lensbench.metrics", "format_version": 1,
   "methods_order": [key, ...],                       # canonical order (METHODS, then others)
   "base": {param: value},                            # the fixed cosmology
   "truth": {param: value},                           # sampled + derived (Omega_m, S8) truths
   "fom_pairs": [["Omega_c", "sigma8"], ["Omega_m", "sigma8"]],   # the headline pairs
   "methods": {key: {
       "method": str, "label": str,
       "n_samples": int, "n_chains": int,
       "names": [sampled parameter, ...],
       "params": {param: {"mean", "std", "truth", "bias_sigma", "derived": bool}},
                                                      # sampled params, then Omega_m and S8
       "fom": {"a,b": float|null},                    # every pair of sampled params plus
                                                      # "Omega_m,sigma8"; pair keys in PARAM_ORDER
       "S8": {"mean", "std"},
       "budget": {"wall_time_s", "n_simulations", "n_gradients"},   # null when unknown
       "budget_from": {budget key: [info keys used]},
       "draws": {"ess": {param: float|null}, "r_hat": {param: float|null}},
                                                      # sampled params, split R̂ (see ESS_MIN)
       "converged": bool,                             # every sampled param has ESS >= ess_min
                                                      # and split R̂ <= r_hat_max ("convergence")
       "calibration": {"tarp_atc", "tarp_ks_pval", "sbc_ks_pvals": {param: p}, "n_test"} | null
                                                      # from Samples.info["calibration"], if any
   }},
   "fom_ratio": {"reference": "cl_analytic"|"npe_cl"|null,
                 "values": {key: {"a,b": FoM / FoM_reference}}},     # pairs the reference has
   "convergence": {"ess_min": int, "r_hat_max": float},   # the thresholds of "converged"
   "c2st": {"classifier": str, "n_folds": int, "max_samples": int, "seed": int,
            "pairs": [{"a": key, "b": key, "params": [...], "n": int, "accuracy": float|null,
                       "note": str (only when accuracy is null)}]}   # every unordered pair, or
           | null                                                    # null when not computed
   "warnings": [str, ...]}

Convergence: ``converged`` certifies a method's draws: ESS >= ``ess_min`` and split R̂ <=
``r_hat_max`` (defaults ``ESS_MIN``, ``R_HAT_MAX``; ``[compare] ess_min, r_hat_max``) for every
sampled parameter; a parameter whose ESS or R̂ is undefined (too few draws, a stuck chain) fails.
Independent draws (NPE, the exact grid) pass with enough samples. ``unconverged_note`` is the flag
the console and report.md print for the others (the contour legend adds "(unconverged)"); files
written before ``converged`` existed have no flags (unknown, not unconverged).

Budget: ``wall_time_s``, ``n_simulations``, ``n_gradients`` are read from ``Samples.info`` under
those names; when absent, from the names the pipeline writes today: wall time = ``fit_time_s`` +
``sample_time_s`` (NPE), simulations = ``n_train_sims`` (NPE) or ``n_cov`` (C_ℓ covariance),
gradients = ``grad_evals`` (NUTS). ``budget_from`` records which keys were used.

C2ST: ``estimators.metrics.c2st`` (sbi's c2st with sklearn's ``MLPClassifier``, the sbibm
configuration, ``n_folds``-fold cross-validated accuracy) on the parameters both methods
sampled. Both sides are subsampled (without replacement, seeded per method) to the same size
n = min(n_a, n_b, max_samples): equal class sizes keep 0.5 the chance level, and the cost grows
with n.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import fields, is_dataclass
from itertools import combinations
from pathlib import Path
from typing import Mapping

import numpy as np

from .config import ESS_MIN, R_HAT_MAX  # the thresholds' one definition, with its reason
from .io import Samples, _jsonable_tree
from .priors import COSMOLOGY_PARAMS, LABELS

FORMAT = "lensbench.metrics"
FORMAT_VERSION = 1

METHODS: dict[str, str] = {
    "exact": "Exact (grid)",
    "hmc": "Field-level HMC",
    "cl_analytic": r"$C_\ell$ likelihood",
    "npe_cl": r"NPE ($C_\ell$)",
    "npe_maps": "NPE (maps, one stage)",
    "npe_mse": "NPE (MSE)",
    "npe_mae": "NPE (MAE)",
    "npe_gnll": "NPE (GNLL)",
    "npe_vmim": "NPE (VMIM)",
}
"""Known method names -> human labels (matplotlib mathtext allowed)."""

_NPE_PATTERN = re.compile(r"npe_[a-z0-9_]+")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")

DERIVED = ("Omega_m", "S8")
DERIVED_LABELS = {"Omega_m": r"\Omega_m", "S8": "S_8"}
# canonical parameter order: pair keys, tables and default plot order
PARAM_ORDER = ("Omega_c", "Omega_m", "Omega_b", "sigma8", "S8", "h", "n_s", "w0", "wa")
FOM_PAIRS = (("Omega_c", "sigma8"), ("Omega_m", "sigma8"))
C_ELL_REFERENCES = ("cl_analytic", "npe_cl")
C2ST_CLASSIFIER = {
    "mlp": ("sklearn.neural_network.MLPClassifier via sbi.utils.metrics.c2st (sbibm setup: ReLU, "
            "two hidden layers of 10*d units, adam, early stopping, max_iter 1000; inputs "
            "z-scored with the first method's mean and std)"),
    "rf": ("sklearn.ensemble.RandomForestClassifier via sbi.utils.metrics.c2st (sklearn "
           "defaults; inputs z-scored with the first method's mean and std)"),
}


# ---- method names ---------------------------------------------------------------------------

def validate_method(name: str) -> str:
    """``name`` if it is a valid method key (module docstring), else ValueError listing them."""
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}")
    base, sep, tag = name.partition("@")
    ok = (base in METHODS or _NPE_PATTERN.fullmatch(base)) and (
        not sep or _TAG_PATTERN.fullmatch(tag))
    if not ok:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}, or npe_<name> "
                         f"(lower-case letters, digits, _) for NPE on other summaries, optionally "
                         f"followed by @<tag> (letters, digits, _ . -) to tell runs apart")
    return name


def method_base(name: str) -> str:
    """The method of a key: ``npe_vmim@1000sims`` -> ``npe_vmim``."""
    return validate_method(name).partition("@")[0]


def method_label(name: str) -> str:
    """Human label of a method key."""
    base, _, tag = validate_method(name).partition("@")
    label = METHODS.get(base) or f"NPE ({base[4:]})"
    return f"{label} [{tag}]" if tag else label


def order_methods(names) -> list[str]:
    """Method keys in canonical order: METHODS order, then others alphabetically; tags sorted."""
    known = list(METHODS)

    def key(n):
        base, _, tag = validate_method(n).partition("@")
        return (known.index(base) if base in known else len(known), base, tag)

    return sorted(names, key=key)


def param_label(name: str) -> str:
    """LaTeX label (without $) of a sampled or derived parameter."""
    return LABELS.get(name) or DERIVED_LABELS.get(name) or name


def _param_rank(name: str) -> int:
    return PARAM_ORDER.index(name) if name in PARAM_ORDER else len(PARAM_ORDER)


def param_order(names) -> list[str]:
    """The distinct parameter names in table order: PARAM_ORDER first, then the others by name."""
    return sorted(set(names), key=lambda n: (_param_rank(n), n))


def pair_key(a: str, b: str) -> str:
    """Order-independent key "a,b" of a parameter pair (PARAM_ORDER order)."""
    a, b = sorted((a, b), key=lambda n: (_param_rank(n), n))
    return f"{a},{b}"


# ---- derived parameters ---------------------------------------------------------------------

def _as_params(values, what: str) -> dict:
    """A dict (or a Cosmology-like dataclass) of parameters -> {name: float}."""
    if values is None:
        return {}
    if is_dataclass(values) and not isinstance(values, type):
        values = {f.name: getattr(values, f.name) for f in fields(values)}
    if not isinstance(values, Mapping):
        raise ValueError(f"{what}: expected a dict of cosmological parameters, got "
                         f"{type(values).__name__}")
    out = {}
    for k, v in values.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{k!r}]: expected a number, got {v!r}") from None
    return out


def _param_value(name: str, sampled: dict, fixed: dict, what: str):
    if name in sampled:
        return sampled[name]
    if name in fixed:
        return fixed[name]
    raise ValueError(f"{what}: {name!r} is neither sampled nor in the base cosmology; pass "
                     f"base={{{name!r}: ...}} (the fixed value)")


def derived_columns(samples: Samples, base) -> dict[str, np.ndarray]:
    """{"Omega_m": (n,), "S8": (n,)} from the samples, unsampled inputs taken from ``base``;
    S8 is NaN where Omega_m <= 0."""
    from estimators.metrics import s8

    base = _as_params(base, "base")
    cols = {n: samples.samples[:, i] for i, n in enumerate(samples.names)}
    what = f"derived parameters of {samples.method!r}"
    om = (np.asarray(_param_value("Omega_c", cols, base, what), np.float64)
          + np.asarray(_param_value("Omega_b", cols, base, what), np.float64))
    om = np.broadcast_to(om, (len(samples.samples),)).astype(np.float64)
    sig8 = np.broadcast_to(np.asarray(_param_value("sigma8", cols, base, what), np.float64),
                           om.shape)
    with np.errstate(invalid="ignore"):  # Omega_m <= 0 (unphysical samples): S8 = NaN
        s8_col = np.where(om > 0, s8(np.abs(om), sig8), np.nan)
    return {"Omega_m": om, "S8": np.asarray(s8_col, np.float64)}


def with_derived(samples: Samples, base) -> tuple[np.ndarray, tuple[str, ...]]:
    """(samples with Omega_m and S8 appended, (n, d + 2); their names)."""
    d = derived_columns(samples, base)
    return (np.column_stack([samples.samples, d["Omega_m"], d["S8"]]),
            samples.names + DERIVED)


def derived_truth(truth: dict, base: dict) -> dict:
    """Omega_m and S8 of a truth dict (missing inputs from ``base``); {} if not computable."""
    try:
        om = (_param_value("Omega_c", truth, base, "truth")
              + _param_value("Omega_b", truth, base, "truth"))
        return {"Omega_m": om, "S8": _param_value("sigma8", truth, base, "truth")
                * math.sqrt(om / 0.3)}
    except ValueError:
        return {}


# ---- per-method metrics ---------------------------------------------------------------------

def _fom(x: np.ndarray, y: np.ndarray) -> float:
    """``estimators.metrics.fom``, NaN when the pair is degenerate: a parameter constant to
    1e-10 relative (|mean|), or |correlation| within 1e-12 of 1 (rounding would give a huge,
    meaningless FoM)."""
    from estimators.metrics import fom

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan
    c = np.cov(np.stack([x, y]))
    scale = np.maximum(np.abs([x.mean(), y.mean()]), 1e-300)
    if np.any(np.sqrt(np.diag(c)) <= 1e-10 * scale) or 1 - c[0, 1] ** 2 / (c[0, 0] * c[1, 1]) <= 1e-12:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        v = fom(np.column_stack([x, y]))
    return v if math.isfinite(v) and v > 0 else math.nan


def _budget(info: dict) -> tuple[dict, dict]:
    def num(key):
        v = info.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v) else None

    budget, used = {}, {}
    if num("wall_time_s") is not None:
        budget["wall_time_s"], used["wall_time_s"] = num("wall_time_s"), ["wall_time_s"]
    else:
        parts = [k for k in ("fit_time_s", "sample_time_s") if num(k) is not None]
        budget["wall_time_s"] = sum(num(k) for k in parts) if parts else None
        used["wall_time_s"] = parts
    for out, keys in (("n_simulations", ("n_simulations", "n_train_sims", "n_cov")),
                      ("n_gradients", ("n_gradients", "grad_evals"))):
        key = next((k for k in keys if num(k) is not None), None)
        budget[out] = None if key is None else int(num(key))
        used[out] = [] if key is None else [key]
    return budget, used


def _calibration_summary(cal) -> dict | None:
    """Normalise a calibration record: the full ``estimators.calibration.calibrate`` result
    (calibration.json), or the pipeline's summary {"tarp_atc", "tarp_ks_pval", "sbc_ks_pvals"}."""
    if cal is None:
        return None
    if isinstance(cal, (str, os.PathLike)):
        cal = json.loads(Path(cal).read_text())
    if not isinstance(cal, Mapping):
        raise ValueError(f"calibration: expected a dict or a calibration.json path, got {cal!r}")
    if "tarp" in cal or "sbc" in cal:
        tarp, sbc = cal.get("tarp") or {}, cal.get("sbc") or {}
        return {"tarp_atc": tarp.get("atc"), "tarp_ks_pval": tarp.get("ks_pval"),
                "sbc_ks_pvals": dict(sbc.get("ks_pvals") or {}), "n_test": cal.get("n_test")}
    return {"tarp_atc": cal.get("tarp_atc"), "tarp_ks_pval": cal.get("tarp_ks_pval"),
            "sbc_ks_pvals": dict(cal.get("sbc_ks_pvals") or {}), "n_test": cal.get("n_test")}


def method_metrics(samples: Samples, *, base, truth, key: str | None = None,
                   warn: list | None = None, ess_min=ESS_MIN, r_hat_max=R_HAT_MAX) -> dict:
    """Metrics of one method's samples (the ``methods[key]`` entry of the module docstring)."""
    key = validate_method(samples.method if key is None else key)
    limits = convergence_thresholds(ess_min, r_hat_max)
    base, truth = _as_params(base, "base"), _as_params(truth, "truth")
    warn = [] if warn is None else warn
    s = samples.samples
    n = len(s)
    if n < 3:
        warn.append(f"{key}: only {n} samples; moments and FoM are undefined")
    # truth: the given dict first, else the samples' own truth
    own = ({} if samples.truth is None else dict(zip(samples.names, samples.truth.tolist())))
    t = {}
    for name in samples.names:
        if name in truth:
            t[name] = truth[name]
            if name in own and not math.isclose(own[name], truth[name], rel_tol=1e-6,
                                                abs_tol=1e-12):
                warn.append(f"{key}: samples' own truth {name} = {own[name]:.6g} differs from the "
                            f"truth given ({truth[name]:.6g}); a different observation?")
        elif name in own:
            t[name] = own[name]
    t.update(derived_truth({**t, **{k: v for k, v in truth.items() if k not in t}}, base))

    cols = {name: s[:, i] for i, name in enumerate(samples.names)}
    cols.update(derived_columns(samples, base))
    bad = int(np.sum(~np.isfinite(cols["S8"])))
    if bad:
        warn.append(f"{key}: {bad} of {n} samples have Omega_m <= 0; S8 statistics use the rest")
    params = {}
    for name, col in cols.items():
        col = col[np.isfinite(col)]
        mean = float(col.mean()) if len(col) else math.nan
        std = float(col.std(ddof=1)) if len(col) > 1 else math.nan
        tv = t.get(name)
        # a (numerically) constant parameter has no meaningful bias in σ units
        bias = ((mean - tv) / std if tv is not None and std > 1e-10 * max(abs(mean), 1e-300)
                else math.nan)
        params[name] = {"mean": mean, "std": std, "truth": tv, "bias_sigma": bias,
                        "derived": name in DERIVED}

    pairs = {pair_key(a, b): (a, b) for a, b in combinations(samples.names, 2)}
    if {"Omega_c", "Omega_b"} & set(samples.names) and "sigma8" in samples.names:
        pairs[pair_key("Omega_m", "sigma8")] = ("Omega_m", "sigma8")
    foms = {pair_key(*p): math.nan for p in FOM_PAIRS}
    for k, (a, b) in pairs.items():
        foms[k] = _fom(cols[a], cols[b])
        if math.isnan(foms[k]) and n >= 3:
            warn.append(f"{key}: FoM({a}, {b}) undefined (singular covariance: degenerate samples)")
    budget, used = _budget(samples.info)
    draws = _draw_diagnostics(samples, key, warn, **limits)
    return {"method": samples.method, "label": method_label(key), "n_samples": int(n),
            "n_chains": int(len(np.unique(samples.chain))), "names": list(samples.names),
            "params": params, "fom": foms,
            "S8": {"mean": params["S8"]["mean"], "std": params["S8"]["std"]},
            "budget": budget, "budget_from": used, "draws": draws,
            "converged": is_converged(draws, **limits),
            "calibration": _calibration_summary(samples.info.get("calibration"))}


def convergence_thresholds(ess_min=ESS_MIN, r_hat_max=R_HAT_MAX) -> dict:
    """{"ess_min": int, "r_hat_max": float}, checked: ess_min a whole number >= 1 (ESS values are
    shown rounded down to integers, so a whole threshold keeps "shown < ess_min" = "fails"),
    r_hat_max > 1 (split R̂ of converged chains scatters around 1: a threshold at or below 1
    would fail about half of them)."""
    try:
        e, r = float(ess_min), float(r_hat_max)
    except (TypeError, ValueError):
        raise ValueError(f"ess_min and r_hat_max must be numbers, got {ess_min!r}, "
                         f"{r_hat_max!r}") from None
    if isinstance(ess_min, bool) or not (math.isfinite(e) and e >= 1 and e.is_integer()):
        raise ValueError(f"ess_min must be a whole number >= 1, got {ess_min!r}")
    if not (math.isfinite(r) and r > 1):
        raise ValueError(f"r_hat_max must be > 1, got {r_hat_max!r}")
    return {"ess_min": int(e), "r_hat_max": r}


def is_converged(draws: Mapping, *, ess_min=ESS_MIN, r_hat_max=R_HAT_MAX) -> bool:
    """Whether every sampled parameter of a ``draws`` entry has ESS >= ess_min and split R̂ <=
    r_hat_max. An undefined ESS or R̂ (too few draws, a constant parameter: a stuck chain)
    fails: the certificate needs evidence, not its absence."""
    ess, r_hat = draws.get("ess") or {}, draws.get("r_hat") or {}
    if not ess:
        return False
    return all(ess[p] is not None and r_hat.get(p) is not None and ess[p] >= ess_min
               and r_hat[p] <= r_hat_max for p in ess)


def _fmt_r_hat(r: float, r_hat_max: float) -> str:
    """R̂ with 2 decimals, more when rounding would put it on the other side of r_hat_max
    (1.012 against 1.01 must not read "1.01")."""
    for decimals in range(2, 8):
        text = f"{r:.{decimals}f}"
        if (float(text) > r_hat_max) == (r > r_hat_max):
            return text
    return repr(r)


def unconverged_note(metrics: Mapping, key: str) -> str | None:
    """"unconverged (ESS 10/5, R̂ 1.35)" for a method that failed the convergence thresholds:
    its ESS per sampled parameter (rounded down, so a failing value never reads as passing)
    and its worst split R̂; "—" where undefined. None when the method is certified, or when the
    file predates the certificate (no "converged" key: unknown, not flagged)."""
    m = metrics["methods"][key]
    if m.get("converged") is not False:
        return None
    limits = metrics.get("convergence") or {}
    r_hat_max = limits.get("r_hat_max", R_HAT_MAX)
    draws = m.get("draws") or {}
    ess = draws.get("ess") or {}
    r_hats = [r for r in (draws.get("r_hat") or {}).values() if r is not None]
    ess_text = "/".join("—" if ess[p] is None else str(math.floor(ess[p])) for p in ess) or "—"
    r_text = _fmt_r_hat(max(r_hats), r_hat_max) if r_hats else "—"
    return f"unconverged (ESS {ess_text}, R̂ {r_text})"


def converged_flags(metrics: Mapping) -> dict:
    """Method key -> its certificate: True, False, or None for a file that predates it."""
    return {k: m.get("converged") for k, m in metrics["methods"].items()}


def unconverged_reference(metrics: Mapping) -> str | None:
    """The C_ℓ reference of the FoM ratios when it is flagged unconverged (then no ratio to it is
    a result), else None."""
    ref = (metrics.get("fom_ratio") or {}).get("reference")
    return ref if ref in metrics["methods"] and unconverged_note(metrics, ref) else None


def _draw_diagnostics(samples: Samples, key: str, warn: list, *, ess_min: int,
                      r_hat_max: float) -> dict:
    """ESS and split R̂ per sampled parameter, from the draws in their saved order (chains cut to
    the shortest); null when there are too few draws. Independent draws (NPE, the exact grid)
    give ESS ≈ n and R̂ ≈ 1, so MCMC methods are the ones that can fall short, with a warning."""
    from explicit.diagnostics import ess_rhat

    chains = [samples.samples[samples.chain == c] for c in np.unique(samples.chain)]
    m = min(len(c) for c in chains)
    draws = np.stack([c[:m] for c in chains])  # (chains, draws, d)
    ess, r_hat = {}, {}
    for i, name in enumerate(samples.names):
        ess[name], r_hat[name] = ess_rhat(draws[..., i])
    short = [f"{n} ESS {ess[n]:.0f}, R̂ {r_hat[n]:.3f}" for n in samples.names
             if ess[n] is not None and (ess[n] < ess_min or r_hat[n] > r_hat_max)]
    if short:
        warn.append(f"{key}: its draws are not converged enough for reliable moments, FoM and "
                    f"C2ST ({'; '.join(short)}; want ESS >= {ess_min} and split R̂ <= "
                    f"{r_hat_max}): run the chains longer")
    return {"ess": ess, "r_hat": r_hat}


# ---- pairwise -------------------------------------------------------------------------------

def subsample(samples: np.ndarray, n: int, *, seed: int, key: str) -> np.ndarray:
    """The first ``n`` rows of a permutation seeded by (seed, key): nested across n, so a method
    is represented by the same rows in every pair it is compared in."""
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    return samples[rng.permutation(len(samples))[:n]]


def c2st_pairs(samples: Mapping[str, Samples], *, max_samples: int = 2000, seed: int = 0,
               n_folds: int = 5, classifier: str = "mlp") -> dict:
    """C2ST accuracy between every two methods on their shared sampled parameters
    (the ``c2st`` entry of the module docstring)."""
    from estimators.metrics import c2st

    if int(max_samples) < 2 * n_folds:
        raise ValueError(f"max_samples must be >= 2 * n_folds = {2 * n_folds}, got {max_samples}")
    if classifier not in C2ST_CLASSIFIER:
        raise ValueError(f"classifier must be one of {', '.join(C2ST_CLASSIFIER)}, got "
                         f"{classifier!r}")
    keys = order_methods(samples)
    out = []
    for a, b in combinations(keys, 2):
        sa, sb = samples[a], samples[b]
        shared = param_order(set(sa.names) & set(sb.names))
        n = min(len(sa.samples), len(sb.samples), int(max_samples))
        entry = {"a": a, "b": b, "params": shared, "n": n, "accuracy": None}
        if not shared:
            entry["note"] = "no shared parameters"
        elif n < 2 * n_folds:
            entry["note"] = f"too few samples ({n}) for {n_folds}-fold cross-validation"
        else:
            xa = subsample(sa.samples[:, [sa.names.index(p) for p in shared]], n, seed=seed, key=a)
            xb = subsample(sb.samples[:, [sb.names.index(p) for p in shared]], n, seed=seed, key=b)
            entry["accuracy"] = c2st(xa, xb, seed=seed, n_folds=n_folds, classifier=classifier)
        out.append(entry)
    return {"classifier": C2ST_CLASSIFIER[classifier], "n_folds": int(n_folds),
            "max_samples": int(max_samples), "seed": int(seed), "pairs": out}


def fom_ratios(methods: Mapping[str, dict]) -> dict:
    """FoM / FoM of the C_ℓ reference ("cl_analytic" if present, else "npe_cl"), per pair the
    reference has; {"reference": None, "values": {}} without a C_ℓ method."""
    ref = next((r for r in C_ELL_REFERENCES if r in methods), None)
    if ref is None:
        return {"reference": None, "values": {}}
    ref_fom = methods[ref]["fom"]
    values = {}
    for k, m in methods.items():
        values[k] = {p: (m["fom"].get(p, math.nan) / f if f is not None and f > 0 else math.nan)
                     for p, f in ref_fom.items()}
    return {"reference": ref, "values": values}


def compare_metrics(samples: Mapping[str, Samples], *, base, truth, c2st: bool = True,
                    max_samples: int = 2000, seed: int = 0, n_folds: int = 5,
                    classifier: str = "mlp", ess_min=ESS_MIN, r_hat_max=R_HAT_MAX) -> dict:
    """Per-method and pairwise metrics of several methods' posteriors (layout: module docstring).

    Args:
      samples: method key -> ``Samples``; the key's method (before any ``@tag``) must equal
        ``Samples.method``.
      base: the fixed cosmology {param: value} (or a ``Cosmology``), for unsampled parameters.
      truth: the true parameters {param: value}; a sampled parameter missing here uses the
        samples' own truth when they have one.
      c2st: compute the pairwise C2ST (the expensive part; ``null`` when False).
      max_samples, seed, n_folds, classifier: C2ST settings (``c2st_pairs``).
      ess_min, r_hat_max: the convergence thresholds of ``methods[key]["converged"]``.
    """
    if not samples:
        raise ValueError("compare_metrics: no methods given")
    for k, s in samples.items():
        if not isinstance(s, Samples):
            raise ValueError(f"{k}: expected an experiments.io.Samples, got {type(s).__name__}")
        if method_base(k) != s.method:
            raise ValueError(f"method key {k!r} names samples of method {s.method!r}; use "
                             f"{s.method!r} or {s.method + '@<tag>'!r}")
    base_d, truth_d = _as_params(base, "base"), _as_params(truth, "truth")
    unknown = sorted(set(base_d) - set(COSMOLOGY_PARAMS)) + sorted(set(truth_d) - set(COSMOLOGY_PARAMS))
    if unknown:
        raise ValueError(f"unknown cosmological parameter {unknown[0]!r} in base/truth; valid: "
                         f"{', '.join(COSMOLOGY_PARAMS)}")
    limits = convergence_thresholds(ess_min, r_hat_max)
    warn: list[str] = []
    keys = order_methods(samples)
    methods = {k: method_metrics(samples[k], base=base_d, truth=truth_d, key=k, warn=warn, **limits)
               for k in keys}
    full_truth = {p: truth_d[p] for p in sorted(truth_d, key=_param_rank)}
    full_truth.update(derived_truth(truth_d, base_d))
    ratios = fom_ratios(methods)
    if ratios["reference"] is None:
        warn.append("no C_ell method (cl_analytic or npe_cl): FoM ratios not computed")
    pairwise = (c2st_pairs({k: samples[k] for k in keys}, max_samples=max_samples, seed=seed,
                           n_folds=n_folds, classifier=classifier) if c2st else None)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "methods_order": keys,
            "base": base_d, "truth": full_truth, "fom_pairs": [list(p) for p in FOM_PAIRS],
            "methods": methods, "fom_ratio": ratios, "convergence": limits, "c2st": pairwise,
            "warnings": warn}


# ---- files ----------------------------------------------------------------------------------

def write_metrics(path, metrics: dict) -> Path:
    """Write ``metrics`` as JSON (NaN/inf -> null) to ``path`` atomically; returns the path."""
    from .files import write_text

    text = json.dumps(_jsonable_tree(metrics), indent=1, allow_nan=False)
    return write_text(path, text + "\n")


def read_metrics(path) -> dict:
    """A ``metrics.json`` written by ``write_metrics``; ValueError if it is something else."""
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lensbench metrics file (no format={FORMAT!r})")
    return data


__all__ = ["METHODS", "PARAM_ORDER", "FOM_PAIRS", "DERIVED", "ESS_MIN", "R_HAT_MAX",
           "validate_method", "method_base", "method_label", "order_methods", "param_label",
           "pair_key", "derived_columns", "with_derived", "derived_truth", "method_metrics",
           "convergence_thresholds", "is_converged", "converged_flags", "unconverged_note",
           "unconverged_reference",
           "subsample", "c2st_pairs", "fom_ratios", "compare_metrics", "write_metrics",
           "read_metrics"]
