"""Calibration of amortised posteriors: SBC ranks and TARP coverage (sbi diagnostics).

``calibrate(posterior, theta_test, x_test)`` draws posterior samples for every test pair
(θ_i, x_i), with θ_i from the prior and x_i simulated at θ_i, and returns plain numbers:

* SBC (Talts et al. 2018): per parameter, the rank of θ_i among posterior samples is uniform
  for a calibrated posterior; reported as a KS p-value, a C2ST accuracy of ranks vs uniform
  (0.5 ideal) and a C2ST of data-averaged posterior vs prior samples (0.5 ideal).
* TARP (Lemos et al. 2023): expected coverage probability (ECP) of random-reference balls vs
  credibility α; ECP = α is calibrated. ATC = ∫_{α>½}(ECP − α) dα: > 0 under-confident (too
  wide), < 0 over-confident (too narrow) or biased.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_JSON, _SBC_PNG, _TARP_PNG = "calibration.json", "sbc_ranks.png", "tarp.png"


def calibrate(posterior: Any, theta_test: Any, x_test: Any, *, n_posterior_samples: int = 1000,
              out_dir: str | Path | None = None, names: Sequence[str] | None = None,
              seed: int = 0, n_tarp_bins: int | None = None, progress: bool = False) -> dict:
    """SBC and TARP diagnostics of ``posterior`` on m test simulations.

    posterior: an ``NPEResult`` (its x shape is checked) or any sbi posterior with
    ``sample_batched``. theta_test: (m, d) drawn from the prior; x_test: (m, k) or
    (m, n_bins, npix, npix) simulated at theta_test. n_posterior_samples: per test pair (sbi
    recommends ≥ 100 test pairs and ≥ 100 samples; it warns below). n_tarp_bins: α grid size,
    default m // 10. Deterministic given ``seed``; the global torch RNG is left untouched.

    Returns {"names", "n_test", "n_posterior_samples", "seed", "time_s",
    "sbc": {"ks_pvals", "c2st_ranks", "c2st_dap": {name: float}, "ranks": (m, d) ints},
    "tarp": {"atc", "ks_pval": float, "ecp", "alpha": lists}}. With ``out_dir``, writes
    ``calibration.json`` (the same dict), ``sbc_ranks.png`` and ``tarp.png`` there.
    """
    import torch
    from sbi.diagnostics import check_sbc, check_tarp, run_sbc, run_tarp

    t0 = time.perf_counter()
    sbi_post, theta, x, names = _inputs(posterior, theta_test, x_test, names)
    n = int(n_posterior_samples)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # posterior sampling and sbi's C2ST reference draws
        ranks, dap = run_sbc(theta, x, sbi_post, num_posterior_samples=n,
                             show_progress_bar=progress)
        # SBC assumes θ_i ~ prior, so theta_test doubles as the prior sample for the DAP check.
        sbc = check_sbc(ranks, theta, dap, num_posterior_samples=n)
        torch.manual_seed(seed + 1)  # TARP's random reference points
        ecp, alpha = run_tarp(theta, x, sbi_post, num_posterior_samples=n,
                              show_progress_bar=progress, num_bins=n_tarp_bins)
        atc, tarp_p = check_tarp(ecp, alpha)

    per_param = lambda v: {k: float(u) for k, u in zip(names, v.flatten().tolist())}  # noqa: E731
    result = {
        "names": list(names), "n_test": int(theta.shape[0]), "n_posterior_samples": n,
        "seed": int(seed), "time_s": time.perf_counter() - t0,
        "sbc": {"ks_pvals": per_param(sbc["ks_pvals"]),
                "c2st_ranks": per_param(sbc["c2st_ranks"]),
                "c2st_dap": per_param(sbc["c2st_dap"]),
                "ranks": ranks.to(torch.int64).tolist()},
        "tarp": {"atc": float(atc), "ks_pval": float(tarp_p),
                 "ecp": ecp.tolist(), "alpha": alpha.tolist()},
    }
    if out_dir is not None:
        write_calibration(result, out_dir)
    return result


def write_calibration(result: dict, out_dir: str | Path) -> Path:
    """Write ``calibration.json``, ``sbc_ranks.png`` and ``tarp.png`` for a ``calibrate``
    result into ``out_dir`` (created); returns the directory."""
    from experiments.files import check_output_dir, save_figure, write_text

    d = check_output_dir(out_dir)
    write_text(d / _JSON, json.dumps(result, indent=1))
    save_figure(plot_sbc_ranks(np.asarray(result["sbc"]["ranks"]), result["n_posterior_samples"],
                               result["names"], result["sbc"]["ks_pvals"]), d / _SBC_PNG, dpi=100)
    save_figure(plot_tarp(result["tarp"]["ecp"], result["tarp"]["alpha"], result["tarp"]["atc"]),
                d / _TARP_PNG, dpi=100)
    return d


def plot_sbc_ranks(ranks: np.ndarray, n_posterior_samples: int, names: Sequence[str],
                   ks_pvals: dict | None = None, n_bins: int | None = None):
    """Histogram of SBC ranks (m, d) per parameter, with the 99% band of a uniform histogram.

    Returns a ``matplotlib.figure.Figure`` (no pyplot state is touched).
    """
    from matplotlib.figure import Figure
    from scipy.stats import binom

    m, d = ranks.shape
    n_bins = n_bins or int(np.clip(m // 10, 2, 20))  # ~10 ranks per bin at least
    edges = np.linspace(0, n_posterior_samples, n_bins + 1)
    lo, hi = binom.ppf([0.005, 0.995], m, 1 / n_bins)  # counts of a uniform histogram
    fig = Figure(figsize=(3.2 * d, 2.8), layout="constrained")
    axes = fig.subplots(1, d, squeeze=False)[0]
    for i, ax in enumerate(axes):
        ax.axhspan(lo, hi, color="0.85", label="uniform 99%")
        ax.axhline(m / n_bins, color="0.5", lw=1)
        ax.hist(ranks[:, i], bins=edges, histtype="step", color="C0", lw=1.5)
        title = names[i] if i < len(names) else f"theta_{i}"
        if ks_pvals is not None and title in ks_pvals:
            title += f"  (KS p={ks_pvals[title]:.2g})"
        ax.set(title=title, xlabel="rank", xlim=(0, n_posterior_samples))
    axes[0].set_ylabel("count")
    axes[0].legend(loc="lower center", fontsize=7)
    return fig


def plot_tarp(ecp: Sequence[float], alpha: Sequence[float], atc: float | None = None):
    """TARP expected coverage vs credibility level, with the diagonal; returns a Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.plot(alpha, ecp, color="C1", lw=1.5, label="TARP" + ("" if atc is None
                                                          else f" (ATC={atc:+.3f})"))
    ax.set(xlabel=r"credibility level $\alpha$", ylabel="expected coverage", xlim=(0, 1),
           ylim=(0, 1), aspect="equal")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _inputs(posterior: Any, theta_test: Any, x_test: Any, names: Sequence[str] | None):
    """(sbi posterior, θ tensor (m, d), x tensor (m, ...), names), validated."""
    import torch

    theta = np.asarray(theta_test, dtype=np.float32)
    if theta.ndim != 2:
        raise ValueError(f"theta_test: expected shape (m, d), got {theta.shape}")
    if hasattr(posterior, "x_batch"):  # NPEResult: checks x's shape against the training x
        xt = posterior.x_batch(x_test, single=False)
        names = names or posterior.names
        posterior = posterior.posterior
    else:
        x = np.asarray(x_test, dtype=np.float32)
        if x.ndim < 2 or not np.isfinite(x).all():
            raise ValueError(f"x_test: expected finite (m, ...) data, got shape {x.shape}")
        xt = torch.from_numpy(np.ascontiguousarray(x))
    if xt.shape[0] != theta.shape[0]:
        raise ValueError(f"theta_test has {theta.shape[0]} rows, x_test {xt.shape[0]}")
    if not np.isfinite(theta).all():
        raise ValueError("theta_test: contains NaN or inf")
    names = tuple(names or (f"theta_{i}" for i in range(theta.shape[1])))
    if len(names) != theta.shape[1]:
        raise ValueError(f"names: {len(names)} given for {theta.shape[1]} parameters")
    return posterior, torch.from_numpy(theta), xt, names
